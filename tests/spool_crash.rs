//! The durable spool end to end (feature `spool`):
//!
//! - a metered server in a child process (this test binary, re-invoked) spools the usage of N
//!   requests while OpenMeter fails, is killed with `SIGKILL`, restarts with OpenMeter up, and
//!   every usage event arrives exactly once after OpenMeter's deduplication;
//! - an outage longer than the in-memory queue can hold: with the spool nothing is dropped;
//!   without it the drop counter tells exactly what was lost.
#![cfg(feature = "spool")]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use support::{FakeOpenMeter, Fault};
use tower_openmeter::sink::BuildError;
use tower_openmeter::spool::{SpoolConfig, SpoolErrorKind};
use tower_openmeter::{CloudEvent, EventSink, OpenMeterSink, Subject};

const CHILD_ENV: &str = "TOWER_OPENMETER_SPOOL_CHILD";
const REQUESTS: usize = 40;

/// The child: a metered server with a spool, as `examples/spool_server.rs`, which writes its
/// address to `$ADDR_FILE` once it serves. A no-op in a normal test run.
#[test]
fn spool_server_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(child_server());
}

async fn child_server() {
    use axum::Router;
    use axum::extract::{Json, State};
    use axum::routing::{get, post};
    use tower_openmeter::MeteringLayer;

    let dir = std::env::var("METERING_SPOOL_DIR").expect("METERING_SPOOL_DIR");
    let addr_file = PathBuf::from(std::env::var("ADDR_FILE").expect("ADDR_FILE"));
    let sink = OpenMeterSink::builder_from_env()
        .expect("env")
        .flush_interval(Duration::from_millis(20))
        .batch_size(16)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spool(SpoolConfig::new(dir).commit_interval(Duration::from_millis(2)))
        .build()
        .expect("sink");
    let chat = |Json(_): Json<Value>| async {
        Json(json!({"id": "chatcmpl-x", "model": "gpt-4o",
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}}))
    };
    let stats = |State(sink): State<OpenMeterSink>| async move {
        let s = sink.stats();
        Json(
            json!({"queued": s.queued, "in_flight": s.in_flight, "spooled": s.spooled,
                    "delivered": s.delivered, "dropped": s.dropped()}),
        )
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .layer(
            MeteringLayer::builder()
                .sink(sink.clone())
                .source("crash-test")
                .subject(Subject::body_user())
                .build(),
        )
        .route("/stats", get(stats))
        .with_state(sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tmp = addr_file.with_extension("tmp");
    std::fs::write(&tmp, listener.local_addr().expect("addr").to_string()).expect("write");
    std::fs::rename(&tmp, &addr_file).expect("rename");
    axum::serve(listener, app).await.expect("serve");
}

/// Runs this test binary's `spool_server_child` as a separate process.
fn start_child(spool: &Path, addr_file: &Path, openmeter: &str) -> Child {
    let exe = std::env::current_exe().expect("current exe");
    Command::new(exe)
        .args(["--exact", "spool_server_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("METERING_SPOOL_DIR", spool)
        .env("ADDR_FILE", addr_file)
        .env("OPENMETER_URL", openmeter)
        .env_remove("OPENMETER_API_KEY")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child")
}

async fn wait_for_addr(file: &Path, child: &mut Child) -> String {
    let started = Instant::now();
    loop {
        if let Ok(addr) = std::fs::read_to_string(file) {
            return format!("http://{addr}");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("child exited early: {status}");
        }
        assert!(started.elapsed() < Duration::from_secs(30), "child did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stats(client: &reqwest::Client, base: &str) -> Value {
    let body = client
        .get(format!("{base}/stats"))
        .send()
        .await
        .expect("stats")
        .bytes()
        .await
        .expect("stats body");
    serde_json::from_slice(&body).expect("stats json")
}

async fn wait_for_stats(client: &reqwest::Client, base: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let s = stats(client, base).await;
        if done(&s) {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stats never settled: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_usage_survives_sigkill_and_arrives_exactly_once() {
    crash_and_restart(Fault::ServerError).await;
}

/// OpenMeter ingests every batch but answers 500 (partial ingestion): the sink keeps the
/// events, the restart posts them again, and deduplication keeps one copy of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_ingested_before_the_crash_are_deduplicated_after_it() {
    crash_and_restart(Fault::AcceptThenServerError).await;
}

async fn crash_and_restart(fault: Fault) {
    let fake = FakeOpenMeter::start().await;
    fake.fail_for(Duration::from_secs(3600), fault);
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let client = reqwest::Client::builder().no_proxy().build().expect("client");

    // First run: OpenMeter fails; every event is committed to the spool; then SIGKILL.
    let addr_file = dir.path().join("addr-1");
    let mut child = KillOnDrop(start_child(&spool, &addr_file, &fake.base_url()));
    let base = wait_for_addr(&addr_file, &mut child.0).await;
    for i in 0..REQUESTS {
        let response = client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(json!({"model": "gpt-4o", "user": format!("customer-{i}")}).to_string())
            .send()
            .await
            .expect("request");
        assert!(response.status().is_success());
        response.bytes().await.expect("body");
    }
    let expected = (2 * REQUESTS) as u64;
    wait_for_stats(&client, &base, |s| {
        s["spooled"] == expected && s["queued"] == 0 && s["in_flight"] == 0
    })
    .await;
    assert!(fake.faults_served() > 0, "the sink did try to deliver");
    child.0.kill().expect("SIGKILL");
    let status = child.0.wait().expect("wait");
    assert!(!status.success(), "killed, not exited: {status}");
    if fault == Fault::ServerError {
        assert!(
            fake.events().is_empty(),
            "nothing was accepted while OpenMeter failed"
        );
    } else {
        assert!(
            !fake.events().is_empty(),
            "some batches were ingested before the crash"
        );
    }

    // Second run: OpenMeter is up; the spool is delivered without any new request.
    fake.recover();
    let addr_file = dir.path().join("addr-2");
    let mut child = KillOnDrop(start_child(&spool, &addr_file, &fake.base_url()));
    let base = wait_for_addr(&addr_file, &mut child.0).await;
    let events = fake
        .wait_for_events(2 * REQUESTS, Duration::from_secs(30))
        .await
        .unwrap_or_else(|got| panic!("only {} of {} events arrived", got.len(), 2 * REQUESTS));
    wait_for_stats(&client, &base, |s| {
        s["spooled"] == 0 && s["delivered"] == expected
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.events().len(), 2 * REQUESTS, "no extra event");
    if fault == Fault::AcceptThenServerError {
        assert!(fake.duplicates() > 0, "the restart posted ingested events again");
    }

    let mut by_subject: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for event in &events {
        let subject = event["subject"].as_str().expect("subject").to_owned();
        let data = event["data"].as_object().expect("data");
        let ty = data["type"].as_str().expect("type").to_owned();
        let tokens = data["tokens"].as_u64().expect("tokens");
        assert!(
            by_subject
                .entry(subject)
                .or_default()
                .insert(ty, tokens)
                .is_none()
        );
    }
    assert_eq!(by_subject.len(), REQUESTS);
    for (subject, tokens) in by_subject {
        assert_eq!(
            tokens,
            BTreeMap::from([("input".into(), 10), ("output".into(), 5)]),
            "{subject}"
        );
    }
}

fn event(i: usize) -> CloudEvent {
    let mut data = Map::new();
    data.insert("tokens".into(), (i as u64 + 1).into());
    data.insert("type".into(), "input".into());
    CloudEvent::new(
        format!("outage-{i}/input"),
        "outage-test",
        "prompt",
        Subject::new(format!("customer-{}", i % 7)).expect("subject"),
        data,
    )
}

const OUTAGE_EVENTS: usize = 1000;

/// Sends `OUTAGE_EVENTS` at about 1000 events/s into a sink whose queue holds 400 (a 400 ms
/// stall of the disk is absorbed), while
/// OpenMeter fails; then OpenMeter recovers and the sink shuts down.
async fn outage(fake: &FakeOpenMeter, spool: Option<&Path>) -> tower_openmeter::sink::SinkStats {
    fake.fail_for(Duration::from_secs(3600), Fault::ServerError);
    let mut builder = OpenMeterSink::builder(fake.base_url())
        .queue_capacity(400)
        .batch_size(20)
        .max_in_flight(1)
        .flush_interval(Duration::from_millis(10))
        .max_retry_elapsed(Duration::from_secs(3600))
        .backoff(Duration::from_millis(20), Duration::from_millis(100));
    if let Some(dir) = spool {
        builder = builder.spool(SpoolConfig::new(dir).commit_interval(Duration::from_millis(2)));
    }
    let sink = builder.build().expect("sink");
    for burst in 0..OUTAGE_EVENTS / 20 {
        for i in 0..20 {
            sink.send(event(burst * 20 + i));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.recover();
    let report = sink.shutdown(Duration::from_secs(20)).await;
    assert!(!report.timed_out, "{report:?}");
    report.stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_queue_loses_nothing_with_the_spool() {
    let fake = FakeOpenMeter::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = outage(&fake, Some(dir.path())).await;
    assert_eq!(stats.dropped(), 0, "{stats:?}");
    assert_eq!(stats.delivered, OUTAGE_EVENTS as u64, "{stats:?}");
    assert_eq!((stats.spooled, stats.queued, stats.in_flight), (0, 0, 0));
    assert_eq!(fake.events().len(), OUTAGE_EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_spool_the_drop_counter_tells_exactly_what_was_lost() {
    let fake = FakeOpenMeter::start().await;
    let stats = outage(&fake, None).await;
    assert!(stats.dropped_queue_full > 0, "the queue overflowed: {stats:?}");
    assert_eq!(stats.dropped(), stats.dropped_queue_full, "{stats:?}");
    assert_eq!(
        stats.delivered + stats.dropped(),
        OUTAGE_EVENTS as u64,
        "{stats:?}"
    );
    assert_eq!(fake.events().len() as u64, stats.delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_an_outage_keeps_the_events_for_the_next_start() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_for(Duration::from_secs(3600), Fault::ServerError);
    let dir = tempfile::tempdir().expect("tempdir");
    let build = || {
        OpenMeterSink::builder(fake.base_url())
            .batch_size(10)
            .flush_interval(Duration::from_millis(5))
            .backoff(Duration::from_millis(20), Duration::from_millis(50))
            .spool(SpoolConfig::new(dir.path()).commit_interval(Duration::from_millis(1)))
            .build()
            .expect("sink")
    };
    let sink = build();
    for i in 0..30 {
        sink.send(event(i));
    }
    let started = Instant::now();
    let report = sink.shutdown(Duration::from_millis(500)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.undelivered, 0, "{report:?}");
    assert_eq!(report.stats.spooled, 30, "{report:?}");
    assert_eq!(report.stats.dropped(), 0, "{report:?}");
    assert!(report.is_lossless(), "kept on disk is not lost: {report:?}");
    drop(sink);
    // The spool is released once the sink's tasks are done.
    let sink = loop {
        match OpenMeterSink::builder(fake.base_url())
            .flush_interval(Duration::from_millis(5))
            .spool(SpoolConfig::new(dir.path()))
            .build()
        {
            Ok(sink) => break sink,
            Err(error) => {
                assert!(started.elapsed() < Duration::from_secs(10), "{error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(sink.stats().spooled, 30);
    fake.recover();
    let events = fake
        .wait_for_events(30, Duration::from_secs(10))
        .await
        .expect("all arrive");
    assert_eq!(events.len(), 30);
    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (report.stats.delivered, report.stats.spooled),
        (30, 0),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_events_leave_the_spool_and_a_full_spool_counts_its_drops() {
    let fake = FakeOpenMeter::start_with_key("right").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ten: u64 = (0..10)
        .map(|i| serde_json::to_vec(&event(i)).expect("json").len() as u64)
        .sum();
    let sink = OpenMeterSink::builder(fake.base_url())
        .api_key("wrong")
        .flush_interval(Duration::from_millis(5))
        .spool(
            SpoolConfig::new(dir.path())
                // One record of 10 events: their JSON, 9 commas, a 4-byte count and brackets.
                .max_bytes(ten + 9 + 6)
                .commit_interval(Duration::from_millis(50)),
        )
        .build()
        .expect("sink");
    for i in 0..25 {
        sink.send(event(i));
    }
    let report = sink.shutdown(Duration::from_secs(5)).await;
    let stats = report.stats;
    assert_eq!(stats.dropped_spool_full, 15, "{stats:?}");
    assert_eq!(stats.rejected_by_status.get(&401), Some(&10), "{stats:?}");
    assert_eq!((stats.spooled, stats.spool_bytes), (0, 0), "{stats:?}");
    assert!(fake.events().is_empty());
}

#[tokio::test]
async fn a_spool_in_use_is_a_build_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = OpenMeterSink::builder("http://127.0.0.1:9")
        .spool(SpoolConfig::new(dir.path()))
        .build()
        .expect("first");
    let second = OpenMeterSink::builder("http://127.0.0.1:9")
        .spool(SpoolConfig::new(dir.path()))
        .build()
        .expect_err("the spool is locked");
    assert!(
        matches!(&second, BuildError::Spool(error) if error.kind() == SpoolErrorKind::Locked),
        "{second}"
    );
}
