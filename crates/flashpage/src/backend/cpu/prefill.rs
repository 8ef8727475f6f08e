//! Packed microkernels of the widened (prefill) tiles: `S = Q·Kᵀ` on a transposed K panel
//! and `O += P·V` on the widened V rows, register-blocked for the level's register file.
//!
//! The tile kernel (`attend.rs`) widens a key block's K and V rows into f32 scratch once
//! per (block, head) and reuses them for every q row of the tile. Here:
//!
//! - [`pack_kt`] transposes the widened K rows into a panel `kt[c·KEY_BLOCK + j]` (keys
//!   contiguous), once per (block, head), with 8×8 register transposes where the CPU has
//!   AVX (scalar copies elsewhere); keys past the block's end are zero.
//! - [`pack_q`] stores a tile's q rows (one head) in groups of `R` rows, each group
//!   column-major (`R` values of column `c` together), once per tile: the S steps then
//!   broadcast from one pointer at constant offsets. With the rows at a run-time stride `d`
//!   the compiler kept the stride on the stack and reloaded it for every broadcast (5 extra
//!   loads per 12 FMAs on a core that sustains about one 256-bit load per cycle).
//! - [`s_packed`] computes `S` as a small GEMM on that panel: an `R × 2` register tile of
//!   `R` q rows by two vectors of keys, each step one broadcast of `q[r][c]` per row and two
//!   panel loads for `2·R` FMAs, no horizontal reductions (`R` = 6 with 16 registers: 12
//!   accumulators, 2 panel vectors, 1 broadcast; 8 with 32).
//! - [`pv_packed`] accumulates `O = diag(corr)·O + P·V` with an `R × 2` tile of `R` rows by
//!   two vectors of columns (6 × 2 with 16 registers), keys split into the range every row
//!   of the tile sees (no per-row test) and the edges (per-row visible ranges: a masked key
//!   contributes nothing, even where its V holds an infinity or NaN).
//!
//! The results are those of the direct microkernels up to the f32 summation order of the
//! dot products (sequential over the head dimension per lane instead of lane-wise then a
//! reduction tree).

use super::simd::Isa;
use super::tile::KEY_BLOCK;

/// Rows of the `S` and `P·V` register tiles of a level: two vectors of accumulators per
/// row, so `2·R` accumulators plus two operand vectors and one broadcast fit its register
/// file (16 ymm: 6 rows; 32 zmm: 8 rows).
const fn tile_rows(lanes: usize) -> usize {
    if lanes >= 16 { 8 } else { 6 }
}

/// Whether the packed microkernels run at level `I`: levels of 8 lanes (AVX2 and the
/// portable level). AVX-512 keeps the tiles of `attend.rs` (4 × 4 with reductions for S,
/// 4 × 4 for P·V): the packed S with an 8 × 2 tile measured 4–8% slower per CPU-second
/// there (docs/perf/cpu.md, step 10).
pub(crate) const fn packed<I: Isa>() -> bool {
    I::LANES == 8
}

/// Transposes the first `nb` rows of `k` (rows of `d` f32) into `kt[c·KEY_BLOCK + j]`,
/// zero for `j ≥ nb`; `kt` grows to `d·KEY_BLOCK` if shorter.
pub(crate) fn pack_kt(k: &[f32], nb: usize, d: usize, kt: &mut Vec<f32>) {
    if kt.len() < d * KEY_BLOCK {
        kt.resize(d * KEY_BLOCK, 0.0);
    }
    let kt = &mut kt[..d * KEY_BLOCK];
    let nb = nb.min(KEY_BLOCK);
    assert!(k.len() >= nb * d, "pack_kt: k holds fewer than nb rows");
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(8) && std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: AVX detected just above; k holds nb rows of d, kt d·KEY_BLOCK values
            // (both checked above), d % 8 == 0.
            unsafe { pack_kt_avx(k, nb, d, kt) };
            return;
        }
    }
    pack_kt_portable(k, nb, d, kt);
}

