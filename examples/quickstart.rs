//! The main job, with no OpenMeter and no API keys: an axum app on 127.0.0.1 with a built-in
//! fake OpenAI- and Anthropic-compatible handler, the metering layer printing CloudEvents to
//! stdout, and a few requests of different APIs and users sent to itself.
//!
//! Run: `cargo run --example quickstart`

use std::time::Duration;

use axum::Router;
use axum::extract::Json;
use axum::routing::post;
use serde_json::{Value, json};
use tower_openmeter::{EventSink, MemorySink, MeteringLayer, StdoutSink, Subject};

/// A fake upstream: answers every API with a usage block that depends on the request.
fn fake_llm() -> Router {
    let chat = |Json(req): Json<Value>| async move {
        let prompt = req["messages"].to_string().len() as u64 / 4;
        Json(json!({
            "id": "chatcmpl-quickstart", "object": "chat.completion", "model": req["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 12, "total_tokens": prompt + 12,
                      "prompt_tokens_details": {"cached_tokens": prompt / 2},
                      "completion_tokens_details": {"reasoning_tokens": 4}}
        }))
    };
    let embeddings = |Json(req): Json<Value>| async move {
        Json(
            json!({"object": "list", "model": req["model"], "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
        )
    };
    let messages = |Json(req): Json<Value>| async move {
        Json(
            json!({"id": "msg_quickstart", "type": "message", "model": req["model"], "content": [],
                    "usage": {"input_tokens": 20, "cache_read_input_tokens": 4000,
                              "cache_creation_input_tokens": 1500, "output_tokens": 90}}),
        )
    };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
}

/// Prints every event and keeps a copy, so the example knows when all have arrived.
#[derive(Clone, Default)]
struct PrintAndKeep(MemorySink);

impl EventSink for PrintAndKeep {
    fn send(&self, event: tower_openmeter::CloudEvent) {
        StdoutSink::new().send(event.clone());
        self.0.send(event);
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sink = PrintAndKeep::default();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("quickstart")
        .subject(Subject::header("x-customer").or_body_user())
        .build();
    let stats = layer.stats();
    let app = fake_llm().layer(layer);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    eprintln!("metered fake LLM API listening on {base}");

    let client = reqwest::Client::builder().no_proxy().build()?;
    let requests = [
        (
            "/v1/chat/completions",
            None,
            json!({"model": "gpt-4o", "user": "customer-1", "messages": [{"role": "user", "content": "Say hello to the metering layer"}]}),
        ),
        (
            "/v1/embeddings",
            None,
            json!({"model": "text-embedding-3-small", "user": 42, "input": "billing"}),
        ),
        (
            "/v1/messages",
            Some("customer-3"),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": []}),
        ),
        (
            "/v1/chat/completions",
            None,
            json!({"model": "gpt-4o-mini", "user": ["not", "a", "subject"], "messages": [{"role": "user", "content": "An array user is billed to the fallback subject"}]}),
        ),
    ];
    for (path, customer, body) in requests {
        let mut request = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json");
        if let Some(customer) = customer {
            request = request.header("x-customer", customer);
        }
        let response = request.body(body.to_string()).send().await?;
        eprintln!(
            "POST {path} -> {} ({} bytes)",
            response.status(),
            response.bytes().await?.len()
        );
    }

    // 3 + 1 + 4 + 3 events: one per non-zero token type.
    let events = sink
        .0
        .wait_for(11, Duration::from_secs(5))
        .await
        .map_err(|got| format!("expected 11 events, got {}", got.len()))?;
    eprintln!(
        "{} CloudEvents emitted; stats: {:?}",
        events.len(),
        stats.snapshot()
    );
    Ok(())
}
