//! `flashpage kernels`: compile the CUDA kernels with NVRTC alone (no GPU, no driver) and
//! report each variant's resources and occupancy; `--cache DIR` also writes the images into
//! an on-disk kernel cache the backend loads without compiling.
//!
//! The default set is what the standard GPU matrix (`shared/gpu/cases.py`, llama3-8b and
//! gemma2-27b heads, bf16 and f16) launches: its decode variants, the prefill variant of the
//! same heads, the merge and cascade-fold kernels and the bandwidth probe. `--all` compiles every variant:
//! every dtype, 1/2/4/8 rows per pass, with and without RoPE, for head dimensions 64, 128
//! and 256 (`--head-dim` replaces the head dimensions of either set).
//!
//! Output: a table, one row per (architecture, variant); with `--json`, one JSON object per
//! line: first `{"type": "nvrtc", ...}`, then one `{"type": "kernel", ...}` per variant
//! (`{"type": "error", ...}` for a variant that failed to compile), then, for the default
//! set, one `{"type": "case", ...}` per standard-matrix case at the SM count of the
//! architecture's reference GPU. Exit status 1 if any compile failed, 2 for bad usage.

use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use flashpage::backend::cuda::launch::DecodeVariant;
use flashpage::backend::cuda::prefill::{MIN_ARCH, PrefillVariant};
use flashpage::backend::cuda::report::{KernelReport, KernelSpec, OfflineCompiler};
use flashpage::{AttentionOptions, BatchBuilder, DType, HeadConfig, Plan, PlanConfig, PlanKind};
use serde_json::json;

use crate::CliError;
use crate::bench_cuda::{GPU_DECODE, MODELS, PAGE_SIZE};

