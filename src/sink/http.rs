//! [`HttpSink`]: posts CloudEvents batches to any HTTP endpoint, from a bounded queue, with
//! retries and a graceful shutdown. [`OpenMeterSink`](super::OpenMeterSink) is this machine
//! pointed at OpenMeter's ingest API.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use tokio::sync::Notify;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::EventSink;
use super::batcher::Batcher;
use super::config::{BuildError, Settings};
use super::delivery::Delivery;
use super::encode::encode;
use super::shutdown::{self, ShutdownControl, ShutdownReport};
use super::stats::{Counters, DropReason, SinkStats};
use super::throttle::LogThrottle;
use crate::CloudEvent;

/// How often "queue full" and "sent after shutdown" are logged at most.
const DROP_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Delivers CloudEvents to an HTTP endpoint as `application/cloudevents-batch+json` arrays.
///
/// [`send`](EventSink::send) serializes the event and puts its JSON into a bounded queue (it
/// never blocks, awaits or fails; when the queue is full the event is dropped and counted). A
/// background task joins the queued JSON into batches by size or interval and POSTs them. 2xx is delivered; 408, 429
/// (after its `Retry-After`), 5xx, timeouts and connection errors are retried with the same
/// bytes, with exponential backoff and full jitter, until `max_retry_elapsed`; other statuses
/// reject the batch (counted, not retried). Up to `max_in_flight` batches are sent or retried
/// at once.
///
/// The sink is a cheap handle: clones share the queue and the task, so one clone can go into
/// the metering layer and another stay with you for [`stats`](Self::stats) and
/// [`shutdown`](Self::shutdown). Dropping every clone without a shutdown logs how many events
/// were still pending; they are still delivered in the background while the runtime runs.
///
/// ```
/// use std::time::Duration;
/// use tower_openmeter::HttpSink;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_openmeter::sink::BuildError> {
/// let sink = HttpSink::builder("http://127.0.0.1:9/events")
///     .bearer_token("secret")
///     .batch_size(500)
///     .build()?;
/// // ... serve requests, then on the way out:
/// let report = sink.shutdown(Duration::from_secs(5)).await;
/// assert_eq!(report.undelivered, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpSink {
    shared: Arc<Shared>,
}

/// What the handles share. Dropping it closes the queue, which lets the task finish.
struct Shared {
    name: &'static str,
    endpoint: Url,
    /// Events as JSON: serialized by `send`, on the caller's thread (see `encode`).
    queue: mpsc::Sender<Vec<u8>>,
    // Tells the batcher a full batch is queued: it does not watch the queue between the first
    // event of a batch and its flush time, so `send` wakes no other thread for most events.
    batch_ready: Arc<Notify>,
    counters: Arc<Counters>,
    shutdown: ShutdownControl,
    drop_log: LogThrottle,
    settings: Settings,
}

/// Configures an [`HttpSink`]; from [`HttpSink::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct HttpSinkBuilder {
    settings: Settings,
}

impl HttpSink {
    /// Starts configuring a sink that posts to `endpoint`, the full URL (e.g.
    /// `https://example.com/events`).
    pub fn builder(endpoint: impl Into<String>) -> HttpSinkBuilder {
        HttpSinkBuilder {
            settings: Settings::new("HttpSink", endpoint.into()),
        }
    }

    /// The URL batches are posted to.
    pub fn endpoint(&self) -> &Url {
        &self.shared.endpoint
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SinkStats {
        self.shared.stats()
    }

    /// Stops intake, flushes everything queued and in flight, and reports what could not be
    /// delivered within `timeout`.
    ///
    /// Callable on any clone, any number of times: the first call sets the deadline; every
    /// call waits for and returns the same report. Events sent after the call are dropped and
    /// counted (`dropped_shutdown`). Retries still honour `Retry-After`; a retry that would
    /// end past the deadline is given up at once, so the call returns as soon as nothing more
    /// can be delivered.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        match self.shared.shutdown.shutdown(timeout).await {
            Some(report) => report,
            None => {
                // The task is gone (its runtime stopped) or late: report what is left.
                let stats = self.stats();
                ShutdownReport {
                    flushed: 0,
                    undelivered: stats.queued + stats.in_flight,
                    timed_out: true,
                    stats,
                }
            }
        }
    }
}

