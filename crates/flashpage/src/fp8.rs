//! FP8 element formats for a quantised KV cache (issue 13, part 2): exact decoding and
//! round-to-nearest-even encoding of the two OCP 8-bit floats, bit manipulation only (no
//! table, no `f64`), so the same arithmetic can run in SIMD registers.
//!
//! | format | bits (sign, exponent, mantissa) | bias | largest finite | smallest subnormal | inf | NaN |
//! |---|---|---|---|---|---|---|
//! | [`Fp8Format::E4M3Fn`] | 1, 4, 3 | 7 | 448 | 2^-9 | none | `S.1111.111` |
//! | [`Fp8Format::E5M2`] | 1, 5, 2 | 15 | 57344 | 2^-16 | `S.11111.00` | `S.11111.{01,10,11}` |
//!
//! Encoding rounds to nearest, ties to even. **E4M3Fn saturates**: every value beyond the
//! largest finite one, infinities included, becomes `±448` (the format has no infinity; this
//! is the "satfinite" conversion of NVIDIA's `cvt` and the one serving engines quantise a
//! cache with). **E5M2 overflows to infinity** as an IEEE format: values from `61440` (the
//! midpoint past `57344`) up become `±inf`. `NaN` stays `NaN` in both, and the sign of zero is
//! kept. Decoding is exact (every FP8 value is an f32).
//!
//! A scale turns a quantised element into a value: `x = decode(code) · scale`, and
//! quantising divides first: `code = encode(x / scale)` ([`quantize`], [`dequantize`]).

/// An 8-bit floating-point format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, no infinity (`float8_e4m3fn`).
    E4M3Fn,
    /// 5 exponent bits, 2 mantissa bits, IEEE-style infinities (`float8_e5m2`).
    E5M2,
}

