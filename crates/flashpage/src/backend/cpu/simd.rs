//! Instruction-set levels and the vector primitives the kernels are written in.
//!
//! Kernels are generic over `Isa`, a vector register type with a handful of operations.
//! Each level's entry point is compiled with its target features enabled
//! (`#[target_feature(enable = ...)]`) and calls the `#[inline(always)]` generic kernel, so
//! the whole loop nest is specialised once per level and element type.

use super::elem::Elem;
#[cfg(target_arch = "x86_64")]
use crate::layout::DType;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod dpbf16;

/// A SIMD level of this machine, chosen once per backend (and so per plan run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, DQ) with FMA and F16C; bf16 is widened in registers,
    /// except in decode tiles on CPUs with AVX-512 BF16, which multiply bf16 pairs
    /// directly (`vdpbf16ps`, P rounded to bf16 for P·V).
    Avx512,
}

impl SimdLevel {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Parses a name as printed by [`SimdLevel::name`].
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// True when this machine can run the level.
    pub fn is_available(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this machine can run, best last.
    pub fn available() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| l.is_available())
            .collect()
    }

    /// The best level of this machine.
    pub fn detect() -> SimdLevel {
        *Self::available().last().unwrap_or(&SimdLevel::Scalar)
    }
}

/// A vector register of `LANES` f32 values and the operations the kernels use.
///
/// Implementations for x86 levels may only be called from code compiled with their target
/// features (the entry points below, reached only after [`SimdLevel::is_available`]); the
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
    /// `s[r·KEY_BLOCK + j] = scale · q_r·k_j` with bf16 pair dot products (`vdpbf16ps`):
    /// q rows and K rows are bf16 bit patterns. Only levels with such an instruction
    /// implement it; the kernel calls it only from an entry point compiled for it.
    ///
    /// # Safety
    /// `q` holds `rows·d` values; `kp[j]..kp[j] + d` (j < nb) readable; `s` holds
    /// `rows·KEY_BLOCK`; `d % 16 == 0`; the CPU has the instruction.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn s_block_bf16(
        _q: &[u16],
        _d: usize,
        _rows: usize,
        _kp: &[*const u16; super::attend::KEY_BLOCK],
        _nb: usize,
        _scale: f32,
        _s: &mut [f32],
        _pf: &[*const u16; super::attend::KEY_BLOCK],
        _np: usize,
    ) {
        unreachable!("bf16 dot products are not implemented at this level")
    }
    /// `O = diag(corr)·O + P·V` with bf16 pair dot products, accumulating in the permuted
    /// column order of [`dpbf16::permuted_column`] (P rounded to bf16).
    ///
    /// # Safety
    /// `acc` holds `rows·d` (rows <= 8), `p` `rows·KEY_BLOCK`, every `vp[j]` (j < nb) `d`
    /// readable values; `d % 16 == 0`; the CPU has the instruction.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_block_bf16(
        _acc: &mut [f32],
        _d: usize,
        _rows: usize,
        _corr: &[f32],
        _p: &[f32],
        _vp: &[*const u16; super::attend::KEY_BLOCK],
        _nb: usize,
        _pf: &[*const u16; super::attend::KEY_BLOCK],
        _np: usize,
    ) {
        unreachable!("bf16 dot products are not implemented at this level")
    }
    /// The accumulator position of column `c` (of `d`) written by
    /// [`Isa::pv_block_bf16`].
    #[inline(always)]
    fn permuted_column(c: usize, _d: usize) -> usize {
        c
    }
}

/// Portable implementation: eight lanes in an array, which compilers vectorise for the
/// baseline target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalar;

