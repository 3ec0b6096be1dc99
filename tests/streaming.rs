//! Streamed (SSE) and compressed responses through the layer end to end: a real axum app on
//! 127.0.0.1 behind the layer, a real HTTP client, the bytes the client gets and the events
//! that reach the sink.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::Value;
use support::test_support::gzip;
use support::upstream::{ChannelBody, Received, client, post_json, serve};
use tower_openmeter::{CloudEvent, MemorySink, MeteringLayer};

const CHAT_HEAD: &str = r#"{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1741000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":"#;

/// One OpenAI chat chunk, as the API sends it with (`"usage":null`) or without `include_usage`.
fn chat_chunk(choices: &str, include_usage: bool) -> String {
    let usage = if include_usage { r#","usage":null"# } else { "" };
    format!("data: {CHAT_HEAD}{choices}{usage}}}\n\n")
}

const USAGE_CHUNK: &str = r#"data: {"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1741000000,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","choices":[],"usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":16,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

"#;

/// A chat stream as OpenAI sends it, with or without `include_usage`.
fn chat_stream(include_usage: bool) -> String {
    let mut s = String::new();
    for choices in [
        r#"[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]"#,
        r#"[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]"#,
        r#"[{"index":0,"delta":{"content":"lo \u00e9"},"logprobs":null,"finish_reason":null}]"#,
        r#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]"#,
    ] {
        s.push_str(&chat_chunk(choices, include_usage));
    }
    if include_usage {
        s.push_str(USAGE_CHUNK);
    }
    s.push_str("data: [DONE]\n\n");
    s
}

const ANTHROPIC: &str = concat!(
    "event: message_start\r\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01X\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":1500,\"cache_read_input_tokens\":4000,\"output_tokens\":1}}}\r\n\r\n",
    "event: ping\r\n",
    "data: {\"type\": \"ping\"}\r\n\r\n",
    "event: content_block_delta\r\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\r\n\r\n",
    "event: message_delta\r\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"pause_turn\"},\"usage\":{\"output_tokens\":45}}\r\n\r\n",
    "event: message_delta\r\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":90}}\r\n\r\n",
    "event: message_stop\r\n",
    "data: {\"type\":\"message_stop\"}\r\n\r\n",
);

const RESPONSES: &str = concat!(
    "event: response.created\n",
    "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1\",\"output\":[],\"usage\":null}}\n\n",
    ": keep-alive\n\n",
    "event: response.output_text.delta\n",
    "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello\"}\n\n",
    "event: response.incomplete\n",
    "data: {\"type\":\"response.incomplete\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"incomplete\",\"model\":\"gpt-4.1\",\"output\":[],\"usage\":{\"input_tokens\":300,\"input_tokens_details\":{\"cached_tokens\":128},\"output_tokens\":50,\"output_tokens_details\":{\"reasoning_tokens\":20},\"total_tokens\":350}}}\n\n",
);

const CHAT_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":16}}}"#;

/// A body of small frames with no size hint (so hyper uses chunked encoding, like an SSE
/// upstream), optionally produced lazily.
struct Frames {
    queue: VecDeque<Bytes>,
    more: Option<Box<dyn FnMut() -> Option<Bytes> + Send>>,
}

impl Frames {
    fn new(bytes: &[u8], frame: usize) -> Self {
        Frames {
            queue: bytes.chunks(frame).map(Bytes::copy_from_slice).collect(),
            more: None,
        }
    }
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let next = match this.queue.pop_front() {
            Some(bytes) => Some(bytes),
            None => this.more.as_mut().and_then(|more| more()),
        };
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }
}

fn response(body: Body, content_type: &str, gzip: bool) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

async fn send(base: &str, path: &str, body: &str) -> (axum::http::HeaderMap, Bytes) {
    let (status, headers, bytes) = post_json(base, path, body).await;
    assert!(status.is_success(), "{status}");
    (headers, bytes)
}

