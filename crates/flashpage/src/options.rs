//! Attention options: masks, scaling and positional encoding.

use crate::error::{Error, Result};

/// Positional encoding applied inside the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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

    /// Parses a positional encoding by name (`none`, `alibi` or `rope`, ASCII case-insensitive),
    /// with RoPE's `theta` and `scale` (defaults `1e4` and `1`). Theta or scale given with
    /// another encoding is an error, so a typo cannot silently drop them. The one parser
    /// behind every input format (JSON batches, safetensors metadata, the case suite).
    ///
    /// ```
    /// use flashpage::PosEncoding;
    /// assert_eq!(PosEncoding::parse("ROPE", Some(5e5), None).unwrap(),
    ///            PosEncoding::Rope { theta: 5e5, scale: 1.0 });
    /// assert!(PosEncoding::parse("alibi", Some(1e4), None).is_err());
    /// assert!(PosEncoding::parse("yarn", None, None).is_err());
    /// ```
    pub fn parse(name: &str, rope_theta: Option<f32>, rope_scale: Option<f32>) -> Result<Self> {
        let p: PosEncoding = name.parse()?;
        match p {
            PosEncoding::Rope { theta, scale } => Ok(PosEncoding::Rope {
                theta: rope_theta.unwrap_or(theta),
                scale: rope_scale.unwrap_or(scale),
            }),
            _ if rope_theta.is_some() || rope_scale.is_some() => Err(Error::InvalidOption {
                field: if rope_theta.is_some() {
                    "rope_theta"
                } else {
                    "rope_scale"
                },
                expected: "no rope_theta or rope_scale unless pos_encoding is rope",
                actual: format!("pos_encoding {}", p.name()),
            }),
            _ => Ok(p),
        }
    }
}

impl std::str::FromStr for PosEncoding {
    type Err = Error;
    /// `none`, `alibi` or `rope` (ASCII case-insensitive); RoPE with its default theta and
    /// scale ([`PosEncoding::ROPE_DEFAULT`]).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            Ok(PosEncoding::None)
        } else if t.eq_ignore_ascii_case("alibi") {
            Ok(PosEncoding::Alibi)
        } else if t.eq_ignore_ascii_case("rope") {
            Ok(PosEncoding::ROPE_DEFAULT)
        } else {
            Err(Error::InvalidOption {
                field: "pos_encoding",
                expected: "none, alibi or rope",
                actual: format!("{:?}", s.chars().take(40).collect::<String>()),
            })
        }
    }
}

/// What the attention computes, besides the plain softmax(q·kᵀ)·v.
///
/// Built from [`AttentionOptions::default`] (or [`AttentionOptions::new`]) with the `with_*`
/// methods; the fields are public to read and to change on an existing value.
///
/// ```
/// use flashpage::{AttentionOptions, PosEncoding};
/// let gemma2 = AttentionOptions::new()
///     .with_sm_scale(1.0 / 12.0)
///     .with_logits_soft_cap(50.0)
///     .with_window_left(4095);
/// assert!(gemma2.validate().is_ok());
/// assert_eq!(gemma2.resolved_sm_scale(128), 1.0 / 12.0);
/// assert_eq!(gemma2.window_left, Some(4095));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct AttentionOptions {
    /// Causal mask, bottom-right aligned: row `i` of a request sees key `j` iff
    /// `j <= i + kv_len - qo_len`.
    pub causal: bool,
    /// Scale applied to q·k; `None` means `1/sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
    /// Logits soft-cap `c`: `s = c * tanh(s / c)` (Gemma-2 uses 50).
    pub logits_soft_cap: Option<f32>,
    /// Sliding window: row `i` sees key `j` only if `j >= i + kv_len - qo_len - window_left`.
    /// `None`: no window.
    pub window_left: Option<u32>,
    /// Positional encoding applied on the fly.
    pub pos_encoding: PosEncoding,
    /// Also write the log-sum-exp (natural log) of every row and head.
    pub return_lse: bool,
}

/// A float as messages show it: plain, or in exponent form when tiny or huge (so `1e-45` is
/// not printed as a run of zeros).
fn show_f32(v: f32) -> String {
    if v != 0.0 && v.is_finite() && (v.abs() < 1e-4 || v.abs() >= 1e16) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Checks a scale-like option: finite and at least the smallest normal f32, so the
/// arithmetic it enters (a product, a division) stays meaningful.
fn normal_positive(field: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v >= f32::MIN_POSITIVE {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            field,
            expected: "a finite number of at least 1.1754944e-38 (the smallest normal f32)",
            actual: show_f32(v),
        })
    }
}

impl AttentionOptions {
    /// No mask, default scale, no soft-cap, no window, no positional encoding, no LSE.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the causal mask.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets the scale of q·k (`None`: `1/sqrt(head_dim)`).
    pub fn with_sm_scale(mut self, sm_scale: impl Into<Option<f32>>) -> Self {
        self.sm_scale = sm_scale.into();
        self
    }
    /// Sets the logits soft-cap (`None`: none).
    pub fn with_logits_soft_cap(mut self, cap: impl Into<Option<f32>>) -> Self {
        self.logits_soft_cap = cap.into();
        self
    }
    /// Sets the sliding window (`None`: none).
    pub fn with_window_left(mut self, window_left: impl Into<Option<u32>>) -> Self {
        self.window_left = window_left.into();
        self
    }
    /// Sets the positional encoding.
    pub fn with_pos_encoding(mut self, pos_encoding: PosEncoding) -> Self {
        self.pos_encoding = pos_encoding;
        self
    }
    /// Asks for the log-sum-exp of every row and head.
    pub fn with_return_lse(mut self, return_lse: bool) -> Self {
        self.return_lse = return_lse;
        self
    }

