//! Allocations and peak memory of the metering layer, counted by dhat (a safe
//! `#[global_allocator]`): allocations added per request for each response kind, per plain SSE
//! delta chunk, and the peak heap a large JSON response holds against `max_response_body`.
//!
//! `cargo bench --bench alloc`

mod common;

use std::process::Command;

use tower::ServiceExt;

use common::{
    Fixture, chat_completion, drain, embeddings, large_chat_completion, layer, sse_stream, with_layer,
    without_layer,
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const REQUESTS: u64 = 200;

/// Allocation count and bytes per request, with and without the layer.
fn per_request(rt: &tokio::runtime::Runtime, fixture: &Fixture) -> [(f64, f64); 2] {
    let (layer, _sink, _stats) = layer();
    let metered = with_layer(fixture, &layer);
    let plain = without_layer(fixture);
    let mut out = [(0.0, 0.0); 2];
    for (i, slot) in out.iter_mut().enumerate() {
        // One warm-up request each (lazy statics, thread locals).
        rt.block_on(async {
            drain(
                metered
                    .clone()
                    .oneshot(fixture.request())
                    .await
                    .unwrap()
                    .into_body(),
            )
            .await;
            drain(
                plain
                    .clone()
                    .oneshot(fixture.request())
                    .await
                    .unwrap()
                    .into_body(),
            )
            .await;
        });
        let before = dhat::HeapStats::get();
        rt.block_on(async {
            for _ in 0..REQUESTS {
                if i == 0 {
                    drain(
                        plain
                            .clone()
                            .oneshot(fixture.request())
                            .await
                            .unwrap()
                            .into_body(),
                    )
                    .await;
                } else {
                    drain(
                        metered
                            .clone()
                            .oneshot(fixture.request())
                            .await
                            .unwrap()
                            .into_body(),
                    )
                    .await;
                }
            }
        });
        let after = dhat::HeapStats::get();
        *slot = (
            (after.total_blocks - before.total_blocks) as f64 / REQUESTS as f64,
            (after.total_bytes - before.total_bytes) as f64 / REQUESTS as f64,
        );
    }
    out
}

/// Runs in a child process: the peak heap above the starting point during one request.
fn peak(size: usize, metered: bool) {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let fixture = large_chat_completion(size);
    let (layer, _sink, stats) = layer();
    let before = dhat::HeapStats::get();
    let len = rt.block_on(async {
        if metered {
            drain(
                with_layer(&fixture, &layer)
                    .oneshot(fixture.request())
                    .await
                    .unwrap()
                    .into_body(),
            )
            .await
        } else {
            drain(
                without_layer(&fixture)
                    .oneshot(fixture.request())
                    .await
                    .unwrap()
                    .into_body(),
            )
            .await
        }
    });
    assert_eq!(len, fixture.len);
    let after = dhat::HeapStats::get();
    let s = stats.snapshot();
    println!(
        "{} {} {}",
        after.max_bytes.saturating_sub(before.curr_bytes),
        s.requests_metered,
        s.response_over_cap
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("peak") {
        return peak(args[2].parse().unwrap(), args[3] == "with");
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();

    println!("Allocations per request ({REQUESTS} requests each)");
    println!(
        "{:<18} {:>14} {:>14} {:>12} {:>14}",
        "case", "allocs_without", "allocs_with", "added", "added_bytes"
    );
    let cases = [
        ("chat_1KiB", chat_completion(1024)),
        ("chat_64KiB", chat_completion(64 * 1024)),
        ("embeddings_1536", embeddings(1536)),
        ("sse_10", sse_stream(10)),
        ("sse_1000", sse_stream(1000)),
    ];
    let mut added = Vec::new();
    for (name, fixture) in &cases {
        let [(a0, b0), (a1, b1)] = per_request(&rt, fixture);
        println!(
            "{name:<18} {a0:>14.1} {a1:>14.1} {:>12.1} {:>14.0}",
            a1 - a0,
            b1 - b0
        );
        added.push(a1 - a0);
    }
    let per_chunk = (added[4] - added[3]) / 990.0;
    println!("added allocations per plain delta chunk (sse_1000 - sse_10) / 990: {per_chunk:.4}");

    println!();
    println!("Peak heap during one response (max_response_body = 4 MiB), frames freshly allocated");
    println!(
        "{:<14} {:>16} {:>16} {:>10} {:>10}",
        "body", "peak_without", "peak_with", "metered", "over_cap"
    );
    let exe = std::env::current_exe().unwrap();
    for size in [1 << 20, 4_000_000, 10_000_000] {
        let run = |side: &str| {
            let out = Command::new(&exe)
                .args(["peak", &size.to_string(), side])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8(out.stdout).unwrap();
            text.split_whitespace()
                .map(|s| s.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        };
        let without = run("without");
        let with = run("with");
        println!(
            "{:<14} {:>16} {:>16} {:>10} {:>10}",
            size, without[0], with[0], with[1], with[2]
        );
    }
}