impl Shared {
    fn queued(&self) -> u64 {
        (self.queue.max_capacity() - self.queue.capacity()) as u64
    }

    fn stats(&self) -> SinkStats {
        self.counters.snapshot(self.queued())
    }

    /// Wakes the background task when a full batch is queued (it does not watch the queue
    /// between a batch's first event and its flush time).
    fn notify_if_batch_ready(&self) {
        if self.queued() >= self.settings.batch_size as u64 {
            self.wake_for_full_batch();
        }
    }

    #[cold]
    fn wake_for_full_batch(&self) {
        self.batch_ready.notify_one();
    }

    fn dropped(&self, reason: DropReason, events: u64) {
        self.counters.record_dropped(reason, events, false);
        if self.drop_log.allow() {
            let stats = self.stats();
            match reason {
                DropReason::QueueFull => tracing::warn!(
                    sink = self.name,
                    dropped_total = stats.dropped_queue_full,
                    capacity = self.queue.max_capacity(),
                    "queue full: event dropped (logged at most every 10 s)"
                ),
                _ => tracing::warn!(
                    sink = self.name,
                    dropped_total = stats.dropped_shutdown,
                    "event sent after shutdown: dropped (logged at most every 10 s)"
                ),
            }
        }
    }
}

impl EventSink for HttpSink {
    #[inline]
    fn send(&self, event: CloudEvent) {
        let shared = &self.shared;
        match shared.queue.try_reserve() {
            Ok(permit) => {
                if let Some(json) = encode(&event, &shared.counters) {
                    permit.send(json);
                    shared.notify_if_batch_ready();
                }
            }
            Err(TrySendError::Full(())) => shared.dropped(DropReason::QueueFull, 1),
            Err(TrySendError::Closed(())) => shared.dropped(DropReason::Shutdown, 1),
        }
    }

    /// Queues the events of one usage record together or drops them together, so a nearly full
    /// queue never bills half a request.
    fn send_all(&self, events: Vec<CloudEvent>) {
        let shared = &self.shared;
        if events.len() > shared.queue.max_capacity() {
            // More events than the whole queue holds: queue what fits, one by one.
            return events.into_iter().for_each(|event| self.send(event));
        }
        let count = events.len() as u64;
        match shared.queue.try_reserve_many(events.len()) {
            Ok(permits) => {
                // An event that cannot be serialized (counted) leaves its permit unused.
                for (permit, event) in permits.zip(events) {
                    if let Some(json) = encode(&event, &shared.counters) {
                        permit.send(json);
                    }
                }
                shared.notify_if_batch_ready();
            }
            Err(TrySendError::Full(())) => shared.dropped(DropReason::QueueFull, count),
            Err(TrySendError::Closed(())) => shared.dropped(DropReason::Shutdown, count),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let pending = self.queued() + self.counters.in_flight();
        if !self.shutdown.requested() && pending > 0 {
            tracing::warn!(
                sink = self.name,
                queued = self.queued(),
                in_flight = self.counters.in_flight(),
                "dropped without shutdown(): pending events are delivered in the background \
                 only while the runtime keeps running"
            );
        }
    }
}

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(self.shared.name)
            .field("settings", &self.shared.settings)
            .field("stats", &self.stats())
            .finish()
    }
}

impl HttpSinkBuilder {
    #[cfg(test)]
    pub(crate) fn settings_endpoint(&self) -> &str {
        &self.settings.endpoint
    }

    pub(crate) fn named(mut self, name: &'static str) -> Self {
        self.settings.name = name;
        self
    }

