//! The workspace contract: named buffers carved by one bump allocator over byte offsets.
//!
//! A plan needs two caller-owned buffers: a **float** workspace (partial outputs and
//! log-sum-exps of split-KV work items, f32) and an **int** workspace (the plan's schedule,
//! copied to the device in one transfer on CUDA, used in place on the CPU). The same
//! [`AlignedAllocator`] code path both *counts* (no capacity: how many bytes would this take?)
//! and *materialises* (a capacity: where does each buffer go, and does it fit?).
//!
//! [`workspace_size`] answers, before the first request, how many bytes every valid plan
//! within some [`WorkspaceLimits`] needs at most. Allocate that once, never reallocate (a
//! captured CUDA graph keeps pointing at it), and every plan within the limits fits.

use crate::error::{Error, Result};
use crate::layout::{DType, HeadConfig};
use crate::plan::{Capacities, PlanConfig, PlanKind};

/// Alignment of every buffer offset inside a workspace (the CUDA requirement; the CPU
/// needs 64, so one layout serves both backends).
pub const BUFFER_ALIGN: usize = 256;
/// Required alignment of a CPU workspace's base address.
pub const CPU_BASE_ALIGN: usize = 64;
/// Required alignment of a CUDA workspace's base address.
pub const CUDA_BASE_ALIGN: usize = 256;

/// A named buffer inside a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Name, e.g. `partial_o`.
    pub name: &'static str,
    /// Byte offset from the workspace base (a multiple of [`BUFFER_ALIGN`]).
    pub offset: usize,
    /// Bytes of the buffer.
    pub bytes: usize,
}

/// Most buffers one workspace holds.
const MAX_BUFFERS: usize = 4;

/// A bump allocator over byte offsets, with a capacity (materialise) or without (count).
///
/// ```
/// use flashpage::workspace::AlignedAllocator;
/// let mut count = AlignedAllocator::counting(256);
/// count.alloc("a", 10).unwrap();
/// count.alloc("b", 300).unwrap();
/// assert_eq!(count.total(), 256 + 300);
///
/// let mut fixed = AlignedAllocator::with_capacity(256, 400);
/// fixed.alloc("a", 10).unwrap();
/// let err = fixed.alloc("b", 300).unwrap_err();
/// assert!(err.to_string().contains("buffer 'b'"));
/// ```
#[derive(Debug, Clone)]
pub struct AlignedAllocator {
    align: usize,
    capacity: Option<usize>,
    cursor: usize,
    buffers: [Buffer; MAX_BUFFERS],
    len: usize,
    overflow: Option<(&'static str, usize, usize)>,
}

const EMPTY: Buffer = Buffer {
    name: "",
    offset: 0,
    bytes: 0,
};

impl AlignedAllocator {
    /// An allocator that only counts.
    pub fn counting(align: usize) -> Self {
        Self::new(align, None)
    }

    /// An allocator over `capacity` bytes.
    pub fn with_capacity(align: usize, capacity: usize) -> Self {
        Self::new(align, Some(capacity))
    }

    fn new(align: usize, capacity: Option<usize>) -> Self {
        debug_assert!(align.is_power_of_two());
        AlignedAllocator {
            align,
            capacity,
            cursor: 0,
            buffers: [EMPTY; MAX_BUFFERS],
            len: 0,
            overflow: None,
        }
    }

