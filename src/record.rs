//! A request's metered usage ([`UsageRecord`]) and the CloudEvents made from it ([`EventShape`]).

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::event::rfc3339_millis;
use crate::{Api, CloudEvent, Subject, TokenType, Usage};

/// Where a record's token counts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider reported them.
    Provider,
    /// The provider reported no usage (for example a stream cut before its usage chunk); the
    /// counts are zero and the events say `"usage_source": "missing"`. Nothing is estimated.
    Missing,
}

/// Everything known about one metered request; one record becomes one or more events.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct UsageRecord {
    /// Globally unique id (UUID v7), made once; every event of the record derives its id from
    /// it, and retries reuse it, so OpenMeter's `source`+`id` dedup makes delivery exact.
    pub id: String,
    /// The customer billed.
    pub subject: Subject,
    /// The model, from the response, else from the request.
    pub model: Option<String>,
    /// The provider, e.g. `"openai"` or `"anthropic"`.
    pub provider: String,
    /// The API called.
    pub api: Api,
    /// The token counts.
    pub usage: Usage,
    /// When the request started.
    pub time: SystemTime,
    /// The upstream response id (`chatcmpl-...`, `msg_...`), where one was sent.
    pub response_id: Option<String>,
    /// Whether the response was streamed.
    pub stream: bool,
    /// `false` when the response ended early (client gone, upstream error).
    pub complete: bool,
    /// Where the counts come from.
    pub usage_source: UsageSource,
    /// Extra data fields from [`MeteringLayerBuilder::data_fields`](crate::MeteringLayerBuilder::data_fields).
    pub labels: Map<String, Value>,
}

impl UsageRecord {
    /// The model name used in events; `"unknown"` when neither response nor request named one.
    pub fn model_or_unknown(&self) -> &str {
        self.model.as_deref().unwrap_or("unknown")
    }

    /// The default shape: one event per non-zero token type, ids `<record id>/<token type>`,
    /// data `{"tokens", "type", "model", "provider", "api", ...}`.
    ///
    /// A record with usage missing gives one zero-token event with id `<record id>/missing` so
    /// the loss stays visible in OpenMeter.
    pub fn per_token_type_events(&self, source: &str, event_type: &str) -> Vec<CloudEvent> {
        if self.usage_source == UsageSource::Missing {
            let data = self.token_data(TokenType::Output, 0);
            return vec![self.event(format!("{}/missing", self.id), source, event_type, data)];
        }
        // Formatted once for all the record's events.
        let time = rfc3339_millis(self.time);
        TokenType::ALL
            .into_iter()
            .filter(|&ty| self.usage.tokens(ty) > 0)
            .map(|ty| {
                let data = self.token_data(ty, self.usage.tokens(ty));
                self.event_at(
                    format!("{}/{}", self.id, ty.as_str()),
                    source,
                    event_type,
                    data,
                    time.clone(),
                )
            })
            .collect()
    }

    /// The per-request shape (compatible with the Python proxy's `litellm_tokens` meters): one
    /// event with id `<record id>` and data `{"model", "prompt_tokens", "completion_tokens",
    /// "total_tokens", ...}`, where `prompt_tokens` counts all input tokens, cached ones included.
    pub fn per_request_event(&self, source: &str, event_type: &str) -> CloudEvent {
        let u = &self.usage;
        let mut data = Map::new();
        data.insert("model".into(), self.model_or_unknown().into());
        data.insert("provider".into(), self.provider.clone().into());
        data.insert("api".into(), self.api.as_str().into());
        data.insert("prompt_tokens".into(), u.total_input().into());
        data.insert("completion_tokens".into(), u.output.into());
        data.insert("total_tokens".into(), u.total().into());
        data.insert("input_tokens".into(), u.input.into());
        data.insert("cache_read_tokens".into(), u.cache_read.into());
        data.insert("cache_write_tokens".into(), u.cache_write.into());
        insert_some(&mut data, "reasoning_tokens", u.reasoning);
        insert_some(&mut data, "input_audio_tokens", u.input_audio);
        insert_some(&mut data, "output_audio_tokens", u.output_audio);
        self.insert_flags(&mut data);
        self.event(self.id.clone(), source, event_type, data)
    }

