//! What a kernel reads and writes in one run: the resolved run context, per-thread scratch,
//! and the output buffers shared by the threads.

use std::marker::PhantomData;

use super::tile::KEY_BLOCK;
use crate::layout::{CustomMask, KvStrides, QoStrides};
use crate::plan::{Plan, WorkItem};

/// Everything a kernel reads, resolved once per run: q and o of type `E`, K and V of type
/// `K` (`E`, or an FP8 code type of a quantised cache).
pub(crate) struct Ctx<'a, E, K = E> {
    pub(crate) plan: &'a Plan,
    pub(crate) q: &'a [E],
    pub(crate) k: &'a [K],
    pub(crate) v: &'a [K],
    /// K's scale per KV head (`num_kv_heads` values; all 1 for a float cache): a score of
    /// head `h` is `k_scale[h] · q·code`.
    pub(crate) k_scale: Vec<f32>,
    /// V's scale per KV head, applied to each finished output row of head `h`.
    pub(crate) v_scale: Vec<f32>,
    /// K strides.
    pub(crate) strides: KvStrides,
    /// V strides (K's unless the cache says otherwise).
    pub(crate) v_strides: KvStrides,
    /// q strides (row, head).
    pub(crate) q_strides: QoStrides,
    /// o strides (row, head).
    pub(crate) o_strides: QoStrides,
    pub(crate) kv_indices: &'a [i32],
    pub(crate) page_size: usize,
    pub(crate) paged: bool,
    pub(crate) o: SharedMut<'a, E>,
    pub(crate) lse: Option<SharedMut<'a, f32>>,
    /// Attention sinks per query head (checked to be `num_qo_heads` long).
    pub(crate) sinks: Option<&'a [f32]>,
    /// The custom mask (checked against the plan by `check_run_args`).
    pub(crate) mask: Option<CustomMask<'a>>,
    pub(crate) partial_o: SharedMut<'a, f32>,
    pub(crate) partial_lse: SharedMut<'a, f32>,
    pub(crate) sm_scale: f32,
    pub(crate) soft_cap: Option<f32>,
    pub(crate) causal: bool,
    pub(crate) window: Option<usize>,
    pub(crate) alibi: bool,
    pub(crate) rope: bool,
    pub(crate) rope_scale: f32,
    pub(crate) inv_freq: Vec<f64>,
}

/// The attention-sink epilogue on a finished state (docs/semantics.md, "Attention sinks"):
/// for a state with log-sum-exp `lse` and a sink logit `sink`, returns `(f, lse')` with
/// `lse' = ln(e^lse + e^sink)` and `f = e^(lse − lse')`, the factor the normalised output
/// row is multiplied by. Computed relative to the larger of the two, so nothing overflows:
/// an empty state (`lse = -inf`) gives `f = 0`, `lse' = sink`; a sink of `-inf` changes
/// nothing; `NaN` in either propagates to both.
#[inline]
pub(crate) fn sink_epilogue(lse: f32, sink: f32) -> (f32, f32) {
    if sink == f32::NEG_INFINITY {
        return (1.0, lse);
    }
    if lse >= sink {
        // lse finite or +inf, sink < +inf: e^(sink - lse) in [0, 1].
        let t = (sink - lse).exp();
        (1.0 / (1.0 + t), lse + t.ln_1p())
    } else {
        // lse < sink (or a NaN, which every step below propagates).
        let t = (lse - sink).exp();
        (t / (1.0 + t), sink + t.ln_1p())
    }
}

/// The complement of bits `bit..bit + nb` (`nb <= 32`) of a little-endian bit buffer, as
/// the low `nb` bits of a word (bits past the buffer's end read as 0: masked).
#[inline]
pub(crate) fn masked_bits(bits: &[u8], bit: usize, nb: usize) -> u32 {
    let (byte, sh) = (bit / 8, bit % 8);
    let mut w = 0u64;
    for (k, &b) in bits.get(byte..).unwrap_or(&[]).iter().take(5).enumerate() {
        w |= (b as u64) << (8 * k);
    }
    let low = if nb >= 32 { u32::MAX } else { (1u32 << nb) - 1 };
    !((w >> sh) as u32) & low
}

/// The element strides of one run: K, V, q and o.
#[derive(Clone, Copy)]
pub(crate) struct Strides {
    pub(crate) k: KvStrides,
    pub(crate) v: KvStrides,
    pub(crate) q: QoStrides,
    pub(crate) o: QoStrides,
}

