//! Fixtures shared by the benchmarks: canned LLM responses, a frame-by-frame body, a sink that
//! drops events, and the same `service_fn` with and without the layer.
#![allow(dead_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tower::Service;
use tower::ServiceBuilder;
use tower_openmeter::{CloudEvent, EventSink, MeteredBody, MeteringLayer, MeteringStats};

/// Bytes that live for the whole run, so cloning them per request costs no allocation.
fn leak(bytes: Vec<u8>) -> Bytes {
    Bytes::from_static(Box::leak(bytes.into_boxed_slice()))
}

/// A canned response: its content type and the frames it is sent in.
#[derive(Clone)]
pub struct Fixture {
    pub path: &'static str,
    pub request: Bytes,
    pub content_type: &'static str,
    pub frames: Arc<[Bytes]>,
    pub len: usize,
    /// Hand out each frame as a fresh allocation, as hyper does, so memory held is measurable.
    pub copy_frames: bool,
}

impl Fixture {
    fn new(path: &'static str, request: &str, content_type: &'static str, frames: Vec<Bytes>) -> Self {
        let len = frames.iter().map(Bytes::len).sum();
        Fixture {
            path,
            request: leak(request.as_bytes().to_vec()),
            content_type,
            frames: frames.into(),
            len,
            copy_frames: false,
        }
    }

    pub fn request(&self) -> Request<Full<Bytes>> {
        Request::post(self.path)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(self.request.clone()))
            .unwrap()
    }
}

const CHAT_REQUEST: &str = r#"{"model":"gpt-4o","user":"customer-1","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Hello, how are you today?"}],"temperature":0.7}"#;
const STREAM_REQUEST: &str = r#"{"model":"gpt-4o","user":"customer-1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}"#;
const EMBEDDINGS_REQUEST: &str =
    r#"{"model":"text-embedding-3-small","user":"customer-1","input":"The food was delicious."}"#;

/// Splits a JSON body into frames of at most 16 KiB, as hyper hands a large body on.
fn json_frames(body: String) -> Vec<Bytes> {
    let body = leak(body.into_bytes());
    (0..body.len())
        .step_by(16 * 1024)
        .map(|start| body.slice(start..(start + 16 * 1024).min(body.len())))
        .collect()
}

/// A chat completion whose total size is about `size` bytes (the content is padded).
pub fn chat_completion(size: usize) -> Fixture {
    let head = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    let tail = r#"","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let words = "The quick brown fox jumps over the lazy dog. \\\"Quoted\\\" text\\n. ";
    let content: String = words.chars().cycle().take(pad).collect();
    // Never end inside an escape.
    let content = content.trim_end_matches('\\');
    let body = format!("{head}{content}{tail}");
    Fixture::new(
        "/v1/chat/completions",
        CHAT_REQUEST,
        "application/json",
        json_frames(body),
    )
}

/// A chat completion of `size` bytes built frame by frame, so that building it never holds
/// more than the frames plus one (for peak-memory measurements).
pub fn large_chat_completion(size: usize) -> Fixture {
    const FRAME: usize = 16 * 1024;
    let head = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    let tail = r#""},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2000000}}"#;
    let mut frames = vec![leak(head.as_bytes().to_vec())];
    let mut left = size.saturating_sub(head.len() + tail.len());
    while left > 0 {
        let n = left.min(FRAME);
        frames.push(leak(vec![b'a'; n]));
        left -= n;
    }
    frames.push(leak(tail.as_bytes().to_vec()));
    let mut fixture = Fixture::new("/v1/chat/completions", CHAT_REQUEST, "application/json", frames);
    fixture.copy_frames = true;
    fixture
}