    fn token_data(&self, ty: TokenType, tokens: u64) -> Map<String, Value> {
        let mut data = Map::new();
        data.insert("tokens".into(), tokens.into());
        data.insert("type".into(), ty.as_str().into());
        data.insert("model".into(), self.model_or_unknown().into());
        data.insert("provider".into(), self.provider.clone().into());
        data.insert("api".into(), self.api.as_str().into());
        match ty {
            TokenType::Output => {
                insert_some(&mut data, "reasoning_tokens", self.usage.reasoning);
                insert_some(&mut data, "audio_tokens", self.usage.output_audio);
            }
            TokenType::Input => insert_some(&mut data, "audio_tokens", self.usage.input_audio),
            _ => {}
        }
        self.insert_flags(&mut data);
        data
    }

    fn insert_flags(&self, data: &mut Map<String, Value>) {
        if !self.complete {
            data.insert("complete".into(), false.into());
        }
        if self.usage_source == UsageSource::Missing {
            data.insert("usage_source".into(), "missing".into());
        }
    }

    /// Labels never override the fields the meters rely on.
    fn event(&self, id: String, source: &str, event_type: &str, data: Map<String, Value>) -> CloudEvent {
        self.event_at(id, source, event_type, data, rfc3339_millis(self.time))
    }

    fn event_at(
        &self,
        id: String,
        source: &str,
        event_type: &str,
        mut data: Map<String, Value>,
        time: String,
    ) -> CloudEvent {
        for (key, value) in &self.labels {
            if !data.contains_key(key) && !value.is_null() {
                data.insert(key.clone(), value.clone());
            }
        }
        CloudEvent {
            specversion: crate::event::SpecVersion,
            id,
            source: source.to_owned(),
            ty: event_type.to_owned(),
            subject: self.subject.clone(),
            time,
            data,
        }
    }
}

/// A new record id: a UUID v7 (millisecond time, then 74 random bits).
///
/// `uuid::Uuid::now_v7` asks the OS for randomness on every call (a `getrandom` system call,
/// about half a microsecond on the request path). Ids must be unique, not secret, so the random
/// bits come from a per-thread generator seeded once from the OS-keyed `RandomState`.
pub(crate) fn new_record_id() -> String {
    use std::cell::RefCell;
    use std::hash::BuildHasher;

    thread_local! {
        static RNG: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::with_seed(
            std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()),
        ));
    }
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        let mut bytes = [0u8; 10];
        bytes[..8].copy_from_slice(&rng.u64(..).to_le_bytes());
        bytes[8..].copy_from_slice(&rng.u16(..).to_le_bytes());
        bytes
    });
    let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    uuid.hyphenated().encode_lower(&mut buf).to_owned()
}

fn insert_some(data: &mut Map<String, Value>, key: &str, value: Option<u64>) {
    if let Some(v) = value {
        data.insert(key.into(), v.into());
    }
}

type CustomShape = dyn Fn(&UsageRecord, &str) -> Vec<CloudEvent> + Send + Sync;

/// How a [`UsageRecord`] becomes CloudEvents.
#[derive(Clone, Default)]
pub enum EventShape {
    /// One event per non-zero token type (default; what OpenMeter's LLM docs expect). Meter:
    /// SUM of `$.tokens` grouped by `$.type` and `$.model`.
    #[default]
    PerTokenType,
    /// One event per request with all counts (for the Python proxy's `litellm_tokens` meters).
    PerRequest,
    /// Your own: a closure given the record and the configured `source`.
    Custom(Arc<CustomShape>),
}

impl EventShape {
    /// A custom shape from a closure; it can start from
    /// [`UsageRecord::per_token_type_events`] or [`UsageRecord::per_request_event`].
    pub fn custom<F>(f: F) -> Self
    where
        F: Fn(&UsageRecord, &str) -> Vec<CloudEvent> + Send + Sync + 'static,
    {
        EventShape::Custom(Arc::new(f))
    }

