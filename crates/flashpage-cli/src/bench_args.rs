//! What both bench commands (`bench.rs` for the CPU, `bench_cuda.rs` for the GPU) share: the
//! arguments of `flashpage bench` and the statistics. Both import this module; neither
//! imports the other's internals (`bench.rs` only hands a `--backend cuda` run over).

use clap::ValueEnum;

use crate::BackendArg;

/// Which part of the matrix to run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// Batch decode over the paged cache.
    Decode,
    /// Causal prefill (qo_len = kv_len).
    Prefill,
    /// Planning alone.
    Plan,
    /// Shared-prefix decode, flat and as a cascade (bytes referenced and time).
    Cascade,
    /// Everything.
    All,
}

/// Arguments of `flashpage bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to benchmark.
    #[arg(value_enum, default_value_t = What::All)]
    pub what: What,
    /// Backend to benchmark.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// Threads (CPU backend; default: one per available core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run only the cases whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
    /// Run only this dtype (f32 or bf16; default both).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Force a SIMD level of the CPU backend (scalar, avx2 or avx512; default: the best
    /// this machine has). A forced level is printed as forced.
    #[arg(long)]
    pub simd: Option<String>,
    /// Run a peer on the same shapes and thread count after each case and print both
    /// figures and their ratio (`torch`: PyTorch's SDPA through `scripts/peer_torch.py`;
    /// CPU backend, decode and prefill cases).
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// The Python interpreter of `--peer torch` (default: `$FLASHPAGE_PYTHON`, else
    /// `python3`); it must be able to `import torch`.
    #[arg(long)]
    pub python: Option<String>,
}

/// A peer implementation benchmarked beside each case.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// PyTorch's `scaled_dot_product_attention` (CPU).
    Torch,
}

/// The median of `v` (sorted in place); the figure every bench row reports.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
