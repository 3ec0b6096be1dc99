//! [`MeteringLayer`] and its builder: the configuration every metered request shares.

use std::fmt;
use std::sync::Arc;

use http::StatusCode;
use http::request::Parts;
use serde_json::{Map, Value};
use tower::Layer;

use crate::{
    Api, EventShape, EventSink, Metering, MeteringStats, MissingSubject, StdoutSink, Subject, SubjectChain,
};

type DataFieldsFn = dyn Fn(&Parts) -> Map<String, Value> + Send + Sync;

/// Settings shared, behind an `Arc`, by every clone of the layer and service.
pub(crate) struct Config {
    pub(crate) sink: Arc<dyn EventSink>,
    pub(crate) source: String,
    pub(crate) event_type: String,
    pub(crate) shape: EventShape,
    pub(crate) subject: SubjectChain,
    pub(crate) missing_subject: MissingSubject,
    pub(crate) max_subject_len: usize,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) max_sse_line: usize,
    pub(crate) max_decoded_stream: u64,
    pub(crate) ensure_stream_usage: bool,
    pub(crate) api_paths: Vec<(String, Api)>,
    pub(crate) meter_status: fn(StatusCode) -> bool,
    pub(crate) provider: Option<String>,
    pub(crate) data_fields: Option<Arc<DataFieldsFn>>,
    pub(crate) stats: MeteringStats,
}

impl Config {
    /// Whether `ensure_stream_usage` may rewrite requests to this API (OpenAI-style streams).
    pub(crate) fn may_inject_stream_usage(&self, api: Api) -> bool {
        self.ensure_stream_usage && matches!(api, Api::ChatCompletions | Api::Completions)
    }

    /// Whether a request body of this declared length is over the cap (then it is not read).
    pub(crate) fn over_request_cap(&self, declared: Option<u64>) -> bool {
        declared.is_some_and(|len| len > self.max_request_body as u64)
    }

    /// The API a request path belongs to, by suffix.
    pub(crate) fn api_for_path(&self, path: &str) -> Option<Api> {
        let path = path.strip_suffix('/').unwrap_or(path);
        self.api_paths
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix.as_str()))
            .map(|(_, api)| *api)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .field("event_type", &self.event_type)
            .field("shape", &self.shape)
            .field("subject", &self.subject)
            .field("missing_subject", &self.missing_subject)
            .field("max_subject_len", &self.max_subject_len)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("max_sse_line", &self.max_sse_line)
            .field("max_decoded_stream", &self.max_decoded_stream)
            .field("ensure_stream_usage", &self.ensure_stream_usage)
            .field("api_paths", &self.api_paths)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// A [`Layer`] that meters the token usage of LLM API responses and hands CloudEvents to an
/// [`EventSink`].
///
/// The request goes to the inner service at once; the body fields the layer needs (`user`,
/// `model`, `stream`) are read from a bounded copy taken as the inner service reads the body, so
/// a proxy streams the request upstream with no added latency. A service that answers without
/// reading the request body to its end gives the layer no body fields (the subject then comes
/// from the head sources or the fallback; counted in `request_unread`). Two settings need the
/// body before the inner service is called, and read it first (up to `max_request_body`):
/// [`ensure_stream_usage`](MeteringLayerBuilder::ensure_stream_usage), which rewrites it, and a
/// [`Subject::from_fn`](crate::Subject::from_fn) closure, which sees its fields.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::{convert::Infallible, time::Duration};
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{BodyExt, Full};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_openmeter::{MemorySink, MeteringLayer, RequestBody};
///
/// async fn chat(request: Request<RequestBody<Full<Bytes>>>) -> Result<Response<Full<Bytes>>, Infallible> {
///     let _prompt = request.into_body().collect().await?.to_bytes(); // a real handler reads it
///     let body = r#"{"id":"chatcmpl-1","model":"gpt-4o","usage":{"prompt_tokens":13,"completion_tokens":7}}"#;
///     Ok(Response::builder().header("content-type", "application/json").body(Full::from(body)).unwrap())
/// }
///
/// let sink = MemorySink::new();
/// let service = ServiceBuilder::new()
///     .layer(MeteringLayer::builder().sink(sink.clone()).source("my-gateway").build())
///     .service_fn(chat);
///
/// let request = Request::post("/v1/chat/completions")
///     .header("content-type", "application/json")
///     .body(Full::from(r#"{"model":"gpt-4o","user":"customer-1","messages":[]}"#))
///     .unwrap();
/// let response = service.oneshot(request).await.unwrap();
/// response.into_body().collect().await.unwrap();
///
/// let events = sink.wait_for(2, Duration::from_secs(1)).await.unwrap();
/// assert_eq!(events[0].subject.as_str(), "customer-1");
/// assert_eq!(events[0].data["type"], "input");
/// assert_eq!(events[0].data["tokens"], 13);
/// assert_eq!(events[1].data["type"], "output");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MeteringLayer {
    config: Arc<Config>,
}

