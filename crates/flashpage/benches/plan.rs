//! Planning cost: `Plan::new` and `Plan::replan` (memory reused) for decode batches of 1, 64,
//! 256 and 1024 requests and a prefill batch of 16, llama3-8b heads (32 q / 8 KV, D 128),
//! page size 16, KV lengths drawn deterministically from 1..=32768; parallelism 264 (an
//! H100: 132 SMs × 2) and 2 (this CPU). `check_page_ids` (O(pages), run where the ids are
//! read, not part of planning) is timed separately for the same batches. Decode with 1000
//! requests sits beside 1024 to show the cost of a power-of-two capacity (the image's field
//! arrays are then 4 KiB apart and alias in the L1 cache; see docs/perf/plan.md).
//!
//! Run: `cargo bench --bench plan`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flashpage::validate::check_page_ids;
use flashpage::{AttentionOptions, BatchBuilder, HeadConfig, Plan, PlanConfig};
use flashpage_testkit::case::Rng;

const PAGE: usize = 16;

fn heads() -> HeadConfig {
    HeadConfig::new(32, 8, 128).unwrap()
}

/// A batch of `requests` with lengths drawn deterministically and shuffled page ids (as in
/// a real cache); returns the builder and the number of pages.
fn batch(requests: usize, prefill: bool) -> (BatchBuilder, usize) {
    let mut rng = Rng::new(requests as u64 * 7919 + prefill as u64);
    let lens: Vec<(usize, usize)> = (0..requests)
        .map(|_| {
            let kv = 1 + rng.below(32768);
            let qo = if prefill {
                1 + rng.below(kv.min(2048))
            } else {
                1
            };
            (qo, kv)
        })
        .collect();
    let pages: usize = lens.iter().map(|l| l.1.div_ceil(PAGE)).sum();
    let mut ids: Vec<i32> = (0..pages as i32).collect();
    rng.shuffle(&mut ids);
    let mut b = BatchBuilder::new(PAGE).unwrap();
    let mut next = 0;
    for (qo, kv) in lens {
        let n = kv.div_ceil(PAGE);
        b.push(qo, kv, &ids[next..next + n]).unwrap();
        next += n;
    }
    (b, pages)
}

fn bench(c: &mut Criterion) {
    let opts = AttentionOptions::default();
    let causal = opts.with_causal(true);
    let cases: Vec<(String, BatchBuilder, usize, bool)> = [1, 64, 256, 1000, 1024]
        .into_iter()
        .map(|n| {
            let (b, pages) = batch(n, false);
            (format!("decode/b{n}"), b, pages, false)
        })
        .chain(std::iter::once({
            let (b, pages) = batch(16, true);
            ("prefill/b16".to_string(), b, pages, true)
        }))
        .collect();

    for parallelism in [264, 2] {
        let config = PlanConfig::with_parallelism(parallelism);
        let mut g = c.benchmark_group(format!("plan/p{parallelism}"));
        for (name, b, pages, prefill) in &cases {
            let (desc, o) = if *prefill {
                (b.prefill(heads(), *pages), &causal)
            } else {
                (b.decode(heads(), *pages), &opts)
            };
            g.bench_function(BenchmarkId::new("new", name), |bench| {
                bench.iter(|| Plan::new(black_box(&desc), o, &config).unwrap())
            });
            let mut plan = Plan::new(&desc, o, &config).unwrap();
            g.bench_function(BenchmarkId::new("replan", name), |bench| {
                bench.iter(|| plan.replan(black_box(&desc), o).unwrap())
            });
        }
        g.finish();
    }

    let mut g = c.benchmark_group("check_page_ids");
    for (name, b, pages, _) in &cases {
        g.bench_function(name.as_str(), |bench| {
            bench.iter(|| {
                check_page_ids(black_box(b.kv_indptr()), black_box(b.kv_indices()), *pages).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
