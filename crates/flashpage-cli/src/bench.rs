//! `flashpage bench`: the standard CPU matrix (the same cases and names as
//! `shared/gpu/cases.py`), each case verified against the f64 reference before it is timed,
//! reported beside this machine's ceilings measured in the same run (at the start, and again
//! right after each case: the fraction is of the higher of the two); and `bench plan`, the
//! host-side planning time alone.
//!
//! Method (see docs/perf/bench.md): inputs are fresh random values on a paged cache with
//! shuffled pages; one run into NaN-poisoned outputs is verified (every element written, a
//! deterministic sample of rows compared with the reference); then one warm-up call and
//! timed calls reusing the plan, the workspace and the outputs, until at least 10 calls and
//! 1 s (at most 2000 calls; at least 3 calls where 10 would take over 10 s). The median is
//! reported.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use flashpage::backend::RunArgs;
use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::workspace::HostWorkspace;
use flashpage::{
    AttentionOptions, BatchBuilder, DType, HeadConfig, KvLayout, Plan, PlanConfig, PosEncoding,
};
use flashpage_testkit::case::{CaseData, CaseSpec, Fp8Spec, KvStorage, Rng};
use flashpage_testkit::ceiling;
use flashpage_testkit::suite;
use serde_json::json;

use crate::bench_args::median;
pub use crate::bench_args::{BenchArgs, Peer, What};
use crate::bench_peer::{PeerResult, Timing, TorchPeer};
use crate::{BackendArg, CliError};

/// This machine's CPU model, family and model number (from `/proc/cpuinfo`), for the
/// bench header: every figure names the CPU it was measured on.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    match (field("model name"), field("cpu family"), field("model")) {
        (Some(n), Some(f), Some(m)) => format!("{n} (family {f} model {m})"),
        (Some(n), _, _) => n,
        _ => "unknown".into(),
    }
}

/// A model's head configuration and options (`shared/gpu/cases.py` MODELS).
struct Model {
    name: &'static str,
    heads: (usize, usize, usize),
    soft_cap: Option<f32>,
    sm_scale: Option<f32>,
}

const MODELS: [Model; 2] = [
    Model {
        name: "llama3-8b",
        heads: (32, 8, 128),
        soft_cap: None,
        sm_scale: None,
    },
    Model {
        name: "gemma2-27b",
        heads: (32, 16, 128),
        soft_cap: Some(50.0),
        sm_scale: Some(1.0 / 12.0),
    },
];
const PAGE_SIZE: usize = 16;
/// `(batch, kv_len)`.
const CPU_DECODE: [(usize, usize); 4] = [(1, 4096), (8, 4096), (32, 1024), (32, 4096)];
/// `(batch, qo_len = kv_len)`, causal.
const CPU_PREFILL: [(usize, usize); 2] = [(1, 512), (1, 2048)];
const DTYPES: [DType; 2] = [DType::BF16, DType::F32];

/// Timing: at least `MIN_CALLS` calls and `MIN_SECONDS`, at most `MAX_CALLS`; a case whose
/// calls are so slow that `MIN_CALLS` would take longer than `BUDGET_SECONDS` stops after
/// `FLOOR_CALLS` calls once the budget is spent (the call count is printed).
const MIN_CALLS: usize = 10;
const MIN_SECONDS: f64 = 1.0;
const MAX_CALLS: usize = 2000;
const FLOOR_CALLS: usize = 3;
const BUDGET_SECONDS: f64 = 10.0;
/// The same rule, handed to the peer.
const TIMING: Timing = Timing {
    min_calls: MIN_CALLS,
    min_seconds: MIN_SECONDS,
    max_calls: MAX_CALLS,
    floor_calls: FLOOR_CALLS,
    budget_seconds: BUDGET_SECONDS,
};
/// Cache-level read ceiling: a buffer that fits the last-level cache of current CPUs.
const CACHE_BYTES: usize = 8 << 20;

