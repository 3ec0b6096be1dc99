//! A fast fake LLM upstream for load tests (`scripts/loadtest.sh`): `POST
//! /v1/chat/completions` answers a ~1 KiB JSON chat completion, or, when the request body has
//! `"stream":true`, a 50-chunk SSE stream ending with a usage chunk and `[DONE]` (one frame per
//! event, no delay). It also stands in for OpenMeter: `POST /api/v1/events` counts the events
//! of each batch and answers 204, and `GET /events` returns that count.
//!
//! Run: `LISTEN_ADDR=127.0.0.1:9100 cargo run --release --example fake_upstream`

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const CHUNKS: usize = 50;

/// Canned responses, shared by every connection.
struct Canned {
    json: Bytes,
    sse: Vec<Bytes>,
    events: std::sync::atomic::AtomicU64,
}

fn canned() -> Canned {
    let content = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    let json = format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{{"cached_tokens":64,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":16,"audio_tokens":0}}}},"system_fingerprint":"fp_1"}}"#
    );
    let chunk = |delta: &str, usage: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{delta}],\"usage\":{usage}}}\n\n"
        ))
    };
    let mut sse = vec![chunk(
        r#"{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}"#,
        "null",
    )];
    for i in 0..CHUNKS {
        sse.push(chunk(
            &format!(r#"{{"index":0,"delta":{{"content":" tok{i}"}},"finish_reason":null}}"#),
            "null",
        ));
    }
    sse.push(chunk(
        "",
        r#"{"prompt_tokens":120,"completion_tokens":50,"total_tokens":170}"#,
    ));
    sse.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Canned {
        json: Bytes::from(json),
        sse,
        events: Default::default(),
    }
}

/// One frame per poll; the stream has no length, so hyper sends it chunked.
struct Frames {
    frames: std::vec::IntoIter<Bytes>,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.next().map(|f| Ok(Frame::data(f))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type Reply = Response<http_body_util::Either<http_body_util::Full<Bytes>, Frames>>;

async fn handle(canned: Arc<Canned>, request: Request<Incoming>) -> Result<Reply, hyper::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect().await?.to_bytes();
    let text = |status: u16, body: String| {
        Ok(Response::builder()
            .status(status)
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                Bytes::from(body),
            )))
            .expect("valid response"))
    };
    if path == "/api/v1/events" {
        let events = body.windows(13).filter(|w| w == b"\"specversion\"").count();
        canned.events.fetch_add(events as u64, Relaxed);
        return text(204, String::new());
    }
    if path == "/events" {
        return text(200, canned.events.load(Relaxed).to_string());
    }
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    let response = if stream {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(http_body_util::Either::Right(Frames {
                frames: canned.sse.clone().into_iter(),
            }))
    } else {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                canned.json.clone(),
            )))
    };
    Ok(response.expect("valid response"))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:9100".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("fake_upstream: listening on http://{}", listener.local_addr()?);
    let canned = Arc::new(canned());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(canned.clone(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
