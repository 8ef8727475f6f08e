//! `append_paged_kv_cache`: FlashInfer's signature and semantics over the library's append
//! ([`flashpage::ops::append::append_kv_at`]: one implementation, its validation — the page
//! table, every request index and position, the shapes and strides — before any write).

use flashpage::ops::Rows;
use flashpage::ops::append::{AppendAt, KvCacheMut, append_kv_at};
use flashpage::{Error, KvLayout, KvStrides};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::errors::{Failure, guard, type_error};
use crate::ffi::{Borrowed, Kind, check_disjoint, union_float_mut};

/// The library's row views are token-major (a token's heads inside its row: row stride >=
/// (heads - 1) * head stride + head_dim). A head-major view (e.g. `k.transpose(0, 1)` of a
/// `[heads, tokens, dim]` projection, as Hugging Face models hand over) is copied to a
/// contiguous tensor first (torch's `contiguous()`); other shapes pass through unchanged and
/// are checked by the library.
fn token_major(b: Borrowed<'_>) -> Result<Borrowed<'_>, Failure> {
    if b.shape.len() != 3 || b.strides.len() != 3 {
        return Ok(b);
    }
    let (n, h, d) = (b.shape[0], b.shape[1], b.shape[2]);
    let (row, head) = (b.strides[0], b.strides[1]);
    let ok = (h <= 1 || head >= d) && (n <= 1 || row >= (h.max(1) - 1) * head + d);
    if ok {
        return Ok(b);
    }
    let dense = b.obj.call_method0("contiguous")?;
    Borrowed::new(&dense, b.name)
}

/// Appends `append_key`/`append_value` (`[nnz, num_kv_heads, head_dim]`) to the paged cache:
/// row `i` goes to request `batch_indices[i]` at token `positions[i]`.
#[pyfunction]
#[pyo3(signature = (append_key, append_value, batch_indices, positions, paged_kv_cache,
    kv_indices, kv_indptr, kv_last_page_len, kv_layout="NHD"))]
