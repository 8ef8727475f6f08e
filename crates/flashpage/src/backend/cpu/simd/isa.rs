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
    /// `a / b`.
    fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `|a|`.
    fn abs(a: Self::V) -> Self::V;
    /// Per lane: `x` where `a < b`, else `y`.
    fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// `|mag|` with the sign of `sign`.
    fn copysign(mag: Self::V, sign: Self::V) -> Self::V;
    /// `tanh` of every finite lane (±inf give ±1), within a few ulp of 1 (absolute error
    /// about 1e-7): an odd polynomial below |x| = 1/8, `(1 − e)/(1 + e)` with
    /// `e = exp(−2|x|)` above.
    #[inline(always)]
    fn tanh(x: Self::V) -> Self::V {
        let one = Self::splat(1.0);
        let a = Self::abs(x);
        let e = Self::exp(Self::mul(a, Self::splat(-2.0)));
        let big = Self::div(Self::fma(e, Self::splat(-1.0), one), Self::fma(e, one, one));
        let a2 = Self::mul(a, a);
        let p = Self::fma(a2, Self::splat(-17.0 / 315.0), Self::splat(2.0 / 15.0));
        let p = Self::fma(a2, p, Self::splat(-1.0 / 3.0));
        let small = Self::fma(Self::mul(a, a2), p, a);
        Self::copysign(Self::select_lt(a, Self::splat(0.125), small, big), x)
    }
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