pub fn main(args: BenchArgs) -> Result<(), CliError> {
    crate::check_threads(args.threads)?;
    if args.peer.is_some() && args.backend == BackendArg::Cuda {
        return Err(CliError::invalid(
            "--peer torch runs beside the cpu backend: expected --backend cpu, got cuda",
        ));
    }
    if args.python.is_some() && args.peer.is_none() {
        return Err(CliError::invalid(
            "--python names the interpreter of --peer torch: expected --peer torch with it",
        ));
    }
    if args.backend == BackendArg::Cuda {
        #[cfg(feature = "cuda")]
        {
            return crate::bench_cuda::main(&args);
        }
        #[cfg(not(feature = "cuda"))]
        {
            return Err(CliError::failure(
                "flashpage was built without the cuda feature",
            ));
        }
    }
    let dtypes: Vec<DType> = match &args.dtype {
        None => DTYPES.to_vec(),
        Some(s) => match DType::parse(s) {
            Some(d) if DTYPES.contains(&d) => vec![d],
            _ => {
                return Err(CliError::invalid(format!(
                    "--dtype {s:?} is not in the matrix: expected bf16 or f32"
                )));
            }
        },
    };
    // The SIMD level is an argument too: checked before any thread starts.
    let level = match args.simd.as_deref() {
        None => None,
        Some(s) => Some(SimdLevel::parse(s).ok_or_else(|| {
            CliError::invalid(format!(
                "--simd {s:?} is not a level: expected scalar, avx2 or avx512"
            ))
        })?),
    };
    let cases = matrix(args.what, &dtypes, args.filter.as_deref());
    let plans = matches!(args.what, What::Plan | What::All);
    let plan_cases: Vec<(String, PlanBatch)> = if plans {
        plan_batches()
            .into_iter()
            .filter(|(n, _)| args.filter.as_deref().is_none_or(|f| n.contains(f)))
            .collect()
    } else {
        Vec::new()
    };
    let cascade_model = (MODELS[0].name, model_heads(&MODELS[0]));
    let cascade = matches!(args.what, What::Cascade | What::All)
        && args
            .filter
            .as_deref()
            .is_none_or(|f| crate::bench_cascade::case_name(cascade_model.0).contains(f));
    if cases.is_empty() && plan_cases.is_empty() && !cascade {
        return Err(CliError::invalid(format!(
            "no benchmark case matches --filter {:?}",
            args.filter.as_deref().unwrap_or("")
        )));
    }
    // The peer's interpreter must import torch: checked before any thread starts.
    let peer = match args.peer {
        Some(Peer::Torch) if !cases.is_empty() => Some(TorchPeer::probe(
            &crate::bench_peer::python_for(args.python.as_deref()),
        )?),
        Some(Peer::Torch) => {
            return Err(CliError::invalid(
                "--peer torch compares decode and prefill cases: none selected (bench plan has no peer)",
            ));
        }
        None => None,
    };
    // Threads start only once every argument has been checked.
    let cpu = match level {
        None => CpuBackend::new(args.threads.unwrap_or(0))?,
        Some(level) => CpuBackend::with_simd(args.threads.unwrap_or(0), level)?,
    };
    let simd_forced = level.is_some();
    let threads = cpu.threads();

    // Ceilings only matter to the kernel cases and the cascade (planning is not bandwidth-
    // or FMA-bound).
    let mut progress = Progress::new(
        cases.len()
            + plan_cases.len()
            + usize::from(cascade)
            + 2 * usize::from(!cases.is_empty() || cascade),
    );
    let ceilings = if cases.is_empty() && !cascade {
        if !args.json {
            println!(
                "flashpage bench: planning on the host, parallelism {threads}, {}",
                utc_now()
            );
        }
        None
    } else {
        progress.step("measuring the machine's ceilings");
        let c = Ceilings::measure(threads);
        c.print(&cpu, simd_forced, peer.as_ref(), args.json);
        Some(c)
    };

    let mut failures = Vec::new();
    for case in &cases {
        progress.step(&format!("{} {}", case.spec.name, case.spec.dtype.name()));
        let ceilings = ceilings.as_ref().expect("measured when there are cases");
        match run_case(&cpu, case, ceilings) {
            // The peer runs after the case's inputs are freed (its own copy of the shape).
            Ok(r) => match &peer {
                // The peer has no FP8 cache: FP8 rows print alone.
                _ if case.spec.fp8.is_some() => r.print(None, args.json),
                None => r.print(None, args.json),
                Some(p) => {
                    progress.note(&format!("peer torch {}", case.spec.name));
                    match p.run(&case.spec, threads, TIMING) {
                        Ok(pr) => r.print(Some(&pr), args.json),
                        Err(e) => {
                            r.print(None, args.json);
                            let msg = format!("{} {}: {e}", case.spec.name, case.spec.dtype.name());
                            if args.json {
                                println!(
                                    "{}",
                                    json!({"case": case.spec.name, "dtype": case.spec.dtype.name(),
                                           "backend": "cpu", "peer": "torch", "peer_error": msg})
                                );
                            } else {
                                println!("{:34} {:5} peer torch FAILED: {e}", "", "");
                            }
                            failures.push(msg);
                        }
                    }
                }
            },
            Err(e) => {
                let msg = format!("{} {}: {e}", case.spec.name, case.spec.dtype.name());
                if args.json {
                    println!(
                        "{}",
                        json!({"case": case.spec.name, "dtype": case.spec.dtype.name(),
                               "backend": "cpu", "error": msg})
                    );
                } else {
                    println!(
                        "{:34} {:4}  FAILED: {e}",
                        case.spec.name,
                        case.spec.dtype.name()
                    );
                }
                failures.push(msg);
            }
        }
    }
    if cascade {
        progress.step("cascade: shared-prefix decode, flat and cascaded");
        failures.extend(crate::bench_cascade::run(
            &cpu,
            cascade_model,
            &dtypes,
            args.json,
        ));
    }
    for (name, batch) in &plan_cases {
        progress.step(name);
        // This machine's parallelism, and an H100's work slots (132 SMs x 2 blocks), which
        // makes small batches split their KV: the figure to compare with FlashInfer's plan.
        for parallelism in [threads, H100_SLOTS] {
            match bench_plan(name, batch, parallelism) {
                Ok(r) => r.print(args.json),
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    println!("{name:34} FAILED: {e}");
                }
            }
        }
    }
    if ceilings.is_some() {
        progress.step("measuring the ceilings again (drift during the run)");
        Ceilings::measure(threads).print_end(args.json);
    }
    progress.finish();
    CliError::from_failures(&failures)
}

