//! Delivering one batch: join the events' JSON once, post, and retry the same bytes until it is
//! settled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::encode;
use super::outcome::{self, Outcome};
use super::retry::{Backoff, BackoffConfig};
use super::stats::{Counters, DropReason};
use super::throttle::LogThrottle;

/// The media type of a JSON array of CloudEvents, exactly as OpenMeter compares it.
pub(crate) const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// What every delivery task of one sink shares.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) name: &'static str,
    pub(crate) client: reqwest::Client,
    pub(crate) endpoint: Url,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) request_timeout: Duration,
    pub(crate) max_retry_elapsed: Duration,
    pub(crate) backoff: BackoffConfig,
    pub(crate) counters: Arc<Counters>,
    /// Authentication faults are logged at most once a minute.
    pub(crate) auth_log: LogThrottle,
}

/// A batch body, posted as is on every attempt, and how many events it holds.
struct Batch {
    body: Bytes,
    events: u64,
}

/// Settles a batch's events exactly once. If the task ends without settling them (aborted at
/// the shutdown deadline, or a panic), they are counted as dropped by shutdown.
struct Settle<'a> {
    counters: &'a Counters,
    events: u64,
    done: bool,
}

impl Settle<'_> {
    fn delivered(mut self) {
        self.counters.record_delivered(self.events, true);
        self.done = true;
    }

    fn rejected(mut self, status: StatusCode) {
        self.counters.record_rejected(status.as_u16(), self.events, true);
        self.done = true;
    }

    fn dropped(mut self, reason: DropReason) {
        self.counters.record_dropped(reason, self.events, true);
        self.done = true;
    }
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.counters
                .record_dropped(DropReason::Shutdown, self.events, true);
        }
    }
}

impl Delivery {
    /// Delivers one batch, retrying until it is delivered, rejected, out of retry time, or
    /// past the shutdown deadline. Holds `_permit` (one of `max_in_flight`) until settled.
    pub(crate) async fn deliver(
        self: Arc<Self>,
        events: Vec<Vec<u8>>,
        mut shutdown: watch::Receiver<Option<Instant>>,
        _permit: OwnedSemaphorePermit,
    ) {
        if events.is_empty() {
            return;
        }
        let batch = Batch {
            body: encode::batch_body(events.iter().map(Vec::as_slice)),
            events: events.len() as u64,
        };
        drop(events);
        let settle = Settle {
            counters: &self.counters,
            events: batch.events,
            done: false,
        };
        let started = Instant::now();
        let mut backoff = Backoff::new(self.backoff);
        loop {
            let (reason, after) = match self.attempt(&batch.body).await {
                Outcome::Delivered => {
                    tracing::debug!(sink = self.name, events = batch.events, "batch delivered");
                    return settle.delivered();
                }
                Outcome::Rejected { status, detail } => {
                    self.log_rejection(status, &detail, batch.events);
                    return settle.rejected(status);
                }
                Outcome::Retry { reason, after } => (reason, after),
            };
            self.counters.set_last_error(reason.clone());
            let wait = after.unwrap_or_else(|| backoff.next_wait());
            if started.elapsed() + wait > self.max_retry_elapsed {
                tracing::error!(
                    sink = self.name, events = batch.events, error = %reason,
                    "batch dropped: still failing after {:?} of retries", started.elapsed()
                );
                return settle.dropped(DropReason::RetryExhausted);
            }
            let deadline = *shutdown.borrow();
            if deadline.is_some_and(|d| Instant::now() + wait > d) {
                tracing::warn!(
                    sink = self.name, events = batch.events, error = %reason,
                    "batch dropped: the next retry would pass the shutdown deadline"
                );
                return settle.dropped(DropReason::Shutdown);
            }
            tracing::warn!(
                sink = self.name, events = batch.events, error = %reason, ?wait,
                "batch failed; will retry"
            );
            wait_before_retry(wait, after.is_some(), deadline.is_none(), &mut shutdown).await;
            self.counters.record_retry();
        }
    }

    /// One POST of the batch.
    pub(crate) async fn attempt(&self, body: &Bytes) -> Outcome {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static(BATCH_CONTENT_TYPE))
            .timeout(self.request_timeout)
            .body(body.clone());
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        match request.send().await {
            Ok(response) => outcome::classify(response).await,
            Err(error) => outcome::classify_error(&error),
        }
    }

    pub(crate) fn log_rejection(&self, status: StatusCode, detail: &str, events: u64) {
        self.counters
            .set_last_error(format!("HTTP {}: {detail}", status.as_u16()));
        let auth = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
        if !auth {
            tracing::error!(
                sink = self.name, status = status.as_u16(), %detail, events,
                "batch rejected; not retried"
            );
        } else if self.auth_log.allow() {
            tracing::error!(
                sink = self.name, status = status.as_u16(), %detail, events,
                "batch rejected: authentication failed, check the API key (configuration fault; logged at most once a minute)"
            );
        }
    }
}

/// Sleeps before a retry. A shutdown that begins during our own backoff cuts it short, so the
/// batch gets one more attempt before the deadline; a server's `Retry-After` is always honoured.
pub(crate) async fn wait_before_retry(
    wait: Duration,
    server_imposed: bool,
    no_shutdown_yet: bool,
    shutdown: &mut watch::Receiver<Option<Instant>>,
) {
    let sleep = tokio::time::sleep(wait);
    if server_imposed || !no_shutdown_yet {
        return sleep.await;
    }
    tokio::select! {
        () = sleep => {}
        _ = shutdown.wait_for(Option::is_some) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsettled_batches_count_as_dropped_by_shutdown() {
        let counters = Counters::default();
        counters.taken(3);
        drop(Settle {
            counters: &counters,
            events: 3,
            done: false,
        });
        let stats = counters.snapshot(0);
        assert_eq!((stats.in_flight, stats.dropped_shutdown), (0, 3));
    }
}
