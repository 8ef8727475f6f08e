//! The attention tile kernel: one work item's packed q rows against its KV chunk, for one
//! KV head, with an online softmax over key blocks.
//!
//! Decode is the special case of a tile holding one request's whole GQA group, so each K/V
//! row is read once and used by every query head of its group. Per key block of
//! [`KEY_BLOCK`] keys the kernel computes `S = Q·Kᵀ` with a register-blocked dot-product
//! microkernel, updates the running max and sum, and accumulates `O += P·V` with a
//! register-blocked rank-1-update microkernel. Small tiles (decode) read K and V straight
//! from the cache, widening in registers; larger tiles (prefill) or RoPE first widen the
//! block's rows into f32 scratch, which the tile then reuses from L1.

use super::ctx::{Ctx, Scratch, tile_item};
use super::elem::Elem;
use super::prefill;
use super::simd::Isa;
use super::simd::isa::SoftCap;
use super::tile::{Bf16Tiles, KEY_BLOCK, PREFETCH_STRIDE, prefetch_rows, pv_row_skipping};
use crate::layout::DType;
use crate::options::alibi_slope;

/// Tiles of at most this many rows read K/V rows directly from the cache.
const DIRECT_ROWS: usize = 8;

/// Angles (rad) up to which [`rope`] reduces `pos · θ_f` by `a − 2π·round(a / 2π)` in f64:
/// the reduction's error grows with `|a|` (about `|a| · 2^-52`), 4·10^-9 rad at this bound.
const ROPE_REDUCE_MAX: f64 = (1u64 << 24) as f64;

/// Rotates a row in place (rotate-half RoPE) at `pos`.
///
/// The angle `pos · θ_f` reaches 10^5 rad at long context, where an f32 product would be off
/// by ~10^-2 rad; it is formed and reduced to `[-π, π]` in f64, then rotated in f32. Beyond
/// [`ROPE_REDUCE_MAX`] (positions divided by a tiny `rope_scale`) the sine and cosine are
/// taken in f64 of the angle itself (exact argument reduction), as the reference does, so
/// the rotation still follows the same angle.
#[inline(always)]
pub(crate) fn rope(x: &mut [f32], pos: f64, inv_freq: &[f64]) {
    let half = x.len() / 2;
    for f in 0..half {
        let a = pos * inv_freq[f];
        let (s, c) = if a.abs() <= ROPE_REDUCE_MAX {
            let a = a - std::f64::consts::TAU * (a * (1.0 / std::f64::consts::TAU)).round();
            (a as f32).sin_cos()
        } else {
            let (s, c) = a.sin_cos();
            (s as f32, c as f32)
        };
        let (a, b) = (x[f], x[f + half]);
        x[f] = a * c - b * s;
        x[f + half] = b * c + a * s;
    }
}

