//! Operations around the attention call that a serving engine needs every step, with the
//! same discipline as attention (everything checked first, a typed [`Error`](crate::Error)
//! naming the argument, expected and actual value, nothing written on error):
//!
//! - [`append`]: write new tokens' K/V into the paged cache ([`append::append_kv`]), any
//!   input dtype to the cache's, optionally rotated (RoPE) on the way;
//! - [`rope`]: rotary embedding as an operation ([`rope::apply_rope`]) with the rotate-half and
//!   interleaved conventions and linear / NTK / Llama-3.1 / YaRN scaling;
//! - [`Rows`]/[`RowsMut`]: strided token-row views, so a fused QKV projection needs no copy.
//!
//! These run on the host (CPU); the flow is the same as attention's: `validate` (each op's
//! checks) then the loop that writes.

pub mod append;
pub mod rope;
mod rows;
#[cfg(feature = "cuda")]
pub(crate) use rows::check_rows;

pub use rows::{Rows, RowsMut};

use crate::tensor::{TensorMut, TensorRef};

/// Widens `out.len()` elements of `t` starting at `off` to f32 (in bounds: checked by the
/// caller's validation).
#[inline]
pub(crate) fn load_f32(t: &TensorRef<'_>, off: usize, out: &mut [f32]) {
    let n = out.len();
    match t {
        TensorRef::F32(s) => out.copy_from_slice(&s[off..off + n]),
        TensorRef::F16(s) => {
            for (o, x) in out.iter_mut().zip(&s[off..off + n]) {
                *o = x.to_f32();
            }
        }
        TensorRef::BF16(s) => {
            for (o, x) in out.iter_mut().zip(&s[off..off + n]) {
                *o = x.to_f32();
            }
        }
        TensorRef::Fp8(f, s) => {
            for (o, &x) in out.iter_mut().zip(&s[off..off + n]) {
                *o = f.decode(x);
            }
        }
    }
}

/// Rounds `src` to `t`'s dtype (round to nearest even; FP8: [`crate::fp8::Fp8Format::encode`]
/// of the values as given, the caller divides by the scale first) and stores it at `off`.
#[inline]
pub(crate) fn store_f32(t: &mut TensorMut<'_>, off: usize, src: &[f32]) {
    let n = src.len();
    match t {
        TensorMut::F32(s) => s[off..off + n].copy_from_slice(src),
        TensorMut::F16(s) => {
            for (o, &x) in s[off..off + n].iter_mut().zip(src) {
                *o = half::f16::from_f32(x);
            }
        }
        TensorMut::BF16(s) => {
            for (o, &x) in s[off..off + n].iter_mut().zip(src) {
                *o = half::bf16::from_f32(x);
            }
        }
        TensorMut::Fp8(f, s) => {
            for (o, &x) in s[off..off + n].iter_mut().zip(src) {
                *o = f.encode(x);
            }
        }
    }
}