impl MeteringLayer {
    /// A layer with default settings that sends events to `sink`.
    pub fn new(sink: impl EventSink) -> Self {
        Self::builder().sink(sink).build()
    }

    /// Starts configuring a layer.
    pub fn builder() -> MeteringLayerBuilder {
        MeteringLayerBuilder::default()
    }

    /// The counters shared by every service this layer makes.
    pub fn stats(&self) -> MeteringStats {
        self.config.stats.clone()
    }
}

impl<S> Layer<S> for MeteringLayer {
    type Service = Metering<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metering::from_config(inner, self.config.clone())
    }
}

/// Configures a [`MeteringLayer`]. Every setting has a default; see each method.
pub struct MeteringLayerBuilder {
    sink: Option<Arc<dyn EventSink>>,
    source: String,
    event_type: String,
    shape: EventShape,
    subject: SubjectChain,
    missing_subject: MissingSubject,
    max_subject_len: usize,
    max_request_body: usize,
    max_response_body: usize,
    max_sse_line: usize,
    max_decoded_stream: u64,
    ensure_stream_usage: bool,
    api_paths: Vec<(String, Api)>,
    meter_status: fn(StatusCode) -> bool,
    provider: Option<String>,
    data_fields: Option<Arc<DataFieldsFn>>,
}

impl Default for MeteringLayerBuilder {
    fn default() -> Self {
        MeteringLayerBuilder {
            sink: None,
            source: "tower-openmeter".into(),
            event_type: "prompt".into(),
            shape: EventShape::default(),
            subject: Subject::body_user(),
            missing_subject: MissingSubject::default(),
            max_subject_len: 256,
            max_request_body: 32 * 1024 * 1024,
            max_response_body: 4 * 1024 * 1024,
            max_sse_line: crate::sse::DEFAULT_MAX_LINE,
            max_decoded_stream: 256 * 1024 * 1024,
            ensure_stream_usage: false,
            api_paths: Api::ALL
                .iter()
                .map(|api| (api.path_suffix().to_owned(), *api))
                .collect(),
            meter_status: |status| status.is_success(),
            provider: None,
            data_fields: None,
        }
    }
}

impl MeteringLayerBuilder {
    /// Where events go (default: [`StdoutSink`]).
    pub fn sink(mut self, sink: impl EventSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// The CloudEvent `source`: your gateway's name (default `"tower-openmeter"`). OpenMeter
    /// deduplicates on `source` + `id`, so keep it constant across restarts and instances.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// The CloudEvent `type` a meter selects on (default `"prompt"`). Use `"litellm_tokens"`
    /// with [`EventShape::PerRequest`] to feed meters made for the Python proxy.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = event_type.into();
        self
    }

    /// How usage becomes events (default [`EventShape::PerTokenType`]).
    pub fn event_shape(mut self, shape: EventShape) -> Self {
        self.shape = shape;
        self
    }

    /// Where the subject comes from (default: the body `user` field only, which the client
    /// chooses; see [`Subject`] for the trust model).
    pub fn subject(mut self, chain: SubjectChain) -> Self {
        self.subject = chain;
        self
    }

    /// What to do when no subject is found (default: bill `"unknown"`).
    pub fn missing_subject(mut self, policy: MissingSubject) -> Self {
        self.missing_subject = policy;
        self
    }

    /// The longest subject accepted, in bytes (default 256); longer values count as missing.
    pub fn max_subject_len(mut self, bytes: usize) -> Self {
        self.max_subject_len = bytes;
        self
    }

