//! `OpenMeterSink` and `HttpSink` against a strict fake OpenMeter over real HTTP on 127.0.0.1.

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use support::event_rules::BATCH;
use support::{FakeOpenMeter, Fault};
use tower_openmeter::sink::BuildError;
use tower_openmeter::{CloudEvent, EventSink, HttpSink, OpenMeterSink, OpenMeterSinkBuilder, Subject};

const WAIT: Duration = Duration::from_secs(10);

fn event(i: usize) -> CloudEvent {
    event_from("test-gateway", i)
}

fn event_from(source: &str, i: usize) -> CloudEvent {
    let mut data = Map::new();
    data.insert("tokens".into(), (i as u64).into());
    data.insert("type".into(), "input".into());
    let mut event = CloudEvent::new(
        format!("rec-{i}/input"),
        source,
        "prompt",
        Subject::new(format!("customer-{}", i % 3)).unwrap(),
        data,
    );
    event.time = "2026-12-04T16:00:00.000Z".into();
    event
}

/// Short intervals, timeouts and backoff so that faults resolve in milliseconds.
fn fast(base_url: &str) -> OpenMeterSinkBuilder {
    OpenMeterSink::builder(base_url)
        .flush_interval(Duration::from_millis(20))
        .request_timeout(Duration::from_millis(500))
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .max_retry_elapsed(Duration::from_secs(20))
}

/// A base URL where nothing listens: every connection is refused.
async fn dead_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("rec-{i}/input")).collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Asserts that every event of `0..n` arrived exactly once and the sink counted them.
async fn assert_all_delivered_once(fake: &FakeOpenMeter, sink: &OpenMeterSink, n: usize) {
    let arrived = fake.wait_for_events(n, WAIT).await;
    assert!(
        arrived.is_ok(),
        "only {} of {n} arrived",
        arrived.unwrap_err().len()
    );
    assert_eq!(sorted(fake.event_ids()), sorted(ids(0..n)));
    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.stats.delivered, n as u64, "{report:?}");
    assert!(report.is_lossless(), "{report:?}");
}

#[tokio::test]
async fn delivers_every_event_once_in_batches() {
    let fake = FakeOpenMeter::start().await;
    let sink = fast(&fake.base_url()).batch_size(100).build().unwrap();
    for i in 0..250 {
        sink.send(event(i));
    }
    assert_all_delivered_once(&fake, &sink, 250).await;
    let stats = sink.stats();
    assert!(stats.batches_sent >= 3, "{stats:?}");
    assert_eq!(stats.retries, 0);
    for request in fake.requests() {
        let batch: Vec<Value> = serde_json::from_slice(&request.body).unwrap();
        assert!((1..=100).contains(&batch.len()), "batch of {}", batch.len());
    }
}

