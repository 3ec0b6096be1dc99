//! Reading usage out of a response body as it streams past: which reader fits the response,
//! and what it concluded.

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_TYPE;

use crate::Api;
use crate::chunks::{Chunks, declared_length};
use crate::decode::{Coding, DecodeError, Decoder};
use crate::layer::Config;
use crate::meter::Meter;
use crate::sse::SseScanner;
use crate::stream_usage::StreamUsage;
use crate::usage::{ResponseSummary, parse_json_response_chunks};

/// The last bytes of an over-long SSE `data:` line kept to find its usage.
const LONG_LINE_TAIL: usize = 64 * 1024;

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

/// A reader for one response body: a JSON collector or an SSE scanner, behind a decoder when
/// the body is compressed (the decoded copy is for inspection only).
pub(crate) struct Inspector {
    decoder: Option<Box<Decoder>>,
    decode_error: Option<DecodeError>,
    reader: Reader,
}

enum Reader {
    Json(JsonCollector),
    Sse(Box<SseReader>),
}

/// The SSE scanner and the per-API usage it feeds.
struct SseReader {
    scanner: SseScanner,
    usage: StreamUsage,
}

impl Inspector {
    /// Picks the reader for a response, or `None` when its type or encoding is unsupported.
    pub(crate) fn for_response(headers: &HeaderMap, meter: &Meter) -> Option<Self> {
        let config = meter.config();
        let content_type = headers.get(CONTENT_TYPE).map(|v| v.as_bytes());
        let coding = Coding::from_headers(headers);
        // The declared length sizes the JSON copy, unless it is the length of an encoded body.
        let declared = match coding {
            Coding::Identity => declared_length(headers),
            _ => None,
        };
        let (reader, decode_cap) = match content_type.map(media_type) {
            Some(media) if is_event_stream(media) => (
                Reader::Sse(Box::new(SseReader {
                    scanner: SseScanner::new(config.max_sse_line)
                        .with_long_line_tail(LONG_LINE_TAIL.min(config.max_sse_line)),
                    usage: StreamUsage::new(meter.api()),
                })),
                config.max_decoded_stream,
            ),
            media if media.is_none_or(is_json) => (
                Reader::Json(JsonCollector::new(config.max_response_body, declared)),
                config.max_response_body as u64,
            ),
            _ => return None,
        };
        let decoder = match coding {
            Coding::Identity => None,
            Coding::Unsupported => return None,
            coding => Some(Box::new(Decoder::new(coding, decode_cap)?)),
        };
        Some(Inspector {
            decoder,
            decode_error: None,
            reader,
        })
    }

    pub(crate) fn observe(&mut self, data: &Bytes) {
        let reader = &mut self.reader;
        match &mut self.decoder {
            None => reader.observe(data),
            Some(_) if self.decode_error.is_some() => {}
            Some(decoder) => {
                if let Err(error) = decoder.feed(data, &mut |piece| reader.observe_slice(piece)) {
                    self.decode_error = Some(error);
                }
            }
        }
    }

    /// Concludes; `complete` says whether the body reached its end (a cut body's decoder is
    /// not asked to have seen the end of its stream).
    pub(crate) fn finish(self, api: Api, config: &Config, complete: bool) -> Inspection {
        let Inspector {
            decoder,
            mut decode_error,
            reader,
        } = self;
        if let (Some(mut decoder), None, true) = (decoder, decode_error, complete) {
            decode_error = decoder.finish().err();
        }
        if let Some(error) = decode_error {
            config.stats.incr(|c| &c.decode_failed);
            tracing::debug!(
                ?error,
                api = api.as_str(),
                "decoding the response for inspection failed"
            );
        }
        match reader {
            Reader::Json(_) if decode_error == Some(DecodeError::OverCap) => Inspection::OverCap,
            Reader::Json(_) if decode_error.is_some() => Inspection::Unparsed,
            Reader::Json(json) => json.finish(api),
            Reader::Sse(mut sse) => {
                let SseReader { scanner, usage } = &mut *sse;
                scanner.finish(&mut |event| usage.on_event(&event));
                let stats = &config.stats;
                stats.add(|c| &c.sse_lines_too_long, scanner.lines_too_long());
                stats.add(|c| &c.sse_events_too_large, scanner.events_too_large());
                if scanner.lines_too_long() > 0 || scanner.events_too_large() > 0 {
                    tracing::warn!(
                        lines = scanner.lines_too_long(),
                        events = scanner.events_too_large(),
                        api = api.as_str(),
                        "SSE lines or events over the line cap were skipped"
                    );
                }
                if usage.unparsed_events() > 0 {
                    tracing::debug!(
                        events = usage.unparsed_events(),
                        api = api.as_str(),
                        "SSE events that could carry usage were not valid JSON"
                    );
                }
                Inspection::Summary(usage.summary())
            }
        }
    }
}

impl Reader {
    fn observe(&mut self, data: &Bytes) {
        match self {
            Reader::Json(json) => json.observe(data),
            Reader::Sse(sse) => sse.feed(data),
        }
    }

    fn observe_slice(&mut self, data: &[u8]) {
        match self {
            Reader::Json(json) => json.chunks.push_slice(data),
            Reader::Sse(sse) => sse.feed(data),
        }
    }
}

impl SseReader {
    fn feed(&mut self, data: &[u8]) {
        let usage = &mut self.usage;
        self.scanner.feed(data, &mut |event| usage.on_event(&event));
    }
}

/// Whether a response is an event stream, from its `Content-Type`.
pub(crate) fn is_event_stream_response(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| is_event_stream(media_type(v.as_bytes())))
}

fn is_event_stream(media: &[u8]) -> bool {
    media.eq_ignore_ascii_case(b"text/event-stream")
}

/// The media type without parameters, e.g. `application/json` from
/// `application/json; charset=utf-8`.
pub(crate) fn media_type(value: &[u8]) -> &[u8] {
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    value[..end].trim_ascii()
}

pub(crate) fn is_json(media: &[u8]) -> bool {
    media.eq_ignore_ascii_case(b"application/json")
        || (media.len() > 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// Keeps a bounded copy of a JSON body (see [`Chunks`]) and parses it at the end.
pub(crate) struct JsonCollector {
    chunks: Chunks,
}

impl JsonCollector {
    fn new(cap: usize, declared: Option<u64>) -> Self {
        JsonCollector {
            chunks: Chunks::bounded(cap).expecting(declared),
        }
    }

    fn observe(&mut self, data: &Bytes) {
        self.chunks.push(data);
    }

    fn finish(self, api: Api) -> Inspection {
        if self.chunks.is_over_cap() {
            return Inspection::OverCap;
        }
        match parse_json_response_chunks(api, self.chunks) {
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
        assert!(is_event_stream(media_type(b"text/event-stream; charset=utf-8")));
    }

    #[test]
    fn collector_stops_at_the_cap() {
        let mut c = JsonCollector::new(4, None);
        c.observe(&Bytes::from_static(b"{\"a"));
        c.observe(&Bytes::from_static(b"\":1}"));
        assert!(matches!(c.finish(Api::ChatCompletions), Inspection::OverCap));
    }
}
