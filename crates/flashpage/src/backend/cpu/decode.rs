//! Decode in memory order: one work item's rows (every row at the same query position: one
//! request's GQA groups of a range of KV heads) against its KV chunk, reading each key
//! block's K and V token rows front to back.
//!
//! The tile kernel of `attend.rs` walks a block head by head: for each head it reads that
//! head's slice of every token row, so consecutive loads jump between token rows (and 4 KiB
//! blocks), which the hardware prefetchers do not follow on cores like Zen 3. Here (see
//! docs/perf/cpu.md):
//!
//! 1. `S = Q·Kᵀ` runs over key pairs `(j, j + 16)` of the 32-key block with the heads inner,
//!    so each pair of token rows is read from its start to its end (the two rows of a pair
//!    are on different pages or 4 KiB blocks); a 4-row × 2-key register tile per head. q is
//!    widened to f32 once per work item, in K's pair order (so only K is split per step),
//!    and the scale is applied to the reduced scores.
//! 2. Scores are stored `s[key][row]` for all rows of the item, so the online softmax is
//!    vertical: one register holds a score of `LANES` rows.
//! 3. `O += P·V` runs over groups of 8 strided keys with the heads inner: a 4-row ×
//!    16-column register tile (2-row × 32-column below four rows), so each V chunk is split
//!    once for four rows; V addresses are each token's row base plus the head offset.
//! 4. Elements are loaded in pairs of registers ([`Isa::load2`]): on AVX2 a bf16 chunk is
//!    split into even and odd elements with one shift and one mask; q (widened) and the
//!    accumulators use the same order, undone once when the rows are written.
//! 5. Prefetch: during S, the V rows of the pair being read; during P·V, the K rows of the
//!    next block; and the first line of each token row of the next block (K and V), spread
//!    over the pair steps, which starts the hardware streams.
//!
//! Masking is uniform across the rows (they share one position), so every key of the
//! visible range `start..end` is seen by every row.

use super::attend::{exact_score, finish_rows};
use super::ctx::{Ctx, Scratch};
use super::elem::Elem;
use super::simd::Isa;
use super::simd::isa::SoftCap;
use super::tile::{KEY_BLOCK, PREFETCH_STRIDE, pv_row_skipping};
use crate::options::alibi_slope;

/// Keys between the two keys of an S pair.
const HALF: usize = KEY_BLOCK / 2;

/// Keys per P·V group (strided by `KEY_BLOCK / GROUP`).
const GROUP: usize = 8;

/// True when work item `w` can run on [`decode`]: every row at one query position, no RoPE
/// (which rotates K rows before use).
pub(crate) fn eligible<E, K>(ctx: &Ctx<'_, E, K>, w: usize) -> bool {
    let item = ctx.plan.work_item_at(w);
    let g = ctx.plan.heads().group_size();
    !ctx.rope && item.row_end > item.row_start && item.row_start / g == (item.row_end - 1) / g
}

/// `([q_r·k0]_r, [q_r·k1]_r)` (key-major) for `R` q rows (stride `d`, f32, in the
/// pair order of `K`) and two K rows (type `K`), unscaled.
///
/// # Safety
/// `q..q + R·d`, `k0..k0 + d` and `k1..k1 + d` readable; `d % (2·LANES) == 0`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
unsafe fn s_pair<I: Isa, K: Elem, const R: usize>(
    q: *const f32,
    d: usize,
    k0: *const K,
    k1: *const K,
) -> [[f32; R]; 2] {
    let l = I::LANES;
    let mut a = [[I::zero(); 2]; R];
    let mut c = 0;
    while c < d {
        // SAFETY: c + 2·LANES <= d for every row (caller).
        let (k0a, k0b) = unsafe { I::load2::<K>(k0.add(c)) };
        // SAFETY: as above.
        let (k1a, k1b) = unsafe { I::load2::<K>(k1.add(c)) };
        for r in 0..R {
            // SAFETY: as above.
            let (qa, qb) = unsafe { I::load2::<f32>(q.add(r * d + c)) };
            a[r][0] = I::fma(qa, k0a, a[r][0]);
            a[r][1] = I::fma(qa, k1a, a[r][1]);
            a[r][0] = I::fma(qb, k0b, a[r][0]);
            a[r][1] = I::fma(qb, k1b, a[r][1]);
        }
        c += 2 * l;
    }
    let mut out = [[0.0; R]; 2];
    match R {
        4 => {
            let x = I::reduce_add4([a[0][0], a[1][0], a[2][0], a[3][0]]);
            let y = I::reduce_add4([a[0][1], a[1][1], a[2][1], a[3][1]]);
            out[0].copy_from_slice(&x);
            out[1].copy_from_slice(&y);
        }
        2 => {
            let x = I::reduce_add4([a[0][0], a[1][0], a[0][1], a[1][1]]);
            out[0].copy_from_slice(&x[..2]);
            out[1].copy_from_slice(&x[2..]);
        }
        _ => {
            for r in 0..R {
                out[0][r] = I::reduce_add(a[r][0]);
                out[1][r] = I::reduce_add(a[r][1]);
            }
        }
    }
    out
}

