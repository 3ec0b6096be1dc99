//! What a sink did with its events: counters, their snapshot ([`SinkStats`]) and their export
//! through the `metrics` facade (feature `metrics`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A point-in-time copy of an HTTP sink's counters, from [`HttpSink::stats`] or
/// [`OpenMeterSink::stats`].
///
/// Every event handed to the sink ends in exactly one of `delivered`, `rejected` or one of the
/// `dropped_*` counters, or is still `queued`, `in_flight` or (with a spool) `spooled`.
/// Events left in a spool by a previous run are counted in `spooled` when the sink starts.
///
/// [`HttpSink::stats`]: super::HttpSink::stats
/// [`OpenMeterSink::stats`]: super::OpenMeterSink::stats
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkStats {
    /// Events waiting in the queue now.
    pub queued: u64,
    /// Events taken from the queue and not settled yet: in a batch being formed, sent or retried.
    pub in_flight: u64,
    /// Events the endpoint acknowledged with a 2xx.
    pub delivered: u64,
    /// Batches the endpoint acknowledged with a 2xx.
    pub batches_sent: u64,
    /// Attempts made again after a retryable failure (408, 429, 5xx, timeout, connection error).
    pub retries: u64,
    /// Events in batches the endpoint refused with a non-retryable status (400, 401, 403, ...).
    pub rejected: u64,
    /// `rejected`, by HTTP status.
    pub rejected_by_status: BTreeMap<u16, u64>,
    /// Events dropped by `send` because the queue was full.
    pub dropped_queue_full: u64,
    /// Events dropped because their batch still failed when the retry time ran out.
    pub dropped_retry_exhausted: u64,
    /// Events dropped by shutdown: sent after it began, or unsettled when its timeout passed.
    pub dropped_shutdown: u64,
    /// Events that could not be serialized (never expected; counted rather than hidden).
    pub dropped_unserializable: u64,
    /// The last failure seen (a retryable error or a rejection), if any.
    pub last_error: Option<String>,
    /// Events committed to the disk spool and not settled yet, those being sent included
    /// (feature `spool`; always 0 without a spool). They survive a crash or a restart. With a
    /// spool, `in_flight` counts only the events between the queue and their group commit.
    pub spooled: u64,
    /// The bytes of event JSON in the spool, those being sent included (feature `spool`).
    pub spool_bytes: u64,
    /// Events dropped because the spool was full (its `max_bytes`), by its overflow policy.
    pub dropped_spool_full: u64,
}

impl SinkStats {
    /// All dropped events, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full
            + self.dropped_retry_exhausted
            + self.dropped_shutdown
            + self.dropped_unserializable
            + self.dropped_spool_full
    }

    /// Events that will never be delivered: rejected or dropped.
    pub fn lost(&self) -> u64 {
        self.rejected + self.dropped()
    }
}

/// Why events were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropReason {
    QueueFull,
    RetryExhausted,
    Shutdown,
    Unserializable,
    #[cfg_attr(not(feature = "spool"), allow(dead_code))]
    SpoolFull,
}

impl DropReason {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::RetryExhausted => "retry_exhausted",
            DropReason::Shutdown => "shutdown",
            DropReason::Unserializable => "unserializable",
            DropReason::SpoolFull => "spool_full",
        }
    }
}