#[tokio::test]
async fn a_full_batch_goes_at_once_and_a_partial_one_waits_for_the_flush_interval() {
    let fake = FakeOpenMeter::start().await;
    let sink = OpenMeterSink::builder(fake.base_url())
        .batch_size(10)
        .flush_interval(Duration::from_secs(3))
        .build()
        .unwrap();
    // The first event starts a batch; the tenth completes it and it is sent without waiting.
    let started = std::time::Instant::now();
    for i in 0..10 {
        sink.send(event(i));
    }
    fake.wait_for_events(10, Duration::from_secs(1)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    // Five more: a partial batch waits for the interval, then goes as one request.
    for i in 10..15 {
        sink.send(event(i));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.requests().len(),
        1,
        "a partial batch is held until its flush time"
    );
    fake.wait_for_events(15, Duration::from_secs(3)).await.unwrap();
    let sizes: Vec<usize> = fake
        .requests()
        .iter()
        .map(|r| serde_json::from_slice::<Vec<Value>>(&r.body).unwrap().len())
        .collect();
    assert_eq!(sizes, vec![10, 5]);
    assert!(sink.shutdown(Duration::from_secs(5)).await.is_lossless());
}

#[tokio::test]
async fn exact_wire_format() {
    let fake = FakeOpenMeter::start_with_key("om_test_key").await;
    let sink = fast(&fake.base_url()).api_key("om_test_key").build().unwrap();
    sink.send(event(1));
    sink.send(event(2));
    fake.wait_for_events(2, WAIT).await.unwrap();
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "one batch");
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/api/v1/events");
    let header = |name: &str| {
        let values: Vec<_> = request.headers.get_all(name).iter().collect();
        assert_eq!(values.len(), 1, "{name}: {values:?}");
        values[0].to_str().unwrap().to_owned()
    };
    assert_eq!(header("content-type"), "application/cloudevents-batch+json");
    assert_eq!(header("authorization"), "Bearer om_test_key");
    assert_eq!(
        std::str::from_utf8(&request.body).unwrap(),
        concat!(
            r#"[{"specversion":"1.0","id":"rec-1/input","source":"test-gateway","type":"prompt","#,
            r#""subject":"customer-1","time":"2026-12-04T16:00:00.000Z","data":{"tokens":1,"type":"input"}},"#,
            r#"{"specversion":"1.0","id":"rec-2/input","source":"test-gateway","type":"prompt","#,
            r#""subject":"customer-2","time":"2026-12-04T16:00:00.000Z","data":{"tokens":2,"type":"input"}}]"#
        )
    );
    assert_eq!(fake.statuses(), [(204, 1)].into());
    sink.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn no_authorization_header_without_a_key_and_trailing_slash_works() {
    let fake = FakeOpenMeter::start().await;
    let sink = fast(&format!("{}/", fake.base_url())).build().unwrap();
    assert_eq!(sink.endpoint().as_str(), fake.events_url());
    sink.send(event(0));
    fake.wait_for_events(1, WAIT).await.unwrap();
    let request = &fake.requests()[0];
    assert!(request.headers.get("authorization").is_none());
    assert_eq!(request.headers["content-type"], BATCH);
    sink.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http_sink_posts_to_the_full_endpoint_url() {
    let fake = FakeOpenMeter::start().await;
    let sink = HttpSink::builder(fake.events_url())
        .flush_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    for i in 0..5 {
        sink.send(event(i));
    }
    fake.wait_for_events(5, WAIT).await.unwrap();
    let report = sink.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.stats.delivered, 5);
    assert_eq!(fake.requests()[0].headers["content-type"], BATCH);
}

#[tokio::test]
async fn server_errors_are_retried_until_recovery() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_for(Duration::from_millis(400), Fault::ServerError);
    let sink = fast(&fake.base_url()).batch_size(10).build().unwrap();
    for i in 0..50 {
        sink.send(event(i));
    }
    let stats_before_recovery = {
        fake.wait_for_requests(6, WAIT).await;
        sink.stats()
    };
    assert_eq!(stats_before_recovery.delivered, 0, "{stats_before_recovery:?}");
    assert_all_delivered_once(&fake, &sink, 50).await;
    let stats = sink.stats();
    assert!(fake.requests_with_status(500) >= 6, "{:?}", fake.statuses());
    assert!(stats.retries >= 6, "{stats:?}");
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("HTTP 500"),
        "{stats:?}"
    );
}

#[tokio::test]
async fn partial_ingestion_then_500_is_deduplicated() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_next(2, Fault::AcceptThenServerError);
    let sink = fast(&fake.base_url()).batch_size(20).build().unwrap();
    for i in 0..20 {
        sink.send(event(i));
    }
    assert_all_delivered_once(&fake, &sink, 20).await;
    // The same batch, same bytes, three times: accepted, accepted again (duplicates), acked.
    assert_eq!(fake.duplicates(), 40);
    let bodies: Vec<_> = fake.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 3);
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "retries resend the same bytes"
    );
    assert_eq!(sink.stats().retries, 2);
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_next(1, Fault::TooManyRequests);
    let sink = fast(&fake.base_url()).build().unwrap();
    let started = Instant::now();
    sink.send(event(0));
    fake.wait_for_requests(1, WAIT).await;
    assert_all_delivered_once(&fake, &sink, 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "retried after {:?}, before Retry-After: 1",
        started.elapsed()
    );
    assert_eq!(fake.statuses(), [(204, 1), (429, 1)].into());
    assert_eq!(sink.stats().retries, 1);
}

