//! Attention options: masks, scaling and positional encoding.

use crate::error::{Error, Result};

/// Positional encoding applied inside the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum PosEncoding {
    /// No positional encoding (the caller already applied RoPE, or the model has none).
    #[default]
    None,
    /// ALiBi with the standard slopes for `num_qo_heads` heads, added after the soft-cap.
    Alibi,
    /// Rotary embedding on the fly (rotate-half convention): q at its absolute position,
    /// k at its token index.
    Rope {
        /// Base of the frequencies (`1e4` in Llama 2).
        theta: f32,
        /// Positions are divided by this (linear RoPE scaling); `1.0` for none.
        scale: f32,
    },
}

impl PosEncoding {
    /// RoPE with the default theta `1e4` and scale `1`.
    pub const ROPE_DEFAULT: PosEncoding = PosEncoding::Rope {
        theta: 1e4,
        scale: 1.0,
    };

    /// The lowercase name used in files and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            PosEncoding::None => "none",
            PosEncoding::Alibi => "alibi",
            PosEncoding::Rope { .. } => "rope",
        }
    }
}

/// What the attention computes, besides the plain softmax(q·kᵀ)·v.
///
/// ```
/// use flashpage::{AttentionOptions, PosEncoding};
/// let gemma2 = AttentionOptions {
///     sm_scale: Some(1.0 / 12.0),
///     logits_soft_cap: Some(50.0),
///     window_left: 4095,
///     ..AttentionOptions::default()
/// };
/// assert!(gemma2.validate().is_ok());
/// assert_eq!(gemma2.resolved_sm_scale(128), 1.0 / 12.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// Causal mask, bottom-right aligned: row `i` of a request sees key `j` iff
    /// `j <= i + kv_len - qo_len`.
    pub causal: bool,
    /// Scale applied to q·k; `None` means `1/sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
    /// Logits soft-cap `c`: `s = c * tanh(s / c)` (Gemma-2 uses 50).
    pub logits_soft_cap: Option<f32>,
    /// Sliding window: row `i` sees key `j` only if `j >= i + kv_len - qo_len - window_left`.
    /// `-1` disables the window.
    pub window_left: i32,
    /// Positional encoding applied on the fly.
    pub pos_encoding: PosEncoding,
    /// Also write the log-sum-exp (natural log) of every row and head.
    pub return_lse: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            causal: false,
            sm_scale: None,
            logits_soft_cap: None,
            window_left: -1,
            pos_encoding: PosEncoding::None,
            return_lse: false,
        }
    }
}

fn finite_positive(field: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            field,
            expected: "a finite number > 0",
            actual: format!("{v}"),
        })
    }
}

impl AttentionOptions {
    /// Checks every option (DESIGN §4): `sm_scale` and the soft-cap finite and positive,
    /// `window_left >= -1`, RoPE theta and scale finite and positive.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.sm_scale {
            finite_positive("sm_scale", s)?;
        }
        if let Some(c) = self.logits_soft_cap {
            finite_positive("logits_soft_cap", c)?;
        }
        if self.window_left < -1 {
            return Err(Error::InvalidOption {
                field: "window_left",
                expected: "-1 (no window) or a number >= 0",
                actual: self.window_left.to_string(),
            });
        }
        if let PosEncoding::Rope { theta, scale } = self.pos_encoding {
            finite_positive("rope_theta", theta)?;
            finite_positive("rope_scale", scale)?;
        }
        Ok(())
    }

    /// The scale actually applied to q·k for a head dimension.
    pub fn resolved_sm_scale(&self, head_dim: usize) -> f32 {
        self.sm_scale
            .unwrap_or_else(|| (1.0 / (head_dim as f64).sqrt()) as f32)
    }

    /// The window as an option (`None` when disabled).
    pub fn window(&self) -> Option<usize> {
        usize::try_from(self.window_left).ok()
    }
}

/// The ALiBi slope of head `h` among `num_heads` heads (the standard geometric slopes).
///
/// ```
/// assert_eq!(flashpage::options::alibi_slope(0, 8), 0.5);
/// assert_eq!(flashpage::options::alibi_slope(7, 8), 1.0 / 256.0);
/// ```
pub fn alibi_slope(h: usize, num_heads: usize) -> f64 {
    let n = if num_heads == 0 {
        1
    } else {
        1usize << (usize::BITS - 1 - num_heads.leading_zeros())
    };
    let n = n as f64;
    if (h as f64) < n {
        2f64.powf(-8.0 * (h as f64 + 1.0) / n)
    } else {
        2f64.powf(-4.0 * (2.0 * (h as f64 + 1.0 - n) - 1.0) / n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_each_bad_option() {
        let bad = [
            AttentionOptions {
                sm_scale: Some(0.0),
                ..Default::default()
            },
            AttentionOptions {
                sm_scale: Some(f32::NAN),
                ..Default::default()
            },
            AttentionOptions {
                logits_soft_cap: Some(-1.0),
                ..Default::default()
            },
            AttentionOptions {
                logits_soft_cap: Some(f32::INFINITY),
                ..Default::default()
            },
            AttentionOptions {
                window_left: -2,
                ..Default::default()
            },
            AttentionOptions {
                pos_encoding: PosEncoding::Rope {
                    theta: 0.0,
                    scale: 1.0,
                },
                ..Default::default()
            },
            AttentionOptions {
                pos_encoding: PosEncoding::Rope {
                    theta: 1e4,
                    scale: -1.0,
                },
                ..Default::default()
            },
        ];
        let fields = [
            "sm_scale",
            "sm_scale",
            "logits_soft_cap",
            "logits_soft_cap",
            "window_left",
            "rope_theta",
            "rope_scale",
        ];
        for (o, f) in bad.iter().zip(fields) {
            match o.validate() {
                Err(Error::InvalidOption { field, .. }) => assert_eq!(field, f),
                other => panic!("{o:?}: expected InvalidOption for {f}, got {other:?}"),
            }
        }
        assert!(AttentionOptions::default().validate().is_ok());
    }

    #[test]
    fn alibi_slopes_non_power_of_two() {
        // 12 heads: n = 8; heads 8.. use the interleaved extra slopes.
        assert_eq!(alibi_slope(8, 12), 2f64.powf(-4.0 * 1.0 / 8.0));
        assert_eq!(alibi_slope(9, 12), 2f64.powf(-4.0 * 3.0 / 8.0));
    }
}