/// `S[r][j] = q_r · k_j` for `R` consecutive q rows (f32, stride `d`) and `C` key rows.
///
/// # Safety
/// `q..q + R·d` and every `kp[j]..kp[j] + d` must be readable; `d % I::LANES == 0`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
unsafe fn s_tile<I: Isa, T: Elem, const R: usize, const C: usize>(
    q: *const f32,
    d: usize,
    kp: &[*const T],
) -> [[f32; C]; R] {
    // No closures here or below: every primitive must inline into the entry point compiled
    // with the level's target features.
    let mut acc = [[I::zero(); C]; R];
    let mut c = 0;
    while c < d {
        let mut kv = [I::zero(); C];
        for j in 0..C {
            // SAFETY: c + LANES <= d for every row (caller).
            kv[j] = unsafe { I::load::<T>(kp[j].add(c)) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let qv = unsafe { I::load::<f32>(q.add(r * d + c)) };
            for j in 0..C {
                accr[j] = I::fma(qv, kv[j], accr[j]);
            }
        }
        c += I::LANES;
    }
    let mut out = [[0.0; C]; R];
    for r in 0..R {
        let mut j = 0;
        while j + 4 <= C {
            let s4 = I::reduce_add4([acc[r][j], acc[r][j + 1], acc[r][j + 2], acc[r][j + 3]]);
            out[r][j..j + 4].copy_from_slice(&s4);
            j += 4;
        }
        while j < C {
            out[r][j] = I::reduce_add(acc[r][j]);
            j += 1;
        }
    }
    out
}

/// Fills `s[r·KEY_BLOCK + j]` for all `rows` and the first `nb` keys, prefetching the
/// rows `pf[..np]` (a later block's) along the way ([`prefetch_rows`]).
///
/// # Safety
/// As [`s_tile`] for every row and key pointer; `s` holds `rows·KEY_BLOCK` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn s_block<I: Isa, T: Elem, const R: usize, const C: usize>(
    q: &[f32],
    d: usize,
    rows: usize,
    kp: &[*const T; KEY_BLOCK],
    nb: usize,
    s: &mut [f32],
    pf: &[*const T; KEY_BLOCK],
    np: usize,
) {
    let mut r0 = 0;
    while r0 + R <= rows {
        // SAFETY: rows r0..r0+R exist in q (caller).
        unsafe { s_rows::<I, T, R, C>(q.as_ptr().add(r0 * d), d, r0, kp, nb, s, pf, np) };
        r0 += R;
    }
    if R > 2 && r0 + 2 <= rows {
        // SAFETY: as above.
        unsafe { s_rows::<I, T, 2, C>(q.as_ptr().add(r0 * d), d, r0, kp, nb, s, pf, np) };
        r0 += 2;
    }
    while r0 < rows {
        // SAFETY: as above.
        unsafe { s_rows::<I, T, 1, C>(q.as_ptr().add(r0 * d), d, r0, kp, nb, s, pf, np) };
        r0 += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn s_rows<I: Isa, T: Elem, const R: usize, const C: usize>(
    q: *const f32,
    d: usize,
    r0: usize,
    kp: &[*const T; KEY_BLOCK],
    nb: usize,
    s: &mut [f32],
    pf: &[*const T; KEY_BLOCK],
    np: usize,
) {
    let mut j0 = 0;
    while j0 + C <= nb {
        if r0 == 0 {
            prefetch_rows::<I, T>(pf, np, j0, C, 0, d);
        }
        // SAFETY: forwarded from the caller.
        let t = unsafe { s_tile::<I, T, R, C>(q, d, &kp[j0..]) };
        for (r, tr) in t.iter().enumerate() {
            s[(r0 + r) * KEY_BLOCK + j0..][..C].copy_from_slice(tr);
        }
        j0 += C;
    }
    if r0 == 0 {
        prefetch_rows::<I, T>(pf, np, j0, KEY_BLOCK, 0, d);
    }
    while j0 < nb {
        // SAFETY: forwarded from the caller.
        let t = unsafe { s_tile::<I, T, R, 1>(q, d, &kp[j0..]) };
        for (r, tr) in t.iter().enumerate() {
            s[(r0 + r) * KEY_BLOCK + j0] = tr[0];
        }
        j0 += 1;
    }
}

/// The score of q row `qrow` (element offset in `ctx.q`, position `qpos`) against the K row
/// at element offset `koff` (key position `j`, of a head whose K scale is `k_scale`),
/// computed in f64 from the inputs: used where
/// the f32 score came out non-finite. Finite inputs cannot overflow in f64; a score beyond
/// the f32 range becomes `+inf` (the softmax then takes its limit) or `-f32::MAX` (so a row
/// whose every score is hugely negative is not mistaken for an empty one). Non-finite
/// inputs give what IEEE arithmetic gives the reference: NaN for `NaN` or `+inf` (whose
/// `inf − inf` poisons the reference's softmax), `-inf` for `-inf` (a key with weight 0).
/// With a soft-cap every non-NaN score is clamped to the f32 range instead: the cap then
/// maps it near `±c`, as the reference's cap maps `±inf` to `±c`.
#[cold]
#[inline(never)]
pub(crate) fn exact_score<E: Elem, K: Elem>(
    ctx: &Ctx<'_, E, K>,
    qrow: usize,
    qpos: i64,
    koff: usize,
    j: usize,
    k_scale: f32,
) -> f32 {
    let d = ctx.plan.heads().head_dim();
    let mut q: Vec<f64> = ctx.q[qrow..qrow + d]
        .iter()
        .map(|x| x.to_f32() as f64)
        .collect();
    let mut k: Vec<f64> = ctx.k[koff..koff + d]
        .iter()
        .map(|x| x.to_f32() as f64)
        .collect();
    if ctx.rope {
        let scale = ctx.rope_scale as f64;
        rope_f64(&mut q, qpos as f64 / scale, &ctx.inv_freq);
        rope_f64(&mut k, j as f64 / scale, &ctx.inv_freq);
    }
    let x =
        q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() * (ctx.sm_scale as f64 * k_scale as f64);
    if x.is_nan() {
        f32::NAN
    } else if ctx.soft_cap.is_some() {
        // The cap maps any score, infinite ones included, into `(-c, c)` (the reference's
        // `c·tanh(±inf/c) = ±c`): the kernel's cap of the clamped score gives the same.
        x.clamp(-f32::MAX as f64, f32::MAX as f64) as f32
    } else if x == f64::INFINITY {
        f32::NAN
    } else if x == f64::NEG_INFINITY {
        f32::NEG_INFINITY
    } else if x > f32::MAX as f64 {
        f32::INFINITY
    } else {
        x.max(-f32::MAX as f64) as f32
    }
}

/// [`rope`] in f64.
fn rope_f64(x: &mut [f64], pos: f64, inv_freq: &[f64]) {
    let half = x.len() / 2;
    for f in 0..half {
        let (s, c) = (pos * inv_freq[f]).sin_cos();
        let (a, b) = (x[f], x[f + half]);
        x[f] = a * c - b * s;
        x[f + half] = b * c + a * s;
    }
}

/// `acc[r] = corr[r]·acc[r] + Σ_j p[r][j]·v_j` over columns `c0..c0 + NV·LANES`, where row
/// `r` sums only over its visible keys `vis[r][0]..vis[r][1]`: a masked key contributes
/// nothing, even where its V holds an infinity or NaN (0·inf would be NaN).
///
/// # Safety
/// `acc` rows (stride `d`) and every `vp[j] + c0..+NV·LANES` in bounds; `p` holds `R` rows
/// of `KEY_BLOCK`; `vis` `R` ranges within `0..nb`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<I: Isa, T: Elem, const R: usize, const NV: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    vp: &[*const T; KEY_BLOCK],
    nb: usize,
    c0: usize,
    pf: &[*const T; KEY_BLOCK],
    np: usize,
) {
    let l = I::LANES;
    // Keys every row sees (`ca..cb`) and keys some row sees (`ua..ub`).
    let (mut ca, mut cb, mut ua, mut ub) = (0, nb, nb, 0);
    for v in &vis[..R] {
        (ca, cb) = (ca.max(v[0]), cb.min(v[1]));
        (ua, ub) = (ua.min(v[0]), ub.max(v[1]));
    }
    let mut a = [[I::zero(); NV]; R];
    for r in 0..R {
        let cr = I::splat(corr[r]);
        for v in 0..NV {
            // SAFETY: in bounds (caller).
            a[r][v] = I::mul(cr, unsafe { I::load::<f32>(acc.add(r * d + c0 + v * l)) });
        }
    }
    for (j, vj) in vp.iter().enumerate().take(nb) {
        prefetch_rows::<I, T>(pf, np, j, 1, c0, c0 + NV * l);
        if j < ua || j >= ub {
            continue;
        }
        let mut vv = [I::zero(); NV];
        for v in 0..NV {
            // SAFETY: in bounds (caller).
            vv[v] = unsafe { I::load::<T>(vj.add(c0 + v * l)) };
        }
        let all = j >= ca && j < cb;
        for (r, ar) in a.iter_mut().enumerate() {
            if !all && (j < vis[r][0] || j >= vis[r][1]) {
                continue;
            }
            let pr = I::splat(p[r * KEY_BLOCK + j]);
            for v in 0..NV {
                ar[v] = I::fma(pr, vv[v], ar[v]);
            }
        }
    }
    prefetch_rows::<I, T>(pf, np, nb, KEY_BLOCK, c0, c0 + NV * l);
    for (r, ar) in a.iter().enumerate() {
        for (v, x) in ar.iter().enumerate() {
            // SAFETY: in bounds (caller).
            unsafe { I::store::<f32>(acc.add(r * d + c0 + v * l), *x) };
        }
    }
}

/// `O = diag(corr)·O + P·V` for all rows and columns, prefetching the rows `pf[..np]` (a
/// later block's) along the way ([`prefetch_rows`]).
///
/// # Safety
/// `acc` holds `rows·d`, `p` `rows·KEY_BLOCK`, `vis` `rows` ranges within `0..nb`, every
/// `vp[j]` (j < nb) `d` readable values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_block<I: Isa, T: Elem, const R: usize, const NV: usize>(
    acc: &mut [f32],
    d: usize,
    rows: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    vp: &[*const T; KEY_BLOCK],
    nb: usize,
    pf: &[*const T; KEY_BLOCK],
    np: usize,
) {
    let wide = NV * I::LANES;
    let mut r0 = 0;
    while r0 < rows {
        // Row tiles of R, then 2 (R > 2), then 1.
        let tr = if r0 + R <= rows {
            R
        } else if R > 2 && r0 + 2 <= rows {
            2
        } else {
            1
        };
        let a = acc[r0 * d..].as_mut_ptr();
        let (cr, pr, vr) = (&corr[r0..], &p[r0 * KEY_BLOCK..], &vis[r0..]);
        let mut c0 = 0;
        // Prefetch during the first row tile only.
        let np = if r0 == 0 { np } else { 0 };
        // SAFETY (all calls): rows r0..r0 + tr and columns c0.. are in bounds (caller).
        unsafe {
            while c0 + wide <= d {
                match tr {
                    1 => pv_tile::<I, T, 1, NV>(a, d, cr, pr, vr, vp, nb, c0, pf, np),
                    2 => pv_tile::<I, T, 2, NV>(a, d, cr, pr, vr, vp, nb, c0, pf, np),
                    _ => pv_tile::<I, T, R, NV>(a, d, cr, pr, vr, vp, nb, c0, pf, np),
                }
                c0 += wide;
            }
            while c0 < d {
                match tr {
                    1 => pv_tile::<I, T, 1, 1>(a, d, cr, pr, vr, vp, nb, c0, pf, np),
                    2 => pv_tile::<I, T, 2, 1>(a, d, cr, pr, vr, vp, nb, c0, pf, np),
                    _ => pv_tile::<I, T, R, 1>(a, d, cr, pr, vr, vp, nb, c0, pf, np),
                }
                c0 += I::LANES;
            }
        }
        r0 += tr;
    }
}

