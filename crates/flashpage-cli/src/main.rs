//! `flashpage`: plan and explain a batch, size a workspace, replay a dumped batch, benchmark
//! and self-check.
//!
//! Exit status: 0 on success; 2 for invalid input, with one `error:` line on stderr naming
//! the offending field and values; 1 for other failures.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flashpage_cli::{bench, check, plan_cmd, run_cmd, workspace_cmd};

/// flashpage: paged-KV attention for LLM serving.
#[derive(Parser, Debug)]
#[command(name = "flashpage", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate and plan a batch described in JSON, and explain the plan.
    Plan(plan_cmd::PlanArgs),
    /// Size the workspaces for a deployment's limits.
    Workspace(workspace_cmd::WorkspaceArgs),
    /// Run one batch stored in a safetensors file and write o and lse.
    Run(run_cmd::RunArgs),
    /// Run the declarative case suite against the f64 reference.
    Check(check::CheckArgs),
    /// Benchmark the standard matrix (verified against the reference first).
    Bench(bench::BenchArgs),
    /// Compile the CUDA kernels with NVRTC (no GPU needed): resources, occupancy, cache.
    #[cfg(feature = "cuda")]
    Kernels(flashpage_cli::kernels_cmd::KernelsArgs),
    /// Compile the CUDA kernels (needs a build with the `cuda` feature).
    #[cfg(not(feature = "cuda"))]
    #[command(disable_help_flag = true)]
    Kernels {
        /// Ignored: the command needs the cuda feature.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        rest: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // Usage errors are invalid input: one `error:` line, exit status 2.
            // clap's message may continue on indented lines (the missing arguments): join
            // them, and drop its usage and help hints.
            let text = e.to_string();
            let message = text
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!(
                "error: {}",
                message.strip_prefix("error: ").unwrap_or(&message)
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Plan(a) => plan_cmd::main(a),
        Command::Workspace(a) => workspace_cmd::main(a),
        Command::Run(a) => run_cmd::main(a),
        Command::Check(a) => check::main(a),
        Command::Bench(a) => bench::main(a),
        #[cfg(feature = "cuda")]
        Command::Kernels(a) => flashpage_cli::kernels_cmd::main(a),
        #[cfg(not(feature = "cuda"))]
        Command::Kernels { .. } => Err(flashpage_cli::CliError::failure(
            "flashpage was built without the cuda feature: `flashpage kernels` compiles the cuda kernels; rebuild with `cargo build --release --features cuda`",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
