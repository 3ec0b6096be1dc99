//! What OpenMeter's `POST /api/v1/events` accepts, checked by hand from
//! `reference/openmeter-event.schema.json`, OpenMeter's exact Content-Type comparison and the
//! CloudEvents JSON rules its parser (sdk-go) applies.

use serde_json::{Map, Value};

/// One event object.
pub const SINGLE: &str = "application/cloudevents+json";
/// A JSON array of events.
pub const BATCH: &str = "application/cloudevents-batch+json";
/// One event or an array.
pub const JSON: &str = "application/json";

/// What a Content-Type allows in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    Single,
    Batch,
    Either,
}

/// OpenMeter's v1 handler compares the header exactly: no parameters, no case folding.
pub fn body_kind(content_type: Option<&[u8]>) -> Result<BodyKind, String> {
    match content_type {
        Some(ct) if ct == SINGLE.as_bytes() => Ok(BodyKind::Single),
        Some(ct) if ct == BATCH.as_bytes() => Ok(BodyKind::Batch),
        Some(ct) if ct == JSON.as_bytes() => Ok(BodyKind::Either),
        other => Err(format!(
            "invalid content type: {}",
            String::from_utf8_lossy(other.unwrap_or_default())
        )),
    }
}

/// Parses and validates a whole request body; one bad event fails the request.
pub fn parse_events(kind: BodyKind, body: &[u8]) -> Result<Vec<Map<String, Value>>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("request body is not JSON: {e}"))?;
    let events = match (kind, value) {
        (BodyKind::Single | BodyKind::Either, Value::Object(event)) => vec![Value::Object(event)],
        (BodyKind::Batch | BodyKind::Either, Value::Array(events)) => events,
        (_, other) => return Err(format!("unexpected JSON {}", json_type(&other))),
    };
    if events.is_empty() {
        return Err("no events found".into());
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| validate_event(event).map_err(|e| format!("event {i}: {e}")))
        .collect()
}

/// Checks one event against OpenMeter's `Event` schema and the CloudEvents JSON format.
pub fn validate_event(event: Value) -> Result<Map<String, Value>, String> {
    let Value::Object(event) = event else {
        return Err(format!("event must be an object, got {}", json_type(&event)));
    };
    for name in ["id", "source", "specversion", "type", "subject"] {
        required_string(&event, name)?;
    }
    if event["specversion"] != "1.0" {
        return Err(format!("unsupported specversion {}", event["specversion"]));
    }
    let source = required_string(&event, "source")?;
    if source.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("source is not a URI reference: {source:?}"));
    }
    match event.get("time") {
        None | Some(Value::Null) => {}
        Some(Value::String(time)) if is_rfc3339(time) => {}
        Some(other) => return Err(format!("time is not an RFC 3339 date-time: {other}")),
    }
    match event.get("datacontenttype") {
        None | Some(Value::Null) => {}
        Some(Value::String(ct)) if ct == JSON => {}
        Some(other) => return Err(format!("datacontenttype must be {JSON}, got {other}")),
    }
    match event.get("dataschema") {
        None | Some(Value::Null) => {}
        Some(Value::String(uri)) if is_absolute_uri(uri) => {}
        Some(other) => return Err(format!("dataschema is not a URI: {other}")),
    }
    match event.get("data") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(other) => return Err(format!("data must be an object, got {}", json_type(other))),
    }
    if event.contains_key("data_base64") {
        return Err("data_base64 is not accepted".into());
    }
    if let Some(bad) = event
        .keys()
        .find(|k| k.is_empty() || !k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
    {
        return Err(format!("bad attribute name {bad:?}"));
    }
    Ok(event)
}

fn required_string<'a>(event: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match event.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(format!("{name} must not be empty")),
        Some(other) => Err(format!("{name} must be a string, got {}", json_type(other))),
        None => Err(format!("{name} is required")),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_absolute_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return false;
    };
    !rest.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !uri.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// RFC 3339 `date-time` as Go's `time.RFC3339` parses it: `YYYY-MM-DDTHH:MM:SS[.frac]` then
