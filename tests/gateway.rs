//! The gateway example's proxy in front of a fake upstream on 127.0.0.1: bytes, status and
//! headers pass through unchanged in both directions, errors become OpenAI-style JSON, and the
//! events reach the sink.

#[allow(dead_code)]
#[path = "../examples/gateway/proxy.rs"]
mod proxy;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{any, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use proxy::{Config, ShapeName};
use serde_json::{Value, json};
use support::upstream::{ChannelBody, client, serve};
use tokio::sync::mpsc;
use tower_openmeter::MemorySink;

const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1730000000,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{"cached_tokens":64}}}"#;

const SSE: [&str; 4] = [
    "data: {\"id\":\"chatcmpl-2\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-2\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-2\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
    "data: [DONE]\n\n",
];

/// What the upstream streams when usage was not asked for.
fn sse_without_usage() -> String {
    [SSE[0], SSE[1], SSE[3]].concat().replace(",\"usage\":null", "")
}

/// The sender of the latest `/controlled` stream.
#[derive(Clone, Default)]
struct Controlled(Arc<Mutex<Option<mpsc::Sender<Bytes>>>>);

impl Controlled {
    async fn take(&self) -> mpsc::Sender<Bytes> {
        for _ in 0..200 {
            if let Some(tx) = self.0.lock().unwrap().take() {
                return tx;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the upstream never got the streaming request");
    }
}

fn upstream(controlled: Controlled) -> Router {
    let chat = post(|| async {
        Response::builder()
            .header("content-type", "application/json")
            .header("x-request-id", "req-123")
            .header("openai-processing-ms", "42")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(Body::from(CHAT))
            .unwrap()
    });
    let sse = post(|| async {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            for chunk in SSE {
                tx.send(Bytes::from_static(chunk.as_bytes())).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::new(ChannelBody(rx)))
            .unwrap()
    });
    let controlled = post(move || {
        let controlled = controlled.clone();
        async move {
            let (tx, rx) = mpsc::channel(8);
            *controlled.0.lock().unwrap() = Some(tx);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::new(ChannelBody(rx)))
                .unwrap()
        }
    });
    let gzip = post(|| async {
        Response::builder()
            .status(StatusCode::CREATED)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(Body::from(&b"\x1f\x8b\x08\x00not really gzip"[..]))
            .unwrap()
    });
    let echo = any(|request: Request| async move {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let headers: HashMap<String, Vec<String>> = parts
            .headers
            .keys()
            .map(|k| {
                let values = parts
                    .headers
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                (k.as_str().to_owned(), values)
            })
            .collect();
        let echo = json!({
            "method": parts.method.as_str(), "path": parts.uri.path(), "query": parts.uri.query(),
            "headers": headers, "body": String::from_utf8_lossy(&body),
        });
        Response::builder()
            .status(StatusCode::IM_A_TEAPOT)
            .header("content-type", "application/json")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-upstream-end", "kept")
            .body(Body::from(echo.to_string()))
            .unwrap()
    });
    // Usage only when the request asks for it, as OpenAI does.
    let inject = post(|request: Request| async move {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let request: Value = serde_json::from_slice(&body).unwrap();
        let chunks = if request["stream_options"]["include_usage"] == true {
            SSE.concat()
        } else {
            sse_without_usage()
        };
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(chunks))
            .unwrap()
    });
    let sleep = post(|| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        CHAT
    });
    Router::new()
        .route("/v1/chat/completions", chat)
        .route("/sse/v1/chat/completions", sse)
        .route("/controlled/v1/chat/completions", controlled)
        .route("/gzip/v1/chat/completions", gzip)
        .route("/sleep/v1/chat/completions", sleep)
        .route("/inject/v1/chat/completions", inject)
        .route("/echo/{*rest}", echo)
}

fn config(vars: &[(&str, &str)]) -> Result<Config, proxy::ConfigError> {
    let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::from_lookup(|name| vars.get(name).cloned())
}

struct Setup {
    upstream: String,
    gateway: String,
    sink: MemorySink,
    controlled: Controlled,
}

/// A fake upstream and the gateway in front of it, configured by `vars` plus `UPSTREAM_URL`.
async fn setup(vars: &[(&str, &str)]) -> Setup {
    let controlled = Controlled::default();
    let upstream = serve(upstream(controlled.clone())).await;
    gateway_to(&upstream, vars, controlled).await
}

