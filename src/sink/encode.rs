//! Serializing events for the HTTP sinks: each event once, on the thread that built it, and a
//! batch body by joining the stored bytes.
//!
//! Serializing in `send`, before the event is queued, is deliberate: an event is a dozen small
//! allocations (its strings and its `data` map), and freeing them on the sink's task, another
//! thread, is the allocator's slowest path (cross-thread frees, arena locks). Encoded, an
//! event crosses threads as one buffer, takes a third of the memory in the queue, and the
//! batch body is a concatenation.

use bytes::Bytes;

use super::stats::{Counters, DropReason};
use crate::CloudEvent;

/// Room for a typical event (250–350 bytes of JSON) without growing the buffer.
const TYPICAL_EVENT_BYTES: usize = 384;

/// The event's JSON, or `None` (counted as unserializable and logged) if it has none.
pub(crate) fn encode(event: &CloudEvent, counters: &Counters) -> Option<Vec<u8>> {
    let mut json = Vec::with_capacity(TYPICAL_EVENT_BYTES);
    match serde_json::to_writer(&mut json, event) {
        Ok(()) => Some(json),
        Err(error) => {
            counters.record_dropped(DropReason::Unserializable, 1, false);
            tracing::error!(%error, id = %event.id, "event cannot be serialized; dropped");
            None
        }
    }
}

/// The `application/cloudevents-batch+json` body: the pieces (events' JSON, or runs of events
/// separated by commas) joined by commas into one array. Empty pieces are skipped.
pub(crate) fn batch_body<'a, I>(pieces: I) -> Bytes
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: Clone,
{
    let pieces = pieces.into_iter().filter(|piece| !piece.is_empty());
    let size = pieces.clone().map(|piece| piece.len() + 1).sum::<usize>() + 2;
    let mut body = Vec::with_capacity(size);
    body.push(b'[');
    for (i, piece) in pieces.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(piece);
    }
    body.push(b']');
    body.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Subject;

    fn event(id: &str) -> CloudEvent {
        let mut event = CloudEvent::new(id, "gw", "prompt", Subject::new("c").unwrap(), Default::default());
        event.time = "2026-12-04T00:00:00.000Z".into();
        event
    }

    #[test]
    fn a_batch_is_the_events_json_as_one_array() {
        let counters = Counters::default();
        let encoded: Vec<Vec<u8>> = ["a", "b"]
            .iter()
            .map(|id| encode(&event(id), &counters).unwrap())
            .collect();
        let body = batch_body(encoded.iter().map(Vec::as_slice));
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"[{"specversion":"1.0","id":"a","source":"gw","type":"prompt","subject":"c","time":"2026-12-04T00:00:00.000Z","data":{}},{"specversion":"1.0","id":"b","source":"gw","type":"prompt","subject":"c","time":"2026-12-04T00:00:00.000Z","data":{}}]"#
        );
        let parsed: Vec<CloudEvent> = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed, vec![event("a"), event("b")]);
        assert_eq!(&batch_body([])[..], b"[]");
        assert_eq!(
            &batch_body([&b"1,2"[..], b"", b"3"])[..],
            b"[1,2,3]",
            "runs and empty pieces"
        );
    }
}
