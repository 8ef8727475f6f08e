//! `flashpage workspace`: the bytes to allocate for a deployment's limits, and where every
//! buffer goes, from [`flashpage::workspace_size`].

use std::fmt::Write;

use flashpage::plan::MAX_PARALLELISM;
use flashpage::workspace::WorkspaceReq;
use flashpage::{DType, Error, HeadConfig, PlanConfig};
use flashpage::{WorkspaceLimits, workspace_size};
use serde_json::{Value, json};

use crate::CliError;

/// Arguments of `flashpage workspace`.
#[derive(clap::Args, Debug)]
pub struct WorkspaceArgs {
    /// Query/output heads.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    num_qo_heads: usize,
    /// Key/value heads (a divisor of --num-qo-heads).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    num_kv_heads: usize,
    /// Head dimension (a multiple of 16 in 16..=256).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    head_dim: usize,
    /// Most requests in one batch.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_batch: usize,
    /// Most query tokens (rows) in one batch.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_tokens: usize,
    /// Longest request in keys.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_kv_len: usize,
    /// Fixed batch capacity for CUDA-graph mode (at least --max-batch).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    graph_capacity: Option<usize>,
    /// Parallel work slots the planner fills (GPU: SMs x blocks per SM; CPU: threads).
    /// Default: this machine's available parallelism; when sizing for a GPU, pass the GPU's
    /// largest (on an H100 up to 528: 132 SMs x 4 blocks of the one-row kernel variants;
    /// `flashpage kernels` lists each variant's blocks per SM), or the workspace comes out
    /// too small.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    parallelism: Option<usize>,
    /// Fixed KV chunk in tokens (deterministic mode).
    #[arg(long, value_name = "TOKENS", allow_negative_numbers = true)]
    deterministic_chunk: Option<usize>,
    /// Prefill q tile in packed rows.
    #[arg(long, value_name = "ROWS", allow_negative_numbers = true, default_value_t = PlanConfig::DEFAULT_Q_TILE)]
    q_tile: usize,
    /// Element type of q/k/v/o: f32, f16 or bf16 (partial states are f32 whatever it is).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
}

/// Writes `text` to standard output. A closed pipe (`flashpage ... | head`) ends the output
/// quietly; any other write error is a failure.
pub fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::failure(format!(
            "cannot write to standard output: {e}"
        ))),
    }
}

/// `n` bytes in binary units, e.g. `1.50 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.2} {}", UNITS[u])
}

/// Appends a workspace's total and its buffers (name, offset, bytes) to `out`.
pub fn print_workspace(out: &mut String, which: &str, req: &WorkspaceReq) {
    let _ = writeln!(
        out,
        "{which} workspace: {} bytes ({})",
        req.total(),
        human_bytes(req.total() as u64)
    );
    for b in req.buffers() {
        let _ = writeln!(
            out,
            "  {:<12} offset {:>14}  bytes {:>14}  ({})",
            b.name,
            b.offset,
            b.bytes,
            human_bytes(b.bytes as u64)
        );
    }
}

/// The buffers of a workspace as JSON objects `{name, workspace, offset, bytes}`.
pub fn buffers_json(which: &str, req: &WorkspaceReq) -> Vec<Value> {
    req.buffers()
        .iter()
        .map(|b| json!({"name": b.name, "workspace": which, "offset": b.offset, "bytes": b.bytes}))
        .collect()
}

fn positive(flag: &str, v: usize) -> Result<(), CliError> {
    if v == 0 {
        Err(CliError::invalid(format!(
            "{flag} must be greater than 0, got 0"
        )))
    } else {
        Ok(())
    }
}

fn heads_of(a: &WorkspaceArgs) -> Result<HeadConfig, CliError> {
    positive("--num-qo-heads", a.num_qo_heads)?;
    positive("--num-kv-heads", a.num_kv_heads)?;
    positive("--head-dim", a.head_dim)?;
    HeadConfig::new(a.num_qo_heads, a.num_kv_heads, a.head_dim).map_err(|e| {
        let msg = match &e {
            Error::HeadRatio { .. } => format!(
                "--num-qo-heads {} must be a multiple of --num-kv-heads {}",
                a.num_qo_heads, a.num_kv_heads
            ),
            Error::UnsupportedHeadDim { expected, .. } => format!(
                "--head-dim {} is not supported: expected {expected}",
                a.head_dim
            ),
            Error::LimitExceeded { limit, .. } => format!(
                "--num-qo-heads {} exceeds the limit {limit}",
                a.num_qo_heads
            ),
            _ => format!("invalid heads: {e}"),
        };
        CliError::invalid(msg)
    })
}