impl Isa for Scalar {
    type V = [f32; 8];
    const LANES: usize = 8;
    #[inline(always)]
    fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load<E: Elem>(p: *const E) -> Self::V {
        let mut v = [0.0; 8];
        for (i, x) in v.iter_mut().enumerate() {
            // SAFETY: the caller guarantees 8 readable elements.
            *x = unsafe { p.add(i).read_unaligned() }.to_f32();
        }
        v
    }
    #[inline(always)]
    unsafe fn store<E: Elem>(p: *mut E, v: Self::V) {
        for (i, x) in v.into_iter().enumerate() {
            // SAFETY: the caller guarantees 8 writable elements.
            unsafe { p.add(i).write_unaligned(E::from_f32(x)) };
        }
    }
    #[inline(always)]
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // `mul_add` is a (slow) library call where the target has no fused multiply-add:
        // there, multiply then add.
        let mut v = c;
        for i in 0..8 {
            v[i] = if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
                a[i].mul_add(b[i], c[i])
            } else {
                a[i] * b[i] + c[i]
            };
        }
        v
    }
    #[inline(always)]
    fn mul(a: Self::V, b: Self::V) -> Self::V {
        let mut v = a;
        for i in 0..8 {
            v[i] *= b[i];
        }
        v
    }
    #[inline(always)]
    fn max(a: Self::V, b: Self::V) -> Self::V {
        let mut v = a;
        for i in 0..8 {
            v[i] = v[i].max(b[i]);
        }
        v
    }
    #[inline(always)]
    fn div(a: Self::V, b: Self::V) -> Self::V {
        let mut v = a;
        for i in 0..8 {
            v[i] /= b[i];
        }
        v
    }
    #[inline(always)]
    fn abs(a: Self::V) -> Self::V {
        let mut v = a;
        for x in &mut v {
            *x = x.abs();
        }
        v
    }
    #[inline(always)]
    fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        let mut v = y;
        for i in 0..8 {
            if a[i] < b[i] {
                v[i] = x[i];
            }
        }
        v
    }
    #[inline(always)]
    fn copysign(mag: Self::V, sign: Self::V) -> Self::V {
        let mut v = mag;
        for i in 0..8 {
            v[i] = mag[i].copysign(sign[i]);
        }
        v
    }
    #[inline(always)]
    fn reduce_add(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    fn reduce_max(v: Self::V) -> f32 {
        let mut m = v[0];
        for x in &v[1..] {
            m = m.max(*x);
        }
        m
    }
    #[inline(always)]
    fn exp(v: Self::V) -> Self::V {
        let mut v = v;
        for x in &mut v {
            *x = x.exp();
        }
        v
    }
}

/// The vectorised exp shared by the x86 levels, written over lane-wise helpers: Cody–Waite
/// range reduction `x = n·ln2 + r`, `|r| <= ln2/2`, and the degree-6 minimax polynomial of
/// Cephes' `expf` (about 1 ulp), then `2^n` by exponent arithmetic.
#[cfg(target_arch = "x86_64")]
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

