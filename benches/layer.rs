//! End-to-end overhead of the metering layer, in process: the same `service_fn` upstream with
//! and without `MeteringLayer`, called with `oneshot`, request body read by the upstream and
//! response body collected to the end. Each group runs `with_layer` and `without_layer` side by
//! side; `scripts/bench_table.sh` prints the added time and the ratio.
//!
//! `cargo bench --bench layer` (a few minutes).

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tower::ServiceExt;

use common::{Fixture, chat_completion, drain, embeddings, layer, sse_stream, with_layer, without_layer};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs one request through the layer and checks it was metered, so the benchmark measures the
/// metering path and not a skip.
fn assert_metered(rt: &Runtime, fixture: &Fixture) {
    let (layer, sink, stats) = layer();
    let service = with_layer(fixture, &layer);
    let len =
        rt.block_on(async { drain(service.oneshot(fixture.request()).await.unwrap().into_body()).await });
    assert_eq!(len, fixture.len);
    let snapshot = stats.snapshot();
    if snapshot.requests_metered != 1 || sink.0.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        let body: Vec<u8> = fixture.frames.iter().flat_map(|f| f.iter().copied()).collect();
        let parsed = serde_json::from_slice::<serde_json::Value>(&body).map(|_| ());
        eprintln!(
            "warning: {} ({}) not metered ({parsed:?}): {snapshot:?}",
            fixture.path, fixture.content_type
        );
    }
}

fn pair(c: &mut Criterion, group: &str, cases: &[(&str, Fixture)], samples: usize, seconds: u64) {
    let rt = runtime();
    let mut g = c.benchmark_group(group);
    g.sample_size(samples)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(seconds));
    for (name, fixture) in cases {
        assert_metered(&rt, fixture);
        g.throughput(Throughput::Bytes(fixture.len as u64));
        let (layer, _sink, _stats) = layer();
        let metered = with_layer(fixture, &layer);
        let plain = without_layer(fixture);
        g.bench_with_input(BenchmarkId::new("without_layer", name), fixture, |b, f| {
            b.to_async(&rt).iter(|| async {
                let response = plain.clone().oneshot(f.request()).await.unwrap();
                black_box(drain(response.into_body()).await)
            })
        });
        g.bench_with_input(BenchmarkId::new("with_layer", name), fixture, |b, f| {
            b.to_async(&rt).iter(|| async {
                let response = metered.clone().oneshot(f.request()).await.unwrap();
                black_box(drain(response.into_body()).await)
            })
        });
    }
    g.finish();
}

/// JSON responses: a 1 KiB chat completion, 64 KiB and 1 MiB completions, 1536-float embeddings.
fn json(c: &mut Criterion) {
    let cases = [
        ("chat_1KiB", chat_completion(1024)),
        ("chat_64KiB", chat_completion(64 * 1024)),
        ("embeddings_1536", embeddings(1536)),
    ];
    pair(c, "json", &cases, 100, 3);
    pair(
        c,
        "json_1MiB",
        &[("chat_1MiB", chat_completion(1024 * 1024))],
        30,
        4,
    );
}

/// SSE chat completion streams of 10, 1 000 and 100 000 content chunks plus a usage chunk.
fn sse(c: &mut Criterion) {
    let cases = [("chunks_10", sse_stream(10)), ("chunks_1000", sse_stream(1000))];
    pair(c, "sse", &cases, 50, 3);
    pair(c, "sse_100k", &[("chunks_100000", sse_stream(100_000))], 10, 5);
}

/// Time to first byte of a 1 000-chunk stream: from the call to the first frame out of the body.
fn sse_first_byte(c: &mut Criterion) {
    let rt = runtime();
    let fixture = sse_stream(1000);
    let (layer, _sink, _stats) = layer();
    let metered = with_layer(&fixture, &layer);
    let plain = without_layer(&fixture);
    let mut g = c.benchmark_group("sse_first_byte");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::new("without_layer", "chunks_1000"), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let plain = plain.clone();
            let fixture = fixture.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let mut body = plain
                        .clone()
                        .oneshot(fixture.request())
                        .await
                        .unwrap()
                        .into_body();
                    let first = body.frame().await;
                    total += start.elapsed();
                    black_box(first);
                }
                total
            }
        })
    });
    g.bench_function(BenchmarkId::new("with_layer", "chunks_1000"), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let metered = metered.clone();
            let fixture = fixture.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let mut body = metered
                        .clone()
                        .oneshot(fixture.request())
                        .await
                        .unwrap()
                        .into_body();
                    let first = body.frame().await;
                    total += start.elapsed();
                    black_box(first);
                }
                total
            }
        })
    });
    g.finish();
}

criterion_group!(benches, json, sse, sse_first_byte);
criterion_main!(benches);
