//! Plan and run: the engine under the three FlashInfer wrappers.

use std::sync::OnceLock;

use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::{KvCache, RunArgs};
use flashpage::{
    AttentionOptions, BatchDesc, CascadeLevel, CascadePlan, CustomMask, DType, Error, HeadConfig,
    KvLayout, KvStrides, PageTable, Plan, PlanConfig, PosEncoding, TensorMut,
};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::errors::{Failure, guard};
use crate::ffi::{Borrowed, Kind, check_disjoint, shape_error};

/// The process's CPU backend: one thread per core, or `FLASHPAGE_NUM_THREADS`.
pub fn backend() -> Result<&'static CpuBackend, Failure> {
    static CPU: OnceLock<Result<CpuBackend, Error>> = OnceLock::new();
    CPU.get_or_init(|| {
        let threads = std::env::var("FLASHPAGE_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        CpuBackend::new(threads)
    })
    .as_ref()
    .map_err(|e| e.clone().into())
}

/// A positive count from Python.
fn count(field: &'static str, v: i64) -> Result<usize, Failure> {
    if v <= 0 {
        return Err(Error::NotPositive { field, actual: v }.into());
    }
    Ok(v as usize)
}

/// A finite option from Python as f32.
fn opt_f32(v: Option<f64>) -> Option<f32> {
    v.map(|x| x as f32)
}

/// torch's name of a dtype.
fn torch_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "torch.float32",
        DType::F16 => "torch.float16",
        DType::BF16 => "torch.bfloat16",
        DType::E4M3Fn => "torch.float8_e4m3fn",
        DType::E5M2 => "torch.float8_e5m2",
    }
}

/// Parses FlashInfer's `q_data_type`/`kv_data_type` (`"float16"`, `"torch.bfloat16"`,
/// `"torch.float8_e4m3fn"`, …); the FP8 formats only where `fp8` (a K/V cache's dtype).
fn parse_dtype(field: &'static str, s: &str, fp8: bool) -> Result<DType, Failure> {
    let t = s.trim().trim_start_matches("torch.");
    DType::parse(t)
        .filter(|d| fp8 || !d.is_fp8())
        .ok_or_else(|| {
            Error::InvalidOption {
                field,
                expected: if fp8 {
                    "torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn or torch.float8_e5m2"
                } else {
                    "torch.float32, torch.float16 or torch.bfloat16"
                },
                actual: s.to_string(),
            }
            .into()
        })
}

/// FlashInfer's `pos_encoding_mode` (`NONE`, `ROPE_LLAMA`, `ALIBI`) with its RoPE options.
fn parse_pos_encoding(
    mode: &str,
    rope_scale: Option<f64>,
    rope_theta: Option<f64>,
) -> Result<PosEncoding, Failure> {
    let name = match mode {
        "NONE" => "none",
        "ROPE_LLAMA" => "rope",
        "ALIBI" => "alibi",
        _ => {
            return Err(Error::InvalidOption {
                field: "pos_encoding_mode",
                expected: "\"NONE\", \"ROPE_LLAMA\" or \"ALIBI\"",
                actual: format!("{mode:?}"),
            }
            .into());
        }
    };
    Ok(PosEncoding::parse(
        name,
        opt_f32(rope_theta),
        opt_f32(rope_scale),
    )?)
}

/// The arguments every plan takes, as Python passes them.
struct Common<'a> {
    num_qo_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    kv_layout: &'a str,
    causal: bool,
    window_left: i64,
    logits_soft_cap: Option<f64>,
    sm_scale: Option<f64>,
    pos_encoding_mode: &'a str,
    rope_scale: Option<f64>,
    rope_theta: Option<f64>,
    q_data_type: &'a str,
    kv_data_type: &'a str,
}

/// [`Common`] checked: heads, options, layout and dtypes.
struct Parsed {
    heads: HeadConfig,
    opts: AttentionOptions,
    layout: KvLayout,
    q_dtype: DType,
    kv_dtype: DType,
}

