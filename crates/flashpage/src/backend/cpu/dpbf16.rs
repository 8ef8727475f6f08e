//! bf16 microkernels on `vdpbf16ps` (AVX-512 BF16): each instruction multiplies 16 pairs of
//! bf16 values and adds both products into 16 f32 lanes, so bf16 K and V rows are used as
//! they lie in the cache, without widening.
//!
//! - `S = Q·Kᵀ`: q rows (the unrotated bf16 input) and K rows are both read as pairs; the
//!   f32 dots are scaled by `sm_scale` afterwards.
//! - `O += P·V`: two V rows (keys `j`, `j + 1`) are interleaved with `vpunpck{l,h}wd` into
//!   bf16 pairs and multiplied by the pair `(p_j, p_{j+1})` rounded to bf16. The interleave
//!   works within 128-bit lanes, so the accumulators hold a *permuted* column order
//!   ([`permuted_column`]); the kernel un-permutes each row once, when it finalises.
//!
//! Everything here must be reached only from code compiled with `avx512bf16` (and the
//! AVX-512 level's features), after detection.

use std::arch::x86_64::*;

use super::simd::Avx512;
use super::tile::{Bf16Tiles, KEY_BLOCK, prefetch_rows};

/// The [`Bf16Tiles`] of this file; instantiate the attend kernel with it only in an entry
/// point compiled for AVX-512 BF16.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dpbf16;

impl Bf16Tiles for Dpbf16 {
    const ENABLED: bool = true;
    #[inline(always)]
    unsafe fn s_block(
        q: &[u16],
        d: usize,
        rows: usize,
        kp: &[*const u16; KEY_BLOCK],
        nb: usize,
        scale: f32,
        s: &mut [f32],
        pf: &[*const u16; KEY_BLOCK],
        np: usize,
    ) {
        // SAFETY: forwarded (the trait's contract is the function's).
        unsafe { s_block(q, d, rows, kp, nb, scale, s, pf, np) }
    }
    #[inline(always)]
    unsafe fn pv_block(
        acc: &mut [f32],
        d: usize,
        rows: usize,
        corr: &[f32],
        p: &[f32],
        vis: &[[usize; 2]],
        vp: &[*const u16; KEY_BLOCK],
        nb: usize,
        pf: &[*const u16; KEY_BLOCK],
        np: usize,
    ) {
        // SAFETY: forwarded (the trait's contract is the function's).
        unsafe { pv_block(acc, d, rows, corr, p, vis, vp, nb, pf, np) }
    }
    #[inline(always)]
    fn permuted_column(c: usize, d: usize) -> usize {
        permuted_column(c, d)
    }
}

/// The accumulator position of column `c` of a row of `d` columns: columns are grouped in
/// chunks of 32 (a last chunk of 16 where `d % 32 == 16`); inside a chunk of width `w`,
/// storage `[0, w/2)` holds the `unpacklo` columns and `[w/2, w)` the `unpackhi` ones,
/// each 128-bit lane of 4 pairs covering 8 consecutive columns.
#[inline(always)]
fn permuted_column(c: usize, d: usize) -> usize {
    let c0 = c - c % 32;
    let w = if c0 + 32 <= d { 32 } else { 16 };
    let x = c - c0; // column inside the chunk
    let (lane, half, m) = (x / 8, (x % 8) / 4, x % 4);
    c0 + half * (w / 2) + lane * 4 + m
}

