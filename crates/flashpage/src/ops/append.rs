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
use crate::validate::{check_fp8_scale, check_indptr, check_page_ids};

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
    k_base: usize,
    v_base: usize,
    k_strides: KvStrides,
    v_strides: KvStrides,
    page_size: usize,
    num_pages: usize,
    k_scale: Option<&'a [f32]>,
    v_scale: Option<&'a [f32]>,
}

impl<'a> KvCacheMut<'a> {
    /// The same cache with the scales of an FP8 cache (`TensorMut::Fp8`): each 1 value (per
    /// tensor) or `num_kv_heads` (per KV head), finite and positive. An appended K element
    /// `x` of head `h` is stored as `encode(x / k_scale[h])` (round to nearest even; E4M3Fn
    /// saturates to ±448, E5M2 overflows to ±inf, see [`crate::fp8`]), V likewise; without
    /// scales an FP8 cache quantises with scale 1. Only an FP8 cache takes scales.
    pub fn with_scales(mut self, k_scale: &'a [f32], v_scale: &'a [f32]) -> Self {
        self.k_scale = Some(k_scale);
        self.v_scale = Some(v_scale);
        self
    }

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
            k_base: 0,
            v_base: 0,
            k_strides,
            v_strides,
            page_size,
            num_pages,
            k_scale: None,
            v_scale: None,
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
            k_base: 0,
            v_base: s.page / 2,
            k_strides: s,
            v_strides: s,
            page_size,
            num_pages,
            k_scale: None,
            v_scale: None,
        }
    }

    /// K and V in one buffer at any offsets and strides: K's slot `(page, token, head)` at
    /// element `k_base + page * k.page + token * k.token + head * k.head`, V's from `v_base`
    /// with `v_strides` (e.g. the K and V halves of one `[pages, 2, ...]` tensor given as two
    /// views, or a cache with padded strides). K and V slots must not overlap.
    #[allow(clippy::too_many_arguments)]
    pub fn shared(
        kv: TensorMut<'a>,
        k_base: usize,
        k_strides: KvStrides,
        v_base: usize,
        v_strides: KvStrides,
        page_size: usize,
        num_pages: usize,
    ) -> Self {
        KvCacheMut {
            k: kv,
            v: None,
            k_base,
            v_base,
            k_strides,
            v_strides,
            page_size,
            num_pages,
            k_scale: None,
            v_scale: None,
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

/// Where one appended row goes, in the FlashInfer form: row `i` becomes token
/// `positions[i]` of request `batch_indices[i]` (what FlashInfer's
/// `get_batch_indices_positions` produces from an append indptr), in the cache described by
/// its CSR arrays after the append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAt<'a> {
    /// One request index per appended row, in `0..B`.
    pub batch_indices: &'a [i32],
    /// One position per appended row, in `0..kv_len` of its request (after the append).
    pub positions: &'a [i32],
    /// B + 1 offsets into `kv_indices` (after the append).
    pub kv_indptr: &'a [i32],
    /// Page ids of every request, in token order.
    pub kv_indices: &'a [i32],
    /// Tokens in each request's last page (after the append).
    pub kv_last_page_len: &'a [i32],
}

/// The two ways of saying where the appended rows go (the CUDA backend's append takes
/// either).
#[derive(Debug, Clone, Copy)]
pub enum AppendTargets<'a> {
    /// Each request's rows are its last tokens ([`AppendBatch`]).
    Csr(&'a AppendBatch<'a>),
    /// Each row's request and position ([`AppendAt`]).
    At(&'a AppendAt<'a>),
}

impl AppendTargets<'_> {
    /// The cache's CSR arrays: `(kv_indptr, kv_indices, kv_last_page_len)`.
    pub fn kv(&self) -> (&[i32], &[i32], &[i32]) {
        match self {
            AppendTargets::Csr(b) => (b.kv_indptr, b.kv_indices, b.kv_last_page_len),
            AppendTargets::At(a) => (a.kv_indptr, a.kv_indices, a.kv_last_page_len),
        }
    }
}

