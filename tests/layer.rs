//! The metering layer end to end: a real axum app on 127.0.0.1 behind the layer, requests from a
//! real HTTP client, and the exact CloudEvents that reach the sink.

mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::test_support::ChunkedBody;
use support::upstream::*;
use tower::ServiceExt;
use tower_openmeter::{CloudEvent, MemorySink, MeteringLayer, MissingSubject, Subject};

/// The event as JSON with the generated parts checked and replaced by placeholders.
fn normalized(event: &CloudEvent) -> Value {
    let mut value = serde_json::to_value(event).unwrap();
    let id = value["id"].as_str().unwrap().to_owned();
    let (record, kind) = id.split_once('/').unwrap();
    assert!(uuid::Uuid::parse_str(record).is_ok(), "record id is a UUID: {id}");
    value["id"] = format!("<uuid>/{kind}").into();
    let time = value["time"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(time).is_ok() && time.ends_with('Z') && time.len() == 24,
        "{time}"
    );
    value["time"] = "<time>".into();
    value
}

fn expected(kind: &str, subject: &str, data: Value) -> Value {
    json!({"specversion":"1.0","id":format!("<uuid>/{kind}"),"source":"test-gateway","type":"prompt",
           "subject":subject,"time":"<time>","data":data})
}

#[tokio::test]
async fn every_api_produces_the_exact_events_and_the_client_gets_the_upstream_bytes() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("test-gateway")
        .build();
    let stats = layer.stats();
    let base = serve(upstream(Received::default()).layer(layer)).await;

    let cases: [(&str, &str, Vec<Value>); 5] = [
        (
            "/v1/chat/completions",
            CHAT,
            vec![
                expected(
                    "input",
                    "customer-1",
                    json!({"tokens":56,"type":"input","model":"gpt-4o-2024-08-06","provider":"openai","api":"chat.completions","audio_tokens":0}),
                ),
                expected(
                    "cache_read",
                    "customer-1",
                    json!({"tokens":64,"type":"cache_read","model":"gpt-4o-2024-08-06","provider":"openai","api":"chat.completions"}),
                ),
                expected(
                    "output",
                    "customer-1",
                    json!({"tokens":40,"type":"output","model":"gpt-4o-2024-08-06","provider":"openai","api":"chat.completions","reasoning_tokens":16,"audio_tokens":0}),
                ),
            ],
        ),
        (
            "/v1/completions",
            COMPLETION,
            vec![
                expected(
                    "input",
                    "customer-1",
                    json!({"tokens":5,"type":"input","model":"gpt-3.5-turbo-instruct","provider":"openai","api":"completions"}),
                ),
                expected(
                    "output",
                    "customer-1",
                    json!({"tokens":7,"type":"output","model":"gpt-3.5-turbo-instruct","provider":"openai","api":"completions"}),
                ),
            ],
        ),
        (
            "/v1/embeddings",
            EMBEDDINGS,
            vec![expected(
                "input",
                "customer-1",
                json!({"tokens":8,"type":"input","model":"text-embedding-3-small","provider":"openai","api":"embeddings"}),
            )],
        ),
        (
            "/v1/responses",
            RESPONSES,
            vec![
                expected(
                    "input",
                    "customer-1",
                    json!({"tokens":172,"type":"input","model":"gpt-4.1","provider":"openai","api":"responses"}),
                ),
                expected(
                    "cache_read",
                    "customer-1",
                    json!({"tokens":128,"type":"cache_read","model":"gpt-4.1","provider":"openai","api":"responses"}),
                ),
                expected(
                    "output",
                    "customer-1",
                    json!({"tokens":50,"type":"output","model":"gpt-4.1","provider":"openai","api":"responses","reasoning_tokens":20}),
                ),
            ],
        ),
        (
            "/v1/messages",
            MESSAGES,
            vec![
                expected(
                    "input",
                    "customer-1",
                    json!({"tokens":20,"type":"input","model":"claude-sonnet-4-5","provider":"anthropic","api":"messages"}),
                ),
                expected(
                    "cache_read",
                    "customer-1",
                    json!({"tokens":4000,"type":"cache_read","model":"claude-sonnet-4-5","provider":"anthropic","api":"messages"}),
                ),
                expected(
                    "cache_write",
                    "customer-1",
                    json!({"tokens":1500,"type":"cache_write","model":"claude-sonnet-4-5","provider":"anthropic","api":"messages"}),
                ),
                expected(
                    "output",
                    "customer-1",
                    json!({"tokens":90,"type":"output","model":"claude-sonnet-4-5","provider":"anthropic","api":"messages"}),
                ),
            ],
        ),
    ];
    for (path, upstream_body, want) in cases {
        let (status, headers, body) = post_json(&base, path, r#"{"model":"m","user":"customer-1"}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, upstream_body.as_bytes(), "{path}: client bytes");
        assert_eq!(
            headers[header::CONTENT_LENGTH],
            upstream_body.len().to_string().as_str()
        );
        let events = sink.wait_for(want.len(), Duration::from_secs(5)).await.unwrap();
        assert_eq!(events.iter().map(normalized).collect::<Vec<_>>(), want, "{path}");
        let record: std::collections::HashSet<_> = events
            .iter()
            .map(|e| e.id.split('/').next().unwrap().to_owned())
            .collect();
        assert_eq!(record.len(), 1, "one record id per request: {record:?}");
        sink.take();
    }
    let s = stats.snapshot();
    assert_eq!(
        (s.requests_seen, s.requests_metered, s.events_emitted),
        (5, 5, 13)
    );
}