    /// How much of a request body is kept to read `user`, `model` and `stream` (default
    /// 32 MiB): a copy sharing the frames the inner service reads, or, when the body must be
    /// read first, the buffered body. A larger body is still passed on whole, with its fields
    /// unread (counted in `request_over_cap`).
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// How much of a JSON response is kept to read its usage (default 4 MiB). A larger
    /// response is passed on whole and counted as over the cap.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// The longest SSE line (and the largest joined `data` of one SSE event) read from a
    /// streamed response (default 1 MiB). Longer lines are skipped and counted in
    /// `sse_lines_too_long`; the client still gets every byte. Memory per stream is bounded by
    /// about twice this value. Of a longer `data:` line the last 64 KiB are still searched for
    /// a usage object, so the Responses API's `response.completed` event, which repeats the
    /// whole output on one line, is metered however long the output.
    pub fn max_sse_line(mut self, bytes: usize) -> Self {
        self.max_sse_line = bytes;
        self
    }

    /// How many decoded bytes of a compressed (`gzip`, `deflate`) event stream are inspected
    /// (default 256 MiB); past it, decoding stops, the usage seen so far is kept, and
    /// `decode_failed` is counted. This bounds the CPU a compression bomb can take. Compressed
    /// JSON responses are decoded up to [`max_response_body`](Self::max_response_body).
    pub fn max_decoded_stream(mut self, bytes: u64) -> Self {
        self.max_decoded_stream = bytes;
        self
    }

    /// Makes streamed chat.completions and completions requests report their usage (default
    /// off).
    ///
    /// OpenAI-style streams carry usage only when the request sets
    /// `stream_options.include_usage`; without it a streamed request cannot be billed. When on,
    /// a streaming request that did not ask for usage is rewritten to set it (the rest of the
    /// body is kept byte for byte, `Content-Length` is fixed), and the response is filtered so
    /// the client sees the stream it asked for: the usage-only chunk is removed, and so is the
    /// `"usage":null` member OpenAI adds to every other chunk. For OpenAI's own output the client
    /// gets exactly the bytes it would have got without the rewrite; the response loses its
    /// `Content-Length` (the length changes). A compressed response cannot be filtered: it is
    /// passed unchanged, usage chunk included, and counted in `usage_chunks_unfiltered`.
    /// Requests that set `include_usage` themselves are never touched.
    pub fn ensure_stream_usage(mut self, on: bool) -> Self {
        self.ensure_stream_usage = on;
        self
    }

    /// Replaces the path suffixes that identify each API (default: `/chat/completions`,
    /// `/completions`, `/embeddings`, `/responses`, `/messages`). The first matching suffix
    /// wins, so list longer suffixes first.
    pub fn api_paths<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = (P, Api)>,
        P: Into<String>,
    {
        self.api_paths = paths.into_iter().map(|(p, api)| (p.into(), api)).collect();
        self
    }

    /// Which response statuses are metered (default: 2xx only).
    pub fn meter_status(mut self, predicate: fn(StatusCode) -> bool) -> Self {
        self.meter_status = predicate;
        self
    }

    /// The `provider` dimension of every event (default: `"openai"` or `"anthropic"` by API).
    pub fn provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// Extra data fields taken from the request head, e.g. a tenant or region, added to every
    /// event of the request. They never override the fields meters rely on (`tokens`, `type`,
    /// `model`, ...), and `null` values are left out.
    pub fn data_fields<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Map<String, Value> + Send + Sync + 'static,
    {
        self.data_fields = Some(Arc::new(f));
        self
    }

    /// Makes the layer.
    pub fn build(self) -> MeteringLayer {
        let sink = self.sink.unwrap_or_else(|| Arc::new(StdoutSink::new()));
        MeteringLayer {
            config: Arc::new(Config {
                sink,
                source: self.source,
                event_type: self.event_type,
                shape: self.shape,
                subject: self.subject,
                missing_subject: self.missing_subject,
                max_subject_len: self.max_subject_len,
                max_request_body: self.max_request_body,
                max_response_body: self.max_response_body,
                max_sse_line: self.max_sse_line,
                max_decoded_stream: self.max_decoded_stream,
                ensure_stream_usage: self.ensure_stream_usage,
                api_paths: self.api_paths,
                meter_status: self.meter_status,
                provider: self.provider,
                data_fields: self.data_fields,
                stats: MeteringStats::default(),
            }),
        }
    }
}

impl fmt::Debug for MeteringLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteringLayerBuilder")
            .field("source", &self.source)
            .field("event_type", &self.event_type)
            .field("shape", &self.shape)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}