/// An embeddings response with `dims` floats.
pub fn embeddings(dims: usize) -> Fixture {
    let mut floats = String::new();
    for i in 0..dims {
        if i > 0 {
            floats.push(',');
        }
        let x = ((i as f64) * 0.618_033_988_7).sin() * 0.05;
        floats.push_str(&format!("{x:.9}"));
    }
    let body = format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{floats}]}}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":5,"total_tokens":5}}}}"#
    );
    Fixture::new(
        "/v1/embeddings",
        EMBEDDINGS_REQUEST,
        "application/json",
        json_frames(body),
    )
}

/// A chat completion stream of `chunks` content deltas, then the usage chunk and `[DONE]`; one
/// SSE event per frame, as an upstream flushes them.
pub fn sse_stream(chunks: usize) -> Fixture {
    let mut frames = Vec::with_capacity(chunks + 3);
    frames.push(leak(
        br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

"#
        .to_vec(),
    ));
    for i in 0..chunks {
        frames.push(leak(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ).into_bytes()));
    }
    frames.push(leak(
        br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1000,"total_tokens":1009,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

"#
        .to_vec(),
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Fixture::new(
        "/v1/chat/completions",
        STREAM_REQUEST,
        "text/event-stream",
        frames,
    )
}

/// A body that yields its frames one per poll; `is_end_stream` once the last is out. Without a
/// declared length for streams, with an exact one for JSON.
pub struct Frames {
    frames: Arc<[Bytes]>,
    next: usize,
    exact: bool,
    copy: bool,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let frame = this.frames.get(this.next).map(|f| {
            if this.copy {
                Bytes::copy_from_slice(f)
            } else {
                f.clone()
            }
        });
        this.next += 1;
        Poll::Ready(frame.map(|f| Ok(Frame::data(f))))
    }

    fn is_end_stream(&self) -> bool {
        self.exact && self.next >= self.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.frames.iter().skip(self.next).map(|f| f.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

/// A sink that counts and drops events (the real sink only queues them).
#[derive(Clone, Default)]
pub struct NullSink(pub Arc<AtomicU64>);

impl EventSink for NullSink {
    fn send(&self, event: CloudEvent) {
        std::hint::black_box(event);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The upstream: reads the request body, answers with the fixture's frames.
pub async fn upstream<B>(fixture: Fixture, request: Request<B>) -> Result<Response<Frames>, Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let body = request.into_body().collect().await.unwrap().to_bytes();
    std::hint::black_box(body);
    let exact = fixture.content_type != "text/event-stream";
    let body = Frames {
        frames: fixture.frames.clone(),
        next: 0,
        exact,
        copy: fixture.copy_frames,
    };
    Ok(Response::builder()
        .header(CONTENT_TYPE, fixture.content_type)
        .body(body)
        .unwrap())
}

/// The upstream as a tower service for request bodies of type `B`.
pub fn service<B>(
    fixture: &Fixture,
) -> impl Service<Request<B>, Response = Response<Frames>, Error = Infallible, Future: Send> + Clone + Send + 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let fixture = fixture.clone();
    tower::service_fn(move |request: Request<B>| upstream(fixture.clone(), request))
}

/// The layer as a user would configure it, with events counted and dropped.
pub fn layer() -> (MeteringLayer, NullSink, MeteringStats) {
    let sink = NullSink::default();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("bench-gateway")
        .build();
    let stats = layer.stats();
    (layer, sink, stats)
}

/// Collects a response body to the end, returning its length.
pub async fn drain<B: Body<Data = Bytes> + Unpin>(mut body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len();
        }
    }
    len
}

/// The upstream behind the layer.
pub fn with_layer(
    fixture: &Fixture,
    layer: &MeteringLayer,
) -> impl Service<Request<Full<Bytes>>, Response = Response<MeteredBody<Frames>>, Error = Infallible> + Clone
{
    ServiceBuilder::new()
        .layer(layer.clone())
        .service(service(fixture))
}

/// The same upstream alone.
pub fn without_layer(
    fixture: &Fixture,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Frames>, Error = Infallible> + Clone {
    service(fixture)
}