async fn gateway_to(upstream: &str, vars: &[(&str, &str)], controlled: Controlled) -> Setup {
    let mut vars = vars.to_vec();
    vars.push(("UPSTREAM_URL", upstream));
    let config = config(&vars).unwrap();
    let sink = MemorySink::new();
    let layer = config.metering.then(|| config.metering_layer(sink.clone()));
    let app = proxy::app(&config, proxy::upstream_client().unwrap(), layer);
    let gateway = serve(app).await;
    Setup {
        upstream: upstream.to_owned(),
        gateway,
        sink,
        controlled,
    }
}

/// Status, headers without `date`, body bytes.
async fn send_json(url: String, body: &str) -> (StatusCode, HeaderMap, Bytes) {
    let response = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let mut headers = response.headers().clone();
    headers.remove(header::DATE);
    (status, headers, response.bytes().await.unwrap())
}

async fn no_events(sink: &MemorySink) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.events(), vec![], "nothing is metered");
}

#[tokio::test]
async fn json_passes_through_byte_identical_and_is_metered() {
    let s = setup(&[("SUBJECT_HEADER", "x-customer")]).await;
    let request = r#"{"model":"gpt-4o","user":"forged","messages":[]}"#;
    let direct = send_json(format!("{}/v1/chat/completions", s.upstream), request).await;
    let response = client()
        .post(format!("{}/v1/chat/completions", s.gateway))
        .header("content-type", "application/json")
        .header("x-customer", "customer-7")
        .body(request)
        .send()
        .await
        .unwrap();
    let mut headers = response.headers().clone();
    headers.remove(header::DATE);
    assert_eq!(response.status(), direct.0);
    assert_eq!(headers, direct.1, "headers preserved, repeated ones included");
    assert_eq!(response.bytes().await.unwrap(), direct.2);
    assert_eq!(direct.2, CHAT.as_bytes());

    let events = s.sink.wait_for(3, Duration::from_secs(2)).await.unwrap();
    assert_eq!(events.len(), 3);
    for event in &events {
        assert_eq!(
            event.subject.as_str(),
            "customer-7",
            "SUBJECT_HEADER comes before body user"
        );
        assert_eq!(event.source, "tower-openmeter-gateway");
        assert_eq!(event.ty, "prompt");
    }
    let tokens: Vec<(Value, Value)> = events
        .iter()
        .map(|e| (e.data["type"].clone(), e.data["tokens"].clone()))
        .collect();
    assert_eq!(
        tokens,
        vec![
            (json!("input"), json!(56)),
            (json!("cache_read"), json!(64)),
            (json!("output"), json!(40))
        ]
    );
}

