//! Every kernel family compiled with the real NVRTC, no GPU needed: a representative set for
//! sm_90a and sm_80 (every dtype, every rows-per-pass, head dims 64/128/256, RoPE on head dim
//! 128, FP8 caches under bf16 and f32 q; the merge and cascade-fold kernels; the bandwidth probe; the append and RoPE kernels) through the backend's own compile path.
//! Asserts: no compile error and no warning; no spill and no stack frame in the decode
//! variants without RoPE and in the cascade fold, no stack frame in any decode variant; resident blocks per SM at
//! least the budget each variant is compiled for (`DecodeVariant::min_blocks`, what the plan's
//! parallelism assumes); a cache written here is found under the key the device computes.
//!
//! NVRTC comes from the loader's path (`pip install nvidia-cuda-nvrtc`, its `nvidia/cu13/lib`
//! on `LD_LIBRARY_PATH`). Without it the test prints `skipped`, unless
//! `FLASHPAGE_REQUIRE_NVRTC=1` (CI sets it): then it fails.
#![cfg(feature = "cuda")]

use std::sync::Mutex;

use flashpage::backend::cuda::launch::DecodeVariant;
use flashpage::backend::cuda::prefill::PrefillVariant;
use flashpage::backend::cuda::report::{KernelReport, KernelSpec, OfflineCompiler};
use flashpage::{DType, Error};

fn compiler(cache: Option<std::path::PathBuf>) -> Option<OfflineCompiler> {
    match OfflineCompiler::new(cache) {
        Ok(c) => Some(c),
        Err(Error::BackendUnavailable { reason, .. })
            if std::env::var_os("FLASHPAGE_REQUIRE_NVRTC").is_none_or(|v| v != "1") =>
        {
            println!("skipped: {reason}");
            None
        }
        Err(e) => panic!("NVRTC is required (FLASHPAGE_REQUIRE_NVRTC=1) but: {e}"),
    }
}

fn representative_set() -> Vec<KernelSpec> {
    let mut set = Vec::new();
    for d in [64, 128, 256] {
        for dtype in DType::ALL {
            for rows in [1, 2, 4, 8] {
                set.push(KernelSpec::Decode(DecodeVariant::with_rows(
                    d, dtype, rows, false,
                )));
                if d == 128 {
                    set.push(KernelSpec::Decode(DecodeVariant::with_rows(
                        d, dtype, rows, true,
                    )));
                }
            }
            set.push(KernelSpec::Merge { head_dim: d, dtype });
            set.push(KernelSpec::CascadeFold { head_dim: d, dtype });
        }
        // FP8 caches (e4m3fn, e5m2) under bf16 and f32 q, every rows-per-pass, RoPE at 128.
        for kv in DType::FP8 {
            for dtype in [DType::BF16, DType::F32] {
                for rows in [1, 2, 4, 8] {
                    for rope in [false, d == 128] {
                        let v = DecodeVariant::with_rows(d, dtype, rows, rope).with_kv_dtype(kv);
                        if !set.contains(&KernelSpec::Decode(v)) {
                            set.push(KernelSpec::Decode(v));
                        }
                    }
                }
            }
        }
    }
    set.push(KernelSpec::Bandwidth);
    set.push(KernelSpec::Append);
    set.push(KernelSpec::Rope);
    set
}

/// Compiles `jobs` on every core.
fn compile_all(
    c: &OfflineCompiler,
    jobs: &[(&str, KernelSpec)],
) -> Vec<Result<KernelReport, String>> {
    let next = Mutex::new(0usize);
    let out: Vec<Mutex<Option<Result<KernelReport, String>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some((arch, spec)) = jobs.get(i) else {
                        break;
                    };
                    let r = c.compile(spec, arch).map_err(|e| e.to_string());
                    *out[i].lock().unwrap() = Some(r);
                }
            });
        }
    });
    out.into_iter()
        .map(|m| m.into_inner().unwrap().expect("every job ran"))
        .collect()
}

