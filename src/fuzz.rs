//! Entry points for fuzzing and hostile-input tests. **Not part of the API**: hidden from the
//! docs, exempt from semver, and free to change or vanish in any release.
//!
//! Each function takes arbitrary bytes, runs one of the crate's parsers on them, and asserts
//! the parser's invariants with `assert!`, so a fuzzer reports a broken invariant as a crash.
//! The fuzz targets under `fuzz/` and `tests/hostile_input.rs` call the same functions.

use std::time::SystemTime;

use http::{HeaderValue, Request};

use crate::usage::parse_json_response;
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
