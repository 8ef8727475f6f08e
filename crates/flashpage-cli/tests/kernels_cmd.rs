//! `flashpage kernels`: usage errors, the gate on the cuda feature, and (where NVRTC loads)
//! the default set compiled into a cache, with its JSON report.
//!
//! NVRTC comes from the loader's path (`pip install nvidia-cuda-nvrtc`, its `nvidia/cu13/lib`
//! on `LD_LIBRARY_PATH`); without it the compiling test prints `skipped`, unless
//! `FLASHPAGE_REQUIRE_NVRTC=1` (CI sets it): then it fails.

use std::process::{Command, Output};

fn flashpage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashpage"))
        .args(args)
        .output()
        .expect("the flashpage binary starts")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[cfg(not(feature = "cuda"))]
#[test]
fn kernels_needs_the_cuda_feature() {
    for args in [&["kernels"][..], &["kernels", "--arch", "sm_90a", "--json"]] {
        let o = flashpage(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains("without the cuda feature"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn kernels_usage_errors_exit_2() {
    for args in [
        &["kernels", "--arch", "sm90"][..],
        &["kernels", "--arch", "sm_90a,gfx90a"],
        &["kernels", "--head-dim", "72"],
        &["kernels", "--head-dim", "0"],
        &["kernels", "--jobs", "0"],
        &["kernels", "--frobnicate"],
    ] {
        let o = flashpage(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn kernels_default_set_into_a_cache() {
    use serde_json::Value;
    let dir = std::env::temp_dir().join(format!("flashpage-kernels-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = flashpage(&[
        "kernels",
        "--arch",
        "sm_90a",
        "--json",
        "--cache",
        dir.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    if o.status.code() == Some(1)
        && err.contains("libnvrtc")
        && std::env::var_os("FLASHPAGE_REQUIRE_NVRTC").is_none_or(|v| v != "1")
    {
        println!("skipped: {err}");
        return;
    }
    assert_eq!(o.status.code(), Some(0), "{err}");
    let lines: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "nvrtc");
    let kernels: Vec<&Value> = lines.iter().filter(|l| l["type"] == "kernel").collect();
    let cases: Vec<&Value> = lines.iter().filter(|l| l["type"] == "case").collect();
    // llama3-8b and gemma2-27b, bf16 and f16: 2 decode + 1 prefill (tensor-core) variants
    // per dtype, each also over an e4m3fn and an e5m2 cache (x3: 18), a merge and a
    // cascade-fold kernel per dtype, the bandwidth probe, the append and RoPE entries of
    // ops.cu.
    assert_eq!(kernels.len(), 25, "{lines:?}");
    let fp8 = kernels
        .iter()
        .filter(|k| k["name"].as_str().is_some_and(|n| n.contains(" kv e")))
        .count();
    assert_eq!(fp8, 12, "{lines:?}");
    let folds = kernels
        .iter()
        .filter(|k| k["kernel"] == "cascade_fold")
        .count();
    assert_eq!(folds, 2, "{lines:?}");
    let prefill = kernels.iter().filter(|k| k["kernel"] == "prefill").count();
    assert_eq!(prefill, 6, "{lines:?}");
    let entries: Vec<&str> = kernels.iter().filter_map(|k| k["entry"].as_str()).collect();
    assert!(
        entries.contains(&"fp_append") && entries.contains(&"fp_rope"),
        "{entries:?}"
    );
    assert_eq!(cases.len(), 12, "{lines:?}");
    for k in &kernels {
        assert_eq!(k["arch"], "sm_90a");
        assert!(k["registers"].as_u64().unwrap() > 0, "{k}");
        assert!(k["compile_ms"].as_f64().unwrap() > 0.0, "{k}");
        assert_eq!(k["warnings"].as_array().unwrap().len(), 0, "{k}");
        if k["kernel"] == "decode" || k["kernel"] == "prefill" {
            assert_eq!(k["spill_store_bytes"], 0, "{k}");
            assert_eq!(k["stack_bytes"], 0, "{k}");
            assert!(
                k["blocks_per_sm"].as_u64().unwrap() >= k["min_blocks"].as_u64().unwrap(),
                "{k}"
            );
        }
    }
    for c in &cases {
        let blocks = c["blocks_per_sm"].as_u64().unwrap();
        assert_eq!(c["parallelism"].as_u64().unwrap(), 132 * blocks, "{c}");
    }
    // One cache entry per module (append and RoPE share ops.cu's, each dtype's merge and
    // cascade fold merge.cu's).
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, kernels.len() - 1 - folds);
    std::fs::remove_dir_all(&dir).unwrap();
}
