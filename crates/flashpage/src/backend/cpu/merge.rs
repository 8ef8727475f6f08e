//! Merging attention states `(o, lse)` (docs/semantics.md): the split-KV merge step of a plan, and
//! the public merge operators for cascades and custom splits.
//!
//! A state is an output row `o` (normalised, length `head_dim`) with its log-sum-exp `lse`
//! (natural log; `-inf` for a state that saw no key). Two states merge as
//! `lse = ln(e^lse_a + e^lse_b)`, `o = (e^lse_a·o_a + e^lse_b·o_b) / (e^lse_a + e^lse_b)`,
//! computed relative to the larger `lse` so nothing overflows; states with `lse = -inf`
//! contribute nothing, and merging only such states gives `o = 0`, `lse = -inf`.
//!
//! Accumulation is in f32 whatever the element type.

use super::ctx::Ctx;
use super::elem::Elem;
use super::simd::Isa;
use crate::error::{Error, Result, shape_str};

/// Merges the partial states of plan merge row `m` for every head into `o`/`lse`.
#[inline(always)]
pub(crate) fn merge_row<I: Isa, E: Elem, K>(ctx: &Ctx<'_, E, K>, m: usize, buf: &mut Vec<f32>) {
    let plan = ctx.plan;
    // m < num_merge_rows by construction of the merge step.
    let Some(mr) = plan.merge_row(m) else {
        return;
    };
    let heads = plan.heads();
    let (hq, d) = (heads.num_qo_heads(), heads.head_dim());
    let l = I::LANES;
    buf.resize(d, 0.0);
    for h in 0..hq {
        // SAFETY: partial rows are read-only during the merge step.
        let lse_of = |i: usize| unsafe {
            ctx.partial_lse
                .slice((mr.first + i * mr.stride) * hq + h, 1)[0]
        };
        let mut mx = f32::NEG_INFINITY;
        let mut nan = false;
        for i in 0..mr.count {
            let li = lse_of(i);
            nan |= li.is_nan();
            mx = mx.max(li);
        }
        let acc = &mut buf[..d];
        acc.fill(0.0);
        let lse = if nan {
            // A partial state poisoned by non-finite inputs: the row is NaN.
            acc.fill(f32::NAN);
            f32::NAN
        } else if mx == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            let mut sum = 0.0f32;
            for i in 0..mr.count {
                let li = lse_of(i);
                // Past the f32 range (mx = +inf) the merge is the limit: the +inf states
                // share the weight equally.
                let wgt = if mx == f32::INFINITY {
                    if li == f32::INFINITY { 1.0 } else { 0.0 }
                } else {
                    (li - mx).exp()
                };
                if li == f32::NEG_INFINITY || wgt == 0.0 {
                    continue;
                }
                sum += wgt;
                let prow = mr.first + i * mr.stride;
                // SAFETY: as above.
                let src = unsafe { ctx.partial_o.slice((prow * hq + h) * d, d) };
                let wv = I::splat(wgt);
                for c in (0..d).step_by(l) {
                    // SAFETY: c + LANES <= d (d is a multiple of 16) for src and acc.
                    unsafe {
                        let a = I::load::<f32>(acc.as_ptr().add(c));
                        let x = I::load::<f32>(src.as_ptr().add(c));
                        I::store::<f32>(acc.as_mut_ptr().add(c), I::fma(wv, x, a));
                    }
                }
            }
            let inv = I::splat(1.0 / sum);
            for c in (0..d).step_by(l) {
                // SAFETY: as above.
                unsafe {
                    let a = I::load::<f32>(acc.as_ptr().add(c));
                    I::store::<f32>(acc.as_mut_ptr().add(c), I::mul(a, inv));
                }
            }
            mx + sum.ln()
        };
        let (f, lse) = ctx.sink(h, lse);
        if f != 1.0 {
            let fv = I::splat(f);
            for c in (0..d).step_by(l) {
                // SAFETY: c + LANES <= d, the length of acc.
                unsafe {
                    let a = I::load::<f32>(acc.as_ptr().add(c));
                    I::store::<f32>(acc.as_mut_ptr().add(c), I::mul(a, fv));
                }
            }
        }
        // SAFETY: merge rows are distinct query rows; each writes only its own row × heads
        // (blocks of o that do not overlap: its strides are checked disjoint).
        unsafe {
            let dst = ctx.o.slice(ctx.o_off(mr.row, h), d);
            for c in (0..d).step_by(l) {
                I::store::<E>(dst.as_mut_ptr().add(c), I::load::<f32>(acc.as_ptr().add(c)));
            }
            if let Some(lt) = &ctx.lse {
                lt.slice(mr.row * hq + h, 1)[0] = lse;
            }
        }
    }
}

