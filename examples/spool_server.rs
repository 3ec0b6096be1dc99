//! A metered LLM gateway whose usage events survive crashes: an axum app on 127.0.0.1 with a
//! fake chat-completions handler, metered into an `OpenMeterSink` with a durable spool.
//!
//! Run: `METERING_SPOOL_DIR=/tmp/spool OPENMETER_URL=http://127.0.0.1:8888 \
//!       cargo run --example spool_server --features spool`
//!
//! - `METERING_SPOOL_DIR`: the spool directory; without it the sink keeps events in memory only.
//! - `OPENMETER_URL`, `OPENMETER_API_KEY`: where events go (as `OpenMeterSink::from_env`).
//! - `PORT`: the port to listen on (default 0: any free port).
//! - `SPOOL_COMMIT_MS`: the group-commit interval in milliseconds (default 5), the window in
//!   which a crash can lose events.
//!
//! It prints `listening on http://127.0.0.1:<port>` once it serves. `POST /v1/chat/completions`
//! answers with 10 prompt and 5 completion tokens, billed to the body's `user`;
//! `GET /stats` returns the sink's counters as JSON. Ctrl-C shuts down gracefully; a kill -9
//! loses only what was not committed yet, and the next start delivers the rest.

use std::time::Duration;

use axum::Router;
use axum::extract::{Json, State};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tower_openmeter::spool::SpoolConfig;
use tower_openmeter::{MeteringLayer, OpenMeterSink, Subject};

async fn chat(Json(request): Json<Value>) -> Json<Value> {
    Json(json!({
        "id": "chatcmpl-spool", "object": "chat.completion", "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    }))
}

async fn stats(State(sink): State<OpenMeterSink>) -> Json<Value> {
    let s = sink.stats();
    Json(json!({
        "queued": s.queued, "in_flight": s.in_flight, "spooled": s.spooled,
        "spool_bytes": s.spool_bytes, "delivered": s.delivered, "rejected": s.rejected,
        "retries": s.retries, "dropped": s.dropped(), "dropped_queue_full": s.dropped_queue_full,
        "dropped_spool_full": s.dropped_spool_full,
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_openmeter=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let commit_ms = std::env::var("SPOOL_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut builder = OpenMeterSink::builder_from_env()?
        .flush_interval(Duration::from_millis(100))
        .backoff(Duration::from_millis(50), Duration::from_millis(500));
    if let Some(dir) = std::env::var_os("METERING_SPOOL_DIR").filter(|d| !d.is_empty()) {
        builder = builder.spool(SpoolConfig::new(dir).commit_interval(Duration::from_millis(commit_ms)));
    }
    let sink = builder.build()?;

    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .layer(
            MeteringLayer::builder()
                .sink(sink.clone())
                .source("spool-server")
                .subject(Subject::body_user())
                .build(),
        )
        .route("/stats", get(stats))
        .with_state(sink.clone());

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let report = sink.shutdown(Duration::from_secs(5)).await;
    eprintln!("shutdown: {report:?}");
    Ok(())
}