/// `type` → `tokens` of a request's events.
fn tokens(events: &[CloudEvent]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e.data["type"].as_str().unwrap().to_owned(),
                e.data["tokens"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

const CHAT_TOKENS: [(&str, u64); 3] = [("input", 56), ("cache_read", 64), ("output", 40)];

/// An upstream chat API that answers as OpenAI does: with usage when the request asks for it.
fn chat_upstream(received: Received) -> Router {
    Router::new().route(
        "/v1/chat/completions",
        post(move |request: Request| {
            let received = received.clone();
            async move {
                let bytes = request.into_body().collect().await.unwrap().to_bytes();
                received.push(bytes.clone());
                let json: Value = serde_json::from_slice(&bytes).unwrap();
                let include = json["stream_options"]["include_usage"] == Value::Bool(true);
                let stream = chat_stream(include);
                response(
                    Body::new(Frames::new(stream.as_bytes(), 7)),
                    "text/event-stream",
                    false,
                )
            }
        }),
    )
}

#[tokio::test]
async fn sse_streams_reach_the_client_byte_identical_and_are_metered() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder().sink(sink.clone()).build();
    let stats = layer.stats();
    let app = Router::new()
        .route(
            "/v1/messages",
            post(|| async {
                response(
                    Body::new(Frames::new(ANTHROPIC.as_bytes(), 5)),
                    "text/event-stream",
                    false,
                )
            }),
        )
        .route(
            "/v1/responses",
            post(|| async {
                response(
                    Body::new(Frames::new(RESPONSES.as_bytes(), 3)),
                    "text/event-stream; charset=utf-8",
                    false,
                )
            }),
        )
        .merge(chat_upstream(Received::default()))
        .layer(layer);
    let base = serve(app).await;

    let chat = chat_stream(true);
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<(String, u64)>);
    let cases: [Case<'_>; 3] = [
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","user":"c1","stream":true,"stream_options":{"include_usage":true}}"#,
            &chat,
            pairs(&CHAT_TOKENS),
        ),
        (
            "/v1/messages",
            r#"{"model":"claude","user":"c1","stream":true}"#,
            ANTHROPIC,
            pairs(&[
                ("input", 20),
                ("cache_read", 4000),
                ("cache_write", 1500),
                ("output", 90),
            ]),
        ),
        (
            "/v1/responses",
            r#"{"model":"gpt-4.1","user":"c1","stream":true}"#,
            RESPONSES,
            pairs(&[("input", 172), ("cache_read", 128), ("output", 50)]),
        ),
    ];
    for (path, request, upstream_bytes, expected) in cases {
        let (_, bytes) = send(&base, path, request).await;
        assert_eq!(
            bytes,
            upstream_bytes.as_bytes(),
            "{path}: the client gets the upstream bytes"
        );
        let events = sink
            .wait_for(expected.len(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(tokens(&events), expected, "{path}");
        assert!(events.iter().all(|e| e.data.get("complete").is_none()));
        sink.take();
    }
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.requests_metered, snapshot.stream_usage_injected),
        (3, 0)
    );
}

#[tokio::test]
async fn ensure_stream_usage_asks_upstream_and_hides_the_usage_chunk() {
    let sink = MemorySink::new();
    let received = Received::default();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .ensure_stream_usage(true)
        .build();
    let stats = layer.stats();
    let base = serve(chat_upstream(received.clone()).layer(layer)).await;

    let request =
        r#"{"model":"gpt-4o","user":"c1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (headers, bytes) = send(&base, "/v1/chat/completions", request).await;
    // The upstream was asked for usage, with the rest of the body kept byte for byte.
    let sent = received.all()[0].clone();
    assert_eq!(
        sent,
        format!(r#"{{"stream_options":{{"include_usage":true}},{}"#, &request[1..]).as_bytes()
    );
    // The client sees exactly the stream it would have seen without the rewrite.
    assert_eq!(bytes, chat_stream(false).as_bytes());
    assert!(headers.get("content-length").is_none());
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(tokens(&events), pairs(&CHAT_TOKENS));
    let s = stats.snapshot();
    assert_eq!((s.stream_usage_injected, s.usage_chunks_removed), (1, 1));

    // A client that asked for usage itself is not touched.
    sink.take();
    let asked = r#"{"model":"gpt-4o","user":"c1","stream":true,"stream_options":{"include_usage":true}}"#;
    let (_, bytes) = send(&base, "/v1/chat/completions", asked).await;
    assert_eq!(received.all()[1], asked.as_bytes());
    assert_eq!(bytes, chat_stream(true).as_bytes());
    assert_eq!(sink.wait_for(3, Duration::from_secs(5)).await.unwrap().len(), 3);
    assert_eq!(stats.snapshot().stream_usage_injected, 1);
}

#[tokio::test]
async fn without_ensure_stream_usage_the_request_is_untouched_and_the_missing_usage_is_visible() {
    let sink = MemorySink::new();
    let received = Received::default();
    let layer = MeteringLayer::builder().sink(sink.clone()).build();
    let stats = layer.stats();
    let base = serve(chat_upstream(received.clone()).layer(layer)).await;
    let request = r#"{"model":"gpt-4o","user":"c1","stream":true}"#;
    let (_, bytes) = send(&base, "/v1/chat/completions", request).await;
    assert_eq!(received.all()[0], request.as_bytes());
    assert_eq!(bytes, chat_stream(false).as_bytes());
    // No usage was sent, so none is invented: one zero-token event says it is missing.
    let events = sink.wait_for(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].subject.as_str(), "c1");
    assert_eq!(events[0].data["tokens"], 0);
    assert_eq!(events[0].data["usage_source"], "missing");
    assert_eq!(
        events[0].data.get("complete"),
        None,
        "the stream itself was complete"
    );
    let s = stats.snapshot();
    assert_eq!(
        (s.usage_missing, s.skipped_no_usage, s.stream_usage_injected),
        (1, 0, 0)
    );
}