impl<E, K> Ctx<'_, E, K> {
    /// The sink epilogue for query head `h` (identity without sinks).
    #[inline]
    pub(crate) fn sink(&self, h: usize, lse: f32) -> (f32, f32) {
        match self.sinks {
            Some(s) => sink_epilogue(lse, s[h]),
            None => (1.0, lse),
        }
    }

    /// The keys `j0..j0 + nb` (`nb <= 32`) that the custom mask hides from query row `i` of
    /// request `r` (`kv_len` keys): bit `jj` set when key `j0 + jj` is masked. 0 without a
    /// mask. Request `r`'s bits start at byte `mask_indptr[r]` (checked against the plan:
    /// every bit of the request is inside the buffer).
    #[inline]
    pub(crate) fn masked_keys(
        &self,
        r: usize,
        i: usize,
        kv_len: usize,
        j0: usize,
        nb: usize,
    ) -> u32 {
        let Some(m) = self.mask else { return 0 };
        masked_bits(m.bits, m.indptr[r] as usize * 8 + i * kv_len + j0, nb)
    }

    /// Element offset of q row `row`, head `head` (checked against q's length by
    /// `check_run_args`).
    #[inline(always)]
    pub(crate) fn q_off(&self, row: usize, head: usize) -> usize {
        row * self.q_strides.row + head * self.q_strides.head
    }

    /// Element offset of o row `row`, head `head`.
    #[inline(always)]
    pub(crate) fn o_off(&self, row: usize, head: usize) -> usize {
        row * self.o_strides.row + head * self.o_strides.head
    }

    /// K offsets (into `out`) and V offsets (into `vout`) of tokens `j0..j0 + n` (head `h`)
    /// of the request whose KV starts at `kv_start`, walking pages incrementally; each K
    /// offset plus `span` (the distance to the last head a kernel reads) is checked to leave
    /// `head_dim` elements in K, each V offset plus `vspan` likewise in V, so kernels may
    /// read rows through raw pointers.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_offsets(
        &self,
        kv_start: usize,
        j0: usize,
        n: usize,
        h: usize,
        (span, vspan): (usize, usize),
        out: &mut [usize],
        vout: &mut [usize],
    ) {
        let hd = self.plan.heads().head_dim();
        let (kd, vd) = (hd + span, hd + vspan);
        let (kl, vl) = (self.k.len(), self.v.len());
        let check = |o: usize, d: usize, limit: usize| {
            assert!(o <= limit && d <= limit - o, "kv row out of bounds");
            o
        };
        let (ks, vs) = (self.strides, self.v_strides);
        if self.paged {
            let (mut page, mut slot) = (j0 / self.page_size, j0 % self.page_size);
            for (o, vo) in out[..n].iter_mut().zip(&mut vout[..n]) {
                let id = self.kv_indices[kv_start + page] as usize;
                *o = check(id * ks.page + slot * ks.token + h * ks.head, kd, kl);
                *vo = check(id * vs.page + slot * vs.token + h * vs.head, vd, vl);
                slot += 1;
                if slot == self.page_size {
                    slot = 0;
                    page += 1;
                }
            }
        } else {
            for (t, (o, vo)) in out[..n].iter_mut().zip(&mut vout[..n]).enumerate() {
                let tok = kv_start + j0 + t;
                *o = check(tok * ks.page + h * ks.head, kd, kl);
                *vo = check(tok * vs.page + h * vs.head, vd, vl);
            }
        }
    }
}