/// Arguments of `flashpage kernels`.
#[derive(Args, Debug, Clone)]
pub struct KernelsArgs {
    /// Architectures to compile for, comma-separated (`sm_90a,sm_80`).
    #[arg(long, value_delimiter = ',', default_value = "sm_90a")]
    pub arch: Vec<String>,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the compiled images into this kernel-cache directory (what the backend reads
    /// from `FLASHPAGE_CUDA_CACHE`; the NVRTC here must have the device's major.minor).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Every variant (every dtype, 1/2/4/8 rows, with and without RoPE, head dims 64, 128,
    /// 256) instead of the standard matrix's.
    #[arg(long)]
    pub all: bool,
    /// Head dimensions to compile, comma-separated (replaces the set's).
    #[arg(long, value_delimiter = ',')]
    pub head_dim: Vec<usize>,
    /// Parallel compiles (default: available cores).
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// The kernels of the set `args` selects, deduplicated, in a stable order.
pub fn kernel_set(all: bool, head_dims: &[usize]) -> Vec<KernelSpec> {
    let mut out: Vec<KernelSpec> = Vec::new();
    let mut push = |k: KernelSpec| {
        if !out.contains(&k) {
            out.push(k);
        }
    };
    if all {
        let dims = if head_dims.is_empty() {
            &[64, 128, 256][..]
        } else {
            head_dims
        };
        for &d in dims {
            for dtype in DType::ALL {
                // The cache of q's dtype, then the FP8 caches.
                for kv in std::iter::once(dtype).chain(DType::FP8) {
                    for rope in [false, true] {
                        for rows in [1, 2, 4, 8] {
                            push(KernelSpec::Decode(
                                DecodeVariant::with_rows(d, dtype, rows, rope).with_kv_dtype(kv),
                            ));
                        }
                    }
                    if let Some(v) = PrefillVariant::with_head_dim(d, dtype) {
                        push(KernelSpec::Prefill(v.with_kv_dtype(kv)));
                    }
                }
                push(KernelSpec::Merge { head_dim: d, dtype });
                push(KernelSpec::CascadeFold { head_dim: d, dtype });
            }
        }
    } else {
        for (_, (hq, hkv, d), _, _) in MODELS {
            for &d in if head_dims.is_empty() {
                std::slice::from_ref(&d)
            } else {
                head_dims
            } {
                let Ok(heads) = HeadConfig::new(hq, hkv, d) else {
                    continue;
                };
                for dtype in [DType::BF16, DType::F16] {
                    // A cache of q's dtype, and the FP8 caches (docs/semantics.md).
                    for kv in std::iter::once(dtype).chain(DType::FP8) {
                        for kind in [PlanKind::Decode, PlanKind::Prefill] {
                            // Prefill runs on the tensor-core kernel where it applies (sm_80+;
                            // both reference architectures).
                            push(
                                match PrefillVariant::new(&heads, kind, dtype, false, MIN_ARCH) {
                                    Some(v) => KernelSpec::Prefill(v.with_kv_dtype(kv)),
                                    None => KernelSpec::Decode(
                                        DecodeVariant::new(&heads, kind, dtype, false)
                                            .with_kv_dtype(kv),
                                    ),
                                },
                            );
                        }
                    }
                    push(KernelSpec::Merge { head_dim: d, dtype });
                    push(KernelSpec::CascadeFold { head_dim: d, dtype });
                }
            }
        }
    }
    push(KernelSpec::Bandwidth);
    push(KernelSpec::Append);
    push(KernelSpec::Rope);
    out
}

/// SMs of the reference GPU of an architecture (H100/H200 SXM for sm_90, A100 for sm_80).
fn reference_sms(arch: &str) -> Option<(usize, &'static str)> {
    if arch.starts_with("sm_90") {
        Some((132, "H100/H200 SXM"))
    } else if arch.starts_with("sm_80") {
        Some((108, "A100"))
    } else {
        None
    }
}

fn valid_arch(a: &str) -> bool {
    a.strip_prefix("sm_").is_some_and(|d| {
        let n = d.trim_end_matches(|c: char| c.is_ascii_lowercase());
        !n.is_empty() && n.len() <= 3 && n.chars().all(|c| c.is_ascii_digit()) && d.len() <= 4
    })
}

/// `flashpage kernels`.
pub fn main(args: KernelsArgs) -> Result<(), CliError> {
    for a in &args.arch {
        if !valid_arch(a) {
            return Err(CliError::invalid(format!(
                "--arch {a:?} is not an architecture: expected names like sm_90a or sm_80"
            )));
        }
    }
    if let Some(&d) = args
        .head_dim
        .iter()
        .find(|&&d| d == 0 || d % 16 != 0 || d > 256)
    {
        return Err(CliError::invalid(format!(
            "--head-dim {d}: the cuda kernels take multiples of 16 up to 256"
        )));
    }
    if args.jobs == Some(0) {
        return Err(CliError::invalid(
            "--jobs 0: at least one compile at a time",
        ));
    }
    let compiler = OfflineCompiler::new(args.cache.clone())?;
    let (major, minor) = compiler.nvrtc_version();
    for a in &args.arch {
        let n: i32 = a[3..]
            .trim_end_matches(|c: char| c.is_ascii_lowercase())
            .parse()
            .unwrap_or(0);
        if !compiler.supported_archs().contains(&n) {
            return Err(CliError::invalid(format!(
                "--arch {a}: nvrtc {major}.{minor} compiles for sm_{}",
                compiler
                    .supported_archs()
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(", sm_")
            )));
        }
    }
    let set = kernel_set(args.all, &args.head_dim);
    let jobs: Vec<(String, KernelSpec)> = args
        .arch
        .iter()
        .flat_map(|a| set.iter().map(move |k| (a.clone(), *k)))
        .collect();
    let threads = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(jobs.len().max(1));
    let results: Vec<Mutex<Option<Result<KernelReport, String>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().expect("job counter");
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some((arch, spec)) = jobs.get(i) else {
                        break;
                    };
                    let r = compiler.compile(spec, arch).map_err(|e| e.to_string());
                    *results[i].lock().expect("result slot") = Some(r);
                }
            });
        }
    });

    if args.json {
        println!(
            "{}",
            json!({"type": "nvrtc", "version": format!("{major}.{minor}"),
                   "archs": args.arch, "cache": args.cache.as_ref().map(|p| p.display().to_string())})
        );
    } else {
        println!(
            "flashpage kernels: nvrtc {major}.{minor}, {} variants for {}{}",
            set.len(),
            args.arch.join(", "),
            args.cache
                .as_ref()
                .map(|p| format!(", cache {}", p.display()))
                .unwrap_or_default()
        );
        println!(
            "{:7} {:34} {:>4} {:>12} {:>6} {:>5} {:>9} {:>9} {:>8}",
            "arch", "kernel", "regs", "spill st/ld", "smem", "stack", "blocks/SM", "budget", "ms"
        );
    }
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for ((arch, spec), slot) in jobs.iter().zip(results) {
        let r = slot
            .into_inner()
            .expect("result slot")
            .unwrap_or_else(|| Err("not compiled".into()));
        match r {
            Ok(rep) => {
                print_report(&rep, args.json);
                reports.push(rep);
            }
            Err(e) => {
                if args.json {
                    println!(
                        "{}",
                        json!({"type": "error", "arch": arch, "name": spec.name(), "error": e})
                    );
                } else {
                    println!("{arch:7} {:34} FAILED: {e}", spec.name());
                }
                failures.push(format!("{arch} {}: {e}", spec.name()));
            }
        }
    }
    if !args.all && failures.is_empty() {
        for arch in &args.arch {
            print_cases(arch, &reports, args.json)?;
        }
    }
    CliError::from_failures(&failures)
}

