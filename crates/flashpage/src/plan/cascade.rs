//! Shared-prefix (cascade) attention: one batch's keys split into **levels**, each level a
//! paged prefill batch of its own over the same query rows, whose states are merged by LSE
//! (docs/cascade.md).
//!
//! A row's keys are the concatenation, in level order, of the keys its group holds at each
//! level. At a shared level a group of consecutive requests (their query rows contiguous)
//! is one level request whose query rows are all the sharers' rows, so the shared pages are
//! read once per query tile of the group, not once per request. Every level but the last is
//! fully visible (a prefix precedes every query of its sharers); the last level holds each
//! request's own keys and carries the batch's causal mask.
//!
//! Position-dependent options (a sliding window, ALiBi, RoPE) would need each level's key
//! positions and are refused; `sm_scale`, soft-capping and attention sinks (applied once,
//! after the merge) are kept.

use crate::error::{Error, Result};
use crate::layout::{BatchDesc, DType, HeadConfig, PageTable};
use crate::options::{AttentionOptions, PosEncoding};
use crate::validate::{check_batch, check_page_ids};
use crate::workspace::{AlignedAllocator, BUFFER_ALIGN, Requirement, WorkspaceReq};

use super::Plan;
use super::config::PlanConfig;

/// The index arrays of one cascade level: a paged prefill batch whose requests are groups of
/// the cascade's query rows.
#[derive(Debug, Clone, Copy)]
pub struct CascadeLevel<'a> {
    /// `B_l + 1` offsets into the query rows: level request `i` holds rows
    /// `qo_indptr[i]..qo_indptr[i + 1]`. Every level covers the same rows.
    pub qo_indptr: &'a [i32],
    /// `B_l + 1` offsets into `kv_indices`.
    pub kv_indptr: &'a [i32],
    /// Page ids of every level request, in order.
    pub kv_indices: &'a [i32],
    /// `B_l` tokens in each level request's last page (0 for a request without pages).
    pub last_page_len: &'a [i32],
}

/// One planned level: its plan and its page ids (read at run time).
#[derive(Debug, Clone)]
struct Level {
    plan: Plan,
    kv_indices: Vec<i32>,
}

/// A planned cascade: one [`Plan`] per level over the same query rows, and the workspace
/// layout its runs need (the largest level's, then the merge accumulators).
///
/// Build it from explicit levels ([`CascadePlan::new`]) or let
/// [`CascadePlan::shared_prefixes`] find the pages consecutive requests share.
#[derive(Debug, Clone)]
pub struct CascadePlan {
    heads: HeadConfig,
    options: AttentionOptions,
    page_size: usize,
    num_pages: usize,
    rows: usize,
    levels: Vec<Level>,
}

/// At most this many levels (a prefix tree deeper than this is better flattened).
pub const MAX_CASCADE_LEVELS: usize = 16;