/// Reinterprets 32 bf16 bit patterns as the `vdpbf16ps` operand type.
#[inline(always)]
fn bh512(x: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte plain vectors of the same bits.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

/// As [`bh512`] for 16 values.
#[inline(always)]
fn bh256(x: __m256i) -> __m256bh {
    // SAFETY: both are 32-byte plain vectors of the same bits.
    unsafe { std::mem::transmute::<__m256i, __m256bh>(x) }
}

/// Loads 32 bf16 values at `p` (16 when `half`, the upper 16 lanes then zero).
///
/// # Safety
/// `p..p + 32` (`p..p + 16` when `half`) readable; avx512bf16 context.
#[inline(always)]
unsafe fn load32(p: *const u16, half: bool) -> __m512i {
    // SAFETY: forwarded from the caller.
    unsafe {
        if half {
            _mm512_zextsi256_si512(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_si512(p as *const __m512i)
        }
    }
}

/// Sums each of 16 vectors: lane `i` of `out[0]` is the sum of the lanes of `v[i]`, lane
/// `i` of `out[1]` that of `v[8 + i]`.
///
/// Each vector is first folded to 256 bits (extract, add); the 16 halves then go through a
/// transpose-reduce tree at 256-bit width (half the cost of 512-bit shuffles on cores that
/// split them), each step folding two vectors into one with one shuffle, one blend and one
/// addition. 30 shuffles of 256 bits for 16 sums, against 28 of 512 bits for four
/// `reduce_add4`.
///
/// # Safety
/// AVX-512 F context.
#[inline(always)]
unsafe fn reduce16(v: &[__m512; 16]) -> [__m256; 2] {
    // SAFETY (all intrinsics): AVX-512 F context (caller).
    unsafe {
        let mut h = [_mm256_setzero_ps(); 16];
        for i in 0..16 {
            h[i] = _mm256_add_ps(
                _mm512_castps512_ps256(v[i]),
                _mm512_extractf32x8_ps::<1>(v[i]),
            );
        }
        let mut out = [_mm256_setzero_ps(); 2];
        for k in 0..2 {
            // 128-bit halves: u[m] = [dot 8k + m, dot 8k + m + 4] (4 partials each).
            let mut u = [_mm256_setzero_ps(); 4];
            for m in 0..4 {
                let (a, b) = (h[8 * k + m], h[8 * k + m + 4]);
                let x = _mm256_blend_ps::<0b1111_0000>(a, b); // [a.lo, b.hi]
                let y = _mm256_permute2f128_ps::<0x21>(a, b); // [a.hi, b.lo]
                u[m] = _mm256_add_ps(x, y);
            }
            // 64-bit pairs: t[m] block c = [dot 8k + m + 4c (2), dot 8k + m + 2 + 4c (2)].
            let mut t = [_mm256_setzero_ps(); 2];
            for m in 0..2 {
                let (a, b) = (u[m], u[m + 2]);
                let x = _mm256_blend_ps::<0b1100_1100>(a, b); // [a0, a1, b2, b3]
                let y = _mm256_shuffle_ps::<0b01_00_11_10>(a, b); // [a2, a3, b0, b1]
                t[m] = _mm256_add_ps(x, y);
            }
            // Single lanes: lane 4c + m = dot 8k + 4c + m.
            let (a, b) = (t[0], t[1]);
            let x = _mm256_blend_ps::<0b1010_1010>(a, b); // [a0, b1, a2, b3]
            let z = _mm256_blend_ps::<0b1010_1010>(b, a); // [b0, a1, b2, a3]
            let y = _mm256_permute_ps::<0b10_11_00_01>(z); // [a1, b0, a3, b2]
            out[k] = _mm256_add_ps(x, y);
        }
        out
    }
}

/// `s[r·KEY_BLOCK + j0 + j] = scale · q_r·k_j` for `R` q rows (bf16, stride `d`) and the
/// `C = 16 / R` key rows `kp[..C]`: the 16 dot products are reduced together by
/// [`reduce16`] and scaled in one vector.
///
/// # Safety
/// `q..q + R·d` and every `kp[j]..kp[j] + d` (j < C) readable; `d % 16 == 0`; `s` holds
/// `R·KEY_BLOCK` values and `j0 + C <= KEY_BLOCK`; avx512bf16 context.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
unsafe fn s_tile<const R: usize, const C: usize>(
    q: *const u16,
    d: usize,
    kp: &[*const u16],
    scale: __m256,
    s: *mut f32,
    j0: usize,
) {
    const { assert!(R * C == 16) };
    // SAFETY (all intrinsics and pointer arithmetic): in bounds (caller); avx512bf16
    // context (module contract).
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut c = 0;
        while c < d {
            let half = c + 32 > d;
            let mut kv = [_mm512_setzero_si512(); C];
            for j in 0..C {
                // c + 16 (c + 32 unless half) <= d (caller).
                kv[j] = load32(kp[j].add(c), half);
            }
            for r in 0..R {
                let qv = bh512(load32(q.add(r * d + c), half));
                for j in 0..C {
                    acc[r * C + j] = _mm512_dpbf16_ps(acc[r * C + j], qv, bh512(kv[j]));
                }
            }
            c += 32;
        }
        // Lane j of x[i] is dot 8i + j of the tile: row (8i + j) / C, key (8i + j) % C.
        let r16 = reduce16(&acc);
        let x = [_mm256_mul_ps(r16[0], scale), _mm256_mul_ps(r16[1], scale)];
        match R {
            1 => {
                _mm256_storeu_ps(s.add(j0), x[0]);
                _mm256_storeu_ps(s.add(j0 + 8), x[1]);
            }
            2 => {
                _mm256_storeu_ps(s.add(j0), x[0]);
                _mm256_storeu_ps(s.add(KEY_BLOCK + j0), x[1]);
            }
            _ => {
                for (i, xi) in x.iter().enumerate() {
                    let r = s.add(2 * i * KEY_BLOCK + j0);
                    _mm_storeu_ps(r, _mm256_castps256_ps128(*xi));
                    _mm_storeu_ps(r.add(KEY_BLOCK), _mm256_extractf128_ps::<1>(*xi));
                }
            }
        }
    }
}

/// S for the `R` rows from `r0`, `C = 16 / R` keys per tile. A last partial tile repeats
/// the block's last key: its extra scores land in slots `nb..KEY_BLOCK` of the rows, which
/// the caller masks.
///
/// # Safety
/// As [`s_block`] for rows `r0..r0 + R`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn s_rows<const R: usize, const C: usize>(
    q: *const u16,
    d: usize,
    r0: usize,
    kp: &[*const u16; KEY_BLOCK],
    nb: usize,
    scale: f32,
    s: &mut [f32],
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    debug_assert!(nb >= 1 && s.len() >= (r0 + R) * KEY_BLOCK);
    // SAFETY: AVX-512 F context (caller).
    let sv = unsafe { _mm256_set1_ps(scale) };
    let sp = s[r0 * KEY_BLOCK..].as_mut_ptr();
    let mut j0 = 0;
    while j0 < nb {
        if r0 == 0 {
            prefetch_rows::<Avx512, u16>(pf, np, j0, C, 0, d);
        }
        let mut kt = [kp[nb - 1]; C];
        for (j, k) in kt.iter_mut().enumerate().take(nb - j0) {
            *k = kp[j0 + j];
        }
        // SAFETY: keys j0..min(j0 + C, nb) and the repeated key nb - 1 are readable
        // (caller); j0 + C <= KEY_BLOCK since C divides KEY_BLOCK and j0 < nb.
        unsafe { s_tile::<R, C>(q, d, &kt, sv, sp, j0) };
        j0 += C;
    }
    if r0 == 0 {
        prefetch_rows::<Avx512, u16>(pf, np, j0, KEY_BLOCK, 0, d);
    }
}