#[tokio::test]
async fn a_batch_waiting_to_retry_does_not_hold_back_others() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_next(1, Fault::TooManyRequests);
    let sink = fast(&fake.base_url()).batch_size(1).build().unwrap();
    sink.send(event(0));
    fake.wait_for_requests(1, WAIT).await;
    sink.send(event(1));
    sink.send(event(2));
    let others = fake.wait_for_events(2, Duration::from_millis(800)).await;
    assert_eq!(sorted(fake.event_ids()), ids(1..3), "{others:?}");
    assert_all_delivered_once(&fake, &sink, 3).await;
}

#[tokio::test]
async fn hung_requests_time_out_and_are_retried() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_next(2, Fault::Hang(Duration::from_secs(3)));
    let sink = fast(&fake.base_url())
        .request_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    for i in 0..10 {
        sink.send(event(i));
    }
    assert_all_delivered_once(&fake, &sink, 10).await;
    let stats = sink.stats();
    assert_eq!(stats.retries, 2, "{stats:?}");
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("timeout"),
        "{stats:?}"
    );
}

#[tokio::test]
async fn connections_closed_mid_request_are_retried() {
    let fake = FakeOpenMeter::start().await;
    fake.fail_next(3, Fault::CloseConnection);
    let sink = fast(&fake.base_url()).build().unwrap();
    for i in 0..10 {
        sink.send(event(i));
    }
    assert_all_delivered_once(&fake, &sink, 10).await;
    assert_eq!(fake.connections_closed(), 3);
    assert_eq!(sink.stats().retries, 3);
}

#[tokio::test]
async fn survives_every_fault_in_turn_and_loses_nothing() {
    let fake = FakeOpenMeter::start().await;
    let sink = fast(&fake.base_url())
        .request_timeout(Duration::from_millis(200))
        .batch_size(10)
        .build()
        .unwrap();
    let faults = [
        Fault::ServerError,
        Fault::TooManyRequests,
        Fault::Hang(Duration::from_secs(2)),
        Fault::CloseConnection,
        Fault::AcceptThenServerError,
    ];
    for (round, fault) in faults.into_iter().enumerate() {
        let requests = fake.requests().len();
        fake.fail_next(2, fault);
        for i in round * 10..(round + 1) * 10 {
            sink.send(event(i));
        }
        fake.wait_for_requests(requests + 3, WAIT).await;
        assert!(
            fake.wait_for_events((round + 1) * 10, WAIT).await.is_ok(),
            "{fault:?}"
        );
    }
    assert_eq!(fake.faults_served(), 10);
    assert_all_delivered_once(&fake, &sink, 50).await;
    assert_eq!(sink.stats().retries, 10);
}

#[tokio::test]
async fn bad_request_is_rejected_counted_and_not_retried() {
    let fake = FakeOpenMeter::start().await;
    let sink = fast(&fake.base_url()).build().unwrap();
    // A source with a space is not a URI reference: OpenMeter answers 400.
    for i in 0..3 {
        sink.send(event_from("bad source", i));
    }
    fake.wait_for_requests(1, WAIT).await;
    let report = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(fake.requests().len(), 1, "a 400 is not retried");
    assert_eq!(fake.statuses(), [(400, 1)].into());
    let stats = report.stats;
    assert_eq!(stats.rejected, 3);
    assert_eq!(stats.rejected_by_status, [(400, 3)].into());
    assert_eq!((stats.retries, stats.delivered), (0, 0));
    let last_error = stats.last_error.unwrap_or_default();
    assert!(
        last_error.contains("HTTP 400") && last_error.contains("source"),
        "{last_error}"
    );
    assert!(fake.events().is_empty());
}