#[allow(clippy::too_many_arguments)]
pub fn append_paged_kv_cache(
    py: Python<'_>,
    append_key: Bound<'_, PyAny>,
    append_value: Bound<'_, PyAny>,
    batch_indices: Bound<'_, PyAny>,
    positions: Bound<'_, PyAny>,
    paged_kv_cache: Bound<'_, PyAny>,
    kv_indices: Bound<'_, PyAny>,
    kv_indptr: Bound<'_, PyAny>,
    kv_last_page_len: Bound<'_, PyAny>,
    kv_layout: &str,
) -> PyResult<()> {
    guard(py, || {
        let layout = KvLayout::parse(kv_layout).ok_or_else(|| Error::InvalidOption {
            field: "kv_layout",
            expected: "\"NHD\" or \"HND\"",
            actual: format!("{kv_layout:?}"),
        })?;
        let key = token_major(Borrowed::new(&append_key, "append_key")?)?;
        let value = token_major(Borrowed::new(&append_value, "append_value")?)?;
        key.expect_shape(&[None, None, None], "[nnz, num_kv_heads, head_dim]")?;
        let (nnz, hkv, d) = (key.shape[0], key.shape[1], key.shape[2]);
        let dims = [Some(nnz), Some(hkv), Some(d)];
        let what = format!("[{nnz}, {hkv}, {d}] (the shape of append_key)");
        value.expect_shape(&dims, &what)?;
        let batch = Borrowed::new(&batch_indices, "batch_indices")?.indices()?;
        let pos = Borrowed::new(&positions, "positions")?.indices()?;
        for (name, v) in [("batch_indices", &batch), ("positions", &pos)] {
            if v.len() != nnz {
                return Err(Error::ArrayLength {
                    field: name,
                    expected: nnz,
                    actual: v.len(),
                    rule: "one entry per appended row (nnz)",
                }
                .into());
            }
        }
        let indices = Borrowed::new(&kv_indices, "kv_indices")?.indices()?;
        let indptr = Borrowed::new(&kv_indptr, "kv_indptr")?.indices()?;
        let last = Borrowed::new(&kv_last_page_len, "kv_last_page_len")?.indices()?;

        // The cache: one [pages, 2, ...] tensor or a (k, v) pair; slot (page, token, head)
        // of K at element p*sp + t*st + h*sh, of V `v_off` elements later (combined) or in
        // the second tensor.
        let pair: Option<Vec<Bound<'_, PyAny>>> = if let Ok(t) = paged_kv_cache.cast::<PyTuple>() {
            Some(t.iter().collect())
        } else if let Ok(l) = paged_kv_cache.cast::<PyList>() {
            Some(l.iter().collect())
        } else {
            None
        };
        let nhd = layout == KvLayout::Nhd;
        let (mut kc, mut vc, v_off, s) = match pair {
            Some(items) if items.len() == 2 => {
                let k = Borrowed::new(&items[0], "k_cache")?;
                let v = Borrowed::new(&items[1], "v_cache")?;
                k.expect_shape(&[None; 4], "[num_pages, ...] with 4 dimensions")?;
                if v.shape != k.shape || v.strides != k.strides {
                    return Err(Error::TensorShape {
                        tensor: "v_cache",
                        expected: format!("{:?} / {:?} (k_cache)", k.shape, k.strides),
                        actual: format!("{:?} / {:?}", v.shape, v.strides),
                    }
                    .into());
                }
                let s = [k.shape.clone(), k.strides.clone()];
                (k, Some(v), 0, s)
            }
            Some(items) => {
                return Err(type_error(format!(
                    "paged_kv_cache must be one tensor or a (k_cache, v_cache) pair, got a sequence of {}",
                    items.len()
                )));
            }
            None => {
                let t = Borrowed::new(&paged_kv_cache, "paged_kv_cache")?;
                t.expect_shape(
                    &[None, Some(2), None, None, None],
                    "[num_pages, 2, ...] with 5 dimensions",
                )?;
                let drop1 = |v: &[usize]| vec![v[0], v[2], v[3], v[4]];
                let s = [drop1(&t.shape), drop1(&t.strides)];
                let off = t.strides[1];
                (t, None, off, s)
            }
        };
        let [shape, strides] = s;
        let (num_pages, ps) = (shape[0], if nhd { shape[1] } else { shape[2] });
        let want = if nhd {
            [None, Some(ps), Some(hkv), Some(d)]
        } else {
            [None, Some(hkv), Some(ps), Some(d)]
        };
        let ok = shape
            .iter()
            .zip(&want)
            .all(|(&n, w)| w.is_none_or(|w| w == n));
        if !ok {
            return Err(Error::TensorShape {
                tensor: kc.name,
                expected: format!(
                    "pages of {} ({} layout, num_kv_heads and head_dim of append_key)",
                    if nhd {
                        format!("[page_size, {hkv}, {d}]")
                    } else {
                        format!("[{hkv}, page_size, {d}]")
                    },
                    layout.name()
                ),
                actual: format!("{:?}", kc.shape),
            }
            .into());
        }
        if d > 1 && (strides[3] != 1 || key.strides[2] != 1 || value.strides[2] != 1) {
            return Err(Error::TensorShape {
                tensor: "paged_kv_cache",
                expected:
                    "a contiguous last (head_dim) dimension in the cache and the appended rows"
                        .into(),
                actual: format!(
                    "strides {:?} (cache), {:?} (append_key), {:?} (append_value)",
                    kc.strides, key.strides, value.strides
                ),
            }
            .into());
        }
        if kc.kind.dtype().is_none() {
            return Err(kc.dtype_error(
                "torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn or torch.float8_e5m2",
            ));
        }
        if let Some(v) = &vc
            && v.kind != kc.kind
        {
            return Err(v.dtype_error(kc.kind.name()));
        }
        // An FP8 cache also takes float rows, quantised with scale 1 (FlashInfer appends
        // rows of the cache's dtype only; those are copied exactly).
        let fp8 = kc.kind.dtype().is_some_and(|d| d.is_fp8());
        for t in [&key, &value] {
            let float = matches!(t.kind, Kind::F32 | Kind::F16 | Kind::BF16);
            if t.kind != kc.kind && !(fp8 && float) {
                return Err(t.dtype_error(kc.kind.name()));
            }
        }
        let (sp, st, sh) = if nhd {
            (strides[0], strides[1], strides[2])
        } else {
            (strides[0], strides[2], strides[1])
        };
        let cs = KvStrides {
            page: sp,
            token: st,
            head: sh,
        };
        {
            // K and V may be views of one storage (a combined tensor, or its two halves as a
            // pair): their union is then one written region.
            let mut written = vec![&kc];
            written.extend(&vc);
            let union = vc.as_ref().is_some_and(|v| {
                let ((a0, a1), (b0, b1)) = (kc.byte_range(), v.byte_range());
                a0 < b1 && b0 < a1
            });
            if union {
                check_disjoint(&written[..1], &[&key, &value])?;
                check_disjoint(&written[1..], &[&key, &value])?;
            } else {
                check_disjoint(&written, &[&key, &value])?;
            }
        }
        let at = AppendAt {
            batch_indices: &batch,
            positions: &pos,
            kv_indptr: &indptr,
            kv_indices: &indices,
            kv_last_page_len: &last,
        };
        let k_rows = Rows::strided(
            key.float_ref(0)?,
            nnz,
            hkv,
            d,
            key.strides[0],
            key.strides[1],
        )?;
        let v_rows = Rows::strided(
            value.float_ref(0)?,
            nnz,
            hkv,
            d,
            value.strides[0],
            value.strides[1],
        )?;
        match &mut vc {
            Some(v) => match union_float_mut(&mut kc, v)? {
                Some((all, k0, v0)) => {
                    let cache = KvCacheMut::shared(all, k0, cs, v0, cs, ps, num_pages);
                    append_kv_at(&at, k_rows, v_rows, cache, None)?;
                }
                None => {
                    let cache = KvCacheMut::split(
                        kc.float_extent_mut()?,
                        v.float_extent_mut()?,
                        cs,
                        ps,
                        num_pages,
                    );
                    append_kv_at(&at, k_rows, v_rows, cache, None)?;
                }
            },
            None => {
                let cache =
                    KvCacheMut::shared(kc.float_extent_mut()?, 0, cs, v_off, cs, ps, num_pages);
                append_kv_at(&at, k_rows, v_rows, cache, None)?;
            }
        }
        Ok(())
    })
}
