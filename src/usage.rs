//! Token usage as each API reports it, and the partition into billable token types.
//!
//! Every API's `usage` object is mapped onto the same four disjoint token types, so that the
//! per-type counts of one request sum to its total and no token is counted twice:
//!
//! | API | input (uncached) | cache_read | cache_write | output |
//! |---|---|---|---|---|
//! | chat.completions, completions | `prompt_tokens - cached_tokens` | `prompt_tokens_details.cached_tokens` | 0 | `completion_tokens` |
//! | embeddings | `prompt_tokens` | 0 | 0 | 0 |
//! | responses | `input_tokens - cached_tokens` | `input_tokens_details.cached_tokens` | 0 | `output_tokens` |
//! | messages (Anthropic) | `input_tokens` | `cache_read_input_tokens` | `cache_creation_input_tokens` | `output_tokens` |
//!
//! Reasoning and audio counts are already part of the output (or input) count; they travel as
//! extra, informational fields.
//!
//! Hostile numbers never panic: a count that is negative, fractional, a string or beyond `u64`
//! is read as 0, and a cached count larger than the prompt is clamped to it. Each such field is
//! counted as an anomaly.

use serde_json::Value;

/// The LLM API a request was made to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Messages,
}

impl Api {
    /// Every API, in the order their path suffixes are matched.
    pub const ALL: [Api; 5] = [
        Api::ChatCompletions,
        Api::Completions,
        Api::Embeddings,
        Api::Responses,
        Api::Messages,
    ];

    /// The name used in events' `api` field, e.g. `"chat.completions"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat.completions",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
        }
    }

    /// The provider family whose wire format the API uses: `"openai"` or `"anthropic"`.
    pub fn provider(self) -> &'static str {
        match self {
            Api::Messages => "anthropic",
            _ => "openai",
        }
    }

    /// The path suffix that identifies the API, e.g. `"/chat/completions"`.
    pub fn path_suffix(self) -> &'static str {
        match self {
            Api::ChatCompletions => "/chat/completions",
            Api::Completions => "/completions",
            Api::Embeddings => "/embeddings",
            Api::Responses => "/responses",
            Api::Messages => "/messages",
        }
    }

    /// Recognises an API by path suffix, so `/v1/chat/completions` and Azure-style
    /// `/openai/deployments/x/chat/completions` both match. A trailing `/` is ignored.
    ///
    /// ```
    /// use tower_openmeter::Api;
    /// assert_eq!(Api::from_path("/v1/chat/completions"), Some(Api::ChatCompletions));
    /// assert_eq!(Api::from_path("/openai/deployments/x/completions"), Some(Api::Completions));
    /// assert_eq!(Api::from_path("/v1/models"), None);
    /// ```
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.strip_suffix('/').unwrap_or(path);
        Api::ALL.into_iter().find(|api| path.ends_with(api.path_suffix()))
    }
}

/// One billable token type; the four partition a request's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Input tokens not served from a cache.
    Input,
    /// Input tokens read from the provider's prompt cache.
    CacheRead,
    /// Input tokens written to the provider's prompt cache.
    CacheWrite,
    /// Output tokens, reasoning included.
    Output,
}

impl TokenType {
    /// The four token types, in event order.
    pub const ALL: [TokenType; 4] = [
        TokenType::Input,
        TokenType::CacheRead,
        TokenType::CacheWrite,
        TokenType::Output,
    ];

    /// The name OpenMeter's LLM cost feature uses: `input`, `cache_read`, `cache_write`, `output`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Input => "input",
            TokenType::CacheRead => "cache_read",
            TokenType::CacheWrite => "cache_write",
            TokenType::Output => "output",
        }
    }
}

/// The tokens of one request, partitioned into disjoint types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Uncached input tokens.
    pub input: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read: u64,
    /// Input tokens written to the prompt cache.
    pub cache_write: u64,
    /// Output tokens (reasoning included).
    pub output: u64,
    /// Reasoning tokens, a part of `output`, where reported.
    pub reasoning: Option<u64>,
    /// Audio input tokens, a part of the input, where reported.
    pub input_audio: Option<u64>,
    /// Audio output tokens, a part of `output`, where reported.
    pub output_audio: Option<u64>,
}

