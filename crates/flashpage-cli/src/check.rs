//! `flashpage check`: runs the declarative case suite (embedded from tests/data) against the
//! f64 reference on this machine's backends and SIMD levels, and prints pass/fail per case
//! with the worst error per dtype. Exit status 1 if anything fails.

use std::collections::BTreeMap;

use flashpage::DType;
use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage_testkit::HostRunner;
use flashpage_testkit::suite::{self, CaseRun, Suite};
use serde_json::json;

use crate::{BackendArg, CliError};

/// Arguments of `flashpage check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Backend to check.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// Threads of the CPU backend (default: one per available core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run only the cases whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default, Clone, Copy)]
struct Worst {
    o: f64,
    lse: f64,
    runs: usize,
}

pub fn main(args: CheckArgs) -> Result<(), CliError> {
    crate::check_threads(args.threads)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut suite = Suite::embedded().map_err(|e| CliError::failure(e.to_string()))?;
    if let Some(f) = &args.filter {
        suite.filter(f);
        if suite.cases.is_empty() && suite.errors.is_empty() {
            return Err(CliError::invalid(format!(
                "--filter {f:?} matches no case of the suite"
            )));
        }
    }
    let levels = SimdLevel::available();
    let runners = make_runners(args.backend, threads, &levels)?;
    let backends: Vec<&dyn HostRunner> = runners.iter().map(|r| r.as_ref()).collect();
    let seed = suite::seed_from_env();
    let level_names: Vec<&str> = match args.backend {
        BackendArg::Cpu => levels.iter().map(|l| l.name()).collect(),
        BackendArg::Cuda => Vec::new(),
    };
    let labels: Vec<String> = backends.iter().map(|b| b.label()).collect();
    if !args.json {
        println!(
            "flashpage check: {} cases, {} expected-error cases; backend {}, {threads} threads, runs on {}; seed {seed}",
            suite.cases.len(),
            suite.errors.len(),
            args.backend.name(),
            labels.join(", ")
        );
    }

    let (mut passed, mut failed) = (0usize, 0usize);
    let mut worst: BTreeMap<&'static str, Worst> = BTreeMap::new();
    let width = suite
        .cases
        .iter()
        .map(|c| c.name.len())
        .chain(suite.errors.iter().map(|e| e.name.len()))
        .max()
        .unwrap_or(0);
    for case in &suite.cases {
        for &dtype in &case.dtypes {
            let runs = case.run(dtype, &backends, seed);
            let ok = runs.iter().all(CaseRun::passed);
            let (o, lse) = worst_of(&runs);
            let w = worst.entry(dtype.name()).or_default();
            w.o = w.o.max(o);
            w.lse = w.lse.max(lse);
            w.runs += runs.len();
            if ok {
                passed += 1;
            } else {
                failed += 1;
            }
            let bad: Vec<String> = runs
                .iter()
                .filter(|r| !r.passed())
                .map(|r| r.to_string())
                .collect();
            if args.json {
                println!(
                    "{}",
                    json!({
                        "type": "case", "case": case.name, "dtype": dtype.name(), "passed": ok,
                        "o_error": finite_or_null(o), "lse_error": finite_or_null(lse),
                        "tolerance": flashpage_testkit::reference::tolerance(dtype),
                        "runs": runs.len(), "failures": bad,
                    })
                );
            } else {
                println!(
                    "{}  {:width$}  {:4}  o {:9.2e}  lse {:9.2e}  ({} runs)",
                    if ok { "ok  " } else { "FAIL" },
                    case.name,
                    dtype.name(),
                    o,
                    lse,
                    runs.len(),
                );
                for b in &bad {
                    println!("      {b}");
                }
            }
        }
    }
    for e in &suite.errors {
        let results: Vec<Result<String, String>> = backends.iter().map(|&b| e.check(b)).collect();
        let first_bad = results.iter().find_map(|r| r.as_ref().err());
        let ok = first_bad.is_none();
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        let detail = match (first_bad, &results[0]) {
            (Some(bad), _) => bad.clone(),
            (None, Ok(m)) => m.clone(),
            (None, Err(m)) => m.clone(),
        };
        if args.json {
            println!(
                "{}",
                json!({"type": "error_case", "case": e.name, "passed": ok, "detail": detail})
            );
        } else {
            println!(
                "{}  {:width$}  {}",
                if ok { "ok  " } else { "FAIL" },
                e.name,
                detail
            );
        }
    }

    if args.json {
        let w: serde_json::Map<String, serde_json::Value> = worst
            .iter()
            .map(|(d, w)| {
                (
                    d.to_string(),
                    json!({"o": finite_or_null(w.o), "lse": finite_or_null(w.lse),
                           "tolerance": tolerance_of(d), "runs": w.runs}),
                )
            })
            .collect();
        println!(
            "{}",
            json!({"type": "summary", "passed": passed, "failed": failed,
                   "backend": args.backend.name(), "runners": labels,
                   "threads": threads, "simd": level_names, "seed": seed, "worst": w})
        );
    } else {
        println!();
        println!("worst relative error per dtype (over every case, simd level and plan):");
        for (d, w) in &worst {
            println!(
                "  {d:4}  o {:9.2e}  lse {:9.2e}  tolerance {:.0e}  ({} runs)",
                w.o,
                w.lse,
                tolerance_of(d),
                w.runs
            );
        }
        println!(
            "{passed} passed, {failed} failed (cases count once per dtype; replay with FLASHPAGE_SEED={seed})"
        );
    }
    if failed > 0 {
        Err(CliError::failure(format!(
            "{failed} of {} suite entries failed",
            passed + failed
        )))
    } else {
        Ok(())
    }
}

fn worst_of(runs: &[CaseRun]) -> (f64, f64) {
    runs.iter()
        .fold((0.0f64, 0.0f64), |(o, l), r| match &r.result {
            Ok(c) => (o.max(c.o_error), l.max(c.lse_error)),
            Err(_) => (f64::INFINITY, f64::INFINITY),
        })
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() { json!(x) } else { json!(null) }
}

fn tolerance_of(name: &str) -> f64 {
    DType::parse(name).map_or(f64::NAN, flashpage_testkit::reference::tolerance)
}

/// The backends the suite runs on: the CPU at every SIMD level of this machine, or the GPU
/// (device 0) through host tensors.
fn make_runners(
    backend: BackendArg,
    threads: usize,
    levels: &[SimdLevel],
) -> Result<Vec<Box<dyn HostRunner>>, CliError> {
    match backend {
        BackendArg::Cpu => levels
            .iter()
            .map(|&l| CpuBackend::with_simd(threads, l).map(|b| Box::new(b) as Box<dyn HostRunner>))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CliError::from),
        BackendArg::Cuda => cuda_runner().map(|r| vec![r]),
    }
}

#[cfg(feature = "cuda")]
fn cuda_runner() -> Result<Box<dyn HostRunner>, CliError> {
    let host = flashpage_testkit::runner::CudaHost::new(0)?;
    Ok(Box::new(host))
}

/// Without the `cuda` feature there is no GPU backend to check.
#[cfg(not(feature = "cuda"))]
fn cuda_runner() -> Result<Box<dyn HostRunner>, CliError> {
    Err(CliError::failure(
        "flashpage was built without the cuda feature: rebuild with --features cuda",
    ))
}