/// Merges `n` states given by `state(i) = (o_i, lse_i)` into `out`; returns the merged lse.
/// `acc` is f32 scratch of `out.len()`.
#[inline]
fn merge_into<'a, E: Elem>(
    n: usize,
    state: impl Fn(usize) -> (&'a [E], f32),
    acc: &mut [f32],
    out: &mut [E],
) -> f32 {
    let mut mx = f32::NEG_INFINITY;
    for i in 0..n {
        mx = mx.max(state(i).1);
    }
    acc.fill(0.0);
    let lse = if mx == f32::NEG_INFINITY || mx.is_nan() {
        mx
    } else if mx == f32::INFINITY {
        f32::NAN
    } else {
        let mut sum = 0.0f32;
        for i in 0..n {
            let (o, li) = state(i);
            if li == f32::NEG_INFINITY {
                continue;
            }
            let w = (li - mx).exp();
            sum += w;
            for (a, x) in acc.iter_mut().zip(o) {
                *a = w.mul_add(x.to_f32(), *a);
            }
        }
        let inv = 1.0 / sum;
        for a in acc.iter_mut() {
            *a *= inv;
        }
        mx + sum.ln()
    };
    for (dst, a) in out.iter_mut().zip(acc.iter()) {
        *dst = E::from_f32(*a);
    }
    lse
}

fn shape_error(tensor: &'static str, expected: &[usize], actual: usize) -> Error {
    let n = expected.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    Error::TensorShape {
        tensor,
        expected: match n {
            Some(n) => format!("{} ({n} elements)", shape_str(expected)),
            None => shape_str(expected),
        },
        actual: shape_str(&[actual]),
    }
}

fn rows_error(tensor: &'static str, num_heads: usize, actual: usize) -> Error {
    Error::TensorShape {
        tensor,
        expected: format!("[rows, {num_heads}] (a multiple of {num_heads} elements)"),
        actual: shape_str(&[actual]),
    }
}

fn check_positive(field: &'static str, x: usize) -> Result<()> {
    if x == 0 {
        return Err(Error::NotPositive { field, actual: 0 });
    }
    Ok(())
}

fn check_len(tensor: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let want = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if want != Some(len) {
        return Err(shape_error(tensor, shape, len));
    }
    Ok(())
}

