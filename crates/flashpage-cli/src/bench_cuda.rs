//! `flashpage bench --backend cuda`: the GPU decode matrix of `shared/gpu/cases.py`
//! (GPU_DECODE for llama3-8b and gemma2-27b, bf16, page size 16, NHD), case names identical
//! to the peer script's so the tables join line by line.
//!
//! Method: fresh random inputs on a paged cache with shuffled pages; the case is first run
//! into NaN-poisoned outputs and verified (every element written; compared with the CPU
//! backend over the whole batch and with the f64 reference on a sample of rows). Then a
//! warm-up run per K/V copy and 100 timed runs, each bracketed by CUDA events and
//! synchronised, as `flashinfer_peer.py` times its calls (so the launch cost is included, as
//! in the peer's numbers); K/V are rotated among copies whose total exceeds 200 MB, so no
//! run reads a cache still warm in L2 (50 MB; the peer does not rotate). The median is reported with the
//! GB/s of K and V read and the fraction of the device's read bandwidth, measured at the
//! start of the same run by a streaming read kernel over 2 GiB. `plan_us` is the host time
//! of `Plan::new` plus the int-image upload (median).

use std::time::Instant;

use cudarc::driver::CudaSlice;
use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::cuda::{CudaBackend, DeviceElem, DeviceRunArgs, DeviceWorkspace};
use flashpage::half;
use flashpage::plan::PlanKind;
use flashpage::{AttentionOptions, DType, HeadConfig, KvLayout, Plan, PlanConfig, Tensor};
use flashpage_testkit::case::{CaseData, CaseSpec, KvStorage};
use flashpage_testkit::reference::rel_error;
use flashpage_testkit::suite;
use serde_json::json;

use crate::CliError;
use crate::bench_args::{BenchArgs, What, median};

/// `shared/gpu/cases.py` GPU_DECODE: `(batch, kv_len)`.
pub(crate) const GPU_DECODE: [(usize, usize); 6] = [
    (1, 4096),
    (16, 4096),
    (64, 4096),
    (128, 2048),
    (256, 1024),
    (32, 16384),
];
/// name, (hq, hkv, d), soft-cap, sm_scale (cases.py MODELS).
pub(crate) type ModelRow = (
    &'static str,
    (usize, usize, usize),
    Option<f32>,
    Option<f32>,
);
pub(crate) const MODELS: [ModelRow; 2] = [
    ("llama3-8b", (32, 8, 128), None, None),
    ("gemma2-27b", (32, 16, 128), Some(50.0), Some(1.0 / 12.0)),
];
pub(crate) const PAGE_SIZE: usize = 16;
const READ_PROBE_BYTES: usize = 2 << 30;
const ROTATE_BYTES: u64 = 200_000_000;
const MAX_COPIES: usize = 16;
const TIMED_RUNS: usize = 100;

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> CliError {
    CliError::failure(format!("{what}: {e:?}"))
}

pub fn main(args: &BenchArgs) -> Result<(), CliError> {
    if !matches!(args.what, What::Decode | What::All) {
        return Err(CliError::invalid(
            "the cuda bench covers the decode matrix: use `bench decode --backend cuda` (planning is benchmarked by `bench plan` on the host)",
        ));
    }
    let dtype = match &args.dtype {
        None => DType::BF16,
        Some(s) => DType::parse(s).ok_or_else(|| {
            CliError::invalid(format!(
                "--dtype {s:?} is not a dtype: expected bf16, f16 or f32"
            ))
        })?,
    };
    if dtype == DType::F32 {
        return Err(CliError::invalid(
            "--dtype f32 is not in the gpu matrix: expected bf16 or f16",
        ));
    }
    let gpu = CudaBackend::new(0)?;
    let cpu = CpuBackend::new(args.threads.unwrap_or(0))?;
    let read = gpu.measure_read_bandwidth(READ_PROBE_BYTES, 20)?;
    let read_gbps = read / 1e9;
    if args.json {
        println!(
            "{}",
            json!({"type": "ceilings", "backend": "cuda", "device": gpu.device_name(),
                   "arch": gpu.arch(), "sms": gpu.num_sms(), "read_gbps": read_gbps,
                   "read_bytes": READ_PROBE_BYTES})
        );
    } else {
        println!(
            "flashpage bench: cuda backend on {} ({}, {} SMs); each case planned for SMs x its kernel's resident blocks per SM (occupancy API)",
            gpu.device_name(),
            gpu.arch(),
            gpu.num_sms(),
        );
        println!(
            "ceiling: read {:.0} GB/s ({} MiB streamed)",
            read_gbps,
            READ_PROBE_BYTES >> 20
        );
        println!(
            "{:34} {:5} {:>10} {:>11} {:>8} {:>9} {:>6}  verified",
            "case", "dtype", "median us", "GB/s", "ceiling", "plan us", "blocks"
        );
    }
    let mut failures = Vec::new();
    for (model, (hq, hkv, d), cap, scale) in MODELS {
        let heads = HeadConfig::new(hq, hkv, d).expect("the matrix's heads are valid");
        for (b, kv) in GPU_DECODE {
            let name = format!("decode/{model}/b{b}-kv{kv}");
            if args.filter.as_deref().is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let spec = CaseSpec {
                name: name.clone(),
                heads,
                page_size: PAGE_SIZE,
                requests: vec![(1, kv); b],
                decode: true,
                dtype,
                layout: KvLayout::Nhd,
                storage: KvStorage::Separate,
                options: AttentionOptions::default()
                    .with_logits_soft_cap(cap)
                    .with_sm_scale(scale),
                input_scale: 1.0,
                sinks: false,
                custom_mask: None,
                fp8: None,
            };
            match run_case(&gpu, &cpu, &spec, read_gbps) {
                Ok(r) => r.print(args.json),
                Err(e) => {
                    if args.json {
                        println!(
                            "{}",
                            json!({"case": name, "dtype": dtype.name(), "backend": "cuda", "error": e})
                        );
                    } else {
                        println!("{name:34} {:5}  FAILED: {e}", dtype.name());
                    }
                    failures.push(format!("{name}: {e}"));
                }
            }
        }
    }
    CliError::from_failures(&failures)
}