impl CascadePlan {
    /// Validates and plans `levels` over a paged cache of `num_pages` pages of `page_size`.
    ///
    /// `options` are the batch's: every level but the last is planned non-causal, the last
    /// with `options.causal`; every level returns its LSE (the merge needs it).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for no level or more than [`MAX_CASCADE_LEVELS`], or for a
    /// sliding window, ALiBi or RoPE (`window_left`, `pos_encoding`: positions differ per
    /// level); [`Error::QueryRows`] naming `qo_indptr` when a level covers a different number
    /// of rows than level 0; every error of [`Plan::new`] and
    /// [`crate::validate::check_page_ids`] for a level's arrays.
    pub fn new(
        heads: HeadConfig,
        page_size: usize,
        num_pages: usize,
        levels: &[CascadeLevel<'_>],
        options: &AttentionOptions,
        config: &PlanConfig,
    ) -> Result<CascadePlan> {
        if levels.is_empty() || levels.len() > MAX_CASCADE_LEVELS {
            return Err(Error::InvalidOption {
                field: "levels",
                expected: "1..=16 cascade levels",
                actual: levels.len().to_string(),
            });
        }
        check_cascade_options(options)?;
        let mut planned = Vec::with_capacity(levels.len());
        let mut rows = None;
        for (l, lv) in levels.iter().enumerate() {
            let desc = BatchDesc::prefill_paged(
                heads,
                lv.qo_indptr,
                PageTable {
                    page_size,
                    num_pages,
                    indptr: lv.kv_indptr,
                    last_page_len: lv.last_page_len,
                    num_indices: lv.kv_indices.len(),
                },
            );
            let last = l + 1 == levels.len();
            let opts = options
                .with_causal(last && options.causal)
                .with_return_lse(true);
            let vb = check_batch(&desc, &opts)?;
            check_page_ids(lv.kv_indptr, lv.kv_indices, num_pages)?;
            let n = vb.num_q_rows();
            match rows {
                None => rows = Some(n),
                Some(r) if r != n => {
                    return Err(Error::QueryRows {
                        tensor: "qo_indptr",
                        expected: r,
                        actual: n,
                        rule: "every cascade level covers the rows of level 0",
                    });
                }
                Some(_) => {}
            }
            let plan = Plan::new(&desc, &opts, config)?;
            let used = lv.kv_indptr.last().map_or(0, |&u| u as usize);
            planned.push(Level {
                plan,
                kv_indices: lv.kv_indices[..used].to_vec(),
            });
        }
        Ok(CascadePlan {
            heads,
            options: *options,
            page_size,
            num_pages,
            rows: rows.unwrap_or(0),
            levels: planned,
        })
    }

    /// Finds the pages consecutive requests of a flat paged batch share and plans a two-level
    /// cascade: level 0 holds, for each run of consecutive requests whose page lists start
    /// with the same page, the pages all of them share (their longest common prefix of full
    /// pages, a request's last page excluded), as one level request over all their query
    /// rows; level 1 holds each request's remaining pages. A request that shares nothing has
    /// no keys at level 0. The result equals attention over the flat batch.
    ///
    /// `qo_indptr` `None` is a decode batch (one row per request). Requests must be ordered
    /// so that sharers are adjacent (as a prefix-tree walk orders them). With
    /// `options.causal` a request shares only pages that all its query rows see (its prefix
    /// ends `qo_len` keys before its last key, page-aligned down).
    ///
    /// # Errors
    /// Every error of [`Plan::new`] for the flat batch (validated first, so its errors name
    /// the flat batch's arrays) and of [`CascadePlan::new`].
    pub fn shared_prefixes(
        heads: HeadConfig,
        qo_indptr: Option<&[i32]>,
        pages: PageTable<'_>,
        kv_indices: &[i32],
        options: &AttentionOptions,
        config: &PlanConfig,
    ) -> Result<CascadePlan> {
        check_cascade_options(options)?;
        let desc = match qo_indptr {
            Some(q) => BatchDesc::prefill_paged(heads, q, pages),
            None => BatchDesc::decode(heads, pages),
        };
        let vb = check_batch(&desc, options)?;
        check_page_ids(pages.indptr, kv_indices, pages.num_pages)?;
        let levels = split_shared_prefixes(
            &vb_requests(&vb, pages),
            kv_indices,
            pages.page_size,
            options.causal,
        );
        let (l0, l1) = (levels[0].as_level(), levels[1].as_level());
        CascadePlan::new(
            heads,
            pages.page_size,
            pages.num_pages,
            &[l0, l1],
            options,
            config,
        )
    }

    /// The head configuration.
    pub fn heads(&self) -> &HeadConfig {
        &self.heads
    }

    /// The batch's options (as given; the levels' own plans differ in `causal` and
    /// `return_lse`).
    pub fn options(&self) -> &AttentionOptions {
        &self.options
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the cache.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Query rows (the same at every level).
    pub fn num_q_rows(&self) -> usize {
        self.rows
    }

    /// Levels.
    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// Level `l`'s plan.
    pub fn level_plan(&self, l: usize) -> Option<&Plan> {
        self.levels.get(l).map(|lv| &lv.plan)
    }

    /// Level `l`'s page ids (as its plan's requests index them).
    pub fn level_kv_indices(&self, l: usize) -> Option<&[i32]> {
        self.levels.get(l).map(|lv| &lv.kv_indices[..])
    }

    /// Pages the levels' requests reference in total: each shared page counts once per
    /// level request holding it, so a cascade that shares reads fewer than the flat batch.
    pub fn pages_referenced(&self) -> usize {
        self.levels.iter().map(|lv| lv.kv_indices.len()).sum()
    }

    /// The float workspace a run with outputs of `dtype` needs: the largest level plan's
    /// float workspace (`levels`, reused level after level), the level's output and LSE
    /// (`level_o`, `level_lse`), and the f32 merge accumulators (`acc_o`, `acc_sum`,
    /// `acc_max`), each 256-aligned. The CPU backend needs no int workspace (plans are host
    /// memory).
    ///
    /// # Errors
    /// [`Error::SizeOverflow`] when the bytes overflow.
    pub fn float_requirement(&self, dtype: DType) -> Result<WorkspaceReq> {
        let states =
            self.rows
                .checked_mul(self.heads.num_qo_heads())
                .ok_or(Error::SizeOverflow {
                    what: "cascade states",
                })?;
        let elems = states
            .checked_mul(self.heads.head_dim())
            .ok_or(Error::SizeOverflow {
                what: "cascade states",
            })?;
        let bytes = |n: usize, size: usize| {
            n.checked_mul(size).ok_or(Error::SizeOverflow {
                what: "cascade workspace",
            })
        };
        let level = self.largest_level_float();
        let mut a = AlignedAllocator::counting(BUFFER_ALIGN);
        a.alloc("levels", level)?;
        a.alloc("level_o", bytes(elems, dtype.size())?)?;
        a.alloc("level_lse", bytes(states, 4)?)?;
        a.alloc("acc_o", bytes(elems, 4)?)?;
        a.alloc("acc_sum", bytes(states, 4)?)?;
        a.alloc("acc_max", bytes(states, 4)?)?;
        Ok(WorkspaceReq::from_allocator(&a))
    }
}

/// Where one level's pieces sit in the device workspaces laid out by
/// [`CascadePlan::device_requirement`] (byte offsets from each workspace's base, multiples
/// of [`BUFFER_ALIGN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CascadeDeviceLevel {
    /// The level plan's int image, in the int workspace.
    pub image_offset: usize,
    /// The level's page ids (i32), in the int workspace, right after its image.
    pub ids_offset: usize,
    /// The level's output `[rows, num_qo_heads, head_dim]` in o's dtype, in the float
    /// workspace.
    pub o_offset: usize,
    /// The level's LSE `[rows, num_qo_heads]` f32, in the float workspace.
    pub lse_offset: usize,
}

/// `n` rounded up to a multiple of [`BUFFER_ALIGN`], checked.
fn align_up(n: usize) -> Result<usize> {
    n.checked_next_multiple_of(BUFFER_ALIGN)
        .ok_or(Error::SizeOverflow {
            what: "cascade workspace",
        })
}

impl CascadePlan {
    /// Bytes of one level's state in the device layout: `(o, lse)` strides, each aligned.
    fn device_strides(&self, dtype: DType) -> Result<(usize, usize)> {
        let overflow = Error::SizeOverflow {
            what: "cascade states",
        };
        let states = self
            .rows
            .checked_mul(self.heads.num_qo_heads())
            .ok_or(overflow.clone())?;
        let o = states
            .checked_mul(self.heads.head_dim())
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or(overflow.clone())?;
        let lse = states.checked_mul(4).ok_or(overflow)?;
        Ok((align_up(o)?, align_up(lse)?))
    }

