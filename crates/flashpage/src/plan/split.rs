//! Split-KV chunk choice and the capacity formulas shared by graph mode and
//! [`workspace_size`].

use super::config::{PlanConfig, PlanKind};
use super::sizing::{WorkspaceLimits, carve_float, carve_int};
use crate::error::{Error, Result};
use crate::layout::HeadConfig;
use crate::validate::ValidBatch;
use crate::workspace::{AlignedAllocator, BUFFER_ALIGN, Requirement, WorkspaceReq};

/// Work-item target: `(item, KV head)` pairs are the unit of parallel work, so `parallelism`
/// slots are filled by `ceil(parallelism / num_kv_heads)` items.
pub(crate) fn item_target(parallelism: usize, heads: &HeadConfig) -> usize {
    parallelism.div_ceil(heads.num_kv_heads()).max(1)
}

/// Packed rows per q tile: a decode request is one tile (its whole GQA group).
pub(crate) fn tile_rows(kind: PlanKind, config: &PlanConfig, heads: &HeadConfig) -> usize {
    match kind {
        PlanKind::Decode => heads.group_size(),
        PlanKind::Prefill => config.q_tile.max(1),
    }
}

/// Q tiles of a request (no division in the common case of one tile: every decode request).
#[inline(always)]
pub(crate) fn tiles_of(qo_len: usize, group: usize, tile: usize) -> usize {
    let packed = qo_len * group;
    if packed <= tile {
        (packed > 0) as usize
    } else {
        packed.div_ceil(tile)
    }
}

/// Chunks of a request of `kv_len` keys with chunk `c` (an empty request is one empty chunk;
/// no division when the request fits one chunk, e.g. whenever the KV is not split).
#[inline(always)]
pub(crate) fn chunks_of(kv_len: usize, c: usize) -> usize {
    if kv_len <= c { 1 } else { kv_len.div_ceil(c) }
}

/// True when the batch's requests with keys have at most `target` work items with KV chunk
/// `c` tokens (stops counting as soon as the target is passed; saturating, so no input
/// overflows).
fn items_within(vb: &ValidBatch<'_>, group: usize, tile: usize, c: usize, target: usize) -> bool {
    let mut n = 0usize;
    for r in 0..vb.batch_size() {
        let q = vb.request(r);
        if q.kv_len > 0 {
            n = n.saturating_add(
                tiles_of(q.qo_len, group, tile).saturating_mul(chunks_of(q.kv_len, c)),
            );
            if n > target {
                return false;
            }
        }
    }
    true
}

/// The KV chunk in tokens (`usize::MAX` for "no split").
///
/// Deterministic mode: the configured chunk. Otherwise, when the q tiles of the requests
/// with keys already reach the work-item target there is no split; else the smallest
/// page-aligned chunk (at least `min_kv_chunk`) whose items, over the requests with keys,
/// stay within the target. Requests without keys (padding) cost nothing, so they neither
/// count toward the target nor prevent a split; each still gets its one empty item.
pub(crate) fn choose_chunk(
    vb: &ValidBatch<'_>,
    kind: PlanKind,
    config: &PlanConfig,
    heads: &HeadConfig,
) -> usize {
    if let Some(d) = config.deterministic_chunk {
        return d;
    }
    let group = heads.group_size();
    let tile = tile_rows(kind, config, heads);
    let target = item_target(config.parallelism, heads);
    let mut tiles = 0usize;
    for r in 0..vb.batch_size() {
        let q = vb.request(r);
        if q.kv_len > 0 {
            tiles = tiles.saturating_add(tiles_of(q.qo_len, group, tile));
            if tiles >= target {
                return usize::MAX;
            }
        }
    }
    if tiles == 0 {
        return usize::MAX;
    }
    let unit = vb.page_size();
    let lo = config.min_kv_chunk.max(1).div_ceil(unit);
    let hi = vb.max_kv_len().div_ceil(unit);
    if lo >= hi {
        return usize::MAX;
    }
    // Smallest k in [lo, hi] with items(k * unit) <= target; items(hi * unit) = tiles.
    let (mut a, mut b) = (lo, hi);
    while a < b {
        let m = a + (b - a) / 2;
        if items_within(vb, group, tile, m * unit, target) {
            b = m;
        } else {
            a = m + 1;
        }
    }
    if a >= hi { usize::MAX } else { a * unit }
}