fn parse_common(c: &Common<'_>) -> Result<Parsed, Failure> {
    let layout = KvLayout::parse(c.kv_layout).ok_or_else(|| Error::InvalidOption {
        field: "kv_layout",
        expected: "\"NHD\" or \"HND\"",
        actual: format!("{:?}", c.kv_layout),
    })?;
    let heads = HeadConfig::new(
        count("num_qo_heads", c.num_qo_heads)?,
        count("num_kv_heads", c.num_kv_heads)?,
        count("head_dim", c.head_dim)?,
    )?;
    // FlashInfer treats a soft-cap of 0 as none.
    let soft_cap = opt_f32(c.logits_soft_cap).filter(|&x| x != 0.0);
    let opts = AttentionOptions::new()
        .with_causal(c.causal)
        .with_window_left(AttentionOptions::window_from_signed(c.window_left)?)
        .with_logits_soft_cap(soft_cap)
        .with_sm_scale(opt_f32(c.sm_scale))
        .with_pos_encoding(parse_pos_encoding(
            c.pos_encoding_mode,
            c.rope_scale,
            c.rope_theta,
        )?);
    let q_dtype = parse_dtype("q_data_type", c.q_data_type, false)?;
    let kv_dtype = parse_dtype("kv_data_type", c.kv_data_type, true)?;
    if kv_dtype != q_dtype && !kv_dtype.is_fp8() {
        return Err(Error::Unsupported {
            backend: "cpu",
            what: format!(
                "kv_data_type {} with q_data_type {} (the KV cache has q's dtype or an fp8 one)",
                torch_name(kv_dtype),
                torch_name(q_dtype)
            ),
        }
        .into());
    }
    Ok(Parsed {
        heads,
        opts,
        layout,
        q_dtype,
        kv_dtype,
    })
}

/// Which FlashInfer wrapper a plan belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// `BatchDecodeWithPagedKVCacheWrapper`.
    Decode,
    /// `BatchPrefillWithPagedKVCacheWrapper`.
    PagedPrefill,
    /// `BatchPrefillWithRaggedKVCacheWrapper`.
    RaggedPrefill,
    /// `MultiLevelCascadeAttentionWrapper`.
    Cascade,
}

/// A validated, planned batch: what a wrapper's `plan` builds and its `run` executes.
#[pyclass(module = "flashpage._flashpage", frozen)]
pub struct AttentionPlan {
    /// The plan (a cascade's: its level 0, for the shapes every level shares).
    plan: Plan,
    /// The levels of a cascade plan.
    cascade: Option<CascadePlan>,
    /// The packed custom mask and its `mask_indptr` (bytes per request), if planned with one.
    mask: Option<PackedMask>,
    flavor: Flavor,
    kv_indices: Vec<i32>,
    layout: KvLayout,
    q_dtype: DType,
    kv_dtype: DType,
}

/// Plans a batch (see `flashpage/_wrappers.py` for the FlashInfer arguments). Paged when
/// `page_size` is given (decode when `qo_indptr` is `None`), ragged otherwise.
#[pyfunction]
#[pyo3(signature = (qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads,
    head_dim, page_size, kv_layout, causal, window_left, logits_soft_cap, sm_scale,
    pos_encoding_mode, rope_scale, rope_theta, q_data_type, kv_data_type, custom_mask=None,
    packed_custom_mask=None))]
