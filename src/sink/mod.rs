//! Where events go: the [`EventSink`] trait and the sinks that ship with the crate.
//!
//! - [`MemorySink`]: keeps events in memory, for tests.
//! - [`StdoutSink`]: prints one JSON event per line, for development and log shippers.
//! - [`OpenMeterSink`]: delivers to OpenMeter's ingest API, batched and retried, from a
//!   bounded queue, with a graceful [`shutdown`](OpenMeterSink::shutdown).
//! - [`HttpSink`]: the same machine for any endpoint that takes CloudEvents batches.

mod batcher;
mod config;
mod delivery;
mod encode;
mod http;
mod memory;
mod openmeter;
mod outcome;
mod retry;
mod shutdown;
#[cfg(feature = "spool")]
mod spooled;
mod stats;
mod stdout;
mod throttle;

pub use config::BuildError;
pub use http::{HttpSink, HttpSinkBuilder};
pub use memory::MemorySink;
pub use openmeter::{DEFAULT_OPENMETER_URL, OpenMeterSink, OpenMeterSinkBuilder};
pub use shutdown::ShutdownReport;
pub use stats::SinkStats;
pub use stdout::StdoutSink;

use std::sync::Arc;

use crate::CloudEvent;

/// Receives the CloudEvents of metered requests.
///
/// `send` is called on the request path, so it must return at once: it must not block, await or
/// fail. A sink that does I/O queues the event and does its work on its own task, and counts
/// whatever it has to drop.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tower_openmeter::{CloudEvent, EventSink};
///
/// #[derive(Default)]
/// struct CountingSink(AtomicU64);
///
/// impl EventSink for CountingSink {
///     fn send(&self, _event: CloudEvent) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
/// ```
pub trait EventSink: Send + Sync + 'static {
    /// Takes one event. Must not block.
    fn send(&self, event: CloudEvent);

    /// Takes all events of one usage record. The default sends them one by one; a sink with a
    /// bounded queue should take them all or drop them all (as [`HttpSink`] does), so a full
    /// queue never bills half a request.
    fn send_all(&self, events: Vec<CloudEvent>) {
        for event in events {
            self.send(event);
        }
    }
}

impl<T: EventSink + ?Sized> EventSink for Arc<T> {
    fn send(&self, event: CloudEvent) {
        (**self).send(event)
    }

    fn send_all(&self, events: Vec<CloudEvent>) {
        (**self).send_all(events)
    }
}

impl<T: EventSink + ?Sized> EventSink for Box<T> {
    fn send(&self, event: CloudEvent) {
        (**self).send(event)
    }

    fn send_all(&self, events: Vec<CloudEvent>) {
        (**self).send_all(events)
    }
}