/// [`pack_kt`] with scalar copies (`kt.len() == d·KEY_BLOCK`, `nb ≤ KEY_BLOCK`, `k` holds
/// `nb` rows of `d`).
fn pack_kt_portable(k: &[f32], nb: usize, d: usize, kt: &mut [f32]) {
    for c in 0..d {
        let row = &mut kt[c * KEY_BLOCK..(c + 1) * KEY_BLOCK];
        for (j, x) in row.iter_mut().enumerate() {
            *x = if j < nb { k[j * d + c] } else { 0.0 };
        }
    }
}

/// [`pack_kt`] with 8×8 transposes in ymm registers (rows past `nb` read as zero).
///
/// # Safety
/// The CPU has AVX; `k.len() ≥ nb·d`, `kt.len() == d·KEY_BLOCK`, `d % 8 == 0`,
/// `nb ≤ KEY_BLOCK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_kt_avx(k: &[f32], nb: usize, d: usize, kt: &mut [f32]) {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    for j0 in (0..KEY_BLOCK).step_by(8) {
        for c0 in (0..d).step_by(8) {
            let mut r = [zero; 8];
            for (i, ri) in r.iter_mut().enumerate() {
                if j0 + i < nb {
                    // SAFETY: row j0 + i < nb and columns c0..c0 + 8 <= d are in k.
                    *ri = unsafe { _mm256_loadu_ps(k.as_ptr().add((j0 + i) * d + c0)) };
                }
            }
            // Standard 8×8 transpose: unpack pairs, shuffle quads, swap 128-bit halves.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let out = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (i, o) in out.iter().enumerate() {
                // SAFETY: column c0 + i < d, keys j0..j0 + 8 <= KEY_BLOCK: inside kt.
                unsafe { _mm256_storeu_ps(kt.as_mut_ptr().add((c0 + i) * KEY_BLOCK + j0), *o) };
            }
        }
    }
}

/// Rows of the S and P·V tile that starts `left` rows before the end of a head's rows:
/// whole register tiles ([`tile_rows`]), then 4, 2 and 1 ([`s_packed`], [`pack_q`] and
/// [`pv_packed`] tile alike).
const fn group_rows(lanes: usize, left: usize) -> usize {
    let r = tile_rows(lanes);
    if left >= r {
        r
    } else if left >= 4 {
        4
    } else if left >= 2 {
        2
    } else {
        1
    }
}

/// Packs `rows` q rows (f32, stride `d`) for [`s_packed`]: the rows in groups of
/// [`group_rows`], group `r0..r0 + n` at `qt[r0·d..(r0 + n)·d]`, column-major
/// (`qt[r0·d + c·n + r] = q[(r0 + r)·d + c]`).
///
/// # Panics
/// If `q` or `qt` holds fewer than `rows·d` values.
pub(crate) fn pack_q<I: Isa>(q: &[f32], d: usize, rows: usize, qt: &mut [f32]) {
    let (q, qt) = (&q[..rows * d], &mut qt[..rows * d]);
    let mut r0 = 0;
    while r0 < rows {
        let n = group_rows(I::LANES, rows - r0);
        let dst = &mut qt[r0 * d..(r0 + n) * d];
        for r in 0..n {
            let src = &q[(r0 + r) * d..(r0 + r + 1) * d];
            for (c, &x) in src.iter().enumerate() {
                dst[c * n + r] = x;
            }
        }
        r0 += n;
    }
}