struct CaseResult {
    name: String,
    dtype: DType,
    us: f64,
    gbps: f64,
    ceiling_fraction: f64,
    plan_us: f64,
    parallelism: usize,
    o_error: f64,
    cpu_error: f64,
    calls: usize,
    copies: usize,
}

impl CaseResult {
    fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                json!({"case": self.name, "dtype": self.dtype.name(), "backend": "cuda",
                       "us": self.us, "gbps": self.gbps, "ceiling_fraction": self.ceiling_fraction,
                       "plan_us": self.plan_us, "parallelism": self.parallelism, "calls": self.calls, "kv_copies": self.copies,
                       "o_error": self.o_error, "cpu_error": self.cpu_error})
            );
        } else {
            println!(
                "{:34} {:5} {:>10.1} {:>11.0} {:>7.1}% {:>9.1} {:>6}  ref {:.1e} cpu {:.1e}",
                self.name,
                self.dtype.name(),
                self.us,
                self.gbps,
                100.0 * self.ceiling_fraction,
                self.plan_us,
                self.parallelism,
                self.o_error,
                self.cpu_error
            );
        }
    }
}

/// The typed device storage of a dtype (`f32`, `half::f16`, `half::bf16`): host tensors
/// go to the device as they are, no bit casts.
trait Elem: DeviceElem + cudarc::driver::ValidAsZeroBits + Copy + Default + Unpin {
    fn host(t: &Tensor) -> Vec<Self>;
    fn tensor(v: Vec<Self>) -> Tensor;
}

macro_rules! elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            fn host(t: &Tensor) -> Vec<Self> {
                match t {
                    Tensor::$variant(v) => v.clone(),
                    _ => Vec::new(),
                }
            }
            fn tensor(v: Vec<Self>) -> Tensor {
                Tensor::$variant(v)
            }
        }
    };
}
elem!(f32, F32);
elem!(half::f16, F16);
elem!(half::bf16, BF16);

fn run_case(
    gpu: &CudaBackend,
    cpu: &CpuBackend,
    spec: &CaseSpec,
    read_gbps: f64,
) -> Result<CaseResult, String> {
    match spec.dtype {
        DType::F32 => run_case_typed::<f32>(gpu, cpu, spec, read_gbps),
        DType::F16 => run_case_typed::<half::f16>(gpu, cpu, spec, read_gbps),
        DType::BF16 => run_case_typed::<half::bf16>(gpu, cpu, spec, read_gbps),
        // q is never FP8 (the matrix's dtypes are float), and the CUDA kernels read K/V of
        // q's dtype: an FP8 q is the backend's refusal, named.
        d @ (DType::E4M3Fn | DType::E5M2) => Err(format!(
            "dtype {} is a k/v cache type: the cuda bench runs f32, f16 or bf16",
            d.name()
        )),
    }
}