/// The shapes an append is checked on (the host op's tensors or the device's buffers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppendShapes {
    /// `(tokens, heads, head_dim)` of the new K rows and of the new V rows.
    pub(crate) k_rows: (usize, usize, usize),
    pub(crate) v_rows: (usize, usize, usize),
    /// Elements of the K cache buffer, and of the V buffer (`None`: V in K's buffer).
    pub(crate) k_len: usize,
    pub(crate) v_len: Option<usize>,
    pub(crate) k_base: usize,
    pub(crate) v_base: usize,
    pub(crate) k_strides: KvStrides,
    pub(crate) v_strides: KvStrides,
    pub(crate) page_size: usize,
    pub(crate) num_pages: usize,
}

impl AppendShapes {
    fn of(k: &Rows<'_>, v: &Rows<'_>, cache: &KvCacheMut<'_>) -> Self {
        AppendShapes {
            k_rows: (k.tokens(), k.heads(), k.head_dim()),
            v_rows: (v.tokens(), v.heads(), v.head_dim()),
            k_len: cache.k.len(),
            v_len: cache.v.as_ref().map(|v| v.len()),
            k_base: cache.k_base,
            v_base: cache.v_base,
            k_strides: cache.k_strides,
            v_strides: cache.v_strides,
            page_size: cache.page_size,
            num_pages: cache.num_pages,
        }
    }
}

