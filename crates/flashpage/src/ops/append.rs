//! Appending new tokens' K/V to a paged cache (FlashInfer's `append_paged_kv_cache`, vLLM's
//! `reshape_and_cache`).
//!
//! The batch is described by the CSR arrays of the cache **after** the append
//! (`kv_indptr`, `kv_indices`, `kv_last_page_len`) and `append_indptr`: request `r` appends
//! rows `append_indptr[r]..append_indptr[r+1]` of `k`/`v`, which become its last
//! `append_len` tokens, so its row `j` lands at position `kv_len - append_len + j`, in page
//! `kv_indices[kv_indptr[r] + pos / page_size]`, slot `pos % page_size`. A prefill
//! [`BatchBuilder`] holds exactly these arrays (its `qo_indptr` is the
//! append indptr): see [`AppendBatch::from_builder`].
//!
//! Flow: [`check_append`] validates everything (the CSR arrays, every page id, the shapes
//! and strides of the inputs and of the cache, the RoPE parameters and positions), then
//! [`append_kv`] writes. On error nothing is written.

use crate::builder::BatchBuilder;
use crate::error::{Error, Result};
use crate::layout::{KvLayout, KvStrides, MAX_PAGE_SIZE, PAGE_SIZE_RULE};
use crate::tensor::TensorMut;
use crate::validate::{check_indptr, check_page_ids};

use super::rope::{Rope, Rotation, check_positions};
use super::rows::Rows;
use super::{load_f32, store_f32};

/// Where an append goes: the cache's CSR arrays after the append, and `append_indptr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendBatch<'a> {
    /// B + 1 offsets into the appended rows of `k`/`v`.
    pub append_indptr: &'a [i32],
    /// B + 1 offsets into `kv_indices` (after the append).
    pub kv_indptr: &'a [i32],
    /// Page ids of every request, in token order.
    pub kv_indices: &'a [i32],
    /// Tokens in each request's last page (after the append).
    pub kv_last_page_len: &'a [i32],
}

impl<'a> AppendBatch<'a> {
    /// The append of a prefill (or decode) batch built with [`BatchBuilder`]: each request's
    /// query rows are the tokens it appends.
    pub fn from_builder(b: &'a BatchBuilder) -> Self {
        AppendBatch {
            append_indptr: b.qo_indptr(),
            kv_indptr: b.kv_indptr(),
            kv_indices: b.kv_indices(),
            kv_last_page_len: b.kv_last_page_len(),
        }
    }
}

/// A writable paged cache: K and V in two buffers (each with its own strides), or in one
/// combined buffer.
#[derive(Debug)]
pub struct KvCacheMut<'a> {
    k: TensorMut<'a>,
    /// `None`: V lives in `k`'s buffer from `v_base`.
    v: Option<TensorMut<'a>>,
    v_base: usize,
    k_strides: KvStrides,
    v_strides: KvStrides,
    page_size: usize,
    num_pages: usize,
}

impl<'a> KvCacheMut<'a> {
    /// K and V in separate buffers with the same strides.
    pub fn split(
        k: TensorMut<'a>,
        v: TensorMut<'a>,
        strides: KvStrides,
        page_size: usize,
        num_pages: usize,
    ) -> Self {
        Self::split_strided(k, v, strides, strides, page_size, num_pages)
    }

    /// K and V in separate buffers, each with its own strides.
    pub fn split_strided(
        k: TensorMut<'a>,
        v: TensorMut<'a>,
        k_strides: KvStrides,
        v_strides: KvStrides,
        page_size: usize,
        num_pages: usize,
    ) -> Self {
        KvCacheMut {
            k,
            v: Some(v),
            v_base: 0,
            k_strides,
            v_strides,
            page_size,
            num_pages,
        }
    }

    /// One buffer `[num_pages, 2, ...page in layout...]` (K then V in every page, as
    /// FlashInfer's combined cache): K's strides are [`KvCacheMut::combined_strides`] and V's
    /// slice starts one half-page later, so the attention side reads it as
    /// `KvCache::paged(kv, &kv[half_page..], strides, ..)`.
    pub fn combined(
        kv: TensorMut<'a>,
        layout: KvLayout,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        num_pages: usize,
    ) -> Self {
        let s = Self::combined_strides(layout, page_size, num_kv_heads, head_dim);
        KvCacheMut {
            k: kv,
            v: None,
            v_base: s.page / 2,
            k_strides: s,
            v_strides: s,
            page_size,
            num_pages,
        }
    }

