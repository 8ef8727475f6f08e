//! Workspace sizes: how many bytes of each named buffer a schedule needs
//! ([`carve_float`], [`carve_int`]) and the limits a deployment sizes for
//! ([`WorkspaceLimits`]; the bound itself is `workspace_size`, beside the capacities). The carving goes through [`AlignedAllocator`], so counting and
//! materialising are one code path. See docs/workspace.md for the contract.

use super::config::{PlanConfig, PlanKind};
use crate::error::{Error, Result};
use crate::layout::{DType, HeadConfig};
use crate::workspace::AlignedAllocator;

/// Carves the float workspace for `partial_rows` partial rows (one per split query row and
/// KV chunk, covering all heads). One function for counting and materialising.
pub(crate) fn carve_float(
    alloc: &mut AlignedAllocator,
    heads: &HeadConfig,
    partial_rows: usize,
) -> Result<()> {
    let hq = heads.num_qo_heads();
    let d = heads.head_dim();
    let o = mul(&[partial_rows, hq, d, 4], "partial_o")?;
    let lse = mul(&[partial_rows, hq, 4], "partial_lse")?;
    alloc.alloc("partial_o", o)?;
    alloc.alloc("partial_lse", lse)?;
    Ok(())
}

/// Int-image layout: `(requests, work_items, merge_map)` rows of i32 per entry.
pub(crate) const REQUEST_FIELDS: usize = 4;
pub(crate) const WORK_FIELDS: usize = 6;
pub(crate) const MERGE_FIELDS: usize = 4;

/// Carves the int workspace for the given capacities. Returns the three offsets.
pub(crate) fn carve_int(
    alloc: &mut AlignedAllocator,
    requests: usize,
    work_items: usize,
    merge_rows: usize,
) -> Result<[usize; 3]> {
    let r = alloc.alloc("requests", mul(&[requests, REQUEST_FIELDS, 4], "requests")?)?;
    let w = alloc.alloc(
        "work_items",
        mul(&[work_items, WORK_FIELDS, 4], "work_items")?,
    )?;
    let m = alloc.alloc(
        "merge_map",
        mul(&[merge_rows, MERGE_FIELDS, 4], "merge_map")?,
    )?;
    Ok([r, w, m])
}

pub(crate) fn mul(factors: &[usize], what: &'static str) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or(Error::SizeOverflow { what })
}

/// Limits a serving engine commits to before its first request.
///
/// ```
/// use flashpage::{HeadConfig, DType};
/// use flashpage::plan::{WorkspaceLimits, workspace_size};
/// let limits = WorkspaceLimits::new(HeadConfig::new(32, 8, 128).unwrap(), DType::BF16, 256, 8192, 32768, 264);
/// let req = workspace_size(&limits).unwrap();
/// assert!(req.float.total() > 0 && req.int.total() > 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct WorkspaceLimits {
    /// Heads and head dimension.
    pub heads: HeadConfig,
    /// Element type of q/k/v/o (partial states are f32 whatever it is, so it does not
    /// change the bound; kept so the limits describe the deployment fully).
    pub dtype: DType,
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Most query tokens (rows) in one batch (prefill; decode has one per request).
    pub max_q_tokens: usize,
    /// Longest request in keys.
    pub max_kv_len: usize,
    /// Planner configuration (parallelism, graph capacity, deterministic chunk, tile).
    pub config: PlanConfig,
    /// The kind of plans the workspace serves: `None` (the default) sizes it for decode and
    /// prefill alike; a kind sizes it for plans of that kind only (a deployment whose
    /// decode and prefill have workspaces of their own, as FlashInfer's wrappers do).
    #[cfg_attr(feature = "serde", serde(default))]
    pub kind: Option<PlanKind>,
}

impl WorkspaceLimits {
    /// Limits with the default planner configuration for `parallelism` work slots.
    pub fn new(
        heads: HeadConfig,
        dtype: DType,
        max_batch: usize,
        max_q_tokens: usize,
        max_kv_len: usize,
        parallelism: usize,
    ) -> Self {
        WorkspaceLimits {
            heads,
            dtype,
            max_batch,
            max_q_tokens,
            max_kv_len,
            config: PlanConfig::with_parallelism(parallelism),
            kind: None,
        }
    }
    /// The same limits with another planner configuration (graph capacity, deterministic
    /// chunk, tile, parallelism).
    pub fn with_config(mut self, config: PlanConfig) -> Self {
        self.config = config;
        self
    }
    /// The same limits for plans of `kind` only (see [`WorkspaceLimits::kind`]); a plan of
    /// the other kind is refused by [`super::Plan::new_within`] with a
    /// [`crate::Error::PlanMismatch`] naming the kind.
    pub fn with_kind(mut self, kind: PlanKind) -> Self {
        self.kind = Some(kind);
        self
    }
}
