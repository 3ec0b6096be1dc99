//! Usage from a streamed (SSE) response, per API, summarized like a JSON response.
//!
//! Every API streams its usage differently:
//!
//! - chat.completions and completions (and embeddings, which are never streamed): `data:
//!   {chunk}` events and a final `data: [DONE]`. With `stream_options.include_usage` the last
//!   chunk before `[DONE]` has `"choices": []` (or `null`) and the totals; the other chunks carry
//!   `"usage": null`. Some backends put usage on a chunk with choices, or (vLLM's
//!   `continuous_usage_stats`) cumulative usage on every chunk. The **last non-null usage wins**;
//!   usage is never summed.
//! - responses: `response.created` names the model and id; `response.completed`,
//!   `response.incomplete` and `response.failed` carry `response.usage`. The event type is read
//!   from the `event:` line, and events without one are still examined when they could carry
//!   usage. The last non-null usage wins.
//! - messages (Anthropic): `message_start` carries `message.usage` (input and cache counts, a
//!   tiny output count), `message.model` and `message.id`; each `message_delta` carries `usage`
//!   with the cumulative `output_tokens`, and sometimes input and cache counts again. The usage
//!   objects are **merged field by field, the latest non-null value winning**, never added.
//!
//! The collected usage object is partitioned by [`Usage::from_api_json`](crate::Usage) through
//! [`summarize`], exactly as a non-streamed response is.
//!
//! Cost: only events that may carry what is still needed are parsed. A cheap byte search for a
//! `"usage"` key followed by anything but `null` decides for content deltas, so a long stream of
//! deltas costs a search per event and no JSON parsing or allocation. The model and id are read
//! from the first chunks (or from the usage chunk when the first ones lack them).
//!
//! An event whose payload was longer than the line cap arrives truncated (only the tail of its
//! line); the last `"usage"` member holding a complete object is taken from that tail. This
//! keeps the usage of a Responses API `response.completed` event, which repeats the whole
//! output before its `usage`, however long the output.

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::Api;
use crate::lenient::lenient_struct;
use crate::sse::SseEvent;
use crate::usage::{ResponseSummary, summarize};

/// How many JSON events may be parsed only to learn the model and id.
const MODEL_ATTEMPTS: u8 = 4;

/// Usage accumulated from one stream's events.
#[derive(Debug)]
pub(crate) struct StreamUsage {
    api: Api,
    model: Option<String>,
    response_id: Option<String>,
    model_attempts: u8,
    /// The last non-null usage object (OpenAI-style APIs and responses).
    last: Option<Value>,
    /// The field-wise merge of every usage object seen (messages).
    merged: Map<String, Value>,
    seen_usage: bool,
    saw_end: bool,
    anomalies: u32,
    unparsed_events: u64,
}

impl StreamUsage {
    pub(crate) fn new(api: Api) -> Self {
        StreamUsage {
            api,
            model: None,
            response_id: None,
            model_attempts: 0,
            last: None,
            merged: Map::new(),
            seen_usage: false,
            saw_end: false,
            anomalies: 0,
            unparsed_events: 0,
        }
    }

    #[cfg(test)]
    /// Whether any usage was seen.
    pub(crate) fn seen_usage(&self) -> bool {
        self.seen_usage
    }

    #[cfg(test)]
    /// Whether the stream's own end marker was seen (`[DONE]`, `message_stop`, or a final
    /// `response.completed`/`incomplete`/`failed`).
    pub(crate) fn saw_end(&self) -> bool {
        self.saw_end
    }

    /// Events that looked relevant but were not valid JSON of the expected shape.
    pub(crate) fn unparsed_events(&self) -> u64 {
        self.unparsed_events
    }

    /// The summary so far: usage `None` when none was seen.
    pub(crate) fn summary(&self) -> ResponseSummary {
        let usage = match self.api {
            Api::Messages if self.seen_usage => Some(Value::Object(self.merged.clone())),
            Api::Messages => None,
            _ => self.last.clone(),
        };
        let mut summary = summarize(
            self.api,
            self.model.clone().map(Value::String),
            self.response_id.clone().map(Value::String),
            usage,
        );
        summary.anomalies = summary.anomalies.saturating_add(self.anomalies);
        summary
    }

    /// Observes one event.
    pub(crate) fn on_event(&mut self, ev: &SseEvent<'_>) {
        if ev.truncated {
            self.truncated(ev);
            return;
        }
        match self.api {
            Api::ChatCompletions | Api::Completions | Api::Embeddings => self.openai(ev),
            Api::Responses => self.responses(ev),
            Api::Messages => self.messages(ev),
        }
    }