/// Upper bounds on a plan's arrays: the launch shape in graph mode and the sizes behind
/// [`workspace_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    /// Requests (`C`).
    pub requests: usize,
    /// Work items (`W`).
    pub work_items: usize,
    /// Partial rows in the float workspace (`P`).
    pub partial_rows: usize,
    /// Merge rows (`M`).
    pub merge_rows: usize,
}

impl Capacities {
    /// Bounds for batches of at most `batch` requests, `q_rows` rows and `max_kv_len` keys:
    /// the exact capacities of a graph-mode plan, so partial or merge rows past int32 are an
    /// error (no such plan can be made).
    pub(crate) fn bound(
        kind: PlanKind,
        heads: &HeadConfig,
        config: &PlanConfig,
        batch: usize,
        q_rows: usize,
        max_kv_len: usize,
    ) -> Result<Capacities> {
        let ovf = |what| Error::SizeOverflow { what };
        let g = heads.group_size();
        let t = tile_rows(kind, config, heads);
        let target = item_target(config.parallelism, heads);
        let (tiles, q) = match kind {
            PlanKind::Decode => (batch, batch),
            PlanKind::Prefill => {
                let packed = q_rows.checked_mul(g).ok_or(ovf("q tiles"))?;
                let spill = batch.checked_mul(t - 1).ok_or(ovf("q tiles"))?;
                let t_bound = packed.checked_add(spill).ok_or(ovf("q tiles"))? / t;
                (packed.min(t_bound), q_rows)
            }
        };
        let (work_items, partial_rows, merge_rows) = match config.deterministic_chunk {
            Some(d) => {
                let n = chunks_of(max_kv_len, d);
                let w = tiles.checked_mul(n).ok_or(ovf("work items"))?;
                if n > 1 {
                    let p = q.checked_mul(n).ok_or(ovf("partial rows"))?;
                    (w, p, q)
                } else {
                    (w, 0, 0)
                }
            }
            None => {
                let p = match kind {
                    PlanKind::Decode => target,
                    PlanKind::Prefill => target.checked_mul(t).ok_or(ovf("partial rows"))? / g,
                };
                // Split: at most T items over requests with keys, one per tile of the
                // others; unsplit: one item per tile.
                let w = target.checked_add(tiles).ok_or(ovf("work items"))?;
                (w, p, q.min(p / 2))
            }
        };
        // Partial rows are indexed by int32 in the plan arrays; capacities come from limits
        // (graph_max_q_rows, max_q_tokens, ...), not a batch: name them.
        for (field, v) in [("partial rows", partial_rows), ("merge rows", merge_rows)] {
            if i32::try_from(v).is_err() {
                return Err(Error::LimitExceeded {
                    field,
                    limit: i32::MAX as usize,
                    actual: v,
                    rule: "plan arrays are int32: lower graph_max_q_rows / max_q_tokens, graph_max_kv_len / max_kv_len or parallelism, or raise deterministic_chunk",
                });
            }
        }
        Ok(Capacities {
            requests: batch,
            work_items,
            partial_rows,
            merge_rows,
        })
    }

    /// Bounds for `limits` and plans of `kind`.
    ///
    /// In graph mode every plan has exactly the graph capacities (batch, query rows, and the
    /// longest request when the chunk is deterministic), so those are the bounds, and an
    /// error means no plan of `kind` can be made under `limits.config`; otherwise
    /// `max_batch`, `max_q_tokens` (decode: `max_batch`) and `max_kv_len`.
    pub(crate) fn for_limits(kind: PlanKind, limits: &WorkspaceLimits) -> Result<Capacities> {
        let (batch, q_rows, kv_len) = match limits.config.graph() {
            Some(g) => (
                g.batch,
                match kind {
                    PlanKind::Decode => g.batch,
                    PlanKind::Prefill => g.q_rows.unwrap_or(g.batch),
                },
                g.kv_len.unwrap_or(limits.max_kv_len),
            ),
            None => (
                limits.max_batch,
                match kind {
                    PlanKind::Decode => limits.max_batch,
                    PlanKind::Prefill => limits.max_q_tokens,
                },
                limits.max_kv_len,
            ),
        };
        Self::bound(kind, &limits.heads, &limits.config, batch, q_rows, kv_len)
    }