/// A model's head configuration.
fn model_heads(m: &Model) -> HeadConfig {
    HeadConfig::new(m.heads.0, m.heads.1, m.heads.2)
        .expect("the matrix's head configurations are valid")
}

/// One case of the matrix.
struct BenchCase {
    spec: CaseSpec,
    decode: bool,
}

fn matrix(what: What, dtypes: &[DType], filter: Option<&str>) -> Vec<BenchCase> {
    let mut out = Vec::new();
    let (dec, pre) = match what {
        What::Decode => (true, false),
        What::Prefill => (false, true),
        What::Plan | What::Cascade => (false, false),
        What::All => (true, true),
    };
    for m in &MODELS {
        let heads = model_heads(m);
        let options = AttentionOptions::default()
            .with_logits_soft_cap(m.soft_cap)
            .with_sm_scale(m.sm_scale);
        let mut push = |name: String, requests: Vec<(usize, usize)>, decode: bool| {
            // Decode also reads FP8 caches (per-head scales, 1 byte per element read) with
            // bf16 q: the rows `<case>/e4m3fn` and `<case>/e5m2`.
            let kvs: &[Option<DType>] = if decode && dtypes.contains(&DType::BF16) {
                &[None, Some(DType::E4M3Fn), Some(DType::E5M2)]
            } else {
                &[None]
            };
            for &kv in kvs {
                let name = match kv {
                    Some(k) => format!("{name}/{}", k.name()),
                    None => name.clone(),
                };
                if filter.is_some_and(|f| !name.contains(f)) {
                    continue;
                }
                for &dtype in dtypes {
                    if kv.is_some() && dtype != DType::BF16 {
                        continue;
                    }
                    out.push(BenchCase {
                        spec: CaseSpec {
                            name: name.clone(),
                            heads,
                            page_size: PAGE_SIZE,
                            requests: requests.clone(),
                            decode,
                            dtype,
                            layout: KvLayout::Nhd,
                            storage: KvStorage::Separate,
                            options: options.with_causal(!decode),
                            input_scale: 1.0,
                            sinks: false,
                            fp8: kv.map(|dtype| Fp8Spec {
                                dtype,
                                per_head: true,
                            }),
                            custom_mask: None,
                        },
                        decode,
                    });
                }
            }
        };
        if dec {
            for (b, kv) in CPU_DECODE {
                push(
                    format!("decode/{}/b{b}-kv{kv}", m.name),
                    vec![(1, kv); b],
                    true,
                );
            }
        }
        if pre {
            for (b, q) in CPU_PREFILL {
                push(
                    format!("prefill/{}/b{b}-q{q}", m.name),
                    vec![(q, q); b],
                    false,
                );
            }
        }
    }
    out
}

