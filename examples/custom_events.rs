//! Shaping the events: extra data fields from the request, the per-request shape for meters
//! made for the Python proxy (`litellm_tokens`), and a custom closure. Exits 0.
//!
//! Run: `cargo run --example custom_events`

use std::error::Error;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::response::Response;
use axum::routing::post;
use http_body_util::BodyExt;
use serde_json::Map;
use tower::ServiceExt;
use tower_openmeter::{CloudEvent, EventShape, MemorySink, MeteringLayer, UsageRecord};

async fn fake_messages() -> Response {
    let body = r#"{"id":"msg_custom","type":"message","model":"claude-sonnet-4-5","content":[],"usage":{"input_tokens":20,"cache_read_input_tokens":4000,"cache_creation_input_tokens":1500,"output_tokens":90}}"#;
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Sends one Anthropic Messages request through `layer` and returns its events.
async fn meter_once(
    layer: MeteringLayer,
    sink: &MemorySink,
) -> Result<Vec<CloudEvent>, Box<dyn Error + Send + Sync>> {
    let app = Router::new()
        .route("/v1/messages", post(fake_messages))
        .layer(layer);
    let request = Request::post("/v1/messages")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-tenant", "acme-eu")
        .body(Body::from(
            r#"{"model":"claude-sonnet-4-5","max_tokens":64,"user":"customer-1","messages":[]}"#,
        ))?;
    let response = app.oneshot(request).await?;
    response.into_body().collect().await?;
    // Give the event a moment to arrive, then take what came.
    let _ = sink.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(sink.take())
}

/// The three shapes; returns the events of each.
pub async fn run() -> Result<[Vec<CloudEvent>; 3], Box<dyn Error + Send + Sync>> {
    // 1. Extra data fields, from the request head: a tenant header and a fixed region.
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("custom-events")
        .data_fields(|head| {
            let mut fields = Map::new();
            if let Some(tenant) = head.headers.get("x-tenant").and_then(|v| v.to_str().ok()) {
                fields.insert("tenant".into(), tenant.into());
            }
            fields.insert("region".into(), "eu-west-1".into());
            fields
        })
        .build();
    let with_fields = meter_once(layer, &sink).await?;
    eprintln!("per token type with data fields: {} events", with_fields.len());

    // 2. One event per request, for meters made for the Python proxy's OpenMeter callback.
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("custom-events")
        .event_shape(EventShape::PerRequest)
        .event_type("litellm_tokens")
        .build();
    let per_request = meter_once(layer, &sink).await?;
    eprintln!("per request: {} event", per_request.len());

    // 3. Your own: here, one event with the total and a price class, built from the record.
    let shape = EventShape::custom(|record: &UsageRecord, source: &str| {
        let class = if record.model_or_unknown().contains("opus") {
            "premium"
        } else {
            "standard"
        };
        let mut data = Map::new();
        data.insert("tokens".into(), record.usage.total().into());
        data.insert("model".into(), record.model_or_unknown().into());
        data.insert("price_class".into(), class.into());
        vec![CloudEvent::new(
            format!("{}/total", record.id),
            source,
            "llm_total_tokens",
            record.subject.clone(),
            data,
        )]
    });
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("custom-events")
        .event_shape(shape)
        .build();
    let custom = meter_once(layer, &sink).await?;
    eprintln!("custom: {} event", custom.len());

    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("unexpected events: {what}"))
        }
    };
    check(
        with_fields.len() == 4
            && with_fields
                .iter()
                .all(|e| e.data["tenant"] == "acme-eu" && e.data["region"] == "eu-west-1"),
        "data fields",
    )?;
    check(
        per_request.len() == 1
            && per_request[0].ty == "litellm_tokens"
            && per_request[0].data["total_tokens"] == 5610,
        "per request",
    )?;
    check(
        custom.len() == 1 && custom[0].ty == "llm_total_tokens" && custom[0].data["tokens"] == 5610,
        "custom",
    )?;
    Ok([with_fields, per_request, custom])
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    for events in run().await? {
        for event in events {
            println!("{}", serde_json::to_string(&event)?);
        }
    }
    Ok(())
}
