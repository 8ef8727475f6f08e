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

use super::super::attend::{KEY_BLOCK, prefetch_rows};
use super::Isa;
use super::avx512::Avx512;

/// The accumulator position of column `c` of a row of `d` columns: columns are grouped in
/// chunks of 32 (a last chunk of 16 where `d % 32 == 16`); inside a chunk of width `w`,
/// storage `[0, w/2)` holds the `unpacklo` columns and `[w/2, w)` the `unpackhi` ones,
/// each 128-bit lane of 4 pairs covering 8 consecutive columns.
#[inline(always)]
pub(crate) fn permuted_column(c: usize, d: usize) -> usize {
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

/// Raw dot products of `R` q rows (bf16, stride `d`) with `C` key rows.
///
/// # Safety
/// `q..q + R·d` and every `kp[j]..kp[j] + d` (j < C) readable; `d % 16 == 0`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
unsafe fn s_tile<const R: usize, const C: usize>(
    q: *const u16,
    d: usize,
    kp: &[*const u16],
) -> [[f32; C]; R] {
    // SAFETY (all intrinsics): avx512bf16 context (module contract).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut c = 0;
        while c < d {
            let half = c + 32 > d;
            let mut kv = [_mm512_setzero_si512(); C];
            for j in 0..C {
                // SAFETY: c + 16 (c + 32 unless half) <= d (caller).
                kv[j] = load32(kp[j].add(c), half);
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let qv = bh512(load32(q.add(r * d + c), half));
                for j in 0..C {
                    accr[j] = _mm512_dpbf16_ps(accr[j], qv, bh512(kv[j]));
                }
            }
            c += 32;
        }
        let mut out = [[0.0; C]; R];
        for r in 0..R {
            let mut j = 0;
            while j + 4 <= C {
                let s4 =
                    Avx512::reduce_add4([acc[r][j], acc[r][j + 1], acc[r][j + 2], acc[r][j + 3]]);
                out[r][j..j + 4].copy_from_slice(&s4);
                j += 4;
            }
            while j < C {
                out[r][j] = Avx512::reduce_add(acc[r][j]);
                j += 1;
            }
        }
        out
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn s_rows<const R: usize>(
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
    let mut j0 = 0;
    while j0 + 4 <= nb {
        if r0 == 0 {
            prefetch_rows::<Avx512, u16>(pf, np, j0, 4, 0, d);
        }
        // SAFETY: forwarded from the caller.
        let t = unsafe { s_tile::<R, 4>(q, d, &kp[j0..]) };
        for (r, tr) in t.iter().enumerate() {
            for (x, y) in s[(r0 + r) * KEY_BLOCK + j0..][..4].iter_mut().zip(tr) {
                *x = y * scale;
            }
        }
        j0 += 4;
    }
    if r0 == 0 {
        prefetch_rows::<Avx512, u16>(pf, np, j0, KEY_BLOCK, 0, d);
    }
    while j0 < nb {
        // SAFETY: forwarded from the caller.
        let t = unsafe { s_tile::<R, 1>(q, d, &kp[j0..]) };
        for (r, tr) in t.iter().enumerate() {
            s[(r0 + r) * KEY_BLOCK + j0] = tr[0] * scale;
        }
        j0 += 1;
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
pub(crate) unsafe fn s_block(
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
        unsafe { s_rows::<4>(q.as_ptr().add(r0 * d), d, r0, kp, nb, scale, s, pf, np) };
        r0 += 4;
    }
    if r0 + 2 <= rows {
        // SAFETY: as above.
        unsafe { s_rows::<2>(q.as_ptr().add(r0 * d), d, r0, kp, nb, scale, s, pf, np) };
        r0 += 2;
    }
    while r0 < rows {
        // SAFETY: as above.
        unsafe { s_rows::<1>(q.as_ptr().add(r0 * d), d, r0, kp, nb, scale, s, pf, np) };
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

/// `O = diag(corr)·O + P·V` for all rows and the first `nb` keys, in the permuted column
/// order; P is rounded to bf16 (`p[r·KEY_BLOCK + j]`, zero for `j >= nb`). The rows
/// `pf[..np]` (a later block's) are prefetched along the way, each column range once.
///
/// # Safety
/// `acc` holds `rows·d`, `p` `rows·KEY_BLOCK` (at most 8 rows), every `vp[j]` (j < nb) `d`
/// readable values; `d % 16 == 0`; avx512bf16 context.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv_block(
    acc: &mut [f32],
    d: usize,
    rows: usize,
    corr: &[f32],
    p: &[f32],
    vp: &[*const u16; KEY_BLOCK],
    nb: usize,
    pf: &[*const u16; KEY_BLOCK],
    np: usize,
) {
    const MAX_ROWS: usize = 8;
    assert!(rows <= MAX_ROWS && acc.len() >= rows * d && p.len() >= rows * KEY_BLOCK);
    let mut pp = [[0u32; KEY_BLOCK / 2]; MAX_ROWS];
    for (r, ppr) in pp.iter_mut().enumerate().take(rows) {
        // SAFETY: p holds KEY_BLOCK = 32 values per row; ppr holds 64 bytes.
        unsafe {
            let lo = _mm512_loadu_ps(p.as_ptr().add(r * KEY_BLOCK));
            let hi = _mm512_loadu_ps(p.as_ptr().add(r * KEY_BLOCK + 16));
            let b = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(ppr.as_mut_ptr() as *mut __m512i, b);
        }
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