/// Ceilings measured at the start of the run.
struct Ceilings {
    read_gbps: f64,
    cache_gbps: f64,
    fma_gflops: f64,
    threads: usize,
}

impl Ceilings {
    fn measure(threads: usize) -> Self {
        Ceilings {
            read_gbps: ceiling::read_bandwidth(threads, ceiling::DRAM_BYTES),
            cache_gbps: ceiling::read_bandwidth(threads, CACHE_BYTES),
            fma_gflops: ceiling::fma_peak(threads),
            threads,
        }
    }

    /// The ceilings measured again after the cases (fractions use the first measurement).
    fn print_end(&self, json: bool) {
        if json {
            println!(
                "{}",
                json!({"type": "ceilings_end", "read_gbps": self.read_gbps,
                       "cache_gbps": self.cache_gbps, "fma_gflops": self.fma_gflops,
                       "time": utc_now()})
            );
        } else {
            println!(
                "ceilings again at the end: read {:.1} GB/s, cache read {:.1} GB/s, f32 fma {:.0} GFLOP/s ({})",
                self.read_gbps,
                self.cache_gbps,
                self.fma_gflops,
                utc_now()
            );
        }
    }

    fn print(&self, cpu: &CpuBackend, simd_forced: bool, peer: Option<&TorchPeer>, json: bool) {
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let when = utc_now();
        if json {
            let mut v = json!({"type": "ceilings", "backend": "cpu", "threads": self.threads,
                       "cpu": cpu_model(), "simd": cpu.simd().name(),
                       "simd_forced": simd_forced, "read_gbps": self.read_gbps,
                       "read_bytes": ceiling::DRAM_BYTES, "cache_gbps": self.cache_gbps,
                       "cache_bytes": CACHE_BYTES, "fma_gflops": self.fma_gflops,
                       "time": when, "load_avg_1m": load});
            if let Some(p) = peer {
                v["peer"] = json!("torch");
                v["peer_python"] = json!(p.python);
                v["peer_torch_version"] = json!(p.torch_version);
            }
            println!("{v}");
        } else {
            println!(
                "flashpage bench: cpu backend, {}, {} threads, simd {}{}, {when}, load average {load}",
                cpu_model(),
                self.threads,
                cpu.simd().name(),
                if simd_forced { " (forced)" } else { "" }
            );
            println!(
                "ceilings: read {:.1} GB/s ({} MiB), cache read {:.1} GB/s ({} MiB), f32 fma {:.0} GFLOP/s",
                self.read_gbps,
                ceiling::DRAM_BYTES >> 20,
                self.cache_gbps,
                CACHE_BYTES >> 20,
                self.fma_gflops
            );
            if let Some(p) = peer {
                println!(
                    "peer: torch {} SDPA via {} ({} threads; K/V gathered from the paged cache into contiguous tensors before timing, gather not timed; no soft-cap, which SDPA lacks); ratio = torch time / flashpage time",
                    p.torch_version, p.python, self.threads
                );
            }
            println!(
                "{:34} {:5} {:>11} {:>16} {:>9} {:>6}  verified (sample)",
                "case", "dtype", "median us", "rate", "ceiling", "calls"
            );
        }
    }
}

/// The result of one matrix case.
struct CaseResult {
    name: String,
    dtype: DType,
    us: f64,
    calls: usize,
    /// Decode: GB/s of K+V; prefill: TFLOP/s.
    rate: f64,
    decode: bool,
    ceiling_fraction: f64,
    /// The ceiling the fraction is of (GB/s read, or GFLOP/s FMA).
    ceiling: f64,
    o_error: f64,
    lse_error: f64,
    sample: String,
}

impl CaseResult {
    /// The peer's rate on the same work (bytes or FLOPs) in the same unit as `rate`.
    fn peer_rate(&self, p: &PeerResult) -> f64 {
        self.rate * self.us / p.us
    }