#[allow(clippy::too_many_arguments)]
pub fn plan(
    py: Python<'_>,
    qo_indptr: Option<Bound<'_, PyAny>>,
    kv_indptr: Bound<'_, PyAny>,
    kv_indices: Option<Bound<'_, PyAny>>,
    last_page_len: Option<Bound<'_, PyAny>>,
    num_qo_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    page_size: Option<i64>,
    kv_layout: &str,
    causal: bool,
    window_left: i64,
    logits_soft_cap: Option<f64>,
    sm_scale: Option<f64>,
    pos_encoding_mode: &str,
    rope_scale: Option<f64>,
    rope_theta: Option<f64>,
    q_data_type: &str,
    kv_data_type: &str,
    custom_mask: Option<Bound<'_, PyAny>>,
    packed_custom_mask: Option<Bound<'_, PyAny>>,
) -> PyResult<AttentionPlan> {
    guard(py, || {
        let Parsed {
            heads,
            opts,
            layout,
            q_dtype,
            kv_dtype,
        } = parse_common(&Common {
            num_qo_heads,
            num_kv_heads,
            head_dim,
            kv_layout,
            causal,
            window_left,
            logits_soft_cap,
            sm_scale,
            pos_encoding_mode,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
        })?;
        let qo = match &qo_indptr {
            Some(t) => Some(Borrowed::new(t, "qo_indptr")?.indices()?),
            None => None,
        };
        let kv_indptr = Borrowed::new(&kv_indptr, "paged_kv_indptr")?.indices()?;
        let config = PlanConfig::with_parallelism(backend()?.threads());
        let (plan, flavor, indices) = match page_size {
            Some(page_size) => {
                let page_size = count("page_size", page_size)?;
                let (Some(ix), Some(lp)) = (kv_indices, last_page_len) else {
                    return Err(crate::errors::type_error(
                        "a paged plan needs kv_indices and last_page_len".into(),
                    ));
                };
                let indices = Borrowed::new(&ix, "paged_kv_indices")?.indices()?;
                let last = Borrowed::new(&lp, "paged_kv_last_page_len")?.indices()?;
                let pages = PageTable {
                    page_size,
                    // Page ids are checked against the cache at run time, when its size is
                    // known (FlashInfer's plan does not see the cache either).
                    num_pages: usize::MAX,
                    indptr: &kv_indptr,
                    last_page_len: &last,
                    num_indices: indices.len(),
                };
                let (desc, flavor) = match &qo {
                    None => (BatchDesc::decode(heads, pages), Flavor::Decode),
                    Some(qo) => (
                        BatchDesc::prefill_paged(heads, qo, pages),
                        Flavor::PagedPrefill,
                    ),
                };
                (Plan::new(&desc, &opts, &config)?, flavor, indices)
            }
            None => {
                let qo = qo.as_deref().unwrap_or(&[]);
                let desc = BatchDesc::prefill_ragged(heads, qo, &kv_indptr);
                (
                    Plan::new(&desc, &opts, &config)?,
                    Flavor::RaggedPrefill,
                    Vec::new(),
                )
            }
        };
        let mask = custom_mask_of(&plan, custom_mask.as_ref(), packed_custom_mask.as_ref())?;
        Ok(AttentionPlan {
            plan,
            cascade: None,
            mask,
            flavor,
            kv_indices: indices,
            layout,
            q_dtype,
            kv_dtype,
        })
    })
}

/// Plans a multi-level cascade (FlashInfer's `MultiLevelCascadeAttentionWrapper.plan`): one
/// paged prefill level per entry of the four lists, over the same query rows; `causal`
/// applies to the last level only (docs/cascade.md).
#[pyfunction]
#[pyo3(signature = (qo_indptr_arr, kv_indptr_arr, kv_indices_arr, last_page_len_arr,
    num_qo_heads, num_kv_heads, head_dim, page_size, kv_layout, causal, window_left,
    logits_soft_cap, sm_scale, pos_encoding_mode, rope_scale, rope_theta, q_data_type,
    kv_data_type))]
#[allow(clippy::too_many_arguments)]
pub fn plan_cascade(
    py: Python<'_>,
    qo_indptr_arr: Vec<Bound<'_, PyAny>>,
    kv_indptr_arr: Vec<Bound<'_, PyAny>>,
    kv_indices_arr: Vec<Bound<'_, PyAny>>,
    last_page_len_arr: Vec<Bound<'_, PyAny>>,
    num_qo_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    page_size: i64,
    kv_layout: &str,
    causal: bool,
    window_left: i64,
    logits_soft_cap: Option<f64>,
    sm_scale: Option<f64>,
    pos_encoding_mode: &str,
    rope_scale: Option<f64>,
    rope_theta: Option<f64>,
    q_data_type: &str,
    kv_data_type: &str,
) -> PyResult<AttentionPlan> {
    guard(py, || {
        let Parsed {
            heads,
            opts,
            layout,
            q_dtype,
            kv_dtype,
        } = parse_common(&Common {
            num_qo_heads,
            num_kv_heads,
            head_dim,
            kv_layout,
            causal,
            window_left,
            logits_soft_cap,
            sm_scale,
            pos_encoding_mode,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
        })?;
        let page_size = count("page_size", page_size)?;
        let levels = qo_indptr_arr.len();
        for (field, n) in [
            ("paged_kv_indptr_arr", kv_indptr_arr.len()),
            ("paged_kv_indices_arr", kv_indices_arr.len()),
            ("paged_kv_last_page_len", last_page_len_arr.len()),
        ] {
            if n != levels {
                return Err(Error::ArrayLength {
                    field,
                    expected: levels,
                    actual: n,
                    rule: "one entry per cascade level (the length of qo_indptr_arr)",
                }
                .into());
            }
        }
        let mut arrays = Vec::with_capacity(levels);
        for l in 0..levels {
            arrays.push([
                Borrowed::new(&qo_indptr_arr[l], "qo_indptr")?.indices()?,
                Borrowed::new(&kv_indptr_arr[l], "paged_kv_indptr")?.indices()?,
                Borrowed::new(&kv_indices_arr[l], "paged_kv_indices")?.indices()?,
                Borrowed::new(&last_page_len_arr[l], "paged_kv_last_page_len")?.indices()?,
            ]);
        }
        let level_refs: Vec<CascadeLevel<'_>> = arrays
            .iter()
            .map(|[qo, kv, ix, last]| CascadeLevel {
                qo_indptr: qo,
                kv_indptr: kv,
                kv_indices: ix,
                last_page_len: last,
            })
            .collect();
        let config = PlanConfig::with_parallelism(backend()?.threads());
        // Page ids are checked against the cache at run time, when its size is known.
        let cascade = CascadePlan::new(heads, page_size, usize::MAX, &level_refs, &opts, &config)?;
        let plan = cascade
            .level_plan(0)
            .cloned()
            .expect("a cascade has at least one level");
        Ok(AttentionPlan {
            plan,
            cascade: Some(cascade),
            mask: None,
            flavor: Flavor::Cascade,
            kv_indices: Vec::new(),
            layout,
            q_dtype,
            kv_dtype,
        })
    })
}

