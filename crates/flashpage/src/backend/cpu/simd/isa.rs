//! The vector primitives every SIMD level implements.

use super::super::elem::Elem;

/// A vector register of `LANES` f32 values and the operations the kernels use.
///
/// Implementations for x86 levels may only be called from code compiled with their target
/// features (the entry points of `dispatch.rs`, reached only after
/// [`super::SimdLevel::is_available`]); the
/// generic kernels are `#[inline(always)]` so they are compiled inside those entry points.
pub(crate) trait Isa: Copy + Send + Sync + 'static {
    /// The register.
    type V: Copy;
    /// f32 lanes per register (head_dim is a multiple of 16, so of every `LANES`).
    const LANES: usize;
    /// All lanes 0.
    fn zero() -> Self::V;
    /// All lanes `x`.
    fn splat(x: f32) -> Self::V;
    /// Loads `LANES` elements at `p`, widened to f32.
    ///
    /// # Safety
    /// `p..p + LANES` must be readable.
    unsafe fn load<E: Elem>(p: *const E) -> Self::V;
    /// Loads `2·LANES` elements at `p` as two registers, widened to f32, in the level's
    /// pair order for `E` ([`Isa::load2_position`]): natural order unless a level has a
    /// cheaper split (AVX2 bf16: even elements, then odd, by one shift and one mask of a
    /// single load — no element widened twice).
    ///
    /// # Safety
    /// `p..p + 2·LANES` must be readable.
    #[inline(always)]
    unsafe fn load2<E: Elem>(p: *const E) -> (Self::V, Self::V) {
        // SAFETY: forwarded from the caller.
        unsafe { (Self::load(p), Self::load(p.add(Self::LANES))) }
    }
    /// Where [`Isa::load2`] puts element `c` of a row loaded in `2·LANES` chunks.
    #[inline(always)]
    fn load2_position<E: Elem>(c: usize) -> usize {
        c
    }
    /// Stores `LANES` values at `p`, rounded to nearest even.
    ///
    /// # Safety
    /// `p..p + LANES` must be writable.
    unsafe fn store<E: Elem>(p: *mut E, v: Self::V);
    /// `a·b + c`.
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a·b`.
    fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum.
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise minimum.
    fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `a / b`.
    fn div(a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes.
    fn reduce_add(v: Self::V) -> f32;
    /// Sums of the lanes of four registers at once (a transposing reduction: fewer shuffles
    /// than four [`Isa::reduce_add`]s).
    #[inline(always)]
    fn reduce_add4(v: [Self::V; 4]) -> [f32; 4] {
        [
            Self::reduce_add(v[0]),
            Self::reduce_add(v[1]),
            Self::reduce_add(v[2]),
            Self::reduce_add(v[3]),
        ]
    }
    /// Maximum of the lanes.
    fn reduce_max(v: Self::V) -> f32;
    /// `exp` of every lane, for lanes `<= 0` (and `-inf`, which gives exactly 0): about
    /// 1 ulp; results below the smallest normal f32 may be flushed to 0.
    fn exp(v: Self::V) -> Self::V;
    /// Hints that the cache line at `p` will be read soon (no effect on results).
    #[inline(always)]
    fn prefetch<T>(_p: *const T) {}
}

/// The logit soft-cap `c·tanh(x/c)` (Gemma-2) of every lane, for a cap `c` of at least the
/// smallest normal f32 (validation's rule).
///
/// `tanh(y) = y·P(y²)/Q(y²)` on `|y| <= 9` (beyond it `tanh` rounds to ±1 in f32), with the
/// degree-4/4 rational function of [`tanhconst`]; `x/c` is clamped to `±9` first (so `±inf`
/// gives `±c`) and the result to `±c`. Relative error at most 3e-7 over the whole
/// range (measured in `dispatch.rs`' tests) plus an absolute `c·2⁻¹⁴⁹` where `x/c` is
/// subnormal; exactly odd (`-0` stays `-0`). A NaN lane gives
/// an unspecified value: the kernels mark a row with a visible NaN score before the cap.
///
/// It replaced `(1 − e)/(1 + e)` with `e = exp(−2|y|)` and an odd polynomial below 1/8: that
/// form's 36 dependent operations per vector held the soft-capped prefill at 15% above the
/// uncapped one; this one has 17 and half the dependency depth (docs/perf/cpu.md, step 15).
#[derive(Clone, Copy)]
pub(crate) struct SoftCap<I: Isa> {
    c: I::V,
    neg_c: I::V,
    inv: I::V,
}

impl<I: Isa> SoftCap<I> {
    /// The cap `c` (finite, at least the smallest normal f32).
    #[inline(always)]
    pub(crate) fn new(c: f32) -> Self {
        SoftCap {
            c: I::splat(c),
            neg_c: I::splat(-c),
            inv: I::splat(1.0 / c),
        }
    }

    /// `c·tanh(x/c)` per lane.
    #[inline(always)]
    pub(crate) fn apply(&self, x: I::V) -> I::V {
        use tanhconst::{CLAMP, P, Q};
        let y = I::min(
            I::splat(CLAMP),
            I::max(I::splat(-CLAMP), I::mul(x, self.inv)),
        );
        let t = I::mul(y, y);
        let (mut p, mut q) = (I::splat(P[4]), I::splat(Q[4]));
        for k in (0..4).rev() {
            p = I::fma(p, t, I::splat(P[k]));
            q = I::fma(q, t, I::splat(Q[k]));
        }
        // c·tanh(y) = (y·P/Q)·c: |y·P/Q| <= 1 (about), so nothing overflows for any cap.
        let out = I::mul(I::mul(y, I::div(p, q)), self.c);
        I::min(self.c, I::max(self.neg_c, out))
    }
}

/// The rational approximation of `tanh(y)/y ≈ P(t)/Q(t)`, `t = y²`, `|y| <= 9`, of
/// [`SoftCap`]: coefficients fitted for this project by an iteratively reweighted linear
/// least-squares (Loeb's method) towards the minimax relative error on 6,000 points of
/// `[0, 9]` against an arbitrary-precision `tanh` (fit error 2e-8; the f32 evaluation's
/// rounding, about 3.4e-7 at most, dominates). `P(0) = Q(0) = 1`: exact near 0.
pub(crate) mod tanhconst {
    /// `x/c` is clamped to `±CLAMP` before the approximation (`tanh(9) = 1 − 3e-8`).
    pub const CLAMP: f32 = 9.0;
    /// Numerator coefficients, degree 0 first.
    pub const P: [f32; 5] = [
        1.0,
        0.133_810_01,
        0.003_495_558_4,
        2.060_858e-5,
        1.335_394_7e-8,
    ];
    /// Denominator coefficients, degree 0 first.
    pub const Q: [f32; 5] = [
        1.0,
        0.467_143_18,
        0.025_876_87,
        3.285_585_6e-4,
        7.776_269_5e-7,
    ];
}

/// The vectorised exp shared by the x86 levels, written over lane-wise helpers: Cody–Waite
/// range reduction `x = n·ln2 + r`, `|r| <= ln2/2`, and the degree-6 minimax polynomial of
/// Cephes' `expf` (about 1 ulp), then `2^n` by exponent arithmetic.
pub(crate) mod expconst {
    /// Below this, `exp(x)` is under the smallest normal f32: the result is 0.
    pub const LO: f32 = -87.336_55;
    /// `log2(e)`.
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// High part of ln 2 (exact in few bits).
    pub const LN2_HI: f32 = 0.693_359_4;
    /// Low part of ln 2.
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Polynomial coefficients, highest degree first.
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
}
