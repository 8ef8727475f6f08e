//! The f64 oracle of the standalone RoPE: each pair's frequency written straight from the
//! published formulas (GPT-NeoX/GPT-J rotation; linear, NTK-aware, Llama 3.1 and YaRN
//! scaling as in Hugging Face `transformers`' `modeling_rope_utils`), one element at a time.

use flashpage::ops::rope::{Rope, RopeScaling, RopeStyle};
use std::f64::consts::PI;

/// The angular frequency of pair `i` of a head of `d` elements, and the cos/sin factor.
pub fn pair_frequency(rope: &Rope, d: usize, i: usize) -> (f64, f64) {
    let d = d as f64;
    let plain = |theta: f64| 1.0 / theta.powf(2.0 * i as f64 / d);
    match rope.scaling {
        RopeScaling::None => (plain(rope.theta), 1.0),
        RopeScaling::Linear { factor } => (plain(rope.theta) / factor, 1.0),
        RopeScaling::Ntk { factor } => (plain(rope.theta * factor.powf(d / (d - 2.0))), 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_position: old,
        } => {
            let f = plain(rope.theta);
            let wavelen = 2.0 * PI / f;
            let old = old as f64;
            let out = if wavelen < old / hi {
                f
            } else if wavelen > old / lo {
                f / factor
            } else {
                let s = (old / wavelen - lo) / (hi - lo);
                (1.0 - s) * f / factor + s * f
            };
            (out, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position: old,
            beta_fast,
            beta_slow,
        } => {
            let dim_of =
                |rot: f64| (d * ((old as f64) / (rot * 2.0 * PI)).ln()) / (2.0 * rope.theta.ln());
            let low = f64::max(dim_of(beta_fast).floor(), 0.0);
            let mut high = f64::min(dim_of(beta_slow).ceil(), d - 1.0);
            if low == high {
                high += 0.001;
            }
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extra = plain(rope.theta);
            let inter = extra / factor;
            let w = 1.0 - ramp; // weight of extrapolation
            let m = if factor > 1.0 {
                0.1 * factor.ln() + 1.0
            } else {
                1.0
            };
            (inter * (1.0 - w) + extra * w, m)
        }
    }
}

/// Rotates one head `x` to position `pos` in f64.
pub fn rotate(rope: &Rope, x: &mut [f64], pos: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let (f, m) = pair_frequency(rope, d, i);
        let (s, c) = (pos * f).sin_cos();
        let (c, s) = (c * m, s * m);
        let (a, b) = match rope.style {
            RopeStyle::RotateHalf => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * c - xb * s;
        x[b] = xb * c + xa * s;
    }
}
