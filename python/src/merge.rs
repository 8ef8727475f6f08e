//! `merge_state`, `merge_state_in_place`, `merge_states` over the library's CPU merges, with
//! FlashInfer's base-2 LSEs (the library's are natural: converted on the way in and out).

use std::f32::consts::{LN_2, LOG2_E};

use flashpage::backend::cpu::{merge_state, merge_state_in_place, merge_states};
use flashpage::{TensorMut, TensorRef};
use pyo3::prelude::*;

use crate::errors::{Failure, guard};
use crate::ffi::{Borrowed, check_disjoint};

fn ln_of(s: &Borrowed<'_>) -> Result<Vec<f32>, Failure> {
    Ok(s.f32_vec()?.into_iter().map(|x| x * LN_2).collect())
}

fn mismatch(tensor: &'static str, want: &Borrowed<'_>, got: &Borrowed<'_>) -> Failure {
    Failure::Lib(flashpage::Error::DTypeMismatch {
        tensor,
        expected: want.kind.name(),
        actual: got.kind.name(),
    })
}

fn same_shape(t: &Borrowed<'_>, like: &Borrowed<'_>) -> Result<(), Failure> {
    let dims: Vec<Option<usize>> = like.shape.iter().map(|&n| Some(n)).collect();
    t.expect_shape(
        &dims,
        &format!("{:?} (the shape of {})", like.shape, like.name),
    )
}

/// Merges `(v_a, s_a)` and `(v_b, s_b)` (`[seq, heads, head_dim]`, `[seq, heads]`, LSE base 2)
/// into the caller's `v_out`, `s_out`.
#[pyfunction]
#[pyo3(name = "merge_state")]
pub fn py_merge_state(
    py: Python<'_>,
    v_a: Bound<'_, PyAny>,
    s_a: Bound<'_, PyAny>,
    v_b: Bound<'_, PyAny>,
    s_b: Bound<'_, PyAny>,
    v_out: Bound<'_, PyAny>,
    s_out: Bound<'_, PyAny>,
) -> PyResult<()> {
    guard(py, || {
        let va = Borrowed::new(&v_a, "v_a")?;
        let sa = Borrowed::new(&s_a, "s_a")?;
        let vb = Borrowed::new(&v_b, "v_b")?;
        let sb = Borrowed::new(&s_b, "s_b")?;
        let mut vo = Borrowed::new(&v_out, "v_out")?;
        let mut so = Borrowed::new(&s_out, "s_out")?;
        va.expect_shape(&[None, None, None], "[seq_len, num_heads, head_dim]")?;
        let (seq, heads, d) = (va.shape[0], va.shape[1], va.shape[2]);
        sa.expect_shape(
            &[Some(seq), Some(heads)],
            &format!("[{seq}, {heads}] (seq_len, num_heads)"),
        )?;
        same_shape(&vb, &va)?;
        same_shape(&sb, &sa)?;
        same_shape(&vo, &va)?;
        same_shape(&so, &sa)?;
        for t in [&vb, &vo] {
            if t.kind != va.kind {
                return Err(mismatch(t.name, &va, t));
            }
        }
        for t in [&va, &vb] {
            t.expect_contiguous()?;
        }
        check_disjoint(&[&vo, &so], &[&va, &sa, &vb, &sb])?;
        let (la, lb) = (ln_of(&sa)?, ln_of(&sb)?);
        let s_out = so.f32_mut()?;
        match (va.float_ref(0)?, vb.float_ref(0)?, vo.float_mut()?) {
            (TensorRef::F32(a), TensorRef::F32(b), TensorMut::F32(o)) => {
                merge_state(a, &la, b, &lb, d, o, s_out)?
            }
            (TensorRef::F16(a), TensorRef::F16(b), TensorMut::F16(o)) => {
                merge_state(a, &la, b, &lb, d, o, s_out)?
            }
            (TensorRef::BF16(a), TensorRef::BF16(b), TensorMut::BF16(o)) => {
                merge_state(a, &la, b, &lb, d, o, s_out)?
            }
            _ => unreachable!("dtypes were checked above"),
        }
        for x in s_out.iter_mut() {
            *x *= LOG2_E;
        }
        Ok(())
    })
}