fn check_cache_side(
    tensor: &'static str,
    len: usize,
    base: usize,
    s: KvStrides,
    (ps, np): (usize, usize),
    (hkv, d): (usize, usize),
) -> Result<()> {
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

/// Tokens of request `r` (the CSR arrays are valid).
fn kv_len_of(kv_indptr: &[i32], last: &[i32], r: usize, page_size: usize) -> usize {
    let pages = (kv_indptr[r + 1] - kv_indptr[r]) as usize;
    if pages == 0 {
        0
    } else {
        (pages - 1) * page_size + last[r] as usize
    }
}

/// Checks the cache's CSR arrays (after the append): `kv_indptr`, `kv_last_page_len`, every
/// page id. Returns the batch size.
fn check_kv_arrays(
    (kv_indptr, kv_indices, last): (&[i32], &[i32], &[i32]),
    page_size: usize,
    num_pages: usize,
) -> Result<usize> {
    check_indptr("kv_indptr", kv_indptr)?;
    let b = kv_indptr.len() - 1;
    if last.len() != b {
        return Err(Error::ArrayLength {
            field: "kv_last_page_len",
            expected: b,
            actual: last.len(),
            rule: "batch_size = kv_indptr.len() - 1",
        });
    }
    check_page_ids(kv_indptr, kv_indices, num_pages)?;
    for r in 0..b {
        let pages = (kv_indptr[r + 1] - kv_indptr[r]) as usize;
        let l = last[r];
        let ok = if pages == 0 {
            l == 0
        } else {
            l >= 1 && l as usize <= page_size
        };
        if !ok {
            return Err(Error::LastPageLen {
                request: r,
                actual: l as i64,
                num_pages: pages,
                page_size,
            });
        }
    }
    Ok(b)
}

/// Checks where the rows go; returns the number of appended rows.
fn check_targets(t: AppendTargets<'_>, page_size: usize, num_pages: usize) -> Result<usize> {
    let b = check_kv_arrays(t.kv(), page_size, num_pages)?;
    let (kv_indptr, _, last) = t.kv();
    match t {
        AppendTargets::Csr(batch) => {
            check_indptr("append_indptr", batch.append_indptr)?;
            if batch.append_indptr.len() != b + 1 {
                return Err(Error::ArrayLength {
                    field: "append_indptr",
                    expected: b + 1,
                    actual: batch.append_indptr.len(),
                    rule: "batch_size + 1 = kv_indptr.len()",
                });
            }
            for r in 0..b {
                let append_len = (batch.append_indptr[r + 1] - batch.append_indptr[r]) as usize;
                let kv = kv_len_of(kv_indptr, last, r, page_size);
                if append_len > kv {
                    return Err(Error::AppendLongerThanKv {
                        request: r,
                        append_len,
                        kv_len: kv,
                    });
                }
            }
            Ok(batch.append_indptr[b] as usize)
        }
        AppendTargets::At(at) => {
            let nnz = at.batch_indices.len();
            if at.positions.len() != nnz {
                return Err(Error::ArrayLength {
                    field: "positions",
                    expected: nnz,
                    actual: at.positions.len(),
                    rule: "one position per appended row (len(batch_indices))",
                });
            }
            for (i, (&r, &p)) in at.batch_indices.iter().zip(at.positions).enumerate() {
                if r < 0 || r as usize >= b {
                    return Err(Error::InvalidOption {
                        field: "batch_indices",
                        expected: "request indices in 0..batch_size (len(kv_indptr) - 1)",
                        actual: format!("batch_indices[{i}] = {r}, batch_size {b}"),
                    });
                }
                let kv = kv_len_of(kv_indptr, last, r as usize, page_size);
                if p < 0 || p as usize >= kv {
                    return Err(Error::InvalidOption {
                        field: "positions",
                        expected: "positions inside the request's pages: 0 <= position < its kv length after the append",
                        actual: format!("positions[{i}] = {p}, request {r} has kv length {kv}"),
                    });
                }
            }
            Ok(nnz)
        }
    }
}

/// Checks an append described by its shapes (shared by the host op and the CUDA backend);
/// returns the number of appended rows.
pub(crate) fn check_append_shapes(
    targets: AppendTargets<'_>,
    sh: &AppendShapes,
    rope: Option<&AppendRope<'_>>,
) -> Result<usize> {
    let ps = sh.page_size;
    if ps == 0 || ps > MAX_PAGE_SIZE {
        return Err(Error::UnsupportedPageSize {
            expected: PAGE_SIZE_RULE,
            actual: ps,
        });
    }
    let nnz = check_targets(targets, ps, sh.num_pages)?;
    let (_, hkv, d) = sh.k_rows;
    let rule = match targets {
        AppendTargets::Csr(_) => "append_indptr[B]",
        AppendTargets::At(_) => "len(batch_indices)",
    };
    for (tensor, rows) in [("k", sh.k_rows), ("v", sh.v_rows)] {
        if rows.0 != nnz {
            return Err(Error::TensorShape {
                tensor,
                expected: format!("{nnz} token rows ({rule})"),
                actual: format!("{} token rows", rows.0),
            });
        }
    }
    if (sh.v_rows.1, sh.v_rows.2) != (hkv, d) {
        return Err(Error::TensorShape {
            tensor: "v",
            expected: format!("{hkv} heads x {d} (as k)"),
            actual: format!("{} heads x {}", sh.v_rows.1, sh.v_rows.2),
        });
    }
    let geo = (ps, sh.num_pages);
    check_cache_side("k_cache", sh.k_len, sh.k_base, sh.k_strides, geo, (hkv, d))?;
    check_cache_side(
        "v_cache",
        sh.v_len.unwrap_or(sh.k_len),
        sh.v_base,
        sh.v_strides,
        geo,
        (hkv, d),
    )?;
    if let Some(r) = rope {
        r.rope.validate(d)?;
        if let Some(p) = r.positions {
            if matches!(targets, AppendTargets::At(_)) {
                return Err(Error::InvalidOption {
                    field: "rope.positions",
                    expected: "None with AppendAt (its positions are the rotation positions)",
                    actual: format!("{} positions", p.len()),
                });
            }
            check_positions(p, nnz)?;
        }
    }
    Ok(nnz)
}

/// Checks the scales of an append into an FP8 cache: they come with an FP8 cache only, 1 or
/// `num_kv_heads` finite positive values each. Rows of any dtype are taken at face value
/// (FP8 rows decoded exactly, as with scale 1), so FP8 rows into a cache of the same format
/// without a scale are copied bit for bit (a NaN stays a NaN).
fn check_fp8_scales(k: &Rows<'_>, cache: &KvCacheMut<'_>) -> Result<()> {
    let hkv = k.heads();
    let sides = [
        ("k_scale", cache.k.dtype(), cache.k_scale),
        (
            "v_scale",
            cache.v.as_ref().map_or(cache.k.dtype(), |v| v.dtype()),
            cache.v_scale,
        ),
    ];
    for (field, dt, scale) in sides {
        check_fp8_scale(field, dt, scale, hkv)?;
    }
    Ok(())
}

/// The scale of head `h` (1 without scales; the count was checked).
fn head_scale(s: Option<&[f32]>, h: usize) -> f32 {
    match s {
        Some(s) if s.len() > 1 => s[h],
        Some(s) => s[0],
        None => 1.0,
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
    check_fp8_scales(k, cache)?;
    check_append_shapes(
        AppendTargets::Csr(batch),
        &AppendShapes::of(k, v, cache),
        rope,
    )
    .map(|_| ())
}

/// Checks an [`AppendAt`] append without writing anything (see [`append_kv_at`]).
pub fn check_append_at(
    at: &AppendAt<'_>,
    k: &Rows<'_>,
    v: &Rows<'_>,
    cache: &KvCacheMut<'_>,
    rope: Option<&AppendRope<'_>>,
) -> Result<()> {
    check_fp8_scales(k, cache)?;
    check_append_shapes(AppendTargets::At(at), &AppendShapes::of(k, v, cache), rope).map(|_| ())
}

/// Each appended row's page id, slot and rotation position (the targets are valid).
pub(crate) fn row_targets(
    t: AppendTargets<'_>,
    page_size: usize,
    rope_positions: Option<&[i32]>,
) -> Vec<(usize, usize, i64)> {
    let (kv_indptr, kv_indices, last) = t.kv();
    let at = |r: usize, pos: usize| {
        let page = kv_indices[kv_indptr[r] as usize + pos / page_size] as usize;
        (page, pos % page_size)
    };
    match t {
        AppendTargets::Csr(b) => {
            let mut out = Vec::with_capacity(b.append_indptr.last().map_or(0, |&n| n as usize));
            for r in 0..kv_indptr.len() - 1 {
                let a0 = b.append_indptr[r] as usize;
                let n = b.append_indptr[r + 1] as usize - a0;
                let start = kv_len_of(kv_indptr, last, r, page_size) - n;
                for j in 0..n {
                    let pos = start + j;
                    let (page, slot) = at(r, pos);
                    let rp = rope_positions.map_or(pos as i64, |p| p[a0 + j] as i64);
                    out.push((page, slot, rp));
                }
            }
            out
        }
        AppendTargets::At(a) => a
            .batch_indices
            .iter()
            .zip(a.positions)
            .map(|(&r, &p)| {
                let (page, slot) = at(r as usize, p as usize);
                (page, slot, p as i64)
            })
            .collect(),
    }
}

fn write_rows(
    targets: AppendTargets<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mut cache: KvCacheMut<'_>,
    rope: Option<AppendRope<'_>>,
) -> Result<()> {
    check_fp8_scales(&k, &cache)?;
    check_append_shapes(targets, &AppendShapes::of(&k, &v, &cache), rope.as_ref())?;
    let k_fp8 = cache.k.dtype().is_fp8();
    let v_fp8 = cache.v.as_ref().map_or(k_fp8, |v| v.dtype().is_fp8());
    let (hkv, d) = (k.heads(), k.head_dim());
    let ps = cache.page_size;
    let mut rot = rope.as_ref().map(|r| Rotation::new(r.rope, d));
    let mut buf = vec![0f32; d];
    let (ks, vs) = (cache.k_strides, cache.v_strides);
    let (k_base, v_base) = (cache.k_base, cache.v_base);
    let (kd, vd) = (k.data(), v.data());
    let rows = row_targets(targets, ps, rope.as_ref().and_then(|r| r.positions));
    for (t, &(page, slot, rpos)) in rows.iter().enumerate() {
        if let Some(rot) = rot.as_mut() {
            rot.at(rpos);
        }
        for h in 0..hkv {
            load_f32(&kd, k.offset(t, h), &mut buf);
            if let Some(rot) = rot.as_ref() {
                rot.rotate(&mut buf);
            }
            if k_fp8 {
                let s = head_scale(cache.k_scale, h);
                buf.iter_mut().for_each(|x| *x /= s);
            }
            let off = k_base + page * ks.page + slot * ks.token + h * ks.head;
            store_f32(&mut cache.k, off, &buf);
            load_f32(&vd, v.offset(t, h), &mut buf);
            if v_fp8 {
                let s = head_scale(cache.v_scale, h);
                buf.iter_mut().for_each(|x| *x /= s);
            }
            let off = v_base + page * vs.page + slot * vs.token + h * vs.head;
            match cache.v.as_mut() {
                Some(vt) => store_f32(vt, off, &buf),
                None => store_f32(&mut cache.k, off, &buf),
            }
        }
    }
    Ok(())
}

/// Writes the appended rows `k`, `v` (`[nnz, num_kv_heads, head_dim]`, any float dtype, any
/// strides) into the paged `cache` (its own dtypes and strides; an FP8 cache quantises with
/// its scales, [`KvCacheMut::with_scales`]), rotating K by `rope` when given.
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
    cache: KvCacheMut<'_>,
    rope: Option<AppendRope<'_>>,
) -> Result<()> {
    write_rows(AppendTargets::Csr(batch), k, v, cache, rope)
}

/// Writes appended row `i` of `k`, `v` to token `at.positions[i]` of request
/// `at.batch_indices[i]` (FlashInfer's `append_paged_kv_cache` contract), converting to the
/// cache's dtype and rotating K by `rope` at that position when given (`rope.positions` must
/// be `None`: the rows' positions are the rotation positions).
///
/// Checked first, nothing written on error: the cache's CSR arrays as for [`append_kv`],
/// one position per row, every request index in `0..B`, every position inside its
/// request's pages, the shapes and strides.
///
/// ```
/// use flashpage::ops::{Rows, append::{AppendAt, KvCacheMut, append_kv_at}};
/// use flashpage::{KvLayout, KvStrides, TensorMut, TensorRef};
/// let (ps, pages, d) = (4, 2, 8);
/// let (k_new, v_new) = (vec![1.0f32; 2 * d], vec![2.0f32; 2 * d]);
/// let mut k = vec![0f32; pages * ps * d];
/// let mut v = k.clone();
/// // one request of 5 tokens on pages [1, 0]; rows go to positions 4 and 0
/// let at = AppendAt { batch_indices: &[0, 0], positions: &[4, 0],
///                     kv_indptr: &[0, 2], kv_indices: &[1, 0], kv_last_page_len: &[1] };
/// append_kv_at(&at, Rows::dense(TensorRef::F32(&k_new), 2, 1, d)?,
///              Rows::dense(TensorRef::F32(&v_new), 2, 1, d)?,
///              KvCacheMut::split(TensorMut::F32(&mut k), TensorMut::F32(&mut v),
///                                KvStrides::dense(KvLayout::Nhd, ps, 1, d), ps, pages), None)?;
/// assert_eq!(k[0], 1.0); // page 0 slot 0 (position 4)
/// assert_eq!(k[ps * d], 1.0); // page 1 slot 0 (position 0)
/// assert_eq!(v[d], 0.0); // page 0 slot 1: untouched
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn append_kv_at(
    at: &AppendAt<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    cache: KvCacheMut<'_>,
    rope: Option<AppendRope<'_>>,
) -> Result<()> {
    write_rows(AppendTargets::At(at), k, v, cache, rope)
}