#[tokio::test]
async fn azure_style_paths_are_metered() {
    let sink = MemorySink::new();
    let base = serve(upstream(Received::default()).layer(MeteringLayer::new(sink.clone()))).await;
    post_json(
        &base,
        "/openai/deployments/x/chat/completions",
        r#"{"user":"az"}"#,
    )
    .await;
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(events.len(), 3);
    for event in &events {
        assert_eq!(event.subject.as_str(), "az");
        assert_eq!(event.data["api"], "chat.completions");
    }
    let types: Vec<_> = events.iter().map(|e| e.data["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["input", "cache_read", "output"]);
}

#[tokio::test]
async fn non_2xx_and_non_api_requests_produce_no_event_and_are_counted() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::new(sink.clone());
    let stats = layer.stats();
    let base = serve(upstream(Received::default()).layer(layer)).await;

    let (status, _, body) = post_json(&base, "/v2/chat/completions", r#"{"user":"u"}"#).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::TOO_MANY_REQUESTS, CHAT.as_bytes())
    );
    let response = client().get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(response.bytes().await.unwrap(), &br#"{"data":[]}"#[..]);
    // GET on an API path is not metered either.
    client()
        .get(format!("{base}/v1/chat/completions"))
        .send()
        .await
        .unwrap();

    let s = stats.snapshot();
    assert_eq!(s.requests_seen, 3);
    assert_eq!(s.skipped_not_api, 2);
    assert_eq!(s.skipped_status, 1);
    assert_eq!(s.requests_metered, 0);
    assert_eq!(sink.events(), vec![]);
}

#[tokio::test]
async fn error_statuses_on_api_paths_are_not_metered_by_default() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::new(sink.clone());
    let stats = layer.stats();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async { (StatusCode::BAD_REQUEST, json_response(CHAT)) }),
        )
        .layer(layer);
    let response = app
        .oneshot(
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"user":"u"}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        CHAT.as_bytes()
    );
    assert_eq!(stats.snapshot().skipped_status, 1);
    assert!(sink.events().is_empty());
}