/// Runs work item `w` for KV heads `heads.0..heads.1`.
///
/// The heads are processed block by block together: for each key block, every head of the
/// range computes its scores and accumulates its values before the next block, so a token's
/// K/V rows of all these heads (contiguous in NHD) are consumed while they are in cache,
/// and the cache is streamed once. State (q tile, accumulators, running max and sum) is
/// kept per (head, row): tile row `t = head_index · rows + p`.
///
/// With bf16 microkernels `B` ([`Bf16Tiles::ENABLED`]: an entry point compiled for bf16 dot
/// products), bf16 direct tiles (decode, no RoPE) run on [`Bf16Tiles::s_block`] and
/// [`Bf16Tiles::pv_block`]: q is kept as its bf16 input, K and V are never widened, and the
/// accumulators are in the permuted column order of [`Bf16Tiles::permuted_column`] until
/// the rows are finalised.
#[inline(always)]
pub(crate) fn attend<I: Isa, E: Elem, K: Elem, B: Bf16Tiles>(
    ctx: &Ctx<'_, E, K>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut Scratch,
) {
    let plan = ctx.plan;
    // w < num_work_items and item.request < batch_size by construction of the plan; with
    // `sc.span` > 1 the tile is that many consecutive items (`ctx::mergeable`).
    let item = tile_item(plan, w, sc.span);
    let req = plan.request_at(item.request);
    let heads = plan.heads();
    let (hq, d, g) = (heads.num_qo_heads(), heads.head_dim(), heads.group_size());
    let rows = item.row_end - item.row_start;
    let (h0, nh) = (kv_heads.0, kv_heads.1 - kv_heads.0);
    if rows == 0 || nh == 0 {
        return;
    }
    debug_assert!(d % I::LANES == 0);
    let l = I::LANES;
    let shift = req.kv_len as i64 - req.qo_len as i64;
    let trows = rows * nh;
    sc.prepare(trows, d);
    let direct = rows <= DIRECT_ROWS && !ctx.rope;
    let dp = B::ENABLED && direct && E::DTYPE == DType::BF16 && K::DTYPE == DType::BF16;
    if dp {
        sc.qb.resize(trows * d, 0);
    }

    // Q tiles (rotated, scaled) and the visible key range of each row.
    let mut lo_all = i64::MAX;
    let mut hi_all = i64::MIN;
    for t in 0..trows {
        let (kvh, p) = (h0 + t / rows, t % rows);
        // The score scale folded into q: `sm_scale · k_scale` of the KV head (an FP8
        // cache's K scale, applied once per score rather than per K element).
        let scale = I::splat(ctx.sm_scale * ctx.k_scale[kvh]);
        let packed = item.row_start + p;
        let (i, hh) = (packed / g, kvh * g + packed % g);
        let qrow = &mut sc.q[t * d..(t + 1) * d];
        let src = &ctx.q[ctx.q_off(req.qo_start + i, hh)..][..d];
        if dp {
            // SAFETY: E is bf16 (checked with `dp`), a transparent u16: `src` is d u16s.
            let bits = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, d) };
            sc.qb[t * d..(t + 1) * d].copy_from_slice(bits);
        }
        for c in (0..d).step_by(l) {
            // SAFETY: c + LANES <= d = src.len() = qrow.len().
            unsafe { I::store::<f32>(qrow.as_mut_ptr().add(c), I::load::<E>(src.as_ptr().add(c))) };
        }
        let qpos = i as i64 + shift;
        if ctx.rope {
            rope(qrow, qpos as f64 / ctx.rope_scale as f64, &ctx.inv_freq);
        }
        for c in (0..d).step_by(l) {
            // SAFETY: as above.
            unsafe {
                let x = I::load::<f32>(qrow.as_ptr().add(c));
                I::store::<f32>(qrow.as_mut_ptr().add(c), I::mul(x, scale));
            }
        }
        let hi = if ctx.causal {
            qpos
        } else {
            req.kv_len as i64 - 1
        };
        let lo = ctx.window.map_or(0, |win| qpos - win as i64);
        sc.lo[t] = lo;
        sc.hi[t] = hi;
        sc.slope[t] = if ctx.alibi {
            alibi_slope(hh, hq) as f32
        } else {
            0.0
        };
        sc.qpos[t] = qpos;
        sc.qrow[t] = ctx.q_off(req.qo_start + i, hh);
        lo_all = lo_all.min(lo);
        hi_all = hi_all.max(hi);
    }
    if !direct && prefill::packed::<I>() {
        // Each head's q rows packed once per tile for the S steps (`prefill::pack_q`).
        sc.qt.resize(trows * d, 0.0);
        for hi in 0..nh {
            let span = hi * rows * d..(hi + 1) * rows * d;
            prefill::pack_q::<I>(&sc.q[span.clone()], d, rows, &mut sc.qt[span]);
        }
    }
    let lo_min = sc.lo[..trows].iter().copied().max().unwrap_or(0);
    let hi_min = sc.hi[..trows].iter().copied().min().unwrap_or(-1);
    let start = (item.kv_start as i64).max(lo_all).max(0) as usize;
    let end = ((item.kv_end as i64).min(hi_all.saturating_add(1))).max(start as i64) as usize;
    let (hstride, vhstride) = (ctx.strides.head, ctx.v_strides.head);
    // Offsets are computed for head h0; head h0 + hi is `hi · hstride` further (V:
    // `hi · vhstride`). The whole range of heads of a token must be in bounds: checked
    // through the last head.
    let span = ((nh - 1) * hstride, (nh - 1) * vhstride);

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
        // The next block's rows are fetched while this block is computed. Direct tiles
        // (decode) interleave the fetches with their own loads: while a head computes key
        // j, it prefetches the same head's K and V rows of key j of the next block (the
        // offsets follow the page table, so the fetches cross shuffled pages ahead of the
        // loads). Spread this way the fetches overlap the computation; issued all at once
        // at the block start they filled the miss buffers and stalled it (docs/perf/cpu.md).
        let jn = j0 + nb;
        let nn = if jn < end { KEY_BLOCK.min(end - jn) } else { 0 };
        if nn > 0 {
            ctx.block_offsets(req.kv_start, jn, nn, h0, span, &mut sc.off, &mut sc.voff);
        }
        let (next, vnext) = (sc.off, sc.voff);
        if !direct {
            // Widened tiles (prefill, RoPE) reuse the block's rows from L1 many times: fetch
            // the whole next block up front.
            let row_bytes = d * size_of::<K>();
            for (&o, &vo) in next[..nn].iter().zip(&vnext[..nn]) {
                for hi in 0..nh {
                    let (base, vbase) = (o + hi * hstride, vo + hi * vhstride);
                    for b in (0..row_bytes).step_by(PREFETCH_STRIDE) {
                        let e = b / size_of::<K>();
                        I::prefetch(ctx.k.as_ptr().wrapping_add(base + e));
                        I::prefetch(ctx.v.as_ptr().wrapping_add(vbase + e));
                    }
                }
            }
        }
        let masked = ctx.mask.is_some();
        let jlast = (j0 + nb - 1) as i64;
        let interior = j0 as i64 >= lo_min && jlast <= hi_min;

        for hi in 0..nh {
            let t0 = hi * rows;
            let (hoff, vhoff) = (hi * hstride, hi * vhstride);
            let q = &sc.q[t0 * d..(t0 + rows) * d];
            // This head's rows of the next block, prefetched by the direct microkernels.
            let npk = if direct { nn } else { 0 };
            let mut pfk = [ctx.k.as_ptr(); KEY_BLOCK];
            let mut pfv = [ctx.v.as_ptr(); KEY_BLOCK];
            for ((pk, pv), (&o, &vo)) in pfk
                .iter_mut()
                .zip(pfv.iter_mut())
                .zip(next.iter().zip(&vnext))
            {
                *pk = pk.wrapping_add(o + hoff);
                *pv = pv.wrapping_add(vo + vhoff);
            }
            // S = Q·Kᵀ.
            let s = &mut sc.s[..rows * KEY_BLOCK];
            if dp {
                let mut kp = [ctx.k.as_ptr() as *const u16; KEY_BLOCK];
                let mut pk = [ctx.k.as_ptr() as *const u16; KEY_BLOCK];
                for j in 0..KEY_BLOCK {
                    kp[j] = kp[j].wrapping_add(offs[j] + hoff);
                    pk[j] = pfk[j] as *const u16;
                }
                let qb = &sc.qb[t0 * d..(t0 + rows) * d];
                // SAFETY: E is bf16 (a transparent u16); the first nb offsets plus any head
                // of the range leave d elements in k (checked by block_offsets); the entry
                // point has the bf16 dot-product instruction (`B::ENABLED`).
                unsafe { B::s_block(qb, d, rows, &kp, nb, ctx.sm_scale, s, &pk, npk) };
            } else if direct {
                let mut kp = [ctx.k.as_ptr(); KEY_BLOCK];
                for (p, &o) in kp.iter_mut().zip(&offs) {
                    *p = p.wrapping_add(o + hoff);
                }
                // SAFETY: the first nb offsets plus any head of the range leave d elements
                // in k (checked by block_offsets).
                unsafe { s_dispatch::<I, K>(q, d, rows, &kp, nb, s, &pfk, npk) };
            } else {
                for (jj, (&off, &voff)) in offs[..nb].iter().zip(&voffs[..nb]).enumerate() {
                    let (off, voff) = (off + hoff, voff + vhoff);
                    let krow = &mut sc.k[jj * d..(jj + 1) * d];
                    let vrow = &mut sc.v[jj * d..(jj + 1) * d];
                    let (ks, vs) = (&ctx.k[off..off + d], &ctx.v[voff..voff + d]);
                    for c in (0..d).step_by(l) {
                        // SAFETY: c + LANES <= d for all four rows.
                        unsafe {
                            I::store::<f32>(
                                krow.as_mut_ptr().add(c),
                                I::load::<K>(ks.as_ptr().add(c)),
                            );
                            I::store::<f32>(
                                vrow.as_mut_ptr().add(c),
                                I::load::<K>(vs.as_ptr().add(c)),
                            );
                        }
                    }
                    if ctx.rope {
                        rope(
                            krow,
                            (j0 + jj) as f64 / ctx.rope_scale as f64,
                            &ctx.inv_freq,
                        );
                    }
                }
                if prefill::packed::<I>() {
                    // The block's K rows as a transposed panel, and S on it (`prefill.rs`).
                    prefill::pack_kt(&sc.k, nb, d, &mut sc.kt);
                    let qt = &sc.qt[t0 * d..(t0 + rows) * d];
                    // SAFETY: qt holds rows·d (packed above), kt d·KEY_BLOCK (pack_kt), s
                    // rows·KEY_BLOCK.
                    unsafe { prefill::s_packed::<I>(qt, d, rows, &sc.kt, s) };
                } else {
                    let mut kp = [sc.k.as_ptr(); KEY_BLOCK];
                    for (j, p) in kp.iter_mut().enumerate() {
                        *p = p.wrapping_add(j * d);
                    }
                    // SAFETY: scratch k holds KEY_BLOCK rows of d.
                    unsafe { s_dispatch::<I, f32>(q, d, rows, &kp, nb, s, &kp, 0) };
                }
            }

            // Per row: its visible key range for P·V, and scores that overflowed (or came
            // from non-finite inputs) recomputed exactly. Then the soft-cap over the whole
            // tile; then, per row, ALiBi and masks and the online softmax update, giving P in
            // place of S.
            for p in 0..rows {
                let t = t0 + p;
                let (lo, hi) = (sc.lo[t], sc.hi[t]);
                let mut vis = if interior {
                    [0, nb]
                } else {
                    let a = (lo - j0 as i64).clamp(0, nb as i64) as usize;
                    let b = (hi + 1 - j0 as i64).clamp(a as i64, nb as i64) as usize;
                    [a, b]
                };
                // Custom mask: the visible range shrinks to the first and last keys the mask
                // admits; the masked keys between them (`holes`) get logit -inf and are
                // skipped by P·V like keys of logit -inf.
                let mut holes = 0u32;
                if masked {
                    let i = (sc.qpos[t] - shift) as usize;
                    let hide = ctx.masked_keys(item.request, i, req.kv_len, j0, nb);
                    let seen = range_bits(vis) & !hide;
                    vis = if seen == 0 {
                        [vis[0], vis[0]]
                    } else {
                        let b = KEY_BLOCK - seen.leading_zeros() as usize;
                        [seen.trailing_zeros() as usize, b]
                    };
                    holes = hide & range_bits(vis);
                }
                sc.vis[p] = vis;
                sc.ninf[p] = 0;
                let srow = &mut s[p * KEY_BLOCK..(p + 1) * KEY_BLOCK];
                // Lanes past nb hold stale values: make them finite for the check.
                srow[nb..].fill(0.0);
                let zero = I::zero();
                let mut bad = zero;
                for c in (0..KEY_BLOCK).step_by(l) {
                    // SAFETY: c + LANES <= KEY_BLOCK = srow.len(). `x·0` is NaN exactly
                    // when x is infinite or NaN, and NaN is sticky through the sum.
                    bad = I::fma(unsafe { I::load::<f32>(srow.as_ptr().add(c)) }, zero, bad);
                }
                if I::reduce_add(bad).is_nan() {
                    let (qr, qp) = (sc.qrow[t], sc.qpos[t]);
                    let ks = ctx.k_scale[h0 + t / rows];
                    for jj in vis[0]..vis[1] {
                        if holes >> jj & 1 == 0 && !srow[jj].is_finite() {
                            srow[jj] = exact_score(ctx, qr, qp, offs[jj] + hoff, j0 + jj, ks);
                            if srow[jj] == f32::NEG_INFINITY {
                                sc.ninf[p] |= 1 << jj;
                            }
                        }
                    }
                    // A visible NaN score (non-finite inputs) makes the row NaN, as IEEE
                    // arithmetic does in the reference.
                    if (vis[0]..vis[1]).any(|jj| holes >> jj & 1 == 0 && srow[jj].is_nan()) {
                        sc.l[t] = f32::NAN;
                    }
                }
                sc.holes[p] = holes;
            }
            if let Some(c) = ctx.soft_cap {
                // Every lane of every row (lanes past nb hold 0, set to -inf below), as one
                // stream of independent vectors rather than row by row between the
                // reductions (docs/perf/cpu.md, step 15).
                soft_cap::<I>(s, c);
            }
            let neg = I::splat(f32::NEG_INFINITY);
            for p in 0..rows {
                let t = t0 + p;
                let (vis, holes) = (sc.vis[p], sc.holes[p]);
                let srow = &mut s[p * KEY_BLOCK..(p + 1) * KEY_BLOCK];
                srow[nb..].fill(f32::NEG_INFINITY);
                if ctx.alibi {
                    let (sl, qp) = (sc.slope[t], sc.qpos[t]);
                    for (jj, x) in srow[..nb].iter_mut().enumerate() {
                        *x += sl * ((j0 + jj) as i64 - qp) as f32;
                    }
                }
                if !interior || masked {
                    srow[..vis[0]].fill(f32::NEG_INFINITY);
                    srow[vis[1]..nb].fill(f32::NEG_INFINITY);
                }
                if holes != 0 {
                    let mut h = holes;
                    while h != 0 {
                        srow[h.trailing_zeros() as usize] = f32::NEG_INFINITY;
                        h &= h - 1;
                    }
                    sc.ninf[p] |= holes;
                }
                let mut mv = neg;
                for c in (0..KEY_BLOCK).step_by(l) {
                    // SAFETY: c + LANES <= KEY_BLOCK = srow.len().
                    mv = I::max(mv, unsafe { I::load::<f32>(srow.as_ptr().add(c)) });
                }
                let mb = I::reduce_max(mv);
                let m_old = sc.m[t];
                let m_new = m_old.max(mb);
                if m_new == f32::NEG_INFINITY {
                    // Nothing visible to this row yet: P = 0, the accumulator stays 0.
                    srow.fill(0.0);
                    sc.corr[t] = 1.0;
                    continue;
                }
                if m_new == f32::INFINITY {
                    // Logits past the f32 range (finite inputs; see `exact_score`): the
                    // softmax is the limit, uniform over the +inf scores.
                    let mut n = 0.0;
                    for x in srow.iter_mut() {
                        *x = if *x == f32::INFINITY { 1.0 } else { 0.0 };
                        n += *x;
                    }
                    sc.corr[t] = if m_old == f32::INFINITY { 1.0 } else { 0.0 };
                    sc.m[t] = m_new;
                    sc.l[t] = sc.l[t] * sc.corr[t] + n;
                    continue;
                }
                sc.corr[t] = if m_old == m_new {
                    1.0
                } else {
                    (m_old - m_new).exp()
                };
                sc.m[t] = m_new;
                let (one, negm) = (I::splat(1.0), I::splat(-m_new));
                let mut sum = I::zero();
                for c in (0..KEY_BLOCK).step_by(l) {
                    // SAFETY: as above.
                    unsafe {
                        let e = I::exp(I::fma(I::load::<f32>(srow.as_ptr().add(c)), one, negm));
                        sum = I::fma(e, one, sum);
                        I::store::<f32>(srow.as_mut_ptr().add(c), e);
                    }
                }
                sc.l[t] = sc.l[t] * sc.corr[t] + I::reduce_add(sum);
            }

            // O = diag(corr)·O + P·V.
            let s = &sc.s[..rows * KEY_BLOCK];
            let acc = &mut sc.acc[t0 * d..(t0 + rows) * d];
            let corr = &sc.corr[t0..t0 + rows];
            let vis = &sc.vis[..rows];
            if sc.ninf[..rows].iter().any(|&m| m != 0) {
                // A visible key of logit -inf (infinite inputs): the scalar path skips it.
                for (p, (v, &skip)) in vis.iter().zip(&sc.ninf[..rows]).enumerate() {
                    pv_row_skipping(
                        &mut acc[p * d..(p + 1) * d],
                        corr[p],
                        v[0]..v[1],
                        skip,
                        |j| s[p * KEY_BLOCK + j],
                        ctx.v,
                        |j| voffs[j] + vhoff,
                        |c| if dp { B::permuted_column(c, d) } else { c },
                    );
                }
            } else if dp {
                let mut vp = [ctx.v.as_ptr() as *const u16; KEY_BLOCK];
                let mut pv = [ctx.v.as_ptr() as *const u16; KEY_BLOCK];
                for j in 0..KEY_BLOCK {
                    vp[j] = vp[j].wrapping_add(voffs[j] + vhoff);
                    pv[j] = pfv[j] as *const u16;
                }
                // SAFETY: as for k (block_offsets checks against both); rows <= DIRECT_ROWS.
                unsafe { B::pv_block(acc, d, rows, corr, s, vis, &vp, nb, &pv, npk) };
            } else if direct {
                let mut vp = [ctx.v.as_ptr(); KEY_BLOCK];
                for (p, &o) in vp.iter_mut().zip(&voffs) {
                    *p = p.wrapping_add(o + vhoff);
                }
                // SAFETY: as for k (block_offsets checks against both).
                unsafe { pv_dispatch::<I, K>(acc, d, rows, corr, s, vis, &vp, nb, &pfv, npk) };
            } else if prefill::packed::<I>() {
                // SAFETY: scratch v holds KEY_BLOCK rows of d, vis ranges within 0..nb.
                unsafe { prefill::pv_packed::<I>(acc, d, rows, corr, s, vis, &sc.v, nb) };
            } else {
                let mut vp = [sc.v.as_ptr(); KEY_BLOCK];
                for (j, p) in vp.iter_mut().enumerate() {
                    *p = p.wrapping_add(j * d);
                }
                // SAFETY: scratch v holds KEY_BLOCK rows of d.
                unsafe { pv_dispatch::<I, f32>(acc, d, rows, corr, s, vis, &vp, nb, &vp, 0) };
            }
        }
        j0 = jn;
    }

    finish_rows::<I, E, K>(ctx, w, h0, rows, trows, sc, |c| {
        if dp { B::permuted_column(c, d) } else { c }
    });
}