/// Stores the scores of `R` consecutive rows from `at` for keys `j` and `j1` (key-major
/// score rows of stride `tr`): one contiguous run per key.
#[inline(always)]
fn put<const R: usize>(s: &mut [f32], tr: usize, j: usize, j1: usize, at: usize, o: [[f32; R]; 2]) {
    s[j * tr + at..j * tr + at + R].copy_from_slice(&o[0]);
    s[j1 * tr + at..j1 * tr + at + R].copy_from_slice(&o[1]);
}

/// `acc[r] = corr[r]·acc[r] (first group only) + Σ_u p[j_u][r]·v_{j_u}` for `R` rows over
/// columns `c0..c0 + 2·NV·LANES` (pair order), keys `j_u = j0 + u·stride` below `nb`.
///
/// # Safety
/// `acc` rows (stride `d`) and every V row `v + vo[j] + c0..+2·NV·LANES` in bounds; `s`
/// holds `nb` rows of stride `tr` with the `R` rows from `t`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<I: Isa, E: Elem, const R: usize, const NV: usize>(
    acc: *mut f32,
    d: usize,
    corr: Option<&[f32]>,
    s: &[f32],
    tr: usize,
    t: usize,
    v: *const E,
    vo: &[usize; KEY_BLOCK],
    j0: usize,
    stride: usize,
    nb: usize,
    c0: usize,
) {
    let l = I::LANES;
    let a = [[I::zero(); 2]; NV];
    let mut a = [a; R];
    for r in 0..R {
        for x in 0..NV {
            for h in 0..2 {
                // SAFETY: in bounds (caller).
                a[r][x][h] = unsafe { I::load::<f32>(acc.add(r * d + c0 + (2 * x + h) * l)) };
            }
        }
        if let Some(cr) = corr {
            let cv = I::splat(cr[r]);
            for x in 0..NV {
                a[r][x] = [I::mul(cv, a[r][x][0]), I::mul(cv, a[r][x][1])];
            }
        }
    }
    debug_assert!(nb <= KEY_BLOCK && t + R <= tr && s.len() >= nb * tr);
    let (sp, vop) = (s.as_ptr(), vo.as_ptr());
    let mut j = j0;
    while j < nb {
        // SAFETY: j < nb <= KEY_BLOCK (vo's length); key j's scores of rows t..t + R are
        // inside s (caller: nb rows of stride tr, t + R <= tr). Unchecked, because the
        // bounds checks of this inner loop cost as much as its vector work.
        let (vj, srow) = unsafe { (v.add(*vop.add(j) + c0), sp.add(j * tr + t)) };
        let mut vv = [(I::zero(), I::zero()); NV];
        for x in 0..NV {
            // SAFETY: in bounds (caller).
            vv[x] = unsafe { I::load2::<E>(vj.add(2 * x * l)) };
        }
        for r in 0..R {
            // SAFETY: r < R (above).
            let p = I::splat(unsafe { *srow.add(r) });
            for x in 0..NV {
                a[r][x][0] = I::fma(p, vv[x].0, a[r][x][0]);
                a[r][x][1] = I::fma(p, vv[x].1, a[r][x][1]);
            }
        }
        j += stride;
    }
    for r in 0..R {
        for x in 0..NV {
            for h in 0..2 {
                // SAFETY: in bounds (caller).
                unsafe { I::store::<f32>(acc.add(r * d + c0 + (2 * x + h) * l), a[r][x][h]) };
            }
        }
    }
}

