//! The one file of `#[target_feature]` entry points: each instantiates a generic kernel
//! (`attend`, `merge`) with a level's primitives (`simd/`) inside a function compiled with
//! that level's features, so the whole loop nest is specialised per level and element type;
//! [`attend`] and [`merge`] pick the entry point of a backend's level.

use super::attend;
use super::ctx::{Ctx, Scratch};
use super::decode;
#[cfg(target_arch = "x86_64")]
use super::dpbf16::Dpbf16;
use super::elem::Elem;
use super::merge::merge_row;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, has_avx512_bf16};
use super::simd::{Scalar, SimdLevel};
use super::tile::NoBf16;
#[cfg(target_arch = "x86_64")]
use crate::layout::DType;

/// The attend kernel compiled for AVX2.
///
/// # Safety
/// The CPU must support the AVX2 level ([`SimdLevel::Avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<E: Elem, K: Elem>(
    ctx: &Ctx<'_, E, K>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut Scratch,
) {
    if decode::eligible(ctx, w) {
        decode::decode::<Avx2, E, K>(ctx, w, kv_heads, sc)
    } else {
        attend::attend::<Avx2, E, K, NoBf16>(ctx, w, kv_heads, sc)
    }
}

/// The attend kernel compiled for AVX-512.
///
/// # Safety
/// The CPU must support the AVX-512 level ([`SimdLevel::Avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn attend_avx512<E: Elem, K: Elem>(
    ctx: &Ctx<'_, E, K>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut Scratch,
) {
    // An FP8 cache decodes in memory order (`decode.rs`, which needs head_dim % 32 == 0 at
    // 16 lanes): measured faster than the tile kernel for FP8 here (docs/perf/cpu.md,
    // "Sixth pass"); bf16 keeps the tile kernel with `vdpbf16ps`.
    let d = ctx.plan.heads().head_dim();
    if K::DTYPE.is_fp8() && d.is_multiple_of(32) && decode::eligible(ctx, w) {
        decode::decode::<Avx512, E, K>(ctx, w, kv_heads, sc)
    } else {
        attend::attend::<Avx512, E, K, NoBf16>(ctx, w, kv_heads, sc)
    }
}

/// The attend kernel compiled for AVX-512 with AVX-512 BF16: bf16 decode tiles use
/// `vdpbf16ps` (`dpbf16.rs`); everything else is the AVX-512 kernel.
///
/// # Safety
/// The CPU must support the AVX-512 level and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
unsafe fn attend_avx512_bf16<E: Elem, K: Elem>(
    ctx: &Ctx<'_, E, K>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut Scratch,
) {
    attend::attend::<Avx512, E, K, Dpbf16>(ctx, w, kv_heads, sc)
}

/// The merge step compiled for AVX2.
///
/// # Safety
/// The CPU must support the AVX2 level.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn merge_avx2<E: Elem, K: Elem>(ctx: &Ctx<'_, E, K>, m: usize, buf: &mut Vec<f32>) {
    merge_row::<Avx2, E, K>(ctx, m, buf)
}

/// The merge step compiled for AVX-512.
///
/// # Safety
/// The CPU must support the AVX-512 level.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn merge_avx512<E: Elem, K: Elem>(ctx: &Ctx<'_, E, K>, m: usize, buf: &mut Vec<f32>) {
    merge_row::<Avx512, E, K>(ctx, m, buf)
}