/// `s[r·KEY_BLOCK + j] = q_r · k_j` for all `rows` q rows (packed by [`pack_q`] into `qt`)
/// and all `KEY_BLOCK` keys of the panel `kt` ([`pack_kt`]; keys past the block's end give
/// 0).
///
/// # Safety
/// `qt` holds `rows·d`, `kt` `d·KEY_BLOCK`, `s` `rows·KEY_BLOCK` values; `KEY_BLOCK` is a
/// multiple of `2·I::LANES`.
#[inline(always)]
pub(crate) unsafe fn s_packed<I: Isa>(
    qt: &[f32],
    d: usize,
    rows: usize,
    kt: &[f32],
    s: &mut [f32],
) {
    debug_assert!(qt.len() >= rows * d && kt.len() >= d * KEY_BLOCK && s.len() >= rows * KEY_BLOCK);
    let mut r0 = 0;
    while r0 < rows {
        let n = group_rows(I::LANES, rows - r0);
        // SAFETY (all calls): rows r0..r0 + n exist in qt and s (group_rows), kt as the
        // caller.
        unsafe {
            match n {
                8 => s_rows::<I, 8>(qt, d, r0, kt, s),
                6 => s_rows::<I, 6>(qt, d, r0, kt, s),
                4 => s_rows::<I, 4>(qt, d, r0, kt, s),
                2 => s_rows::<I, 2>(qt, d, r0, kt, s),
                _ => s_rows::<I, 1>(qt, d, r0, kt, s),
            }
        }
        r0 += n;
    }
}

/// Rows `r0..r0 + R` of [`s_packed`] (one [`pack_q`] group), two key vectors at a time.
///
/// # Safety
/// As [`s_packed`], with rows `r0..r0 + R` one group of `qt`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
unsafe fn s_rows<I: Isa, const R: usize>(
    qt: &[f32],
    d: usize,
    r0: usize,
    kt: &[f32],
    s: &mut [f32],
) {
    let l = I::LANES;
    let qg = qt.as_ptr().wrapping_add(r0 * d);
    let mut j0 = 0;
    while j0 < KEY_BLOCK {
        let mut acc = [[I::zero(); 2]; R];
        let mut kp = kt.as_ptr().wrapping_add(j0);
        let mut qp = qg;
        for _ in 0..d {
            // SAFETY: column c < d of the panel, keys j0..j0 + 2·LANES <= KEY_BLOCK.
            let (k0, k1) = unsafe { (I::load::<f32>(kp), I::load::<f32>(kp.add(l))) };
            for r in 0..R {
                // SAFETY: qp = qg + c·R for column c < d: row r of column c of the group.
                let qv = I::splat(unsafe { *qp.add(r) });
                acc[r][0] = I::fma(qv, k0, acc[r][0]);
                acc[r][1] = I::fma(qv, k1, acc[r][1]);
            }
            kp = kp.wrapping_add(KEY_BLOCK);
            qp = qp.wrapping_add(R);
        }
        for r in 0..R {
            let dst = s.as_mut_ptr().wrapping_add((r0 + r) * KEY_BLOCK + j0);
            // SAFETY: row r0 + r < rows, keys j0..j0 + 2·LANES <= KEY_BLOCK: inside s.
            unsafe {
                I::store::<f32>(dst, acc[r][0]);
                I::store::<f32>(dst.add(l), acc[r][1]);
            }
        }
        j0 += 2 * l;
    }
}

/// `acc[r] = corr[r]·acc[r] + Σ_j p[r][j]·v_j` for all `rows` (accumulators of stride `d`),
/// where row `r` sums over its visible keys `vis[r][0]..vis[r][1]` (within `0..nb`) of the
/// widened V rows `v` (stride `d`); `p` holds rows of `KEY_BLOCK`.
///
/// # Safety
/// `acc` holds `rows·d`, `corr` and `vis` `rows`, `p` `rows·KEY_BLOCK`, `v` `nb·d` values;
/// `d % I::LANES == 0`; every `vis` range within `0..nb`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv_packed<I: Isa>(
    acc: &mut [f32],
    d: usize,
    rows: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    v: &[f32],
    nb: usize,
) {
    debug_assert!(acc.len() >= rows * d && corr.len() >= rows && vis.len() >= rows);
    debug_assert!(p.len() >= rows * KEY_BLOCK && v.len() >= nb * d);
    let mut r0 = 0;
    while r0 < rows {
        let tr = group_rows(I::LANES, rows - r0);
        let a = acc[r0 * d..].as_mut_ptr();
        let (cr, pr, vr) = (&corr[r0..], &p[r0 * KEY_BLOCK..], &vis[r0..]);
        // SAFETY (all calls): rows r0..r0 + tr are in bounds (tile choice above); the rest
        // as the caller.
        unsafe {
            match tr {
                8 => pv_rows::<I, 8>(a, d, cr, pr, vr, v),
                6 => pv_rows::<I, 6>(a, d, cr, pr, vr, v),
                4 => pv_rows::<I, 4>(a, d, cr, pr, vr, v),
                2 => pv_rows::<I, 2>(a, d, cr, pr, vr, v),
                _ => pv_rows::<I, 1>(a, d, cr, pr, vr, v),
            }
        }
        r0 += tr;
    }
}