/// `s ← c·tanh(s/c)` for every value of `s` (a whole number of vectors).
#[inline(always)]
fn soft_cap<I: Isa>(s: &mut [f32], c: f32) {
    let cap = SoftCap::<I>::new(c);
    for x in s.chunks_exact_mut(I::LANES) {
        // SAFETY: a chunk holds LANES values.
        unsafe { I::store::<f32>(x.as_mut_ptr(), cap.apply(I::load::<f32>(x.as_ptr()))) };
    }
}

/// Bits `vis[0]..vis[1]` of a word (`vis[1] <= 32`).
#[inline(always)]
fn range_bits(vis: [usize; 2]) -> u32 {
    let n = vis[1] - vis[0];
    if n == 0 {
        0
    } else if n >= 32 {
        u32::MAX
    } else {
        ((1u32 << n) - 1) << vis[0]
    }
}

/// Normalises the accumulators of tile rows `0..trows` (KV heads from `h0`, `rows` rows each;
/// column `c` of a row at `position(c)` of its accumulator) and writes them, with their
/// LSE, to the output (or to the partial state of a split row).
#[inline(always)]
pub(crate) fn finish_rows<I: Isa, E: Elem, K>(
    ctx: &Ctx<'_, E, K>,
    w: usize,
    h0: usize,
    rows: usize,
    trows: usize,
    sc: &mut Scratch,
    position: impl Fn(usize) -> usize,
) {
    let plan = ctx.plan;
    let item = tile_item(plan, w, sc.span);
    let req = plan.request_at(item.request);
    let heads = plan.heads();
    let (hq, d, g) = (heads.num_qo_heads(), heads.head_dim(), heads.group_size());
    let l = I::LANES;
    for t in 0..trows {
        let (kvh, p) = (h0 + t / rows, t % rows);
        let packed = item.row_start + p;
        let (i, hh) = (packed / g, kvh * g + packed % g);
        let lsum = sc.l[t];
        // Back to the natural column order, through scratch k (free now).
        sc.k.resize(d.max(sc.k.len()), 0.0);
        let src = &sc.acc[t * d..(t + 1) * d];
        for (c, x) in sc.k[..d].iter_mut().enumerate() {
            *x = src[position(c)];
        }
        let acc = &sc.k[..d];
        // An FP8 cache's V scale multiplies the finished row once (1 for a float cache).
        let (inv, lse) = if lsum > 0.0 {
            (ctx.v_scale[kvh] / lsum, sc.m[t] + lsum.ln())
        } else if lsum.is_nan() {
            // A visible NaN score: the row is NaN (IEEE propagation, as the reference).
            (f32::NAN, f32::NAN)
        } else {
            (0.0, f32::NEG_INFINITY)
        };
        // A split row gets its sink after the merge; a finished one here.
        let (inv, lse) = if item.partial.is_none() {
            let (f, lse) = ctx.sink(hh, lse);
            (inv * f, lse)
        } else {
            (inv, lse)
        };
        let inv = I::splat(inv);
        let mut dst_partial = None;
        let mut dst_o = None;
        match item.partial {
            Some(base) => {
                let prow = base + i;
                // SAFETY: (item, kv head) pairs own disjoint partial rows × heads.
                unsafe {
                    dst_partial = Some(ctx.partial_o.slice((prow * hq + hh) * d, d));
                    ctx.partial_lse.slice(prow * hq + hh, 1)[0] = lse;
                }
            }
            None => {
                let row = req.qo_start + i;
                // SAFETY: (item, kv head) pairs of unsplit requests own disjoint rows × heads,
                // whose blocks in o do not overlap (o's strides are checked disjoint).
                unsafe {
                    dst_o = Some(ctx.o.slice(ctx.o_off(row, hh), d));
                    if let Some(l) = &ctx.lse {
                        l.slice(row * hq + hh, 1)[0] = lse;
                    }
                }
            }
        }
        for c in (0..d).step_by(l) {
            // SAFETY: c + LANES <= d, the length of acc and of both destinations. An empty
            // row's accumulator is exactly 0 (masked keys contribute nothing), so 0·0 = 0.
            unsafe {
                let x = I::mul(I::load::<f32>(acc.as_ptr().add(c)), inv);
                if let Some(dp) = dst_partial.as_deref_mut() {
                    I::store::<f32>(dp.as_mut_ptr().add(c), x);
                }
                if let Some(dst) = dst_o.as_deref_mut() {
                    I::store::<E>(dst.as_mut_ptr().add(c), x);
                }
            }
        }
    }
}

