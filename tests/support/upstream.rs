//! A fake LLM upstream for integration tests: each API answers with a recorded-style body, split
//! into 7-byte frames with an exact Content-Length, and records the request bodies it received.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;

use super::test_support::ChunkedBody;

pub const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1730000000,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":16,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
pub const COMPLETION: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1730000000,"model":"gpt-3.5-turbo-instruct","choices":[{"text":"ok","index":0,"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
pub const EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023,-0.0091]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
pub const RESPONSES: &str = r#"{"id":"resp_1","object":"response","created_at":1730000000,"status":"completed","model":"gpt-4.1","output":[],"usage":{"input_tokens":300,"input_tokens_details":{"cached_tokens":128},"output_tokens":50,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":350}}"#;
pub const MESSAGES: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":20,"cache_creation_input_tokens":1500,"cache_read_input_tokens":4000,"output_tokens":90}}"#;

/// What the upstream handler received, to prove the inner service gets the client's bytes.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Bytes>>>);

impl Received {
    pub fn all(&self) -> Vec<Bytes> {
        self.0.lock().unwrap().clone()
    }

    pub fn push(&self, body: Bytes) {
        self.0.lock().unwrap().push(body);
    }
}

pub fn json_response(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An upstream that answers each API with a recorded-style body, split into 7-byte frames with
/// an exact Content-Length, so hyper stops polling at `is_end_stream`.
pub fn upstream(received: Received) -> Router {
    let route = move |body: &'static str| {
        let received = received.clone();
        post(move |request: Request| async move {
            let bytes = request.into_body().collect().await.unwrap().to_bytes();
            received.push(bytes);
            let mut response = Response::new(Body::new(ChunkedBody::new(body.as_bytes().chunks(7))));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            response
        })
    };
    Router::new()
        .route("/v1/chat/completions", route(CHAT))
        .route("/v1/completions", route(COMPLETION))
        .route("/v1/embeddings", route(EMBEDDINGS))
        .route("/v1/responses", route(RESPONSES))
        .route("/v1/messages", route(MESSAGES))
        .route("/openai/deployments/x/chat/completions", route(CHAT))
        .route("/v1/models", get(|| async { json_response(r#"{"data":[]}"#) }))
        .route(
            "/v2/chat/completions",
            post(|| async { (StatusCode::TOO_MANY_REQUESTS, json_response(CHAT)) }),
        )
}

pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A response body fed by the test through a channel: one frame per message, until the
/// sender is dropped.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// POSTs a JSON body with a real client and returns the status, headers and body bytes.
pub async fn post_json(base: &str, path: &str, body: &str) -> (StatusCode, axum::http::HeaderMap, Bytes) {
    let response = client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap())
}