/// The tensor-core prefill kernel, every variant it is routed for at the head dims of the
/// standard matrices and around them (16, 64, 80, 128), f16 and bf16, on sm_90a and sm_80:
/// no warning, no spill, no stack frame, at least its budget of resident blocks per SM.
#[test]
fn prefill_kernels_compile_without_spills() {
    let Some(c) = compiler(None) else { return };
    let mut jobs = Vec::new();
    for arch in ["sm_90a", "sm_80"] {
        for d in [16, 64, 80, 128] {
            for dtype in [DType::BF16, DType::F16] {
                let v = PrefillVariant::with_head_dim(d, dtype).expect("a routed head dim");
                jobs.push((arch, KernelSpec::Prefill(v)));
                // FP8 caches: converted exactly to q's type on their way into the tiles.
                for kv in DType::FP8 {
                    jobs.push((arch, KernelSpec::Prefill(v.with_kv_dtype(kv))));
                }
            }
        }
    }
    let mut problems = Vec::new();
    for ((arch, spec), r) in jobs.iter().zip(compile_all(&c, &jobs)) {
        let name = format!("{arch} {}", spec.name());
        let rep = match r {
            Ok(rep) => rep,
            Err(e) => {
                problems.push(format!("{name}: compile error: {e}"));
                continue;
            }
        };
        let res = rep.resources;
        println!(
            "{name:40} regs {:3} spills {}/{} smem {:6} stack {:3} blocks/SM {:?} {:6.0} ms",
            res.registers,
            res.spill_store_bytes,
            res.spill_load_bytes,
            res.shared_bytes,
            res.stack_bytes,
            rep.blocks_per_sm,
            rep.compile_ms
        );
        let KernelSpec::Prefill(v) = spec else {
            unreachable!("only prefill jobs")
        };
        if !rep.warnings.is_empty() {
            problems.push(format!("{name}: warnings {:?}", rep.warnings));
        }
        if res.registers == 0 {
            problems.push(format!("{name}: no register count in the report"));
        }
        if res.spill_store_bytes > 0 || res.spill_load_bytes > 0 || res.stack_bytes > 0 {
            problems.push(format!(
                "{name}: spills {}/{} bytes, stack {}",
                res.spill_store_bytes, res.spill_load_bytes, res.stack_bytes
            ));
        }
        match rep.blocks_per_sm {
            Some(b) if b as usize >= v.min_blocks => {}
            other => problems.push(format!(
                "{name}: {other:?} resident blocks per SM, budget {}",
                v.min_blocks
            )),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn kernels_compile_without_spills_at_the_planned_occupancy() {
    let Some(c) = compiler(None) else { return };
    let set = representative_set();
    let jobs: Vec<(&str, KernelSpec)> = ["sm_90a", "sm_80"]
        .into_iter()
        .flat_map(|a| set.iter().map(move |s| (a, *s)))
        .collect();
    let results = compile_all(&c, &jobs);
    let mut problems = Vec::new();
    for ((arch, spec), r) in jobs.iter().zip(results) {
        let name = format!("{arch} {}", spec.name());
        let rep = match r {
            Ok(rep) => rep,
            Err(e) => {
                problems.push(format!("{name}: compile error: {e}"));
                continue;
            }
        };
        let res = rep.resources;
        println!(
            "{name:40} regs {:3} spills {}/{} smem {:6} stack {:3} blocks/SM {:?} {:6.0} ms",
            res.registers,
            res.spill_store_bytes,
            res.spill_load_bytes,
            res.shared_bytes,
            res.stack_bytes,
            rep.blocks_per_sm,
            rep.compile_ms
        );
        if !rep.warnings.is_empty() {
            problems.push(format!("{name}: warnings {:?}", rep.warnings));
        }
        if res.registers == 0 {
            problems.push(format!("{name}: no register count in the report"));
        }
        if let KernelSpec::CascadeFold { .. } = spec
            && (res.spill_store_bytes > 0 || res.spill_load_bytes > 0 || res.stack_bytes > 0)
        {
            problems.push(format!(
                "{name}: spills {}/{} bytes, stack {}",
                res.spill_store_bytes, res.spill_load_bytes, res.stack_bytes
            ));
        }
        if let KernelSpec::Decode(v) = spec {
            if !v.rope && (res.spill_store_bytes > 0 || res.spill_load_bytes > 0) {
                problems.push(format!(
                    "{name}: spills {}/{} bytes",
                    res.spill_store_bytes, res.spill_load_bytes
                ));
            }
            if res.stack_bytes > 0 {
                problems.push(format!("{name}: {} bytes of stack", res.stack_bytes));
            }
            match rep.blocks_per_sm {
                Some(b) if b as usize >= v.min_blocks => {}
                other => problems.push(format!(
                    "{name}: {other:?} resident blocks per SM, the plan assumes {}",
                    v.min_blocks
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Architectures NVRTC does not target are refused with both names, not compiled.
#[test]
fn unsupported_architecture_is_refused() {
    let Some(c) = compiler(None) else { return };
    let v = DecodeVariant::with_rows(128, DType::BF16, 4, false);
    let e = c.compile(&KernelSpec::Decode(v), "sm_70").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("sm_70") && msg.contains("sm_75"), "{msg}");
}

/// `flashpage kernels --cache` writes what the backend's lookup finds.
#[test]
fn cache_written_offline_is_found_under_the_device_key() {
    let dir = std::env::temp_dir().join(format!("flashpage-nvrtc-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Some(c) = compiler(Some(dir.clone())) else {
        return;
    };
    let merge = KernelSpec::Merge {
        head_dim: 64,
        dtype: DType::F16,
    };
    let other = KernelSpec::Merge {
        head_dim: 128,
        dtype: DType::F16,
    };
    assert!(!c.is_cached(&merge, "sm_90a"));
    let rep = c.compile(&merge, "sm_90a").unwrap();
    assert!(rep.image_bytes > 0);
    assert!(c.is_cached(&merge, "sm_90a"));
    // Another architecture or variant is another key.
    assert!(!c.is_cached(&merge, "sm_80"));
    assert!(!c.is_cached(&other, "sm_90a"));
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