/// Runs work item `w` for the KV heads `kv_heads.0..kv_heads.1` at `level`.
#[inline]
pub(crate) fn attend<E: Elem, K: Elem>(
    level: SimdLevel,
    ctx: &Ctx<'_, E, K>,
    w: usize,
    kv_heads: (usize, usize),
    sc: &mut Scratch,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a backend holds a level only after `is_available` confirmed its features,
        // and `has_avx512_bf16` confirmed the bf16 dot-product instruction.
        SimdLevel::Avx512
            if E::DTYPE == DType::BF16 && K::DTYPE == DType::BF16 && has_avx512_bf16() =>
        unsafe { attend_avx512_bf16(ctx, w, kv_heads, sc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a backend holds a level only after `is_available` confirmed its features.
        SimdLevel::Avx512 => unsafe { attend_avx512(ctx, w, kv_heads, sc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { attend_avx2(ctx, w, kv_heads, sc) },
        _ if decode::eligible(ctx, w) => decode::decode::<Scalar, E, K>(ctx, w, kv_heads, sc),
        _ => attend::attend::<Scalar, E, K, NoBf16>(ctx, w, kv_heads, sc),
    }
}

/// Merges plan merge row `m` at `level`.
#[inline]
pub(crate) fn merge<E: Elem, K: Elem>(
    level: SimdLevel,
    ctx: &Ctx<'_, E, K>,
    m: usize,
    buf: &mut Vec<f32>,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a backend holds a level only after `is_available` confirmed its features.
        SimdLevel::Avx512 => unsafe { merge_avx512(ctx, m, buf) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { merge_avx2(ctx, m, buf) },
        _ => merge_row::<Scalar, E, K>(ctx, m, buf),
    }
}

/// Runs `f` in a context compiled for AVX2 (tests of the primitives).
///
/// # Safety
/// The CPU must support the AVX2 level.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_avx2(f: impl FnOnce()) {
    f()
}

/// Runs `f` in a context compiled for AVX-512 (tests of the primitives).
///
/// # Safety
/// The CPU must support the AVX-512 level.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn run_avx512(f: impl FnOnce()) {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::Isa;
    use crate::backend::cpu::simd::isa::SoftCap;

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

    fn check_soft_cap<I: Isa>() {
        for c in [
            50.0f32,
            30.0,
            1.0,
            7.3,
            1e-30,
            f32::MIN_POSITIVE,
            1e30,
            f32::MAX,
        ] {
            let cap = SoftCap::<I>::new(c);
            let xs: Vec<f32> = (-6000..=6000)
                .map(|i| i as f32 * 0.0017 * c)
                .chain([0.125, 0.126, 5.7, 8.99, 9.0, 9.01, 40.0, 1e30].map(|y| y * c))
                .chain([0.0, -0.0, 1e-30, -1e-30, f32::MAX, f32::MIN])
                .chain([f32::INFINITY, f32::NEG_INFINITY])
                .collect();
            for chunk in xs.chunks(I::LANES) {
                let mut buf = vec![0.5; I::LANES];
                buf[..chunk.len()].copy_from_slice(chunk);
                // SAFETY: buf has LANES elements.
                let v = unsafe { I::load::<f32>(buf.as_ptr()) };
                let mut out = vec![0.0f32; I::LANES];
                // SAFETY: out has LANES elements.
                unsafe { I::store::<f32>(out.as_mut_ptr(), cap.apply(v)) };
                for (x, y) in chunk.iter().zip(&out) {
                    let want = c as f64 * (*x as f64 / c as f64).tanh();
                    let err = (*y as f64 - want).abs();
                    // Relative everywhere, but for the f32 spacing of a subnormal x/c or
                    // result.
                    assert!(
                        err <= 3e-7 * want.abs() + 1.5e-45 * (c as f64).max(1.0),
                        "cap {c}: {x} -> {y}, want {want}"
                    );
                    assert!(y.abs() <= c, "cap {c}: {x} -> {y} beyond the cap");
                    assert_eq!(
                        y.is_sign_negative(),
                        x.is_sign_negative(),
                        "cap {c}: {x} -> {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn soft_cap_is_accurate_odd_and_bounded() {
        check_soft_cap::<Scalar>();
        #[cfg(target_arch = "x86_64")]
        {
            if SimdLevel::Avx2.is_available() {
                // SAFETY: features checked just above.
                unsafe { run_avx2(check_soft_cap::<Avx2>) };
            }
            if SimdLevel::Avx512.is_available() {
                // SAFETY: features checked just above.
                unsafe { run_avx512(check_soft_cap::<Avx512>) };
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
                unsafe { run_avx2(check_reduce::<Avx2>) };
            }
            if SimdLevel::Avx512.is_available() {
                // SAFETY: features checked just above.
                unsafe { run_avx512(check_reduce::<Avx512>) };
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
                unsafe { run_avx2(check_exp::<Avx2>) };
            }
            if SimdLevel::Avx512.is_available() {
                // SAFETY: features checked just above.
                unsafe { run_avx512(check_exp::<Avx512>) };
            }
        }
    }
}