/// A packed custom mask's bits and its `mask_indptr` (bytes per request).
type PackedMask = (Vec<u8>, Vec<i32>);

/// The packed custom mask of a plan (FlashInfer's layout: per request the row-major
/// `qo_len × kv_len` bits, little-endian within a byte, each request starting on a byte),
/// from a bool `custom_mask` of the unpacked elements or a uint8 `packed_custom_mask`, with
/// its `mask_indptr` in bytes.
fn custom_mask_of(
    plan: &Plan,
    custom_mask: Option<&Bound<'_, PyAny>>,
    packed: Option<&Bound<'_, PyAny>>,
) -> Result<Option<PackedMask>, Failure> {
    let segments: Vec<usize> = (0..plan.batch_size())
        .map(|r| plan.request(r).map_or(0, |q| q.qo_len * q.kv_len))
        .collect();
    let mut indptr = Vec::with_capacity(segments.len() + 1);
    let mut bytes = 0usize;
    indptr.push(0i32);
    for &n in &segments {
        bytes += n.div_ceil(8);
        let at = i32::try_from(bytes).map_err(|_| Error::LimitExceeded {
            field: "custom_mask bytes",
            limit: i32::MAX as usize,
            actual: bytes,
            rule: "mask_indptr is int32",
        })?;
        indptr.push(at);
    }
    let bits = match (custom_mask, packed) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(Error::InvalidOption {
                field: "custom_mask",
                expected: "custom_mask or packed_custom_mask, not both",
                actual: "both".into(),
            }
            .into());
        }
        (Some(m), None) => {
            let m = Borrowed::new(m, "custom_mask")?;
            let flat = m.bools()?;
            let total: usize = segments.iter().sum();
            if flat.len() != total {
                return Err(shape_error(
                    "custom_mask",
                    format!("{total} elements (the sum of qo_len × kv_len over the requests)"),
                    &m.shape,
                ));
            }
            let mut out = vec![0u8; bytes];
            let (mut at, mut byte) = (0usize, 0usize);
            for &n in &segments {
                for (i, &b) in flat[at..at + n].iter().enumerate() {
                    out[byte + i / 8] |= u8::from(b) << (i % 8);
                }
                at += n;
                byte += n.div_ceil(8);
            }
            out
        }
        (None, Some(p)) => {
            let p = Borrowed::new(p, "packed_custom_mask")?;
            if p.kind != Kind::U8 {
                return Err(p.dtype_error("torch.uint8"));
            }
            p.expect_contiguous()?;
            if p.bytes().len() < bytes {
                return Err(shape_error(
                    "packed_custom_mask",
                    format!(
                        "at least {bytes} bytes (each request's qo_len × kv_len bits, byte-aligned)"
                    ),
                    &p.shape,
                ));
            }
            p.bytes()[..bytes].to_vec()
        }
    };
    Ok(Some((bits, indptr)))
}

/// K and V of a run: two (possibly identical) tensors and the offset of V's first element.
struct KvTensors<'py> {
    k: Borrowed<'py>,
    v: Option<Borrowed<'py>>,
    v_offset: usize,
    strides: KvStrides,
    num_pages: usize,
}

impl AttentionPlan {
    fn dims(&self) -> (usize, usize, usize, usize) {
        let h = self.plan.heads();
        (
            h.num_qo_heads(),
            h.num_kv_heads(),
            h.head_dim(),
            self.plan.page_size(),
        )
    }