/// `s[r·KEY_BLOCK + j] = scale · q_r·k_j` for all `rows` and the first `nb` keys,
/// prefetching the rows `pf[..np]` (a later block's) one key per key computed.
///
/// # Safety
/// `q` holds `rows·d` values; every `kp[j]..kp[j] + d` (j < nb) readable; `d % 16 == 0`;
/// `s` holds `rows·KEY_BLOCK` values; avx512bf16 context.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn s_block(
    q: &[u16],
    d: usize,
    rows: usize,
    kp: &[*const u16; KEY_BLOCK],
    nb: usize,
    scale: f32,
    s: &mut [f32],
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    debug_assert!(q.len() >= rows * d && s.len() >= rows * KEY_BLOCK);
    let mut r0 = 0;
    while r0 + 4 <= rows {
        // SAFETY: rows r0..r0 + 4 exist in q.
        unsafe { s_rows::<4, 4>(q.as_ptr().add(r0 * d), d, r0, kp, nb, scale, s, pf, np) };
        r0 += 4;
    }
    if r0 + 2 <= rows {
        // SAFETY: as above.
        unsafe { s_rows::<2, 8>(q.as_ptr().add(r0 * d), d, r0, kp, nb, scale, s, pf, np) };
        r0 += 2;
    }
    while r0 < rows {
        // SAFETY: as above.
        unsafe { s_rows::<1, 16>(q.as_ptr().add(r0 * d), d, r0, kp, nb, scale, s, pf, np) };
        r0 += 1;
    }
}

