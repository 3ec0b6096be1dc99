//! Counters that make every skipped, unparsed or dropped outcome visible.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        #[derive(Default)]
        pub(crate) struct Counters {
            $( pub(crate) $name: AtomicU64, )*
        }

        /// A point-in-time copy of the metering layer's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Counters {
            fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Requests the layer saw.
    requests_seen,
    /// Requests that produced a usage record.
    requests_metered,
    /// Requests passed through: not a POST to an API path.
    skipped_not_api,
    /// Requests passed through: a body that is not JSON.
    skipped_not_json,
    /// Responses not metered because of their status (non-2xx by default).
    skipped_status,
    /// Non-streamed responses that parsed but reported no usage (no event).
    skipped_no_usage,
    /// Responses that could not be read: not JSON or SSE, an unsupported encoding, invalid JSON.
    unparsed_response,
    /// Responses larger than the inspection cap (not metered).
    response_over_cap,
    /// Request bodies over the buffering cap (passed on whole, fields unread).
    request_over_cap,
    /// Request bodies that were not valid JSON (passed on unchanged).
    request_invalid_json,
    /// Request bodies whose read failed (passed on with the error).
    request_body_error,
    /// Request bodies the inner service had not read to the end when the response ended, so
    /// their fields were not read.
    request_unread,
    /// Records billed to the fallback subject because no source yielded one.
    subject_fallback,
    /// Records dropped because no subject was found and the policy is to skip.
    subject_skipped,
    /// Usage fields that were negative, fractional, non-numeric or inconsistent.
    usage_anomalies,
    /// Responses that ended early (client gone, upstream error) and were metered as incomplete.
    responses_incomplete,
    /// Streams that ended (cut, or complete without a usage chunk) and responses cut short
    /// before any usage arrived: metered with `usage_source: missing`.
    usage_missing,
    /// Requests whose response future was dropped before the inner service answered.
    requests_cancelled,
    /// SSE lines longer than the line cap, skipped.
    sse_lines_too_long,
    /// SSE events whose joined data was longer than the line cap, skipped.
    sse_events_too_large,
    /// Compressed responses whose decoding (for inspection only) failed or passed its cap.
    decode_failed,
    /// Streaming requests rewritten to ask for usage (`ensure_stream_usage`).
    stream_usage_injected,
    /// Usage-only chunks removed from streams whose usage the layer asked for.
    usage_chunks_removed,
    /// Streams whose usage the layer asked for but could not filter (compressed or not SSE):
    /// the client sees the usage chunk.
    usage_chunks_unfiltered,
    /// Events handed to the sink.
    events_emitted,
}

/// A cheap, clonable handle to the metering layer's counters.
///
/// ```
/// use tower_openmeter::{MemorySink, MeteringLayer};
///
/// let layer = MeteringLayer::builder().sink(MemorySink::new()).build();
/// let stats = layer.stats();
/// assert_eq!(stats.snapshot().requests_seen, 0);
/// ```
#[derive(Clone, Default)]
pub struct MeteringStats {
    pub(crate) counters: Arc<Counters>,
}

impl MeteringStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.counters.snapshot()
    }

    pub(crate) fn add(&self, counter: impl Fn(&Counters) -> &AtomicU64, n: u64) {
        counter(&self.counters).fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn incr(&self, counter: impl Fn(&Counters) -> &AtomicU64) {
        self.add(counter, 1);
    }
}

impl fmt::Debug for MeteringStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}
