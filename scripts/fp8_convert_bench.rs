//! E4M3Fn → f32 conversion in registers, two ways, timed on this machine (docs/perf/cpu.md,
//! "FP8 decode"): the f16 route the CPU kernels use (shift the code into an f16 bit
//! pattern, `vcvtph2ps`, multiply by 256, one compare for the NaN code) and a 256-entry f32
//! table read with `vpgatherdd`. Both sum the converted values of a 32 KiB buffer (L1) many
//! times, so the figure is the conversion, not memory. A standalone program outside the
//! cargo build:
//!
//! ```text
//! rustc -O -C target-cpu=native scripts/fp8_convert_bench.rs -o /tmp/fp8_convert_bench
//! flock -x /tmp/fp-cpu.lock /tmp/fp8_convert_bench
//! ```
#![allow(unsafe_op_in_unsafe_fn)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::time::Instant;

fn decode(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((c & 0x7f) >> 3) as i32, (c & 7) as f32);
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
unsafe fn via_f16_512(p: *const u8) -> __m512 {
    let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
    let t = _mm256_slli_epi16::<8>(b);
    let sign = _mm256_and_si256(t, _mm256_set1_epi16(0x8000u16 as i16));
    let mag = _mm256_and_si256(_mm256_srli_epi16::<1>(t), _mm256_set1_epi16(0x3f80));
    let nan = _mm256_and_si256(
        _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x3f80)),
        _mm256_set1_epi16(0x7c00),
    );
    let h = _mm256_or_si256(_mm256_or_si256(sign, mag), nan);
    _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
unsafe fn via_lut_512(p: *const u8, lut: *const f32) -> __m512 {
    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
    _mm512_i32gather_ps::<4>(idx, lut as *const f32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn via_f16_256(p: *const u8) -> __m256 {
    let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
    let t = _mm_slli_epi16::<8>(b);
    let sign = _mm_and_si128(t, _mm_set1_epi16(0x8000u16 as i16));
    let mag = _mm_and_si128(_mm_srli_epi16::<1>(t), _mm_set1_epi16(0x3f80));
    let nan = _mm_and_si128(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x3f80)), _mm_set1_epi16(0x7c00));
    let h = _mm_or_si128(_mm_or_si128(sign, mag), nan);
    _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn via_lut_256(p: *const u8, lut: *const f32) -> __m256 {
    let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
    _mm256_i32gather_ps::<4>(lut, idx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
unsafe fn run512(buf: &[u8], lut: &[f32], reps: usize, gather: bool) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    for _ in 0..reps {
        let mut i = 0;
        while i < buf.len() {
            for (u, a) in acc.iter_mut().enumerate() {
                let p = buf.as_ptr().add(i + 16 * u);
                let v = if gather { via_lut_512(p, lut.as_ptr()) } else { via_f16_512(p) };
                *a = _mm512_add_ps(*a, v);
            }
            i += 64;
        }
    }
    let mut out = [0f32; 16];
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn run256(buf: &[u8], lut: &[f32], reps: usize, gather: bool) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    for _ in 0..reps {
        let mut i = 0;
        while i < buf.len() {
            for (u, a) in acc.iter_mut().enumerate() {
                let p = buf.as_ptr().add(i + 8 * u);
                let v = if gather { via_lut_256(p, lut.as_ptr()) } else { via_f16_256(p) };
                *a = _mm256_add_ps(*a, v);
            }
            i += 32;
        }
    }
    let mut out = [0f32; 8];
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let lut: Vec<f32> = (0..=255u8).map(decode).collect();
    // Finite codes only (a NaN would poison the sums being compared).
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let buf: Vec<u8> = (0..32 * 1024)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let c = (s >> 24) as u8;
            if c & 0x7f == 0x7f { c & 0xfe } else { c }
        })
        .collect();
    // Exactness of the f16 route on every code, NaN included.
    for c in 0..=255u8 {
        let b = [c; 16];
        let mut out = [0f32; 16];
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            // SAFETY: AVX2 and F16C detected just above; `b` holds 16 readable bytes.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), via_f16_256(b.as_ptr())) };
            let want = decode(c);
            assert!(
                out[0] == want || (out[0].is_nan() && want.is_nan()),
                "{c:#x}: {} vs {want}",
                out[0]
            );
        }
    }
    let reps = 20_000;
    let elems = (buf.len() * reps) as f64;
    let mut rows = Vec::new();
    if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
        for gather in [false, true] {
            let t = Instant::now();
            // SAFETY: AVX-512 BW/VL detected just above; the loops stay inside `buf`.
            let x = unsafe { run512(&buf, &lut, reps, gather) };
            rows.push(("avx512", gather, elems / t.elapsed().as_secs_f64() / 1e9, x));
        }
    }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        for gather in [false, true] {
            let t = Instant::now();
            // SAFETY: AVX2 and F16C detected just above; the loops stay inside `buf`.
            let x = unsafe { run256(&buf, &lut, reps, gather) };
            rows.push(("avx2", gather, elems / t.elapsed().as_secs_f64() / 1e9, x));
        }
    }
    for (level, gather, rate, sum) in rows {
        println!(
            "{level:7} {:12} {rate:6.2} G codes/s per core (checksum {sum:e})",
            if gather { "table gather" } else { "f16 route" }
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {}
