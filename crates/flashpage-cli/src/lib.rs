//! The `flashpage` command's library: every subcommand, and the parsers of its input
//! formats (the JSON batch schema of `flashpage plan`, the safetensors case of `flashpage
//! run`), so the fuzz targets run the real parsers.
//!
//! Exit status: 0 on success; 2 for invalid input, with one `error:` line on stderr naming
//! the offending field and values; 1 for other failures.

pub mod bench;
pub mod bench_args;
mod bench_cascade;
#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod bench_peer;
pub mod check;
pub mod cli_error;
pub mod files;
#[cfg(feature = "cuda")]
pub mod kernels_cmd;
pub mod plan_cmd;
pub mod run_cmd;
pub mod workspace_cmd;

use clap::ValueEnum;

pub use cli_error::CliError;

/// Checks a `--threads` value before any thread starts: positive and at most the library's
/// one thread limit, [`flashpage::backend::cpu::MAX_THREADS`].
pub fn check_threads(threads: Option<usize>) -> Result<(), CliError> {
    use flashpage::backend::cpu::MAX_THREADS;
    match threads {
        Some(0) => Err(CliError::invalid("--threads must be greater than 0, got 0")),
        Some(t) if t > MAX_THREADS => Err(CliError::invalid(format!(
            "--threads {t} exceeds the limit {MAX_THREADS}"
        ))),
        _ => Ok(()),
    }
}

/// Which backend a command runs on.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    /// The CPU backend (default).
    Cpu,
    /// The CUDA backend (needs the `cuda` feature and a GPU).
    Cuda,
}

impl BackendArg {
    /// `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Cpu => "cpu",
            BackendArg::Cuda => "cuda",
        }
    }
}
