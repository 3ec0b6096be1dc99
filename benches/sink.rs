//! `OpenMeterSink` throughput and `send` cost, against a minimal axum ingest endpoint on
//! 127.0.0.1.
//!
//! `cargo bench --bench sink -- --quick` (see BENCHMARKS.md, section "Sink").

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Map;
use tokio::runtime::Runtime;
use tower_openmeter::{CloudEvent, EventSink, OpenMeterSink, Subject};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A realistic per-token-type event (about 250 bytes of JSON).
fn event(i: u64) -> CloudEvent {
    let mut data = Map::new();
    data.insert("tokens".into(), 1234.into());
    data.insert("type".into(), "input".into());
    data.insert("model".into(), "gpt-4o-mini".into());
    data.insert("provider".into(), "openai".into());
    data.insert("api".into(), "chat.completions".into());
    CloudEvent::new(
        format!("chatcmpl-{i:016x}/input"),
        "bench-gateway",
        "prompt",
        Subject::new("customer-42").expect("subject"),
        data,
    )
}

/// Counts the events of each batch it acknowledges with 204.
async fn ingest(State(acked): State<Arc<AtomicU64>>, body: Bytes) -> StatusCode {
    match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body) {
        Ok(events) => {
            acked.fetch_add(events.len() as u64, Ordering::Relaxed);
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// Starts the minimal ingest endpoint; returns its base URL.
async fn fake_openmeter() -> String {
    let acked = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/api/v1/events", post(ingest))
        .with_state(acked);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn dead_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    format!("http://{addr}")
}

async fn wait_delivered(sink: &OpenMeterSink, target: u64) {
    while sink.stats().delivered < target {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Events per second from `send` to the endpoint's acknowledgement, by batch size.
fn delivered_throughput(c: &mut Criterion) {
    let rt = runtime();
    let base = rt.block_on(fake_openmeter());
    let mut group = c.benchmark_group("sink/delivered");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (batch_size, events) in [(1usize, 2_000u64), (100, 50_000), (1000, 100_000)] {
        let sink = rt.block_on(async {
            OpenMeterSink::builder(&base)
                .batch_size(batch_size)
                .flush_interval(Duration::from_millis(2))
                .queue_capacity(200_000)
                .build()
                .expect("sink")
        });
        bench_delivery(&mut group, &rt, &sink, batch_size, events);
        let report = rt.block_on(sink.shutdown(Duration::from_secs(10)));
        assert!(report.is_lossless(), "{report:?}");
    }
    group.finish();
}

/// Times `events` sends until the fake acknowledged them all, as one criterion benchmark.
fn bench_delivery(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    sink: &OpenMeterSink,
    batch_size: usize,
    events: u64,
) {
    group.throughput(Throughput::Elements(events));
    group.bench_function(BenchmarkId::from_parameter(format!("batch_{batch_size}")), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let sink = sink.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let target = sink.stats().delivered + events;
                    let started = Instant::now();
                    for i in 0..events {
                        sink.send(event(i));
                    }
                    wait_delivered(&sink, target).await;
                    total += started.elapsed();
                }
                total
            }
        });
    });
}

/// The same as `delivered_throughput` through the durable spool (feature `spool`): every event
/// is group-committed to disk (fsync), read back, posted and removed. Default spool settings
/// (commit every 5 ms or 1000 events); the spool lives in a temporary directory.
#[cfg(feature = "spool")]
fn spooled_throughput(c: &mut Criterion) {
    use tower_openmeter::spool::SpoolConfig;

    let rt = runtime();
    let base = rt.block_on(fake_openmeter());
    let mut group = c.benchmark_group("sink/spooled");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (batch_size, events) in [(100usize, 50_000u64), (1000, 100_000)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = rt.block_on(async {
            OpenMeterSink::builder(&base)
                .batch_size(batch_size)
                .flush_interval(Duration::from_millis(2))
                .queue_capacity(200_000)
                .spool(SpoolConfig::new(dir.path()))
                .build()
                .expect("sink")
        });
        bench_delivery(&mut group, &rt, &sink, batch_size, events);
        let report = rt.block_on(sink.shutdown(Duration::from_secs(10)));
        assert!(report.is_lossless(), "{report:?}");
        assert_eq!(report.stats.spooled, 0, "{report:?}");
    }
    group.finish();
}

