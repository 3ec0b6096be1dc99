//! Entry points for fuzzing and hostile-input tests. **Not part of the API**: hidden from the
//! docs, exempt from semver, and free to change or vanish in any release.
//!
//! Each function takes arbitrary bytes, runs one of the crate's parsers on them, and asserts
//! the parser's invariants with `assert!`, so a fuzzer reports a broken invariant as a crash.
//! The fuzz targets under `fuzz/` and `tests/hostile_input.rs` call the same functions.

use std::time::SystemTime;

use http::{HeaderValue, Request};

use crate::sse::{SseEvent, SseScanner};
use crate::stream_usage::StreamUsage;
use crate::usage::{ResponseSummary, parse_json_response};
use crate::usage_injection::{UsageChunkFilter, request_with_include_usage};
use crate::{Api, CloudEvent, RequestFields, Subject, UsageRecord, UsageSource};

/// The largest subject the fuzz entry points accept, as the layer's default.
const MAX_SUBJECT_LEN: usize = 256;

/// Reads a request body's metered fields; the result must be consistent.
pub fn request_fields(body: &[u8]) -> Option<RequestFields> {
    let fields = RequestFields::from_json(body).ok()?;
    if let Some(model) = &fields.model {
        assert!(!model.is_empty(), "an empty model is never kept");
    }
    Some(fields)
}

/// Resolves a subject from a request whose `x-customer` header is `header` and whose body is
/// `body`, through the header then the body `user`. A subject is never empty, blank or longer
/// than the cap, and always serializes as a JSON string.
pub fn subject(header: &[u8], body: &[u8]) -> Option<Subject> {
    let fields = RequestFields::from_json(body).unwrap_or_default();
    let mut request = Request::new(());
    if let Ok(value) = HeaderValue::from_bytes(header) {
        request.headers_mut().insert("x-customer", value);
    }
    let (parts, ()) = request.into_parts();
    let subject = Subject::header("x-customer")
        .or_body_user()
        .resolve(&parts, &fields, MAX_SUBJECT_LEN)?;
    assert!(!subject.as_str().trim().is_empty());
    assert!(subject.as_str().len() <= MAX_SUBJECT_LEN);
    let json = serde_json::to_value(&subject).expect("a subject serializes");
    assert!(json.is_string());
    Some(subject)
}

/// Reads a complete JSON response of every API. Where usage is found, the token partition
/// holds and every event shape serializes to an event OpenMeter accepts.
pub fn json_response(body: &[u8]) {
    for api in Api::ALL {
        let Ok(summary) = parse_json_response(api, body) else {
            continue;
        };
        if let Some(usage) = summary.usage {
            check_usage_events(api, usage, summary.model);
        }
    }
}

/// Reads an API's `usage` object from JSON.
pub fn usage_json(body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    for api in Api::ALL {
        let (usage, _anomalies) = crate::Usage::from_api_json(api, &value);
        check_usage_events(api, usage, None);
    }
}

fn check_usage_events(api: Api, usage: crate::Usage, model: Option<String>) {
    let record = UsageRecord {
        id: "fuzz-record".into(),
        subject: Subject::new("fuzz").expect("non-empty"),
        model,
        provider: api.provider().into(),
        api,
        usage,
        time: SystemTime::UNIX_EPOCH,
        response_id: None,
        stream: false,
        complete: true,
        usage_source: UsageSource::Provider,
        labels: Default::default(),
    };
    let per_request = record.per_request_event("fuzz", "tokens");
    assert_eq!(per_request.data["total_tokens"].as_u64(), Some(usage.total()));
    let mut events = record.per_token_type_events("fuzz", "prompt");
    events.push(per_request.clone());
    let mut sum = 0u64;
    for event in &events {
        let json = serde_json::to_vec(event).expect("an event serializes");
        let back: CloudEvent = serde_json::from_slice(&json).expect("an event reads back");
        assert_eq!(&back, event);
        if event.id == per_request.id {
            continue;
        }
        if let Some(tokens) = event.data.get("tokens") {
            sum = sum.saturating_add(tokens.as_u64().expect("tokens are an integer"));
        }
    }
    assert_eq!(sum, usage.total(), "the per-type events partition the total");
}

/// Splits `data` into chunks whose sizes cycle through the bytes of `sizes` (1 to 64 bytes).
fn chunks<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(7, |&b| usize::from(b % 64) + 1);
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.push(chunk);
        rest = tail;
        i += 1;
    }
    out
}

/// One scanned event, owned.
type Scanned = (Vec<u8>, Vec<u8>, bool);

fn scan(parts: &[&[u8]], max_line: usize, tail: usize, api: Api) -> (Vec<Scanned>, ResponseSummary) {
    let mut scanner = SseScanner::new(max_line).with_long_line_tail(tail);
    let mut usage = StreamUsage::new(api);
    let mut events = Vec::new();
    let mut on_event = |ev: SseEvent<'_>| {
        assert!(
            ev.data.len() <= max_line.max(tail),
            "an event's data stays within the cap"
        );
        events.push((ev.event.to_vec(), ev.data.to_vec(), ev.truncated));
        usage.on_event(&ev);
    };
    for part in parts {
        scanner.feed(part, &mut on_event);
    }
    scanner.finish(&mut on_event);
    (events, usage.summary())
}

/// An event stream of every API, through the SSE scanner and the stream usage readers, in
/// one chunk and in chunks cut by the first bytes: both give the same events and usage, event
/// data stays within the line cap, and found usage partitions into valid events.
pub fn sse_stream(data: &[u8]) {
    let (sizes, body) = data.split_at(data.len().min(4));
    let parts = chunks(body, sizes);
    for api in Api::ALL {
        let whole = scan(&[body], 256, 64, api);
        let split = scan(&parts, 256, 64, api);
        assert_eq!(whole, split, "the chunking must not change what is read");
        if let Some(usage) = whole.1.usage {
            check_usage_events(api, usage, whole.1.model);
        }
    }
}

/// The `include_usage` request rewrite, on a body the layer could read (it rewrites no
/// other): when it rewrites, the result is JSON with `stream_options.include_usage` true and
/// the other metered fields unchanged.
pub fn include_usage_rewrite(body: &[u8]) {
    let Ok(before) = RequestFields::from_json(body) else {
        return;
    };
    let Some(rewritten) = request_with_include_usage(body) else {
        return;
    };
    let after = RequestFields::from_json(&rewritten).expect("the rewrite is a JSON object");
    assert!(after.include_usage, "the rewrite sets include_usage");
    assert_eq!(
        (before.user, before.model, before.stream),
        (after.user, after.model, after.stream),
        "the rewrite changes nothing else"
    );
}

/// The usage-chunk response filter: the same output whatever the chunking.
pub fn usage_filter(data: &[u8]) {
    let (sizes, body) = data.split_at(data.len().min(4));
    let run = |parts: &[&[u8]]| {
        let mut filter = UsageChunkFilter::new(256);
        let mut out = Vec::new();
        for part in parts {
            filter.feed(part, &mut out);
        }
        filter.finish(&mut out);
        (out, filter.dropped_events())
    };
    let whole = run(&[body]);
    let split = run(&chunks(body, sizes));
    assert_eq!(whole, split, "the chunking must not change the filtered stream");
    assert!(whole.0.len() <= body.len(), "the filter only removes bytes");
}