    fn wants_model(&self) -> bool {
        self.model.is_none() && self.model_attempts < MODEL_ATTEMPTS
    }

    fn openai(&mut self, ev: &SseEvent<'_>) {
        if ev.is_done() {
            self.saw_end = true;
            return;
        }
        if !(self.wants_model() || may_carry_usage(ev.data)) {
            return;
        }
        lenient_struct! {
            struct Chunk { model: Value = "model", id: Value = "id", usage: Value = "usage" }
        }
        let Some(chunk) = self.parse::<Chunk>(ev.data) else {
            return;
        };
        self.learn_names(chunk.model, chunk.id);
        if let Some(usage) = self.usage_object(chunk.usage) {
            self.last = Some(usage);
        }
    }

    fn responses(&mut self, ev: &SseEvent<'_>) {
        const NAMED: [&[u8]; 6] = [
            b"response.created",
            b"response.in_progress",
            b"response.queued",
            b"response.completed",
            b"response.incomplete",
            b"response.failed",
        ];
        let named = NAMED.contains(&ev.event);
        if !(named || may_carry_usage(ev.data) || (ev.event.is_empty() && self.wants_model())) {
            return;
        }
        lenient_struct! {
            struct Event { ty: Value = "type", response: Response = "response" }
        }
        lenient_struct! {
            struct Response { model: Value = "model", id: Value = "id", usage: Value = "usage" }
        }
        let Some(event) = self.parse::<Event>(ev.data) else {
            return;
        };
        let ty = match &event.ty {
            Some(Value::String(ty)) => ty.as_bytes(),
            _ => ev.event,
        };
        if matches!(
            ty,
            b"response.completed" | b"response.incomplete" | b"response.failed"
        ) {
            self.saw_end = true;
        }
        let Some(response) = event.response else {
            return;
        };
        self.learn_names(response.model, response.id);
        if let Some(usage) = self.usage_object(response.usage) {
            self.last = Some(usage);
        }
    }

    fn messages(&mut self, ev: &SseEvent<'_>) {
        if ev.event == b"message_stop" {
            self.saw_end = true;
            return;
        }
        let named = matches!(ev.event, b"message_start" | b"message_delta");
        if !(named || may_carry_usage(ev.data) || (ev.event.is_empty() && self.wants_model())) {
            return;
        }
        lenient_struct! {
            struct Event { message: Message = "message", usage: Value = "usage" }
        }
        lenient_struct! {
            struct Message { model: Value = "model", id: Value = "id", usage: Value = "usage" }
        }
        let Some(event) = self.parse::<Event>(ev.data) else {
            return;
        };
        if let Some(message) = event.message {
            self.learn_names(message.model, message.id);
            self.merge(message.usage);
        }
        self.merge(event.usage);
    }

    /// An event whose payload was over the line cap: only its tail is known. The usage object,
    /// small and near the end of every API's payload, is looked for there: the last `"usage"`
    /// key whose value is a complete object. Nothing else is read from it.
    fn truncated(&mut self, ev: &SseEvent<'_>) {
        let Some(usage) = last_usage_object(ev.data) else {
            self.unparsed_events += 1;
            return;
        };
        match self.api {
            Api::Messages => self.merge(Some(usage)),
            _ => self.last = self.usage_object(Some(usage)),
        }
    }

    /// Parses an event's data; `None` (counted) when it is not the expected JSON.
    fn parse<'de, T: Deserialize<'de>>(&mut self, data: &'de [u8]) -> Option<T> {
        match serde_json::from_slice(data) {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                self.unparsed_events += 1;
                None
            }
        }
    }

    fn learn_names(&mut self, model: Option<Value>, id: Option<Value>) {
        if self.model.is_none() {
            self.model_attempts = self.model_attempts.saturating_add(1);
            self.model = crate::usage::string_field(model);
        }
        if self.response_id.is_none() {
            self.response_id = crate::usage::string_field(id);
        }
    }

    /// A non-null usage value: an object is returned; anything else is an anomaly.
    fn usage_object(&mut self, usage: Option<Value>) -> Option<Value> {
        match usage {
            None | Some(Value::Null) => None,
            Some(usage @ Value::Object(_)) => {
                self.seen_usage = true;
                Some(usage)
            }
            Some(_) => {
                self.anomalies = self.anomalies.saturating_add(1);
                None
            }
        }
    }

    fn merge(&mut self, usage: Option<Value>) {
        if let Some(Value::Object(fields)) = self.usage_object(usage) {
            for (key, value) in fields {
                if !value.is_null() {
                    self.merged.insert(key, value);
                }
            }
        }
    }
}