/// `R` rows of [`pv_packed`], over all columns: two vectors at a time, then one.
///
/// # Safety
/// As [`pv_packed`] for rows `0..R` of the given slices.
#[inline(always)]
unsafe fn pv_rows<I: Isa, const R: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    v: &[f32],
) {
    // Keys every row sees (`ca..cb`) and keys some row sees (`ua..ub`).
    let (mut ca, mut cb, mut ua, mut ub) = (0, usize::MAX, usize::MAX, 0);
    for w in &vis[..R] {
        (ca, cb) = (ca.max(w[0]), cb.min(w[1]));
        (ua, ub) = (ua.min(w[0]), ub.max(w[1]));
    }
    if ca >= cb {
        // No key common to all rows: every key is an edge key.
        (ca, cb) = (ub, ub);
    }
    let ua = ua.min(ca);
    let l = I::LANES;
    let mut c0 = 0;
    // SAFETY (all calls): columns c0..c0 + NV·LANES <= d (loop bounds); the rest forwarded.
    unsafe {
        while c0 + 2 * l <= d {
            pv_cols::<I, R, 2>(acc, d, corr, p, vis, v, c0, [ua, ca, cb, ub]);
            c0 += 2 * l;
        }
        while c0 < d {
            pv_cols::<I, R, 1>(acc, d, corr, p, vis, v, c0, [ua, ca, cb, ub]);
            c0 += l;
        }
    }
}