    /// Sends `Authorization: Bearer <token>`. Without it (or with an empty token) no
    /// `Authorization` header is sent. The token never appears in `Debug` output or logs.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.settings.bearer_token = (!token.is_empty()).then_some(token);
        self
    }

    /// The most events per request (default 100; at least 1).
    pub fn batch_size(mut self, events: usize) -> Self {
        self.settings.batch_size = events.max(1);
        self
    }

    /// How long a partial batch waits for more events before it is sent (default 1 s).
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.settings.flush_interval = interval;
        self
    }

    /// How many events the queue holds; when it is full `send` drops the newest event
    /// (default 100 000; at least 1). A queued event is its JSON, about 0.45 KB with its buffer
    /// (see BENCHMARKS.md), so the default bounds the queue at about 45 MiB.
    pub fn queue_capacity(mut self, events: usize) -> Self {
        self.settings.queue_capacity = events.max(1);
        self
    }

    /// How many batches may be sent or wait to be retried at once (default 4; at least 1).
    /// When all are busy the queue fills up instead.
    pub fn max_in_flight(mut self, batches: usize) -> Self {
        self.settings.max_in_flight = batches.max(1);
        self
    }

    /// The time allowed for one HTTP attempt, response included (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// Spools events on disk between the queue and delivery (feature `spool`), so that a
    /// crash, a restart or a long outage loses no committed event. See
    /// [`SpoolConfig`](crate::spool::SpoolConfig) for the pipeline and its exact guarantee.
    /// With a spool, a failing batch is retried until it is delivered (it is not dropped after
    /// [`max_retry_elapsed`](Self::max_retry_elapsed)); the spool's byte bound limits what an
    /// outage can pile up.
    #[cfg(feature = "spool")]
    #[cfg_attr(docsrs, doc(cfg(feature = "spool")))]
    pub fn spool(mut self, config: crate::spool::SpoolConfig) -> Self {
        self.settings.spool = Some(config);
        self
    }

    /// How long a failing batch is retried before it is dropped and counted (default 15 min).
    pub fn max_retry_elapsed(mut self, elapsed: Duration) -> Self {
        self.settings.max_retry_elapsed = elapsed;
        self
    }

    /// The bounds of the backoff between retries: the first wait is drawn in `[0, base]`,
    /// and each next ceiling doubles up to `max` (default 200 ms and 30 s). Shorter bounds
    /// make tests fast.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.backoff.base = base;
        self.settings.backoff.max = max.max(base);
        self
    }

    /// Uses this client (proxies, TLS roots, connection pool). By default the sink makes its
    /// own, which does not follow redirects. The per-request timeout is applied either way.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.settings.client = Some(client);
        self
    }

    /// Builds the sink and starts its background task on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime; [`BuildError::InvalidUrl`],
    /// [`BuildError::InvalidApiKey`] or [`BuildError::Client`] for a bad configuration.
    pub fn build(self) -> Result<HttpSink, BuildError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let settings = self.settings;
        let endpoint = settings.endpoint_url()?;
        let counters = Arc::new(Counters::default());
        let delivery = Delivery {
            name: settings.name,
            client: settings.http_client()?,
            endpoint: endpoint.clone(),
            authorization: settings.authorization()?,
            request_timeout: settings.request_timeout,
            max_retry_elapsed: settings.max_retry_elapsed,
            backoff: settings.backoff,
            counters: Arc::clone(&counters),
            auth_log: LogThrottle::new(Duration::from_secs(60)),
        };
        let (queue, receiver) = mpsc::channel(settings.queue_capacity);
        let batch_ready = Arc::new(Notify::new());
        let (control, listener) = shutdown::channel();
        let delivery = Arc::new(delivery);
        // With a spool, the spooled pipeline takes the queue; else the in-memory batcher does.
        #[cfg(feature = "spool")]
        let in_memory = match &settings.spool {
            Some(config) => {
                super::spooled::Pipeline::open(config, receiver, delivery, &settings, listener)?
                    .spawn(&runtime);
                None
            }
            None => Some((receiver, delivery, listener)),
        };
        #[cfg(not(feature = "spool"))]
        let in_memory = Some((receiver, delivery, listener));
        if let Some((receiver, delivery, listener)) = in_memory {
            let batcher = Batcher {
                queue: receiver,
                batch_ready: Arc::clone(&batch_ready),
                delivery,
                batch_size: settings.batch_size,
                flush_interval: settings.flush_interval,
                max_in_flight: settings.max_in_flight,
                shutdown: listener,
            };
            runtime.spawn(batcher.run());
        }
        Ok(HttpSink {
            shared: Arc::new(Shared {
                name: settings.name,
                endpoint,
                queue,
                batch_ready,
                counters,
                shutdown: control,
                drop_log: LogThrottle::new(DROP_LOG_PERIOD),
                settings,
            }),
        })
    }
}