impl Usage {
    /// The count of one token type.
    pub fn tokens(&self, ty: TokenType) -> u64 {
        match ty {
            TokenType::Input => self.input,
            TokenType::CacheRead => self.cache_read,
            TokenType::CacheWrite => self.cache_write,
            TokenType::Output => self.output,
        }
    }

    /// All input tokens: uncached, cache reads and cache writes.
    pub fn total_input(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
    }

    /// Every token of the request: the sum of the four types.
    pub fn total(&self) -> u64 {
        self.total_input().saturating_add(self.output)
    }

    /// Reads an API's `usage` object. Returns the usage and the number of fields that were
    /// anomalous (clamped or ignored).
    ///
    /// ```
    /// use tower_openmeter::{Api, Usage};
    /// let raw = serde_json::json!({"prompt_tokens": 120, "completion_tokens": 40,
    ///     "prompt_tokens_details": {"cached_tokens": 64}});
    /// let (usage, anomalies) = Usage::from_api_json(Api::ChatCompletions, &raw);
    /// assert_eq!((usage.input, usage.cache_read, usage.output), (56, 64, 40));
    /// assert_eq!(anomalies, 0);
    /// ```
    pub fn from_api_json(api: Api, usage: &Value) -> (Usage, u32) {
        Usage::from_object(api, usage)
    }
}

/// Reads token counts defensively and counts what it had to fix.
#[derive(Default)]
struct CountReader {
    anomalies: u32,
}

impl CountReader {
    /// OpenAI's shape: a prompt count that includes cached tokens, and a completion count that
    /// includes reasoning tokens.
    fn openai(
        &mut self,
        usage: &impl UsageObject,
        [input, input_details]: [&str; 2],
        [output, output_details]: [&str; 2],
    ) -> Usage {
        let prompt = self.count(usage.field(input));
        let mut cached = self.count(usage.detail(input_details, "cached_tokens"));
        if cached > prompt {
            self.anomalies += 1;
            cached = prompt;
        }
        Usage {
            input: prompt - cached,
            cache_read: cached,
            cache_write: 0,
            output: self.count(usage.field(output)),
            reasoning: self.optional(usage.detail(output_details, "reasoning_tokens")),
            input_audio: self.optional(usage.detail(input_details, "audio_tokens")),
            output_audio: self.optional(usage.detail(output_details, "audio_tokens")),
        }
    }

    /// A required count: absent or null is 0; anything but a non-negative integer is an anomaly.
    fn count(&mut self, value: Count) -> u64 {
        self.optional(value).unwrap_or(0)
    }

    fn optional(&mut self, value: Count) -> Option<u64> {
        match value {
            Count::Absent => None,
            Count::Valid(n) => Some(n),
            Count::Invalid => {
                self.anomalies += 1;
                None
            }
        }
    }
}

/// One token count field as sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Count {
    /// Absent or `null`.
    #[default]
    Absent,
    /// A non-negative integer that fits `u64`.
    Valid(u64),
    /// Anything else: negative, fractional, too large, a string, an array, an object, a bool.
    Invalid,
}

impl Count {
    fn from_value(value: Option<&Value>) -> Count {
        match value {
            None | Some(Value::Null) => Count::Absent,
            Some(Value::Number(n)) => n.as_u64().map_or(Count::Invalid, Count::Valid),
            Some(_) => Count::Invalid,
        }
    }
}

/// A `usage` object, either a parsed [`Value`] or the typed [`RawUsage`] read straight from the
/// body; both read the same counts from the same JSON.
trait UsageObject {
    /// A top-level count, e.g. `prompt_tokens`.
    fn field(&self, key: &str) -> Count;
    /// A count in a details object, e.g. `prompt_tokens_details.cached_tokens`; a details value
    /// that is not an object has no counts.
    fn detail(&self, details: &str, key: &str) -> Count;
}

impl UsageObject for Value {
    fn field(&self, key: &str) -> Count {
        Count::from_value(self.get(key))
    }

