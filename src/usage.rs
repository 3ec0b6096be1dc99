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
                input: reader.count(usage.get("prompt_tokens")),
                ..Usage::default()
            },
            Api::Messages => Usage {
                input: reader.count(usage.get("input_tokens")),
                cache_read: reader.count(usage.get("cache_read_input_tokens")),
                cache_write: reader.count(usage.get("cache_creation_input_tokens")),
                output: reader.count(usage.get("output_tokens")),
                ..Usage::default()
            },
        };
        (usage, reader.anomalies)
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
        usage: &Value,
        [input, input_details]: [&str; 2],
        [output, output_details]: [&str; 2],
    ) -> Usage {
        let prompt = self.count(usage.get(input));
        let input_details = usage.get(input_details);
        let output_details = usage.get(output_details);
        let mut cached = self.count(input_details.and_then(|d| d.get("cached_tokens")));
        if cached > prompt {
            self.anomalies += 1;
            cached = prompt;
        }
        Usage {
            input: prompt - cached,
            cache_read: cached,
            cache_write: 0,
            output: self.count(usage.get(output)),
            reasoning: self.optional(output_details.and_then(|d| d.get("reasoning_tokens"))),
            input_audio: self.optional(input_details.and_then(|d| d.get("audio_tokens"))),
            output_audio: self.optional(output_details.and_then(|d| d.get("audio_tokens"))),
        }
    }

    /// A required count: absent or null is 0; anything but a non-negative integer is an anomaly.
    fn count(&mut self, value: Option<&Value>) -> u64 {
        self.optional(value).unwrap_or(0)
    }

    fn optional(&mut self, value: Option<&Value>) -> Option<u64> {
        match value {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            Some(_) => {
                self.anomalies += 1;
                None
            }
        }
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
pub(crate) fn parse_json_response(api: Api, body: &[u8]) -> Result<ResponseSummary, serde_json::Error> {
    crate::lenient::lenient_struct! {
        struct Top { model: Value = "model", id: Value = "id", usage: Value = "usage" }
    }
    let top: Top = serde_json::from_slice(body)?;
    Ok(summarize(api, top.model, top.id, top.usage))
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

    proptest! {
        #[test]
        fn partition_sums_to_the_reported_total(
            prompt in 0u64..1 << 40, cached in 0u64..1 << 40, completion in 0u64..1 << 40,
            reasoning in 0u64..1 << 40,
        ) {
            let raw = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning}});
            let (u, _) = Usage::from_api_json(Api::ChatCompletions, &raw);
            let sum: u64 = TokenType::ALL.iter().map(|t| u.tokens(*t)).sum();
            prop_assert_eq!(sum, prompt.max(cached.min(prompt)) + completion);
            prop_assert_eq!(u.total(), prompt + completion);

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
    }
}