    /// Int-workspace bytes of level `l`: its image then its page ids, each aligned.
    fn device_int_bytes(&self, lv: &Level) -> Result<(usize, usize)> {
        let image = align_up(
            lv.plan
                .requirement()
                .int
                .total()
                .max(lv.plan.int_image().len() * 4),
        )?;
        let ids = align_up(
            lv.kv_indices
                .len()
                .checked_mul(4)
                .ok_or(Error::SizeOverflow {
                    what: "cascade page ids",
                })?,
        )?;
        Ok((image, ids))
    }

    /// The largest float workspace of one level's plan: the levels run one after another
    /// through the same region (CPU and device layouts alike).
    fn largest_level_float(&self) -> usize {
        self.levels
            .iter()
            .map(|lv| lv.plan.requirement().float.total())
            .max()
            .unwrap_or(0)
    }

    /// The workspaces a device (CUDA) run with outputs of `dtype` needs. Every level's launches
    /// are enqueued before any completes (no host synchronisation between levels, so the
    /// whole cascade can be captured in a CUDA graph), so nothing the levels read may be
    /// rewritten between them:
    ///
    /// - float: `levels` (the largest level plan's float workspace, reused level after level
    ///   in stream order), `level_o` (every level's output in o's dtype, one after another)
    ///   and `level_lse` (every level's f32 LSE), which one fold kernel merges at the end;
    /// - int: `levels`, every level's int image followed by its page ids
    ///   ([`CascadePlan::device_level`] gives the offsets, [`CascadePlan::device_int_image`]
    ///   the contents: one upload).
    ///
    /// # Errors
    /// [`Error::SizeOverflow`] when the bytes overflow.
    pub fn device_requirement(&self, dtype: DType) -> Result<Requirement> {
        let n = self.levels.len();
        let (so, sl) = self.device_strides(dtype)?;
        let overflow = || Error::SizeOverflow {
            what: "cascade workspace",
        };
        let level = self.largest_level_float();
        let mut f = AlignedAllocator::counting(BUFFER_ALIGN);
        f.alloc("levels", level)?;
        f.alloc("level_o", so.checked_mul(n).ok_or_else(overflow)?)?;
        f.alloc("level_lse", sl.checked_mul(n).ok_or_else(overflow)?)?;
        let mut int = 0usize;
        for lv in &self.levels {
            let (a, b) = self.device_int_bytes(lv)?;
            int = int
                .checked_add(a)
                .and_then(|x| x.checked_add(b))
                .ok_or_else(overflow)?;
        }
        let mut i = AlignedAllocator::counting(BUFFER_ALIGN);
        i.alloc("levels", int)?;
        Ok(Requirement {
            float: WorkspaceReq::from_allocator(&f),
            int: WorkspaceReq::from_allocator(&i),
        })
    }