/// Merges `(v_other, s_other)` into `(v, s)` in place; rows whose `mask` entry is false are
/// left untouched. LSE base 2.
#[pyfunction]
#[pyo3(name = "merge_state_in_place", signature = (v, s, v_other, s_other, mask=None))]
pub fn py_merge_state_in_place(
    py: Python<'_>,
    v: Bound<'_, PyAny>,
    s: Bound<'_, PyAny>,
    v_other: Bound<'_, PyAny>,
    s_other: Bound<'_, PyAny>,
    mask: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    guard(py, || {
        let mut vt = Borrowed::new(&v, "v")?;
        let mut st = Borrowed::new(&s, "s")?;
        let vo = Borrowed::new(&v_other, "v_other")?;
        let so = Borrowed::new(&s_other, "s_other")?;
        let mask = mask.map(|m| Borrowed::new(&m, "mask")).transpose()?;
        vt.expect_shape(&[None, None, None], "[seq_len, num_heads, head_dim]")?;
        let (seq, heads, d) = (vt.shape[0], vt.shape[1], vt.shape[2]);
        st.expect_shape(
            &[Some(seq), Some(heads)],
            &format!("[{seq}, {heads}] (seq_len, num_heads)"),
        )?;
        same_shape(&vo, &vt)?;
        same_shape(&so, &st)?;
        if let Some(m) = &mask {
            m.expect_shape(&[Some(seq)], &format!("[{seq}] (seq_len)"))?;
        }
        if vo.kind != vt.kind {
            return Err(mismatch("v_other", &vt, &vo));
        }
        vo.expect_contiguous()?;
        let mut read = vec![&vo, &so];
        read.extend(&mask);
        check_disjoint(&[&vt, &st], &read)?;
        let mask = mask.as_ref().map(|m| m.bools()).transpose()?;
        let mut ls = ln_of(&st)?;
        let lo = ln_of(&so)?;
        match (vt.float_mut()?, vo.float_ref(0)?) {
            (TensorMut::F32(a), TensorRef::F32(b)) => {
                merge_state_in_place(a, &mut ls, b, &lo, mask.as_deref(), heads, d)?
            }
            (TensorMut::F16(a), TensorRef::F16(b)) => {
                merge_state_in_place(a, &mut ls, b, &lo, mask.as_deref(), heads, d)?
            }
            (TensorMut::BF16(a), TensorRef::BF16(b)) => {
                merge_state_in_place(a, &mut ls, b, &lo, mask.as_deref(), heads, d)?
            }
            _ => unreachable!("dtypes were checked above"),
        }
        // Write back only the merged rows, so unmerged ones keep their exact bits.
        let s_mut = st.f32_mut()?;
        for r in 0..seq {
            if mask.as_ref().is_none_or(|m| m[r]) {
                for h in 0..heads {
                    s_mut[r * heads + h] = ls[r * heads + h] * LOG2_E;
                }
            }
        }
        Ok(())
    })
}

/// Merges `num_states` states per row: `v` `[seq, num_states, heads, head_dim]`, `s`
/// `[seq, num_states, heads]` (base 2) into `v_out`, `s_out`.
#[pyfunction]
#[pyo3(name = "merge_states")]
pub fn py_merge_states(
    py: Python<'_>,
    v: Bound<'_, PyAny>,
    s: Bound<'_, PyAny>,
    v_out: Bound<'_, PyAny>,
    s_out: Bound<'_, PyAny>,
) -> PyResult<()> {
    guard(py, || {
        let vt = Borrowed::new(&v, "v")?;
        let st = Borrowed::new(&s, "s")?;
        let mut vo = Borrowed::new(&v_out, "v_out")?;
        let mut so = Borrowed::new(&s_out, "s_out")?;
        vt.expect_shape(
            &[None, None, None, None],
            "[seq_len, num_states, num_heads, head_dim]",
        )?;
        let (seq, n, heads, d) = (vt.shape[0], vt.shape[1], vt.shape[2], vt.shape[3]);
        st.expect_shape(
            &[Some(seq), Some(n), Some(heads)],
            &format!("[{seq}, {n}, {heads}] (seq_len, num_states, num_heads)"),
        )?;
        vo.expect_shape(
            &[Some(seq), Some(heads), Some(d)],
            &format!("[{seq}, {heads}, {d}] (seq_len, num_heads, head_dim)"),
        )?;
        so.expect_shape(
            &[Some(seq), Some(heads)],
            &format!("[{seq}, {heads}] (seq_len, num_heads)"),
        )?;
        if vo.kind != vt.kind {
            return Err(mismatch("v_out", &vt, &vo));
        }
        vt.expect_contiguous()?;
        check_disjoint(&[&vo, &so], &[&vt, &st])?;
        let ls = ln_of(&st)?;
        let s_out = so.f32_mut()?;
        match (vt.float_ref(0)?, vo.float_mut()?) {
            (TensorRef::F32(a), TensorMut::F32(o)) => merge_states(a, &ls, n, heads, d, o, s_out)?,
            (TensorRef::F16(a), TensorMut::F16(o)) => merge_states(a, &ls, n, heads, d, o, s_out)?,
            (TensorRef::BF16(a), TensorMut::BF16(o)) => {
                merge_states(a, &ls, n, heads, d, o, s_out)?
            }
            _ => unreachable!("dtypes were checked above"),
        }
        for x in s_out.iter_mut() {
            *x *= LOG2_E;
        }
        Ok(())
    })
}