/// [`pv_tile`] over every column of `R` rows: chunks of `2·LANES` for four rows; below
/// that, chunks of `4·LANES`, then a `2·LANES` tail.
///
/// # Safety
/// As [`pv_tile`] for all columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<I: Isa, E: Elem, const R: usize>(
    acc: *mut f32,
    d: usize,
    corr: Option<&[f32]>,
    s: &[f32],
    tr: usize,
    t: usize,
    v: *const E,
    vo: &[usize; KEY_BLOCK],
    j0: usize,
    stride: usize,
    nb: usize,
) {
    let w = 4 * I::LANES;
    let mut c0 = 0;
    // SAFETY (all calls): columns c0.. in bounds (loop conditions; d % (2·LANES) == 0).
    unsafe {
        if R >= 4 {
            // Four rows: one V chunk of 2·LANES per key feeds 8 accumulators.
            while c0 < d {
                pv_tile::<I, E, R, 1>(acc, d, corr, s, tr, t, v, vo, j0, stride, nb, c0);
                c0 += 2 * I::LANES;
            }
            return;
        }
        while c0 + w <= d {
            pv_tile::<I, E, R, 2>(acc, d, corr, s, tr, t, v, vo, j0, stride, nb, c0);
            c0 += w;
        }
        if c0 < d {
            pv_tile::<I, E, R, 1>(acc, d, corr, s, tr, t, v, vo, j0, stride, nb, c0);
        }
    }
}

/// The online-softmax update of one row `t` alone (scores `s[j·tr + t]`, `j < nb`): the
/// path for rows whose running max is infinite (no finite score yet, or logits past the
/// f32 range), following the tile kernel's rules.
/// `state` is `(m, l, corr)`.
fn softmax_row(s: &mut [f32], tr: usize, t: usize, nb: usize, state: [&mut [f32]; 3]) {
    let [m, l, corr] = state;
    let mut mb = f32::NEG_INFINITY;
    for j in 0..nb {
        mb = mb.max(s[j * tr + t]);
    }
    let m_old = m[t];
    let m_new = m_old.max(mb);
    if m_new == f32::NEG_INFINITY {
        for j in 0..nb {
            s[j * tr + t] = 0.0;
        }
        corr[t] = 1.0;
        return;
    }
    let mut sum = 0.0;
    if m_new == f32::INFINITY {
        for j in 0..nb {
            let x = &mut s[j * tr + t];
            *x = if *x == f32::INFINITY { 1.0 } else { 0.0 };
            sum += *x;
        }
        corr[t] = if m_old == f32::INFINITY { 1.0 } else { 0.0 };
    } else {
        for j in 0..nb {
            let x = &mut s[j * tr + t];
            *x = (*x - m_new).exp();
            sum += *x;
        }
        corr[t] = if m_old == m_new {
            1.0
        } else {
            (m_old - m_new).exp()
        };
    }
    m[t] = m_new;
    l[t] = l[t] * corr[t] + sum;
}

