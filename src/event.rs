//! The CloudEvent that reaches OpenMeter, in the JSON form OpenMeter accepts.

use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::Subject;

/// A CloudEvents 1.0 event in structured JSON form, restricted to what OpenMeter ingests.
///
/// The types carry OpenMeter's rules: `specversion` is always `"1.0"`, `subject` is a non-empty
/// string ([`Subject`]), `data` is a JSON object, and there is no `data_base64` and no extension
/// attribute.
///
/// ```
/// use tower_openmeter::{CloudEvent, Subject};
///
/// let mut data = serde_json::Map::new();
/// data.insert("tokens".into(), 13.into());
/// let event = CloudEvent::new("rec-1/input", "my-gateway", "prompt", Subject::new("customer-1").unwrap(), data);
/// let json = serde_json::to_value(&event).unwrap();
/// assert_eq!(json["specversion"], "1.0");
/// assert_eq!(json["subject"], "customer-1");
/// assert!(json["time"].as_str().unwrap().ends_with('Z'));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `"1.0"`.
    pub specversion: SpecVersion,
    /// Unique with `source`; OpenMeter deduplicates on the pair, so retries reuse it.
    pub id: String,
    /// Identifies the producer, e.g. the gateway's name.
    pub source: String,
    /// The event type a meter selects on (`"prompt"` by default).
    #[serde(rename = "type")]
    pub ty: String,
    /// The customer billed.
    pub subject: Subject,
    /// RFC 3339 UTC with `Z`, e.g. `2026-12-04T16:09:00.123Z`.
    pub time: String,
    /// The payload: token counts as integers and dimensions as strings.
    pub data: Map<String, Value>,
}

impl CloudEvent {
    /// Makes an event with the time set to now.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        ty: impl Into<String>,
        subject: Subject,
        data: Map<String, Value>,
    ) -> Self {
        CloudEvent {
            specversion: SpecVersion,
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject,
            time: rfc3339_millis(SystemTime::now()),
            data,
        }
    }
}

/// Formats a time as RFC 3339 in UTC with milliseconds and a `Z`, as OpenMeter expects.
pub fn rfc3339_millis(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The CloudEvents spec version, which serializes as `"1.0"` and accepts nothing else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecVersion;

impl Serialize for SpecVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("1.0")
    }
}

impl<'de> Deserialize<'de> for SpecVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if s == "1.0" {
            Ok(SpecVersion)
        } else {
            Err(serde::de::Error::custom(format!("unsupported specversion {s:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_exactly_the_openmeter_fields() {
        let mut data = Map::new();
        data.insert("tokens".into(), 7.into());
        let mut event = CloudEvent::new("a/output", "gw", "prompt", Subject::new("c").unwrap(), data);
        event.time = "2026-01-02T03:04:05.006Z".into();
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"specversion":"1.0","id":"a/output","source":"gw","type":"prompt","subject":"c","time":"2026-01-02T03:04:05.006Z","data":{"tokens":7}}"#
        );
    }

    #[test]
    fn rejects_bad_subject_and_specversion_on_read() {
        let ok =
            r#"{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"c","time":"x","data":{}}"#;
        assert!(serde_json::from_str::<CloudEvent>(ok).is_ok());
        for bad in [
            ok.replace(r#""subject":"c""#, r#""subject":["c"]"#),
            ok.replace(r#""subject":"c""#, r#""subject":"""#),
            ok.replace(r#""specversion":"1.0""#, r#""specversion":"0.3""#),
            ok.replace(r#""data":{}"#, r#""data":"s""#),
        ] {
            assert!(serde_json::from_str::<CloudEvent>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_is_utc_with_millis_and_z() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339_millis(t), "2023-11-14T22:13:20.123Z");
    }
}