fn run_case_typed<T: Elem>(
    gpu: &CudaBackend,
    cpu: &CpuBackend,
    spec: &CaseSpec,
    read_gbps: f64,
) -> Result<CaseResult, String> {
    let e = |x: CliError| x.message;
    let fe = |x: flashpage::Error| x.to_string();
    let seed = suite::seed_from_env();
    let data: CaseData = spec.materialise(seed).map_err(fe)?;
    let parallelism = gpu
        .parallelism(&spec.heads, PlanKind::Decode, spec.dtype, &spec.options)
        .map_err(fe)?;
    let config = PlanConfig::with_parallelism(parallelism);
    let st = gpu.stream();
    let plan = data.plan(&config).map_err(fe)?;
    let mut ws = DeviceWorkspace::new(gpu, plan.requirement()).map_err(fe)?;
    gpu.upload_plan(&plan, &mut ws).map_err(fe)?;

    // Plan time: Plan::new + upload, median of many.
    let mut plan_times = Vec::new();
    let t0 = Instant::now();
    while plan_times.len() < 50 || (t0.elapsed().as_secs_f64() < 0.2 && plan_times.len() < 5000) {
        let t = Instant::now();
        let p = Plan::new(&data.desc(), &data.options(), &config).map_err(fe)?;
        gpu.upload_plan(&p, &mut ws).map_err(fe)?;
        plan_times.push(t.elapsed().as_secs_f64());
    }
    gpu.upload_plan(&plan, &mut ws).map_err(fe)?;
    let plan_us = median(&mut plan_times) * 1e6;

    let kv_bytes = data.kv_bytes();
    let copies = (ROTATE_BYTES.div_ceil(kv_bytes.max(1)) as usize).clamp(1, MAX_COPIES);
    let q = st
        .clone_htod(&T::host(&data.q))
        .map_err(|x| e(cuda_err("q", x)))?;
    let (kh, vh) = (T::host(&data.k), T::host(&data.v));
    let mut ks = Vec::with_capacity(copies);
    let mut vs = Vec::with_capacity(copies);
    for _ in 0..copies {
        ks.push(st.clone_htod(&kh).map_err(|x| e(cuda_err("k", x)))?);
        vs.push(st.clone_htod(&vh).map_err(|x| e(cuda_err("v", x)))?);
    }
    drop((kh, vh));
    let idx = data.batch.kv_indices();
    let kvi = st
        .clone_htod(idx)
        .map_err(|x| e(cuda_err("kv_indices", x)))?;
    let (o_poison, lse_poison) = data.poisoned_outputs();
    let mut o = st
        .clone_htod(&T::host(&o_poison))
        .map_err(|x| e(cuda_err("o", x)))?;
    let mut lse = st
        .clone_htod(&lse_poison)
        .map_err(|x| e(cuda_err("lse", x)))?;
    let mut run =
        |c: usize, host_ids: Option<&[i32]>, o: &mut CudaSlice<T>, lse: &mut CudaSlice<f32>| {
            gpu.run(
                &plan,
                DeviceRunArgs {
                    dtype: spec.dtype,
                    q: &q,
                    k: &ks[c],
                    v: &vs[c],
                    strides: data.strides,
                    num_pages: data.num_pages,
                    kv_indices: &kvi,
                    host_kv_indices: host_ids,
                    o,
                    lse: Some(lse),
                    sinks: None,
                    custom_mask: None,
                    kv_fp8: None,
                },
                &mut ws,
            )
            .map_err(fe)
        };

    // Verify: GPU vs the CPU backend (whole batch) and vs the reference (sampled rows).
    run(0, Some(idx), &mut o, &mut lse)?;
    gpu.synchronize().map_err(fe)?;
    let o_gpu = T::tensor(st.clone_dtoh(&o).map_err(|x| e(cuda_err("o", x)))?);
    let lse_gpu = st.clone_dtoh(&lse).map_err(|x| e(cuda_err("lse", x)))?;
    let (o_cpu, _) = data.run_cpu(cpu, &config).map_err(fe)?;
    let cpu_error = rel_error(&o_gpu.view().to_f64_vec(), &o_cpu.view().to_f64_vec());
    let b = spec.requests.len();
    let mut rows = vec![0, b / 2, b - 1];
    rows.dedup();
    let reference = suite::sampled_reference(&data, &rows).map_err(fe)?;
    let cmp = suite::compare_rows(&data, &rows, &o_gpu, &lse_gpu, &reference);
    if !cmp.passed() || cpu_error > cmp.tolerance {
        return Err(format!(
            "verification failed (seed {seed}): reference o {:.3e} lse {:.3e}, cpu o {cpu_error:.3e}, tolerance {:.0e}, fully written {}",
            cmp.o_error, cmp.lse_error, cmp.tolerance, cmp.fully_written
        ));
    }

    // Warm-up (every copy once), then timed runs as the peer script times them: events
    // around each call, synchronised after each (so a call's launch cost is included).
    for c in 0..copies {
        run(c, None, &mut o, &mut lse)?;
    }
    gpu.synchronize().map_err(fe)?;
    let ctx = gpu.context();
    let ev = |x| e(cuda_err("event", x));
    let (start, end) = (
        ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ev)?,
        ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ev)?,
    );
    let mut times = Vec::with_capacity(TIMED_RUNS);
    for i in 0..TIMED_RUNS {
        start.record(st).map_err(ev)?;
        run(i % copies, None, &mut o, &mut lse)?;
        end.record(st).map_err(ev)?;
        end.synchronize().map_err(ev)?;
        times.push(start.elapsed_ms(&end).map_err(ev)? as f64 * 1e-3);
    }
    let secs = median(&mut times);
    let gbps = kv_bytes as f64 / secs / 1e9;
    Ok(CaseResult {
        name: spec.name.clone(),
        dtype: spec.dtype,
        us: secs * 1e6,
        gbps,
        ceiling_fraction: gbps / read_gbps,
        plan_us,
        parallelism,
        o_error: cmp.o_error,
        cpu_error,
        calls: TIMED_RUNS,
        copies,
    })
}