/// Per-thread scratch of the tile kernel.
pub(crate) struct Scratch {
    pub(crate) q: Vec<f32>,
    /// q rows packed per head for the prefill S steps (`prefill::pack_q`).
    pub(crate) qt: Vec<f32>,
    /// q rows as bf16 bits (the bf16 dot-product path).
    pub(crate) qb: Vec<u16>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// The widened K rows transposed into a panel (`prefill::pack_kt`).
    pub(crate) kt: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) acc: Vec<f32>,
    pub(crate) m: Vec<f32>,
    pub(crate) l: Vec<f32>,
    pub(crate) lo: Vec<i64>,
    pub(crate) hi: Vec<i64>,
    pub(crate) qpos: Vec<i64>,
    pub(crate) slope: Vec<f32>,
    /// Per tile row: the scale of its scores (`decode.rs`: `sm_scale · k_scale`).
    pub(crate) kscale: Vec<f32>,
    pub(crate) corr: Vec<f32>,
    /// Per tile row: the offset of its q row in `Ctx::q`.
    pub(crate) qrow: Vec<usize>,
    /// Per row of the current head: its visible keys of the current block.
    pub(crate) vis: Vec<[usize; 2]>,
    /// Per row of the current block: bit `j` set when key `j`'s logit is `-inf` (infinite
    /// inputs): a key of weight exactly 0, skipped by P·V ([`super::tile::pv_row_skipping`]).
    pub(crate) ninf: Vec<u32>,
    /// Per row of the current block: bit `j` set when the custom mask hides key `j` inside
    /// the row's visible range (`attend.rs`).
    pub(crate) holes: Vec<u32>,
    pub(crate) off: [usize; KEY_BLOCK],
    /// V offsets of the current block (as `off` for K).
    pub(crate) voff: [usize; KEY_BLOCK],
    /// Work items run as one tile from the unit's item on ([`tile_item`]; 1 but for merged
    /// prefill tiles).
    pub(crate) span: usize,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            q: Vec::new(),
            qt: Vec::new(),
            qb: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            kt: Vec::new(),
            s: Vec::new(),
            acc: Vec::new(),
            m: Vec::new(),
            l: Vec::new(),
            lo: Vec::new(),
            hi: Vec::new(),
            qpos: Vec::new(),
            slope: Vec::new(),
            kscale: Vec::new(),
            corr: Vec::new(),
            qrow: Vec::new(),
            vis: Vec::new(),
            ninf: Vec::new(),
            holes: Vec::new(),
            off: [0; KEY_BLOCK],
            voff: [0; KEY_BLOCK],
            span: 1,
        }
    }
}

/// Rows a merged prefill tile may reach ([`merge_factor`]): with 64-row q tiles every q tile
/// streamed the whole K/V of its keys from memory again, which cost 13–18% of a causal
/// prefill's time on the 2-core Zen 4 VM; 256-row tiles stream it a quarter as often
/// (docs/perf/cpu.md, prefill step 11).
pub(crate) const MERGE_ROWS: usize = 256;

/// How many consecutive work items of a prefill plan a unit of work may run as one tile:
/// up to [`MERGE_ROWS`] rows, halved while that would leave fewer than 4 units per thread
/// (`groups` KV-head groups per item).
pub(crate) fn merge_factor(plan: &Plan, groups: usize, threads: usize) -> usize {
    let items = plan.num_work_items();
    if items == 0 {
        return 1;
    }
    let first = plan.work_item_at(0);
    let rows = (first.row_end - first.row_start).max(1);
    let mut m = (MERGE_ROWS / rows).max(1);
    while m > 1 && items.div_ceil(m) * groups < 4 * threads {
        m /= 2;
    }
    m
}

/// Whether work items `a` and `a + 1` can run as one tile: consecutive rows of one request
/// over the same keys, both written directly (not split), the first spanning more than one
/// query row (so the merged tile's first item is never a decode-shaped one).
pub(crate) fn mergeable(plan: &Plan, a: usize) -> bool {
    let (x, y) = (plan.work_item_at(a), plan.work_item_at(a + 1));
    let g = plan.heads().group_size();
    x.request == y.request
        && x.row_end > x.row_start
        && x.row_end == y.row_start
        && x.row_start / g != (x.row_end - 1) / g
        && (x.kv_start, x.kv_end) == (y.kv_start, y.kv_end)
        && x.partial.is_none()
        && y.partial.is_none()
}

/// Work item `w` merged with the `span - 1` items after it ([`mergeable`] pairs): its rows
/// reach the last one's `row_end`.
pub(crate) fn tile_item(plan: &Plan, w: usize, span: usize) -> WorkItem {
    let mut item = plan.work_item_at(w);
    if span > 1 {
        item.row_end = plan.work_item_at(w + span - 1).row_end;
    }
    item
}

impl Scratch {
    pub(crate) fn prepare(&mut self, rows: usize, d: usize) {
        let kb = KEY_BLOCK;
        self.q.resize(rows * d, 0.0);
        self.k.resize(kb * d, 0.0);
        self.v.resize(kb * d, 0.0);
        self.s.resize(rows * kb, 0.0);
        self.corr.resize(rows, 1.0);
        self.acc.clear();
        self.acc.resize(rows * d, 0.0);
        self.m.clear();
        self.m.resize(rows, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(rows, 0.0);
        self.lo.resize(rows, 0);
        self.hi.resize(rows, 0);
        self.qpos.resize(rows, 0);
        self.slope.resize(rows, 0.0);
        self.qrow.resize(rows, 0);
        self.vis.resize(rows, [0, 0]);
        self.ninf.clear();
        self.ninf.resize(rows, 0);
        self.holes.clear();
        self.holes.resize(rows, 0);
    }
}

/// A mutable buffer shared by the threads of one run; each thread writes disjoint ranges.
pub(crate) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _life: PhantomData<&'a mut [T]>,
}