fn print_report(r: &KernelReport, json: bool) {
    let res = &r.resources;
    let budget = match r.spec {
        KernelSpec::Decode(v) => Some(v.min_blocks),
        KernelSpec::Prefill(v) => Some(v.min_blocks),
        _ => None,
    };
    if json {
        let mut o = json!({
            "type": "kernel", "arch": r.arch, "name": r.spec.name(), "entry": r.spec.entry(),
            "threads": r.threads, "registers": res.registers,
            "spill_store_bytes": res.spill_store_bytes, "spill_load_bytes": res.spill_load_bytes,
            "shared_bytes": res.shared_bytes, "stack_bytes": res.stack_bytes,
            "blocks_per_sm": r.blocks_per_sm, "compile_ms": r.compile_ms,
            "image_bytes": r.image_bytes, "warnings": r.warnings,
        });
        match r.spec {
            KernelSpec::Decode(v) => {
                o["kernel"] = json!("decode");
                o["head_dim"] = json!(v.head_dim);
                o["dtype"] = json!(v.dtype.name());
                o["rows"] = json!(v.rows);
                o["unroll"] = json!(v.unroll);
                o["rope"] = json!(v.rope);
                o["min_blocks"] = json!(v.min_blocks);
            }
            KernelSpec::Prefill(v) => {
                o["kernel"] = json!("prefill");
                o["head_dim"] = json!(v.head_dim);
                o["dtype"] = json!(v.dtype.name());
                o["block_n"] = json!(v.block_n);
                o["min_blocks"] = json!(v.min_blocks);
            }
            KernelSpec::Merge { head_dim, dtype } => {
                o["kernel"] = json!("merge");
                o["head_dim"] = json!(head_dim);
                o["dtype"] = json!(dtype.name());
            }
            KernelSpec::CascadeFold { head_dim, dtype } => {
                o["kernel"] = json!("cascade_fold");
                o["head_dim"] = json!(head_dim);
                o["dtype"] = json!(dtype.name());
            }
            KernelSpec::Bandwidth => o["kernel"] = json!("bandwidth"),
            KernelSpec::Append => o["kernel"] = json!("append"),
            KernelSpec::Rope => o["kernel"] = json!("rope"),
        }
        println!("{o}");
    } else {
        println!(
            "{:7} {:34} {:>4} {:>12} {:>6} {:>5} {:>9} {:>9} {:>8.0}{}",
            r.arch,
            r.spec.name(),
            res.registers,
            format!("{}/{}", res.spill_store_bytes, res.spill_load_bytes),
            res.shared_bytes,
            res.stack_bytes,
            r.blocks_per_sm.map_or("?".into(), |b| b.to_string()),
            budget.map_or("-".into(), |b| b.to_string()),
            r.compile_ms,
            if r.warnings.is_empty() {
                String::new()
            } else {
                format!(
                    "  {} warnings: {}",
                    r.warnings.len(),
                    r.warnings.join(" | ")
                )
            }
        );
    }
}