/// True when this CPU has AVX-512 BF16 (`vdpbf16ps`): the AVX-512 level then runs bf16
/// decode tiles on bf16 dot products (see [`dpbf16`]). Detection is cached by `std`.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Runs work item `w` for the KV heads `kv_heads.0..kv_heads.1` at `level`.
#[inline]
pub(crate) fn dispatch_attend<E: Elem>(
    level: SimdLevel,
    ctx: &super::Ctx<'_, E>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut super::Scratch,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a backend holds a level only after `is_available` confirmed its features,
        // and `has_avx512_bf16` confirmed the bf16 dot-product instruction.
        SimdLevel::Avx512 if E::DTYPE == DType::BF16 && has_avx512_bf16() => unsafe {
            avx512::attend_bf16_entry(ctx, w, kv_heads, sc)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a backend holds a level only after `is_available` confirmed its features.
        SimdLevel::Avx512 => unsafe { avx512::attend_entry(ctx, w, kv_heads, sc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { avx2::attend_entry(ctx, w, kv_heads, sc) },
        _ => super::attend::attend::<Scalar, E, false>(ctx, w, kv_heads, sc),
    }
}

/// Merges plan merge row `m` at `level`.
#[inline]
pub(crate) fn dispatch_merge<E: Elem>(
    level: SimdLevel,
    ctx: &super::Ctx<'_, E>,
    m: usize,
    buf: &mut Vec<f32>,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a backend holds a level only after `is_available` confirmed its features.
        SimdLevel::Avx512 => unsafe { avx512::merge_entry(ctx, m, buf) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { avx2::merge_entry(ctx, m, buf) },
        _ => super::merge::merge_row::<Scalar, E>(ctx, m, buf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_exp<I: Isa>() {
        let xs: Vec<f32> = (0..4000)
            .map(|i| -(i as f32) * 0.0219)
            .chain([0.0, -0.0, -1e-30, -87.0, -87.3, -87.4, -100.0, -1e30])
            .chain([f32::NEG_INFINITY])
            .collect();
        let mut worst = 0u32;
        for chunk in xs.chunks(I::LANES) {
            let mut buf = vec![f32::NEG_INFINITY; I::LANES];
            buf[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: buf has LANES elements.
            let v = unsafe { I::load::<f32>(buf.as_ptr()) };
            let mut out = vec![0.0f32; I::LANES];
            // SAFETY: out has LANES elements.
            unsafe { I::store::<f32>(out.as_mut_ptr(), I::exp(v)) };
            for (x, y) in chunk.iter().zip(&out) {
                let want = (*x as f64).exp();
                if want < f32::MIN_POSITIVE as f64 {
                    assert!(*y >= 0.0 && (*y as f64) < 1.2e-38, "exp({x}) = {y}");
                    continue;
                }
                let want = want as f32;
                let ulps = (y.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
                worst = worst.max(ulps);
            }
        }
        assert!(worst <= 2, "exp is {worst} ulp off");
    }

    fn check_tanh<I: Isa>() {
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.0037)
            .chain([
                0.0, -0.0, 0.124, 0.125, 0.126, -0.125, 9.0, -9.0, 40.0, -1e30, 1e30,
            ])
            .chain([1e-30, -1e-30, f32::INFINITY, f32::NEG_INFINITY])
            .collect();
        for chunk in xs.chunks(I::LANES) {
            let mut buf = vec![0.5; I::LANES];
            buf[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: buf has LANES elements.
            let v = unsafe { I::load::<f32>(buf.as_ptr()) };
            let mut out = vec![0.0f32; I::LANES];
            // SAFETY: out has LANES elements.
            unsafe { I::store::<f32>(out.as_mut_ptr(), I::tanh(v)) };
            for (x, y) in chunk.iter().zip(&out) {
                let want = (*x as f64).tanh();
                let err = (*y as f64 - want).abs();
                // Relative near 0 (the odd polynomial keeps it), absolute elsewhere.
                let rel = err / want.abs().max(1e-30);
                assert!(
                    err <= 2.5e-7 && (want.abs() > 0.125 || rel <= 4e-7),
                    "tanh({x}) = {y}, want {want}"
                );
                assert_eq!(
                    y.is_sign_negative(),
                    x.is_sign_negative(),
                    "tanh({x}) = {y}"
                );
            }
        }
    }

    #[test]
    fn tanh_is_accurate_and_odd() {
        check_tanh::<Scalar>();
        #[cfg(target_arch = "x86_64")]
        {
            if SimdLevel::Avx2.is_available() {
                // SAFETY: features checked just above.
                unsafe { avx2::run_exp_test(check_tanh::<avx2::Avx2>) };
            }
            if SimdLevel::Avx512.is_available() {
                // SAFETY: features checked just above.
                unsafe { avx512::run_exp_test(check_tanh::<avx512::Avx512>) };
            }
        }
    }

    fn check_reduce<I: Isa>() {
        let vals: Vec<f32> = (0..4 * I::LANES)
            .map(|i| (i * i % 37) as f32 - 11.5)
            .collect();
        // SAFETY: vals holds four registers' worth.
        let v: [I::V; 4] =
            std::array::from_fn(|r| unsafe { I::load::<f32>(vals[r * I::LANES..].as_ptr()) });
        let got = I::reduce_add4(v);
        for r in 0..4 {
            let want: f32 = vals[r * I::LANES..(r + 1) * I::LANES].iter().sum();
            assert_eq!(got[r], want, "register {r}");
            assert_eq!(I::reduce_add(v[r]), want);
        }
    }

    #[test]
    fn reductions_sum_every_lane() {
        check_reduce::<Scalar>();
        #[cfg(target_arch = "x86_64")]
        {
            if SimdLevel::Avx2.is_available() {
                // SAFETY: features checked just above.
                unsafe { avx2::run_exp_test(check_reduce::<avx2::Avx2>) };
            }
            if SimdLevel::Avx512.is_available() {
                // SAFETY: features checked just above.
                unsafe { avx512::run_exp_test(check_reduce::<avx512::Avx512>) };
            }
        }
    }

    #[test]
    fn exp_is_accurate_and_maps_neg_inf_to_zero() {
        check_exp::<Scalar>();
        #[cfg(target_arch = "x86_64")]
        {
            if SimdLevel::Avx2.is_available() {
                // SAFETY: features checked just above.
                unsafe { avx2::run_exp_test(check_exp::<avx2::Avx2>) };
            }
            if SimdLevel::Avx512.is_available() {
                // SAFETY: features checked just above.
                unsafe { avx512::run_exp_test(check_exp::<avx512::Avx512>) };
            }
        }
    }
}