    fn print(&self, peer: Option<&PeerResult>, json: bool) {
        if json {
            let mut v = json!({
                "case": self.name, "dtype": self.dtype.name(), "backend": "cpu",
                "us": self.us, "calls": self.calls, "ceiling_fraction": self.ceiling_fraction,
                "o_error": self.o_error, "lse_error": self.lse_error, "verified": self.sample,
            });
            let key = if self.decode { "gbps" } else { "tflops" };
            v[key] = json!(self.rate);
            let ckey = if self.decode {
                "ceiling_gbps"
            } else {
                "ceiling_gflops"
            };
            v[ckey] = json!(self.ceiling);
            if let Some(p) = peer {
                v["peer"] = json!("torch");
                v["peer_us"] = json!(p.us);
                v[if self.decode {
                    "peer_gbps"
                } else {
                    "peer_tflops"
                }] = json!(self.peer_rate(p));
                v["peer_ratio"] = json!(p.us / self.us);
                v["peer_cpu_us"] = json!(p.cpu_us);
                v["peer_gather_us"] = json!(p.gather_us);
                v["peer_calls"] = json!(p.calls);
                v["peer_sdpa_backend"] = json!(p.sdpa_backend);
                v["peer_soft_cap_skipped"] = json!(p.soft_cap_skipped);
            }
            println!("{v}");
        } else {
            let rate = if self.decode {
                format!("{:.2} GB/s", self.rate)
            } else {
                format!("{:.3} TFLOP/s", self.rate)
            };
            println!(
                "{:34} {:5} {:>11.1} {:>16} {:>8.1}% {:>6}  o {:.1e} lse {:.1e} ({})",
                self.name,
                self.dtype.name(),
                self.us,
                rate,
                100.0 * self.ceiling_fraction,
                self.calls,
                self.o_error,
                self.lse_error,
                self.sample
            );
            if let Some(p) = peer {
                let rate = if self.decode {
                    format!("{:.2} GB/s", self.peer_rate(p))
                } else {
                    format!("{:.3} TFLOP/s", self.peer_rate(p))
                };
                println!(
                    "{:>34} {:5} {:>11.1} {:>16} {:>9} {:>6}  ratio {:.2}x (torch/flashpage time); {}, gather {:.0} us not timed{}",
                    "peer torch",
                    "",
                    p.us,
                    rate,
                    "",
                    p.calls,
                    p.us / self.us,
                    p.sdpa_backend,
                    p.gather_us,
                    if p.soft_cap_skipped {
                        ", without the soft-cap"
                    } else {
                        ""
                    }
                );
            }
        }
    }
}

/// Rows whose reference is computed: decode, the first, middle and last requests; prefill,
/// eight rows spread evenly over every request (first and last row included).
fn sample_rows(data: &CaseData) -> (Vec<usize>, String) {
    let reqs = &data.spec.requests;
    if data.spec.decode {
        let b = reqs.len();
        let mut rows = vec![0, b / 2, b.saturating_sub(1)];
        rows.dedup();
        let n = rows.len();
        (rows, format!("{n} of {b} requests"))
    } else {
        let mut rows = Vec::new();
        let mut start = 0;
        for &(q, _) in reqs {
            if q > 0 {
                let k = q.min(8);
                for s in 0..k {
                    rows.push(start + if k == 1 { 0 } else { s * (q - 1) / (k - 1) });
                }
            }
            start += q;
        }
        rows.dedup();
        let n = rows.len();
        (rows, format!("{n} of {start} rows"))
    }
}