    /// The paged cache: one `[pages, 2, ...]` tensor or a `(k_cache, v_cache)` pair.
    fn paged_cache<'py>(&self, cache: &Bound<'py, PyAny>) -> Result<KvTensors<'py>, Failure> {
        let (_, hkv, d, ps) = self.dims();
        let page_dims = |nhd: bool| -> [Option<usize>; 3] {
            if nhd {
                [Some(ps), Some(hkv), Some(d)]
            } else {
                [Some(hkv), Some(ps), Some(d)]
            }
        };
        let nhd = self.layout == KvLayout::Nhd;
        let inner = if nhd {
            format!("[{ps}, {hkv}, {d}] (page_size, num_kv_heads, head_dim: NHD)")
        } else {
            format!("[{hkv}, {ps}, {d}] (num_kv_heads, page_size, head_dim: HND)")
        };
        let strides_of = |s: &[usize]| {
            // s: strides of (page, a, b, d) where (a, b) are (token, head) or (head, token).
            let (token, head) = if nhd { (s[1], s[2]) } else { (s[2], s[1]) };
            KvStrides {
                page: s[0],
                token,
                head,
            }
        };
        let pair = if let Ok(t) = cache.cast::<PyTuple>() {
            Some(t.iter().collect::<Vec<_>>())
        } else if let Ok(l) = cache.cast::<PyList>() {
            Some(l.iter().collect::<Vec<_>>())
        } else {
            None
        };
        match pair {
            Some(items) => {
                if items.len() != 2 {
                    return Err(crate::errors::type_error(format!(
                        "paged_kv_cache must be one tensor or a (k_cache, v_cache) pair, got a sequence of {}",
                        items.len()
                    )));
                }
                let k = Borrowed::new(&items[0], "k_cache")?;
                let v = Borrowed::new(&items[1], "v_cache")?;
                for t in [&k, &v] {
                    let [a, b, c] = page_dims(nhd);
                    t.expect_shape(&[None, a, b, c], &format!("[num_pages, {inner}"))?;
                    if t.strides[3] != 1 && d > 1 {
                        return Err(Error::TensorShape {
                            tensor: t.name,
                            expected: "a contiguous last (head_dim) dimension".into(),
                            actual: format!("strides {:?}", t.strides),
                        }
                        .into());
                    }
                }
                if v.shape[0] != k.shape[0] || v.strides[..3] != k.strides[..3] {
                    return Err(Error::TensorShape {
                        tensor: "v_cache",
                        expected: format!(
                            "the shape and strides of k_cache: {:?} / {:?}",
                            k.shape, k.strides
                        ),
                        actual: format!("{:?} / {:?}", v.shape, v.strides),
                    }
                    .into());
                }
                let strides = strides_of(&k.strides);
                let num_pages = k.shape[0];
                Ok(KvTensors {
                    k,
                    v: Some(v),
                    v_offset: 0,
                    strides,
                    num_pages,
                })
            }
            None => {
                let t = Borrowed::new(cache, "paged_kv_cache")?;
                let [a, b, c] = page_dims(nhd);
                t.expect_shape(
                    &[None, Some(2), a, b, c],
                    &format!("[num_pages, 2, {inner}"),
                )?;
                if t.strides[4] != 1 && d > 1 {
                    return Err(Error::TensorShape {
                        tensor: "paged_kv_cache",
                        expected: "a contiguous last (head_dim) dimension".into(),
                        actual: format!("strides {:?}", t.strides),
                    }
                    .into());
                }
                let s = &t.strides;
                let strides = strides_of(&[s[0], s[2], s[3], s[4]]);
                let (num_pages, v_offset) = (t.shape[0], s[1]);
                Ok(KvTensors {
                    k: t,
                    v: None,
                    v_offset,
                    strides,
                    num_pages,
                })
            }
        }
    }

    /// Ragged K/V: `k` and `v` of `[kv_indptr[-1], num_kv_heads, head_dim]` (NHD) or
    /// `[num_kv_heads, kv_indptr[-1], head_dim]` (HND).
    fn ragged_kv<'py>(
        &self,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
    ) -> Result<KvTensors<'py>, Failure> {
        let (_, hkv, d, _) = self.dims();
        let k = Borrowed::new(k, "k")?;
        let v = Borrowed::new(v, "v")?;
        // NHD: [kv_len, num_kv_heads, head_dim]; HND: [num_kv_heads, kv_len, head_dim].
        let (tok, head) = if self.layout == KvLayout::Nhd {
            (0, 1)
        } else {
            (1, 0)
        };
        for t in [&k, &v] {
            let mut dims = [None, None, Some(d)];
            dims[head] = Some(hkv);
            let what = if self.layout == KvLayout::Nhd {
                format!("[kv_len, {hkv}, {d}] (kv_len, num_kv_heads, head_dim: NHD)")
            } else {
                format!("[{hkv}, kv_len, {d}] (num_kv_heads, kv_len, head_dim: HND)")
            };
            t.expect_shape(&dims, &what)?;
            if t.strides[2] != 1 && d > 1 {
                return Err(shape_error(
                    t.name,
                    "a contiguous last (head_dim) dimension".into(),
                    &t.shape,
                ));
            }
        }
        if v.shape != k.shape || v.strides != k.strides {
            return Err(Error::TensorShape {
                tensor: "v",
                expected: format!(
                    "the shape and strides of k: {:?} / {:?}",
                    k.shape, k.strides
                ),
                actual: format!("{:?} / {:?}", v.shape, v.strides),
            }
            .into());
        }
        let strides = KvStrides {
            page: k.strides[tok],
            token: 0,
            head: k.strides[head],
        };
        let num_pages = k.shape[tok];
        Ok(KvTensors {
            k,
            v: Some(v),
            v_offset: 0,
            strides,
            num_pages,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_inner(
        &self,
        workspace: &Bound<'_, PyAny>,
        q: &Bound<'_, PyAny>,
        kv: KvTensors<'_>,
        out: &Bound<'_, PyAny>,
        lse: Option<&Bound<'_, PyAny>>,
        extras: Extras<'_, '_>,
        reps: usize,
    ) -> Result<f64, Failure> {
        let Extras {
            sinks,
            k_scale,
            v_scale,
        } = extras;
        let (hq, hkv, d, _) = self.dims();
        let rows = self.plan.num_q_rows();
        let q = Borrowed::new(q, "q")?;
        let mut out = Borrowed::new(out, "out")?;
        let mut lse = lse.map(|l| Borrowed::new(l, "lse")).transpose()?;
        let mut ws = Borrowed::new(workspace, "float_workspace_buffer")?;
        let qd = format!("[{rows}, {hq}, {d}] (num_q_rows, num_qo_heads, head_dim)");
        q.expect_shape(&[Some(rows), Some(hq), Some(d)], &qd)?;
        q.expect_contiguous()?;
        out.expect_shape(&[Some(rows), Some(hq), Some(d)], &qd)?;
        if let Some(l) = &lse {
            l.expect_shape(
                &[Some(rows), Some(hq)],
                &format!("[{rows}, {hq}] (num_q_rows, num_qo_heads)"),
            )?;
        }
        // Attention sinks: float32 [num_qo_heads], natural-log logits (FlashInfer's
        // convention); a copy of num_qo_heads floats.
        let sinks = match sinks {
            Some(t) => {
                let t = Borrowed::new(t, "sinks")?;
                t.expect_shape(&[Some(hq)], &format!("[{hq}] (num_qo_heads)"))?;
                Some(t.f32_vec()?)
            }
            None => None,
        };
        let k_scale = k_scale
            .map(|s| scale_values("k_scale", s, hkv))
            .transpose()?;
        let v_scale = v_scale
            .map(|s| scale_values("v_scale", s, hkv))
            .transpose()?;
        if q.kind.dtype() != Some(self.q_dtype) {
            return Err(q.dtype_error(torch_name(self.q_dtype)));
        }
        if out.kind != q.kind {
            return Err(out.dtype_error(q.kind.name()));
        }
        for t in std::iter::once(&kv.k).chain(&kv.v) {
            if t.kind.dtype() != Some(self.kv_dtype) {
                return Err(t.dtype_error(torch_name(self.kv_dtype)));
            }
            if t.kind != q.kind && !self.kv_dtype.is_fp8() {
                return Err(Error::Unsupported {
                    backend: "cpu",
                    what: format!(
                        "{} of dtype {} with q of dtype {} (the KV cache has q's dtype or an fp8 one)",
                        t.name,
                        t.kind.name(),
                        q.kind.name()
                    ),
                }
                .into());
            }
        }
        if ws.kind != Kind::U8 {
            return Err(ws.dtype_error("torch.uint8"));
        }
        ws.expect_contiguous()?;
        {
            let mut read = vec![&q, &kv.k];
            read.extend(&kv.v);
            let mut written = vec![&out, &ws];
            written.extend(&lse);
            check_disjoint(&written, &read)?;
        }
        let kref = kv.k.float_ref(0)?;
        let vref = match &kv.v {
            Some(v) => v.float_ref(0)?,
            None => kv.k.float_ref(kv.v_offset)?,
        };
        let cache = if self.flavor == Flavor::RaggedPrefill {
            KvCache::ragged(kref, vref, kv.strides, kv.num_pages)
        } else {
            KvCache::paged(kref, vref, kv.strides, kv.num_pages, &self.kv_indices)
        };
        // FlashInfer's default scale is 1; the library checks the values and that the cache
        // is FP8 (validate::check_fp8_scale).
        let cache = match (&k_scale, &v_scale) {
            (None, None) => cache,
            (k, v) => cache.with_scales(
                k.as_deref().unwrap_or(&[1.0]),
                v.as_deref().unwrap_or(&[1.0]),
            ),
        };
        let qref = q.float_ref(0)?;
        let mut o = out.float_mut()?;
        let mut lse_slice = match &mut lse {
            Some(l) => Some(l.f32_mut()?),
            None => None,
        };
        let ws_bytes = ws.bytes_mut();
        let cpu = backend()?;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            let args = RunArgs {
                q: qref,
                kv: cache,
                o: reborrow(&mut o),
                lse: lse_slice.as_deref_mut(),
                sinks: sinks.as_deref(),
                custom_mask: self
                    .mask
                    .as_ref()
                    .map(|(bits, indptr)| CustomMask { bits, indptr }),
            };
            match &self.cascade {
                Some(c) => cpu.run_cascade(c, args, ws_bytes)?,
                None => cpu.run(&self.plan, args, ws_bytes)?,
            }
        }
        let elapsed = start.elapsed().as_secs_f64() / reps.max(1) as f64;
        if reps == 0 {
            return Ok(0.0);
        }
        // FlashInfer's LSE is base 2; the library's natural.
        if let Some(l) = &mut lse {
            for x in l.f32_mut()?.iter_mut() {
                *x *= std::f32::consts::LOG2_E;
            }
        }
        Ok(elapsed)
    }
}

