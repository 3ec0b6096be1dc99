//! Bill the customer behind the API key, not the one the client names.
//!
//! An auth middleware (axum `middleware::from_fn`) maps `Authorization: Bearer sk-...` to a
//! customer id and stores it as a request extension; the metering layer takes the subject from
//! there with `Subject::extension::<CustomerId>()`. A client that sends another customer's id
//! in the body `user` field is still billed to its own key's customer. Exits 0.
//!
//! Run: `cargo run --example auth_subject`

use std::error::Error;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_openmeter::{CloudEvent, MemorySink, MeteringLayer, MissingSubject, Subject};

/// The customer an API key belongs to, set by [`authenticate`].
#[derive(Clone, Debug)]
pub struct CustomerId(String);

impl AsRef<str> for CustomerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Your key store. Compare keys in constant time and hash them at rest in real code.
fn customer_for_key(key: &str) -> Option<&'static str> {
    match key {
        "sk-acme-0001" => Some("acme"),
        "sk-globex-0002" => Some("globex"),
        _ => None,
    }
}

/// Rejects requests without a known key; puts the key's customer in the request extensions.
async fn authenticate(mut request: Request, next: Next) -> Result<Response, StatusCode> {
    let customer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(customer_for_key)
        .ok_or(StatusCode::UNAUTHORIZED)?;
    request.extensions_mut().insert(CustomerId(customer.to_owned()));
    Ok(next.run(request).await)
}

async fn fake_chat() -> Response {
    let body = r#"{"id":"chatcmpl-auth","object":"chat.completion","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":5,"total_tokens":30}}"#;
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The app: authentication outside metering, so the extension is set when metering reads it.
pub fn app(sink: MemorySink) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(fake_chat))
        .layer(
            MeteringLayer::builder()
                .sink(sink)
                .source("auth-example")
                // Only the authenticated customer; never the client-chosen body `user`.
                .subject(Subject::extension::<CustomerId>())
                .missing_subject(MissingSubject::Skip)
                .build(),
        )
        // Added last, so it runs first.
        .layer(middleware::from_fn(authenticate))
}

async fn call(
    app: &Router,
    key: Option<&str>,
    body: &str,
) -> Result<StatusCode, Box<dyn Error + Send + Sync>> {
    let mut request = Request::post("/v1/chat/completions").header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned()))?)
        .await?;
    let status = response.status();
    // Metering finishes when the body has been read.
    response.into_body().collect().await?;
    Ok(status)
}

/// Sends a forged request and an unauthenticated one; returns the events.
pub async fn run() -> Result<Vec<CloudEvent>, Box<dyn Error + Send + Sync>> {
    let sink = MemorySink::new();
    let app = app(sink.clone());

    // acme's key, but the body claims to be globex.
    let forged = r#"{"model":"gpt-4o","user":"globex","messages":[]}"#;
    let status = call(&app, Some("sk-acme-0001"), forged).await?;
    eprintln!("acme's key with user=\"globex\" -> {status}");
    let status = call(&app, None, forged).await?;
    eprintln!("no key with user=\"globex\" -> {status} (never reaches metering)");

    let events = sink
        .wait_for(2, Duration::from_secs(5))
        .await
        .map_err(|got| format!("expected 2 events, got {}", got.len()))?;
    for event in &events {
        if event.subject.as_str() != "acme" {
            return Err(format!("billed {} instead of the key's customer", event.subject).into());
        }
    }
    eprintln!(
        "billed to {:?}, the key's customer, not the forged user",
        events[0].subject
    );
    Ok(events)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    for event in run().await? {
        println!("{}", serde_json::to_string(&event)?);
    }
    Ok(())
}