/// Runs decode work item `w` (see [`eligible`]) for KV heads `kv_heads.0..kv_heads.1`.
#[inline(always)]
pub(crate) fn decode<I: Isa, E: Elem, K: Elem>(
    ctx: &Ctx<'_, E, K>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut Scratch,
) {
    let plan = ctx.plan;
    let item = plan.work_item_at(w);
    let req = plan.request_at(item.request);
    let heads = plan.heads();
    let (hq, d, g) = (heads.num_qo_heads(), heads.head_dim(), heads.group_size());
    let rows = item.row_end - item.row_start;
    let (h0, nh) = (kv_heads.0, kv_heads.1 - kv_heads.0);
    if rows == 0 || nh == 0 {
        return;
    }
    let l = I::LANES;
    assert!(d % (2 * l) == 0, "head_dim is a multiple of 16");
    let trows = rows * nh;
    // Rows padded to whole registers (padding rows keep score 0, never written out).
    let tr = trows.div_ceil(l) * l;
    sc.prepare(tr, d);
    sc.s.clear();
    sc.s.resize(KEY_BLOCK * tr, 0.0);
    let i = item.row_start / g;
    let qpos = i as i64 + req.kv_len as i64 - req.qo_len as i64;

    // q rows widened to f32 once per item, each element where `load2` puts K's element of
    // the same column (AVX2 bf16: even columns, then odd, per 16): the S loop then splits
    // only K, and q comes from L1 as plain f32 loads.
    // Per tile row: the score scale, `sm_scale · k_scale` of the row's KV head (padding
    // rows keep `sm_scale`; their scores are 0 and never read).
    sc.kscale.clear();
    sc.kscale.resize(tr, ctx.sm_scale);
    for t in 0..trows {
        let (kvh, p) = (h0 + t / rows, t % rows);
        let hh = kvh * g + (item.row_start + p) % g;
        let off = ctx.q_off(req.qo_start + i, hh);
        let src = &ctx.q[off..off + d];
        let row = &mut sc.q[t * d..(t + 1) * d];
        for (c, y) in src.iter().enumerate() {
            row[I::load2_position::<K>(c)] = y.to_f32();
        }
        sc.kscale[t] = ctx.sm_scale * ctx.k_scale[kvh];
        sc.qrow[t] = off;
        sc.qpos[t] = qpos;
        sc.slope[t] = if ctx.alibi {
            alibi_slope(hh, hq) as f32
        } else {
            0.0
        };
    }
    let qf: *const f32 = sc.q.as_ptr();

    let hi = if ctx.causal {
        qpos
    } else {
        req.kv_len as i64 - 1
    };
    let lo = ctx.window.map_or(0, |win| qpos - win as i64);
    let start = (item.kv_start as i64).max(lo).max(0) as usize;
    let end = ((item.kv_end as i64).min(hi.saturating_add(1))).max(start as i64) as usize;
    let (hstride, vhstride) = (ctx.strides.head, ctx.v_strides.head);
    let span = ((nh - 1) * hstride, (nh - 1) * vhstride);
    let (kbase, vbase) = (ctx.k.as_ptr(), ctx.v.as_ptr());
    let row_bytes = d * size_of::<K>();

    let mut j0 = start;
    if j0 < end {
        ctx.block_offsets(
            req.kv_start,
            j0,
            KEY_BLOCK.min(end - j0),
            h0,
            span,
            &mut sc.off,
            &mut sc.voff,
        );
    }
    while j0 < end {
        let nb = KEY_BLOCK.min(end - j0);
        let (offs, voffs) = (sc.off, sc.voff);
        let jn = j0 + nb;
        let nn = if jn < end { KEY_BLOCK.min(end - jn) } else { 0 };
        if nn > 0 {
            ctx.block_offsets(req.kv_start, jn, nn, h0, span, &mut sc.off, &mut sc.voff);
        }
        let (next, vnext) = (sc.off, sc.voff);
        let s = &mut sc.s[..KEY_BLOCK * tr];

        // S = Q·Kᵀ over key pairs (j, j + HALF), heads inner.
        for j in 0..HALF.min(nb) {
            let j1 = if j + HALF < nb { j + HALF } else { j };
            // The first line of each token row of the next block: starts the streams.
            for jj in [j, j + HALF] {
                if jj < nn {
                    I::prefetch(kbase.wrapping_add(next[jj]));
                    I::prefetch(vbase.wrapping_add(vnext[jj]));
                }
            }
            for hx in 0..nh {
                let (ho, vho) = (hx * hstride, hx * vhstride);
                // This pair's V rows of this head, read in the P·V phase.
                for b in (0..row_bytes).step_by(PREFETCH_STRIDE) {
                    let e = b / size_of::<K>();
                    I::prefetch(vbase.wrapping_add(voffs[j] + vho + e));
                    I::prefetch(vbase.wrapping_add(voffs[j1] + vho + e));
                }
                // SAFETY: block_offsets checked offs[..nb] plus any head of the range
                // against k and v (d elements each); j, j1 < nb.
                let (k0, k1) = unsafe { (kbase.add(offs[j] + ho), kbase.add(offs[j1] + ho)) };
                let t0 = hx * rows;
                let mut r0 = 0;
                while r0 < rows {
                    let left = rows - r0;
                    // SAFETY: q holds trows rows of d; rows t0 + r0.. exist.
                    let q = unsafe { qf.add((t0 + r0) * d) };
                    // Four, two or one rows per tile.
                    let n = if left >= 4 { 4 } else { left.min(2) };
                    let at = t0 + r0;
                    // SAFETY (all three calls): the rows read (four, two or one) and both K
                    // rows are readable.
                    unsafe {
                        if n == 4 {
                            put(s, tr, j, j1, at, s_pair::<I, K, 4>(q, d, k0, k1));
                        } else if n == 2 {
                            put(s, tr, j, j1, at, s_pair::<I, K, 2>(q, d, k0, k1));
                        } else {
                            put(s, tr, j, j1, at, s_pair::<I, K, 1>(q, d, k0, k1));
                        }
                    }
                    r0 += n;
                }
            }
        }

        // Scale; exact scores where the f32 ones came out non-finite; soft-cap; ALiBi.
        let zero = I::zero();
        let mut bad = zero;
        for j in 0..nb {
            for v in (0..tr).step_by(l) {
                let p = s[j * tr + v..].as_mut_ptr();
                // SAFETY: v + LANES <= tr, the row length and kscale's.
                unsafe {
                    let x = I::mul(I::load::<f32>(p), I::load::<f32>(sc.kscale[v..].as_ptr()));
                    bad = I::fma(x, zero, bad);
                    I::store::<f32>(p, x);
                }
            }
        }
        // Custom mask: the same keys for every row (one query row); they get logit -inf
        // below and are skipped by P·V like keys of logit -inf.
        let hide = ctx.masked_keys(item.request, i, req.kv_len, j0, nb);
        let mut any_ninf = false;
        let bad_scores = I::reduce_add(bad).is_nan();
        if bad_scores {
            for t in 0..trows {
                let ho = (t / rows) * hstride;
                let ks = ctx.k_scale[h0 + t / rows];
                let mut nan = false;
                sc.ninf[t] = 0;
                for j in 0..nb {
                    if hide >> j & 1 == 1 {
                        continue;
                    }
                    let x = &mut s[j * tr + t];
                    if !x.is_finite() {
                        *x = exact_score(ctx, sc.qrow[t], qpos, offs[j] + ho, j0 + j, ks);
                        if *x == f32::NEG_INFINITY {
                            sc.ninf[t] |= 1 << j;
                            any_ninf = true;
                        }
                    }
                    nan |= x.is_nan();
                }
                if nan {
                    // A visible NaN score: the row is NaN (IEEE, as the reference).
                    sc.l[t] = f32::NAN;
                }
            }
        }
        if let Some(c) = ctx.soft_cap {
            let cap = SoftCap::<I>::new(c);
            for x in s[..nb * tr].chunks_exact_mut(l) {
                // SAFETY: a chunk holds LANES values.
                unsafe { I::store::<f32>(x.as_mut_ptr(), cap.apply(I::load::<f32>(x.as_ptr()))) };
            }
        }
        if ctx.alibi {
            for j in 0..nb {
                let dist = (j0 + j) as i64 - qpos;
                for t in 0..trows {
                    s[j * tr + t] += sc.slope[t] * dist as f32;
                }
            }
        }

        if hide != 0 {
            for t in 0..trows {
                if !bad_scores {
                    sc.ninf[t] = 0;
                }
                sc.ninf[t] |= hide;
            }
            let mut h = hide;
            while h != 0 {
                let j = h.trailing_zeros() as usize;
                s[j * tr..j * tr + trows].fill(f32::NEG_INFINITY);
                h &= h - 1;
            }
            any_ninf = true;
        }

        // Online softmax, vertical: one register holds LANES rows.
        for v in (0..tr).step_by(l) {
            let mut mv = I::splat(f32::NEG_INFINITY);
            for j in 0..nb {
                // SAFETY: v + LANES <= tr.
                mv = I::max(mv, unsafe { I::load::<f32>(s[j * tr + v..].as_ptr()) });
            }
            // SAFETY: m holds tr values.
            let m_old = unsafe { I::load::<f32>(sc.m[v..].as_ptr()) };
            let m_new = I::max(mv, m_old);
            let mut mn = [0.0f32; 16];
            // SAFETY: mn holds at least LANES values.
            unsafe { I::store::<f32>(mn.as_mut_ptr(), m_new) };
            if mn[..l].iter().any(|x| x.is_infinite()) {
                for t in v..v + l {
                    softmax_row(s, tr, t, nb, [&mut sc.m, &mut sc.l, &mut sc.corr]);
                }
                continue;
            }
            let negm = I::mul(m_new, I::splat(-1.0));
            let one = I::splat(1.0);
            // SAFETY (all loads and stores): v + LANES <= tr, the length of the state rows
            // and of each score row.
            unsafe {
                let corr = I::exp(I::fma(m_old, one, negm));
                let mut sum = I::zero();
                for j in 0..nb {
                    let p = s[j * tr + v..].as_mut_ptr();
                    let e = I::exp(I::fma(I::load::<f32>(p), one, negm));
                    sum = I::fma(e, one, sum);
                    I::store::<f32>(p, e);
                }
                let lv = I::load::<f32>(sc.l[v..].as_ptr());
                I::store::<f32>(sc.l[v..].as_mut_ptr(), I::fma(lv, corr, sum));
                I::store::<f32>(sc.m[v..].as_mut_ptr(), m_new);
                I::store::<f32>(sc.corr[v..].as_mut_ptr(), corr);
            }
        }

        // O = diag(corr)·O + P·V over groups of GROUP strided keys, heads inner.
        let stride = KEY_BLOCK / GROUP;
        let s = &sc.s[..KEY_BLOCK * tr];
        if any_ninf {
            // A visible key of logit -inf (infinite inputs): the scalar path skips it.
            for t in 0..trows {
                let vho = (t / rows) * vhstride;
                pv_row_skipping(
                    &mut sc.acc[t * d..(t + 1) * d],
                    sc.corr[t],
                    0..nb,
                    sc.ninf[t],
                    |j| s[j * tr + t],
                    ctx.v,
                    |j| voffs[j] + vho,
                    I::load2_position::<K>,
                );
            }
            j0 = jn;
            continue;
        }
        for gi in 0..stride.min(nb) {
            for hx in 0..nh {
                let (ho, vho) = (hx * hstride, hx * vhstride);
                // The next block's K rows of this group and head, read by the next S phase.
                let mut u = gi;
                while u < nn {
                    for b in (0..row_bytes).step_by(PREFETCH_STRIDE) {
                        I::prefetch(kbase.wrapping_add(next[u] + ho + b / size_of::<K>()));
                    }
                    u += stride;
                }
                let mut vo = [0usize; KEY_BLOCK];
                for (o, &x) in vo.iter_mut().zip(&voffs) {
                    *o = x + vho;
                }
                let corr = if gi == 0 { Some(&sc.corr[..]) } else { None };
                let t0 = hx * rows;
                let mut r0 = 0;
                while r0 < rows {
                    let t = t0 + r0;
                    let a = sc.acc[t * d..].as_mut_ptr();
                    let cr = corr.map(|c| &c[t..]);
                    // SAFETY: rows t.. of acc exist; keys below nb were checked with every
                    // head of the range by block_offsets.
                    unsafe {
                        if rows - r0 >= 4 {
                            pv_rows::<I, K, 4>(a, d, cr, s, tr, t, vbase, &vo, gi, stride, nb);
                            r0 += 4;
                        } else if rows - r0 >= 2 {
                            pv_rows::<I, K, 2>(a, d, cr, s, tr, t, vbase, &vo, gi, stride, nb);
                            r0 += 2;
                        } else {
                            pv_rows::<I, K, 1>(a, d, cr, s, tr, t, vbase, &vo, gi, stride, nb);
                            r0 += 1;
                        }
                    }
                }
            }
        }
        j0 = jn;
    }
    finish_rows::<I, E, K>(ctx, w, h0, rows, trows, sc, I::load2_position::<K>);
}

#[cfg(test)]
mod tests {
    #[test]
    fn pair_constants_fit_the_block() {
        assert_eq!(super::HALF * 2, super::KEY_BLOCK);
        assert_eq!(super::KEY_BLOCK % super::GROUP, 0);
    }
}