/// An upstream that sends `head`, then a keep-alive comment every 10 ms until the body is
/// dropped.
fn endless(head: &'static str) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        if tx.send(Bytes::from_static(head.as_bytes())).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                return;
            }
        }
    });
    Body::new(ChannelBody(rx))
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_gets_one_incomplete_record() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder().sink(sink.clone()).build();
    let stats = layer.stats();
    let message_start = &ANTHROPIC[..ANTHROPIC.find("event: ping").unwrap()];
    let first_chat_chunk: &'static str = Box::leak(chat_chunk("[]", true).into_boxed_str());
    let app = Router::new()
        .route(
            "/v1/messages",
            post(move || async move { response(endless(message_start), "text/event-stream", false) }),
        )
        .route(
            "/v1/chat/completions",
            post(move || async move { response(endless(first_chat_chunk), "text/event-stream", false) }),
        )
        .layer(layer);
    let base = serve(app).await;

    for (path, expected) in [
        (
            "/v1/messages",
            pairs(&[
                ("input", 20),
                ("cache_read", 4000),
                ("cache_write", 1500),
                ("output", 1),
            ]),
        ),
        ("/v1/chat/completions", pairs(&[("output", 0)])),
    ] {
        let mut response = client()
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(r#"{"model":"m","user":"c1","stream":true}"#)
            .send()
            .await
            .unwrap();
        let mut seen = Vec::new();
        while !seen.ends_with(b"keep-alive\n\n") {
            seen.extend_from_slice(&response.chunk().await.unwrap().unwrap());
        }
        drop(response); // the client closes the connection mid-stream
        let events = sink
            .wait_for(expected.len(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(tokens(&events), expected, "{path}");
        assert!(events.iter().all(|e| e.data["complete"] == false));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sink.events().len(), expected.len(), "{path}: exactly one record");
        if path == "/v1/chat/completions" {
            assert_eq!(events[0].data["usage_source"], "missing");
        }
        sink.take();
    }
    let s = stats.snapshot();
    assert_eq!((s.responses_incomplete, s.usage_missing), (2, 1));
}

/// Peak resident memory of this process, in KiB (Linux; 0 elsewhere).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_ten_megabyte_stream_passes_with_bounded_memory() {
    const TOTAL: usize = 10 * 1024 * 1024;
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .ensure_stream_usage(true)
        .build();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async {
                let delta = chat_chunk(
                    r#"[{"index":0,"delta":{"content":"token "},"logprobs":null,"finish_reason":null}]"#,
                    true,
                );
                let frame = Bytes::from(delta.repeat(16 * 1024 / delta.len()));
                let mut sent = 0;
                let mut tail = Some(Bytes::from(format!("{USAGE_CHUNK}data: [DONE]\n\n")));
                let mut body = Frames::new(b"", 1);
                body.more = Some(Box::new(move || {
                    if sent < TOTAL {
                        sent += frame.len();
                        Some(frame.clone())
                    } else {
                        tail.take()
                    }
                }));
                response(Body::new(body), "text/event-stream", false)
            }),
        )
        .layer(layer);
    let base = serve(app).await;
    let before = peak_rss_kib();
    let started = Instant::now();
    let mut response = client()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"m","user":"c1","stream":true}"#)
        .send()
        .await
        .unwrap();
    let mut received = 0usize;
    let mut last = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        received += chunk.len();
        last = chunk.to_vec();
    }
    let elapsed = started.elapsed();
    assert!(received > TOTAL * 9 / 10, "{received}");
    assert!(last.ends_with(b"data: [DONE]\n\n"));
    assert!(!String::from_utf8_lossy(&last).contains("prompt_tokens"));
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(tokens(&events), pairs(&CHAT_TOKENS));
    let grown = peak_rss_kib().saturating_sub(before);
    eprintln!("10 MiB stream: {received} bytes in {elapsed:?}, peak RSS grew {grown} KiB");
    assert!(grown < 8 * 1024, "peak RSS grew {grown} KiB for a 10 MiB stream");
}

