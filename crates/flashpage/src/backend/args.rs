//! The tensors of a run on the host, and the checks every backend applies to a run's
//! arguments against its plan.

use crate::error::{Error, Result, shape_str};
use crate::layout::{CustomMask, DType, KvStrides, RunStrides};
use crate::plan::Plan;
use crate::tensor::{TensorMut, TensorRef};
use crate::validate::check_custom_mask;

/// The K/V tensors of a run: a paged cache or contiguous (ragged) K/V, described by strides.
#[derive(Debug, Clone, Copy)]
pub struct KvCache<'a> {
    /// K elements.
    pub k: TensorRef<'a>,
    /// V elements (may be a sub-slice of the same buffer as K for a combined cache).
    pub v: TensorRef<'a>,
    /// Element strides (page, token, head) of K (and of V unless
    /// [`KvCache::with_v_strides`] sets V's own).
    pub strides: KvStrides,
    /// Element strides of V (the constructors set K's).
    pub v_strides: KvStrides,
    /// Pages in the cache (ragged: tokens).
    pub num_pages: usize,
    /// Page ids (paged); empty for ragged K/V.
    pub kv_indices: &'a [i32],
    /// True for a paged cache ([`KvCache::paged`]), false for ragged K/V
    /// ([`KvCache::ragged`]); a plan of the other kind is refused naming the mismatch.
    pub paged: bool,
    /// Scales of an FP8 K (`k_scale`): 1 value (per tensor) or `num_kv_heads` (per KV head);
    /// K's value is `decode(code) · k_scale`. `None`: 1. Set by [`KvCache::with_scales`];
    /// only an FP8 cache takes scales (docs/semantics.md, "FP8 KV cache").
    pub k_scale: Option<&'a [f32]>,
    /// Scales of an FP8 V (`v_scale`), as `k_scale`.
    pub v_scale: Option<&'a [f32]>,
}

impl<'a> KvCache<'a> {
    /// A paged cache.
    pub fn paged(
        k: TensorRef<'a>,
        v: TensorRef<'a>,
        strides: KvStrides,
        num_pages: usize,
        kv_indices: &'a [i32],
    ) -> Self {
        KvCache {
            k,
            v,
            strides,
            v_strides: strides,
            num_pages,
            kv_indices,
            paged: true,
            k_scale: None,
            v_scale: None,
        }
    }

    /// Contiguous K/V `[tokens, num_kv_heads, head_dim]` (or any strides).
    pub fn ragged(k: TensorRef<'a>, v: TensorRef<'a>, strides: KvStrides, tokens: usize) -> Self {
        KvCache {
            k,
            v,
            strides,
            v_strides: strides,
            num_pages: tokens,
            kv_indices: &[],
            paged: false,
            k_scale: None,
            v_scale: None,
        }
    }

    /// The same cache with V addressed by its own strides (a split cache whose K and V
    /// tensors have different layouts or padding, or K and V slices of a fused buffer).
    ///
    /// ```
    /// use flashpage::backend::KvCache;
    /// use flashpage::{KvLayout, KvStrides, TensorRef};
    /// let (k, v) = (vec![0f32; 4 * 16 * 2 * 64], vec![0f32; 4 * 2 * 16 * 64]);
    /// let cache = KvCache::paged(TensorRef::F32(&k), TensorRef::F32(&v),
    ///                            KvStrides::dense(KvLayout::Nhd, 16, 2, 64), 4, &[0, 1])
    ///     .with_v_strides(KvStrides::dense(KvLayout::Hnd, 16, 2, 64));
    /// assert_ne!(cache.strides, cache.v_strides);
    /// ```
    pub fn with_v_strides(mut self, v_strides: KvStrides) -> Self {
        self.v_strides = v_strides;
        self
    }

