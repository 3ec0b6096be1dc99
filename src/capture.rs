//! Reading the request body's fields without holding the request back: a bounded copy of the
//! body is taken as the inner service reads it, read as JSON when the body ends, and only the
//! fields are kept for the meter (the copy is let go at once, not held while a response streams).
//!
//! Buffering the body before calling the inner service costs more than the copy itself: on a
//! multi-threaded tokio runtime, reading a hyper body inside the connection's own task makes
//! the task wake itself, and the runtime then wakes a second worker for every request (about
//! 20% of a proxy's throughput on two cores, see BENCHMARKS.md). Copying the frames while the
//! inner service streams them costs one reference count per frame and nothing else.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::RequestFields;
use crate::chunks::Chunks;
use crate::stats::MeteringStats;

/// What the layer got of the request body: from the copy (how far the inner service read it
/// by the time the response ended), or from reading it first.
#[derive(Debug)]
pub(crate) enum Captured {
    /// All of it, within the cap, read as JSON as soon as it ended (so the copy is let go at
    /// once, not held for as long as the response streams).
    Complete(Result<RequestFields, serde_json::Error>),
    /// More than the cap.
    OverCap,
    /// The body failed.
    Failed,
    /// The body was dropped before its end.
    Unfinished,
}

impl Captured {
    /// The request's fields; counts (and logs) what kept them from being read.
    pub(crate) fn into_fields(self, stats: &MeteringStats) -> RequestFields {
        match self {
            Captured::Complete(fields) => fields.unwrap_or_else(|error| {
                stats.incr(|c| &c.request_invalid_json);
                tracing::debug!(%error, "request body is not a JSON object: fields not read");
                RequestFields::default()
            }),
            Captured::OverCap => {
                stats.incr(|c| &c.request_over_cap);
                tracing::debug!("request body over the cap: fields not read");
                RequestFields::default()
            }
            Captured::Failed => {
                stats.incr(|c| &c.request_body_error);
                RequestFields::default()
            }
            Captured::Unfinished => {
                stats.incr(|c| &c.request_unread);
                tracing::debug!("the inner service did not read the whole request body: fields not read");
                RequestFields::default()
            }
        }
    }
}

/// Where the copy is published: shared by the request body (writer) and the meter (reader).
#[derive(Debug, Default)]
pub(crate) struct CaptureSlot(Mutex<Option<Captured>>);

impl CaptureSlot {
    /// The request's fields, from what was captured; counts what kept them from being read.
    pub(crate) fn fields(&self, stats: &MeteringStats) -> RequestFields {
        let captured = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        captured.unwrap_or(Captured::Unfinished).into_fields(stats)
    }

    fn publish(&self, captured: Captured) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(captured);
    }
}

/// How a captured body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    Complete,
    Failed,
}

/// The writer side, held by the request body: a bounded copy of the frames read so far.
/// Publishes on the body's end, or as unfinished when dropped first.
#[derive(Debug)]
pub(crate) struct Capture {
    chunks: Chunks,
    slot: Option<Arc<CaptureSlot>>,
}

impl Capture {
    /// A capture of at most `cap` bytes, and the slot it will publish to.
    /// `declared` is the body's `Content-Length`, if any.
    pub(crate) fn new(cap: usize, declared: Option<u64>) -> (Self, Arc<CaptureSlot>) {
        let slot = Arc::new(CaptureSlot::default());
        let capture = Capture {
            chunks: Chunks::bounded(cap).expecting(declared),
            slot: Some(slot.clone()),
        };
        (capture, slot)
    }

    pub(crate) fn observe(&mut self, data: &Bytes) {
        if self.slot.is_some() {
            self.chunks.push(data);
        }
    }

    /// Publishes once; later calls do nothing.
    pub(crate) fn finish(&mut self, end: BodyEnd) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let captured = match end {
            BodyEnd::Failed => Captured::Failed,
            BodyEnd::Complete if self.chunks.is_over_cap() => Captured::OverCap,
            BodyEnd::Complete => {
                let body = std::mem::replace(&mut self.chunks, Chunks::bounded(0));
                Captured::Complete(RequestFields::from_chunks(body))
            }
        };
        slot.publish(captured);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let captured = if self.chunks.is_over_cap() {
                Captured::OverCap
            } else {
                Captured::Unfinished
            };
            slot.publish(captured);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields_after(
        chunks: &[&'static str],
        end: Option<BodyEnd>,
        cap: usize,
    ) -> (RequestFields, MeteringStats) {
        let stats = MeteringStats::default();
        let (mut capture, slot) = Capture::new(cap, None);
        for chunk in chunks {
            capture.observe(&Bytes::from_static(chunk.as_bytes()));
        }
        if let Some(end) = end {
            capture.finish(end);
        }
        drop(capture);
        (slot.fields(&stats), stats)
    }

    #[test]
    fn a_complete_body_in_many_frames_gives_its_fields() {
        let (fields, _) = fields_after(&["{\"us", "er\":\"c", "-1\"}"], Some(BodyEnd::Complete), 64);
        assert_eq!(fields.user, Some(crate::UserField::String("c-1".into())));
    }

    #[test]
    fn every_way_of_not_reading_is_counted() {
        let (f, stats) = fields_after(&["{\"user\":\"c\"}"], Some(BodyEnd::Complete), 4);
        assert_eq!(
            (f, stats.snapshot().request_over_cap),
            (RequestFields::default(), 1)
        );
        let (_, stats) = fields_after(&["{\"user\""], None, 64);
        assert_eq!(stats.snapshot().request_unread, 1);
        let (_, stats) = fields_after(&["{\"user\""], Some(BodyEnd::Failed), 64);
        assert_eq!(stats.snapshot().request_body_error, 1);
        let (_, stats) = fields_after(&["{\"user\""], Some(BodyEnd::Complete), 64);
        assert_eq!(stats.snapshot().request_invalid_json, 1);
    }
}