    /// The strides of K (and of V, from one half-page on) in a combined cache.
    pub fn combined_strides(
        layout: KvLayout,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> KvStrides {
        let mut s = KvStrides::dense(layout, page_size, num_kv_heads, head_dim);
        s.page *= 2;
        s
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Pages in the cache.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
}

/// RoPE applied to K on its way into the cache.
#[derive(Debug, Clone, Copy)]
pub struct AppendRope<'a> {
    /// The rotation.
    pub rope: &'a Rope,
    /// One position per appended row; `None`: each token's position in its sequence.
    pub positions: Option<&'a [i32]>,
}

fn check_cache_side(
    tensor: &'static str,
    len: usize,
    base: usize,
    s: KvStrides,
    cache: &KvCacheMut<'_>,
    (hkv, d): (usize, usize),
) -> Result<()> {
    let (ps, np) = (cache.page_size, cache.num_pages);
    if s.head < d && hkv > 1 || (ps > 1 && s.token < d) || (np > 1 && s.page < d) {
        return Err(Error::TensorShape {
            tensor,
            expected: format!("strides of at least head_dim = {d}"),
            actual: format!("page {}, token {}, head {}", s.page, s.token, s.head),
        });
    }
    let extent = s
        .extent(np, ps, hkv, d)
        .and_then(|e| e.checked_add(base))
        .ok_or(Error::SizeOverflow { what: "kv cache" })?;
    if extent > len {
        return Err(Error::TensorShape {
            tensor,
            expected: format!(
                "at least {extent} elements for {np} pages of {ps} tokens x {hkv} heads x {d} with strides (page {}, token {}, head {}) from element {base}",
                s.page, s.token, s.head
            ),
            actual: format!("{len} elements"),
        });
    }
    Ok(())
}

/// Tokens of request `r` after the append (the CSR arrays are valid).
fn kv_len(b: &AppendBatch<'_>, r: usize, page_size: usize) -> usize {
    let pages = (b.kv_indptr[r + 1] - b.kv_indptr[r]) as usize;
    if pages == 0 {
        0
    } else {
        (pages - 1) * page_size + b.kv_last_page_len[r] as usize
    }
}

/// Checks an append without writing anything (see [`append_kv`] for what is checked).
pub fn check_append(
    batch: &AppendBatch<'_>,
    k: &Rows<'_>,
    v: &Rows<'_>,
    cache: &KvCacheMut<'_>,
    rope: Option<&AppendRope<'_>>,
) -> Result<()> {
    let ps = cache.page_size;
    if ps == 0 || ps > MAX_PAGE_SIZE {
        return Err(Error::UnsupportedPageSize {
            expected: PAGE_SIZE_RULE,
            actual: ps,
        });
    }
    check_indptr("append_indptr", batch.append_indptr)?;
    check_indptr("kv_indptr", batch.kv_indptr)?;
    let b = batch.kv_indptr.len() - 1;
    if batch.append_indptr.len() != b + 1 {
        return Err(Error::ArrayLength {
            field: "append_indptr",
            expected: b + 1,
            actual: batch.append_indptr.len(),
            rule: "batch_size + 1 = kv_indptr.len()",
        });
    }
    if batch.kv_last_page_len.len() != b {
        return Err(Error::ArrayLength {
            field: "kv_last_page_len",
            expected: b,
            actual: batch.kv_last_page_len.len(),
            rule: "batch_size = kv_indptr.len() - 1",
        });
    }
    check_page_ids(batch.kv_indptr, batch.kv_indices, cache.num_pages)?;
    for r in 0..b {
        let pages = (batch.kv_indptr[r + 1] - batch.kv_indptr[r]) as usize;
        let last = batch.kv_last_page_len[r];
        let ok = if pages == 0 {
            last == 0
        } else {
            last >= 1 && last as usize <= ps
        };
        if !ok {
            return Err(Error::LastPageLen {
                request: r,
                actual: last as i64,
                num_pages: pages,
                page_size: ps,
            });
        }
        let append_len = (batch.append_indptr[r + 1] - batch.append_indptr[r]) as usize;
        let kv = kv_len(batch, r, ps);
        if append_len > kv {
            return Err(Error::AppendLongerThanKv {
                request: r,
                append_len,
                kv_len: kv,
            });
        }
    }
    let nnz = batch.append_indptr[b] as usize;
    let (hkv, d) = (k.heads(), k.head_dim());
    for (tensor, rows) in [("k", k), ("v", v)] {
        if rows.tokens() != nnz {
            return Err(Error::TensorShape {
                tensor,
                expected: format!("{nnz} token rows (append_indptr[{b}])"),
                actual: format!("{} token rows", rows.tokens()),
            });
        }
    }
    if (v.heads(), v.head_dim()) != (hkv, d) {
        return Err(Error::TensorShape {
            tensor: "v",
            expected: format!("{hkv} heads x {d} (as k)"),
            actual: format!("{} heads x {}", v.heads(), v.head_dim()),
        });
    }
    let (k_len, v_len) = (cache.k.len(), cache.v.as_ref().map(|v| v.len()));
    check_cache_side("k_cache", k_len, 0, cache.k_strides, cache, (hkv, d))?;
    check_cache_side(
        "v_cache",
        v_len.unwrap_or(k_len),
        cache.v_base,
        cache.v_strides,
        cache,
        (hkv, d),
    )?;
    if let Some(r) = rope {
        r.rope.validate(d)?;
        if let Some(p) = r.positions {
            check_positions(p, nnz)?;
        }
    }
    Ok(())
}

/// Writes the appended rows `k`, `v` (`[nnz, num_kv_heads, head_dim]`, any dtype, any
/// strides) into the paged `cache` (its own dtypes and strides), rotating K by `rope` when
/// given.
///
/// Checked first, nothing written on error: `append_indptr` and `kv_indptr` (start at 0,
/// non-decreasing, B + 1 entries each), `kv_last_page_len` (B entries, `1..=page_size` for
/// a request with pages, 0 without), every page id in `0..num_pages`, each request's
/// append no longer than its length after it, `k`/`v` rows equal to `append_indptr[B]`
/// with equal head shapes, the cache strides and extents, the RoPE parameters and
/// positions.
///
/// ```
/// use flashpage::ops::{Rows, append::{AppendBatch, KvCacheMut, append_kv}};
/// use flashpage::{BatchBuilder, KvLayout, KvStrides, TensorMut, TensorRef, half::bf16};
/// let (ps, pages, hkv, d) = (4, 3, 1, 16);
/// let mut b = BatchBuilder::new(ps)?;
/// b.push(2, 6, &[2, 0])?; // request 0 now holds 6 tokens; the last 2 are new
/// let (k_new, v_new) = (vec![1.5f32; 2 * hkv * d], vec![-2.0f32; 2 * hkv * d]);
/// let mut k = vec![bf16::ZERO; pages * ps * hkv * d];
/// let mut v = k.clone();
/// append_kv(&AppendBatch::from_builder(&b),
///           Rows::dense(TensorRef::F32(&k_new), 2, hkv, d)?,
///           Rows::dense(TensorRef::F32(&v_new), 2, hkv, d)?,
///           KvCacheMut::split(TensorMut::BF16(&mut k), TensorMut::BF16(&mut v),
///                             KvStrides::dense(KvLayout::Nhd, ps, hkv, d), ps, pages),
///           None)?;
/// // positions 4 and 5: page 0 (the request's second page), slots 0 and 1
/// assert!(k[..2 * d].iter().all(|x| x.to_f32() == 1.5));
/// assert!(v[2 * d..].iter().all(|x| x.to_f32() == 0.0));
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn append_kv(
    batch: &AppendBatch<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mut cache: KvCacheMut<'_>,
    rope: Option<AppendRope<'_>>,
) -> Result<()> {
    check_append(batch, &k, &v, &cache, rope.as_ref())?;
    let (hkv, d) = (k.heads(), k.head_dim());
    let ps = cache.page_size;
    let mut rot = rope.as_ref().map(|r| Rotation::new(r.rope, d));
    let mut buf = vec![0f32; d];
    let (ks, vs, v_base) = (cache.k_strides, cache.v_strides, cache.v_base);
    let (kd, vd) = (k.data(), v.data());
    for r in 0..batch.kv_indptr.len() - 1 {
        let a0 = batch.append_indptr[r] as usize;
        let n = batch.append_indptr[r + 1] as usize - a0;
        let start = kv_len(batch, r, ps) - n;
        let pages = &batch.kv_indices[batch.kv_indptr[r] as usize..];
        for j in 0..n {
            let (t, pos) = (a0 + j, start + j);
            let page = pages[pos / ps] as usize;
            let slot = pos % ps;
            if let (Some(rot), Some(r)) = (rot.as_mut(), rope.as_ref()) {
                let p = r.positions.map_or(pos as i64, |p| p[t] as i64);
                rot.at(p);
            }
            for h in 0..hkv {
                load_f32(&kd, k.offset(t, h), &mut buf);
                if let Some(rot) = rot.as_ref() {
                    rot.rotate(&mut buf);
                }
                let off = page * ks.page + slot * ks.token + h * ks.head;
                store_f32(&mut cache.k, off, &buf);
                load_f32(&vd, v.offset(t, h), &mut buf);
                let off = v_base + page * vs.page + slot * vs.token + h * vs.head;
                match cache.v.as_mut() {
                    Some(vt) => store_f32(vt, off, &buf),
                    None => store_f32(&mut cache.k, off, &buf),
                }
            }
        }
    }
    Ok(())
}