    /// Checks every option (docs/semantics.md): `sm_scale`, the soft-cap and RoPE's scale
    /// finite and at least the smallest normal f32; RoPE's theta finite and above 1.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.sm_scale {
            normal_positive("sm_scale", s)?;
        }
        if let Some(c) = self.logits_soft_cap {
            normal_positive("logits_soft_cap", c)?;
        }
        if let PosEncoding::Rope { theta, scale } = self.pos_encoding {
            if !(theta.is_finite() && theta > 1.0) {
                return Err(Error::InvalidOption {
                    field: "rope_theta",
                    expected: "a finite number above 1",
                    actual: show_f32(theta),
                });
            }
            normal_positive("rope_scale", scale)?;
        }
        Ok(())
    }

    /// The scale actually applied to q·k for a head dimension.
    pub fn resolved_sm_scale(&self, head_dim: usize) -> f32 {
        self.sm_scale
            .unwrap_or_else(|| (1.0 / (head_dim as f64).sqrt()) as f32)
    }

    /// Converts a signed window in FlashInfer's convention (`-1`: no window) to
    /// [`AttentionOptions::window_left`]: `-1` is `None`, `0..=u32::MAX` is the window, anything
    /// else an [`Error::InvalidOption`] naming `window_left`.
    ///
    /// ```
    /// use flashpage::AttentionOptions;
    /// assert_eq!(AttentionOptions::window_from_signed(-1), Ok(None));
    /// assert_eq!(AttentionOptions::window_from_signed(4095), Ok(Some(4095)));
    /// assert!(AttentionOptions::window_from_signed(-2).is_err());
    /// ```
    pub fn window_from_signed(window_left: i64) -> Result<Option<u32>> {
        match window_left {
            -1 => Ok(None),
            w => u32::try_from(w)
                .map(Some)
                .map_err(|_| Error::InvalidOption {
                    field: "window_left",
                    expected: "-1 (no window) or a number in 0..=4294967295",
                    actual: w.to_string(),
                }),
        }
    }

    /// The window in keys (`None` when disabled).
    pub fn window(&self) -> Option<usize> {
        self.window_left.map(|w| w as usize)
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
        let d = AttentionOptions::default;
        let rope = |theta, scale| d().with_pos_encoding(PosEncoding::Rope { theta, scale });
        let bad = [
            (d().with_sm_scale(0.0), "sm_scale"),
            (d().with_sm_scale(f32::NAN), "sm_scale"),
            (d().with_sm_scale(1e-40), "sm_scale"),
            (d().with_logits_soft_cap(-1.0), "logits_soft_cap"),
            (d().with_logits_soft_cap(f32::INFINITY), "logits_soft_cap"),
            (d().with_logits_soft_cap(1e-45), "logits_soft_cap"),
            (rope(0.0, 1.0), "rope_theta"),
            (rope(1e-30, 1.0), "rope_theta"),
            (rope(f32::INFINITY, 1.0), "rope_theta"),
            (rope(1e4, -1.0), "rope_scale"),
            (rope(1e4, 1e-45), "rope_scale"),
        ];
        for (o, f) in bad {
            match o.validate() {
                Err(Error::InvalidOption { field, .. }) => assert_eq!(field, f),
                other => panic!("{o:?}: expected InvalidOption for {f}, got {other:?}"),
            }
        }
        assert!(AttentionOptions::default().validate().is_ok());
        assert!(rope(5e5, 8.0).validate().is_ok());
        assert!(d().with_sm_scale(f32::MIN_POSITIVE).validate().is_ok());
    }

    #[test]
    fn one_parser_for_positional_encodings() {
        for (s, want) in [
            ("none", PosEncoding::None),
            ("NONE", PosEncoding::None),
            ("Alibi", PosEncoding::Alibi),
            ("rope", PosEncoding::ROPE_DEFAULT),
            ("ROPE", PosEncoding::ROPE_DEFAULT),
        ] {
            assert_eq!(s.parse::<PosEncoding>().unwrap(), want, "{s}");
        }
        let e = "rotary".parse::<PosEncoding>().unwrap_err();
        assert!(e.to_string().contains("pos_encoding"), "{e}");
        assert_eq!(
            PosEncoding::parse("rope", None, Some(4.0)).unwrap(),
            PosEncoding::Rope {
                theta: 1e4,
                scale: 4.0
            }
        );
        match PosEncoding::parse("none", None, Some(4.0)) {
            Err(Error::InvalidOption { field, .. }) => assert_eq!(field, "rope_scale"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn alibi_slopes_non_power_of_two() {
        // 12 heads: n = 8; heads 8.. use the interleaved extra slopes.
        assert_eq!(alibi_slope(8, 12), 2f64.powf(-4.0 * 1.0 / 8.0));
        assert_eq!(alibi_slope(9, 12), 2f64.powf(-4.0 * 3.0 / 8.0));
    }
}
