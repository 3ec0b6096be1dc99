//! Graceful shutdown: the signal from the handles to the background task, and the report back.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::stats::{Counters, SinkStats};

/// What a shutdown achieved, from [`HttpSink::shutdown`] or [`OpenMeterSink::shutdown`].
///
/// [`HttpSink::shutdown`]: super::HttpSink::shutdown
/// [`OpenMeterSink::shutdown`]: super::OpenMeterSink::shutdown
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Events delivered while shutting down (the flush).
    pub flushed: u64,
    /// Events given up because of the shutdown: still queued or in flight when the timeout
    /// passed, or sent after the shutdown began.
    pub undelivered: u64,
    /// Whether the timeout passed before everything was settled.
    pub timed_out: bool,
    /// The sink's lifetime counters at the end of the shutdown.
    pub stats: SinkStats,
}

impl ShutdownReport {
    /// Whether the sink lost nothing over its whole life: no event rejected or dropped.
    pub fn is_lossless(&self) -> bool {
        self.stats.lost() == 0 && self.stats.queued == 0 && self.stats.in_flight == 0
    }
}

/// The handles' side: asks for a shutdown and waits for its report.
#[derive(Debug)]
pub(crate) struct ShutdownControl {
    deadline: watch::Sender<Option<Instant>>,
    report: watch::Receiver<Option<ShutdownReport>>,
}

/// The background task's side.
#[derive(Debug)]
pub(crate) struct ShutdownListener {
    pub(crate) deadline: watch::Receiver<Option<Instant>>,
    pub(crate) report: watch::Sender<Option<ShutdownReport>>,
}

/// A connected control and listener.
pub(crate) fn channel() -> (ShutdownControl, ShutdownListener) {
    let (deadline_tx, deadline_rx) = watch::channel(None);
    let (report_tx, report_rx) = watch::channel(None);
    (
        ShutdownControl {
            deadline: deadline_tx,
            report: report_rx,
        },
        ShutdownListener {
            deadline: deadline_rx,
            report: report_tx,
        },
    )
}

/// Time allowed past the deadline for the background task to write its report.
/// Where a shutdown stands, once the background task saw it asked for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stopping {
    pub(crate) deadline: Instant,
    delivered_before: u64,
    dropped_before: u64,
}

impl Stopping {
    /// Notes where the counters stand when the shutdown begins.
    pub(crate) fn begin(deadline: Instant, counters: &Counters) -> Self {
        Stopping {
            deadline,
            delivered_before: counters.delivered(),
            dropped_before: counters.dropped_shutdown(),
        }
    }

    /// The report: what the shutdown flushed and dropped since it began.
    pub(crate) fn report(&self, stats: SinkStats) -> ShutdownReport {
        ShutdownReport {
            flushed: stats.delivered - self.delivered_before,
            undelivered: stats.dropped_shutdown - self.dropped_before,
            timed_out: Instant::now() >= self.deadline,
            stats,
        }
    }
}

const REPORT_GRACE: Duration = Duration::from_millis(500);

impl ShutdownControl {
    /// Whether a shutdown was asked for.
    pub(crate) fn requested(&self) -> bool {
        self.deadline.borrow().is_some()
    }

    /// Asks for a shutdown by `now + timeout` (the first request's deadline wins), then waits
    /// for the report. `None` if the background task is gone without one (its runtime stopped)
    /// or missed the deadline.
    pub(crate) async fn shutdown(&self, timeout: Duration) -> Option<ShutdownReport> {
        let deadline = Instant::now() + timeout;
        self.deadline.send_if_modified(|current| match current {
            Some(_) => false,
            None => {
                *current = Some(deadline);
                true
            }
        });
        let wait_until = self.deadline.borrow().unwrap_or(deadline) + REPORT_GRACE;
        let mut report = self.report.clone();
        let wait = async {
            match report.wait_for(Option::is_some).await {
                Ok(done) => done.clone(),
                Err(_) => None,
            }
        };
        tokio::time::timeout_at(wait_until.into(), wait)
            .await
            .ok()
            .flatten()
    }
}