/// Columns `c0..c0 + NV·LANES` of `R` rows: keys `ua..ca` and `cb..ub` test each row's
/// visible range, keys `ca..cb` (seen by every row) do not.
///
/// # Safety
/// As [`pv_rows`], with `c0 + NV·LANES ≤ d` and `ua ≤ ca ≤ cb ≤ ub ≤ nb`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // register arrays: explicit indices read best
#[allow(clippy::too_many_arguments)]
unsafe fn pv_cols<I: Isa, const R: usize, const NV: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    p: &[f32],
    vis: &[[usize; 2]],
    v: &[f32],
    c0: usize,
    [ua, ca, cb, ub]: [usize; 4],
) {
    let l = I::LANES;
    let mut a = [[I::zero(); NV]; R];
    for r in 0..R {
        let cr = I::splat(corr[r]);
        for x in 0..NV {
            // SAFETY: row r, columns in bounds (caller).
            a[r][x] = I::mul(cr, unsafe { I::load::<f32>(acc.add(r * d + c0 + x * l)) });
        }
    }
    let vp = v.as_ptr();
    let pp = p.as_ptr();
    for j in ca..cb {
        let mut vv = [I::zero(); NV];
        for x in 0..NV {
            // SAFETY: key j < nb, columns in bounds (caller).
            vv[x] = unsafe { I::load::<f32>(vp.add(j * d + c0 + x * l)) };
        }
        for r in 0..R {
            // SAFETY: row r < R, key j < KEY_BLOCK.
            let pr = I::splat(unsafe { *pp.add(r * KEY_BLOCK + j) });
            for x in 0..NV {
                a[r][x] = I::fma(pr, vv[x], a[r][x]);
            }
        }
    }
    for (e0, e1) in [(ua, ca), (cb, ub)] {
        for j in e0..e1 {
            let mut vv = [I::zero(); NV];
            for x in 0..NV {
                // SAFETY: as above.
                vv[x] = unsafe { I::load::<f32>(vp.add(j * d + c0 + x * l)) };
            }
            for r in 0..R {
                if j < vis[r][0] || j >= vis[r][1] {
                    continue;
                }
                // SAFETY: as above.
                let pr = I::splat(unsafe { *pp.add(r * KEY_BLOCK + j) });
                for x in 0..NV {
                    a[r][x] = I::fma(pr, vv[x], a[r][x]);
                }
            }
        }
    }
    for r in 0..R {
        for x in 0..NV {
            // SAFETY: as the loads.
            unsafe { I::store::<f32>(acc.add(r * d + c0 + x * l), a[r][x]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both packings transpose exactly and zero the keys past the block's end, for every
    /// block length and head dims that are and are not multiples of 8.
    #[test]
    fn pack_kt_transposes_and_zero_fills() {
        for d in [8, 16, 64, 80, 128, 12] {
            for nb in [1, 7, 8, 9, 31, 32] {
                let k: Vec<f32> = (0..nb * d).map(|i| (i as f32) * 0.5 - 3.0).collect();
                let mut fast = vec![f32::NAN; 3];
                pack_kt(&k, nb, d, &mut fast);
                let mut slow = vec![f32::NAN; d * KEY_BLOCK];
                pack_kt_portable(&k, nb, d, &mut slow);
                for c in 0..d {
                    for j in 0..KEY_BLOCK {
                        let want = if j < nb { k[j * d + c] } else { 0.0 };
                        assert_eq!(fast[c * KEY_BLOCK + j], want, "d {d} nb {nb} ({c}, {j})");
                        assert_eq!(slow[c * KEY_BLOCK + j], want, "d {d} nb {nb} ({c}, {j})");
                    }
                }
            }
        }
    }

    /// `s_packed` on q packed by `pack_q` gives every dot product (f64 check), for every
    /// row count up to three tiles and its tail groups, at the portable level and AVX2.
    fn check_s_packed<I: Isa>() {
        let d = 16;
        for rows in 1..=19 {
            let q: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7 % 13) as f32) * 0.25 - 1.5)
                .collect();
            let k: Vec<f32> = (0..KEY_BLOCK * d)
                .map(|i| ((i * 5 % 11) as f32) * 0.5 - 2.0)
                .collect();
            let mut kt = Vec::new();
            pack_kt(&k, KEY_BLOCK, d, &mut kt);
            let mut qt = vec![f32::NAN; rows * d];
            pack_q::<I>(&q, d, rows, &mut qt);
            let mut s = vec![f32::NAN; rows * KEY_BLOCK];
            // SAFETY: sizes as s_packed asks; KEY_BLOCK is a multiple of 2·LANES.
            unsafe { s_packed::<I>(&qt, d, rows, &kt, &mut s) };
            for r in 0..rows {
                for j in 0..KEY_BLOCK {
                    let want: f64 = (0..d)
                        .map(|c| q[r * d + c] as f64 * k[j * d + c] as f64)
                        .sum();
                    assert_eq!(s[r * KEY_BLOCK + j] as f64, want, "rows {rows} ({r}, {j})");
                }
            }
        }
    }

    #[test]
    fn s_packed_computes_every_score_of_packed_q() {
        check_s_packed::<crate::backend::cpu::simd::Scalar>();
        #[cfg(target_arch = "x86_64")]
        if crate::backend::cpu::SimdLevel::Avx2.is_available() {
            // SAFETY: AVX2 and FMA detected just above.
            unsafe {
                crate::backend::cpu::dispatch::run_avx2(
                    check_s_packed::<crate::backend::cpu::simd::Avx2>,
                )
            };
        }
    }
}
