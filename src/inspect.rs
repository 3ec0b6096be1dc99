//! Reading usage out of a response body as it streams past: which reader fits the response,
//! and what it concluded.

use bytes::Bytes;

use crate::Api;
use crate::layer::Config;
use crate::meter::Meter;
use crate::usage::{ResponseSummary, parse_json_response};

/// What inspecting a body concluded.
#[derive(Debug)]
pub(crate) enum Inspection {
    /// Read; usage may still be absent.
    Summary(ResponseSummary),
    /// The body could not be read (invalid JSON, cut short).
    Unparsed,
    /// The body was larger than the inspection cap.
    OverCap,
}

/// A reader for one response body.
pub(crate) enum Inspector {
    Json(JsonCollector),
}

impl Inspector {
    /// Picks the reader for a response, or `None` when its type or encoding is unsupported.
    pub(crate) fn for_response(
        content_type: Option<&[u8]>,
        encoding: Option<&[u8]>,
        meter: &Meter,
    ) -> Option<Self> {
        if !is_identity(encoding) {
            return None;
        }
        match content_type.map(media_type) {
            None => Some(Inspector::Json(JsonCollector::new(
                meter.config().max_response_body,
            ))),
            Some(media) if is_json(media) => Some(Inspector::Json(JsonCollector::new(
                meter.config().max_response_body,
            ))),
            Some(_) => None,
        }
    }

    pub(crate) fn observe(&mut self, data: &Bytes) {
        match self {
            Inspector::Json(json) => json.observe(data),
        }
    }

    pub(crate) fn finish(self, api: Api, _config: &Config) -> Inspection {
        match self {
            Inspector::Json(json) => json.finish(api),
        }
    }
}

/// The media type without parameters, e.g. `application/json` from
/// `application/json; charset=utf-8`.
fn media_type(value: &[u8]) -> &[u8] {
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    value[..end].trim_ascii()
}

fn is_json(media: &[u8]) -> bool {
    media.eq_ignore_ascii_case(b"application/json")
        || (media.len() > 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

fn is_identity(encoding: Option<&[u8]>) -> bool {
    encoding.is_none_or(|e| e.trim_ascii().is_empty() || e.trim_ascii().eq_ignore_ascii_case(b"identity"))
}

/// Keeps a bounded copy of a JSON body (reference-counted chunks, no copying) and parses it at
/// the end.
pub(crate) struct JsonCollector {
    chunks: Vec<Bytes>,
    len: usize,
    cap: usize,
    over_cap: bool,
}

impl JsonCollector {
    fn new(cap: usize) -> Self {
        JsonCollector {
            chunks: Vec::new(),
            len: 0,
            cap,
            over_cap: false,
        }
    }

    fn observe(&mut self, data: &Bytes) {
        if self.over_cap {
            return;
        }
        self.len = self.len.saturating_add(data.len());
        if self.len > self.cap {
            self.over_cap = true;
            self.chunks = Vec::new();
        } else if !data.is_empty() {
            self.chunks.push(data.clone());
        }
    }

    fn finish(self, api: Api) -> Inspection {
        if self.over_cap {
            return Inspection::OverCap;
        }
        let body = crate::request::concat(self.chunks.into(), self.len);
        match parse_json_response(api, &body) {
            Ok(summary) => Inspection::Summary(summary),
            Err(_) => Inspection::Unparsed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert!(is_json(media_type(b"application/json; charset=utf-8")));
        assert!(is_json(media_type(b"Application/JSON")));
        assert!(is_json(media_type(b"application/problem+json")));
        assert!(!is_json(media_type(b"text/event-stream")));
        assert!(is_identity(None));
        assert!(is_identity(Some(b"identity")));
        assert!(!is_identity(Some(b"gzip")));
    }

    #[test]
    fn collector_stops_at_the_cap() {
        let mut c = JsonCollector::new(4);
        c.observe(&Bytes::from_static(b"{\"a"));
        c.observe(&Bytes::from_static(b"\":1}"));
        assert!(matches!(c.finish(Api::ChatCompletions), Inspection::OverCap));
    }
}
