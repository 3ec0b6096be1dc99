//! The whole path: client → axum app with `MeteringLayer` → `OpenMeterSink` → the strict fake
//! OpenMeter, all on 127.0.0.1, with the fake failing for a while in the middle.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::upstream::*;
use support::{FakeOpenMeter, Fault};
use tower_openmeter::{MeteringLayer, OpenMeterSink};

/// A request path, its API name, and the per-type token counts the fake must receive for it.
type Case = (&'static str, &'static str, Vec<(&'static str, u64)>);

fn cases() -> Vec<Case> {
    vec![
        (
            "/v1/chat/completions",
            "chat.completions",
            vec![("input", 56), ("cache_read", 64), ("output", 40)],
        ),
        (
            "/v1/completions",
            "completions",
            vec![("input", 5), ("output", 7)],
        ),
        ("/v1/embeddings", "embeddings", vec![("input", 8)]),
        (
            "/v1/responses",
            "responses",
            vec![("input", 172), ("cache_read", 128), ("output", 50)],
        ),
        (
            "/v1/messages",
            "messages",
            vec![
                ("input", 20),
                ("cache_read", 4000),
                ("cache_write", 1500),
                ("output", 90),
            ],
        ),
    ]
}

#[tokio::test]
async fn every_api_reaches_openmeter_exactly_once_despite_faults() {
    let fake = FakeOpenMeter::start_with_key("om_test_key").await;
    let sink = OpenMeterSink::builder(fake.base_url())
        .api_key("om_test_key")
        .batch_size(7)
        .flush_interval(Duration::from_millis(20))
        .request_timeout(Duration::from_millis(500))
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .build()
        .unwrap();
    let layer = MeteringLayer::builder()
        .sink(sink.clone())
        .source("e2e-gateway")
        .build();
    let stats = layer.stats();
    let base = serve(upstream(Received::default()).layer(layer)).await;

    const N: usize = 6;
    let mut want: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut total_events = 0;
    for round in 0..N {
        if round == 2 {
            fake.fail_next(3, Fault::ServerError);
        }
        if round == 4 {
            fake.fail_next(1, Fault::AcceptThenServerError);
        }
        for (path, api, tokens) in cases() {
            let subject = format!("customer-{round}");
            let body = json!({"model": "m", "user": subject}).to_string();
            let response = client()
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            for (ty, n) in tokens {
                want.insert((subject.clone(), api.to_owned(), ty.to_owned()), n);
                total_events += 1;
            }
        }
    }

    let events = fake
        .wait_for_events(total_events, Duration::from_secs(20))
        .await
        .unwrap();
    let mut got: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for event in &events {
        assert_eq!(event["source"], "e2e-gateway");
        assert_eq!(event["type"], "prompt");
        let data = &event["data"];
        let key = (
            event["subject"].as_str().unwrap().to_owned(),
            data["api"].as_str().unwrap().to_owned(),
            data["type"].as_str().unwrap().to_owned(),
        );
        assert_eq!(
            got.insert(key, data["tokens"].as_u64().unwrap()),
            None,
            "each event once: {event:?}"
        );
        let id = event["id"].as_str().unwrap();
        assert!(
            id.ends_with(&format!("/{}", data["type"].as_str().unwrap())),
            "{id}"
        );
    }
    assert_eq!(got, want);
    assert_eq!(events.len(), total_events);
    assert!(fake.requests_with_status(500) >= 4, "{:?}", fake.statuses());

    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_lossless(), "{report:?}");
    let sink_stats = sink.stats();
    assert_eq!(sink_stats.delivered, total_events as u64);
    assert!(sink_stats.retries >= 4);
    assert_eq!(stats.snapshot().events_emitted, total_events as u64);
    assert_eq!(stats.snapshot().requests_metered, (N * cases().len()) as u64);
}

#[tokio::test]
async fn an_array_subject_can_never_reach_openmeter() {
    // The Python proxy's bug: `subject` sent as a JSON array, so every event was rejected.
    let fake = FakeOpenMeter::start().await;
    let sink = OpenMeterSink::builder(fake.base_url())
        .flush_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let base = serve(upstream(Received::default()).layer(MeteringLayer::new(sink.clone()))).await;
    for user in [
        json!(["customer-1"]),
        json!(null),
        json!(""),
        json!({"id": 1}),
        json!(7),
    ] {
        client()
            .post(format!("{base}/v1/embeddings"))
            .header("content-type", "application/json")
            .body(json!({"user": user}).to_string())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    let events = fake.wait_for_events(5, Duration::from_secs(10)).await.unwrap();
    let mut subjects: Vec<&Value> = events.iter().map(|e| &e["subject"]).collect();
    subjects.sort_by_key(|s| s.to_string());
    assert_eq!(subjects, vec!["7", "unknown", "unknown", "unknown", "unknown"]);
    assert_eq!(fake.requests_with_status(400), 0);
    sink.shutdown(Duration::from_secs(5)).await;
}