fn run_case(cpu: &CpuBackend, case: &BenchCase, ceilings: &Ceilings) -> Result<CaseResult, String> {
    let seed = suite::seed_from_env();
    let data = case.spec.materialise(seed).map_err(|e| e.to_string())?;
    let plan = data
        .plan(&PlanConfig::with_parallelism(cpu.threads()))
        .map_err(|e| e.to_string())?;
    let mut ws = HostWorkspace::new(plan.requirement().float.total()).map_err(|e| e.to_string())?;
    let (mut o, mut lse) = data.poisoned_outputs();
    let run = |o: &mut flashpage::Tensor, lse: &mut Vec<f32>, ws: &mut HostWorkspace| {
        cpu.run(
            &plan,
            RunArgs {
                q: data.q.view(),
                kv: data.kv_cache(),
                o: o.view_mut(),
                lse: Some(lse),
                sinks: None,
                custom_mask: None,
            },
            ws.as_bytes_mut(),
        )
        .map_err(|e| e.to_string())
    };
    // Verify first.
    run(&mut o, &mut lse, &mut ws)?;
    let (rows, sample) = sample_rows(&data);
    let reference = suite::sampled_reference(&data, &rows).map_err(|e| e.to_string())?;
    let cmp = suite::compare_rows(&data, &rows, &o, &lse, &reference);
    if !cmp.passed() {
        return Err(format!(
            "verification failed (seed {seed}): o error {:.3e}, lse error {:.3e}, tolerance {:.0e}, fully written {}",
            cmp.o_error, cmp.lse_error, cmp.tolerance, cmp.fully_written
        ));
    }
    let (secs, calls) = time_calls(|| run(&mut o, &mut lse, &mut ws))?;
    // Shared VMs drift (DRAM bandwidth moved by 50% within a minute here): the ceiling is
    // measured again right after the case, and the ratio uses the higher of that and the
    // run's start value, so it is never flattered by a momentarily low probe.
    let (rate, fraction, ceiling_used) = if case.decode {
        let gbps = data.kv_bytes() as f64 / secs / 1e9;
        let now = ceiling::read_bandwidth(ceilings.threads, ceiling::DRAM_BYTES);
        let c = ceilings.read_gbps.max(now);
        (gbps, gbps / c, c)
    } else {
        let h = data.spec.heads;
        let flops: f64 = data
            .spec
            .requests
            .iter()
            .map(|&(q, _)| 4.0 * (h.num_qo_heads() * h.head_dim()) as f64 * (q * q) as f64 / 2.0)
            .sum();
        let tflops = flops / secs / 1e12;
        let c = ceilings.fma_gflops.max(ceiling::fma_peak(ceilings.threads));
        (tflops, tflops * 1e3 / c, c)
    };
    Ok(CaseResult {
        name: data.spec.name.clone(),
        dtype: data.spec.dtype,
        us: secs * 1e6,
        calls,
        rate,
        decode: case.decode,
        ceiling_fraction: fraction,
        ceiling: ceiling_used,
        o_error: cmp.o_error,
        lse_error: cmp.lse_error,
        sample,
    })
}

/// One warm-up call, then timed calls by the module's rule (at least `MIN_CALLS` and
/// `MIN_SECONDS`, ...): the median seconds per call and the calls timed.
pub(crate) fn time_calls(
    mut call: impl FnMut() -> Result<(), String>,
) -> Result<(f64, usize), String> {
    call()?;
    let mut times = Vec::new();
    let t_all = Instant::now();
    loop {
        let (n, el) = (times.len(), t_all.elapsed().as_secs_f64());
        let enough = n >= MIN_CALLS && el >= MIN_SECONDS;
        if enough || n >= MAX_CALLS || (n >= FLOOR_CALLS && el >= BUDGET_SECONDS) {
            break;
        }
        let t = Instant::now();
        call()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let n = times.len();
    Ok((median(&mut times), n))
}

/// A batch to plan: its arrays and whether it is decode.
struct PlanBatch {
    heads: HeadConfig,
    batch: BatchBuilder,
    num_pages: usize,
    decode: bool,
    options: AttentionOptions,
}

/// Decode with 1, 64, 256 and 1024 requests of mixed lengths 1..=32768, and prefill with
/// 16 requests (qo_len 1..=1024, kv_len = qo_len + 0..4096, causal); page size 16, llama3-8b
/// heads; a fixed seed, so every run plans the same batches.
fn plan_batches() -> Vec<(String, PlanBatch)> {
    let heads = HeadConfig::new(32, 8, 128).expect("valid heads");
    let mut rng = Rng::new(0x91a4);
    let mut out = Vec::new();
    let make = |n: usize, decode: bool, rng: &mut Rng| {
        let mut b = BatchBuilder::new(PAGE_SIZE).expect("valid page size");
        let mut next = 0i32;
        for _ in 0..n {
            let (qo, kv) = if decode {
                (1, 1 + rng.below(32768))
            } else {
                let q = 1 + rng.below(1024);
                (q, q + rng.below(4096))
            };
            let pages: Vec<i32> = (next..next + kv.div_ceil(PAGE_SIZE) as i32).collect();
            next += pages.len() as i32;
            b.push(qo, kv, &pages).expect("consistent request");
        }
        PlanBatch {
            heads,
            batch: b,
            num_pages: next as usize,
            decode,
            options: AttentionOptions::default()
                .with_causal(!decode)
                .with_pos_encoding(PosEncoding::None),
        }
    };
    for n in [1, 64, 256, 1024] {
        out.push((format!("plan/decode/b{n}"), make(n, true, &mut rng)));
    }
    out.push(("plan/prefill/b16".to_string(), make(16, false, &mut rng)));
    out
}

struct PlanResult {
    name: String,
    us_new: f64,
    us_replan: f64,
    calls: usize,
    parallelism: usize,
    work_items: usize,
    split: bool,
}

impl PlanResult {
    fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                json!({"case": self.name, "dtype": "none", "backend": "cpu", "us": self.us_new,
                       "us_replan": self.us_replan, "calls": self.calls,
                       "parallelism": self.parallelism, "work_items": self.work_items,
                       "split_kv": self.split})
            );
        } else {
            println!(
                "{:34} {:5} {:>11.2} us per Plan::new, {:.2} us per replan ({} work items, split {}, parallelism {})",
                self.name,
                "-",
                self.us_new,
                self.us_replan,
                self.work_items,
                if self.split { "yes" } else { "no" },
                self.parallelism
            );
        }
    }
}

