//! The portable level.

use super::super::elem::Elem;
use super::isa::Isa;

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
    fn min(a: Self::V, b: Self::V) -> Self::V {
        let mut v = a;
        for i in 0..8 {
            v[i] = v[i].min(b[i]);
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
