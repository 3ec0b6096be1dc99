use std::io::Write;

use super::EventSink;
use crate::CloudEvent;

/// Prints each event as one line of JSON on standard output: for development, or for a log
/// shipper that forwards the lines. Writes go through a locked, line-buffered stdout; a write
/// error is logged and the event dropped.
///
/// ```
/// use tower_openmeter::{MeteringLayer, StdoutSink};
/// let layer = MeteringLayer::builder().sink(StdoutSink::new()).build();
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct StdoutSink {
    _private: (),
}

impl StdoutSink {
    /// A sink that prints to standard output.
    pub fn new() -> Self {
        Self::default()
    }
}

impl EventSink for StdoutSink {
    fn send(&self, event: CloudEvent) {
        self.send_all(vec![event]);
    }

    fn send_all(&self, events: Vec<CloudEvent>) {
        let mut out = std::io::stdout().lock();
        for event in &events {
            let written = serde_json::to_writer(&mut out, event)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            if let Err(error) = written {
                tracing::warn!(%error, id = %event.id, "StdoutSink: event dropped");
            }
        }
        let _ = out.flush();
    }
}