    /// The same cache with the dequantisation scales of FP8 K and V (FlashInfer's `k_scale`
    /// and `v_scale`): each 1 value (per tensor) or `num_kv_heads` values (per KV head),
    /// finite and positive. Element `x` of K head `h` is `decode(x) · k_scale[h]` (or
    /// `k_scale[0]`), V likewise; the kernels apply `k_scale` once per score and `v_scale`
    /// once per output row, never per element.
    ///
    /// ```
    /// use flashpage::backend::KvCache;
    /// use flashpage::fp8::Fp8Format;
    /// use flashpage::{KvLayout, KvStrides, TensorRef};
    /// let (k, v) = (vec![0u8; 4 * 16 * 2 * 64], vec![0u8; 4 * 16 * 2 * 64]);
    /// let cache = KvCache::paged(TensorRef::Fp8(Fp8Format::E4M3Fn, &k),
    ///                            TensorRef::Fp8(Fp8Format::E4M3Fn, &v),
    ///                            KvStrides::dense(KvLayout::Nhd, 16, 2, 64), 4, &[0, 1])
    ///     .with_scales(&[0.05], &[0.02, 0.03]);
    /// assert_eq!(cache.v_scale, Some(&[0.02f32, 0.03][..]));
    /// ```
    pub fn with_scales(mut self, k_scale: &'a [f32], v_scale: &'a [f32]) -> Self {
        self.k_scale = Some(k_scale);
        self.v_scale = Some(v_scale);
        self
    }
}

/// The tensors of one run on the host.
#[derive(Debug)]
pub struct RunArgs<'a, 'o> {
    /// Queries `[rows, num_qo_heads, head_dim]`.
    pub q: TensorRef<'a>,
    /// Keys and values.
    pub kv: KvCache<'a>,
    /// Output `[rows, num_qo_heads, head_dim]`, same dtype as `q`.
    pub o: TensorMut<'o>,
    /// Log-sum-exp `[rows, num_qo_heads]` (natural log), if wanted.
    pub lse: Option<&'o mut [f32]>,
    /// Attention sinks `[num_qo_heads]`, if the model has them (gpt-oss): one extra logit per
    /// query head in the softmax denominator, with no value (docs/semantics.md, "Attention
    /// sinks"). A per-layer tensor, so an argument of the run rather than of the plan.
    pub sinks: Option<&'a [f32]>,
    /// A custom attention mask (FlashInfer's packed layout, [`CustomMask`]): per request, a
    /// bit per (query row, key), set where the key is visible; combined with causal and the
    /// window (docs/semantics.md, "Custom masks"). Like the sinks, data of the run: the
    /// plan does not depend on it.
    pub custom_mask: Option<CustomMask<'a>>,
}

/// Shapes a backend needs to check, independent of where the data lives.
#[derive(Debug, Clone, Copy)]
pub struct ArgShapes<'a> {
    /// dtype and elements of q.
    pub q: (DType, usize),
    /// dtype and elements of k.
    pub k: (DType, usize),
    /// dtype and elements of v.
    pub v: (DType, usize),
    /// dtype and elements of o.
    pub o: (DType, usize),
    /// elements of lse, if given.
    pub lse: Option<usize>,
    /// elements of the attention sinks, if given.
    pub sinks: Option<usize>,
    /// The custom mask's host `mask_indptr` and its bits buffer's length in bytes, if a mask
    /// is given.
    pub custom_mask: Option<(&'a [i32], usize)>,
    /// The FP8 K scales, if given (checked: count, finite and positive).
    pub k_scale: Option<&'a [f32]>,
    /// The FP8 V scales, if given.
    pub v_scale: Option<&'a [f32]>,
    /// K strides.
    pub strides: KvStrides,
    /// V strides (equal to `strides` unless V has its own layout).
    pub v_strides: KvStrides,
    /// q and o strides of a strided run; `None`: contiguous q and o of exactly
    /// `[rows, num_qo_heads, head_dim]` elements.
    pub qo: Option<RunStrides>,
    /// Pages (or ragged tokens) in the cache.
    pub num_pages: usize,
    /// Host page ids, when the caller has them on the host (checked against `num_pages`).
    pub kv_indices: Option<&'a [i32]>,
    /// Length of the page-id array.
    pub num_indices: usize,
    /// Whether the caller's K/V is a paged cache (`Some(true)`) or ragged K/V
    /// (`Some(false)`); `None` when the arguments do not say (device arguments).
    pub paged: Option<bool>,
}