/// The standard decode matrix at the reference GPU's SM count: each case's kernel, its
/// resident blocks, the parallelism the backend plans with (SMs × blocks) and the split it
/// implies.
fn print_cases(arch: &str, reports: &[KernelReport], json: bool) -> Result<(), CliError> {
    let Some((sms, gpu)) = reference_sms(arch) else {
        return Ok(());
    };
    if !json {
        println!();
        println!(
            "standard decode matrix on {arch} at {sms} SMs ({gpu}), bf16, page size {PAGE_SIZE}: parallelism = SMs x blocks/SM"
        );
        println!(
            "{:34} {:22} {:>9} {:>11} {:>10} {:>6} {:>6} {:>5}",
            "case", "kernel", "blocks/SM", "parallelism", "work items", "blocks", "merge", "waves"
        );
    }
    for (model, (hq, hkv, d), cap, scale) in MODELS {
        let heads = HeadConfig::new(hq, hkv, d).expect("the matrix's heads are valid");
        let v = DecodeVariant::new(&heads, PlanKind::Decode, DType::BF16, false);
        let Some(rep) = reports
            .iter()
            .find(|r| r.arch == arch && r.spec == KernelSpec::Decode(v))
        else {
            continue;
        };
        let Some(blocks) = rep.blocks_per_sm else {
            continue;
        };
        let parallelism = sms * blocks.max(1) as usize;
        for (b, kv) in GPU_DECODE {
            let name = format!("decode/{model}/b{b}-kv{kv}");
            let mut batch = BatchBuilder::new(PAGE_SIZE).expect("valid page size");
            let per = kv.div_ceil(PAGE_SIZE) as i32;
            for r in 0..b as i32 {
                let pages: Vec<i32> = (r * per..(r + 1) * per).collect();
                batch
                    .push(1, kv, &pages)
                    .map_err(|e| CliError::failure(format!("{name}: {e}")))?;
            }
            let desc = batch.decode(heads, b * per as usize);
            let options = AttentionOptions::default()
                .with_logits_soft_cap(cap)
                .with_sm_scale(scale);
            let plan = Plan::new(&desc, &options, &PlanConfig::with_parallelism(parallelism))
                .map_err(|e| CliError::failure(format!("{name}: {e}")))?;
            let grid = plan.num_work_items() * hkv;
            let waves = grid.div_ceil(parallelism);
            if json {
                println!(
                    "{}",
                    json!({"type": "case", "arch": arch, "sms": sms, "case": name,
                           "kernel": rep.spec.name(), "blocks_per_sm": blocks,
                           "parallelism": parallelism, "work_items": plan.num_work_items(),
                           "blocks": grid, "split_kv": plan.split_kv(),
                           "merge_rows": plan.num_merge_rows(), "waves": waves})
                );
            } else {
                println!(
                    "{:34} {:22} {:>9} {:>11} {:>10} {:>6} {:>6} {:>5}",
                    name,
                    rep.spec.name(),
                    blocks,
                    parallelism,
                    plan.num_work_items(),
                    grid,
                    plan.num_merge_rows(),
                    waves
                );
            }
        }
    }
    Ok(())
}