/// The cost of `send` alone: into a queue with room (drained concurrently), and when full.
fn send_latency(c: &mut Criterion) {
    let rt = runtime();
    let base = rt.block_on(fake_openmeter());
    let mut group = c.benchmark_group("sink/send");
    group.measurement_time(Duration::from_secs(3));
    const CHUNK: u64 = 50_000;
    let sink = rt.block_on(async {
        OpenMeterSink::builder(&base)
            .batch_size(1000)
            .queue_capacity(CHUNK as usize)
            .flush_interval(Duration::from_millis(2))
            .build()
            .expect("sink")
    });
    group.bench_function("queue_has_room", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                let events: Vec<_> = (0..n).map(event).collect();
                let started = Instant::now();
                for e in events {
                    sink.send(black_box(e));
                }
                total += started.elapsed();
                left -= n;
                // Untimed: let the queue drain so that the next chunk has room.
                while sink.stats().queued > 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            total
        });
    });
    assert_eq!(
        sink.stats().dropped_queue_full,
        0,
        "the timed sends all found room"
    );
    rt.block_on(sink.shutdown(Duration::from_secs(10)));

    let full = rt.block_on(async {
        let sink = OpenMeterSink::builder(dead_endpoint().await)
            .queue_capacity(1)
            .max_in_flight(1)
            .batch_size(1)
            .build()
            .expect("sink");
        for i in 0..10 {
            sink.send(event(i));
        }
        sink
    });
    group.bench_function("queue_full_drop", |b| {
        b.iter_batched(|| event(7), |e| full.send(e), criterion::BatchSize::SmallInput);
    });
    rt.block_on(full.shutdown(Duration::from_millis(10)));
    group.finish();
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Memory held with the default queue (100 000 events) full, endpoint down: RSS before and
/// after filling it, and the events' JSON size for comparison. Printed, not a criterion figure.
fn memory_with_queue_full(_c: &mut Criterion) {
    let rt = runtime();
    rt.block_on(async {
        let sink = OpenMeterSink::builder(dead_endpoint().await)
            .max_in_flight(1)
            .build()
            .expect("sink");
        let json_bytes = serde_json::to_vec(&event(1)).map(|v| v.len()).unwrap_or(0);
        let before = resident_bytes();
        let mut sent = 0;
        while sink.stats().queued < 100_000 {
            sink.send(event(sent));
            sent += 1;
            if sent % 10_000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let after = resident_bytes();
        let stats = sink.stats();
        let held = stats.queued + stats.in_flight;
        eprintln!(
            "sink/memory: {held} events held (queued {}, in flight {}), RSS +{:.1} MiB = {} bytes/event; \
             JSON {json_bytes} bytes/event ({:.1} MiB), size_of::<CloudEvent>() = {}",
            stats.queued,
            stats.in_flight,
            (after - before) as f64 / (1 << 20) as f64,
            (after - before) / held.max(1),
            (json_bytes as u64 * held) as f64 / (1 << 20) as f64,
            std::mem::size_of::<CloudEvent>(),
        );
        sink.shutdown(Duration::from_millis(10)).await;
    });
}

criterion_group!(
    benches,
    memory_with_queue_full,
    send_latency,
    delivered_throughput
);
#[cfg(feature = "spool")]
criterion_group!(spool_benches, spooled_throughput);
#[cfg(feature = "spool")]
criterion_main!(benches, spool_benches);
#[cfg(not(feature = "spool"))]
criterion_main!(benches);
