//! Strided views of token rows `[tokens, heads, head_dim]`: a dense tensor, or one slice of
//! a fused QKV projection, addressed by a row stride and a head stride (the head dimension
//! is contiguous).

use crate::error::{Error, Result};
use crate::tensor::{TensorMut, TensorRef};

/// A dense `[tokens, heads, head_dim]` tensor has exactly that many elements (the product
/// computed with checked arithmetic).
fn check_dense(
    tensor: &'static str,
    len: usize,
    (tokens, heads, head_dim): (usize, usize, usize),
) -> Result<()> {
    // heads * head_dim first: the dense row stride, which must exist even with no tokens.
    let n = heads
        .checked_mul(head_dim)
        .and_then(|row| row.checked_mul(tokens))
        .ok_or(Error::SizeOverflow { what: tensor })?;
    if len != n {
        return Err(Error::TensorShape {
            tensor,
            expected: format!("[{tokens}, {heads}, {head_dim}] ({n} elements)"),
            actual: format!("{len} elements"),
        });
    }
    Ok(())
}

/// Checks the strides and extent of a `[tokens, heads, head_dim]` view over `len` elements.
pub(crate) fn check_rows(
    tensor: &'static str,
    len: usize,
    (tokens, heads, head_dim): (usize, usize, usize),
    (row, head): (usize, usize),
) -> Result<()> {
    if head_dim == 0 || heads == 0 {
        return Err(Error::NotPositive {
            field: if heads == 0 { "heads" } else { "head_dim" },
            actual: 0,
        });
    }
    let row_min = (heads - 1)
        .checked_mul(head)
        .and_then(|a| a.checked_add(head_dim));
    let row_min = match row_min {
        Some(m) => m,
        None if tokens > 1 => return Err(Error::SizeOverflow { what: tensor }),
        None => usize::MAX, // one row: its extent below overflows and says so
    };
    if (heads > 1 && head < head_dim) || (tokens > 1 && row < row_min) {
        return Err(Error::TensorShape {
            tensor,
            expected: format!(
                "head stride >= head_dim = {head_dim} and row stride >= (heads - 1) * head stride + head_dim = {row_min} (rows must not overlap)"
            ),
            actual: format!("row stride {row}, head stride {head}"),
        });
    }
    let extent = if tokens == 0 {
        Some(0)
    } else {
        (tokens - 1)
            .checked_mul(row)
            .and_then(|a| a.checked_add((heads - 1).checked_mul(head)?))
            .and_then(|a| a.checked_add(head_dim))
    };
    let extent = extent.ok_or(Error::SizeOverflow { what: tensor })?;
    if extent > len {
        return Err(Error::TensorShape {
            tensor,
            expected: format!(
                "at least {extent} elements for {tokens} rows of {heads} heads x {head_dim} (row stride {row}, head stride {head})"
            ),
            actual: format!("{len} elements"),
        });
    }
    Ok(())
}

/// A read-only `[tokens, heads, head_dim]` view.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: TensorRef<'a>,
    dims: (usize, usize, usize),
    strides: (usize, usize),
}

impl<'a> Rows<'a> {
    /// A dense `[tokens, heads, head_dim]` tensor (exactly that many elements).
    pub fn dense(
        data: TensorRef<'a>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Self::dense_named("rows", data, tokens, heads, head_dim)
    }

    pub(crate) fn dense_named(
        tensor: &'static str,
        data: TensorRef<'a>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        check_dense(tensor, data.len(), (tokens, heads, head_dim))?;
        Self::strided(data, tokens, heads, head_dim, heads * head_dim, head_dim)
    }

    /// A strided view: token `t`, head `h` starts at element `t * row + h * head`.
    pub fn strided(
        data: TensorRef<'a>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        row: usize,
        head: usize,
    ) -> Result<Self> {
        check_rows("rows", data.len(), (tokens, heads, head_dim), (row, head))?;
        Ok(Rows {
            data,
            dims: (tokens, heads, head_dim),
            strides: (row, head),
        })
    }

    /// Token rows.
    pub fn tokens(&self) -> usize {
        self.dims.0
    }
    /// Heads per row.
    pub fn heads(&self) -> usize {
        self.dims.1
    }
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.dims.2
    }
    /// The underlying tensor.
    pub fn data(&self) -> TensorRef<'a> {
        self.data
    }
    /// Element offset of `(token, head, 0)`.
    #[inline]
    pub fn offset(&self, token: usize, head: usize) -> usize {
        token * self.strides.0 + head * self.strides.1
    }
}

/// A writable `[tokens, heads, head_dim]` view (rows never overlap).
#[derive(Debug)]
pub struct RowsMut<'a> {
    data: TensorMut<'a>,
    dims: (usize, usize, usize),
    strides: (usize, usize),
}

impl<'a> RowsMut<'a> {
    /// A dense `[tokens, heads, head_dim]` tensor (exactly that many elements).
    pub fn dense(
        data: TensorMut<'a>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        check_dense("rows", data.len(), (tokens, heads, head_dim))?;
        Self::strided(data, tokens, heads, head_dim, heads * head_dim, head_dim)
    }

    /// A strided view: token `t`, head `h` starts at element `t * row + h * head`. For the
    /// q and k heads of a fused QKV buffer `[tokens, (Hq + 2 Hkv) * D]`: `heads = Hq + Hkv`,
    /// `row = (Hq + 2 Hkv) * D`, `head = D`.
    pub fn strided(
        data: TensorMut<'a>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        row: usize,
        head: usize,
    ) -> Result<Self> {
        check_rows("rows", data.len(), (tokens, heads, head_dim), (row, head))?;
        Ok(RowsMut {
            data,
            dims: (tokens, heads, head_dim),
            strides: (row, head),
        })
    }

    /// Token rows.
    pub fn tokens(&self) -> usize {
        self.dims.0
    }
    /// Heads per row.
    pub fn heads(&self) -> usize {
        self.dims.1
    }
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.dims.2
    }
    /// The underlying tensor.
    pub fn data(&mut self) -> &mut TensorMut<'a> {
        &mut self.data
    }
    /// Element offset of `(token, head, 0)`.
    #[inline]
    pub fn offset(&self, token: usize, head: usize) -> usize {
        token * self.strides.0 + head * self.strides.1
    }
}

#[cfg(test)]
mod overflow_tests {
    use super::*;

    #[test]
    fn sizes_past_usize_are_errors_not_panics() {
        let mut empty: [f32; 0] = [];
        // No tokens, but a dense row of heads * head_dim elements cannot exist.
        let e = RowsMut::dense(TensorMut::F32(&mut empty), 0, usize::MAX, 2).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { what: "rows" }), "{e}");
        // Two rows whose minimum row stride overflows.
        let data = [0f32; 8];
        let e = Rows::strided(TensorRef::F32(&data), 2, usize::MAX, 2, 8, 2).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { what: "rows" }), "{e}");
        // One row: its extent overflows.
        let e = Rows::strided(TensorRef::F32(&data), 1, usize::MAX, 2, 8, 2).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { what: "rows" }), "{e}");
    }
}
