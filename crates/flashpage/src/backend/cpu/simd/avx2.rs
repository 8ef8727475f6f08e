//! AVX2 + FMA + F16C level: 8 f32 lanes; f16 through `vcvtph2ps`, bf16 by shifting into the
//! high half of an f32.

use std::arch::x86_64::*;

use super::super::elem::Elem;
use super::isa::Isa;
use super::isa::expconst as ec;
use crate::layout::DType;

/// Eight E4M3Fn codes (one per 16-bit lane) as the f16 bit patterns of their values / 256:
/// the sign moves to bit 15 and exponent and mantissa to bits 7..14, so the E4M3 exponent
/// (bias 7) reads as an f16 exponent (bias 15) and subnormals as f16 subnormals, exactly;
/// the only NaN code (`S.1111.111`) gets the f16 NaN exponent. The caller multiplies the
/// converted value by 256 (exact).
///
/// # Safety
/// The CPU must support SSE2 (every x86-64 CPU).
#[inline(always)]
unsafe fn e4m3_as_f16(b: __m128i) -> __m128i {
    // SAFETY: integer SSE2 only (caller).
    unsafe {
        let t = _mm_slli_epi16::<8>(b);
        let sign = _mm_and_si128(t, _mm_set1_epi16(0x8000u16 as i16));
        let mag = _mm_and_si128(_mm_srli_epi16::<1>(t), _mm_set1_epi16(0x3f80));
        let nan = _mm_and_si128(
            _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x3f80)),
            _mm_set1_epi16(0x7c00),
        );
        _mm_or_si128(_mm_or_si128(sign, mag), nan)
    }
}

/// [`e4m3_as_f16`] on sixteen codes in a 256-bit register.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn e4m3_as_f16_256(b: __m256i) -> __m256i {
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

/// The AVX2 register set (`__m256`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2;

impl Isa for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    #[inline(always)]
    fn zero() -> __m256 {
        // SAFETY (all intrinsics in this impl): only reached from the entry points of
        // `dispatch.rs`, compiled with avx2, fma and f16c, and called after detection.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    fn splat(x: f32) -> __m256 {
        // SAFETY: see `zero`.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load<E: Elem>(p: *const E) -> __m256 {
        // SAFETY: 8 readable elements (caller); features as in `zero`.
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm256_loadu_ps(p as *const f32),
                DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                DType::BF16 => {
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
                }
                // E5M2 is the top byte of an f16: widen the bytes to 16 bits, shift, convert.
                DType::E5M2 => _mm256_cvtph_ps(_mm_slli_epi16::<8>(_mm_cvtepu8_epi16(
                    _mm_loadl_epi64(p as *const __m128i),
                ))),
                DType::E4M3Fn => {
                    let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
                    _mm256_mul_ps(_mm256_cvtph_ps(e4m3_as_f16(b)), _mm256_set1_ps(256.0))
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn load2<E: Elem>(p: *const E) -> (__m256, __m256) {
        // SAFETY: 16 readable elements (caller); features as in `zero`.
        unsafe {
            match E::DTYPE {
                DType::BF16 => {
                    // Lane i holds elements 2i (low half) and 2i + 1 (high half).
                    let x = _mm256_loadu_si256(p as *const __m256i);
                    let even = _mm256_slli_epi32::<16>(x);
                    let odd = _mm256_and_si256(x, _mm256_set1_epi32(0xffff_0000u32 as i32));
                    (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
                }
                // 16 codes widened to 16 bits in one register: the integer work is done
                // once for both halves, then two conversions (natural order).
                DType::E5M2 => {
                    let h = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(_mm_loadu_si128(
                        p as *const __m128i,
                    )));
                    (
                        _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
                    )
                }
                DType::E4M3Fn => {
                    let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
                    let h = e4m3_as_f16_256(b);
                    let k = _mm256_set1_ps(256.0);
                    (
                        _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), k),
                        _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)), k),
                    )
                }
                _ => (Self::load(p), Self::load(p.add(8))),
            }
        }
    }
    #[inline(always)]
    fn load2_position<E: Elem>(c: usize) -> usize {
        match E::DTYPE {
            DType::BF16 => {
                let (c0, x) = (c - c % 16, c % 16);
                c0 + if x % 2 == 0 { x / 2 } else { 8 + x / 2 }
            }
            _ => c,
        }
    }
    #[inline(always)]
    unsafe fn store<E: Elem>(p: *mut E, v: __m256) {
        // SAFETY: 8 writable elements (caller); features as in `zero`.
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm256_storeu_ps(p as *mut f32, v),
                DType::F16 => _mm_storeu_si128(
                    p as *mut __m128i,
                    _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v),
                ),
                DType::BF16 => {
                    let b = _mm256_castps_si256(v);
                    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                    let r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb);
                    let r = _mm256_srli_epi32::<16>(r);
                    // NaN stays a (quiet) NaN.
                    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                    let q = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x40));
                    let r = _mm256_blendv_epi8(r, q, nan);
                    let packed = _mm256_packus_epi32(r, r);
                    let packed = _mm256_permute4x64_epi64::<0b1000>(packed);
                    _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(packed));
                }
                DType::E4M3Fn | DType::E5M2 => {
                    let mut x = [0.0f32; 8];
                    _mm256_storeu_ps(x.as_mut_ptr(), v);
                    for (i, x) in x.into_iter().enumerate() {
                        p.add(i).write_unaligned(E::from_f32(x));
                    }
                }
            }
        }
    }
    #[inline(always)]
    fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: see `zero`.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: see `zero`.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: see `zero`.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn div(a: __m256, b: __m256) -> __m256 {
        // SAFETY: see `zero`.
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    fn min(a: __m256, b: __m256) -> __m256 {
        // SAFETY: see `zero`.
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    fn reduce_add(v: __m256) -> f32 {
        // SAFETY: see `zero`.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_add4(v: [__m256; 4]) -> [f32; 4] {
        // SAFETY: see `zero`.
        unsafe {
            let h01 = _mm256_hadd_ps(v[0], v[1]);
            let h23 = _mm256_hadd_ps(v[2], v[3]);
            let h = _mm256_hadd_ps(h01, h23); // per 128-bit half: [v0, v1, v2, v3] partials
            let r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), r);
            out
        }
    }
    #[inline(always)]
    fn reduce_max(v: __m256) -> f32 {
        // SAFETY: see `zero`.
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn exp(x: __m256) -> __m256 {
        // SAFETY: see `zero`.
        unsafe {
            let lo = _mm256_set1_ps(ec::LO);
            let live = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
            let x = _mm256_max_ps(x, lo);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(ec::LOG2E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ec::LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ec::LN2_LO), r);
            let mut p = _mm256_set1_ps(ec::P[0]);
            for c in &ec::P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let r2 = _mm256_mul_ps(r, r);
            let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
            // 2^n for n in [-126, 127] (x is at most 0 here; clamp keeps the exponent valid).
            let ni = _mm256_cvtps_epi32(_mm256_min_ps(n, _mm256_set1_ps(127.0)));
            let pow = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                ni,
                _mm256_set1_epi32(127),
            )));
            _mm256_and_ps(_mm256_mul_ps(y, pow), live)
        }
    }
    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
    }
}
