//! Instruction-set levels and the vector primitives the kernels are written in.
//!
//! Kernels are generic over [`Isa`]; each level's entry point is compiled with its target
//! features enabled, so the primitives inline into one specialised loop nest per level.

use super::elem::Elem;

/// A SIMD level of this machine, chosen once per backend (and so per plan run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, DQ); uses avx512_bf16 dot products where present.
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

/// Vector primitives over f32 rows. Implementations must give results within f32 rounding
/// of the scalar definitions (the summation order may differ).
pub trait Isa: Copy + Send + Sync + 'static {
    /// Widens `src` into `dst` (same length).
    fn load<E: Elem>(src: &[E], dst: &mut [f32]);
    /// Rounds `src` into `dst` (same length).
    fn store<E: Elem>(src: &[f32], dst: &mut [E]);
    /// `Σ a[i]·b[i]`.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `y += a·x`.
    fn axpy(y: &mut [f32], a: f32, x: &[f32]);
    /// `y *= a`.
    fn scale(y: &mut [f32], a: f32);
}

/// Portable implementation.
#[derive(Debug, Clone, Copy)]
pub struct Scalar;

impl Isa for Scalar {
    #[inline(always)]
    fn load<E: Elem>(src: &[E], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    #[inline(always)]
    fn store<E: Elem>(src: &[f32], dst: &mut [E]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = E::from_f32(*s);
        }
    }
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // Eight independent sums: fast without vector intrinsics, and vectorisable.
        let mut acc = [0f32; 8];
        let n8 = a.len() / 8 * 8;
        for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
            for i in 0..8 {
                acc[i] = ca[i].mul_add(cb[i], acc[i]);
            }
        }
        let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for i in n8..a.len() {
            s = a[i].mul_add(b[i], s);
        }
        s
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (yy, xx) in y.iter_mut().zip(x) {
            *yy = a.mul_add(*xx, *yy);
        }
    }
    #[inline(always)]
    fn scale(y: &mut [f32], a: f32) {
        for yy in y {
            *yy *= a;
        }
    }
}

/// Runs one `(work item, KV head)` pair at `level`.
#[inline]
pub(crate) fn dispatch_attend<E: Elem>(
    level: SimdLevel,
    ctx: &super::Ctx<'_, E>,
    w: usize,
    kvh: usize,
    sc: &mut super::Scratch,
) {
    match level {
        SimdLevel::Scalar | SimdLevel::Avx2 | SimdLevel::Avx512 => {
            super::attend::attend::<Scalar, E>(ctx, w, kvh, sc)
        }
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
        SimdLevel::Scalar | SimdLevel::Avx2 | SimdLevel::Avx512 => {
            super::merge::merge_row::<Scalar, E>(ctx, m, buf)
        }
    }
}
