//! This machine's ceilings, measured in the same run as a benchmark so that kernel numbers
//! can be stated as fractions of what the hardware delivered at that moment (on shared
//! machines the bandwidth drifts from minute to minute).
//!
//! - [`read_bandwidth`]: streaming read of a buffer split over threads, with the widest
//!   vector loads of the machine and independent accumulators (so the loop is load-bound,
//!   not add-bound). With a buffer of at least [`DRAM_BYTES`] it is the DRAM ceiling of
//!   decode; with a buffer that fits a cache level, that level's read bandwidth.
//! - [`fma_peak`]: f32 fused multiply-adds on independent accumulators at the best SIMD
//!   level: the compute ceiling of prefill.
//!
//! ```no_run
//! use flashpage_testkit::ceiling;
//! let gbps = ceiling::read_bandwidth(2, ceiling::DRAM_BYTES);
//! let gflops = ceiling::fma_peak(2);
//! println!("read {gbps:.1} GB/s, f32 fma {gflops:.0} GFLOP/s");
//! ```

use std::hint::black_box;
use std::sync::Barrier;
use std::time::Instant;

use flashpage::backend::cpu::SimdLevel;

/// Buffer size that defeats every cache level of current CPUs (512 MiB).
pub const DRAM_BYTES: usize = 512 << 20;

/// Bytes each timed pass reads at least (small buffers are read repeatedly).
const MIN_PASS_BYTES: usize = 256 << 20;

/// Timed passes; the best is reported.
const PASSES: usize = 4;

/// Read bandwidth in GB/s (1e9 bytes per second) of `threads` threads streaming through a
/// buffer of `bytes` bytes (each thread reads its own contiguous share, first touched by
/// that thread). The best of a few passes, each reading at least 256 MiB in total. `threads`
/// 0 means one per available core.
pub fn read_bandwidth(threads: usize, bytes: usize) -> f64 {
    read_bandwidth_at(SimdLevel::detect(), threads, bytes)
}

/// [`read_bandwidth`] with the loads of a given SIMD level (an unavailable level falls back
/// to portable code).
pub fn read_bandwidth_at(level: SimdLevel, threads: usize, bytes: usize) -> f64 {
    let threads = resolve_threads(threads);
    // Whole 512-byte blocks per thread, at least one.
    let words_per_block = 64; // 64 u64 = 512 bytes
    let blocks = (bytes / 512).max(threads);
    let per_thread = blocks.div_ceil(threads) * words_per_block;
    let mut buf = vec![0u64; 0];
    buf.reserve_exact(per_thread * threads);
    // First touch by the thread that reads the share (NUMA/page placement).
    buf.resize(per_thread * threads, 0);
    std::thread::scope(|s| {
        for (t, chunk) in buf.chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                for (i, w) in chunk.iter_mut().enumerate() {
                    *w = (i as u64 ^ t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                }
            });
        }
    });
    let total_bytes = per_thread * threads * 8;
    let reps = MIN_PASS_BYTES.div_ceil(total_bytes).max(1);
    let level = if level.is_available() {
        level
    } else {
        SimdLevel::Scalar
    };
    let mut best = 0.0f64;
    for _ in 0..PASSES {
        let secs = timed_parallel(threads, |t| {
            let share = &buf[t * per_thread..(t + 1) * per_thread];
            let mut x = 0u64;
            for _ in 0..reps {
                x ^= read_sum(level, black_box(share));
            }
            x
        });
        best = best.max((total_bytes * reps) as f64 / secs / 1e9);
    }
    best
}

/// Peak f32 FMA rate in GFLOP/s (2 flops per lane per FMA) of `threads` threads at the best
/// SIMD level of this machine, on independent accumulators. `threads` 0 means one per
/// available core.
pub fn fma_peak(threads: usize) -> f64 {
    fma_peak_at(SimdLevel::detect(), threads)
}

/// [`fma_peak`] at a given SIMD level (an unavailable level falls back to portable code).
pub fn fma_peak_at(level: SimdLevel, threads: usize) -> f64 {
    let threads = resolve_threads(threads);
    let level = if level.is_available() {
        level
    } else {
        SimdLevel::Scalar
    };
    // Calibrate the iteration count to ~50 ms per pass on one thread.
    let mut iters = 1u64 << 16;
    loop {
        let t0 = Instant::now();
        black_box(fma_loop(level, iters).0);
        if t0.elapsed().as_secs_f64() > 0.01 || iters > 1 << 34 {
            iters = (iters as f64 * 0.05 / t0.elapsed().as_secs_f64().max(1e-6)) as u64;
            break;
        }
        iters *= 4;
    }
    let iters = iters.max(1 << 10);
    let flops_per_iter = fma_loop(level, 1).1;
    let mut best = 0.0f64;
    for _ in 0..PASSES.min(3) {
        let secs = timed_parallel(threads, |_| fma_loop(level, iters).0.to_bits() as u64);
        best = best.max((flops_per_iter * iters * threads as u64) as f64 / secs / 1e9);
    }
    best
}

fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

/// Runs `f(thread)` on `threads` threads released together; returns the seconds from the
/// first start to the last finish.
fn timed_parallel<F>(threads: usize, f: F) -> f64
where
    F: Fn(usize) -> u64 + Sync,
{
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, f) = (&barrier, &f);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    black_box(f(t));
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ceiling thread panicked"))
            .collect()
    });
    let start = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let end = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    (end - start).as_secs_f64().max(1e-9)
}