#[tokio::test]
async fn gzip_json_and_sse_are_metered_and_reach_the_client_compressed() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder().sink(sink.clone()).build();
    let stats = layer.stats();
    let json_gz: &'static [u8] = Box::leak(gzip(CHAT_JSON.as_bytes()).into_boxed_slice());
    let sse_gz: &'static [u8] = Box::leak(gzip(chat_stream(true).as_bytes()).into_boxed_slice());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |request: Request| async move {
                let bytes = request.into_body().collect().await.unwrap().to_bytes();
                let json: Value = serde_json::from_slice(&bytes).unwrap();
                if json["stream"] == true {
                    response(Body::new(Frames::new(sse_gz, 5)), "text/event-stream", true)
                } else {
                    response(Body::new(Frames::new(json_gz, 5)), "application/json", true)
                }
            }),
        )
        .layer(layer);
    let base = serve(app).await;

    let (headers, bytes) = send(&base, "/v1/chat/completions", r#"{"user":"c1"}"#).await;
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(bytes, json_gz);
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(tokens(&events), pairs(&CHAT_TOKENS));
    sink.take();

    let streaming = r#"{"user":"c1","stream":true,"stream_options":{"include_usage":true}}"#;
    let (_, bytes) = send(&base, "/v1/chat/completions", streaming).await;
    assert_eq!(bytes, sse_gz);
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(tokens(&events), pairs(&CHAT_TOKENS));
    let s = stats.snapshot();
    assert_eq!((s.requests_metered, s.decode_failed), (2, 0));
}

/// A body that sends its frames, then fails.
struct FailsAfter(VecDeque<Bytes>);

impl http_body::Body for FailsAfter {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(match self.get_mut().0.pop_front() {
            Some(bytes) => Ok(Frame::data(bytes)),
            None => Err(std::io::Error::other("upstream reset")),
        }))
    }
}

#[tokio::test]
async fn an_upstream_error_mid_stream_gives_one_incomplete_record_with_the_usage_so_far() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder().sink(sink.clone()).build();
    let stats = layer.stats();
    let cut = ANTHROPIC.find("event: message_stop").unwrap();
    let app = Router::new()
        .route(
            "/v1/messages",
            post(move || async move {
                let frames = ANTHROPIC.as_bytes()[..cut].chunks(9).map(Bytes::copy_from_slice);
                response(
                    Body::new(FailsAfter(frames.collect())),
                    "text/event-stream",
                    false,
                )
            }),
        )
        .layer(layer);
    let base = serve(app).await;
    let result = client()
        .post(format!("{base}/v1/messages"))
        .header("content-type", "application/json")
        .body(r#"{"model":"m","user":"c1","stream":true}"#)
        .send()
        .await
        .unwrap()
        .bytes()
        .await;
    assert!(result.is_err(), "the client sees the broken stream");
    let events = sink.wait_for(4, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        tokens(&events),
        pairs(&[
            ("input", 20),
            ("cache_read", 4000),
            ("cache_write", 1500),
            ("output", 90)
        ])
    );
    assert!(events.iter().all(|e| e.data["complete"] == false));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sink.events().len(), 4);
    assert_eq!(stats.snapshot().responses_incomplete, 1);
}

#[tokio::test]
async fn a_compressed_stream_cannot_be_filtered_and_says_so() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .ensure_stream_usage(true)
        .build();
    let stats = layer.stats();
    let sse_gz: &'static [u8] = Box::leak(gzip(chat_stream(true).as_bytes()).into_boxed_slice());
    let app =
        Router::new()
            .route(
                "/v1/chat/completions",
                post(move || async move {
                    response(Body::new(Frames::new(sse_gz, 11)), "text/event-stream", true)
                }),
            )
            .layer(layer);
    let base = serve(app).await;
    let (_, bytes) = send(&base, "/v1/chat/completions", r#"{"user":"c1","stream":true}"#).await;
    assert_eq!(bytes, sse_gz, "compressed bytes pass unchanged");
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(tokens(&events), pairs(&CHAT_TOKENS));
    let s = stats.snapshot();
    assert_eq!(
        (
            s.stream_usage_injected,
            s.usage_chunks_unfiltered,
            s.usage_chunks_removed
        ),
        (1, 1, 0)
    );
}