/// `acc[r] = corr[r]·acc[r] + Σ_j p[r][j]·v_j` over the permuted columns of the `NV`
/// 32-column chunks from `c0` (`pp`: per row, the bf16 pairs `(p_2i, p_2i+1)`).
///
/// # Safety
/// `acc` rows (stride `d`) and every `vp[j] + c0..+32·NV` (j < nb) in bounds.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<const R: usize, const NV: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    pp: &[[u32; KEY_BLOCK / 2]],
    vp: &[*const u16; KEY_BLOCK],
    nb: usize,
    c0: usize,
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    // SAFETY (all intrinsics and pointer arithmetic): in bounds (caller); avx512bf16
    // context (module contract).
    unsafe {
        let mut a = [[[_mm512_setzero_ps(); 2]; NV]; R];
        for r in 0..R {
            let cr = _mm512_set1_ps(corr[r]);
            for v in 0..NV {
                for h in 0..2 {
                    let x = _mm512_loadu_ps(acc.add(r * d + c0 + 32 * v + 16 * h));
                    a[r][v][h] = _mm512_mul_ps(cr, x);
                }
            }
        }
        let mut j = 0;
        while j < nb {
            prefetch_rows::<Avx512, u16>(pf, np, j, 2, c0, c0 + 32 * NV);
            let mut vv = [[_mm512_setzero_si512(); 2]; NV];
            for v in 0..NV {
                let x = _mm512_loadu_si512(vp[j].add(c0 + 32 * v) as *const __m512i);
                let y = if j + 1 < nb {
                    _mm512_loadu_si512(vp[j + 1].add(c0 + 32 * v) as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                };
                vv[v] = [_mm512_unpacklo_epi16(x, y), _mm512_unpackhi_epi16(x, y)];
            }
            for r in 0..R {
                let pr = bh512(_mm512_set1_epi32(pp[r][j / 2] as i32));
                for v in 0..NV {
                    for h in 0..2 {
                        a[r][v][h] = _mm512_dpbf16_ps(a[r][v][h], pr, bh512(vv[v][h]));
                    }
                }
            }
            j += 2;
        }
        prefetch_rows::<Avx512, u16>(pf, np, j, KEY_BLOCK, c0, c0 + 32 * NV);
        for r in 0..R {
            for v in 0..NV {
                for h in 0..2 {
                    _mm512_storeu_ps(acc.add(r * d + c0 + 32 * v + 16 * h), a[r][v][h]);
                }
            }
        }
    }
}

/// As [`pv_tile`] for the last 16 columns `c0..c0 + 16` of rows with `d % 32 == 16`.
///
/// # Safety
/// As [`pv_tile`].
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tail16<const R: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    pp: &[[u32; KEY_BLOCK / 2]],
    vp: &[*const u16; KEY_BLOCK],
    nb: usize,
    c0: usize,
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    // SAFETY (all intrinsics and pointer arithmetic): in bounds (caller); avx512bf16
    // context (module contract).
    unsafe {
        prefetch_rows::<Avx512, u16>(pf, np, 0, KEY_BLOCK, c0, c0 + 16);
        let mut a = [[_mm256_setzero_ps(); 2]; R];
        for r in 0..R {
            let cr = _mm256_set1_ps(corr[r]);
            for h in 0..2 {
                a[r][h] = _mm256_mul_ps(cr, _mm256_loadu_ps(acc.add(r * d + c0 + 8 * h)));
            }
        }
        let mut j = 0;
        while j < nb {
            let x = _mm256_loadu_si256(vp[j].add(c0) as *const __m256i);
            let y = if j + 1 < nb {
                _mm256_loadu_si256(vp[j + 1].add(c0) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let vv = [_mm256_unpacklo_epi16(x, y), _mm256_unpackhi_epi16(x, y)];
            for r in 0..R {
                let pr = bh256(_mm256_set1_epi32(pp[r][j / 2] as i32));
                for h in 0..2 {
                    a[r][h] = _mm256_dpbf16_ps(a[r][h], pr, bh256(vv[h]));
                }
            }
            j += 2;
        }
        for r in 0..R {
            for h in 0..2 {
                _mm256_storeu_ps(acc.add(r * d + c0 + 8 * h), a[r][h]);
            }
        }
    }
}

/// Runs the column passes of one tile of `R` rows.
///
/// # Safety
/// As [`pv_tile`] for all columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<const R: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    pp: &[[u32; KEY_BLOCK / 2]],
    vp: &[*const u16; KEY_BLOCK],
    nb: usize,
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    let mut c0 = 0;
    // SAFETY (all calls): columns c0.. in bounds (checked by the loop conditions).
    unsafe {
        while c0 + 64 <= d {
            pv_tile::<R, 2>(acc, d, corr, pp, vp, nb, c0, pf, np);
            c0 += 64;
        }
        if c0 + 32 <= d {
            pv_tile::<R, 1>(acc, d, corr, pp, vp, nb, c0, pf, np);
            c0 += 32;
        }
        if c0 < d {
            pv_tail16::<R>(acc, d, corr, pp, vp, nb, c0, pf, np);
        }
    }
}

