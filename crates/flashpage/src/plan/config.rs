//! How to plan: the plan kind, the planner configuration and the limits it enforces.

use crate::error::{Error, Result};

/// The largest int image (schedule) a plan builds, in bytes: 256 MiB (over 11 million work
/// items), far beyond any batch a device runs in one launch. A batch or configuration that would need more (absurd
/// parallelism, billions of query rows, a tiny q tile) is a [`Error::LimitExceeded`], raised
/// before anything is allocated, so no number in a batch can drive a huge allocation.
pub const MAX_INT_IMAGE_BYTES: usize = 1 << 28;

/// The largest workspace (float or int, and both together) a plan or [`crate::plan::workspace_size`]
/// may require, in bytes: `isize::MAX`, the most one allocation can hold. A requirement
/// beyond it is a [`Error::LimitExceeded`] naming the workspace, never a wrapped or
/// unallocatable size.
pub const MAX_WORKSPACE_BYTES: usize = isize::MAX as usize;

/// The largest graph capacity ([`PlanConfig::graph_capacity`]): `2^24` requests, the most
/// whose `requests` array (16 bytes each) fits in [`MAX_INT_IMAGE_BYTES`]. The other arrays
/// may lower the usable capacity further; the planner then names the largest that fits.
pub const MAX_GRAPH_CAPACITY: usize = MAX_INT_IMAGE_BYTES / 16;

/// The largest `graph_max_q_rows`, `graph_max_kv_len` and deterministic chunk: plan arrays
/// hold rows and keys as int32.
pub const MAX_GRAPH_ROWS: usize = i32::MAX as usize;

/// The most work slots [`PlanConfig::parallelism`] may name: 2^20, several times the threads
/// of the largest GPU (an H100 runs 132 SMs × 2048 threads).
pub const MAX_PARALLELISM: usize = 1 << 20;

/// Decode (one query row per request) or prefill (ragged rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PlanKind {
    /// One row per request.
    Decode,
    /// Ragged rows per request.
    Prefill,
}

impl PlanKind {
    /// `decode` or `prefill`.
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::Decode => "decode",
            PlanKind::Prefill => "prefill",
        }
    }
}

/// Fixed launch shape for graph mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GraphCapacity {
    /// Most requests in a batch (padded requests included).
    pub batch: usize,
    /// Most query rows (prefill); `None` means `batch` (decode-like).
    pub q_rows: Option<usize>,
    /// Longest request in keys; needed only with a deterministic chunk.
    pub kv_len: Option<usize>,
}

/// How to plan. Built with [`PlanConfig::with_parallelism`]; the fields are public to read
/// and to set on an existing value.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PlanConfig {
    /// Parallel work slots to fill: GPU SMs × blocks per SM, or CPU threads. A slot runs one
    /// `(work item, KV head)` pair. `1..=`[`MAX_PARALLELISM`].
    pub parallelism: usize,
    /// Fixed batch capacity for CUDA-graph mode.
    pub graph_capacity: Option<usize>,
    /// Graph mode: most query rows (prefill). Defaults to `graph_capacity`.
    pub graph_max_q_rows: Option<usize>,
    /// Graph mode with a deterministic chunk: longest request in keys.
    pub graph_max_kv_len: Option<usize>,
    /// Fixed KV chunk in tokens (deterministic mode); must be a multiple of the page size.
    pub deterministic_chunk: Option<usize>,
    /// Prefill q tile in packed rows.
    pub q_tile: usize,
    /// Smallest KV chunk the split may choose, in tokens.
    pub min_kv_chunk: usize,
}

impl PlanConfig {
    /// Default prefill tile (packed rows).
    pub const DEFAULT_Q_TILE: usize = 64;
    /// Default smallest KV chunk (tokens).
    pub const DEFAULT_MIN_KV_CHUNK: usize = 256;

    /// The default configuration for `parallelism` work slots.
    pub fn with_parallelism(parallelism: usize) -> Self {
        PlanConfig {
            parallelism: parallelism.max(1),
            graph_capacity: None,
            graph_max_q_rows: None,
            graph_max_kv_len: None,
            deterministic_chunk: None,
            q_tile: Self::DEFAULT_Q_TILE,
            min_kv_chunk: Self::DEFAULT_MIN_KV_CHUNK,
        }
    }

    /// Checks the configuration: every count positive, `parallelism` at most
    /// [`MAX_PARALLELISM`], `q_tile` at most 65536, `graph_capacity` at most
    /// [`MAX_GRAPH_CAPACITY`], `graph_max_q_rows`, `graph_max_kv_len` and
    /// `deterministic_chunk` at most [`MAX_GRAPH_ROWS`] (each error names its field).
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("parallelism", Some(self.parallelism)),
            ("q_tile", Some(self.q_tile)),
            ("graph_capacity", self.graph_capacity),
            ("deterministic_chunk", self.deterministic_chunk),
        ] {
            if v == Some(0) {
                return Err(Error::NotPositive { field, actual: 0 });
            }
        }
        if self.parallelism > MAX_PARALLELISM {
            return Err(Error::InvalidOption {
                field: "parallelism",
                expected: "at most 1048576 work slots",
                actual: self.parallelism.to_string(),
            });
        }
        if self.q_tile > 1 << 16 {
            return Err(Error::InvalidOption {
                field: "q_tile",
                expected: "at most 65536 packed rows",
                actual: self.q_tile.to_string(),
            });
        }
        for (field, v, limit, rule) in [
            (
                "graph_capacity",
                self.graph_capacity,
                MAX_GRAPH_CAPACITY,
                "16-byte requests entries in the largest plan schedule",
            ),
            (
                "graph_max_q_rows",
                self.graph_max_q_rows,
                MAX_GRAPH_ROWS,
                "plan arrays are int32",
            ),
            (
                "graph_max_kv_len",
                self.graph_max_kv_len,
                MAX_GRAPH_ROWS,
                "plan arrays are int32",
            ),
            (
                "deterministic_chunk",
                self.deterministic_chunk,
                MAX_GRAPH_ROWS,
                "plan arrays are int32",
            ),
        ] {
            if let Some(actual) = v
                && actual > limit
            {
                return Err(Error::LimitExceeded {
                    field,
                    limit,
                    actual,
                    rule,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn graph(&self) -> Option<GraphCapacity> {
        self.graph_capacity.map(|batch| GraphCapacity {
            batch,
            q_rows: self.graph_max_q_rows,
            kv_len: self.graph_max_kv_len,
        })
    }
}