    /// The workspace these capacities need.
    pub fn requirement(&self, heads: &HeadConfig) -> Result<Requirement> {
        let mut f = AlignedAllocator::counting(BUFFER_ALIGN);
        carve_float(&mut f, heads, self.partial_rows)?;
        let mut i = AlignedAllocator::counting(BUFFER_ALIGN);
        carve_int(&mut i, self.requests, self.work_items, self.merge_rows)?;
        Ok(Requirement {
            float: WorkspaceReq::from_allocator(&f),
            int: WorkspaceReq::from_allocator(&i),
        })
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
/// The result is the larger of the decode and prefill bounds, part by part (only the bound of
/// [`WorkspaceLimits::kind`] when it is set). Why it holds: a
/// split happens only while the items of the requests with keys stay within `T` (requests
/// without keys add one empty item per tile); a decode item covers one
/// partial row, a prefill item at most `t / g` query rows; every split row has at least two
/// partial rows.
///
/// Errors: the planner configuration's own checks (e.g. `parallelism` 0, a zero
/// deterministic chunk, a graph capacity past [`super::MAX_GRAPH_CAPACITY`]); a
/// [`Error::LimitExceeded`] naming the limit (`max_batch` past
/// [`super::MAX_GRAPH_CAPACITY`], `max_q_tokens` or `max_kv_len` past
/// [`super::MAX_GRAPH_ROWS`]; in graph mode, partial rows past int32 for both decode and
/// prefill) when no plan could reach it, or naming the workspace when its bytes pass
/// [`super::MAX_WORKSPACE_BYTES`];
/// [`Error::SizeOverflow`] for bytes that overflow 64 bits. (A bound past
/// [`super::MAX_INT_IMAGE_BYTES`] is returned: plans within the limits whose own schedule
/// passes it are refused when planned.)
pub fn workspace_size(limits: &WorkspaceLimits) -> Result<Requirement> {
    limits.config.validate()?;
    for (field, actual, limit, rule) in [
        (
            "max_batch",
            limits.max_batch,
            super::MAX_GRAPH_CAPACITY,
            "16-byte requests entries in the largest plan schedule",
        ),
        (
            "max_q_tokens",
            limits.max_q_tokens,
            super::MAX_GRAPH_ROWS,
            "plan arrays are int32",
        ),
        (
            "max_kv_len",
            limits.max_kv_len,
            super::MAX_GRAPH_ROWS,
            "plan arrays are int32",
        ),
    ] {
        if actual > limit {
            return Err(Error::LimitExceeded {
                field,
                limit,
                actual,
                rule,
            });
        }
    }
    let mut best: Option<Requirement> = None;
    let mut unreachable = None;
    let kinds: &[PlanKind] = match limits.kind {
        Some(PlanKind::Decode) => &[PlanKind::Decode],
        Some(PlanKind::Prefill) => &[PlanKind::Prefill],
        None => &[PlanKind::Decode, PlanKind::Prefill],
    };
    for &kind in kinds {
        let req = match Capacities::for_limits(kind, limits)
            .and_then(|cap| cap.requirement(&limits.heads))
        {
            Ok(req) => req,
            // Graph mode: every plan of `kind` has exactly these capacities, so when they
            // cannot be laid out no plan of `kind` can be made and it needs no room. The
            // error stands when neither kind can.
            Err(e) if limits.config.graph().is_some() => {
                unreachable.get_or_insert(e);
                continue;
            }
            Err(e) => return Err(e),
        };
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
    let Some(best) = best else {
        return Err(unreachable.unwrap_or(Error::SizeOverflow { what: "workspace" }));
    };
    best.total()?;
    Ok(best)
}