/// The searcher for `"usage"`, built once: `memmem::find_iter` would build one per event, which
/// cost more than the search itself on short delta events.
pub(crate) static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// Whether `data` may hold a non-null `usage` member: some `"usage"` not followed by
/// `: null`. A byte search, no parsing: a false positive only costs a parse. (Inside a JSON
/// string a quote is escaped, so the bytes `"usage"` are almost always a key.)
pub(crate) fn may_carry_usage(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    USAGE_KEY.find_iter(data).any(|at| {
        let rest = skip_ws(&data[at + KEY.len()..]);
        match rest.strip_prefix(b":") {
            Some(value) => !skip_ws(value).starts_with(b"null"),
            None => false,
        }
    })
}

/// The value of the last `"usage": {...}` member in `data` that parses as a complete object.
fn last_usage_object(data: &[u8]) -> Option<Value> {
    const KEY: &[u8] = b"\"usage\"";
    memmem::rfind_iter(data, KEY).find_map(|at| {
        let rest = skip_ws(&data[at + KEY.len()..]);
        let rest = skip_ws(rest.strip_prefix(b":")?);
        if !rest.starts_with(b"{") {
            return None;
        }
        match serde_json::Deserializer::from_slice(rest)
            .into_iter::<Value>()
            .next()
        {
            Some(Ok(value @ Value::Object(_))) => Some(value),
            _ => None,
        }
    })
}

