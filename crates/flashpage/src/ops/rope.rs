//! Rotary position embedding as a standalone operation: rotate q/k rows in place at explicit
//! positions, in the rotate-half (GPT-NeoX, Llama) or interleaved (GPT-J) convention, with
//! linear, NTK-aware, Llama-3.1 or YaRN frequency scaling.
//!
//! Frequencies and angles are formed in f64 (as the f64 reference does), so long contexts
//! keep their precision; the rotation itself runs in f32 and rounds once to the tensor's
//! dtype.

use crate::error::{Error, Result};

use super::rows::RowsMut;
use super::{load_f32, store_f32};

/// Which pairs of a head's elements a rotation mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeStyle {
    /// Element `i` with element `i + head_dim/2` (GPT-NeoX, Llama, Qwen, Gemma).
    #[default]
    RotateHalf,
    /// Element `2i` with element `2i + 1` (GPT-J, some Chinese models).
    Interleaved,
}

/// How the base frequencies are rescaled for contexts beyond training length.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// Frequencies `theta^(-2i/d)`.
    #[default]
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        /// Scaling factor (> 0).
        factor: f64,
    },
    /// NTK-aware scaling: the base becomes `theta * factor^(d / (d - 2))`.
    Ntk {
        /// Scaling factor (> 0).
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        /// Scaling factor (8 in Llama 3.1).
        factor: f64,
        /// Wavelengths above `original_max_position / low_freq_factor` are scaled (1).
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position / high_freq_factor` are kept (4).
        high_freq_factor: f64,
        /// The context length of pre-training (8192).
        original_max_position: usize,
    },
    /// YaRN: per-frequency blend of interpolation and extrapolation by a linear ramp between
    /// the dimensions that rotate `beta_fast` and `beta_slow` times over the original
    /// context, and cos/sin multiplied by `0.1 ln(factor) + 1`.
    Yarn {
        /// Scaling factor (> 0).
        factor: f64,
        /// The context length of pre-training.
        original_max_position: usize,
        /// Rotations above which a dimension extrapolates (32).
        beta_fast: f64,
        /// Rotations below which a dimension interpolates (1).
        beta_slow: f64,
    },
}

/// A rotary embedding: base, convention and scaling.
///
/// ```
/// use flashpage::ops::rope::{Rope, RopeScaling, RopeStyle};
/// let llama31 = Rope::new(5e5).with_scaling(RopeScaling::Llama3 {
///     factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 });
/// assert!(llama31.validate(128).is_ok());
/// assert_eq!(Rope::new(1e4).with_style(RopeStyle::Interleaved).style, RopeStyle::Interleaved);
/// assert!(Rope::new(0.5).validate(128).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Rope {
    /// Base of the frequencies (`1e4` in Llama 2, `5e5` in Llama 3).
    pub theta: f64,
    /// Which elements are paired.
    pub style: RopeStyle,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

fn bad(field: &'static str, expected: &'static str, actual: impl ToString) -> Error {
    Error::InvalidOption {
        field,
        expected,
        actual: actual.to_string(),
    }
}

fn positive(field: &'static str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(field, "a finite number above 0", v))
    }
}

impl Rope {
    /// Rotate-half RoPE of base `theta`, no scaling.
    pub fn new(theta: f64) -> Self {
        Rope {
            theta,
            style: RopeStyle::RotateHalf,
            scaling: RopeScaling::None,
        }
    }
    /// Sets the convention.
    pub fn with_style(mut self, style: RopeStyle) -> Self {
        self.style = style;
        self
    }
    /// Sets the scaling.
    pub fn with_scaling(mut self, scaling: RopeScaling) -> Self {
        self.scaling = scaling;
        self
    }