/// The optional per-run arguments: attention sinks and the FP8 scales.
#[derive(Default)]
struct Extras<'b, 'py> {
    sinks: Option<&'b Bound<'py, PyAny>>,
    k_scale: Option<&'b Bound<'py, PyAny>>,
    v_scale: Option<&'b Bound<'py, PyAny>>,
}

/// FlashInfer's `k_scale` / `v_scale`: a number (per tensor) or a float32 tensor of shape
/// `[]`, `[1]` or `[num_kv_heads]` (per KV head).
fn scale_values(name: &'static str, s: &Bound<'_, PyAny>, hkv: usize) -> Result<Vec<f32>, Failure> {
    if s.hasattr(intern!(s.py(), "dtype"))? {
        let t = Borrowed::new(s, name)?;
        if !(t.shape.is_empty() || t.shape == [1] || t.shape == [hkv]) {
            return Err(shape_error(
                name,
                format!("[], [1] (per tensor) or [{hkv}] (num_kv_heads, per head)"),
                &t.shape,
            ));
        }
        return t.f32_vec();
    }
    let x: f64 = s
        .extract()
        .map_err(|_| crate::errors::type_error(format!("{name} must be a float or a tensor")))?;
    Ok(vec![x as f32])
}

/// A shorter-lived view of a mutable tensor, for one run of several.
fn reborrow<'a>(t: &'a mut TensorMut<'_>) -> TensorMut<'a> {
    match t {
        TensorMut::F32(s) => TensorMut::F32(s),
        TensorMut::F16(s) => TensorMut::F16(s),
        TensorMut::BF16(s) => TensorMut::BF16(s),
        TensorMut::Fp8(f, s) => TensorMut::Fp8(*f, s),
    }
}