#[tokio::test]
async fn retry_time_exhausted_drops_and_counts() {
    let sink = fast(&dead_endpoint().await)
        .max_retry_elapsed(Duration::from_millis(300))
        .build()
        .unwrap();
    for i in 0..7 {
        sink.send(event(i));
    }
    let deadline = Instant::now() + WAIT;
    while sink.stats().dropped_retry_exhausted < 7 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = sink.stats();
    assert_eq!(stats.dropped_retry_exhausted, 7, "{stats:?}");
    assert!(stats.retries > 0);
    assert_eq!(stats.in_flight, 0);
    assert!(stats.last_error.unwrap_or_default().contains("connection"));
}

#[tokio::test]
async fn queue_full_drops_exactly_what_could_not_be_queued() {
    let sink = fast(&dead_endpoint().await)
        .queue_capacity(10)
        .batch_size(5)
        .max_in_flight(1)
        .build()
        .unwrap();
    // On this single-threaded runtime the background task cannot run during the loop: the
    // queue takes exactly 10 and every other send must return at once, dropped and counted.
    let started = Instant::now();
    for i in 0..1000 {
        sink.send(event(i));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(200),
        "1000 sends took {elapsed:?}"
    );
    let stats = sink.stats();
    assert_eq!((stats.queued, stats.dropped_queue_full), (10, 990), "{stats:?}");

    // Once the task takes two batches (one sending, one waiting for the in-flight slot), the
    // queue has room again; still, every event is accounted for.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 1000..1100 {
        sink.send(event(i));
    }
    let stats = sink.stats();
    assert_eq!(stats.queued, 10);
    assert_eq!(stats.in_flight, 10, "{stats:?}");
    assert_eq!(stats.dropped_queue_full, 1100 - 20, "{stats:?}");
    let report = sink.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.undelivered, 20);
}

#[tokio::test]
async fn a_records_events_are_queued_together_or_dropped_together() {
    let sink = fast(&dead_endpoint().await)
        .queue_capacity(10)
        .batch_size(5)
        .max_in_flight(1)
        .build()
        .unwrap();
    // Single-threaded runtime: the background task does not run during these sends. Records
    // of 3 events: three fit (9 events); the fourth finds one slot and is dropped whole.
    for record in 0..4 {
        sink.send_all((record * 3..record * 3 + 3).map(event).collect());
    }
    let stats = sink.stats();
    assert_eq!((stats.queued, stats.dropped_queue_full), (9, 3), "{stats:?}");
    // A single event still fits the last slot.
    sink.send(event(100));
    assert_eq!(sink.stats().queued, 10);
    let report = sink.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.undelivered, 10);
}

#[tokio::test]
async fn shutdown_flushes_events_sent_just_before() {
    let fake = FakeOpenMeter::start().await;
    // A long interval and a big batch: only the shutdown flush can send these.
    let sink = fast(&fake.base_url())
        .flush_interval(Duration::from_secs(3600))
        .batch_size(1000)
        .build()
        .unwrap();
    for i in 0..30 {
        sink.send(event(i));
    }
    let report = sink.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.flushed, 30, "{report:?}");
    assert_eq!(report.undelivered, 0);
    assert!(!report.timed_out);
    assert!(report.is_lossless());
    assert_eq!(sorted(fake.event_ids()), sorted(ids(0..30)));
}

#[tokio::test]
async fn shutdown_with_the_endpoint_down_reports_undelivered_within_the_timeout() {
    let sink = fast(&dead_endpoint().await).batch_size(10).build().unwrap();
    for i in 0..25 {
        sink.send(event(i));
    }
    let started = Instant::now();
    let report = sink.shutdown(Duration::from_millis(500)).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.undelivered, 25, "{report:?}");
    assert_eq!(report.flushed, 0);
    assert_eq!(report.stats.dropped_shutdown, 25);
    assert_eq!((report.stats.queued, report.stats.in_flight), (0, 0));
    assert!(!report.is_lossless());
}