    /// Level `l`'s offsets in the device layout of [`CascadePlan::device_requirement`] for
    /// outputs of `dtype`; `None` past the last level.
    ///
    /// # Errors
    /// [`Error::SizeOverflow`] as [`CascadePlan::device_requirement`].
    pub fn device_level(&self, l: usize, dtype: DType) -> Result<Option<CascadeDeviceLevel>> {
        if l >= self.levels.len() {
            return Ok(None);
        }
        let req = self.device_requirement(dtype)?;
        let (so, sl) = self.device_strides(dtype)?;
        let base = |name: &str| req.float.buffer(name).map_or(0, |b| b.offset);
        let mut at = req.int.buffer("levels").map_or(0, |b| b.offset);
        for lv in &self.levels[..l] {
            let (a, b) = self.device_int_bytes(lv)?;
            at += a + b;
        }
        let (image, _) = self.device_int_bytes(&self.levels[l])?;
        Ok(Some(CascadeDeviceLevel {
            image_offset: at,
            ids_offset: at + image,
            o_offset: base("level_o") + l * so,
            lse_offset: base("level_lse") + l * sl,
        }))
    }

    /// The bytes of the device int workspace (as i32 words, zero padding between pieces):
    /// every level's int image and page ids at their [`CascadePlan::device_level`] offsets.
    ///
    /// # Errors
    /// [`Error::SizeOverflow`] as [`CascadePlan::device_requirement`].
    pub fn device_int_image(&self) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        for lv in &self.levels {
            let (a, b) = self.device_int_bytes(lv)?;
            let start = out.len();
            out.extend_from_slice(lv.plan.int_image());
            out.resize(start + a / 4, 0);
            out.extend_from_slice(&lv.kv_indices);
            out.resize(start + (a + b) / 4, 0);
        }
        Ok(out)
    }
}

