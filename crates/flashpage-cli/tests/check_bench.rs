//! `flashpage check` and `flashpage bench` end to end: the suite and the benchmark matrix
//! through the binary, with their JSON lines.

fn flashpage(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashpage"))
        .args(args)
        .output()
        .expect("run flashpage");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn cli_check_runs_the_suite_and_reports_per_dtype() {
    let (code, out, err) = flashpage(&[
        "check",
        "--filter",
        "decode/kv1",
        "--json",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    let cases: Vec<_> = lines.iter().filter(|l| l["type"] == "case").collect();
    assert_eq!(cases.len(), 3, "one line per dtype: {out}");
    assert!(
        cases
            .iter()
            .all(|c| c["passed"] == true && c["o_error"].as_f64().is_some())
    );
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["failed"], 0);
    assert!(summary["worst"]["bf16"]["o"].as_f64().unwrap() <= 1e-2);

    let (code, out, _) = flashpage(&["check", "--filter", "error/founding"]);
    assert_eq!(code, 0);
    assert!(out.contains("IndptrLengthMismatch"), "{out}");

    let (code, _, err) = flashpage(&["check", "--filter", "no-such-case"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: --filter"), "{err}");
}

#[test]
fn cli_bench_prints_verified_cases_with_ceilings() {
    let (code, out, err) = flashpage(&[
        "bench",
        "decode",
        "--json",
        "--threads",
        "1",
        "--dtype",
        "f32",
        "--filter",
        "llama3-8b/b1-kv4096",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    assert_eq!(lines[0]["type"], "ceilings");
    assert!(lines[0]["read_gbps"].as_f64().unwrap() > 0.0);
    assert!(lines[0]["fma_gflops"].as_f64().unwrap() > 0.0);
    let case = &lines[1];
    assert_eq!(case["case"], "decode/llama3-8b/b1-kv4096");
    assert_eq!(case["dtype"], "f32");
    assert_eq!(case["backend"], "cpu");
    assert!(case["us"].as_f64().unwrap() > 0.0);
    assert!(case["gbps"].as_f64().unwrap() > 0.0);
    assert!(case["ceiling_fraction"].as_f64().unwrap() > 0.0);
    assert!(case["o_error"].as_f64().unwrap() <= 1e-5);
    assert_eq!(lines.last().unwrap()["type"], "ceilings_end");

    let (code, out, err) = flashpage(&["bench", "plan", "--json", "--filter", "decode/b64"]);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    // One row at this machine's parallelism, one at an H100's (396 work slots).
    assert_eq!(lines.len(), 2, "{out}");
    for l in &lines {
        assert_eq!(l["case"], "plan/decode/b64");
        assert!(l["us"].as_f64().unwrap() > 0.0);
        assert!(l["us_replan"].as_f64().unwrap() > 0.0);
        assert!(l["work_items"].as_u64().unwrap() >= 64);
    }
    assert_eq!(lines[1]["parallelism"], 396);

    let (code, _, err) = flashpage(&["bench", "--filter", "no-such-case"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn cli_bench_cascade_reports_both_runs_verified() {
    let (code, out, err) = flashpage(&["bench", "cascade", "--json", "--dtype", "bf16"]);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    assert_eq!(lines[0]["type"], "ceilings");
    let case = &lines[1];
    assert_eq!(case["case"], "cascade/llama3-8b/b64-prefix4096-suffix256");
    assert_eq!(case["dtype"], "bf16");
    // 64 × (256 + 16) pages flat, 256 + 64 × 16 in the cascade.
    let page = 16 * 8 * 128 * 2 * 2;
    assert_eq!(case["flat_bytes"], 64 * 272 * page);
    assert_eq!(case["cascade_bytes"], (256 + 64 * 16) * page);
    for key in ["flat_us", "cascade_us", "speedup", "byte_ratio"] {
        assert!(case[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(case["o_error"].as_f64().unwrap() <= 1e-2);
    assert!(case["flat_o_error"].as_f64().unwrap() <= 1e-2);
    assert_eq!(lines.last().unwrap()["type"], "ceilings_end");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cli_cuda_without_the_feature_is_a_clear_failure() {
    for cmd in ["bench", "check"] {
        let (code, _, err) = flashpage(&[cmd, "--backend", "cuda"]);
        assert_eq!(code, 1, "{cmd}");
        assert!(
            err.contains("built without the cuda feature"),
            "{cmd}: {err}"
        );
    }
}
