//! `flashpage bench --peer torch`: PyTorch's SDPA beside a case, with a python that has
//! torch; and the clear failure with one that does not.
//!
//! The python with torch is `$FLASHPAGE_PEER_TEST_PYTHON`, else `/tmp/py-venv/bin/python`
//! (the development machines' shared venv; CI's Python block points the variable at its
//! venv and runs this test there). It must import torch: the test fails, never skips,
//! when it does not. The python without torch is a fresh `python3 -m venv --without-pip`
//! made by the test itself, so the outcome does not depend on what the system python has.

use std::path::PathBuf;
use std::process::Command;

fn flashpage(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashpage"));
    cmd.args(args).env_remove("FLASHPAGE_PYTHON");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run flashpage");
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

fn torch_python() -> String {
    std::env::var("FLASHPAGE_PEER_TEST_PYTHON").unwrap_or_else(|_| "/tmp/py-venv/bin/python".into())
}

/// A fresh virtual environment without pip and without the system's packages: no torch.
fn python_without_torch() -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("flashpage-peer-notorch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let st = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&dir)
        .status()
        .expect("python3 -m venv runs (CI installs python3-venv)");
    assert!(st.success(), "python3 -m venv --without-pip failed");
    let py = dir
        .join("bin")
        .join("python")
        .to_string_lossy()
        .into_owned();
    (dir, py)
}

// Needs a Python with torch, which a fresh machine does not have: the README's `cargo test`
// leaves it out, and CI's Python block runs it with its venv's Python
// (`FLASHPAGE_PEER_TEST_PYTHON=... cargo test -p flashpage-cli --test bench_peer -- --include-ignored`).
#[test]
#[ignore = "needs a Python with torch: set FLASHPAGE_PEER_TEST_PYTHON and pass --include-ignored"]
fn bench_peer_torch_runs_sdpa_beside_the_case() {
    let python = torch_python();
    let (code, out, err) = flashpage(
        &[
            "bench",
            "decode",
            "--json",
            "--threads",
            "1",
            "--dtype",
            "f32",
            "--filter",
            "llama3-8b/b1-kv4096",
            "--peer",
            "torch",
            "--python",
            &python,
        ],
        &[],
    );
    assert_eq!(
        code, 0,
        "python {python} must import torch for this test: {err}"
    );
    let lines = json_lines(&out);
    let head = &lines[0];
    assert_eq!(head["type"], "ceilings");
    assert!(!head["cpu"].as_str().unwrap().is_empty());
    assert!(!head["simd"].as_str().unwrap().is_empty());
    assert_eq!(head["peer"], "torch");
    assert_eq!(head["peer_python"], python.as_str());
    assert!(!head["peer_torch_version"].as_str().unwrap().is_empty());
    let case = &lines[1];
    assert_eq!(case["case"], "decode/llama3-8b/b1-kv4096");
    assert_eq!(case["peer"], "torch");
    let (us, peer_us) = (
        case["us"].as_f64().unwrap(),
        case["peer_us"].as_f64().unwrap(),
    );
    assert!(peer_us > 0.0, "{case}");
    let ratio = case["peer_ratio"].as_f64().unwrap();
    assert!((ratio - peer_us / us).abs() <= 1e-9 * ratio, "{case}");
    // The peer's rate is on the same bytes: rate × time is the same for both.
    let (gbps, peer_gbps) = (
        case["gbps"].as_f64().unwrap(),
        case["peer_gbps"].as_f64().unwrap(),
    );
    assert!(
        (gbps * us - peer_gbps * peer_us).abs() <= 1e-9 * gbps * us,
        "{case}"
    );
    assert!(case["peer_calls"].as_u64().unwrap() >= 3, "{case}");
    assert!(case["peer_gather_us"].as_f64().unwrap() > 0.0, "{case}");
    assert_eq!(case["peer_soft_cap_skipped"], false);
    // Existing fields keep their names.
    assert!(case["ceiling_fraction"].as_f64().unwrap() > 0.0);
    assert_eq!(lines.last().unwrap()["type"], "ceilings_end");

    // Text: the header names the CPU, the SIMD level and the peer; the case has a peer line
    // with the ratio. The same interpreter, named through the environment this time.
    let (code, out, err) = flashpage(
        &[
            "bench",
            "prefill",
            "--threads",
            "1",
            "--dtype",
            "f32",
            "--filter",
            "llama3-8b/b1-q512",
            "--peer",
            "torch",
        ],
        &[("FLASHPAGE_PYTHON", &python)],
    );
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert!(first.contains("family") && first.contains("simd "), "{out}");
    assert!(out.contains("peer: torch"), "{out}");
    let peer_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("peer torch"))
        .unwrap_or_else(|| panic!("no peer line: {out}"));
    assert!(
        peer_line.contains("TFLOP/s") && peer_line.contains("ratio"),
        "{peer_line}"
    );
}

#[test]
fn bench_peer_torch_without_torch_is_a_clear_failure() {
    let (dir, python) = python_without_torch();
    let args = [
        "bench",
        "decode",
        "--threads",
        "1",
        "--filter",
        "llama3-8b/b1-kv4096",
        "--peer",
        "torch",
    ];
    let mut with_flag = args.to_vec();
    with_flag.extend(["--python", python.as_str()]);
    for (how, code, err) in [
        {
            let (c, _, e) = flashpage(&with_flag, &[]);
            ("--python", c, e)
        },
        {
            let (c, _, e) = flashpage(&args, &[("FLASHPAGE_PYTHON", &python)]);
            ("FLASHPAGE_PYTHON", c, e)
        },
    ] {
        assert_eq!(code, 1, "{how}: {err}");
        assert!(err.starts_with("error: python "), "{how}: {err}");
        assert!(err.contains(&python), "{how}: names the interpreter: {err}");
        assert!(err.contains("cannot import torch"), "{how}: {err}");
        assert!(
            err.contains("--python PATH or FLASHPAGE_PYTHON"),
            "{how}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{how}: one line: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);

    // An interpreter that does not exist.
    let (code, _, err) = flashpage(
        &[&args[..], &["--python", "/nonexistent/python"]].concat(),
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot run python \"/nonexistent/python\""),
        "{err}"
    );

    // Argument errors (exit status 2).
    let (code, _, err) = flashpage(&["bench", "--python", "python3"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--python"), "{err}");
    let (code, _, err) = flashpage(&["bench", "plan", "--peer", "torch"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = flashpage(&["bench", "--peer", "torch", "--backend", "cuda"], &[]);
    assert_eq!(code, 2, "{err}");
}