/// Work slots of an H100 as the CUDA backend counts them for a llama3-8b bf16 decode plan:
/// 132 SMs x 3 resident blocks of its kernel variant (`flashpage kernels`, docs/perf/cuda.md).
const H100_SLOTS: usize = 396;

fn bench_plan(name: &str, b: &PlanBatch, parallelism: usize) -> Result<PlanResult, String> {
    let desc = if b.decode {
        b.batch.decode(b.heads, b.num_pages)
    } else {
        b.batch.prefill(b.heads, b.num_pages)
    };
    let config = PlanConfig::with_parallelism(parallelism);
    let mut plan = Plan::new(&desc, &b.options, &config).map_err(|e| e.to_string())?;
    let time = |f: &mut dyn FnMut() -> flashpage::Result<()>| -> Result<(f64, usize), String> {
        for _ in 0..3 {
            f().map_err(|e| e.to_string())?;
        }
        let mut times = Vec::new();
        let t_all = Instant::now();
        while (times.len() < 100 || t_all.elapsed().as_secs_f64() < 0.3) && times.len() < 100_000 {
            let t = Instant::now();
            f().map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok((median(&mut times) * 1e6, times.len()))
    };
    let (us_new, n1) = time(&mut || {
        std::hint::black_box(Plan::new(&desc, &b.options, &config)?);
        Ok(())
    })?;
    let (us_replan, n2) = time(&mut || plan.replan(&desc, &b.options))?;
    Ok(PlanResult {
        name: name.to_string(),
        us_new,
        us_replan,
        calls: n1 + n2,
        parallelism,
        work_items: plan.num_work_items(),
        split: plan.split_kv(),
    })
}

/// A progress bar on stderr when it is a terminal; a plain line per step otherwise.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
    start: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }

    fn step(&mut self, what: &str) {
        let mut err = std::io::stderr().lock();
        let elapsed = self.start.elapsed().as_secs_f64();
        if self.tty {
            const WIDTH: usize = 30;
            let filled = WIDTH * self.done / self.total.max(1);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {}/{} {:.0}s {what}",
                "#".repeat(filled),
                ".".repeat(WIDTH - filled),
                self.done,
                self.total,
                elapsed
            );
            let _ = err.flush();
        } else {
            let _ = writeln!(
                err,
                "[{}/{}] {:.0}s {what}",
                self.done + 1,
                self.total,
                elapsed
            );
        }
        self.done += 1;
    }

    /// A line about work within the current step (no bar advance).
    fn note(&self, what: &str) {
        let mut err = std::io::stderr().lock();
        let elapsed = self.start.elapsed().as_secs_f64();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{:.0}s {what}", elapsed);
            let _ = err.flush();
        } else {
            let _ = writeln!(err, "{:.0}s {what}", elapsed);
        }
    }

    fn finish(&self) {
        let mut err = std::io::stderr().lock();
        let elapsed = self.start.elapsed().as_secs_f64();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[2Kdone in {elapsed:.0}s");
        } else {
            let _ = writeln!(err, "done in {elapsed:.0}s");
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