#[tokio::test]
async fn per_request_shape_and_source_from_env() {
    let s = setup(&[
        ("METERING_EVENT_SHAPE", "per-request"),
        ("METERING_SOURCE", "gw-test"),
    ])
    .await;
    let (status, _, _) = send_json(
        format!("{}/v1/chat/completions", s.gateway),
        r#"{"model":"gpt-4o","user":"customer-1"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events = s.sink.wait_for(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].ty, "litellm_tokens");
    assert_eq!(events[0].source, "gw-test");
    assert_eq!(events[0].subject.as_str(), "customer-1");
    assert_eq!(events[0].data["prompt_tokens"], 120);
    assert_eq!(events[0].data["completion_tokens"], 40);
    assert_eq!(events[0].data["total_tokens"], 160);
}

#[tokio::test]
async fn content_encoding_and_status_are_passed_on_undecoded() {
    let s = setup(&[]).await;
    let direct = send_json(format!("{}/gzip/v1/chat/completions", s.upstream), "{}").await;
    let via = send_json(format!("{}/gzip/v1/chat/completions", s.gateway), "{}").await;
    assert_eq!(via.0, StatusCode::CREATED);
    assert_eq!(via, direct);
    assert_eq!(via.1["content-encoding"], "gzip");
    assert_eq!(&via.2[..], b"\x1f\x8b\x08\x00not really gzip");
}

#[tokio::test]
async fn sse_passes_through_byte_identical() {
    let s = setup(&[]).await;
    let request =
        r#"{"model":"gpt-4o","user":"customer-1","stream":true,"stream_options":{"include_usage":true}}"#;
    let direct = send_json(format!("{}/sse/v1/chat/completions", s.upstream), request).await;
    let via = send_json(format!("{}/sse/v1/chat/completions", s.gateway), request).await;
    assert_eq!(via, direct);
    assert_eq!(via.2, SSE.concat().as_bytes());
    assert_eq!(via.1["content-type"], "text/event-stream");
    assert_eq!(via.1["cache-control"], "no-cache");
    let events = s.sink.wait_for(2, Duration::from_secs(2)).await.unwrap();
    let tokens: Vec<(&str, Value, Value)> = events
        .iter()
        .map(|e| {
            (
                e.subject.as_str(),
                e.data["type"].clone(),
                e.data["tokens"].clone(),
            )
        })
        .collect();
    assert_eq!(
        tokens,
        vec![
            ("customer-1", json!("input"), json!(9)),
            ("customer-1", json!("output"), json!(2))
        ]
    );
}

#[tokio::test]
async fn ensure_stream_usage_meters_streams_that_did_not_ask_and_the_client_sees_no_difference() {
    let s = setup(&[("METERING_ENSURE_STREAM_USAGE", "1")]).await;
    let request = r#"{"model":"gpt-4o","user":"customer-1","stream":true}"#;
    let direct = send_json(format!("{}/inject/v1/chat/completions", s.upstream), request).await;
    assert_eq!(direct.2, sse_without_usage().as_bytes());
    let via = send_json(format!("{}/inject/v1/chat/completions", s.gateway), request).await;
    assert_eq!(via.0, direct.0);
    assert_eq!(via.2, direct.2, "the client gets the stream it asked for");
    let events = s.sink.wait_for(2, Duration::from_secs(2)).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].data["tokens"], 9);
    assert_eq!(events[1].data["tokens"], 2);

    // Off (the default): the stream is passed on as is; without usage nothing can be billed,
    // and the loss is visible as one zero-token event with `usage_source: missing`.
    let s = setup(&[]).await;
    let via = send_json(format!("{}/inject/v1/chat/completions", s.gateway), request).await;
    assert_eq!(via.2, direct.2);
    let events = s.sink.wait_for(1, Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.sink.events().len(), 1, "{events:?}");
    assert_eq!(events[0].data["tokens"], 0);
    assert_eq!(events[0].data["usage_source"], "missing");
}

#[tokio::test]
async fn sse_chunks_reach_the_client_before_the_stream_ends() {
    let s = setup(&[]).await;
    let mut response = client()
        .post(format!("{}/controlled/v1/chat/completions", s.gateway))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","stream":true}"#)
        .send()
        .await
        .unwrap();
    let tx = s.controlled.take().await;
    let mut received = Vec::new();
    for chunk in SSE {
        tx.send(Bytes::from_static(chunk.as_bytes())).await.unwrap();
        // The chunk arrives while the upstream stream is still open: nothing is buffered.
        let got = tokio::time::timeout(Duration::from_secs(2), response.chunk())
            .await
            .expect("chunk forwarded at once")
            .unwrap()
            .unwrap();
        assert_eq!(got, chunk.as_bytes());
        received.extend_from_slice(&got);
    }
    drop(tx);
    assert_eq!(response.chunk().await.unwrap(), None);
    assert_eq!(received, SSE.concat().as_bytes());
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_upstream_and_the_proxy_keeps_serving() {
    let s = setup(&[("METERING_EVENT_SHAPE", "per-request")]).await;
    let mut response = client()
        .post(format!("{}/controlled/v1/chat/completions", s.gateway))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","user":"customer-1","stream":true}"#)
        .send()
        .await
        .unwrap();
    let tx = s.controlled.take().await;
    tx.send(Bytes::from_static(SSE[0].as_bytes())).await.unwrap();
    assert_eq!(response.chunk().await.unwrap().unwrap(), SSE[0].as_bytes());
    drop(response);
    tokio::time::timeout(Duration::from_secs(5), tx.closed())
        .await
        .expect("the upstream stream is dropped when the client goes away");

    // The cut stream is billed once, as incomplete and without usage (it never came).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = s.sink.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].data.get("complete"), Some(&json!(false)), "{events:?}");
    assert_eq!(
        events[0].data.get("usage_source"),
        Some(&json!("missing")),
        "{events:?}"
    );
    assert_eq!(events[0].subject.as_str(), "customer-1");

    let (status, _, body) = send_json(format!("{}/v1/chat/completions", s.gateway), "{}").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, CHAT.as_bytes()));
}

