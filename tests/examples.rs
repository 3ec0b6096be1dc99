//! The self-contained examples run as tests: their `run` functions check their own results.

#[allow(dead_code)]
#[path = "../examples/auth_subject.rs"]
mod auth_subject;
#[allow(dead_code)]
#[path = "../examples/custom_events.rs"]
mod custom_events;
#[allow(dead_code)]
#[path = "../examples/hyper_server.rs"]
mod hyper_server;

#[tokio::test]
async fn hyper_server_meters_its_request() {
    let events = hyper_server::run().await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.subject.as_str() == "customer-1" && e.source == "hyper-server")
    );
    assert_eq!(events[1].data["type"], "output");
    assert_eq!(events[1].data["tokens"], 3);
}

#[tokio::test]
async fn auth_subject_bills_the_key_owner_not_the_forged_user() {
    let events = auth_subject::run().await.unwrap();
    assert_eq!(events.len(), 2, "the unauthenticated request is not metered");
    assert!(events.iter().all(|e| e.subject.as_str() == "acme"));
}

#[tokio::test]
async fn custom_events_shapes() {
    let [with_fields, per_request, custom] = custom_events::run().await.unwrap();
    let types: Vec<_> = with_fields
        .iter()
        .map(|e| e.data["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["input", "cache_read", "cache_write", "output"]);
    assert_eq!(per_request[0].data["prompt_tokens"], 5520);
    assert_eq!(per_request[0].data["completion_tokens"], 90);
    assert_eq!(custom[0].data["price_class"], "standard");
}