/// Reads every word of `buf` (a multiple of 64 words) and folds them into one value.
fn read_sum(level: SimdLevel, buf: &[u64]) -> u64 {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is available on this machine (checked by the callers).
        SimdLevel::Avx512 => unsafe { x86::read_avx512(buf) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::read_avx2(buf) },
        _ => read_portable(buf),
    }
}

fn read_portable(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in buf.chunks_exact(8) {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().fold(0, |a, &b| a ^ b)
}

/// `iters` iterations of independent FMAs; returns (a value depending on all of them,
/// flops per iteration).
fn fma_loop(level: SimdLevel, iters: u64) -> (f32, u64) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is available on this machine (checked by the callers).
        SimdLevel::Avx512 => unsafe { x86::fma_avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::fma_avx2(iters) },
        _ => fma_portable(iters),
    }
}

fn fma_portable(iters: u64) -> (f32, u64) {
    let mut acc = [1.0f32; 8];
    let (a, b) = (black_box(0.999_999f32), black_box(1e-7f32));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = x.mul_add(a, b);
        }
    }
    (acc.iter().sum(), 8 * 2)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// # Safety
    /// The CPU must support AVX-512F; `buf.len()` must be a multiple of 64.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn read_avx512(buf: &[u64]) -> u64 {
        let mut acc = [_mm512_setzero_si512(); 8];
        for block in buf.chunks_exact(64) {
            let p = block.as_ptr() as *const __m512i;
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: `block` has 64 u64 = 8 vectors of 64 bytes; unaligned loads.
                *a = _mm512_add_epi64(*a, unsafe { _mm512_loadu_si512(p.add(i)) });
            }
        }
        let mut s = acc[0];
        for a in &acc[1..] {
            s = _mm512_xor_si512(s, *a);
        }
        _mm512_reduce_add_epi64(s) as u64
    }

    /// # Safety
    /// The CPU must support AVX2; `buf.len()` must be a multiple of 64.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn read_avx2(buf: &[u64]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 8];
        for block in buf.chunks_exact(32) {
            let p = block.as_ptr() as *const __m256i;
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: `block` has 32 u64 = 8 vectors of 32 bytes; unaligned loads.
                *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(i)) });
            }
        }
        let mut s = acc[0];
        for a in &acc[1..] {
            s = _mm256_xor_si256(s, *a);
        }
        let mut out = [0u64; 4];
        // SAFETY: `out` holds 32 bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s) };
        out.iter().fold(0, |a, &b| a ^ b)
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_avx512(iters: u64) -> (f32, u64) {
        const N: usize = 16;
        let a = _mm512_set1_ps(black_box(0.999_999));
        let b = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); N];
        for (i, x) in acc.iter_mut().enumerate() {
            *x = _mm512_add_ps(*x, _mm512_set1_ps(i as f32 * 1e-3));
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = acc[0];
        for x in &acc[1..] {
            s = _mm512_add_ps(s, *x);
        }
        (_mm512_reduce_add_ps(s), (N * 16 * 2) as u64)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_avx2(iters: u64) -> (f32, u64) {
        const N: usize = 12;
        let a = _mm256_set1_ps(black_box(0.999_999));
        let b = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); N];
        for (i, x) in acc.iter_mut().enumerate() {
            *x = _mm256_add_ps(*x, _mm256_set1_ps(i as f32 * 1e-3));
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = acc[0];
        for x in &acc[1..] {
            s = _mm256_add_ps(s, *x);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 32 bytes.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        (out.iter().sum(), (N * 8 * 2) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_reads_the_same_sum() {
        let buf: Vec<u64> = (0..64 * 37u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let want = read_portable(&buf);
        // Order-independent fold: every level sums 8 lanes of words then xors lane sums, so
        // compare against an equivalent portable fold per level width.
        for level in SimdLevel::available() {
            let got = read_sum(level, &buf);
            let lanes = match level {
                SimdLevel::Scalar => 8,
                SimdLevel::Avx2 => 32,
                SimdLevel::Avx512 => 64,
            };
            let mut acc = vec![0u64; lanes];
            for c in buf.chunks_exact(lanes) {
                for i in 0..lanes {
                    acc[i] = acc[i].wrapping_add(c[i]);
                }
            }
            let expect = match level {
                SimdLevel::Scalar => want,
                SimdLevel::Avx2 => {
                    // 8 vectors of 4 lanes xored together, then the 4 lanes xored.
                    (0..4).fold(0, |x, l| x ^ (0..8).fold(0, |y, v| y ^ acc[v * 4 + l]))
                }
                SimdLevel::Avx512 => (0..8).fold(0u64, |x, l| {
                    x.wrapping_add((0..8).fold(0, |y, v| y ^ acc[v * 8 + l]))
                }),
            };
            assert_eq!(got, expect, "{level:?}");
        }
    }

    #[test]
    fn ceilings_are_positive_and_plausible() {
        let bw = read_bandwidth(1, 4 << 20);
        assert!(bw > 0.1 && bw < 10_000.0, "{bw}");
        let peak = fma_peak(1);
        assert!(peak > 0.1 && peak < 100_000.0, "{peak}");
        // A wider level is never slower than portable code by much.
        let scalar = fma_peak_at(SimdLevel::Scalar, 1);
        assert!(peak >= scalar * 0.5, "{peak} vs {scalar}");
    }
}