#[tokio::test]
async fn method_path_query_and_end_to_end_headers_are_forwarded_hop_by_hop_removed() {
    let s = setup(&[]).await;
    let response = client()
        .put(format!(
            "{}/echo/v1/files/a%20b?purpose=fine-tune&x=%2F",
            s.gateway
        ))
        .header("authorization", "Bearer sk-test-123")
        .header("x-keep", "yes")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
    let headers = response.headers().clone();
    let echo: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/echo/v1/files/a%20b");
    assert_eq!(echo["query"], "purpose=fine-tune&x=%2F");
    assert_eq!(echo["body"], "payload");
    let received = &echo["headers"];
    assert_eq!(received["authorization"], json!(["Bearer sk-test-123"]));
    assert_eq!(received["x-keep"], json!(["yes"]));
    assert_eq!(received["content-length"], json!(["7"]));
    let upstream_host = s.upstream.trim_start_matches("http://");
    assert_eq!(
        received["host"],
        json!([upstream_host]),
        "Host rewritten for the upstream"
    );
    for hop in [
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert!(
            received.get(hop).is_none(),
            "{hop} must not be forwarded: {received}"
        );
    }
    // And in the other direction.
    assert_eq!(headers["x-upstream-end"], "kept");
    assert!(headers.get("x-upstream-hop").is_none());
    assert!(headers.get("keep-alive").is_none());
    no_events(&s.sink).await;
}

#[test]
fn remove_hop_by_hop_removes_every_hop_by_hop_header() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("connection", "close, X-Named"),
        ("connection", "x-other"),
        ("x-named", "1"),
        ("x-other", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "x"),
        ("proxy-authenticate", "x"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("authorization", "Bearer sk"),
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ] {
        headers.append(name, value.parse().unwrap());
    }
    proxy::remove_hop_by_hop(&mut headers);
    let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    left.sort();
    assert_eq!(left, ["authorization", "content-encoding", "content-type"]);
}

#[test]
fn upstream_url_keeps_the_base_path_and_the_query() {
    let base = config(&[("UPSTREAM_URL", "https://example.com/openai/")])
        .unwrap()
        .upstream_url;
    let uri = "/v1/chat/completions?api-version=2024-10-21".parse().unwrap();
    assert_eq!(
        proxy::upstream_url(&base, &uri).as_str(),
        "https://example.com/openai/v1/chat/completions?api-version=2024-10-21"
    );
    let base = config(&[]).unwrap().upstream_url;
    let uri = "/v1/models".parse().unwrap();
    assert_eq!(
        proxy::upstream_url(&base, &uri).as_str(),
        "https://api.openai.com/v1/models"
    );
}

#[tokio::test]
async fn upstream_down_is_a_502_openai_error_and_nothing_is_metered() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let s = gateway_to(&dead, &[], Controlled::default()).await;
    let (status, headers, body) = send_json(
        format!("{}/v1/chat/completions", s.gateway),
        r#"{"model":"gpt-4o","user":"customer-1"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "application/json");
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["type"], "upstream_error");
    assert_eq!(error["error"]["code"], "upstream_unreachable");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream request failed")
    );
    no_events(&s.sink).await;
}