/// `Z` or `±HH:MM` (an offset is required), with valid ranges.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return false;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        let digits = b.get(from..to)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0, 4),
        num(5, 7),
        num(8, 10),
        num(11, 13),
        num(14, 16),
        num(17, 19),
    ) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || minute > 59 || second > 59 {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &frac[digits..];
    }
    match rest.as_bytes() {
        [b'Z'] => true,
        [sign, h1, h2, b':', m1, m2] if *sign == b'+' || *sign == b'-' => {
            let all_digits = [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit());
            all_digits && (h1 - b'0') * 10 + (h2 - b'0') < 24 && (m1 - b'0') * 10 + (m2 - b'0') < 60
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({"specversion":"1.0","id":"r1/input","source":"llm-meter","type":"prompt",
               "subject":"customer-1","time":"2024-05-01T12:00:00Z",
               "data":{"tokens":13,"model":"gpt-4o","type":"input"}})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut event = valid();
        event[field] = value;
        event
    }

    fn without(field: &str) -> Value {
        let mut event = valid();
        event.as_object_mut().unwrap().remove(field);
        event
    }

    #[test]
    fn accepts_the_reference_event_and_its_optional_forms() {
        assert!(validate_event(valid()).is_ok());
        for ok in [
            without("time"),
            without("data"),
            with("time", Value::Null),
            with("data", Value::Null),
            with("data", json!({})),
            with("time", json!("2024-05-01T12:00:00.123456+02:00")),
            with("time", json!("2024-02-29T23:59:59-05:30")),
            with("datacontenttype", json!("application/json")),
            with("datacontenttype", Value::Null),
            with("dataschema", json!("https://example.com/schema")),
            with("myext", json!("tolerated")),
        ] {
            assert!(validate_event(ok.clone()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_every_bad_case() {
        let mut bad = Vec::new();
        for field in ["id", "source", "specversion", "type", "subject"] {
            bad.push(without(field));
            bad.push(with(field, json!("")));
            bad.push(with(field, json!(1)));
            bad.push(with(field, Value::Null));
        }
        bad.extend([
            with("subject", json!(["customer-1"])),
            with("subject", json!({"id": "c"})),
            with("specversion", json!("0.3")),
            with("specversion", json!(1.0)),
            with("source", json!("llm meter")),
            with("time", json!("2024-05-01T12:00:00")),
            with("time", json!("2024-05-01 12:00:00Z")),
            with("time", json!("2024-05-01T12:00:00z")),
            with("time", json!("2023-02-29T12:00:00Z")),
            with("time", json!("2024-13-01T12:00:00Z")),
            with("time", json!("2024-05-01T12:00:00.Z")),
            with("time", json!("2024-05-01T12:00:00+0200")),
            with("time", json!(1714564800)),
            with("time", json!("yesterday")),
            with("data", json!("string")),
            with("data", json!([1, 2])),
            with("data", json!(13)),
            with("datacontenttype", json!("application/xml")),
            with("datacontenttype", json!("application/json; charset=utf-8")),
            with("dataschema", json!("")),
            with("dataschema", json!("not a uri")),
            with("data_base64", json!("aGVsbG8=")),
            with("Bad_Name", json!("x")),
            json!("not an object"),
            json!(null),
        ]);
        for event in bad {
            assert!(validate_event(event.clone()).is_err(), "accepted {event}");
        }
    }

    #[test]
    fn content_type_is_compared_exactly() {
        assert_eq!(body_kind(Some(BATCH.as_bytes())), Ok(BodyKind::Batch));
        assert_eq!(body_kind(Some(SINGLE.as_bytes())), Ok(BodyKind::Single));
        assert_eq!(body_kind(Some(JSON.as_bytes())), Ok(BodyKind::Either));
        for bad in [
            "application/cloudevents-batch+json; charset=utf-8",
            "application/json; charset=utf-8",
            "Application/JSON",
            "text/plain",
            "",
        ] {
            assert!(body_kind(Some(bad.as_bytes())).is_err(), "{bad}");
        }
        assert_eq!(body_kind(None), Err("invalid content type: ".into()));
    }

    #[test]
    fn bodies_must_match_the_content_type_and_not_be_empty() {
        let one = valid().to_string();
        let many = format!("[{one},{one}]");
        assert_eq!(parse_events(BodyKind::Single, one.as_bytes()).unwrap().len(), 1);
        assert_eq!(parse_events(BodyKind::Batch, many.as_bytes()).unwrap().len(), 2);
        assert_eq!(parse_events(BodyKind::Either, one.as_bytes()).unwrap().len(), 1);
        assert_eq!(parse_events(BodyKind::Either, many.as_bytes()).unwrap().len(), 2);
        assert!(parse_events(BodyKind::Single, many.as_bytes()).is_err());
        assert!(parse_events(BodyKind::Batch, one.as_bytes()).is_err());
        assert_eq!(
            parse_events(BodyKind::Batch, b"[]"),
            Err("no events found".into())
        );
        assert!(parse_events(BodyKind::Batch, b"[{").is_err());
        let one_bad = format!("[{one},{}]", with("subject", json!(["c"])));
        assert!(parse_events(BodyKind::Batch, one_bad.as_bytes()).is_err());
    }
}