fn skip_ws(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Usage;
    use crate::sse::SseScanner;
    use crate::sse::tests::split_at;
    use proptest::prelude::*;

    pub(crate) fn run<'a>(api: Api, chunks: impl IntoIterator<Item = &'a [u8]>) -> StreamUsage {
        let mut scanner = SseScanner::new(crate::sse::DEFAULT_MAX_LINE);
        let mut usage = StreamUsage::new(api);
        for chunk in chunks {
            scanner.feed(chunk, &mut |ev| usage.on_event(&ev));
        }
        scanner.finish(&mut |ev| usage.on_event(&ev));
        usage
    }

    fn summary(api: Api, stream: &str) -> ResponseSummary {
        run(api, [stream.as_bytes()]).summary()
    }

    /// OpenAI chat stream with `include_usage`, as the API sends it (compact JSON, LF LF).
    pub(crate) const CHAT_INCLUDE_USAGE: &str = concat!(
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" \\\"usage\\\": 9\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":40,\"total_tokens\":160,\"prompt_tokens_details\":{\"cached_tokens\":64,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":16,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    /// The same stream as the API sends it without `include_usage`.
    pub(crate) const CHAT_NO_USAGE: &str = concat!(
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" \\\"usage\\\": 9\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );

    pub(crate) const CHAT_USAGE: Usage = Usage {
        input: 56,
        cache_read: 64,
        cache_write: 0,
        output: 40,
        reasoning: Some(16),
        input_audio: Some(0),
        output_audio: Some(0),
    };

    const ANTHROPIC: &str = concat!(
        "event: message_start\r\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01X\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":1500,\"cache_read_input_tokens\":4000,\"output_tokens\":1,\"service_tier\":\"standard\"}}}\r\n\r\n",
        "event: content_block_start\r\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\r\n\r\n",
        "event: ping\r\n",
        "data: {\"type\": \"ping\"}\r\n\r\n",
        "event: content_block_delta\r\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \\u00e9\"}}\r\n\r\n",
        "event: content_block_stop\r\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\r\n\r\n",
        "event: message_delta\r\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"pause_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":45}}\r\n\r\n",
        "event: message_delta\r\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":null,\"cache_read_input_tokens\":4000,\"output_tokens\":90,\"server_tool_use\":{\"web_search_requests\":1}}}\r\n\r\n",
        "event: message_stop\r\n",
        "data: {\"type\":\"message_stop\"}\r\n\r\n",
    );

    const RESPONSES_INCOMPLETE: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.in_progress\n",
        "data: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"usage\":null}}\n\n",
        ": keep-alive\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello\"}\n\n",
        "event: response.incomplete\n",
        "data: {\"type\":\"response.incomplete\",\"sequence_number\":3,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"incomplete\",\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"usage\":{\"input_tokens\":300,\"input_tokens_details\":{\"cached_tokens\":128},\"output_tokens\":50,\"output_tokens_details\":{\"reasoning_tokens\":20},\"total_tokens\":350}}}\n\n",
    );

    #[test]
    fn chat_usage_only_final_chunk() {
        let s = summary(Api::ChatCompletions, CHAT_INCLUDE_USAGE);
        assert_eq!(s.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(s.response_id.as_deref(), Some("chatcmpl-B9"));
        assert_eq!(s.usage, Some(CHAT_USAGE));
        assert_eq!(s.anomalies, 0);
        // Same as the non-streamed JSON path for the same usage object.
        let json = crate::usage::parse_json_response(
            Api::ChatCompletions,
            br#"{"usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":16,"audio_tokens":0}}}"#,
        )
        .unwrap();
        assert_eq!(json.usage, s.usage);
        let u = run(Api::ChatCompletions, [CHAT_INCLUDE_USAGE.as_bytes()]);
        assert!(u.seen_usage() && u.saw_end());
    }

    #[test]
    fn chat_without_usage_parses_only_the_first_chunk() {
        let u = run(Api::ChatCompletions, [CHAT_NO_USAGE.as_bytes()]);
        let s = u.summary();
        assert_eq!((s.usage, s.model.as_deref()), (None, Some("gpt-4o-2024-08-06")));
        assert!(!u.seen_usage());
        assert_eq!(u.model_attempts, 1);
    }

    #[test]
    fn vllm_cumulative_usage_on_every_chunk_last_wins() {
        let stream = ": ping\n\n\
            data: {\"id\":\"cmpl-v\",\"model\":\"llama\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":1,\"total_tokens\":11}}\n\n\
            data: {\"id\":\"cmpl-v\",\"model\":\"llama\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"total_tokens\":12}}\n\n\
            data: {\"id\":\"cmpl-v\",\"model\":\"llama\",\"choices\":null,\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":3,\"total_tokens\":13}}\n\n\
            data: {\"id\":\"cmpl-v\",\"model\":\"llama\",\"choices\":[],\"usage\":null}\n\n\
            data: [DONE]\n\n";
        let u = summary(Api::ChatCompletions, stream).usage.unwrap();
        assert_eq!((u.input, u.output, u.total()), (10, 3, 13));
    }

    #[test]
    fn legacy_completions_stream() {
        let stream = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"choices\":[{\"text\":\"x\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":null}\r\n\r\n\
            data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"choices\":[],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\r\n\r\n\
            data: [DONE]\r\n\r\n";
        let s = summary(Api::Completions, stream);
        let u = s.usage.unwrap();
        assert_eq!((u.input, u.output), (5, 7));
        assert_eq!(s.model.as_deref(), Some("gpt-3.5-turbo-instruct"));
        // Embeddings are never streamed; they are read like chat.
        assert_eq!(summary(Api::Embeddings, stream).usage.unwrap().input, 5);
    }

    #[test]
    fn anthropic_merges_field_wise_latest_wins() {
        let u = run(Api::Messages, [ANTHROPIC.as_bytes()]);
        assert!(u.saw_end());
        let s = u.summary();
        assert_eq!(s.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(s.response_id.as_deref(), Some("msg_01X"));
        let usage = s.usage.unwrap();
        assert_eq!(
            (usage.input, usage.cache_read, usage.cache_write, usage.output),
            (20, 4000, 1500, 90)
        );
        assert_eq!(s.anomalies, 0);
        // Only message_start: the tiny output count, input and cache counts.
        let cut = ANTHROPIC.find("event: content_block_start").unwrap();
        let partial = summary(Api::Messages, &ANTHROPIC[..cut]).usage.unwrap();
        assert_eq!((partial.input, partial.output), (20, 1));
    }

    #[test]
    fn anthropic_usage_only_in_message_delta() {
        let stream = "event: message_start\n\
            data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_2\",\"model\":\"glm-4\",\"usage\":null}}\n\n\
            event: message_delta\n\
            data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":7,\"output_tokens\":3}}\n\n";
        let u = summary(Api::Messages, stream).usage.unwrap();
        assert_eq!((u.input, u.output), (7, 3));
    }

    #[test]
    fn responses_incomplete_and_completed() {
        let s = summary(Api::Responses, RESPONSES_INCOMPLETE);
        assert_eq!(s.model.as_deref(), Some("gpt-4.1-2025-04-14"));
        assert_eq!(s.response_id.as_deref(), Some("resp_1"));
        let u = s.usage.unwrap();
        assert_eq!(
            (u.input, u.cache_read, u.output, u.reasoning),
            (172, 128, 50, Some(20))
        );
        let completed = RESPONSES_INCOMPLETE.replace("response.incomplete", "response.completed");
        assert_eq!(summary(Api::Responses, &completed).usage, Some(u));
        // Without `event:` lines, the `type` field and the usage scan still find it.
        let bare: String = RESPONSES_INCOMPLETE
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("event:"))
            .collect();
        let r = run(Api::Responses, [bare.as_bytes()]);
        assert!(r.saw_end());
        assert_eq!(r.summary().usage, Some(u));
        // Failed with usage.
        let failed = RESPONSES_INCOMPLETE.replace("response.incomplete", "response.failed");
        assert_eq!(summary(Api::Responses, &failed).usage, Some(u));
    }

    #[test]
    fn usage_is_found_in_the_tail_of_an_over_long_response_completed() {
        let output = "word ".repeat(4000);
        let stream = format!(
            "event: response.created\n\
             data: {{\"type\":\"response.created\",\"response\":{{\"id\":\"resp_2\",\"model\":\"gpt-4.1\",\"usage\":null}}}}\n\n\
             event: response.completed\n\
             data: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_2\",\"model\":\"gpt-4.1\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{output}\"}}]}}],\"tools\":[],\"usage\":{{\"input_tokens\":30,\"input_tokens_details\":{{\"cached_tokens\":10}},\"output_tokens\":4000,\"total_tokens\":4030}},\"user\":null,\"metadata\":{{}}}}}}\n\n"
        );
        let run_capped = |chunks: Vec<&[u8]>| {
            let mut scanner = SseScanner::new(4096).with_long_line_tail(1024);
            let mut usage = StreamUsage::new(Api::Responses);
            for chunk in chunks {
                scanner.feed(chunk, &mut |ev| usage.on_event(&ev));
            }
            scanner.finish(&mut |ev| usage.on_event(&ev));
            assert_eq!(scanner.lines_too_long(), 1);
            usage.summary()
        };
        let whole = run_capped(vec![stream.as_bytes()]);
        let u = whole.usage.unwrap();
        assert_eq!((u.input, u.cache_read, u.output), (20, 10, 4000));
        assert_eq!(whole.response_id.as_deref(), Some("resp_2"));
        for frame in [1, 13, 500, 5000] {
            assert_eq!(run_capped(stream.as_bytes().chunks(frame).collect()), whole);
        }
        // A tail with no complete usage object is counted, not guessed.
        let mut usage = StreamUsage::new(Api::ChatCompletions);
        usage.on_event(&SseEvent {
            event: b"",
            data: br#"ge":{"prompt_tokens":1}}"#,
            truncated: true,
        });
        assert_eq!((usage.summary().usage, usage.unparsed_events()), (None, 1));
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let stream = "data: {not json\n\n\
            data: {\"model\":\"m\",\"usage\":\"lots\"}\n\n\
            data: {\"usage\":{\"prompt_tokens\":-1}}\n\n";
        let u = run(Api::ChatCompletions, [stream.as_bytes()]);
        let s = u.summary();
        assert_eq!(u.unparsed_events(), 1);
        assert_eq!(s.usage, Some(Usage::default()));
        assert_eq!(s.anomalies, 2);
        assert_eq!(s.model.as_deref(), Some("m"));
    }

    #[test]
    fn usage_scan() {
        assert!(!may_carry_usage(br#"{"choices":[],"usage":null}"#));
        assert!(!may_carry_usage(br#"{"usage" : null , "x":1}"#));
        assert!(!may_carry_usage(br#"{"content":"\"usage\": 9"}"#));
        assert!(may_carry_usage(br#"{"usage":null,"b":{"usage":{"x":1}}}"#));
        assert!(may_carry_usage(br#"{"usage": {"prompt_tokens":1}}"#));
        assert!(!may_carry_usage(b"\"usage\""));
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_usage(cuts in prop::collection::vec(0usize..2000, 0..60)) {
            for (api, stream) in [
                (Api::ChatCompletions, CHAT_INCLUDE_USAGE),
                (Api::Messages, ANTHROPIC),
                (Api::Responses, RESPONSES_INCOMPLETE),
            ] {
                let whole = summary(api, stream);
                prop_assert!(whole.usage.is_some());
                let parts = split_at(stream.as_bytes(), cuts.clone());
                prop_assert_eq!(run(api, parts).summary(), whole);
            }
        }
    }

    #[test]
    fn every_single_split_position_gives_the_same_usage() {
        for (api, stream) in [
            (Api::ChatCompletions, CHAT_INCLUDE_USAGE),
            (Api::Messages, ANTHROPIC),
            (Api::Responses, RESPONSES_INCOMPLETE),
        ] {
            let whole = summary(api, stream);
            let bytes = stream.as_bytes();
            for cut in 0..=bytes.len() {
                let got = run(api, [&bytes[..cut], &bytes[cut..]]).summary();
                assert_eq!(got, whole, "{api:?} cut at {cut}");
            }
        }
    }
}
