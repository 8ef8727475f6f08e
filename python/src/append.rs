//! `append_paged_kv_cache`: writes new keys and values into their pages, after checking the
//! whole page table and every target slot.
//!
//! The library has no append operation yet; this is the extension's own, validated with the
//! library's batch checks ([`flashpage::validate::check_batch`]) and to be switched to the
//! library's append when it has one (docs/python.md).

use flashpage::validate::check_batch;
use flashpage::{AttentionOptions, BatchDesc, Error, HeadConfig, KvLayout, PageTable};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::errors::{guard, type_error};
use crate::ffi::{Borrowed, check_disjoint, union_bytes_mut};

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
        let key = Borrowed::new(&append_key, "append_key")?;
        let value = Borrowed::new(&append_value, "append_value")?;
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
        for t in [&key, &value].into_iter().chain(&vc) {
            if t.kind != kc.kind {
                return Err(t.dtype_error(kc.kind.name()));
            }
        }
        if kc.kind.dtype().is_none() {
            return Err(kc.dtype_error("torch.float32, torch.float16 or torch.bfloat16"));
        }
        // The page table: the library's checks (indptr, last page lengths, indices length).
        let heads = HeadConfig::new(hkv.max(1), hkv.max(1), 16)?;
        let table = PageTable {
            page_size: ps,
            num_pages,
            indptr: &indptr,
            last_page_len: &last,
            num_indices: indices.len(),
        };
        let desc = BatchDesc::decode(heads, table);
        let valid = check_batch(&desc, &AttentionOptions::new())?;
        // Every target slot, before anything is written.
        let (sp, st, sh) = if nhd {
            (strides[0], strides[1], strides[2])
        } else {
            (strides[0], strides[2], strides[1])
        };
        let mut slots = Vec::with_capacity(nnz);
        for i in 0..nnz {
            let (b, p) = (batch[i], pos[i]);
            if b < 0 || b as usize >= valid.batch_size() {
                return Err(Error::InvalidOption {
                    field: "batch_indices",
                    expected: "request indices in 0..batch_size (len(kv_indptr) - 1)",
                    actual: format!(
                        "batch_indices[{i}] = {b}, batch_size {}",
                        valid.batch_size()
                    ),
                }
                .into());
            }
            let req = valid.request(b as usize);
            if p < 0 || p as usize >= req.kv_len {
                return Err(Error::InvalidOption {
                    field: "positions",
                    expected: "positions inside the request's pages: 0 <= position < its kv length after the append",
                    actual: format!(
                        "positions[{i}] = {p}, request {b} has kv length {}",
                        req.kv_len
                    ),
                }
                .into());
            }
            let at = req.kv_start + p as usize / ps;
            let page = indices[at];
            if page < 0 || page as usize >= num_pages {
                return Err(Error::PageIdOutOfRange {
                    index: at,
                    page_id: page as i64,
                    num_pages,
                }
                .into());
            }
            slots.push(page as usize * sp + (p as usize % ps) * st);
        }
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
        let es = kc.kind.size();
        let row = d * es;
        let (kb, vb) = (key.bytes(), value.bytes());
        // `base` is a byte offset into `dst`.
        let copy = |dst: &mut [u8], base: usize, src: &[u8], s: &[usize]| {
            for (i, &slot) in slots.iter().enumerate() {
                for h in 0..hkv {
                    let to = base + (slot + h * sh) * es;
                    let from = (i * s[0] + h * s[1]) * es;
                    dst[to..to + row].copy_from_slice(&src[from..from + row]);
                }
            }
        };
        match &mut vc {
            Some(v) => match union_bytes_mut(&mut kc, v) {
                Some((all, k0, v0)) => {
                    copy(all, k0, kb, &key.strides);
                    copy(all, v0, vb, &value.strides);
                }
                None => {
                    copy(kc.bytes_mut(), 0, kb, &key.strides);
                    copy(v.bytes_mut(), 0, vb, &value.strides);
                }
            },
            None => {
                let all = kc.bytes_mut();
                copy(all, 0, kb, &key.strides);
                copy(all, v_off * es, vb, &value.strides);
            }
        }
        Ok(())
    })
}
