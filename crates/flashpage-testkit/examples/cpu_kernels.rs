//! Timing harness for the CPU kernels: decode (GB/s of K+V read) and prefill (TFLOP/s,
//! causal counts half) on the llama3-8b head configuration (32 q / 8 KV heads, D 128,
//! page 16), beside this machine's ceilings measured in the same run.
//!
//! ```text
//! cargo run --release --example cpu_kernels -- [decode|prefill|all] [--threads N]
//!     [--simd all|scalar|avx2|avx512[,...]] [--reps N] [--case NAME]
//! ```

use std::time::Instant;

use flashpage::backend::RunArgs;
use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::workspace::HostWorkspace;
use flashpage::*;
use flashpage_testkit::case::{CaseData, CaseSpec};
use flashpage_testkit::ceiling;

struct Opts {
    what: String,
    threads: usize,
    levels: Vec<SimdLevel>,
    reps: usize,
    case: Option<String>,
}

fn parse() -> Opts {
    let mut o = Opts {
        what: "all".into(),
        threads: 2,
        levels: vec![SimdLevel::detect()],
        reps: 7,
        case: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => o.threads = it.next().and_then(|s| s.parse().ok()).expect("--threads N"),
            "--reps" => o.reps = it.next().and_then(|s| s.parse().ok()).expect("--reps N"),
            "--case" => o.case = it.next(),
            "--simd" => {
                let s = it.next().expect("--simd LEVEL");
                o.levels = if s == "all" {
                    SimdLevel::available()
                } else {
                    s.split(',')
                        .map(|x| SimdLevel::parse(x).expect("simd level"))
                        .collect()
                };
            }
            w => o.what = w.to_string(),
        }
    }
    o
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`
/// (0 where unavailable). On a shared machine, wall time includes waiting for a core; CPU
/// time per run is what the kernel costs when it has the cores.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; 100 Hz ticks.
    (tick(11) + tick(12)) / 100.0
}

/// `(median wall seconds, mean CPU seconds)` of `reps` runs (after one warm-up run).
fn time_case(cpu: &CpuBackend, data: &CaseData, reps: usize) -> (f64, f64) {
    let plan = data
        .plan(&PlanConfig::with_parallelism(cpu.threads()))
        .unwrap();
    let mut ws = HostWorkspace::new(plan.requirement().float.total()).unwrap();
    let (mut o, mut lse) = data.poisoned_outputs();
    let mut times = Vec::new();
    let mut c0 = 0.0;
    for i in 0..=reps {
        if i == 1 {
            c0 = cpu_seconds();
        }
        let t = Instant::now();
        cpu.run(
            &plan,
            RunArgs {
                q: data.q.view(),
                kv: data.kv_cache(),
                o: o.view_mut(),
                lse: Some(&mut lse),
                sinks: None,
                custom_mask: None,
            },
            ws.as_bytes_mut(),
        )
        .unwrap();
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    assert!(lse.iter().all(|x| !x.is_nan()), "output not fully written");
    let cpu_s = (cpu_seconds() - c0) / reps as f64;
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], cpu_s)
}

fn main() {
    let o = parse();
    let h = HeadConfig::new(32, 8, 128).unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("threads {}, load average {}", o.threads, load.trim());
    let dram = ceiling::read_bandwidth(o.threads, ceiling::DRAM_BYTES);
    let fma = ceiling::fma_peak(o.threads);
    println!("ceilings: dram read {dram:.1} GB/s, f32 fma peak {fma:.0} GFLOP/s");
    let want = |name: &str| o.case.as_ref().is_none_or(|c| name.contains(c.as_str()));

    if o.what == "decode" || o.what == "all" {
        for dtype in [DType::BF16, DType::F32] {
            // b16-kv128, b1-kv2048 and b2-kv1024 (8 MiB bf16, 16 MiB f32) stay in a 32 MiB
            // L3: the kernel's compute rate without DRAM.
            for (b, kv) in [
                (1, 4096),
                (8, 4096),
                (32, 1024),
                (32, 4096),
                (16, 128),
                (1, 2048),
                (2, 1024),
            ] {
                let name = format!("decode/llama3-8b/b{b}-kv{kv}");
                if !want(&name) {
                    continue;
                }
                let spec = CaseSpec::decode(&name, h, 16, b, kv, dtype);
                let data = spec.materialise(1).unwrap();
                let bytes = data.kv_bytes() as f64;
                for &level in &o.levels {
                    let cpu = CpuBackend::with_simd(o.threads, level).unwrap();
                    let (t, c) = time_case(&cpu, &data, o.reps);
                    let gbps = bytes / t / 1e9;
                    println!(
                        "{name:32} {:5} {:7} {:9.3} ms {:7.1} GB/s  {:5.1}% of dram ({:.0} MiB K+V); cpu {:.3} ms/run: {:.1} GB/s per cpu-second",
                        dtype.name(),
                        level.name(),
                        t * 1e3,
                        gbps,
                        100.0 * gbps / dram,
                        bytes / (1 << 20) as f64,
                        c * 1e3,
                        bytes / c / 1e9,
                    );
                }
            }
        }
    }
    if o.what == "prefill" || o.what == "all" {
        // llama3-8b heads, and gemma2-27b's (group 2, soft-cap 50, sm_scale 1/12).
        let g2 = HeadConfig::new(32, 16, 128).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            for (model, heads, q) in [
                ("llama3-8b", h, 512),
                ("llama3-8b", h, 2048),
                ("gemma2-27b", g2, 2048),
            ] {
                let name = format!("prefill/{model}/b1-q{q}");
                if !want(&name) {
                    continue;
                }
                let mut spec = CaseSpec::decode(&name, heads, 16, 1, q, dtype);
                spec.decode = false;
                spec.requests = vec![(q, q)];
                spec.options.causal = true;
                if model == "gemma2-27b" {
                    spec.options.logits_soft_cap = Some(50.0);
                    spec.options.sm_scale = Some(1.0 / 12.0);
                }
                let data = spec.materialise(2).unwrap();
                // Causal: half the square; 2 FLOPs per FMA, two products (Q·Kᵀ and P·V).
                let flops = 4.0 * (q * q) as f64 / 2.0 * 128.0 * 32.0;
                for &level in &o.levels {
                    let cpu = CpuBackend::with_simd(o.threads, level).unwrap();
                    let (t, c) = time_case(&cpu, &data, o.reps.min(5));
                    let gf = flops / t / 1e9;
                    println!(
                        "{name:32} {:5} {:7} {:9.3} ms {:7.1} GFLOP/s {:5.1}% of fma peak; cpu {:.1} ms/run: {:.1} GFLOP/s per cpu-second",
                        dtype.name(),
                        level.name(),
                        t * 1e3,
                        gf,
                        100.0 * gf / fma,
                        c * 1e3,
                        flops / c / 1e9,
                    );
                }
            }
        }
    }
    let dram2 = ceiling::read_bandwidth(o.threads, ceiling::DRAM_BYTES);
    println!("dram read again at the end: {dram2:.1} GB/s");
}