/// Checks the run arguments a cascade takes differently from a flat run, for every
/// backend's `run_cascade`: no custom mask (its bits index the flat batch's keys, which the
/// levels split: [`Error::InvalidOption`] naming `custom_mask`) and no page ids (each
/// level's are in the plan: [`Error::TensorShape`] naming `kv_indices` when
/// `num_kv_indices` is not 0).
pub fn check_cascade_run(has_custom_mask: bool, num_kv_indices: usize) -> Result<()> {
    if has_custom_mask {
        return Err(Error::InvalidOption {
            field: "custom_mask",
            expected: "none in a cascade (its bits index the flat batch's keys)",
            actual: "a mask".into(),
        });
    }
    if num_kv_indices != 0 {
        return Err(Error::TensorShape {
            tensor: "kv_indices",
            expected: "[] (a cascade plan holds each level's page ids)".into(),
            actual: crate::error::shape_str(&[num_kv_indices]),
        });
    }
    Ok(())
}

/// Sliding windows and position encodings depend on where a key sits in its request, which a
/// level does not know: refused by name.
fn check_cascade_options(options: &AttentionOptions) -> Result<()> {
    if let Some(w) = options.window_left {
        return Err(Error::InvalidOption {
            field: "window_left",
            expected: "none in a cascade (key positions differ per level)",
            actual: w.to_string(),
        });
    }
    if options.pos_encoding != PosEncoding::None {
        return Err(Error::InvalidOption {
            field: "pos_encoding",
            expected: "none in a cascade (apply RoPE to q and k first; ALiBi needs positions)",
            actual: format!("{:?}", options.pos_encoding),
        });
    }
    Ok(())
}

/// A request of the flat batch: its query rows and page range.
#[derive(Debug, Clone, Copy)]
struct FlatRequest {
    qo_len: usize,
    pages: (usize, usize),
    last_page_len: usize,
}

fn vb_requests(vb: &crate::validate::ValidBatch<'_>, pages: PageTable<'_>) -> Vec<FlatRequest> {
    (0..vb.batch_size())
        .map(|r| {
            let q = vb.request(r);
            let (a, b) = (pages.indptr[r] as usize, pages.indptr[r + 1] as usize);
            FlatRequest {
                qo_len: q.qo_len,
                pages: (a, b),
                last_page_len: if a == b {
                    0
                } else {
                    pages.last_page_len[r] as usize
                },
            }
        })
        .collect()
}

/// Owned arrays of one level.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct LevelArrays {
    qo_indptr: Vec<i32>,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    last_page_len: Vec<i32>,
}

impl LevelArrays {
    fn new() -> Self {
        LevelArrays {
            qo_indptr: vec![0],
            kv_indptr: vec![0],
            ..Default::default()
        }
    }

    fn push(&mut self, qo_len: usize, pages: &[i32], last_page_len: usize) {
        let q = *self.qo_indptr.last().unwrap_or(&0) as usize + qo_len;
        self.qo_indptr.push(q as i32);
        self.kv_indices.extend_from_slice(pages);
        self.kv_indptr.push(self.kv_indices.len() as i32);
        self.last_page_len.push(if pages.is_empty() {
            0
        } else {
            last_page_len as i32
        });
    }

    fn as_level(&self) -> CascadeLevel<'_> {
        CascadeLevel {
            qo_indptr: &self.qo_indptr,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            last_page_len: &self.last_page_len,
        }
    }
}