    pub(crate) fn events(&self, record: &UsageRecord, source: &str, event_type: &str) -> Vec<CloudEvent> {
        match self {
            EventShape::PerTokenType => record.per_token_type_events(source, event_type),
            EventShape::PerRequest => vec![record.per_request_event(source, event_type)],
            EventShape::Custom(f) => f(record, source),
        }
    }
}

impl fmt::Debug for EventShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventShape::PerTokenType => f.write_str("PerTokenType"),
            EventShape::PerRequest => f.write_str("PerRequest"),
            EventShape::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    pub(crate) fn record(usage: Usage) -> UsageRecord {
        UsageRecord {
            id: "rec".into(),
            subject: Subject::new("customer-1").unwrap(),
            model: Some("gpt-4o".into()),
            provider: "openai".into(),
            api: Api::ChatCompletions,
            usage,
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            response_id: None,
            stream: false,
            complete: true,
            usage_source: UsageSource::Provider,
            labels: Map::new(),
        }
    }

    #[test]
    fn per_token_type_skips_zero_types() {
        let r = record(Usage {
            input: 56,
            cache_read: 64,
            output: 40,
            reasoning: Some(16),
            ..Usage::default()
        });
        let events: Vec<Value> = r
            .per_token_type_events("gw", "prompt")
            .iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        let common = |id: &str, data: Value| {
            json!({"specversion":"1.0","id":id,"source":"gw","type":"prompt","subject":"customer-1",
                   "time":"2023-11-14T22:13:20.123Z","data":data})
        };
        assert_eq!(
            events,
            vec![
                common(
                    "rec/input",
                    json!({"tokens":56,"type":"input","model":"gpt-4o","provider":"openai","api":"chat.completions"})
                ),
                common(
                    "rec/cache_read",
                    json!({"tokens":64,"type":"cache_read","model":"gpt-4o","provider":"openai","api":"chat.completions"})
                ),
                common(
                    "rec/output",
                    json!({"tokens":40,"type":"output","model":"gpt-4o","provider":"openai","api":"chat.completions","reasoning_tokens":16})
                ),
            ]
        );
    }

    #[test]
    fn record_ids_are_unique_uuid_v7() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_record_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let other_thread = std::thread::spawn(new_record_id).join().unwrap();
        assert!(!ids.contains(&other_thread));
        for id in ids.iter().take(10).chain([&other_thread]) {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(id.len(), 36);
        }
    }

    #[test]
    fn per_request_has_integer_totals() {
        let r = record(Usage {
            input: 20,
            cache_read: 4000,
            cache_write: 1500,
            output: 90,
            ..Usage::default()
        });
        let e = serde_json::to_value(r.per_request_event("gw", "litellm_tokens")).unwrap();
        assert_eq!(e["id"], "rec");
        assert_eq!(e["type"], "litellm_tokens");
        assert_eq!(
            e["data"],
            json!({"model":"gpt-4o","provider":"openai","api":"chat.completions","prompt_tokens":5520,
                   "completion_tokens":90,"total_tokens":5610,"input_tokens":20,"cache_read_tokens":4000,
                   "cache_write_tokens":1500})
        );
    }

    #[test]
    fn missing_usage_is_visible_and_flagged() {
        let mut r = record(Usage::default());
        r.usage_source = UsageSource::Missing;
        r.complete = false;
        let events = r.per_token_type_events("gw", "prompt");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, "rec/missing");
        assert_eq!(events[0].data["tokens"], 0);
        assert_eq!(events[0].data["complete"], false);
        assert_eq!(events[0].data["usage_source"], "missing");
    }

    #[test]
    fn labels_are_added_but_never_override_core_fields() {
        let mut r = record(Usage {
            output: 1,
            ..Usage::default()
        });
        r.labels.insert("tenant".into(), "acme".into());
        r.labels.insert("tokens".into(), "lots".into());
        let e = &r.per_token_type_events("gw", "prompt")[0];
        assert_eq!(e.data["tenant"], "acme");
        assert_eq!(e.data["tokens"], 1);
    }
}