/// Checks strided q and o of `rows` rows of `hq` heads × `d` over `q_len` and `o_len`
/// elements: the largest offset of each is inside its buffer (checked arithmetic), and o's
/// row/head blocks do not overlap (q may overlap: it is only read).
fn check_qo_strides(
    rows: usize,
    hq: usize,
    d: usize,
    q_len: usize,
    o_len: usize,
    qo: &RunStrides,
) -> Result<()> {
    let o = qo.o;
    if !o.is_disjoint(rows, hq, d) {
        return Err(Error::TensorShape {
            tensor: "o",
            expected: format!(
                "row and head strides whose {rows} rows x {hq} heads of {d} elements do not overlap (head >= {d} and row >= (heads - 1) * head + {d}, or rows nested in heads)"
            ),
            actual: format!("row stride {}, head stride {}", o.row, o.head),
        });
    }
    for (tensor, st, n) in [("q", qo.q, q_len), ("o", o, o_len)] {
        let extent = st
            .extent(rows, hq, d)
            .ok_or(Error::SizeOverflow { what: tensor })?;
        if extent > n {
            return Err(Error::TensorShape {
                tensor,
                expected: format!(
                    "at least {extent} elements for {rows} rows x {hq} heads x {d} with row stride {}, head stride {}",
                    st.row, st.head
                ),
                actual: format!("{n} elements"),
            });
        }
    }
    Ok(())
}

/// Checks the dtypes of a run and the FP8 scales: q is a float type, o has q's type, K and
/// V both have q's type or one FP8 type; scales come only with an FP8 cache, each 1 or
/// `num_kv_heads` finite positive values.
fn check_dtypes(a: &ArgShapes<'_>, hkv: usize) -> Result<()> {
    let dt = a.q.0;
    if dt.is_fp8() {
        return Err(Error::DTypeMismatch {
            tensor: "q",
            expected: "f32, f16 or bf16 (fp8 is a k/v cache type only)",
            actual: dt.name(),
        });
    }
    if a.o.0 != dt {
        return Err(Error::DTypeMismatch {
            tensor: "o",
            expected: dt.name(),
            actual: a.o.0.name(),
        });
    }
    let kt = a.k.0;
    if kt != dt && !kt.is_fp8() {
        return Err(Error::DTypeMismatch {
            tensor: "k",
            expected: match dt {
                DType::F32 => "f32 (q's dtype), e4m3fn or e5m2",
                DType::F16 => "f16 (q's dtype), e4m3fn or e5m2",
                _ => "bf16 (q's dtype), e4m3fn or e5m2",
            },
            actual: kt.name(),
        });
    }
    if a.v.0 != kt {
        return Err(Error::DTypeMismatch {
            tensor: "v",
            expected: kt.name(),
            actual: a.v.0.name(),
        });
    }
    for (field, scale) in [("k_scale", a.k_scale), ("v_scale", a.v_scale)] {
        crate::validate::check_fp8_scale(field, kt, scale, hkv)?;
    }
    Ok(())
}