// SAFETY: SharedMut hands out disjoint sub-slices only (see `slice`); T is Send.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
// SAFETY: as above: concurrent users touch disjoint ranges.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub(super) fn new(s: &'a mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _life: PhantomData,
        }
    }

    /// `[off, off + len)` as a mutable slice.
    ///
    /// # Safety
    /// No other live slice from this buffer may overlap the range while this one is used.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        assert!(
            off <= self.len && len <= self.len - off,
            "shared slice out of bounds"
        );
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl<'a> SharedMut<'a, u8> {
    /// The f32 view of bytes `[off, off + bytes)` (offset 4-aligned: a multiple of 256 from
    /// a 64-aligned base).
    pub(super) fn cast_f32(&self, off: usize, bytes: usize) -> SharedMut<'a, f32> {
        assert!(off <= self.len && bytes <= self.len - off);
        // SAFETY: in bounds; the address is 4-aligned (base 64-aligned checked by `run`,
        // offset a multiple of 256 or the range is empty).
        let ptr = unsafe { self.ptr.add(off) } as *mut f32;
        assert!(bytes == 0 || (ptr as usize).is_multiple_of(4));
        SharedMut {
            ptr,
            len: bytes / 4,
            _life: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{merge_factor, mergeable, sink_epilogue};
    use crate::{AttentionOptions, BatchBuilder, HeadConfig, Plan, PlanConfig};

    /// The batch of `tests/cpu_kernels.rs`'s `prefill_merged_q_tiles` merges its q tiles:
    /// that test checks merged tiles against the reference only if they happen.
    #[test]
    fn long_prefills_merge_consecutive_q_tiles() {
        let heads = HeadConfig::new(8, 2, 64).unwrap();
        let mut b = BatchBuilder::new(16).unwrap();
        let mut next = 0;
        for (qo, kv) in [(300usize, 700usize), (130, 130), (70, 90)] {
            let pages: Vec<i32> = (next..next + kv.div_ceil(16) as i32).collect();
            next += pages.len() as i32;
            b.push(qo, kv, &pages).unwrap();
        }
        let opts = AttentionOptions::default().with_causal(true);
        let plan = Plan::new(
            &b.prefill(heads, next as usize),
            &opts,
            &PlanConfig::with_parallelism(2),
        )
        .unwrap();
        // One KV-head group per unit (the fewest units), 2 threads, as the test runs.
        assert!(merge_factor(&plan, 1, 2) >= 2, "{}", plan.num_work_items());
        assert!(mergeable(&plan, 0));
        // Items of different requests never merge.
        let last0 = (0..plan.num_work_items() - 1)
            .find(|&w| plan.work_item_at(w + 1).request != plan.work_item_at(w).request)
            .unwrap();
        assert!(!mergeable(&plan, last0));
    }

    #[test]
    fn sink_epilogue_matches_the_extra_logit() {
        for &(lse, sink) in &[(0.5f32, -1.0f32), (-3.0, 2.0), (10.0, 10.0), (-80.0, 70.0)] {
            let (f, l) = sink_epilogue(lse, sink);
            let (a, b) = (lse as f64, sink as f64);
            let want = a.max(b) + ((a - a.max(b)).exp() + (b - a.max(b)).exp()).ln();
            assert!(
                (l as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                "{lse} {sink}"
            );
            assert!((f as f64 - (a - want).exp()).abs() < 1e-6, "{lse} {sink}");
        }
        assert_eq!(sink_epilogue(f32::NEG_INFINITY, 1.5), (0.0, 1.5));
        assert_eq!(sink_epilogue(2.0, f32::NEG_INFINITY), (1.0, 2.0));
        let (f, l) = sink_epilogue(f32::NEG_INFINITY, f32::NEG_INFINITY);
        assert_eq!((f, l), (1.0, f32::NEG_INFINITY));
        assert_eq!(sink_epilogue(f32::INFINITY, 3.0), (1.0, f32::INFINITY));
        assert_eq!(sink_epilogue(3.0, f32::INFINITY), (0.0, f32::INFINITY));
        let (f, l) = sink_epilogue(f32::NAN, 1.0);
        assert!(f.is_nan() && l.is_nan());
        let (f, l) = sink_epilogue(1.0, f32::NAN);
        assert!(f.is_nan() && l.is_nan());
    }
}