/// Merges two sets of attention states row by row: `(v_a, s_a)` and `(v_b, s_b)` into
/// `(v_out, s_out)`.
///
/// `s_*` hold one natural-log LSE per state (`[n]`, e.g. `[rows, heads]` flattened) and
/// `v_*` one output row of `head_dim` per state (`[n, head_dim]`). An LSE is finite or
/// `-inf` (a state that saw no key); merging two `-inf` states gives a zero row and `-inf`.
/// Accumulates in f32; `v_out` is rounded to `E` once.
///
/// # Errors
/// [`Error::NotPositive`] for `head_dim == 0`; [`Error::TensorShape`] naming the first
/// slice whose length does not match `s_a.len()` states.
///
/// # Example
/// Attention over keys `{k0}` and over `{k1}`, merged, equals attention over `{k0, k1}`:
/// ```
/// use flashpage::backend::cpu::merge_state;
/// // One state each, head_dim 2. Logits 0 and ln 3: softmax weights 1/4 and 3/4.
/// let (va, sa) = ([1.0f32, 0.0], [0.0f32]);
/// let (vb, sb) = ([0.0f32, 1.0], [3f32.ln()]);
/// let (mut v, mut s) = ([0.0f32; 2], [0.0f32]);
/// merge_state(&va, &sa, &vb, &sb, 2, &mut v, &mut s)?;
/// assert!((v[0] - 0.25).abs() < 1e-6 && (v[1] - 0.75).abs() < 1e-6);
/// assert!((s[0] - 4f32.ln()).abs() < 1e-6);
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn merge_state<E: Elem>(
    v_a: &[E],
    s_a: &[f32],
    v_b: &[E],
    s_b: &[f32],
    head_dim: usize,
    v_out: &mut [E],
    s_out: &mut [f32],
) -> Result<()> {
    check_positive("head_dim", head_dim)?;
    let n = s_a.len();
    check_len("v_a", v_a.len(), &[n, head_dim])?;
    check_len("s_b", s_b.len(), &[n])?;
    check_len("v_b", v_b.len(), &[n, head_dim])?;
    check_len("s_out", s_out.len(), &[n])?;
    check_len("v_out", v_out.len(), &[n, head_dim])?;
    // Validation (reliability): with no state there is nothing to merge, and the scratch
    // below is then never sized by `head_dim` alone (the slices bound it otherwise).
    if n == 0 {
        return Ok(());
    }
    let mut acc = vec![0.0f32; head_dim];
    for (i, (out, so)) in v_out
        .chunks_exact_mut(head_dim)
        .zip(s_out.iter_mut())
        .enumerate()
    {
        let row = |k: usize| {
            let (v, s) = if k == 0 { (v_a, s_a) } else { (v_b, s_b) };
            (&v[i * head_dim..(i + 1) * head_dim], s[i])
        };
        *so = merge_into(2, row, &mut acc, out);
    }
    Ok(())
}

/// Merges `(v_other, s_other)` into `(v, s)` in place, row by row; rows whose `mask` entry is
/// false are left untouched.
///
/// Shapes: `v` and `v_other` are `[rows, num_heads, head_dim]`, `s` and `s_other`
/// `[rows, num_heads]`, `mask` (if given) `[rows]`. LSEs are natural-log, finite or `-inf`.
///
/// # Errors
/// [`Error::NotPositive`] for a zero `num_heads` or `head_dim`; [`Error::TensorShape`]
/// naming the first slice whose length does not match `s.len() / num_heads` rows.
///
/// # Example
/// ```
/// use flashpage::backend::cpu::merge_state_in_place;
/// // Two rows, one head, head_dim 1; only row 1 is merged.
/// let mut v = [1.0f32, 1.0];
/// let mut s = [0.0f32, 0.0];
/// let (vo, so) = ([3.0f32, 3.0], [0.0f32, 0.0]);
/// merge_state_in_place(&mut v, &mut s, &vo, &so, Some(&[false, true]), 1, 1)?;
/// assert_eq!(v[0], 1.0);
/// assert!((v[1] - 2.0).abs() < 1e-6 && (s[1] - 2f32.ln()).abs() < 1e-6);
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn merge_state_in_place<E: Elem>(
    v: &mut [E],
    s: &mut [f32],
    v_other: &[E],
    s_other: &[f32],
    mask: Option<&[bool]>,
    num_heads: usize,
    head_dim: usize,
) -> Result<()> {
    check_positive("num_heads", num_heads)?;
    check_positive("head_dim", head_dim)?;
    if !s.len().is_multiple_of(num_heads) {
        return Err(rows_error("s", num_heads, s.len()));
    }
    let rows = s.len() / num_heads;
    check_len("v", v.len(), &[rows, num_heads, head_dim])?;
    check_len("s_other", s_other.len(), &[rows, num_heads])?;
    check_len("v_other", v_other.len(), &[rows, num_heads, head_dim])?;
    if let Some(m) = mask {
        check_len("mask", m.len(), &[rows])?;
    }
    // Validation (reliability): no rows, nothing to merge; the scratch is never sized by
    // `head_dim` alone (the slices bound it otherwise).
    if rows == 0 {
        return Ok(());
    }
    let mut acc = vec![0.0f32; head_dim];
    let mut cur = vec![E::from_f32(0.0); head_dim];
    for r in 0..rows {
        if mask.is_some_and(|m| !m[r]) {
            continue;
        }
        for h in 0..num_heads {
            let i = r * num_heads + h;
            let span = i * head_dim..(i + 1) * head_dim;
            cur.copy_from_slice(&v[span.clone()]);
            let si = s[i];
            let row = |k: usize| {
                if k == 0 {
                    (&cur[..], si)
                } else {
                    (&v_other[span.clone()], s_other[i])
                }
            };
            s[i] = merge_into(2, row, &mut acc, &mut v[i * head_dim..(i + 1) * head_dim]);
        }
    }
    Ok(())
}