/// The live counters, shared by the handle, the batcher and the delivery tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    in_flight: AtomicU64,
    delivered: AtomicU64,
    batches_sent: AtomicU64,
    retries: AtomicU64,
    rejected: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_retry_exhausted: AtomicU64,
    dropped_shutdown: AtomicU64,
    dropped_unserializable: AtomicU64,
    dropped_spool_full: AtomicU64,
    spooled: AtomicU64,
    spool_bytes: AtomicU64,
    rejected_by_status: Mutex<BTreeMap<u16, u64>>,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    /// Reads every counter; `queued` comes from the channel.
    pub(crate) fn snapshot(&self, queued: u64) -> SinkStats {
        SinkStats {
            queued,
            in_flight: load(&self.in_flight),
            delivered: load(&self.delivered),
            batches_sent: load(&self.batches_sent),
            retries: load(&self.retries),
            rejected: load(&self.rejected),
            rejected_by_status: lock(&self.rejected_by_status).clone(),
            dropped_queue_full: load(&self.dropped_queue_full),
            dropped_retry_exhausted: load(&self.dropped_retry_exhausted),
            dropped_shutdown: load(&self.dropped_shutdown),
            dropped_unserializable: load(&self.dropped_unserializable),
            last_error: lock(&self.last_error).clone(),
            spooled: load(&self.spooled),
            spool_bytes: load(&self.spool_bytes),
            dropped_spool_full: load(&self.dropped_spool_full),
        }
    }

    pub(crate) fn delivered(&self) -> u64 {
        load(&self.delivered)
    }

    pub(crate) fn dropped_shutdown(&self) -> u64 {
        load(&self.dropped_shutdown)
    }

    pub(crate) fn in_flight(&self) -> u64 {
        load(&self.in_flight)
    }

    /// Events left the queue for a batch.
    pub(crate) fn taken(&self, events: u64) {
        self.in_flight.fetch_add(events, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::gauge!("openmeter_sink_in_flight_events").increment(events as f64);
    }

    fn settled(&self, events: u64) {
        self.in_flight.fetch_sub(events, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::gauge!("openmeter_sink_in_flight_events").decrement(events as f64);
    }

    /// A batch was acknowledged; `in_flight` says whether its events were counted in flight
    /// (spooled ones are not).
    pub(crate) fn record_delivered(&self, events: u64, in_flight: bool) {
        if in_flight {
            self.settled(events);
        }
        self.delivered.fetch_add(events, Ordering::Relaxed);
        self.batches_sent.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("openmeter_sink_events_delivered_total").increment(events);
            metrics::counter!("openmeter_sink_batches_sent_total").increment(1);
        }
    }

    /// A batch was refused for good.
    pub(crate) fn record_rejected(&self, status: u16, events: u64, in_flight: bool) {
        if in_flight {
            self.settled(events);
        }
        self.rejected.fetch_add(events, Ordering::Relaxed);
        *lock(&self.rejected_by_status).entry(status).or_default() += events;
        #[cfg(feature = "metrics")]
        metrics::counter!("openmeter_sink_events_rejected_total", "status" => status.to_string())
            .increment(events);
    }

    /// Events were dropped; `from_queue` says whether they had left the queue (in flight).
    pub(crate) fn record_dropped(&self, reason: DropReason, events: u64, in_flight: bool) {
        if in_flight {
            self.settled(events);
        }
        let counter = match reason {
            DropReason::QueueFull => &self.dropped_queue_full,
            DropReason::RetryExhausted => &self.dropped_retry_exhausted,
            DropReason::Shutdown => &self.dropped_shutdown,
            DropReason::Unserializable => &self.dropped_unserializable,
            DropReason::SpoolFull => &self.dropped_spool_full,
        };
        counter.fetch_add(events, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("openmeter_sink_events_dropped_total", "reason" => reason.label())
            .increment(events);
    }

    /// An attempt is about to be made again.
    pub(crate) fn record_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("openmeter_sink_retries_total").increment(1);
    }

    /// Events left the memory for the spool (feature `spool`): no longer in flight, not
    /// settled either.
    #[cfg(feature = "spool")]
    pub(crate) fn unsettled_to_spool(&self, events: u64) {
        self.settled(events);
    }

    /// Publishes the spool's waiting events and bytes (feature `spool`).
    #[cfg(feature = "spool")]
    pub(crate) fn publish_spool(&self, waiting: u64, bytes: u64) {
        self.spooled.store(waiting, Ordering::Relaxed);
        self.spool_bytes.store(bytes, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!("openmeter_sink_spooled_events").set(waiting as f64);
            metrics::gauge!("openmeter_sink_spool_bytes").set(bytes as f64);
        }
    }

    pub(crate) fn set_last_error(&self, error: String) {
        *lock(&self.last_error) = Some(error);
    }

    /// Publishes the queue length (feature `metrics`; a no-op otherwise).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn publish_queued(&self, queued: usize) {
        #[cfg(feature = "metrics")]
        metrics::gauge!("openmeter_sink_queued_events").set(queued as f64);
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay valid if a holder panicked; keep using them.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_settles_in_flight_events() {
        let counters = Counters::default();
        counters.taken(10);
        counters.record_delivered(4, true);
        counters.record_rejected(400, 3, true);
        counters.record_dropped(DropReason::RetryExhausted, 2, true);
        counters.record_dropped(DropReason::QueueFull, 5, false);
        // Spooled events were never in flight: settling them leaves the count alone.
        counters.record_delivered(6, false);
        counters.record_rejected(400, 2, false);
        let stats = counters.snapshot(7);
        assert_eq!(stats.in_flight, 1);
        assert_eq!(stats.queued, 7);
        assert_eq!(stats.delivered, 10);
        assert_eq!(stats.batches_sent, 2);
        assert_eq!(stats.rejected, 5);
        assert_eq!(stats.rejected_by_status, BTreeMap::from([(400, 5)]));
        assert_eq!(stats.dropped_retry_exhausted, 2);
        assert_eq!(stats.dropped_queue_full, 5);
        assert_eq!(stats.dropped(), 7);
        assert_eq!(stats.lost(), 12);
    }

    #[test]
    fn labels_are_stable() {
        assert_eq!(DropReason::QueueFull.label(), "queue_full");
        assert_eq!(DropReason::RetryExhausted.label(), "retry_exhausted");
        assert_eq!(DropReason::Shutdown.label(), "shutdown");
        assert_eq!(DropReason::Unserializable.label(), "unserializable");
        assert_eq!(DropReason::SpoolFull.label(), "spool_full");
    }
}
