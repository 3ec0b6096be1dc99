//! Hostile input through the parsers and the whole layer: deep JSON, numbers beyond `u64`,
//! invalid UTF-8, a 10 MB `user`, control characters in headers, a huge response, a line that
//! never ends. Nothing panics, responses pass byte-identical, memory stays bounded, and every
//! oddity is counted. The parser cases are the fuzz targets' entry points (`fuzz/`), also run
//! here as property tests, together with the inputs the fuzzers found (`tests/fuzz_regressions`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{ServiceExt, service_fn};
use tower_openmeter::__fuzz;
use tower_openmeter::{MemorySink, MeteringLayer, RequestBody, Subject};

const CHAT: &str =
    r#"{"id":"chatcmpl-1","model":"gpt-4o","usage":{"prompt_tokens":12,"completion_tokens":3}}"#;

/// Runs one request through a metered service whose upstream answers with `response`, and
/// returns the response body's length plus the sink and layer for inspection.
async fn through_layer<B>(
    layer: &MeteringLayer,
    request: Request<Full<Bytes>>,
    response: impl FnOnce() -> Response<B> + Send + 'static,
) -> (u64, Bytes)
where
    B: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static,
{
    let seen = Arc::new(std::sync::Mutex::new(Bytes::new()));
    let seen_inner = Arc::clone(&seen);
    let response = Arc::new(std::sync::Mutex::new(Some(response)));
    let inner = service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let seen = Arc::clone(&seen_inner);
        let make = response.lock().unwrap().take().expect("called once");
        async move {
            let body = match request.into_body().collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            *seen.lock().unwrap() = body;
            Ok::<_, Infallible>(make())
        }
    });
    let service = tower::Layer::layer(layer, inner);
    let response = service.oneshot(request).await.unwrap();
    let mut body = response.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len() as u64;
        }
    }
    let received = seen.lock().unwrap().clone();
    (len, received)
}

