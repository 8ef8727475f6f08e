//! `flashpage bench --peer torch`: PyTorch's SDPA on the same shapes and thread count as
//! each CPU case, through `scripts/peer_torch.py` (embedded in the binary and run with
//! `python -c`, so the bench needs no checkout at run time).
//!
//! The interpreter is `--python PATH`, else `$FLASHPAGE_PYTHON`, else `python3`; it is
//! checked once before any thread starts (`import torch`), and a python without torch is a
//! clear failure (exit status 1), never a silently missing column. What the peer computes
//! and times is documented in the script (K/V gathered from the paged cache into contiguous
//! tensors before timing, gather not timed; no soft-cap, which SDPA lacks).

use std::process::Command;

use flashpage_testkit::case::CaseSpec;
use serde_json::{Value, json};

use crate::CliError;

/// The peer script (see its docstring for what it computes and times).
pub const SCRIPT: &str = include_str!("../../../scripts/peer_torch.py");

/// The environment variable naming the peer's Python interpreter.
pub const PYTHON_ENV: &str = "FLASHPAGE_PYTHON";

/// A Python interpreter that imports torch.
#[derive(Debug, Clone)]
pub struct TorchPeer {
    /// The interpreter as given (`--python`, `$FLASHPAGE_PYTHON` or `python3`).
    pub python: String,
    /// `torch.__version__`.
    pub torch_version: String,
}

/// The interpreter to use: `flag`, else `$FLASHPAGE_PYTHON` (when set and not empty), else
/// `python3`.
pub fn python_for(flag: Option<&str>) -> String {
    flag.map(str::to_string)
        .or_else(|| std::env::var(PYTHON_ENV).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "python3".to_string())
}

impl TorchPeer {
    /// Checks that `python` runs and imports torch; the error says which interpreter failed,
    /// why, and how to name another one.
    pub fn probe(python: &str) -> Result<TorchPeer, CliError> {
        let hint = format!(
            "--peer torch runs PyTorch's SDPA: install torch for that interpreter, or name one that has it with --python PATH or {PYTHON_ENV}"
        );
        let out = Command::new(python)
            .args(["-c", "import torch; print(torch.__version__)"])
            .output()
            .map_err(|e| CliError::failure(format!("cannot run python {python:?}: {e}; {hint}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            return Err(CliError::failure(format!(
                "python {python:?} cannot import torch ({}); {hint}",
                last.trim()
            )));
        }
        Ok(TorchPeer {
            python: python.to_string(),
            torch_version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    /// Runs the peer on `spec` with `threads` threads and the bench's timing rule.
    pub fn run(
        &self,
        spec: &CaseSpec,
        threads: usize,
        timing: Timing,
    ) -> Result<PeerResult, String> {
        let case = json!({
            "case": spec.name,
            "decode": spec.decode,
            "requests": spec.requests,
            "num_qo_heads": spec.heads.num_qo_heads(),
            "num_kv_heads": spec.heads.num_kv_heads(),
            "head_dim": spec.heads.head_dim(),
            "page_size": spec.page_size,
            "dtype": spec.dtype.name(),
            "causal": spec.options.causal,
            "sm_scale": spec.options.sm_scale,
            "soft_cap": spec.options.logits_soft_cap,
            "threads": threads,
            "min_calls": timing.min_calls,
            "min_seconds": timing.min_seconds,
            "max_calls": timing.max_calls,
            "floor_calls": timing.floor_calls,
            "budget_seconds": timing.budget_seconds,
        });
        let out = Command::new(&self.python)
            .args(["-c", SCRIPT, &case.to_string()])
            .output()
            .map_err(|e| format!("peer torch: cannot run {:?}: {e}", self.python))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let msg: Vec<&str> = err
                .lines()
                .filter(|l| l.starts_with("peer_torch:") || l.contains("Error"))
                .collect();
            return Err(format!(
                "peer torch failed ({}): {}",
                out.status,
                if msg.is_empty() {
                    err.trim().to_string()
                } else {
                    msg.join(" / ")
                }
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| format!("peer torch printed no JSON line: {stdout:?}"))?;
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("peer torch: {e}: {line:?}"))?;
        let num = |k: &str| {
            v[k].as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("peer torch: field {k:?} missing or not a number in {line}"))
        };
        let us = num("us")?;
        if us <= 0.0 {
            return Err(format!("peer torch: a time of {us} us in {line}"));
        }
        Ok(PeerResult {
            us,
            cpu_us: num("cpu_us")?,
            gather_us: num("gather_us")?,
            calls: num("calls")? as usize,
            sdpa_backend: v["sdpa_backend"].as_str().unwrap_or("unknown").to_string(),
            soft_cap_skipped: v["soft_cap_skipped"].as_bool().unwrap_or(false),
        })
    }
}

/// The bench's timing rule, handed to the peer so both are timed alike.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// At least this many timed calls...
    pub min_calls: usize,
    /// ...and this many seconds.
    pub min_seconds: f64,
    /// At most this many calls.
    pub max_calls: usize,
    /// Calls after which a slow case stops once `budget_seconds` are spent.
    pub floor_calls: usize,
    /// See `floor_calls`.
    pub budget_seconds: f64,
}

/// One peer measurement.
#[derive(Debug, Clone)]
pub struct PeerResult {
    /// Median wall time per call (the whole batch), microseconds.
    pub us: f64,
    /// Mean process CPU time per call (all threads), microseconds.
    pub cpu_us: f64,
    /// Median time of gathering the paged K/V into contiguous tensors (not in `us`).
    pub gather_us: f64,
    /// Timed calls.
    pub calls: usize,
    /// The SDPA backend torch chose (e.g. `FLASH_ATTENTION`).
    pub sdpa_backend: String,
    /// The case has a logits soft-cap that SDPA cannot apply (the peer ran without it).
    pub soft_cap_skipped: bool,
}
