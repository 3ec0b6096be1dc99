//! Interleaved with/without measurement, robust to a noisy shared machine: for each case, many
//! short rounds alternate a batch of requests without the layer and a batch with it; the
//! per-request medians over rounds give the added time and the ratio.
//!
//! `cargo bench --bench paired` (about a minute). `PAIRED_ONLY=with|without PAIRED_CASE=chat_1KiB`
//! loops one side of one case, for a profiler. `PAIRED_COLD=1` evicts the CPU caches before
//! each request and times requests one by one (a few minutes): closer to what a server sees.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

use common::{Fixture, chat_completion, drain, embeddings, layer, sse_stream, with_layer, without_layer};

async fn batch<S, B>(service: &S, fixture: &Fixture, n: u32) -> Duration
where
    S: Service<http::Request<http_body_util::Full<bytes::Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    if let Some(evict) = cold_caches() {
        // Each request timed alone, after the caches were filled with other data, as in a
        // server where the kernel's network stack and other requests run in between.
        let mut total = Duration::ZERO;
        for _ in 0..n {
            evict();
            let request = fixture.request();
            let start = Instant::now();
            let response = service.clone().oneshot(request).await.unwrap();
            black_box(drain(response.into_body()).await);
            total += start.elapsed();
        }
        return total;
    }
    let start = Instant::now();
    for _ in 0..n {
        let response = service.clone().oneshot(fixture.request()).await.unwrap();
        black_box(drain(response.into_body()).await);
    }
    start.elapsed()
}

/// With `PAIRED_COLD=1`: a function that evicts the CPU caches (it writes a buffer larger
/// than L2), called before each request.
fn cold_caches() -> Option<fn()> {
    use std::sync::OnceLock;
    static COLD: OnceLock<bool> = OnceLock::new();
    if !*COLD.get_or_init(|| std::env::var("PAIRED_COLD").is_ok_and(|v| v == "1")) {
        return None;
    }
    Some(|| {
        thread_local! {
            static SWEEP: std::cell::RefCell<Vec<u64>> = std::cell::RefCell::new(vec![0; 16 << 20 >> 3]);
        }
        SWEEP.with_borrow_mut(|buffer| {
            for (i, word) in buffer.iter_mut().enumerate().step_by(8) {
                *word = word.wrapping_add(i as u64);
            }
            black_box(&buffer);
        });
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(rt: &Runtime, name: &str, fixture: &Fixture, only: Option<&str>) {
    let (layer, _sink, stats) = layer();
    let metered = with_layer(fixture, &layer);
    let plain = without_layer(fixture);
    // Batch size: about 2 ms of work per batch.
    let probe = rt.block_on(batch(&metered, fixture, 10)) / 10;
    let n = (Duration::from_millis(2).as_nanos() / probe.as_nanos().max(1)).clamp(1, 20_000) as u32;
    if let Some(only) = only {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match only {
                "with" => rt.block_on(batch(&metered, fixture, n)),
                _ => rt.block_on(batch(&plain, fixture, n)),
            };
        }
        return;
    }
    let rounds = 60;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which side goes first.
        let (a, b) = if round % 2 == 0 {
            let a = rt.block_on(batch(&plain, fixture, n));
            (a, rt.block_on(batch(&metered, fixture, n)))
        } else {
            let b = rt.block_on(batch(&metered, fixture, n));
            (rt.block_on(batch(&plain, fixture, n)), b)
        };
        without.push(a.as_nanos() as f64 / f64::from(n));
        with.push(b.as_nanos() as f64 / f64::from(n));
    }
    let (w, wo) = (median(with), median(without));
    let metered = stats.snapshot().requests_metered > 0;
    println!(
        "{name:<18} {:>10} {wo:>12.0} {w:>12.0} {:>12.0} {:>8.2}{}",
        fixture.len,
        w - wo,
        w / wo,
        if metered { "" } else { "  (not metered)" }
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("PAIRED_ONLY").ok();
    let case = std::env::var("PAIRED_CASE").ok();
    let cases = [
        ("chat_1KiB", chat_completion(1024)),
        ("chat_64KiB", chat_completion(64 * 1024)),
        ("chat_1MiB", chat_completion(1024 * 1024)),
        ("embeddings_1536", embeddings(1536)),
        ("sse_10", sse_stream(10)),
        ("sse_1000", sse_stream(1000)),
        ("sse_100000", sse_stream(100_000)),
    ];
    if only.is_none() {
        println!(
            "{:<18} {:>10} {:>12} {:>12} {:>12} {:>8}",
            "case", "bytes", "without_ns", "with_ns", "added_ns", "ratio"
        );
    }
    // Criterion passes `--bench`; any other argument filters cases by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for (name, fixture) in &cases {
        if case.as_deref().is_some_and(|c| c != *name) {
            continue;
        }
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        run(&rt, name, fixture, only.as_deref());
    }
}