    fn detail(&self, details: &str, key: &str) -> Count {
        Count::from_value(self.get(details).and_then(|d| d.get(key)))
    }
}

impl Usage {
    fn from_object(api: Api, usage: &impl UsageObject) -> (Usage, u32) {
        let mut reader = CountReader::default();
        let usage = match api {
            Api::ChatCompletions | Api::Completions => reader.openai(
                usage,
                ["prompt_tokens", "prompt_tokens_details"],
                ["completion_tokens", "completion_tokens_details"],
            ),
            Api::Responses => reader.openai(
                usage,
                ["input_tokens", "input_tokens_details"],
                ["output_tokens", "output_tokens_details"],
            ),
            Api::Embeddings => Usage {
                input: reader.count(usage.field("prompt_tokens")),
                ..Usage::default()
            },
            Api::Messages => Usage {
                input: reader.count(usage.field("input_tokens")),
                cache_read: reader.count(usage.field("cache_read_input_tokens")),
                cache_write: reader.count(usage.field("cache_creation_input_tokens")),
                output: reader.count(usage.field("output_tokens")),
                ..Usage::default()
            },
        };
        (usage, reader.anomalies)
    }
}

/// What a complete (non-streamed) JSON response says about its usage.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ResponseSummary {
    pub(crate) model: Option<String>,
    pub(crate) response_id: Option<String>,
    /// `None` when the response has no `usage` object (or a `null` one).
    pub(crate) usage: Option<Usage>,
    pub(crate) anomalies: u32,
}

/// Reads `model`, `id` and `usage` from a JSON response body, skipping everything else.
///
/// `usage` is read into [`RawUsage`], not a [`Value`]: no map is built and no key is allocated.
/// It reads exactly what [`Usage::from_api_json`] reads from the same JSON (a test checks this
/// on arbitrary input), so [`summarize`] and this give the same summary.
pub(crate) fn parse_json_response(api: Api, body: &[u8]) -> Result<ResponseSummary, serde_json::Error> {
    Ok(summarize_top(api, serde_json::from_slice(body)?))
}

/// [`parse_json_response`] over a body kept as chunks (see `chunks`).
pub(crate) fn parse_json_response_chunks(
    api: Api,
    body: crate::chunks::Chunks,
) -> Result<ResponseSummary, serde_json::Error> {
    Ok(summarize_top(api, body.deserialize()?))
}

crate::lenient::lenient_struct! {
    struct ResponseTop { model: Value = "model", id: Value = "id", usage: raw::UsageField = "usage" }
}

fn summarize_top(api: Api, top: ResponseTop) -> ResponseSummary {
    let (usage, anomalies) = match top.usage {
        Some(raw::UsageField::Object(raw)) => {
            let (usage, anomalies) = Usage::from_object(api, &raw);
            (Some(usage), anomalies)
        }
        None => (None, 0),
        Some(raw::UsageField::Other) => (None, 1),
    };
    ResponseSummary {
        model: string_field(top.model),
        response_id: string_field(top.id),
        usage,
        anomalies,
    }
}

/// Builds a summary from the three fields every API's response (or final stream event) has.
pub(crate) fn summarize(
    api: Api,
    model: Option<Value>,
    id: Option<Value>,
    usage: Option<Value>,
) -> ResponseSummary {
    let (usage, anomalies) = match usage {
        Some(raw @ Value::Object(_)) => {
            let (usage, anomalies) = Usage::from_api_json(api, &raw);
            (Some(usage), anomalies)
        }
        None | Some(Value::Null) => (None, 0),
        Some(_) => (None, 1),
    };
    ResponseSummary {
        model: string_field(model),
        response_id: string_field(id),
        usage,
        anomalies,
    }
}