/// Level 0 (shared prefixes of runs of adjacent requests) and level 1 (the rest), from a
/// validated flat batch. Counts fit int32: every array is at most the flat batch's.
///
/// With `causal`, a request's query rows are its last keys, so its shared prefix stops
/// `qo_len` keys before its end: every level but the last is then fully visible to all of
/// its rows.
fn split_shared_prefixes(
    requests: &[FlatRequest],
    kv_indices: &[i32],
    page_size: usize,
    causal: bool,
) -> [LevelArrays; 2] {
    let sharable = |r: &FlatRequest| {
        let (a, b) = r.pages;
        let full = b.saturating_sub(1).max(a) - a;
        if causal {
            let kv_len = full * page_size + r.last_page_len;
            full.min(kv_len.saturating_sub(r.qo_len) / page_size)
        } else {
            full
        }
    };
    // A request's last page is its own (being filled); the pages before it are full.
    let full = |r: &FlatRequest| &kv_indices[r.pages.0..r.pages.0 + sharable(r)];
    let (mut l0, mut l1) = (LevelArrays::new(), LevelArrays::new());
    let mut i = 0;
    while i < requests.len() {
        // The run of requests starting at i whose full pages begin with the same page.
        let head = full(&requests[i]);
        let mut j = i + 1;
        let mut shared = head.len();
        if !head.is_empty() {
            while j < requests.len() {
                let other = full(&requests[j]);
                let lcp = head.iter().zip(other).take_while(|(x, y)| x == y).count();
                if lcp == 0 {
                    break;
                }
                shared = shared.min(lcp);
                j += 1;
            }
        }
        let run = &requests[i..j];
        let sharing = run.len() >= 2 && shared > 0;
        let prefix = if sharing { shared } else { 0 };
        let rows: usize = run.iter().map(|r| r.qo_len).sum();
        l0.push(rows, &head[..prefix], page_size);
        for r in run {
            let (a, b) = r.pages;
            l1.push(r.qo_len, &kv_indices[a + prefix..b], r.last_page_len);
        }
        i = j;
    }
    [l0, l1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(qo_len: usize, a: usize, b: usize, last: usize) -> FlatRequest {
        FlatRequest {
            qo_len,
            pages: (a, b),
            last_page_len: last,
        }
    }

    #[test]
    fn adjacent_sharers_form_one_level_request() {
        // Requests 0..3 share pages [7, 8]; request 1 also has 9 full; request 3 shares none.
        let ids = [7, 8, 1, 7, 8, 9, 2, 7, 8, 3, 4, 5];
        let reqs = [
            req(1, 0, 3, 5),
            req(2, 3, 7, 16),
            req(1, 7, 10, 1),
            req(1, 10, 12, 3),
        ];
        let [l0, l1] = split_shared_prefixes(&reqs, &ids, 16, false);
        assert_eq!(l0.qo_indptr, [0, 4, 5]);
        assert_eq!(l0.kv_indptr, [0, 2, 2]);
        assert_eq!(l0.kv_indices, [7, 8]);
        assert_eq!(l0.last_page_len, [16, 0]);
        assert_eq!(l1.qo_indptr, [0, 1, 3, 4, 5]);
        assert_eq!(l1.kv_indices, [1, 9, 2, 3, 4, 5]);
        assert_eq!(l1.kv_indptr, [0, 1, 3, 4, 6]);
        assert_eq!(l1.last_page_len, [5, 16, 1, 3]);
    }

    #[test]
    fn causal_rows_stay_in_the_last_level() {
        // Two requests of 37 keys (pages [1, 2, 3] and [1, 2, 4]) with 20 query rows each:
        // causal rows see keys from 17 on, so only page 1 (keys 0..16) is fully visible.
        let ids = [1, 2, 3, 1, 2, 4];
        let reqs = [req(20, 0, 3, 5), req(20, 3, 6, 5)];
        let [l0, _] = split_shared_prefixes(&reqs, &ids, 16, true);
        assert_eq!(l0.kv_indices, [1]);
        let [l0, _] = split_shared_prefixes(&reqs, &ids, 16, false);
        assert_eq!(l0.kv_indices, [1, 2]);
    }

    #[test]
    fn a_last_page_is_never_shared() {
        // Both requests are one page, the same page: it is each one's last page.
        let ids = [4, 4];
        let reqs = [req(1, 0, 1, 3), req(1, 1, 2, 3)];
        let [l0, l1] = split_shared_prefixes(&reqs, &ids, 16, false);
        assert_eq!(l0.kv_indices, Vec::<i32>::new());
        assert_eq!(l0.qo_indptr, [0, 1, 2]);
        assert_eq!(l1.kv_indices, [4, 4]);
    }
}