impl Fp8Format {
    /// Mantissa bits.
    const fn mbits(self) -> u32 {
        match self {
            Fp8Format::E4M3Fn => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    /// Exponent bias.
    const fn bias(self) -> u32 {
        match self {
            Fp8Format::E4M3Fn => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// The largest finite value: 448 (E4M3Fn) or 57344 (E5M2).
    pub const fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3Fn => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// The format's name as torch spells it: `float8_e4m3fn` or `float8_e5m2`.
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3Fn => "float8_e4m3fn",
            Fp8Format::E5M2 => "float8_e5m2",
        }
    }

    /// The exact value of `code`.
    #[inline]
    pub fn decode(self, code: u8) -> f32 {
        let (mb, bias) = (self.mbits(), self.bias());
        let sign = ((code as u32) >> 7) << 31;
        let mag = (code & 0x7f) as u32;
        let (e, m) = (mag >> mb, mag & ((1 << mb) - 1));
        let emax_field = (1u32 << (7 - mb)) - 1;
        let bits = if e == 0 {
            // Subnormal (or zero): m · 2^(1 - bias - mb), exact in f32.
            let v = m as f32 * f32::from_bits((127 + 1 - bias - mb) << 23);
            v.to_bits()
        } else if e == emax_field && self == Fp8Format::E5M2 {
            // Infinity (m = 0) or NaN.
            0x7f80_0000 | (m << 21)
        } else if e == emax_field && m == (1 << mb) - 1 {
            // E4M3Fn's only NaN.
            0x7fc0_0000
        } else {
            ((e + 127 - bias) << 23) | (m << (23 - mb))
        };
        f32::from_bits(sign | bits)
    }

    /// `x` rounded to the nearest code, ties to even (see the module documentation for
    /// overflow: E4M3Fn saturates to `±448`, E5M2 becomes `±inf`).
    #[inline]
    pub fn encode(self, x: f32) -> u8 {
        let (mb, bias) = (self.mbits(), self.bias());
        let u = x.to_bits();
        let sign = ((u >> 31) as u8) << 7;
        let a = u & 0x7fff_ffff;
        if a > 0x7f80_0000 {
            // NaN: E4M3Fn's NaN is all ones; E5M2's a quiet NaN.
            return sign
                | match self {
                    Fp8Format::E4M3Fn => 0x7f,
                    Fp8Format::E5M2 => 0x7e,
                };
        }
        let max_code: u32 = match self {
            Fp8Format::E4M3Fn => 0x7e,
            Fp8Format::E5M2 => 0x7c, // infinity: everything that rounds past 0x7b
        };
        // The smallest normal FP8 value is 2^(1 - bias): f32 exponent field 128 - bias.
        let min_normal_bits = (128 - bias) << 23;
        let code = if a < min_normal_bits {
            // Subnormal range: the quantum is 2^(1 - bias - mb); a / quantum is exact
            // (a power-of-two scale of a value far from the f32 limits) and rounds to an
            // integer n <= 2^mb, which is the code itself (2^mb is the smallest normal).
            let scale = f32::from_bits((127 + bias + mb - 1) << 23);
            (f32::from_bits(a) * scale).round_ties_even() as u32
        } else {
            // Normal: drop 23 - mb mantissa bits with round-to-nearest-even on the f32
            // bits (a carry moves into the exponent, as it should), then rebias.
            let shift = 23 - mb;
            let r = (a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift;
            (r - ((127 - bias) << mb)).min(max_code)
        };
        sign | code as u8
    }
}

/// Quantises `src` into `dst` (same length): `dst[i] = format.encode(src[i] / scale)`.
///
/// # Errors
/// [`crate::Error::TensorShape`] when the lengths differ, [`crate::Error::InvalidOption`]
/// when `scale` is not a finite positive normal f32 (it divides every element).
pub fn quantize(src: &[f32], scale: f32, format: Fp8Format, dst: &mut [u8]) -> crate::Result<()> {
    check(src.len(), dst.len(), scale)?;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = format.encode(x / scale);
    }
    Ok(())
}

/// Dequantises `src` into `dst` (same length): `dst[i] = format.decode(src[i]) · scale`.
///
/// # Errors
/// As [`quantize`].
pub fn dequantize(src: &[u8], scale: f32, format: Fp8Format, dst: &mut [f32]) -> crate::Result<()> {
    check(src.len(), dst.len(), scale)?;
    for (d, &c) in dst.iter_mut().zip(src) {
        *d = format.decode(c) * scale;
    }
    Ok(())
}

fn check(src: usize, dst: usize, scale: f32) -> crate::Result<()> {
    if src != dst {
        return Err(crate::Error::TensorShape {
            tensor: "dst",
            expected: format!("{src} elements (as src)"),
            actual: format!("{dst} elements"),
        });
    }
    if !(scale.is_finite() && scale >= f32::MIN_POSITIVE) {
        return Err(crate::Error::InvalidOption {
            field: "fp8 scale",
            expected: "a finite f32 of at least the smallest normal (it divides every element)",
            actual: scale.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of a code from the format's definition, in f64.
    fn value(f: Fp8Format, c: u8) -> f64 {
        let (eb, mb, bias) = match f {
            Fp8Format::E4M3Fn => (4, 3, 7),
            Fp8Format::E5M2 => (5, 2, 15),
        };
        let s = if c & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((c & 0x7f) >> mb) as i32;
        let m = (c & ((1 << mb) - 1)) as f64;
        let emax = (1 << eb) - 1;
        if f == Fp8Format::E5M2 && e == emax {
            return if m == 0.0 {
                s * f64::INFINITY
            } else {
                f64::NAN
            };
        }
        if f == Fp8Format::E4M3Fn && e == emax && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 {
            s * m / (1 << mb) as f64 * 2f64.powi(1 - bias)
        } else {
            s * (1.0 + m / (1 << mb) as f64) * 2f64.powi(e - bias)
        }
    }

    const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3Fn, Fp8Format::E5M2];

    #[test]
    fn every_code_decodes_exactly_and_round_trips() {
        for f in FORMATS {
            for c in 0..=255u8 {
                let want = value(f, c);
                let got = f.decode(c);
                if want.is_nan() {
                    assert!(got.is_nan(), "{f:?} {c:#04x}");
                    assert!(f.decode(f.encode(got)).is_nan(), "{f:?} {c:#04x}");
                    continue;
                }
                assert_eq!(got as f64, want, "{f:?} {c:#04x}");
                assert_eq!(got.is_sign_negative(), c & 0x80 != 0, "{f:?} {c:#04x}");
                assert_eq!(f.encode(got), c, "{f:?} {c:#04x} -> {got}");
            }
            assert_eq!(f.decode(f.encode(f.max_finite())), f.max_finite());
        }
    }

    #[test]
    fn rounding_is_to_nearest_ties_to_even() {
        for f in FORMATS {
            // Adjacent finite non-negative codes: the midpoint goes to the even code, and
            // anything nearer one of them goes to that one.
            let finite: Vec<u8> = (0..=0x7fu8).filter(|&c| f.decode(c).is_finite()).collect();
            for w in finite.windows(2) {
                let (lo, hi) = (f.decode(w[0]) as f64, f.decode(w[1]) as f64);
                let mid = (lo + hi) / 2.0;
                let even = if w[0] & 1 == 0 { w[0] } else { w[1] };
                assert_eq!(f.encode(mid as f32), even, "{f:?} midpoint {mid}");
                assert_eq!(f.encode(-mid as f32), even | 0x80, "{f:?} -midpoint {mid}");
                let below = f32::from_bits((mid as f32).to_bits() - 1);
                let above = f32::from_bits((mid as f32).to_bits() + 1);
                assert_eq!(f.encode(below), w[0], "{f:?} below {mid}");
                assert_eq!(f.encode(above), w[1], "{f:?} above {mid}");
            }
        }
    }

    #[test]
    fn overflow_nan_and_zero() {
        let e4 = Fp8Format::E4M3Fn;
        for x in [449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(e4.decode(e4.encode(x)), 448.0, "{x}");
            assert_eq!(e4.decode(e4.encode(-x)), -448.0, "{x}");
        }
        let e5 = Fp8Format::E5M2;
        assert_eq!(e5.decode(e5.encode(61439.0)), 57344.0);
        for x in [61440.0, 1e6, f32::INFINITY] {
            assert_eq!(e5.decode(e5.encode(x)), f32::INFINITY, "{x}");
            assert_eq!(e5.decode(e5.encode(-x)), f32::NEG_INFINITY, "{x}");
        }
        for f in FORMATS {
            assert!(f.decode(f.encode(f32::NAN)).is_nan());
            assert!(f.decode(f.encode(-f32::NAN)).is_nan());
            assert_eq!(f.encode(0.0), 0);
            assert_eq!(f.encode(-0.0), 0x80);
            // Far below half the smallest subnormal: zero, with the sign.
            assert_eq!(f.encode(1e-30), 0);
            assert_eq!(f.encode(-f32::from_bits(1)), 0x80);
        }
    }

    #[test]
    fn random_values_round_to_a_nearest_code() {
        let mut s = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f32::from_bits((s >> 32) as u32);
            if !x.is_finite() {
                continue;
            }
            for f in FORMATS {
                let got = f.decode(f.encode(x)) as f64;
                let xd = x as f64;
                if xd.abs() > f.max_finite() as f64 {
                    continue; // overflow: checked above
                }
                // No finite code is strictly nearer than the chosen one.
                let best = (0..=255u8)
                    .map(|c| value(f, c))
                    .filter(|v| v.is_finite())
                    .map(|v| (v - xd).abs())
                    .fold(f64::INFINITY, f64::min);
                assert_eq!((got - xd).abs(), best, "{f:?} {x}");
            }
        }
    }

    #[test]
    fn quantize_scales_and_checks() {
        let src = [1.0f32, -3.5, 0.02, 900.0];
        let mut q = [0u8; 4];
        quantize(&src, 2.0, Fp8Format::E4M3Fn, &mut q).unwrap();
        let mut back = [0f32; 4];
        dequantize(&q, 2.0, Fp8Format::E4M3Fn, &mut back).unwrap();
        assert_eq!(back[..2], [1.0, -3.5]);
        assert!((back[2] - 0.02).abs() <= 0.02 / 16.0);
        assert_eq!(back[3], 896.0); // 450 saturates to 448, times 2
        assert!(matches!(
            quantize(&src, 0.0, Fp8Format::E5M2, &mut q),
            Err(crate::Error::InvalidOption { .. })
        ));
        assert!(matches!(
            quantize(&src, f32::NAN, Fp8Format::E5M2, &mut q),
            Err(crate::Error::InvalidOption { .. })
        ));
        assert!(matches!(
            dequantize(&q[..3], 1.0, Fp8Format::E5M2, &mut back),
            Err(crate::Error::TensorShape { .. })
        ));
    }
}
