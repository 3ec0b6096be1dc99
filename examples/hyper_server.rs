//! The metering layer on a plain hyper 1 server, no axum: a fake chat completion endpoint on
//! 127.0.0.1, one request sent to itself, the CloudEvents printed, exit 0.
//!
//! Run: `cargo run --example hyper_server`

use std::error::Error;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_openmeter::{CloudEvent, MemorySink, MeteringLayer, RequestBody};

/// A fake OpenAI-compatible chat completion. The metering layer hands the handler a
/// [`RequestBody`] that yields exactly the bytes the client sent.
async fn chat(request: Request<RequestBody<Incoming>>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = request.into_body().collect().await?.to_bytes();
    let prompt_tokens = body.len() / 4;
    let answer = format!(
        r#"{{"id":"chatcmpl-hyper","object":"chat.completion","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hi"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":3,"total_tokens":{}}}}}"#,
        prompt_tokens + 3
    );
    let response = Response::builder()
        .header("content-type", "application/json")
        .body(Full::from(answer));
    // Building from constant, valid parts cannot fail; answer 500 rather than panic anyway.
    Ok(response.unwrap_or_else(|_| {
        let mut error = Response::new(Full::from("internal error"));
        *error.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        error
    }))
}

/// Serves one metered hyper server, sends it one request, and returns the events it emitted.
pub async fn run() -> Result<Vec<CloudEvent>, Box<dyn Error + Send + Sync>> {
    let sink = MemorySink::new();
    let service = ServiceBuilder::new()
        .layer(
            MeteringLayer::builder()
                .sink(sink.clone())
                .source("hyper-server")
                .build(),
        )
        .service_fn(chat);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("connection error: {error}");
                }
            });
        }
    });
    eprintln!("metered hyper server listening on http://{addr}");

    let client = reqwest::Client::builder().no_proxy().build()?;
    let response = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","user":"customer-1","messages":[{"role":"user","content":"Hello"}]}"#)
        .send()
        .await?;
    eprintln!("POST /v1/chat/completions -> {}", response.status());
    eprintln!("{}", response.text().await?);

    // One event per non-zero token type: input and output.
    let events = sink
        .wait_for(2, Duration::from_secs(5))
        .await
        .map_err(|got| format!("expected 2 events, got {}", got.len()))?;
    Ok(events)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    for event in run().await? {
        println!("{}", serde_json::to_string(&event)?);
    }
    Ok(())
}