/// Merges `num_states` states per row and head: `v` `[rows, num_states, num_heads, head_dim]`
/// and `s` `[rows, num_states, num_heads]` into `v_out` `[rows, num_heads, head_dim]` and
/// `s_out` `[rows, num_heads]`.
///
/// LSEs are natural-log, finite or `-inf`; a row and head whose states are all `-inf` gets a
/// zero output and `-inf`.
///
/// # Errors
/// [`Error::NotPositive`] for a zero `num_states`, `num_heads` or `head_dim`;
/// [`Error::TensorShape`] naming the first slice whose length does not match
/// `s_out.len() / num_heads` rows.
///
/// # Example
/// ```
/// use flashpage::backend::cpu::merge_states;
/// // One row, three states, one head, head_dim 1; the empty state (-inf) counts for nothing.
/// let v = [2.0f32, 4.0, 100.0];
/// let s = [0.0f32, 0.0, f32::NEG_INFINITY];
/// let (mut vo, mut so) = ([0.0f32], [0.0f32]);
/// merge_states(&v, &s, 3, 1, 1, &mut vo, &mut so)?;
/// assert!((vo[0] - 3.0).abs() < 1e-6 && (so[0] - 2f32.ln()).abs() < 1e-6);
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn merge_states<E: Elem>(
    v: &[E],
    s: &[f32],
    num_states: usize,
    num_heads: usize,
    head_dim: usize,
    v_out: &mut [E],
    s_out: &mut [f32],
) -> Result<()> {
    check_positive("num_states", num_states)?;
    check_positive("num_heads", num_heads)?;
    check_positive("head_dim", head_dim)?;
    if !s_out.len().is_multiple_of(num_heads) {
        return Err(rows_error("s_out", num_heads, s_out.len()));
    }
    let rows = s_out.len() / num_heads;
    check_len("v_out", v_out.len(), &[rows, num_heads, head_dim])?;
    check_len("s", s.len(), &[rows, num_states, num_heads])?;
    check_len("v", v.len(), &[rows, num_states, num_heads, head_dim])?;
    // Validation (reliability): no rows, nothing to merge; the scratch is never sized by
    // `head_dim` alone (the slices bound it otherwise).
    if rows == 0 {
        return Ok(());
    }
    let mut acc = vec![0.0f32; head_dim];
    for r in 0..rows {
        for h in 0..num_heads {
            let o = r * num_heads + h;
            let state = |k: usize| {
                let i = (r * num_states + k) * num_heads + h;
                (&v[i * head_dim..(i + 1) * head_dim], s[i])
            };
            s_out[o] = merge_into(
                num_states,
                state,
                &mut acc,
                &mut v_out[o * head_dim..(o + 1) * head_dim],
            );
        }
    }
    Ok(())
}