#[pymethods]
impl AttentionPlan {
    /// Runs the plan on a paged cache (one tensor or a `(k_cache, v_cache)` pair), writing
    /// `out` and, if given, `lse` (base 2); `sinks` (float32 `[num_qo_heads]`) are attention
    /// sinks.
    #[pyo3(signature = (workspace, q, paged_kv_cache, out, lse=None, sinks=None, k_scale=None, v_scale=None))]
    #[allow(clippy::too_many_arguments)]
    fn run_paged(
        &self,
        py: Python<'_>,
        workspace: Bound<'_, PyAny>,
        q: Bound<'_, PyAny>,
        paged_kv_cache: Bound<'_, PyAny>,
        out: Bound<'_, PyAny>,
        lse: Option<Bound<'_, PyAny>>,
        sinks: Option<Bound<'_, PyAny>>,
        k_scale: Option<Bound<'_, PyAny>>,
        v_scale: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        guard(py, || {
            if self.flavor == Flavor::RaggedPrefill {
                return Err(crate::errors::type_error(
                    "a ragged plan runs with k and v, not a paged cache".into(),
                ));
            }
            let kv = self.paged_cache(&paged_kv_cache)?;
            let extras = Extras {
                sinks: sinks.as_ref(),
                k_scale: k_scale.as_ref(),
                v_scale: v_scale.as_ref(),
            };
            self.run_inner(&workspace, &q, kv, &out, lse.as_ref(), extras, 1)
                .map(|_| ())
        })
    }