/// [`s_block`] with the register blocking of the level.
///
/// # Safety
/// As [`s_block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn s_dispatch<I: Isa, T: Elem>(
    q: &[f32],
    d: usize,
    rows: usize,
    kp: &[*const T; KEY_BLOCK],
    nb: usize,
    s: &mut [f32],
    pf: &[*const T; KEY_BLOCK],
    np: usize,
) {
    // SAFETY: forwarded.
    unsafe {
        if I::LANES >= 16 {
            s_block::<I, T, 4, 4>(q, d, rows, kp, nb, s, pf, np)
        } else {
            s_block::<I, T, 2, 4>(q, d, rows, kp, nb, s, pf, np)
        }
    }
}

/// [`pv_block`] with the register blocking of the level.
///
/// # Safety
/// As [`pv_block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_dispatch<I: Isa, T: Elem>(
    acc: &mut [f32],
    d: usize,
    rows: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    vp: &[*const T; KEY_BLOCK],
    nb: usize,
    pf: &[*const T; KEY_BLOCK],
    np: usize,
) {
    // SAFETY: forwarded.
    unsafe {
        if I::LANES >= 16 {
            pv_block::<I, T, 4, 4>(acc, d, rows, corr, p, vis, vp, nb, pf, np)
        } else {
            pv_block::<I, T, 4, 2>(acc, d, rows, corr, p, vis, vp, nb, pf, np)
        }
    }
}
