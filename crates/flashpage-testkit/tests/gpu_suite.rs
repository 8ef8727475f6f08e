//! The declarative case suite on the GPU, through the same runner interface as the CPU:
//! every case at every dtype and listed parallelism against the f64 reference, every
//! expected-error case, and the GPU's output against the CPU backend's for the same inputs.
//! Needs a GPU: on a machine without one the test fails with the backend's reason unless
//! `FLASHPAGE_GPU_OPTIONAL=1` is set (then it prints the reason and runs nothing); the GPU
//! machine runs it through `.gpu/on_device.sh`.
#![cfg(feature = "cuda")]

use flashpage::Error;
use flashpage::backend::cpu::CpuBackend;
use flashpage_testkit::CaseData;
use flashpage_testkit::HostRunner;
use flashpage_testkit::runner::CudaHost;
use flashpage_testkit::suite::{self, Suite};

fn gpu() -> Option<CudaHost> {
    match CudaHost::new(0) {
        Ok(g) => Some(g),
        Err(Error::BackendUnavailable { reason, .. })
            if std::env::var("FLASHPAGE_GPU_OPTIONAL").as_deref() == Ok("1") =>
        {
            println!("no gpu (FLASHPAGE_GPU_OPTIONAL=1): {reason}");
            None
        }
        Err(e) => panic!("the gpu suite needs a gpu: {e}"),
    }
}

#[test]
fn the_suite_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = CpuBackend::new(0).unwrap();
    let suite = Suite::embedded().unwrap();
    let seed = suite::seed_from_env();
    let runners: [&dyn HostRunner; 1] = [&gpu];
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in &suite.cases {
        for &dtype in &case.dtypes {
            for run in case.run(dtype, &runners, seed) {
                runs += 1;
                if !run.passed() {
                    failures.push(run.to_string());
                }
            }
            // The same inputs on both backends (a cascade case as a cascade on both; an FP8
            // cache on both): the GPU within tolerance of the CPU.
            let data: CaseData = case.materialise(dtype, seed).unwrap();
            let p = case.parallelism[0];
            let (o, lse) = case.run_data(&data, &gpu, p).unwrap();
            let (co, clse) = case.run_data(&data, &cpu, p).unwrap();
            let (e, el) = CaseData::output_difference(&o, &lse, &co, &clse);
            let tol = flashpage_testkit::reference::tolerance(dtype);
            if e > tol || el > tol {
                failures.push(format!(
                    "{} {}: gpu vs cpu o {e:e}, lse {el:e} (tolerance {tol:e})",
                    case.name,
                    dtype.name()
                ));
            }
        }
    }
    for e in &suite.errors {
        if let Err(why) = e.check(&gpu) {
            failures.push(why);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