    /// Runs the plan on a paged cache `iterations` times with the arguments read once, and
    /// returns the mean seconds per run: the library's run (checks and kernels) without the
    /// cost of reading the arguments from Python. With `iterations == 0` it reads and checks
    /// the arguments and runs nothing. For measuring the binding's overhead
    /// (`python/bench/overhead.py`).
    #[pyo3(signature = (workspace, q, paged_kv_cache, out, iterations))]
    fn time_kernel(
        &self,
        py: Python<'_>,
        workspace: Bound<'_, PyAny>,
        q: Bound<'_, PyAny>,
        paged_kv_cache: Bound<'_, PyAny>,
        out: Bound<'_, PyAny>,
        iterations: usize,
    ) -> PyResult<f64> {
        guard(py, || {
            if self.flavor == Flavor::RaggedPrefill {
                return Err(crate::errors::type_error(
                    "a ragged plan runs with k and v, not a paged cache".into(),
                ));
            }
            let kv = self.paged_cache(&paged_kv_cache)?;
            self.run_inner(
                &workspace,
                &q,
                kv,
                &out,
                None,
                Extras::default(),
                iterations,
            )
        })
    }

    /// Runs the plan on ragged `k` and `v`, writing `out` and, if given, `lse` (base 2).
    #[pyo3(signature = (workspace, q, k, v, out, lse=None, k_scale=None, v_scale=None))]
    #[allow(clippy::too_many_arguments)]
    fn run_ragged(
        &self,
        py: Python<'_>,
        workspace: Bound<'_, PyAny>,
        q: Bound<'_, PyAny>,
        k: Bound<'_, PyAny>,
        v: Bound<'_, PyAny>,
        out: Bound<'_, PyAny>,
        lse: Option<Bound<'_, PyAny>>,
        k_scale: Option<Bound<'_, PyAny>>,
        v_scale: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        guard(py, || {
            if self.flavor != Flavor::RaggedPrefill {
                return Err(crate::errors::type_error(
                    "a paged plan runs with a paged cache, not k and v".into(),
                ));
            }
            let kv = self.ragged_kv(&k, &v)?;
            let extras = Extras {
                sinks: None,
                k_scale: k_scale.as_ref(),
                v_scale: v_scale.as_ref(),
            };
            self.run_inner(&workspace, &q, kv, &out, lse.as_ref(), extras, 1)
                .map(|_| ())
        })
    }

    /// Query rows of the planned batch (rows of `q`, `out` and `lse`).
    #[getter]
    fn num_q_rows(&self) -> usize {
        self.plan.num_q_rows()
    }

    /// Requests in the planned batch.
    #[getter]
    fn batch_size(&self) -> usize {
        self.plan.batch_size()
    }

    /// Bytes of float workspace the plan needs.
    #[getter]
    fn float_workspace_bytes(&self, py: Python<'_>) -> PyResult<usize> {
        guard(py, || match &self.cascade {
            Some(c) => Ok(c.float_requirement(self.q_dtype)?.total()),
            None => Ok(self.plan.requirement().float.total()),
        })
    }

    /// Levels of a cascade plan (1 for any other plan).
    #[getter]
    fn num_levels(&self) -> usize {
        self.cascade.as_ref().map_or(1, CascadePlan::num_levels)
    }

    /// The planned window (`-1`: none), as FlashInfer spells it.
    #[getter]
    fn window_left(&self) -> i64 {
        self.plan.options().window_left.map_or(-1, i64::from)
    }
}
