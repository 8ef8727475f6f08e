//! AVX-512 (F, BW, VL, DQ) level: 16 f32 lanes; f16 through F16C-style `vcvtph2ps`, bf16 by
//! shifting into the high half of an f32.

use std::arch::x86_64::*;

use super::super::elem::Elem;
use super::isa::Isa;
use super::isa::expconst as ec;
use crate::layout::DType;

/// Sixteen E4M3Fn codes (one per 16-bit lane) as the f16 bit patterns of their values / 256
/// (the AVX2 `e4m3_as_f16` on 256-bit registers).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn e4m3_as_f16(b: __m256i) -> __m256i {
    // SAFETY: AVX2 integer instructions (caller).
    unsafe {
        let t = _mm256_slli_epi16::<8>(b);
        let sign = _mm256_and_si256(t, _mm256_set1_epi16(0x8000u16 as i16));
        let mag = _mm256_and_si256(_mm256_srli_epi16::<1>(t), _mm256_set1_epi16(0x3f80));
        let nan = _mm256_and_si256(
            _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x3f80)),
            _mm256_set1_epi16(0x7c00),
        );
        _mm256_or_si256(_mm256_or_si256(sign, mag), nan)
    }
}

/// The AVX-512 register set (`__m512`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512;

impl Isa for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    fn zero() -> __m512 {
        // SAFETY (all intrinsics in this impl): only reached from the entry points of
        // `dispatch.rs`, compiled with avx512f/bw/vl/dq, avx2, fma and f16c, and called
        // after detection.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(x: f32) -> __m512 {
        // SAFETY: see `zero`.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load<E: Elem>(p: *const E) -> __m512 {
        // SAFETY: 16 readable elements (caller); features as in `zero`.
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm512_loadu_ps(p as *const f32),
                DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                DType::BF16 => {
                    let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
                }
                // E5M2 is the top byte of an f16: widen the bytes to 16 bits, shift, convert.
                DType::E5M2 => _mm512_cvtph_ps(_mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(
                    _mm_loadu_si128(p as *const __m128i),
                ))),
                DType::E4M3Fn => {
                    let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
                    _mm512_mul_ps(_mm512_cvtph_ps(e4m3_as_f16(b)), _mm512_set1_ps(256.0))
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn store<E: Elem>(p: *mut E, v: __m512) {
        // SAFETY: 16 writable elements (caller); features as in `zero`.
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm512_storeu_ps(p as *mut f32, v),
                DType::F16 => _mm256_storeu_si256(
                    p as *mut __m256i,
                    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
                ),
                DType::BF16 => {
                    let b = _mm512_castps_si512(v);
                    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
                    let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
                    let r = _mm512_srli_epi32::<16>(r);
                    // NaN stays a (quiet) NaN.
                    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    let q = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
                    let r = _mm512_mask_mov_epi32(r, nan, q);
                    _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
                }
                DType::E4M3Fn | DType::E5M2 => {
                    let mut x = [0.0f32; 16];
                    _mm512_storeu_ps(x.as_mut_ptr(), v);
                    for (i, x) in x.into_iter().enumerate() {
                        p.add(i).write_unaligned(E::from_f32(x));
                    }
                }
            }
        }
    }
    #[inline(always)]
    fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: see `zero`.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see `zero`.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see `zero`.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn div(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see `zero`.
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    fn min(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see `zero`.
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    fn reduce_add(v: __m512) -> f32 {
        // SAFETY: see `zero`.
        unsafe {
            let s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_add4(v: [__m512; 4]) -> [f32; 4] {
        // SAFETY: see `zero`.
        unsafe {
            // Fold 512 → 128 bits per register, two registers at a time, then transpose-add.
            let lo01 = _mm512_shuffle_f32x4::<0b01_00_01_00>(v[0], v[1]);
            let hi01 = _mm512_shuffle_f32x4::<0b11_10_11_10>(v[0], v[1]);
            let lo23 = _mm512_shuffle_f32x4::<0b01_00_01_00>(v[2], v[3]);
            let hi23 = _mm512_shuffle_f32x4::<0b11_10_11_10>(v[2], v[3]);
            let c01 = _mm512_add_ps(lo01, hi01); // [a0 q01, a0 q23, a1 q01, a1 q23] halves
            let c23 = _mm512_add_ps(lo23, hi23);
            let d0 = _mm512_shuffle_f32x4::<0b10_00_10_00>(c01, c23);
            let d1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(c01, c23);
            let e = _mm512_add_ps(d0, d1); // 128-bit lane i: four partial sums of v[i]
            let f = _mm512_add_ps(e, _mm512_permute_ps::<0b01_00_11_10>(e));
            let g = _mm512_add_ps(f, _mm512_permute_ps::<0b10_11_00_01>(f));
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
            let r = _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, g));
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), r);
            out
        }
    }
    #[inline(always)]
    fn reduce_max(v: __m512) -> f32 {
        // SAFETY: see `zero`.
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    fn exp(x: __m512) -> __m512 {
        // SAFETY: see `zero`.
        unsafe {
            let live = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(ec::LO));
            let x = _mm512_max_ps(x, _mm512_set1_ps(ec::LO));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(ec::LOG2E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ec::LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ec::LN2_LO), r);
            let mut p = _mm512_set1_ps(ec::P[0]);
            for c in &ec::P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let r2 = _mm512_mul_ps(r, r);
            let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
            _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n))
        }
    }
    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
    }
}