/// Checks run arguments against a plan: dtypes agree, shapes match the batch, the strides
/// stay inside K and V for every page, and every page id the plan reads is in range.
pub fn check_run_args(plan: &Plan, a: &ArgShapes<'_>) -> Result<()> {
    let h = plan.heads();
    let (hq, hkv, d) = (h.num_qo_heads(), h.num_kv_heads(), h.head_dim());
    if let Some(paged) = a.paged
        && paged != plan.is_paged()
    {
        let name = |p: bool| {
            if p {
                "a paged kv cache (KvCache::paged)"
            } else {
                "ragged k/v (KvCache::ragged)"
            }
        };
        return Err(Error::PlanMismatch {
            what: "kv cache kind",
            expected: name(plan.is_paged()).into(),
            actual: name(paged).into(),
        });
    }
    check_dtypes(a, hkv)?;
    let rows = plan.num_q_rows();
    match a.qo {
        None => {
            for (tensor, (_, n)) in [("q", a.q), ("o", a.o)] {
                if n != rows * hq * d {
                    return Err(Error::TensorShape {
                        tensor,
                        expected: shape_str(&[rows, hq, d]),
                        actual: format!("{n} elements"),
                    });
                }
            }
        }
        Some(qo) => check_qo_strides(rows, hq, d, a.q.1, a.o.1, &qo)?,
    }
    if let Some(n) = a.lse
        && n != rows * hq
    {
        return Err(Error::TensorShape {
            tensor: "lse",
            expected: shape_str(&[rows, hq]),
            actual: format!("{n} elements"),
        });
    }
    if let Some(n) = a.sinks
        && n != hq
    {
        return Err(Error::TensorShape {
            tensor: "sinks",
            expected: shape_str(&[hq]),
            actual: format!("{n} elements"),
        });
    }
    if let Some((indptr, bytes)) = a.custom_mask {
        check_custom_mask(indptr, bytes, plan.batch_size(), |r| {
            plan.request(r).map_or((0, 0), |q| (q.qo_len, q.kv_len))
        })?;
    }
    if plan.options().return_lse && a.lse.is_none() {
        return Err(Error::TensorShape {
            tensor: "lse",
            expected: shape_str(&[rows, hq]),
            actual: "none (the plan's options ask for the LSE)".into(),
        });
    }
    let page_size = plan.page_size();
    for (tensor, s, (_, n)) in [("k_cache", a.strides, a.k), ("v_cache", a.v_strides, a.v)] {
        if s.head < d && hkv > 1
            || (page_size > 1 && s.token < d)
            || (a.num_pages > 1 && s.page < d)
        {
            return Err(Error::TensorShape {
                tensor,
                expected: format!("strides of at least head_dim = {d}"),
                actual: format!("page {}, token {}, head {}", s.page, s.token, s.head),
            });
        }
        let extent = s
            .extent(a.num_pages, page_size, hkv, d)
            .ok_or(Error::SizeOverflow { what: tensor })?;
        if extent > n {
            return Err(Error::TensorShape {
                tensor,
                expected: format!(
                    "at least {extent} elements for {} pages of {page_size} tokens with strides (page {}, token {}, head {})",
                    a.num_pages, s.page, s.token, s.head
                ),
                actual: format!("{n} elements"),
            });
        }
    }
    // Every page (or ragged token) the plan touches.
    for r in 0..plan.batch_size() {
        let Some(req) = plan.request(r) else { continue };
        if req.kv_len == 0 {
            continue;
        }
        if plan.is_paged() {
            let pages = req.kv_len.div_ceil(page_size);
            let end = req.kv_start + pages;
            if end > a.num_indices {
                return Err(Error::IndicesTooShort {
                    batch_size: plan.batch_size(),
                    needed: end,
                    actual: a.num_indices,
                });
            }
            if let Some(ids) = a.kv_indices {
                for (i, &id) in ids[req.kv_start..end].iter().enumerate() {
                    if id < 0 || id as usize >= a.num_pages {
                        return Err(Error::PageIdOutOfRange {
                            index: req.kv_start + i,
                            page_id: id as i64,
                            num_pages: a.num_pages,
                        });
                    }
                }
            }
        } else if req.kv_start + req.kv_len > a.num_pages {
            return Err(Error::TensorShape {
                tensor: "k",
                expected: format!(
                    "at least {} tokens (request {r} ends there)",
                    req.kv_start + req.kv_len
                ),
                actual: format!("{} tokens", a.num_pages),
            });
        }
    }
    Ok(())
}

impl RunArgs<'_, '_> {
    /// The shapes of these host arguments.
    pub fn shapes(&self) -> ArgShapes<'_> {
        ArgShapes {
            q: (self.q.dtype(), self.q.len()),
            k: (self.kv.k.dtype(), self.kv.k.len()),
            v: (self.kv.v.dtype(), self.kv.v.len()),
            o: (self.o.dtype(), self.o.len()),
            lse: self.lse.as_ref().map(|l| l.len()),
            sinks: self.sinks.map(|s| s.len()),
            custom_mask: self.custom_mask.map(|m| (m.indptr, m.bits.len())),
            k_scale: self.kv.k_scale,
            v_scale: self.kv.v_scale,
            strides: self.kv.strides,
            v_strides: self.kv.v_strides,
            qo: None,
            num_pages: self.kv.num_pages,
            kv_indices: Some(self.kv.kv_indices),
            num_indices: self.kv.kv_indices.len(),
            paged: Some(self.kv.paged),
        }
    }
}