    /// Reserves `bytes` for `name` at the next aligned offset and returns that offset.
    ///
    /// With a capacity, a buffer that does not fit is a [`Error::WorkspaceTooSmall`] naming
    /// the buffer, the bytes requested and available, the capacity, and the total the plan
    /// needs (counting continues so that total is exact).
    pub fn alloc(&mut self, name: &'static str, bytes: usize) -> Result<usize> {
        let offset = self
            .cursor
            .checked_next_multiple_of(self.align)
            .ok_or(Error::SizeOverflow { what: name })?;
        let end = offset
            .checked_add(bytes)
            .ok_or(Error::SizeOverflow { what: name })?;
        if let Some(cap) = self.capacity
            && end > cap
            && self.overflow.is_none()
        {
            self.overflow = Some((name, bytes, offset));
        }
        if self.len < MAX_BUFFERS {
            self.buffers[self.len] = Buffer {
                name,
                offset,
                bytes,
            };
            self.len += 1;
        }
        self.cursor = end;
        match (self.overflow, self.capacity) {
            (Some((buffer, requested, at)), Some(capacity)) => Err(Error::WorkspaceTooSmall {
                buffer,
                requested,
                offset: at,
                available: capacity.saturating_sub(at),
                capacity,
                required_total: self.cursor,
            }),
            _ => Ok(offset),
        }
    }

    /// Bytes used so far (end of the last buffer).
    pub fn total(&self) -> usize {
        self.cursor
    }

    /// The buffers carved so far.
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers[..self.len]
    }
}

/// A workspace requirement: where each named buffer goes and the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceReq {
    buffers: [Buffer; MAX_BUFFERS],
    len: usize,
    total: usize,
}

impl WorkspaceReq {
    pub(crate) fn from_allocator(a: &AlignedAllocator) -> Self {
        WorkspaceReq {
            buffers: a.buffers,
            len: a.len,
            total: a.total(),
        }
    }
    /// Total bytes.
    pub fn total(&self) -> usize {
        self.total
    }
    /// The named buffers, in offset order.
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers[..self.len]
    }
    /// The buffer called `name`.
    pub fn buffer(&self, name: &str) -> Option<Buffer> {
        self.buffers().iter().copied().find(|b| b.name == name)
    }
    /// Checks that the requirement fits `capacity` bytes, naming the first buffer that
    /// does not.
    pub fn check_fits(&self, capacity: usize) -> Result<()> {
        for b in self.buffers() {
            if b.offset + b.bytes > capacity {
                return Err(Error::WorkspaceTooSmall {
                    buffer: b.name,
                    requested: b.bytes,
                    offset: b.offset,
                    available: capacity.saturating_sub(b.offset),
                    capacity,
                    required_total: self.total,
                });
            }
        }
        Ok(())
    }
}

/// Both workspaces of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// The float workspace (partial states).
    pub float: WorkspaceReq,
    /// The int workspace (the schedule).
    pub int: WorkspaceReq,
}

impl Requirement {
    /// True when both parts are at most `other`'s.
    pub fn fits_in(&self, other: &Requirement) -> bool {
        self.float.total() <= other.float.total() && self.int.total() <= other.int.total()
    }
}

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
/// use flashpage::workspace::{WorkspaceLimits, workspace_size};
/// let limits = WorkspaceLimits::new(HeadConfig::new(32, 8, 128).unwrap(), DType::BF16, 256, 8192, 32768, 264);
/// let req = workspace_size(&limits).unwrap();
/// assert!(req.float.total() > 0 && req.int.total() > 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
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
        }
    }
}