fn post(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

fn json(body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn layer(sink: &MemorySink) -> MeteringLayer {
    MeteringLayer::builder()
        .sink(sink.clone())
        .source("test")
        .subject(Subject::header("x-customer").or_body_user())
        .build()
}

fn nested(depth: usize) -> String {
    let mut s = String::with_capacity(depth * 8 + 16);
    for _ in 0..depth {
        s.push_str(r#"{"a":["#);
    }
    for _ in 0..depth {
        s.push_str("]}");
    }
    s
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    for depth in [127, 128, 129, 10_000, 200_000] {
        let deep = nested(depth);
        __fuzz::request_fields(deep.as_bytes());
        __fuzz::json_response(deep.as_bytes());
        __fuzz::usage_json(deep.as_bytes());
        let in_usage = format!(r#"{{"usage":{{"prompt_tokens":1,"x":{deep}}},"user":{deep}}}"#);
        __fuzz::json_response(in_usage.as_bytes());
        __fuzz::request_fields(in_usage.as_bytes());
        let brackets = "[".repeat(depth);
        __fuzz::json_response(brackets.as_bytes());
        if depth >= 10_000 {
            // Nesting under an unknown member is skipped; under `user`, the body is an error.
            let skipped = __fuzz::request_fields(deep.as_bytes()).expect("unknown members are skipped");
            assert_eq!((skipped.user, skipped.model), (None, None), "{depth}");
            assert!(
                __fuzz::request_fields(in_usage.as_bytes()).is_none(),
                "{depth}: an error"
            );
        }
    }
}

#[tokio::test]
async fn deeply_nested_bodies_pass_through_the_layer() {
    let sink = MemorySink::new();
    let layer = layer(&sink);
    let deep = nested(100_000);
    let request = post("/v1/chat/completions", deep.clone());
    let (_, received) = through_layer(&layer, request, || json(CHAT)).await;
    assert_eq!(received, deep.as_bytes(), "the inner service gets the same bytes");
    // Unreadable body: no subject from `user`, so the fallback subject is billed.
    assert_eq!(sink.events()[0].subject.as_str(), "unknown");

    let deep: &'static str = Box::leak(nested(100_000).into_boxed_str());
    let (len, _) = through_layer(&layer, post("/v1/chat/completions", "{}"), move || json(deep)).await;
    assert_eq!(len, deep.len() as u64);
    // serde_json skips unknown members without recursion, so this reads as "no usage".
    let stats = layer.stats().snapshot();
    assert_eq!(
        (stats.skipped_no_usage, stats.unparsed_response),
        (1, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn numbers_beyond_u64_are_zeroed_and_counted() {
    for usage in [
        r#"{"prompt_tokens":18446744073709551616,"completion_tokens":3}"#,
        r#"{"prompt_tokens":-1,"completion_tokens":3}"#,
        r#"{"prompt_tokens":1.5,"completion_tokens":3}"#,
        r#"{"prompt_tokens":"12","completion_tokens":3}"#,
        r#"{"prompt_tokens":99999999999999999999999999999999999999999999999999,"completion_tokens":3}"#,
    ] {
        __fuzz::usage_json(usage.as_bytes());
        let body: &'static str = Box::leak(format!(r#"{{"model":"m","usage":{usage}}}"#).into_boxed_str());
        __fuzz::json_response(body.as_bytes());
        let sink = MemorySink::new();
        let layer = layer(&sink);
        through_layer(&layer, post("/v1/chat/completions", "{}"), move || json(body)).await;
        let events = sink.events();
        assert_eq!(events.len(), 1, "{usage}: only the output event is non-zero");
        assert_eq!(events[0].data["tokens"], 3);
        assert_eq!(layer.stats().snapshot().usage_anomalies, 1, "{usage}");
    }
    // A float beyond f64 makes the whole body invalid JSON for serde_json: counted, no event.
    let body = r#"{"model":"m","usage":{"prompt_tokens":1e400,"completion_tokens":3}}"#;
    __fuzz::json_response(body.as_bytes());
    let sink = MemorySink::new();
    let layer = layer(&sink);
    through_layer(&layer, post("/v1/chat/completions", "{}"), move || json(body)).await;
    assert!(sink.events().is_empty());
    assert_eq!(layer.stats().snapshot().unparsed_response, 1);
    // The largest u64 passes through exactly, and totals saturate instead of overflowing.
    let max = r#"{"input_tokens":18446744073709551615,"output_tokens":18446744073709551615,"cache_read_input_tokens":18446744073709551615}"#;
    __fuzz::usage_json(max.as_bytes());
    let body: &'static str = Box::leak(format!(r#"{{"model":"m","usage":{max}}}"#).into_boxed_str());
    let sink = MemorySink::new();
    let layer = crate::layer(&sink);
    through_layer(&layer, post("/v1/messages", "{}"), move || json(body)).await;
    let events = sink.events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|e| e.data["tokens"] == u64::MAX), "{events:?}");
    assert_eq!(layer.stats().snapshot().usage_anomalies, 0);
}

/// Found by the `include_usage` fuzz target: a repeated member made the request "not JSON" to
/// the field reader (derive(Deserialize) refuses duplicates), so a client could move its usage
/// to the fallback subject by repeating a key. Members are now read last-wins, as upstreams do.
#[tokio::test]
async fn duplicate_members_are_read_last_wins_like_the_upstream() {
    let sink = MemorySink::new();
    let layer = layer(&sink);
    let request = post(
        "/v1/chat/completions",
        r#"{"user":"first","model":"m","user":"customer-7","stream":false,"stream":false}"#,
    );
    let body =
        r#"{"usage":{"prompt_tokens":1},"model":"m","usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
    through_layer(&layer, request, move || json(body)).await;
    let events = sink.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e.subject.as_str() == "customer-7"));
    assert_eq!(events[0].data["tokens"], 12);
    assert_eq!(layer.stats().snapshot().request_invalid_json, 0);
}

#[tokio::test]
async fn invalid_utf8_passes_byte_identical() {
    let sink = MemorySink::new();
    let layer = layer(&sink);
    let garbage: &'static [u8] = b"{\"user\":\"\xff\xfe\xc0\x80\",\"model\":\"\xed\xa0\x80\"}";
    __fuzz::request_fields(garbage);
    __fuzz::json_response(garbage);
    let (_, received) = through_layer(
        &layer,
        post("/v1/chat/completions", Bytes::from_static(garbage)),
        || {
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(b"\xff\xff{\"usage\":")))
                .unwrap()
        },
    )
    .await;
    assert_eq!(received, garbage);
    assert_eq!(layer.stats().snapshot().unparsed_response, 1);
    assert!(sink.events().is_empty(), "an unreadable response bills nothing");
}

#[tokio::test]
async fn a_user_of_10_mb_is_not_a_subject_and_the_body_is_unchanged() {
    let sink = MemorySink::new();
    let layer = layer(&sink);
    let user = "u".repeat(10 * 1024 * 1024);
    let body = Bytes::from(format!(r#"{{"model":"gpt-4o","user":"{user}"}}"#));
    let (_, received) =
        through_layer(&layer, post("/v1/chat/completions", body.clone()), || json(CHAT)).await;
    assert_eq!(received, body);
    let events = sink.events();
    assert_eq!(
        events[0].subject.as_str(),
        "unknown",
        "over max_subject_len: fallback"
    );
    assert!(__fuzz::subject(b"", &body).is_none());
}

#[tokio::test]
async fn control_characters_in_headers_never_become_subjects_that_break_json() {
    // `http` refuses most control characters in a header value; tab and obs-text get through.
    for raw in [
        b"\tcust\t".as_slice(),
        b"cust\x7f",
        b"\xff\xfe",
        b"c\x01d",
        b"c\r\nx-injected: 1",
    ] {
        let subject = __fuzz::subject(raw, br#"{"user":"body-user"}"#);
        if let Some(subject) = &subject {
            let json = serde_json::to_string(subject).unwrap();
            assert!(!json.contains('\n') && !json.contains('\r'), "{json}");
        }
        let Ok(value) = http::HeaderValue::from_bytes(raw) else {
            continue;
        };
        let sink = MemorySink::new();
        let layer = layer(&sink);
        let mut request = post("/v1/chat/completions", r#"{"user":"body-user"}"#);
        request.headers_mut().insert("x-customer", value);
        through_layer(&layer, request, || json(CHAT)).await;
        let event = &sink.events()[0];
        // An unreadable (non-UTF-8) header falls through to the body `user`.
        let expected = subject
            .map(|s| s.as_str().to_owned())
            .unwrap_or("body-user".into());
        assert_eq!(event.subject.as_str(), expected);
        let line = serde_json::to_string(event).unwrap();
        assert!(
            line.bytes().all(|b| b >= 0x20),
            "the event JSON escapes every control byte"
        );
    }
}

/// A lazily generated body of `total` bytes in chunks of `chunk` bytes, each an owned buffer
/// whose drop is counted, so the test sees how many the layer keeps alive at once.
struct Huge {
    left: u64,
    chunk: usize,
    first: Option<Bytes>,
    tracker: Arc<Tracker>,
    fill: u8,
}

#[derive(Default)]
struct Tracker {
    live: AtomicUsize,
    peak_live: AtomicUsize,
    made: AtomicU64,
}

struct Tracked(Arc<Tracker>, Vec<u8>);

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.1
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Huge {
    fn new(total: u64, chunk: usize, first: &'static [u8], fill: u8) -> (Self, Arc<Tracker>) {
        let tracker = Arc::new(Tracker::default());
        let huge = Huge {
            left: total,
            chunk,
            first: Some(Bytes::from_static(first)),
            tracker: Arc::clone(&tracker),
            fill,
        };
        (huge, tracker)
    }
}

impl Body for Huge {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            self.left = self.left.saturating_sub(first.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = (self.chunk as u64).min(self.left) as usize;
        self.left -= n as u64;
        let tracker = &self.tracker;
        let live = tracker.live.fetch_add(1, Ordering::Relaxed) + 1;
        tracker.peak_live.fetch_max(live, Ordering::Relaxed);
        tracker.made.fetch_add(1, Ordering::Relaxed);
        let chunk = Tracked(Arc::clone(tracker), vec![self.fill; n]);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left + self.first.as_ref().map_or(0, |f| f.len() as u64))
    }
}

/// 1 GiB in release; 256 MiB in debug builds, to keep the test under ~20 s there.
fn huge_size() -> u64 {
    if cfg!(debug_assertions) {
        256 << 20
    } else {
        1 << 30
    }
}

#[tokio::test]
async fn a_huge_json_response_streams_with_bounded_memory() {
    let sink = MemorySink::new();
    let cap = 4 * 1024 * 1024;
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .max_response_body(cap)
        .build();
    let chunk = 256 * 1024;
    let total = huge_size();
    let (body, tracker) = Huge::new(total, chunk, br#"{"usage":{"prompt_tokens":1},"pad":""#, b' ');
    let started = Instant::now();
    let (len, _) = through_layer(&layer, post("/v1/chat/completions", "{}"), move || {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap()
    })
    .await;
    assert_eq!(len, total);
    let peak = tracker.peak_live.load(Ordering::Relaxed);
    assert!(
        peak <= cap / chunk + 2,
        "the layer kept {peak} chunks of {chunk} bytes alive (cap {cap})"
    );
    assert_eq!(
        tracker.live.load(Ordering::Relaxed),
        0,
        "every chunk was released"
    );
    assert_eq!(layer.stats().snapshot().response_over_cap, 1);
    eprintln!("{total} bytes through the layer in {:?}", started.elapsed());
}

#[tokio::test]
async fn an_event_stream_that_never_ends_a_line_stays_bounded() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder().sink(sink.clone()).build();
    let chunk = 64 * 1024;
    let total = huge_size() / 4;
    let (body, tracker) = Huge::new(total, chunk, b"data: {\"usage\":", b'x');
    let (len, _) = through_layer(
        &layer,
        post(
            "/v1/chat/completions",
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        move || {
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(body)
                .unwrap()
        },
    )
    .await;
    assert_eq!(len, total);
    let peak = tracker.peak_live.load(Ordering::Relaxed);
    assert!(peak <= 4, "a line that never ends keeps no chunk alive ({peak})");
    assert_eq!(tracker.live.load(Ordering::Relaxed), 0);
    // The endless line is skipped and counted; the stream ended without usage, so it is billed
    // once as missing, never with made-up tokens.
    let stats = layer.stats().snapshot();
    assert_eq!(
        (stats.sse_lines_too_long, stats.usage_missing),
        (1, 1),
        "{stats:?}"
    );
    let events = sink.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].data["tokens"], 0);
    assert_eq!(events[0].data["usage_source"], "missing");
}

/// Inputs the fuzzers found, kept as regression tests: `tests/fuzz_regressions/<target>/*`.
#[test]
fn fuzz_regressions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let Ok(targets) = std::fs::read_dir(&root) else {
        return;
    };
    for target in targets.flatten() {
        let name = target.file_name().to_string_lossy().into_owned();
        for input in std::fs::read_dir(target.path()).unwrap().flatten() {
            let data = std::fs::read(input.path()).unwrap();
            run_target(&name, &data);
        }
    }
}

const ALL_TARGETS: [&str; 6] = [
    "request_fields",
    "json_response",
    "usage_json",
    "sse_stream",
    "include_usage",
    "usage_filter",
];

fn run_target(name: &str, data: &[u8]) {
    match name {
        "request_fields" => {
            let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
            let (header, body) = data.split_at(split);
            __fuzz::request_fields(data);
            __fuzz::request_fields(body);
            __fuzz::subject(header, body);
        }
        "json_response" => __fuzz::json_response(data),
        "usage_json" => __fuzz::usage_json(data),
        "sse_stream" => __fuzz::sse_stream(data),
        "include_usage" => __fuzz::include_usage_rewrite(data),
        "usage_filter" => __fuzz::usage_filter(data),
        other => panic!("no fuzz target {other}"),
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        let key = prop_oneof![
            Just("prompt_tokens".to_owned()),
            Just("completion_tokens".to_owned()),
            Just("input_tokens".to_owned()),
            Just("output_tokens".to_owned()),
            Just("cached_tokens".to_owned()),
            Just("cache_read_input_tokens".to_owned()),
            Just("cache_creation_input_tokens".to_owned()),
            Just("prompt_tokens_details".to_owned()),
            Just("input_tokens_details".to_owned()),
            Just("completion_tokens_details".to_owned()),
            Just("reasoning_tokens".to_owned()),
            Just("audio_tokens".to_owned()),
            Just("usage".to_owned()),
            Just("model".to_owned()),
            Just("user".to_owned()),
            Just("id".to_owned()),
            ".{0,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        for target in ALL_TARGETS {
            run_target(target, &data);
        }
    }

    #[test]
    fn arbitrary_json_never_panics_and_partitions(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        for target in ALL_TARGETS {
            run_target(target, &bytes);
        }
        let wrapped = serde_json::to_vec(&serde_json::json!({"model": "m", "usage": value})).unwrap();
        __fuzz::json_response(&wrapped);
    }

    /// Event streams made of SSE-looking lines, cut anywhere.
    #[test]
    fn arbitrary_event_streams_never_panic(
        lines in prop::collection::vec(
            prop_oneof![
                Just("data: [DONE]".to_owned()),
                Just(String::new()),
                Just("event: message_delta".to_owned()),
                Just(r#"data: {"usage":{"prompt_tokens":5,"completion_tokens":2}}"#.to_owned()),
                Just(r#"data: {"type":"message_delta","usage":{"output_tokens":9}}"#.to_owned()),
                Just(r#"data: {"type":"response.completed","response":{"usage":{"input_tokens":3}}}"#.to_owned()),
                Just(r#"data: {"choices":[],"usage":null}"#.to_owned()),
                ".{0,300}".prop_map(|s| format!("data: {s}")),
                ": comment".prop_map(|s| s),
            ],
            0..12,
        ),
        endings in prop::collection::vec(prop_oneof![Just("\n"), Just("\r\n"), Just("\r")], 1..4),
        sizes in prop::collection::vec(any::<u8>(), 4),
    ) {
        let mut body = sizes.clone();
        for (i, line) in lines.iter().enumerate() {
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(endings[i % endings.len()].as_bytes());
        }
        __fuzz::sse_stream(&body);
        __fuzz::usage_filter(&body);
    }

    #[test]
    fn arbitrary_headers_never_panic(header in prop::collection::vec(any::<u8>(), 0..64), user in ".{0,16}") {
        let body = serde_json::to_vec(&serde_json::json!({"user": user})).unwrap();
        __fuzz::subject(&header, &body);
    }
}