    /// Checks the parameters for a head dimension: theta finite and above 1, the head
    /// dimension even, every factor finite and positive, Llama-3.1's high frequency factor
    /// above the low one, YaRN's `beta_fast` above `beta_slow`.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(bad("rope_theta", "a finite number above 1", self.theta));
        }
        if head_dim < 2 || !head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", "an even number of at least 2", head_dim));
        }
        match self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } | RopeScaling::Ntk { factor } => {
                positive("rope_scaling.factor", factor)?
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                positive("rope_scaling.factor", factor)?;
                positive("rope_scaling.low_freq_factor", low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(bad(
                        "rope_scaling.high_freq_factor",
                        "a number above low_freq_factor",
                        format!("{high_freq_factor} (low_freq_factor {low_freq_factor})"),
                    ));
                }
                positive(
                    "rope_scaling.original_max_position",
                    original_max_position as f64,
                )?;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
            } => {
                positive("rope_scaling.factor", factor)?;
                positive(
                    "rope_scaling.original_max_position",
                    original_max_position as f64,
                )?;
                positive("rope_scaling.beta_slow", beta_slow)?;
                if !(beta_fast.is_finite() && beta_fast > beta_slow) {
                    return Err(bad(
                        "rope_scaling.beta_fast",
                        "a finite number above beta_slow",
                        format!("{beta_fast} (beta_slow {beta_slow})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `head_dim / 2` angular frequencies (radians per position) after scaling, and the
    /// factor cos and sin are multiplied by (1 except for YaRN). Call [`Rope::validate`]
    /// first.
    pub fn frequencies(&self, head_dim: usize) -> (Vec<f64>, f64) {
        let d = head_dim as f64;
        let half = head_dim / 2;
        let base = |theta: f64| -> Vec<f64> {
            (0..half).map(|i| theta.powf(-2.0 * i as f64 / d)).collect()
        };
        match self.scaling {
            RopeScaling::None => (base(self.theta), 1.0),
            RopeScaling::Linear { factor } => {
                (base(self.theta).iter().map(|f| f / factor).collect(), 1.0)
            }
            RopeScaling::Ntk { factor } => {
                let theta = self.theta * factor.powf(d / (d - 2.0).max(1.0));
                (base(theta), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let old = original_max_position as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let f = base(self.theta)
                    .into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect();
                (f, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
            } => {
                let old = original_max_position as f64;
                let correction = |rotations: f64| {
                    d * (old / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let low = correction(beta_fast).floor().max(0.0);
                let high = correction(beta_slow).ceil().min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let f = base(self.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, freq)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolate = 1.0 - ramp;
                        freq / factor * (1.0 - extrapolate) + freq * extrapolate
                    })
                    .collect();
                let mscale = if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                };
                (f, mscale)
            }
        }
    }
}

/// Checks positions: one per token, none negative.
pub(crate) fn check_positions(positions: &[i32], tokens: usize) -> Result<()> {
    if positions.len() != tokens {
        return Err(Error::ArrayLength {
            field: "positions",
            expected: tokens,
            actual: positions.len(),
            rule: "one position per token row",
        });
    }
    if let Some((i, &p)) = positions.iter().enumerate().find(|&(_, &p)| p < 0) {
        return Err(Error::InvalidOption {
            field: "positions",
            expected: "positions >= 0",
            actual: format!("positions[{i}] = {p}"),
        });
    }
    Ok(())
}

/// The cos/sin table of one position (`head_dim / 2` entries each), angles in f64.
pub(crate) struct Rotation {
    freqs: Vec<f64>,
    mscale: f64,
    style: RopeStyle,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotation {
    pub(crate) fn new(rope: &Rope, head_dim: usize) -> Self {
        let (freqs, mscale) = rope.frequencies(head_dim);
        Rotation {
            cos: vec![0.0; freqs.len()],
            sin: vec![0.0; freqs.len()],
            freqs,
            mscale,
            style: rope.style,
        }
    }

    /// Sets the table to position `pos`.
    pub(crate) fn at(&mut self, pos: i64) {
        for ((c, s), &f) in self.cos.iter_mut().zip(&mut self.sin).zip(&self.freqs) {
            let (sn, cs) = (pos as f64 * f).sin_cos();
            *c = (cs * self.mscale) as f32;
            *s = (sn * self.mscale) as f32;
        }
    }

    /// Rotates one head (`2 * cos.len()` elements) in place.
    pub(crate) fn rotate(&self, x: &mut [f32]) {
        let half = self.cos.len();
        match self.style {
            RopeStyle::RotateHalf => {
                let (lo, hi) = x.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * self.cos[i] - b * self.sin[i];
                    hi[i] = b * self.cos[i] + a * self.sin[i];
                }
            }
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * self.cos[i] - b * self.sin[i];
                    x[2 * i + 1] = b * self.cos[i] + a * self.sin[i];
                }
            }
        }
    }
}

/// Rotates every head of every token row of `x` in place, token `t` to `positions[t]`.
///
/// `x` may hold q heads, k heads, or both (the q and k heads of a fused QKV row are
/// adjacent, so one strided view covers them). Everything is checked before the first
/// write: the rope parameters for `x`'s head dimension, one non-negative position per row.
///
/// ```
/// use flashpage::ops::{rope::{Rope, apply_rope}, RowsMut};
/// use flashpage::TensorMut;
/// let mut q = vec![1.0f32; 2 * 4 * 16]; // 2 tokens, 4 heads, head_dim 16
/// apply_rope(&Rope::new(1e4), RowsMut::dense(TensorMut::F32(&mut q), 2, 4, 16)?, &[0, 7])?;
/// assert!(q[..64].iter().all(|&x| x == 1.0)); // position 0 is the identity
/// assert!(q[64..].iter().any(|&x| x != 1.0));
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn apply_rope(rope: &Rope, mut x: RowsMut<'_>, positions: &[i32]) -> Result<()> {
    let (tokens, heads, d) = (x.tokens(), x.heads(), x.head_dim());
    rope.validate(d)?;
    check_positions(positions, tokens)?;
    let mut rot = Rotation::new(rope, d);
    let mut buf = vec![0f32; d];
    for (t, &pos) in positions.iter().enumerate() {
        rot.at(pos as i64);
        for h in 0..heads {
            let off = x.offset(t, h);
            load_f32(&x.data().as_ref(), off, &mut buf);
            rot.rotate(&mut buf);
            store_f32(x.data(), off, &buf);
        }
    }
    Ok(())
}