#[tokio::test]
async fn shutdown_works_from_any_clone_and_stops_intake() {
    let fake = FakeOpenMeter::start().await;
    let sink = fast(&fake.base_url()).build().unwrap();
    let in_layer: Arc<dyn EventSink> = Arc::new(sink.clone());
    in_layer.send(event(0));
    let first = sink.clone().shutdown(Duration::from_secs(2)).await;
    assert_eq!(first.flushed, 1);
    in_layer.send(event(1));
    let again = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(again, first, "the same report");
    assert_eq!(sink.stats().dropped_shutdown, 1, "sent after shutdown");
    assert_eq!(fake.event_ids(), ids(0..1));
}

#[tokio::test]
async fn unauthorized_is_rejected_and_counted() {
    let fake = FakeOpenMeter::start_with_key("om_right").await;
    let sink = fast(&fake.base_url())
        .api_key("om_wrong")
        .batch_size(2)
        .build()
        .unwrap();
    for i in 0..4 {
        sink.send(event(i));
    }
    let report = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.stats.rejected_by_status, [(401, 4)].into(), "{report:?}");
    assert_eq!(report.stats.retries, 0);
    assert_eq!(fake.requests_with_status(401), 2);
}

/// Collects everything logged on this thread (the tests' runtime is single-threaded).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn api_key_never_appears_in_debug_or_logs() {
    const KEY: &str = "om_SECRET_d0_not_leak";
    let logs = Logs::default();
    let _guard = logs.capture();
    let fake = FakeOpenMeter::start_with_key("om_other").await;
    let builder = fast(&fake.base_url()).api_key(KEY);
    assert!(!format!("{builder:?}").contains(KEY));
    let sink = builder.build().unwrap();
    let debug = format!("{sink:?} {:?}", sink.as_http_sink());
    assert!(!debug.contains(KEY) && debug.contains("<redacted>"), "{debug}");
    for i in 0..3 {
        sink.send(event(i));
    }
    fake.wait_for_requests(1, WAIT).await;
    let report = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.stats.rejected, 3);
    assert!(!format!("{report:?}").contains(KEY));
    // The request really carried the key; the logs (at trace level, HTTP stack included) don't.
    assert_eq!(
        fake.requests()[0].headers["authorization"],
        format!("Bearer {KEY}").as_str()
    );
    let text = logs.text();
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains(KEY), "the key leaked into the logs:\n{text}");
}

#[tokio::test]
async fn dropping_the_last_handle_without_shutdown_logs_pending_events() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let sink = fast(&dead_endpoint().await).build().unwrap();
    let clone = sink.clone();
    for i in 0..5 {
        sink.send(event(i));
    }
    drop(sink);
    assert!(
        !logs.text().contains("dropped without shutdown"),
        "a clone is still alive"
    );
    drop(clone);
    let text = logs.text();
    assert!(text.contains("dropped without shutdown"), "{text}");
    assert!(text.contains("queued=5"), "{text}");
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    let error = OpenMeterSink::builder("http://127.0.0.1:9").build().unwrap_err();
    assert!(matches!(error, BuildError::NoRuntime), "{error:?}");
    assert!(error.to_string().contains("tokio runtime"));
    assert!(matches!(
        HttpSink::builder("http://127.0.0.1:9/x").build(),
        Err(BuildError::NoRuntime)
    ));
    assert!(OpenMeterSink::from_env().is_err());
}

#[tokio::test]
async fn invalid_configuration_is_an_error() {
    assert!(matches!(
        OpenMeterSink::builder("not a url").build(),
        Err(BuildError::InvalidUrl { .. })
    ));
    assert!(matches!(
        OpenMeterSink::builder("http://127.0.0.1:9")
            .api_key("line\nbreak")
            .build(),
        Err(BuildError::InvalidApiKey)
    ));
}