/// The workspace every valid plan within `limits` fits in (decode and prefill alike).
///
/// With `C` the batch bound (the graph capacity when set, else `max_batch`), `Q` the row
/// bound (decode: `C`; prefill: `graph_max_q_rows`, default `C`, in graph mode, else
/// `max_q_tokens`), `K` the longest request (`graph_max_kv_len` in graph mode when set, else
/// `max_kv_len`), `g` the group size, `t` the prefill tile in packed rows,
/// `T = ceil(parallelism / num_kv_heads)` the work-item target and `d` the deterministic
/// chunk:
///
/// - q tiles: decode `C`; prefill `min(Q·g, floor((Q·g + C·(t-1)) / t))`;
/// - work items `W`: `T + tiles`, or `tiles · ceil(K / d)` in deterministic mode;
/// - partial rows `P`: `T` (decode) / `floor(T·t / g)` (prefill), or `Q · ceil(K / d)`
///   in deterministic mode (0 when `ceil(K / d) = 1`); merge rows `M`: `min(Q, P / 2)`, or
///   `Q` in deterministic mode (0 without a split);
/// - float bytes: `P·Hq·D·4` (`partial_o`) + `P·Hq·4` (`partial_lse`), each 256-aligned;
/// - int bytes: `16·C` (`requests`) + `24·W` (`work_items`) + `16·M` (`merge_map`), aligned.
///
/// The result is the larger of the decode and prefill bounds, part by part. Why it holds: a
/// split happens only while the items of the requests with keys stay within `T` (requests
/// without keys add one empty item per tile); a decode item covers one
/// partial row, a prefill item at most `t / g` query rows; every split row has at least two
/// partial rows.
///
/// Errors: the planner configuration's own checks (e.g. `parallelism` 0, a zero
/// deterministic chunk) and [`Error::SizeOverflow`] for limits whose bytes overflow 64 bits.
pub fn workspace_size(limits: &WorkspaceLimits) -> Result<Requirement> {
    limits.config.validate()?;
    let mut best: Option<Requirement> = None;
    for kind in [PlanKind::Decode, PlanKind::Prefill] {
        let cap = Capacities::for_limits(kind, limits)?;
        let req = cap.requirement(&limits.heads)?;
        best = Some(match best {
            None => req,
            Some(b) => {
                if req.float.total() > b.float.total() || req.int.total() > b.int.total() {
                    // Keep each part's larger layout.
                    Requirement {
                        float: if req.float.total() > b.float.total() {
                            req.float
                        } else {
                            b.float
                        },
                        int: if req.int.total() > b.int.total() {
                            req.int
                        } else {
                            b.int
                        },
                    }
                } else {
                    b
                }
            }
        });
    }
    Ok(best.expect("two kinds were sized"))
}

/// A heap buffer whose base is aligned to [`CUDA_BASE_ALIGN`] bytes (so it satisfies every
/// backend): the easy way to own a host workspace.
///
/// ```
/// let mut ws = flashpage::workspace::HostWorkspace::new(1000);
/// assert_eq!(ws.as_bytes_mut().len(), 1000);
/// assert_eq!(ws.as_bytes_mut().as_ptr() as usize % 256, 0);
/// ```
pub struct HostWorkspace {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(256))]
struct Line([u8; 256]);

impl HostWorkspace {
    /// A zeroed workspace of `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        HostWorkspace {
            lines: vec![Line([0; 256]); bytes.div_ceil(256)],
            len: bytes,
        }
    }
    /// The bytes.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the capacity is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_and_materialising_agree() {
        let mut c = AlignedAllocator::counting(256);
        let mut m = AlignedAllocator::with_capacity(256, 10_000);
        for (n, b) in [("a", 1), ("b", 257), ("c", 0), ("d", 5)] {
            assert_eq!(c.alloc(n, b).unwrap(), m.alloc(n, b).unwrap());
        }
        assert_eq!(c.total(), m.total());
        assert_eq!(c.buffers(), m.buffers());
    }

    #[test]
    fn too_small_names_buffer_and_total() {
        let mut m = AlignedAllocator::with_capacity(256, 300);
        m.alloc("partial_o", 200).unwrap();
        let e = m.alloc("partial_lse", 100).unwrap_err();
        assert_eq!(
            e,
            Error::WorkspaceTooSmall {
                buffer: "partial_lse",
                requested: 100,
                offset: 256,
                available: 44,
                capacity: 300,
                required_total: 356,
            }
        );
    }

    #[test]
    fn overflow_is_an_error() {
        let mut c = AlignedAllocator::counting(256);
        c.alloc("a", usize::MAX - 10).unwrap();
        assert!(matches!(c.alloc("b", 100), Err(Error::SizeOverflow { .. })));
    }
}