#[tokio::test]
async fn upstream_timeout_is_a_504_openai_error_and_nothing_is_metered() {
    let s = setup(&[("UPSTREAM_TIMEOUT", "0.3")]).await;
    let (status, _, body) = send_json(
        format!("{}/sleep/v1/chat/completions", s.gateway),
        r#"{"model":"gpt-4o","user":"customer-1"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout");
    no_events(&s.sink).await;
}

#[tokio::test]
async fn metering_off_runs_the_same_proxy_without_events() {
    let s = setup(&[("METERING", "off")]).await;
    let (status, _, body) = send_json(
        format!("{}/v1/chat/completions", s.gateway),
        r#"{"model":"gpt-4o","user":"customer-1"}"#,
    )
    .await;
    assert_eq!((status, &body[..]), (StatusCode::OK, CHAT.as_bytes()));
    no_events(&s.sink).await;
}

#[test]
fn config_defaults() {
    let c = config(&[]).unwrap();
    assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8080");
    assert_eq!(c.upstream_url.as_str(), "https://api.openai.com/");
    assert_eq!(c.upstream_timeout, proxy::DEFAULT_UPSTREAM_TIMEOUT);
    assert_eq!(c.openmeter_url, None);
    assert_eq!(c.openmeter_api_key, None);
    assert_eq!(c.subject_header, None);
    assert!(!c.ensure_stream_usage);
    assert_eq!(c.event_shape, ShapeName::PerTokenType);
    assert_eq!(c.event_type, "prompt");
    assert_eq!(c.source, "tower-openmeter-gateway");
    assert!(c.metering);
}

#[test]
fn config_reads_every_variable() {
    let c = config(&[
        ("LISTEN_ADDR", "0.0.0.0:9000"),
        ("UPSTREAM_URL", "http://localhost:4000/"),
        ("UPSTREAM_TIMEOUT", "2.5"),
        ("OPENMETER_URL", "http://localhost:8888"),
        ("OPENMETER_API_KEY", "om_key"),
        ("SUBJECT_HEADER", "X-Customer"),
        ("METERING_ENSURE_STREAM_USAGE", "1"),
        ("METERING_EVENT_SHAPE", "per-request"),
        ("METERING_SOURCE", "gw-1"),
        ("METERING", "off"),
        ("UNRELATED", "x"),
    ])
    .unwrap();
    assert_eq!(c.listen_addr.to_string(), "0.0.0.0:9000");
    assert_eq!(c.upstream_url.as_str(), "http://localhost:4000/");
    assert_eq!(c.upstream_timeout, Duration::from_millis(2500));
    assert_eq!(c.openmeter_url.unwrap().as_str(), "http://localhost:8888/");
    assert_eq!(c.openmeter_api_key.as_deref(), Some("om_key"));
    assert_eq!(c.subject_header.unwrap().as_str(), "x-customer");
    assert!(c.ensure_stream_usage);
    assert_eq!(c.event_shape, ShapeName::PerRequest);
    assert_eq!(c.event_type, "litellm_tokens");
    assert_eq!(c.source, "gw-1");
    assert!(!c.metering);
    // Empty means unset.
    assert_eq!(
        config(&[("LISTEN_ADDR", ""), ("METERING", " ")]).unwrap(),
        config(&[]).unwrap()
    );
}

#[test]
fn config_spool_dir_needs_openmeter_and_the_feature() {
    assert_eq!(config(&[]).unwrap().spool_dir, None);
    let error = config(&[("METERING_SPOOL_DIR", "/tmp/spool")]).unwrap_err();
    assert_eq!(error.var, "METERING_SPOOL_DIR");
    assert!(error.message.contains("OPENMETER_URL"));
    let with_url = config(&[
        ("OPENMETER_URL", "http://127.0.0.1:8888"),
        ("METERING_SPOOL_DIR", "/tmp/spool"),
    ]);
    if cfg!(feature = "spool") {
        assert_eq!(with_url.unwrap().spool_dir.unwrap().to_str(), Some("/tmp/spool"));
    } else {
        let error = with_url.unwrap_err();
        assert_eq!(error.var, "METERING_SPOOL_DIR");
        assert!(error.message.contains("feature"), "{error}");
    }
}

#[cfg(feature = "spool")]
#[tokio::test]
async fn the_gateway_sink_spools_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&[
        ("OPENMETER_URL", "http://127.0.0.1:9"),
        ("METERING_SPOOL_DIR", dir.path().to_str().unwrap()),
    ])
    .unwrap();
    let sink = c.openmeter_sink().unwrap().unwrap();
    assert!(dir.path().join(tower_openmeter::spool::SPOOL_FILE_NAME).exists());
    sink.shutdown(Duration::from_millis(100)).await;
}