/// Validates the flags and builds the limits.
fn limits_of(a: &WorkspaceArgs) -> Result<WorkspaceLimits, CliError> {
    let heads = heads_of(a)?;
    let dtype = DType::parse(&a.dtype).ok_or_else(|| {
        CliError::invalid(format!(
            "--dtype must be f32, f16 or bf16, got {:?}",
            a.dtype
        ))
    })?;
    positive("--max-batch", a.max_batch)?;
    positive("--max-tokens", a.max_tokens)?;
    positive("--max-kv-len", a.max_kv_len)?;
    positive("--q-tile", a.q_tile)?;
    if a.q_tile > 1 << 16 {
        return Err(CliError::invalid(format!(
            "--q-tile {} exceeds the limit 65536 packed rows",
            a.q_tile
        )));
    }
    for (flag, v) in [
        ("--parallelism", a.parallelism),
        ("--graph-capacity", a.graph_capacity),
        ("--deterministic-chunk", a.deterministic_chunk),
    ] {
        if let Some(v) = v {
            positive(flag, v)?;
        }
    }
    if let Some(p) = a.parallelism
        && p > MAX_PARALLELISM
    {
        return Err(CliError::invalid(format!(
            "--parallelism {p} exceeds the limit {MAX_PARALLELISM} work slots"
        )));
    }
    if let Some(c) = a.graph_capacity
        && c < a.max_batch
    {
        return Err(CliError::invalid(format!(
            "--graph-capacity {c} is less than --max-batch {}: graph-mode batches are padded to the capacity, so it must hold the largest batch",
            a.max_batch
        )));
    }
    let parallelism = a
        .parallelism
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut limits = WorkspaceLimits::new(
        heads,
        dtype,
        a.max_batch,
        a.max_tokens,
        a.max_kv_len,
        parallelism,
    );
    limits.config.graph_capacity = a.graph_capacity;
    if a.graph_capacity.is_some() {
        limits.config.graph_max_q_rows = Some(a.max_tokens);
        limits.config.graph_max_kv_len = Some(a.max_kv_len);
    }
    limits.config.deterministic_chunk = a.deterministic_chunk;
    limits.config.q_tile = a.q_tile;
    Ok(limits)
}

/// The flag behind a limit the library names.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "max_batch" => "--max-batch",
        "max_q_tokens" | "graph_max_q_rows" => "--max-tokens",
        "max_kv_len" | "graph_max_kv_len" => "--max-kv-len",
        "graph_capacity" => "--graph-capacity",
        "deterministic_chunk" => "--deterministic-chunk",
        "parallelism" => "--parallelism",
        "q_tile" => "--q-tile",
        _ => return None,
    })
}

pub fn main(args: WorkspaceArgs) -> Result<(), CliError> {
    let limits = limits_of(&args)?;
    let too_large = |e: &Error| {
        format!(
            "{e} for --max-batch {}, --max-tokens {}, --max-kv-len {}, --parallelism {}: these limits are too large",
            args.max_batch, args.max_tokens, args.max_kv_len, limits.config.parallelism
        )
    };
    let sized = workspace_size(&limits).and_then(|req| req.total().map(|t| (req, t)));
    let (req, total) = sized.map_err(|e| match &e {
        Error::LimitExceeded {
            field,
            limit,
            actual,
            rule,
        } => match flag_of(field) {
            Some(flag) => CliError::invalid(format!(
                "{flag} {actual} exceeds the limit {limit} ({rule})"
            )),
            None => CliError::invalid(too_large(&e)),
        },
        Error::SizeOverflow { .. } => CliError::invalid(too_large(&e)),
        _ => e.into(),
    })?;
    let (float, int) = (req.float.total(), req.int.total());
    let h = limits.heads;
    let c = &limits.config;
    if args.json {
        let mut buffers = buffers_json("float", &req.float);
        buffers.extend(buffers_json("int", &req.int));
        let j = json!({
            "num_qo_heads": h.num_qo_heads(),
            "num_kv_heads": h.num_kv_heads(),
            "head_dim": h.head_dim(),
            "dtype": limits.dtype.name(),
            "max_batch": limits.max_batch,
            "max_tokens": limits.max_q_tokens,
            "max_kv_len": limits.max_kv_len,
            "graph_capacity": c.graph_capacity,
            "parallelism": c.parallelism,
            "deterministic_chunk": c.deterministic_chunk,
            "q_tile": c.q_tile,
            "float_bytes": float,
            "int_bytes": int,
            "total_bytes": total,
            "buffers": buffers,
        });
        return emit(&format!("{j}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "limits: {} qo heads / {} kv heads (group {}), head_dim {}, {}; max batch {}, max tokens {}, max kv len {}",
        h.num_qo_heads(),
        h.num_kv_heads(),
        h.group_size(),
        h.head_dim(),
        limits.dtype.name(),
        limits.max_batch,
        limits.max_q_tokens,
        limits.max_kv_len
    );
    let _ = writeln!(
        out,
        "planner: parallelism {}{}, graph capacity {}, deterministic chunk {}, q tile {}",
        c.parallelism,
        if args.parallelism.is_none() {
            " (this machine)"
        } else {
            ""
        },
        c.graph_capacity
            .map_or("none".to_string(), |x| x.to_string()),
        c.deterministic_chunk
            .map_or("none".to_string(), |x| format!("{x} tokens")),
        c.q_tile
    );
    let _ = writeln!(
        out,
        "allocate: float workspace {float} bytes ({}), int workspace {int} bytes ({})",
        human_bytes(float as u64),
        human_bytes(int as u64)
    );
    print_workspace(&mut out, "float", &req.float);
    print_workspace(&mut out, "int", &req.int);
    let _ = writeln!(out, "total: {total} bytes ({})", human_bytes(total as u64));
    emit(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.00 EiB");
    }
}