#[tokio::test]
async fn over_cap_and_invalid_json_requests_reach_the_upstream_byte_identical() {
    let sink = MemorySink::new();
    let received = Received::default();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .max_request_body(64)
        .build();
    let stats = layer.stats();
    let base = serve(upstream(received.clone()).layer(layer)).await;

    let big = format!(
        r#"{{"user":"someone","messages":[{{"content":"{}"}}]}}"#,
        "x".repeat(10_000)
    );
    let invalid = r#"{"user":"someone", oops"#;
    post_json(&base, "/v1/chat/completions", &big).await;
    post_json(&base, "/v1/chat/completions", invalid).await;
    // A chunked body (no Content-Length) over the cap: prefix + rest.
    let stream_body = reqwest::Body::wrap(ChunkedBody::new(big.as_bytes().chunks(10)));
    client()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(stream_body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    assert_eq!(
        received.all(),
        vec![Bytes::from(big.clone()), Bytes::from(invalid), Bytes::from(big)]
    );
    let s = stats.snapshot();
    assert_eq!((s.request_over_cap, s.request_invalid_json), (2, 1));
    // The subject could not be read from those bodies, so usage went to the fallback.
    let events = sink.wait_for(9, Duration::from_secs(5)).await.unwrap();
    assert!(events.iter().all(|e| e.subject.as_str() == "unknown"));
    assert_eq!(s.subject_fallback, 3);
}

/// Sends one request to `app` with `oneshot` and reads the whole response body.
async fn send_oneshot(app: Router, request: Request) -> Bytes {
    let response = app.oneshot(request).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

/// Sends one chat request through the layer with `oneshot` and returns the subjects billed.
async fn subjects_for(layer: MeteringLayer, sink: &MemorySink, request: Request) -> Vec<String> {
    send_oneshot(upstream(Received::default()).layer(layer), request).await;
    sink.take()
        .iter()
        .map(|e| e.subject.as_str().to_owned())
        .collect()
}

fn chat_request() -> axum::http::request::Builder {
    Request::post("/v1/chat/completions").header("content-type", "application/json")
}

#[tokio::test]
async fn body_user_of_every_json_kind() {
    let megabytes = format!(r#"{{"user":"{}"}}"#, "u".repeat(2 * 1024 * 1024));
    let cases: Vec<(String, &str)> = vec![
        (r#"{"user":"customer-1"}"#.into(), "customer-1"),
        (r#"{"user":42}"#.into(), "42"),
        (r#"{"user":-7.5}"#.into(), "-7.5"),
        (r#"{"user":null}"#.into(), "unknown"),
        (r#"{"model":"m"}"#.into(), "unknown"),
        (r#"{"user":["customer-1"]}"#.into(), "unknown"),
        (r#"{"user":{"id":"customer-1"}}"#.into(), "unknown"),
        (r#"{"user":""}"#.into(), "unknown"),
        (r#"{"user":"   "}"#.into(), "unknown"),
        (format!(r#"{{"user":"{}"}}"#, "a".repeat(257)), "unknown"),
        (
            format!(r#"{{"user":"{}"}}"#, "a".repeat(256)),
            &*"a".repeat(256).leak(),
        ),
        (megabytes, "unknown"),
    ];
    for (body, want) in cases {
        let sink = MemorySink::new();
        let layer = MeteringLayer::new(sink.clone());
        let stats = layer.stats();
        let request = chat_request().body(Body::from(body.clone())).unwrap();
        let subjects = subjects_for(layer, &sink, request).await;
        assert_eq!(subjects, vec![want; 3], "{}", &body[..body.len().min(60)]);
        assert_eq!(stats.snapshot().subject_fallback, u64::from(want == "unknown"));
    }
}

#[derive(Clone)]
struct CustomerId(String);
impl AsRef<str> for CustomerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[tokio::test]
async fn extension_then_header_then_body_user() {
    let chain = || {
        Subject::extension::<CustomerId>()
            .or_header("x-customer")
            .or_body_user()
    };
    let sink = MemorySink::new();
    let layer = || {
        MeteringLayer::builder()
            .sink(sink.clone())
            .subject(chain())
            .build()
    };

    let mut request = chat_request()
        .header("x-customer", "from-header")
        .body(Body::from(r#"{"user":"from-body"}"#))
        .unwrap();
    request.extensions_mut().insert(CustomerId("from-auth".into()));
    assert_eq!(subjects_for(layer(), &sink, request).await, vec!["from-auth"; 3]);

    let request = chat_request()
        .header("x-customer", "from-header")
        .body(Body::from(r#"{"user":"from-body"}"#))
        .unwrap();
    assert_eq!(
        subjects_for(layer(), &sink, request).await,
        vec!["from-header"; 3]
    );

    let request = chat_request()
        .header("x-customer", "")
        .body(Body::from(r#"{"user":"from-body"}"#))
        .unwrap();
    assert_eq!(subjects_for(layer(), &sink, request).await, vec!["from-body"; 3]);
}

#[tokio::test]
async fn skip_policy_emits_nothing_and_counts() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .subject(Subject::header("x-customer"))
        .missing_subject(MissingSubject::Skip)
        .build();
    let stats = layer.stats();
    let request = chat_request().body(Body::from(r#"{"user":"ignored"}"#)).unwrap();
    assert_eq!(subjects_for(layer, &sink, request).await, Vec::<String>::new());
    assert_eq!(stats.snapshot().subject_skipped, 1);
}

#[tokio::test]
async fn the_json_reaching_the_sink_always_has_a_string_subject() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::new(sink.clone());
    let cases = [
        (json!(["a", "b"]), "unknown"),
        (json!(null), "unknown"),
        (json!(1.5e300), "1.5e+300"), // the number as the request wrote it
        (json!({"k": 1}), "unknown"),
        (json!(true), "unknown"),
        (json!("x"), "x"),
    ];
    for (user, _) in &cases {
        let request = chat_request()
            .body(Body::from(json!({"user": user}).to_string()))
            .unwrap();
        let app = upstream(Received::default()).layer(layer.clone());
        send_oneshot(app, request).await;
    }
    let events = sink.wait_for(18, Duration::from_secs(5)).await.unwrap();
    assert_eq!(events.len(), 18);
    // Requests ran one after another: three events each, in order.
    for ((user, want), record) in cases.iter().zip(events.chunks(3)) {
        for event in record {
            let value = serde_json::to_value(event).unwrap();
            assert_eq!(value["subject"], json!(want), "user {user}: {value}");
        }
    }
}

#[tokio::test]
async fn a_non_json_body_on_an_api_path_passes_through_and_is_counted_once() {
    let sink = MemorySink::new();
    let received = Received::default();
    let layer = MeteringLayer::new(sink.clone());
    let stats = layer.stats();
    let app = upstream(received.clone()).layer(layer);
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "text/plain")
        .body(Body::from("user=someone"))
        .unwrap();
    assert_eq!(send_oneshot(app, request).await, CHAT.as_bytes());
    assert_eq!(received.all(), vec![Bytes::from("user=someone")]);
    let s = stats.snapshot();
    assert_eq!(
        (s.skipped_not_json, s.skipped_not_api, s.requests_metered),
        (1, 0, 0)
    );
    assert!(sink.events().is_empty());
}

#[tokio::test]
async fn a_service_that_does_not_read_the_body_gets_head_sources_only_and_it_is_counted() {
    let sink = MemorySink::new();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .subject(Subject::body_user().or_header("x-customer"))
        .build();
    let stats = layer.stats();
    let app = Router::new()
        .route("/v1/chat/completions", post(|| async { json_response(CHAT) }))
        .layer(layer);
    let request = chat_request()
        .header("x-customer", "from-header")
        .body(Body::from(r#"{"user":"from-body"}"#))
        .unwrap();
    send_oneshot(app, request).await;
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert!(events.iter().all(|e| e.subject.as_str() == "from-header"));
    assert_eq!(stats.snapshot().request_unread, 1);
}

#[tokio::test]
async fn a_closure_source_sees_the_body_fields_read_before_the_call() {
    let sink = MemorySink::new();
    let received = Received::default();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .subject(Subject::from_fn(|head, fields| {
            let tenant = head.headers.get("x-tenant")?.to_str().ok()?;
            Some(format!("{tenant}:{}", fields.model.as_deref()?))
        }))
        .build();
    let app = upstream(received.clone()).layer(layer);
    let body = r#"{"model":"gpt-4o","user":"ignored"}"#;
    let request = chat_request()
        .header("x-tenant", "acme")
        .body(Body::from(body))
        .unwrap();
    send_oneshot(app, request).await;
    let events = sink.wait_for(3, Duration::from_secs(5)).await.unwrap();
    assert!(events.iter().all(|e| e.subject.as_str() == "acme:gpt-4o"));
    assert_eq!(received.all(), vec![Bytes::from(body)]);
}

#[tokio::test]
async fn anthropic_metadata_user_id_is_the_body_user() {
    let sink = MemorySink::new();
    let app = upstream(Received::default()).layer(MeteringLayer::new(sink.clone()));
    let body =
        r#"{"model":"claude-sonnet-4-5","max_tokens":64,"metadata":{"user_id":"customer-9"},"messages":[]}"#;
    let request = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    send_oneshot(app, request).await;
    let events = sink.wait_for(4, Duration::from_secs(5)).await.unwrap();
    assert!(events.iter().all(|e| e.subject.as_str() == "customer-9"));
}

#[tokio::test]
async fn json_media_types_are_matched_like_the_response_side_case_insensitively() {
    for content_type in ["Application/JSON; charset=utf-8", "application/vnd.acme+JSON"] {
        let sink = MemorySink::new();
        let layer = MeteringLayer::new(sink.clone());
        let stats = layer.stats();
        let app = upstream(Received::default()).layer(layer);
        let request = Request::post("/v1/chat/completions")
            .header("content-type", content_type)
            .body(Body::from(r#"{"model":"gpt-4o","user":"customer-1"}"#))
            .unwrap();
        assert_eq!(send_oneshot(app, request).await, CHAT.as_bytes());
        let s = stats.snapshot();
        assert_eq!((s.skipped_not_json, s.requests_metered), (0, 1), "{content_type}");
        let events = sink.wait_for(3, std::time::Duration::from_secs(5)).await.unwrap();
        assert_eq!(events.len(), 3, "{content_type}");
        assert!(
            events.iter().all(|e| e.subject.as_str() == "customer-1"),
            "{content_type}"
        );
    }
}