#[test]
fn config_errors_name_the_variable() {
    for (var, value) in [
        ("LISTEN_ADDR", "localhost"),
        ("LISTEN_ADDR", "127.0.0.1:99999"),
        ("UPSTREAM_URL", "api.openai.com"),
        ("UPSTREAM_URL", "ftp://example.com"),
        ("UPSTREAM_URL", "https://example.com/?q=1"),
        ("UPSTREAM_TIMEOUT", "0"),
        ("UPSTREAM_TIMEOUT", "soon"),
        ("OPENMETER_URL", "openmeter.cloud"),
        ("SUBJECT_HEADER", "x customer"),
        ("METERING_ENSURE_STREAM_USAGE", "maybe"),
        ("METERING_EVENT_SHAPE", "per_token"),
        ("METERING", "disabled"),
    ] {
        let error = config(&[(var, value)]).expect_err(&format!("{var}={value} must be rejected"));
        assert_eq!(error.var, var);
        assert!(error.to_string().starts_with(var), "{error}");
    }
    let error = config(&[("OPENMETER_API_KEY", "om_key")]).unwrap_err();
    assert_eq!(error.var, "OPENMETER_API_KEY");
    assert!(error.message.contains("OPENMETER_URL"));
}

/// A gateway (no metering) with `drain` as its shutdown bound, and one streaming request in
/// flight through it whose first chunk has arrived; the test sends the rest through `tx`.
async fn gateway_with_one_stream(
    drain: Duration,
) -> (
    String,
    reqwest::Response,
    mpsc::Sender<Bytes>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<proxy::Stopped>>,
) {
    let controlled = Controlled::default();
    let upstream_base = serve(upstream(controlled.clone())).await;
    let config = config(&[("UPSTREAM_URL", &upstream_base)]).unwrap();
    let app = proxy::app(&config, proxy::upstream_client().unwrap(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let server = tokio::spawn(proxy::serve(listener, app, shutdown, drain));
    let mut response = client()
        .post(format!("{gateway}/controlled/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let tx = controlled.take().await;
    tx.send(Bytes::from_static(SSE[0].as_bytes())).await.unwrap();
    assert_eq!(response.chunk().await.unwrap().unwrap(), SSE[0].as_bytes());
    (gateway, response, tx, stop, server)
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_streams_finish() {
    let (gateway, mut response, tx, stop, server) = gateway_with_one_stream(Duration::from_secs(5)).await;

    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = client()
        .post(format!("{gateway}/v1/chat/completions"))
        .body("{}")
        .send()
        .await;
    assert!(refused.is_err(), "no new connections after shutdown: {refused:?}");

    for chunk in &SSE[1..] {
        tx.send(Bytes::from_static(chunk.as_bytes())).await.unwrap();
    }
    drop(tx);
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(
        rest,
        SSE[1..].concat().as_bytes(),
        "the in-flight stream finished"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped.unwrap(), proxy::Stopped::Drained);
}

#[tokio::test]
async fn shutdown_drain_is_bounded() {
    let (_, response, tx, stop, server) = gateway_with_one_stream(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped.unwrap(), proxy::Stopped::DrainTimedOut);
    // The binary then shuts its runtime down, which cuts the stream.
    drop((tx, response));
}

#[tokio::test]
async fn openmeter_url_sends_to_openmeter_and_shutdown_flushes() {
    let openmeter = support::FakeOpenMeter::start_with_key("om_test_key").await;
    let controlled = Controlled::default();
    let upstream_base = serve(upstream(controlled)).await;
    let config = config(&[
        ("UPSTREAM_URL", &upstream_base),
        ("OPENMETER_URL", &openmeter.base_url()),
        ("OPENMETER_API_KEY", "om_test_key"),
        ("METERING_EVENT_SHAPE", "per-request"),
    ])
    .unwrap();
    let sink = config.openmeter_sink().unwrap().unwrap();
    let app = proxy::app(
        &config,
        proxy::upstream_client().unwrap(),
        Some(config.metering_layer(sink.clone())),
    );
    let gateway = serve(app).await;
    let (status, _, _) = send_json(
        format!("{gateway}/v1/chat/completions"),
        r#"{"model":"gpt-4o","user":"customer-1"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_lossless(), "{report:?}");
    let events = openmeter.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "litellm_tokens");
    assert_eq!(events[0]["subject"], "customer-1");
    assert_eq!(events[0]["data"]["total_tokens"], 160);
}