/// Row `p[..KEY_BLOCK]` as bf16 pairs `(p_2i, p_2i+1)`, rounded to nearest even.
///
/// # Safety
/// `p` holds at least `KEY_BLOCK` values; avx512bf16 context.
#[inline(always)]
unsafe fn bf16_pairs(p: &[f32]) -> [u32; KEY_BLOCK / 2] {
    assert!(p.len() >= KEY_BLOCK);
    let mut out = [0u32; KEY_BLOCK / 2];
    // SAFETY: p holds KEY_BLOCK = 32 values; out holds 64 bytes; avx512bf16 (caller).
    unsafe {
        let lo = _mm512_loadu_ps(p.as_ptr());
        let hi = _mm512_loadu_ps(p.as_ptr().add(16));
        let b = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, b);
    }
    out
}

/// `O = diag(corr)·O + P·V` for all rows and the first `nb` keys, in the permuted column
/// order; P is rounded to bf16 (`p[r·KEY_BLOCK + j]`, zero for `j >= nb`). The rows
/// `pf[..np]` (a later block's) are prefetched along the way, each column range once.
///
/// Row `r` sums only over its visible keys `vis[r][0]..vis[r][1]`: where rows see different
/// keys (a mask edge inside the block), each row runs alone over its own keys, so a masked
/// key's V (maybe infinite or NaN) never meets the zero weight of another row's pair.
///
/// # Safety
/// `acc` holds `rows·d`, `p` `rows·KEY_BLOCK` (at most 8 rows), `vis` `rows` ranges within
/// `0..nb`, every `vp[j]` (j < nb) `d` readable values; `d % 16 == 0`; avx512bf16 context.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_block(
    acc: &mut [f32],
    d: usize,
    rows: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    vp: &[*const u16; KEY_BLOCK],
    nb: usize,
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    const MAX_ROWS: usize = 8;
    assert!(rows <= MAX_ROWS && acc.len() >= rows * d && p.len() >= rows * KEY_BLOCK);
    assert!(vis.len() >= rows && vis[..rows].iter().all(|v| v[0] <= v[1] && v[1] <= nb));
    if vis[..rows].iter().any(|v| *v != [0, nb]) {
        for r in 0..rows {
            let [a, b] = vis[r];
            let mut pr = [0.0f32; KEY_BLOCK];
            pr[..b - a].copy_from_slice(&p[r * KEY_BLOCK + a..r * KEY_BLOCK + b]);
            let mut vr = [vp[0]; KEY_BLOCK];
            vr[..b - a].copy_from_slice(&vp[a..b]);
            let np = if r == 0 { np } else { 0 };
            // SAFETY: row r is in bounds; keys a..b of the block are readable (caller);
            // avx512bf16 context (caller).
            unsafe {
                let pp = [bf16_pairs(&pr)];
                let at = acc.as_mut_ptr().add(r * d);
                pv_rows::<1>(at, d, &corr[r..], &pp, &vr, b - a, pf, np);
            }
        }
        return;
    }
    let mut pp = [[0u32; KEY_BLOCK / 2]; MAX_ROWS];
    for (r, ppr) in pp.iter_mut().enumerate().take(rows) {
        // SAFETY: p holds KEY_BLOCK values per row; avx512bf16 context (caller).
        *ppr = unsafe { bf16_pairs(&p[r * KEY_BLOCK..]) };
    }
    let mut r0 = 0;
    // SAFETY (all calls): rows r0.. in bounds (loop conditions), columns as the caller's.
    unsafe {
        while r0 + 4 <= rows {
            let a = acc.as_mut_ptr().add(r0 * d);
            pv_rows::<4>(
                a,
                d,
                &corr[r0..],
                &pp[r0..],
                vp,
                nb,
                pf,
                if r0 == 0 { np } else { 0 },
            );
            r0 += 4;
        }
        if r0 + 2 <= rows {
            let a = acc.as_mut_ptr().add(r0 * d);
            let np = if r0 == 0 { np } else { 0 };
            pv_rows::<2>(a, d, &corr[r0..], &pp[r0..], vp, nb, pf, np);
            r0 += 2;
        }
        while r0 < rows {
            let a = acc.as_mut_ptr().add(r0 * d);
            pv_rows::<1>(
                a,
                d,
                &corr[r0..],
                &pp[r0..],
                vp,
                nb,
                pf,
                if r0 == 0 { np } else { 0 },
            );
            r0 += 1;
        }
    }
}
