//! What every attention kernel shares: the key block, software prefetch along K/V rows, and
//! the interface of optional bf16 dot-product microkernels.

use super::elem::Elem;
use super::simd::Isa;

/// Keys per block: S is `rows × KEY_BLOCK`.
pub(crate) const KEY_BLOCK: usize = 32;

/// Bytes between software prefetches along a K/V row: every cache line (prefetching one
/// line in four and leaving the rest to the hardware was slower, see docs/perf/cpu.md).
pub(crate) const PREFETCH_STRIDE: usize = 64;

/// Prefetches rows `pf[j]` (`j < np`), columns `c0..c1`, for the keys `j0..j0 + n`: the
/// kernels fetch the rows of a later block while they compute one, a few keys at a time, so
/// the fetches are spread over the computation (see docs/perf/cpu.md).
#[inline(always)]
pub(crate) fn prefetch_rows<I: Isa, T>(
    pf: &[*const T; KEY_BLOCK],
    np: usize,
    j0: usize,
    n: usize,
    c0: usize,
    c1: usize,
) {
    let step = (PREFETCH_STRIDE / size_of::<T>()).max(1);
    for p in &pf[j0.min(np)..(j0 + n).min(np)] {
        for c in (c0..c1).step_by(step) {
            I::prefetch(p.wrapping_add(c));
        }
    }
}

/// bf16 microkernels on pair dot products (`vdpbf16ps`) for decode tiles, which use bf16 K
/// and V rows as they lie in the cache. The attend kernel takes an implementation as a type
/// parameter: [`NoBf16`] (every level; the widening path runs) or `dpbf16::Dpbf16`
/// (instantiated only in an entry point compiled for AVX-512 BF16).
pub(crate) trait Bf16Tiles {
    /// True when the microkernels exist: the kernel calls the functions below only then.
    const ENABLED: bool;
    /// `s[r·KEY_BLOCK + j] = scale · q_r·k_j` for all `rows` and the first `nb` keys (q rows
    /// and K rows as bf16 bit patterns), prefetching the rows `pf[..np]` along the way.
    ///
    /// # Safety
    /// `q` holds `rows·d` values; `kp[j]..kp[j] + d` (j < nb) readable; `s` holds
    /// `rows·KEY_BLOCK`; `d % 16 == 0`; the CPU has the instruction and the caller is
    /// compiled for it.
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
    );
    /// `O = diag(corr)·O + P·V` for all rows and the first `nb` keys, accumulating in the
    /// permuted column order of [`Bf16Tiles::permuted_column`] (P rounded to bf16). Row `r`
    /// sums only over its visible keys `vis[r][0]..vis[r][1]` (masked keys contribute
    /// nothing, whatever their V holds).
    ///
    /// # Safety
    /// `acc` holds `rows·d` (rows <= 8), `p` `rows·KEY_BLOCK`, `vis` `rows` ranges within
    /// `0..nb`, every `vp[j]` (j < nb) `d`
    /// readable values; `d % 16 == 0`; the CPU has the instruction and the caller is
    /// compiled for it.
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
    );
    /// The accumulator position of column `c` (of `d`) written by [`Bf16Tiles::pv_block`].
    fn permuted_column(c: usize, d: usize) -> usize;
}

/// No bf16 dot-product microkernels: the kernel widens bf16 to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoBf16;

impl Bf16Tiles for NoBf16 {
    const ENABLED: bool = false;
    unsafe fn s_block(
        _q: &[u16],
        _d: usize,
        _rows: usize,
        _kp: &[*const u16; KEY_BLOCK],
        _nb: usize,
        _scale: f32,
        _s: &mut [f32],
        _pf: &[*const u16; KEY_BLOCK],
        _np: usize,
    ) {
        unreachable!("called only when ENABLED")
    }
    unsafe fn pv_block(
        _acc: &mut [f32],
        _d: usize,
        _rows: usize,
        _corr: &[f32],
        _p: &[f32],
        _vis: &[[usize; 2]],
        _vp: &[*const u16; KEY_BLOCK],
        _nb: usize,
        _pf: &[*const u16; KEY_BLOCK],
        _np: usize,
    ) {
        unreachable!("called only when ENABLED")
    }
    fn permuted_column(c: usize, _d: usize) -> usize {
        c
    }
}

/// `acc = corr·acc + Σ_j p(j)·V_j` for one row over the keys `keys`, except the keys of
/// `skip` (bit `j`): keys whose logit is `-inf` (a visible K of `±inf` against q of the
/// opposite sign) have weight exactly 0 and contribute nothing, like masked ones, whatever
/// their V holds (`0 × inf` would be NaN). Column `c` of V accumulates at `position(c)` of
/// `acc` (the kernel's accumulator order); `voff(j)` is key `j`'s V row in `v`. The scalar
/// path of blocks that have such a key (only infinite inputs produce one).
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_row_skipping<E: Elem>(
    acc: &mut [f32],
    corr: f32,
    keys: std::ops::Range<usize>,
    skip: u32,
    p: impl Fn(usize) -> f32,
    v: &[E],
    voff: impl Fn(usize) -> usize,
    position: impl Fn(usize) -> usize,
) {
    let d = acc.len();
    for x in acc.iter_mut() {
        *x *= corr;
    }
    for j in keys {
        if j < 32 && skip >> j & 1 == 1 {
            continue;
        }
        let pj = p(j);
        let row = &v[voff(j)..][..d];
        for (c, x) in row.iter().enumerate() {
            let a = &mut acc[position(c)];
            *a += pj * x.to_f32();
        }
    }
}