/// A non-empty string dimension; anything else is dropped (dimensions are never null).
pub(crate) fn string_field(value: Option<Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

mod raw {
    //! The typed `usage` object: the counts every API may send, read without building a map.

    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{Count, UsageObject};

    /// A non-null `usage` value.
    // Lives on the stack for one parse; boxing it would cost the allocation this type avoids.
    #[allow(clippy::large_enum_variant)]
    pub(super) enum UsageField {
        Object(RawUsage),
        /// Not an object: an anomaly.
        Other,
    }

    /// The counts of a `usage` object; a key sent twice keeps its last value, as a JSON map would.
    #[derive(Default)]
    pub(super) struct RawUsage {
        prompt_tokens: Count,
        completion_tokens: Count,
        input_tokens: Count,
        output_tokens: Count,
        cache_read_input_tokens: Count,
        cache_creation_input_tokens: Count,
        prompt_tokens_details: Details,
        completion_tokens_details: Details,
        input_tokens_details: Details,
        output_tokens_details: Details,
    }

    /// The counts of a `*_tokens_details` object; anything but an object has none.
    #[derive(Default)]
    struct Details {
        cached_tokens: Count,
        audio_tokens: Count,
        reasoning_tokens: Count,
    }

    impl UsageObject for RawUsage {
        fn field(&self, key: &str) -> Count {
            match key {
                "prompt_tokens" => self.prompt_tokens,
                "completion_tokens" => self.completion_tokens,
                "input_tokens" => self.input_tokens,
                "output_tokens" => self.output_tokens,
                "cache_read_input_tokens" => self.cache_read_input_tokens,
                "cache_creation_input_tokens" => self.cache_creation_input_tokens,
                _ => Count::Absent,
            }
        }

        fn detail(&self, details: &str, key: &str) -> Count {
            let details = match details {
                "prompt_tokens_details" => &self.prompt_tokens_details,
                "completion_tokens_details" => &self.completion_tokens_details,
                "input_tokens_details" => &self.input_tokens_details,
                "output_tokens_details" => &self.output_tokens_details,
                _ => return Count::Absent,
            };
            match key {
                "cached_tokens" => details.cached_tokens,
                "audio_tokens" => details.audio_tokens,
                "reasoning_tokens" => details.reasoning_tokens,
                _ => Count::Absent,
            }
        }
    }

    /// Drains a sequence or map so the parser moves past it.
    fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    /// Implements `Visitor` for a type read from any JSON value: `$map` reads an object,
    /// `$other` is the value for everything else (null included unless `$null` says).
    macro_rules! any_value_visitor {
        ($visitor:ident, $ty:ty, $expecting:literal, null => $null:expr, other => $other:expr,
         scalars { $($scalar:item)* }, map($map_arg:ident) => $map:block) => {
            struct $visitor;

            impl<'de> Visitor<'de> for $visitor {
                type Value = $ty;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str($expecting)
                }

                $($scalar)*

                fn visit_bool<E: de::Error>(self, _: bool) -> Result<$ty, E> {
                    Ok($other)
                }

                fn visit_f64<E: de::Error>(self, _: f64) -> Result<$ty, E> {
                    Ok($other)
                }

                fn visit_str<E: de::Error>(self, _: &str) -> Result<$ty, E> {
                    Ok($other)
                }

                fn visit_unit<E: de::Error>(self) -> Result<$ty, E> {
                    Ok($null)
                }

                fn visit_none<E: de::Error>(self) -> Result<$ty, E> {
                    Ok($null)
                }

                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<$ty, A::Error> {
                    drain_seq(seq)?;
                    Ok($other)
                }

                fn visit_map<A: MapAccess<'de>>(self, $map_arg: A) -> Result<$ty, A::Error> $map
            }
        };
    }

    any_value_visitor!(CountVisitor, Count, "a token count", null => Count::Absent, other => Count::Invalid,
        scalars {
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                Ok(Count::Valid(n))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                Ok(u64::try_from(n).map_or(Count::Invalid, Count::Valid))
            }
        },
        map(map) => {
            drain_map(map)?;
            Ok(Count::Invalid)
        }
    );

    impl<'de> Deserialize<'de> for Count {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
            d.deserialize_any(CountVisitor)
        }
    }

    any_value_visitor!(DetailsVisitor, Details, "token details", null => Details::default(),
        other => Details::default(),
        scalars {
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Details, E> {
                Ok(Details::default())
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Details, E> {
                Ok(Details::default())
            }
        },
        map(map) => {
            let mut map = map;
            let mut details = Details::default();
            while let Some(key) = map.next_key::<Key<'de>>()? {
                match key.as_str() {
                    "cached_tokens" => details.cached_tokens = map.next_value()?,
                    "audio_tokens" => details.audio_tokens = map.next_value()?,
                    "reasoning_tokens" => details.reasoning_tokens = map.next_value()?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(details)
        }
    );

    impl<'de> Deserialize<'de> for Details {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Details, D::Error> {
            d.deserialize_any(DetailsVisitor)
        }
    }

    any_value_visitor!(UsageVisitor, UsageField, "a usage object", null => UsageField::Other,
        other => UsageField::Other,
        scalars {
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<UsageField, E> {
                Ok(UsageField::Other)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<UsageField, E> {
                Ok(UsageField::Other)
            }
        },
        map(map) => {
            let mut map = map;
            let mut u = RawUsage::default();
            while let Some(key) = map.next_key::<Key<'de>>()? {
                match key.as_str() {
                    "prompt_tokens" => u.prompt_tokens = map.next_value()?,
                    "completion_tokens" => u.completion_tokens = map.next_value()?,
                    "input_tokens" => u.input_tokens = map.next_value()?,
                    "output_tokens" => u.output_tokens = map.next_value()?,
                    "cache_read_input_tokens" => u.cache_read_input_tokens = map.next_value()?,
                    "cache_creation_input_tokens" => u.cache_creation_input_tokens = map.next_value()?,
                    "prompt_tokens_details" => u.prompt_tokens_details = map.next_value()?,
                    "completion_tokens_details" => u.completion_tokens_details = map.next_value()?,
                    "input_tokens_details" => u.input_tokens_details = map.next_value()?,
                    "output_tokens_details" => u.output_tokens_details = map.next_value()?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(UsageField::Object(u))
        }
    );

    impl<'de> Deserialize<'de> for UsageField {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UsageField, D::Error> {
            d.deserialize_any(UsageVisitor)
        }
    }

    /// A map key, borrowed from the body unless it had escapes.
    struct Key<'de>(std::borrow::Cow<'de, str>);

    impl Key<'_> {
        fn as_str(&self) -> &str {
            &self.0
        }
    }

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
            struct KeyVisitor;

            impl<'de> Visitor<'de> for KeyVisitor {
                type Value = Key<'de>;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a key")
                }

                fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(s.into()))
                }

                fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                    Ok(Key(s.to_owned().into()))
                }
            }

            d.deserialize_str(KeyVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(api: Api, body: &str) -> ResponseSummary {
        parse_json_response(api, body.as_bytes()).unwrap()
    }

    #[test]
    fn chat_completion_with_cache_reasoning_and_audio() {
        let s = parse(
            Api::ChatCompletions,
            r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[],
             "usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,
              "prompt_tokens_details":{"cached_tokens":64,"audio_tokens":3},
              "completion_tokens_details":{"reasoning_tokens":16,"audio_tokens":0,
               "accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
        );
        assert_eq!(s.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(s.response_id.as_deref(), Some("chatcmpl-1"));
        let u = s.usage.unwrap();
        assert_eq!(
            u,
            Usage {
                input: 56,
                cache_read: 64,
                cache_write: 0,
                output: 40,
                reasoning: Some(16),
                input_audio: Some(3),
                output_audio: Some(0),
            }
        );
        assert_eq!(u.total(), 160);
        assert_eq!(s.anomalies, 0);
    }

    #[test]
    fn legacy_completion() {
        let s = parse(
            Api::Completions,
            r#"{"id":"cmpl-1","object":"text_completion","model":"gpt-3.5-turbo-instruct",
             "usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        );
        let u = s.usage.unwrap();
        assert_eq!((u.input, u.cache_read, u.output, u.reasoning), (5, 0, 7, None));
    }

    #[test]
    fn embeddings_have_input_only() {
        let s = parse(
            Api::Embeddings,
            r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],
             "model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        assert_eq!(s.response_id, None);
        assert_eq!(
            s.usage.unwrap(),
            Usage {
                input: 8,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn responses_api() {
        let s = parse(
            Api::Responses,
            r#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1",
             "usage":{"input_tokens":300,"input_tokens_details":{"cached_tokens":128},
              "output_tokens":50,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":350}}"#,
        );
        let u = s.usage.unwrap();
        assert_eq!(
            (u.input, u.cache_read, u.output, u.reasoning),
            (172, 128, 50, Some(20))
        );
        assert_eq!(u.total(), 350);
    }

    #[test]
    fn anthropic_messages_bill_cache_reads_and_writes() {
        let s = parse(
            Api::Messages,
            r#"{"id":"msg_1","type":"message","model":"claude-sonnet-4-5","content":[],
             "usage":{"input_tokens":20,"cache_creation_input_tokens":1500,"cache_read_input_tokens":4000,"output_tokens":90}}"#,
        );
        let u = s.usage.unwrap();
        assert_eq!(
            (u.input, u.cache_read, u.cache_write, u.output),
            (20, 4000, 1500, 90)
        );
        assert_eq!(u.total(), 5610);
    }

    #[test]
    fn missing_or_null_usage_is_none() {
        assert_eq!(parse(Api::ChatCompletions, r#"{"model":"m"}"#).usage, None);
        assert_eq!(
            parse(Api::ChatCompletions, r#"{"model":"m","usage":null}"#).usage,
            None
        );
        assert_eq!(parse(Api::ChatCompletions, r#"{"usage":"lots"}"#).anomalies, 1);
    }

    #[test]
    fn hostile_numbers_are_zeroed_and_counted() {
        let raw = json!({
            "prompt_tokens": -5,
            "completion_tokens": 1.5,
            "prompt_tokens_details": {"cached_tokens": "9"},
            "completion_tokens_details": {"reasoning_tokens": 1e30}
        });
        let (u, anomalies) = Usage::from_api_json(Api::ChatCompletions, &raw);
        assert_eq!(u, Usage::default());
        assert_eq!(anomalies, 4);
        let huge: Value = serde_json::from_str(r#"{"input_tokens": 99999999999999999999999}"#).unwrap();
        let (u, anomalies) = Usage::from_api_json(Api::Messages, &huge);
        assert_eq!((u.input, anomalies), (0, 1));
    }

    #[test]
    fn cached_above_prompt_is_clamped_and_counted() {
        let raw = json!({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 50}});
        let (u, anomalies) = Usage::from_api_json(Api::ChatCompletions, &raw);
        assert_eq!((u.input, u.cache_read, u.total()), (0, 10, 11));
        assert_eq!(anomalies, 1);
    }

    #[test]
    fn non_string_model_is_dropped_not_fatal() {
        let s = parse(
            Api::ChatCompletions,
            r#"{"model":["x"],"id":7,"usage":{"prompt_tokens":1}}"#,
        );
        assert_eq!((s.model, s.response_id), (None, None));
        assert_eq!(s.usage.unwrap().input, 1);
    }

    /// The old reader: the whole `usage` as a `Value`, then `summarize`.
    fn parse_via_value(api: Api, body: &[u8]) -> ResponseSummary {
        crate::lenient::lenient_struct! {
            struct Top { model: Value = "model", id: Value = "id", usage: Value = "usage" }
        }
        let top: Top = serde_json::from_slice(body).unwrap();
        summarize(api, top.model, top.id, top.usage)
    }

    #[test]
    fn typed_usage_matches_value_on_hostile_shapes() {
        let bodies = [
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":5,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":10,"prompt_tokens_details":"x","completion_tokens_details":[1]}}"#,
            r#"{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":3,"cached_tokens":null}}}"#,
            r#"{"usage":{"prompt\u005ftokens":7,"input_tokens":-0,"output_tokens":-1}}"#,
            r#"{"usage":{"input_tokens":1.0,"output_tokens":99999999999999999999999,"cache_read_input_tokens":{"a":[1,{}]}}}"#,
            r#"{"usage":[{"prompt_tokens":1}]}"#,
            r#"{"usage":true}"#,
            r#"{"usage":null,"model":"m","id":"i"}"#,
            r#"{"usage":{},"model":7,"id":""}"#,
            r#"{"usage":{"prompt_tokens":1},"model":"a","usage":{"prompt_tokens":2},"model":"b"}"#,
            r#"{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":9}"}}],"usage":{"prompt_tokens":1}}"#,
        ];
        for body in bodies {
            for api in Api::ALL {
                assert_eq!(
                    parse_json_response(api, body.as_bytes()).unwrap(),
                    parse_via_value(api, body.as_bytes()),
                    "{api:?} {body}"
                );
            }
        }
        assert_eq!(parse(Api::ChatCompletions, bodies[0]).usage.unwrap().input, 5);
        assert!(parse_json_response(Api::ChatCompletions, br#"{"usage":{"prompt_tokens":1,}}"#).is_err());
        assert!(parse_json_response(Api::ChatCompletions, br#"{"usage":{"prompt_tokens":1}"#).is_err());
        assert!(parse_json_response(Api::ChatCompletions, br#"{"usage":{"x":[1,}}"#).is_err());
    }

    fn arb_count() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => any::<u64>().prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => (-1e30f64..1e30).prop_map(Value::from),
            1 => Just(Value::Null),
            1 => Just(json!("12")),
            1 => Just(json!(false)),
            1 => Just(json!([1, {"a": 2}])),
            1 => Just(json!({"cached_tokens": 1})),
        ]
    }

    fn arb_object(
        keys: &'static [&'static str],
        value: BoxedStrategy<Value>,
    ) -> impl Strategy<Value = Value> {
        proptest::collection::vec((proptest::sample::select(keys), value), 0..8)
            .prop_map(|entries| Value::Object(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    fn arb_usage() -> impl Strategy<Value = Value> {
        const DETAIL_KEYS: &[&str] = &["cached_tokens", "audio_tokens", "reasoning_tokens", "other"];
        const USAGE_KEYS: &[&str] = &[
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
            "input_tokens_details",
            "output_tokens_details",
            "total_tokens",
        ];
        let details =
            prop_oneof![3 => arb_object(DETAIL_KEYS, arb_count().boxed()), 1 => arb_count()].boxed();
        let field = prop_oneof![arb_count(), details].boxed();
        prop_oneof![6 => arb_object(USAGE_KEYS, field), 1 => arb_count()]
    }

    proptest! {
        #[test]
        fn partition_sums_to_the_reported_total(
            prompt in 0u64..1 << 40, cached in 0u64..1 << 40, completion in 0u64..1 << 40,
            reasoning in 0u64..1 << 40,
        ) {
            let raw = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning}});
            let (u, anomalies) = Usage::from_api_json(Api::ChatCompletions, &raw);
            let sum: u64 = TokenType::ALL.iter().map(|t| u.tokens(*t)).sum();
            prop_assert_eq!(sum, prompt + completion);
            prop_assert_eq!(u.total(), prompt + completion);
            // Cached tokens are part of the prompt: more than the prompt is clamped and counted.
            prop_assert_eq!(u.cache_read, cached.min(prompt));
            prop_assert_eq!(u.input, prompt - cached.min(prompt));
            prop_assert_eq!(u64::from(anomalies) > 0, cached > prompt);

            let raw = json!({"input_tokens": prompt, "output_tokens": completion,
                "input_tokens_details": {"cached_tokens": cached}});
            let (u, _) = Usage::from_api_json(Api::Responses, &raw);
            prop_assert_eq!(u.total(), prompt + completion);

            let raw = json!({"input_tokens": prompt, "output_tokens": completion,
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": reasoning});
            let (u, _) = Usage::from_api_json(Api::Messages, &raw);
            let sum: u64 = TokenType::ALL.iter().map(|t| u.tokens(*t)).sum();
            prop_assert_eq!(sum, prompt + completion + cached + reasoning);
        }

        #[test]
        fn typed_usage_reads_what_value_reads(usage in arb_usage(), model in arb_count()) {
            let body = serde_json::to_vec(&json!({"id": "r", "model": model, "choices": [], "usage": usage})).unwrap();
            for api in Api::ALL {
                prop_assert_eq!(parse_json_response(api, &body).unwrap(), parse_via_value(api, &body));
            }
        }
    }
}
