//! `flashpage run`: replay one batch stored in a safetensors file and write `o` and `lse`.
//!
//! Input tensors: `q` `[rows, Hq, D]`; `k_cache`, `v_cache` `[num_pages, page_size, Hkv, D]`
//! (NHD) or `[num_pages, Hkv, page_size, D]` (HND); `kv_indptr` `[B+1]`, `kv_indices`,
//! `kv_last_page_len` `[B]` (int32); `qo_indptr` `[B+1]` (int32) for prefill, absent for
//! decode; optionally `sinks` `[Hq]` f32 (attention sinks, natural-log logits, see
//! docs/semantics.md) and a custom mask: `custom_mask` (uint8, 1-D: FlashInfer's packed
//! bits) with `mask_indptr` `[B+1]` (int32, bytes), both or neither (docs/semantics.md,
//! "Custom masks"). An FP8 cache: `k_cache` and `v_cache` of dtype `F8_E4M3` (e4m3fn) or
//! `F8_E5M2` while q stays F32/F16/BF16, with optional `k_scale` and `v_scale` (f32, 1 value
//! per tensor or `num_kv_heads` per head, shape `[]`, `[1]` or `[Hkv]`; absent: 1;
//! docs/semantics.md, "FP8 KV cache"). Options are string metadata: `causal`, `sm_scale`, `logits_soft_cap`,
//! `window_left`, `kv_layout`, `pos_encoding`, `rope_theta`, `rope_scale`. Output: `o`
//! `[rows, Hq, D]` in q's dtype and `lse` `[rows, Hq]` f32 (natural log).
//!
//! Everything is checked before anything runs: shapes (naming the tensor and both shapes),
//! dtypes, metadata values, then the batch itself by the library's validation.

use std::collections::HashMap;
use std::path::PathBuf;

use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::{KvCache, RunArgs as BackendArgs};
use flashpage::layout::{CustomMask, MAX_PAGE_SIZE, PAGE_SIZE_RULE};
use flashpage::validate::{check_batch, check_page_ids};
use flashpage::workspace::HostWorkspace;
use flashpage::{
    AttentionOptions, BatchDesc, CascadePlan, DType, HeadConfig, KvLayout, KvStrides, PageTable,
    Plan, PlanConfig, PosEncoding, Tensor,
};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::{BackendArg, CliError, files};

/// Arguments of `flashpage run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The batch: a safetensors file with q, k_cache, v_cache, kv_indptr, kv_indices,
    /// kv_last_page_len (and qo_indptr for prefill), options as string metadata.
    #[arg(long, value_name = "CASE.safetensors")]
    input: PathBuf,
    /// Where to write o and lse (safetensors).
    #[arg(long, value_name = "OUT.safetensors")]
    output: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// CPU threads (default: one per available core); also the plan's parallelism.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Run the batch as a shared-prefix cascade (`CascadePlan::shared_prefixes`,
    /// docs/cascade.md): full pages shared by adjacent requests are read once for all of
    /// them, then merged with each request's own pages. Same output as without.
    #[arg(long)]
    cascade: bool,
}

/// Tensor names a case file may contain.
const KNOWN_TENSORS: &[&str] = &[
    "q",
    "k_cache",
    "v_cache",
    "kv_indptr",
    "kv_indices",
    "kv_last_page_len",
    "qo_indptr",
    "sinks",
    "custom_mask",
    "mask_indptr",
    "k_scale",
    "v_scale",
];

/// Metadata keys a case file may contain (`format` is written by common safetensors
/// writers and ignored).
const KNOWN_METADATA: &[&str] = &[
    "causal",
    "sm_scale",
    "logits_soft_cap",
    "window_left",
    "kv_layout",
    "pos_encoding",
    "rope_theta",
    "rope_scale",
    "format",
];

fn shape(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn dtype_of(name: &str, t: &TensorView<'_>) -> Result<DType, CliError> {
    match t.dtype() {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        other => Err(CliError::invalid(format!(
            "{name} has dtype {other:?}, expected F32, F16 or BF16"
        ))),
    }
}

/// The dtype of a cache tensor: q's float dtypes, or an FP8 format (`F8_E4M3` is e4m3fn,
/// the OCP format torch and FlashInfer call `float8_e4m3fn`).
fn kv_dtype_of(name: &str, t: &TensorView<'_>) -> Result<DType, CliError> {
    match t.dtype() {
        Dtype::F8_E4M3 => Ok(DType::E4M3Fn),
        Dtype::F8_E5M2 => Ok(DType::E5M2),
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => dtype_of(name, t),
        other => Err(CliError::invalid(format!(
            "{name} has dtype {other:?}, expected F32, F16, BF16 (the dtype of q), F8_E4M3 or F8_E5M2"
        ))),
    }
}

/// An FP8 scale (`k_scale` or `v_scale`): f32 of shape `[]`, `[1]` or `[num_kv_heads]`.
/// Values and the cache's dtype are the library's to check (`validate::check_fp8_scale`).
fn scale_tensor(name: &str, t: &TensorView<'_>, hkv: usize) -> Result<Vec<f32>, CliError> {
    if t.dtype() != Dtype::F32 {
        return Err(CliError::invalid(format!(
            "{name} has dtype {:?}, expected F32",
            t.dtype()
        )));
    }
    let s = t.shape();
    if !(s.is_empty() || s == [1] || s == [hkv]) {
        return Err(CliError::invalid(format!(
            "{name} has shape {}, expected [] or [1] (per tensor) or [{hkv}] (num_kv_heads, per head)",
            shape(s)
        )));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn float_tensor(name: &str, t: &TensorView<'_>, dtype: DType) -> Result<Tensor, CliError> {
    Tensor::from_le_bytes(dtype, t.data()).ok_or_else(|| {
        CliError::invalid(format!(
            "{name} has {} bytes of data, not a whole number of {} elements",
            t.data().len(),
            dtype.name()
        ))
    })
}

fn i32_tensor(name: &str, t: &TensorView<'_>) -> Result<Vec<i32>, CliError> {
    if t.dtype() != Dtype::I32 {
        return Err(CliError::invalid(format!(
            "{name} has dtype {:?}, expected I32",
            t.dtype()
        )));
    }
    if t.shape().len() != 1 {
        return Err(CliError::invalid(format!(
            "{name} has shape {}, expected a 1-d int32 array",
            shape(t.shape())
        )));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Options parsed from the string metadata.
struct Meta {
    options: AttentionOptions,
    layout: KvLayout,
}

/// Parses as f64 and refuses a value that does not survive conversion to f32 (a non-zero
/// value that underflows to 0, a finite one that overflows), naming the key.
fn parse_f32(key: &str, v: &str) -> Result<f32, CliError> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| CliError::invalid(format!("metadata {key} = {v:?} is not a number")))?;
    crate::plan_cmd::to_f32(&format!("metadata {key}"), &format!("{v:?}"), x)
}

/// `none` (any case) or an empty string means "not set" for optional numbers.
fn parse_opt_f32(key: &str, v: Option<&String>) -> Result<Option<f32>, CliError> {
    match v {
        None => Ok(None),
        Some(s) if s.trim().is_empty() || s.trim().eq_ignore_ascii_case("none") => Ok(None),
        Some(s) => parse_f32(key, s).map(Some),
    }
}

fn parse_meta(meta: &HashMap<String, String>) -> Result<Meta, CliError> {
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    if let Some(k) = keys.iter().find(|k| !KNOWN_METADATA.contains(&k.as_str())) {
        return Err(CliError::invalid(format!(
            "unknown metadata key {k:?}: expected one of {}",
            KNOWN_METADATA[..KNOWN_METADATA.len() - 1].join(", ")
        )));
    }
    let mut options = AttentionOptions::default().with_return_lse(true);
    if let Some(v) = meta.get("causal") {
        options.causal = match v.trim().to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(CliError::invalid(format!(
                    "metadata causal = {v:?} is invalid: expected \"true\" or \"false\""
                )));
            }
        };
    }
    options.sm_scale = parse_opt_f32("sm_scale", meta.get("sm_scale"))?;
    options.logits_soft_cap = parse_opt_f32("logits_soft_cap", meta.get("logits_soft_cap"))?;
    if let Some(v) = meta.get("window_left") {
        let w: i32 = v.trim().parse().map_err(|_| {
            CliError::invalid(format!(
                "metadata window_left = {v:?} is not an int32 integer"
            ))
        })?;
        options.window_left = AttentionOptions::window_from_signed(w.into())
            .map_err(|e| CliError::invalid(format!("metadata {e}")))?;
    }
    let layout = match meta.get("kv_layout") {
        None => KvLayout::Nhd,
        Some(v) => KvLayout::parse(v.trim()).ok_or_else(|| {
            CliError::invalid(format!(
                "metadata kv_layout = {v:?} is invalid: expected \"NHD\" or \"HND\""
            ))
        })?,
    };
    let theta = parse_opt_f32("rope_theta", meta.get("rope_theta"))?;
    let scale = parse_opt_f32("rope_scale", meta.get("rope_scale"))?;
    let pos = meta.get("pos_encoding").map_or("none", |v| v.as_str());
    // An empty value means none, as an absent key does.
    let pos = if pos.trim().is_empty() { "none" } else { pos };
    options.pos_encoding = PosEncoding::parse(pos, theta, scale)
        .map_err(|e| CliError::invalid(format!("metadata {e}")))?;
    options
        .validate()
        .map_err(|e| CliError::invalid(format!("metadata {e}")))?;
    Ok(Meta { options, layout })
}

/// The tensors and options of a case file, shape-checked.
struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: usize,
    heads: HeadConfig,
    page_size: usize,
    num_pages: usize,
    layout: KvLayout,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    kv_last_page_len: Vec<i32>,
    qo_indptr: Option<Vec<i32>>,
    sinks: Option<Vec<f32>>,
    /// FP8 dequantisation scales of K and V, as given (the library checks them).
    k_scale: Option<Vec<f32>>,
    v_scale: Option<Vec<f32>>,
    /// The custom mask's bits and `mask_indptr`.
    mask: Option<(Vec<u8>, Vec<i32>)>,
    options: AttentionOptions,
}

fn load_case(name: &str, bytes: &[u8]) -> Result<Case, CliError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CliError::invalid(format!("{name} is not a valid safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| CliError::invalid(format!("{name} is not a valid safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort();
    if let Some(n) = names.iter().find(|n| !KNOWN_TENSORS.contains(n)) {
        return Err(CliError::invalid(format!(
            "unknown tensor {n:?} in {name}: expected q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len and, for prefill, qo_indptr (optional: sinks, custom_mask with mask_indptr, k_scale, v_scale)"
        )));
    }
    let get = |t: &str| {
        st.tensor(t).map_err(|_| {
            CliError::invalid(format!("{name} has no tensor {t:?} (a required tensor)"))
        })
    };
    let meta = parse_meta(header.metadata().as_ref().unwrap_or(&HashMap::new()))?;

    let q_view = get("q")?;
    let k_view = get("k_cache")?;
    let v_view = get("v_cache")?;
    let dtype = dtype_of("q", &q_view)?;
    let kv_dtype = kv_dtype_of("k_cache", &k_view)?;
    if !kv_dtype.is_fp8() && kv_dtype != dtype {
        return Err(CliError::invalid(format!(
            "k_cache has dtype {}, expected {} (the dtype of q) or an fp8 format (F8_E4M3, F8_E5M2)",
            kv_dtype.name(),
            dtype.name()
        )));
    }
    let vt = kv_dtype_of("v_cache", &v_view)?;
    if vt != kv_dtype {
        return Err(CliError::invalid(format!(
            "v_cache has dtype {}, expected {} (the dtype of k_cache)",
            vt.name(),
            kv_dtype.name()
        )));
    }
    let qs = q_view.shape();
    if qs.len() != 3 {
        return Err(CliError::invalid(format!(
            "q has shape {}, expected [rows, num_qo_heads, head_dim]",
            shape(qs)
        )));
    }
    let (rows, hq, d) = (qs[0], qs[1], qs[2]);
    let ks = k_view.shape();
    let names_of = match meta.layout {
        KvLayout::Nhd => "[num_pages, page_size, num_kv_heads, head_dim] (kv_layout NHD)",
        KvLayout::Hnd => "[num_pages, num_kv_heads, page_size, head_dim] (kv_layout HND)",
    };
    if ks.len() != 4 {
        return Err(CliError::invalid(format!(
            "k_cache has shape {}, expected {names_of}",
            shape(ks)
        )));
    }
    let (num_pages, page_size, hkv) = match meta.layout {
        KvLayout::Nhd => (ks[0], ks[1], ks[2]),
        KvLayout::Hnd => (ks[0], ks[2], ks[1]),
    };
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(CliError::invalid(format!(
            "k_cache has shape {}: page_size {page_size} is not supported, expected {PAGE_SIZE_RULE} ({names_of})",
            shape(ks)
        )));
    }
    if ks[3] != d {
        return Err(CliError::invalid(format!(
            "k_cache has shape {}, expected {names_of} with head_dim {d} as in q {}",
            shape(ks),
            shape(qs)
        )));
    }
    if v_view.shape() != ks {
        return Err(CliError::invalid(format!(
            "v_cache has shape {}, expected {} (the shape of k_cache)",
            shape(v_view.shape()),
            shape(ks)
        )));
    }
    let heads = HeadConfig::new(hq, hkv, d).map_err(|e| {
        CliError::invalid(format!(
            "{e} (num_qo_heads and head_dim from q {}, num_kv_heads from k_cache {})",
            shape(qs),
            shape(ks)
        ))
    })?;
    let kv_indptr = i32_tensor("kv_indptr", &get("kv_indptr")?)?;
    let kv_indices = i32_tensor("kv_indices", &get("kv_indices")?)?;
    let kv_last_page_len = i32_tensor("kv_last_page_len", &get("kv_last_page_len")?)?;
    let qo_indptr = match st.tensor("qo_indptr") {
        Ok(t) => Some(i32_tensor("qo_indptr", &t)?),
        Err(_) => None,
    };
    let sinks = match st.tensor("sinks") {
        Ok(t) => Some(sinks_tensor(&t, hq)?),
        Err(_) => None,
    };
    let scale = |n: &str| match st.tensor(n) {
        Ok(t) => scale_tensor(n, &t, hkv).map(Some),
        Err(_) => Ok(None),
    };
    let (k_scale, v_scale) = (scale("k_scale")?, scale("v_scale")?);
    let mask = match (st.tensor("custom_mask"), st.tensor("mask_indptr")) {
        (Err(_), Err(_)) => None,
        (Ok(bits), Ok(indptr)) => {
            if bits.dtype() != Dtype::U8 || bits.shape().len() != 1 {
                return Err(CliError::invalid(format!(
                    "custom_mask has dtype {:?} and shape {}, expected U8 [bytes] (packed bits)",
                    bits.dtype(),
                    shape(bits.shape())
                )));
            }
            Some((bits.data().to_vec(), i32_tensor("mask_indptr", &indptr)?))
        }
        (Ok(_), Err(_)) => {
            return Err(CliError::invalid(
                "custom_mask needs mask_indptr [batch_size + 1] (int32, bytes)".to_string(),
            ));
        }
        (Err(_), Ok(_)) => {
            return Err(CliError::invalid(
                "mask_indptr needs custom_mask (uint8 packed bits)".to_string(),
            ));
        }
    };
    Ok(Case {
        mask,
        q: float_tensor("q", &q_view, dtype)?,
        k: float_tensor("k_cache", &k_view, kv_dtype)?,
        v: float_tensor("v_cache", &v_view, kv_dtype)?,
        k_scale,
        v_scale,
        rows,
        heads,
        page_size,
        num_pages,
        layout: meta.layout,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        qo_indptr,
        sinks,
        options: meta.options,
    })
}

/// The attention sinks: f32 `[num_qo_heads]` (any value; NaN propagates to the rows of its
/// head as docs/numerics.md says).
fn sinks_tensor(t: &TensorView<'_>, hq: usize) -> Result<Vec<f32>, CliError> {
    if t.dtype() != Dtype::F32 {
        return Err(CliError::invalid(format!(
            "sinks has dtype {:?}, expected F32",
            t.dtype()
        )));
    }
    if t.shape() != [hq] {
        return Err(CliError::invalid(format!(
            "sinks has shape {}, expected [{hq}] (num_qo_heads, from q)",
            shape(t.shape())
        )));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn make_backend(args: &RunArgs) -> Result<CpuBackend, CliError> {
    if args.backend == BackendArg::Cuda {
        return Err(CliError::failure(if cfg!(feature = "cuda") {
            "the cuda backend is not available for run in this build: it has no host-tensor entry point yet; use --backend cpu"
        } else {
            "the cuda backend is not available for run in this build (built without the cuda feature); use --backend cpu"
        }));
    }
    crate::check_threads(args.threads)?;
    // None: one thread per available core.
    Ok(CpuBackend::new(args.threads.unwrap_or(0))?)
}

pub fn main(args: RunArgs) -> Result<(), CliError> {
    // Every argument is checked before anything runs: threads, then the output path (not
    // the input, in a writable directory; its temporary file is created now), then the
    // input, read no further than the sizes it declares.
    crate::check_threads(args.threads)?;
    let output = files::prepare_output(&args.output, &[&args.input])?;
    let name = args.input.display().to_string();
    let bytes = files::read_safetensors_bounded(&args.input, &name)?;
    let case = load_case(&name, &bytes)?;
    drop(bytes);
    let backend = make_backend(&args)?;

    let pages = PageTable {
        page_size: case.page_size,
        num_pages: case.num_pages,
        indptr: &case.kv_indptr,
        last_page_len: &case.kv_last_page_len,
        num_indices: case.kv_indices.len(),
    };
    let desc = match &case.qo_indptr {
        Some(qo) => BatchDesc::prefill_paged(case.heads, qo, pages),
        None => BatchDesc::decode(case.heads, pages),
    };
    // Validate the batch and its rows against q before planning, so nothing is sized by
    // an index array that disagrees with the data.
    let vb = check_batch(&desc, &case.options)?;
    if vb.num_q_rows() != case.rows {
        let rule = if desc.is_decode() {
            format!(
                "decode: one row per request, kv_indptr has {} {}",
                case.kv_indptr.len(),
                if case.kv_indptr.len() == 1 {
                    "entry"
                } else {
                    "entries"
                }
            )
        } else {
            format!("qo_indptr[{}] = {}", vb.batch_size(), vb.num_q_rows())
        };
        return Err(CliError::invalid(format!(
            "q has shape {} but the batch has {} query rows ({rule})",
            shape(&[case.rows, case.heads.num_qo_heads(), case.heads.head_dim()]),
            vb.num_q_rows()
        )));
    }
    check_page_ids(&case.kv_indptr, &case.kv_indices, case.num_pages)?;
    let config = PlanConfig::with_parallelism(backend.threads());

    let hq = case.heads.num_qo_heads();
    let d = case.heads.head_dim();
    let dtype = case.q.dtype();
    let mut o = flashpage_testkit::poisoned(dtype, case.rows * hq * d);
    let mut lse = vec![f32::NAN; case.rows * hq];
    let strides = KvStrides::dense(case.layout, case.page_size, case.heads.num_kv_heads(), d);
    let kv = |ids| {
        let c = KvCache::paged(case.k.view(), case.v.view(), strides, case.num_pages, ids);
        match (&case.k_scale, &case.v_scale) {
            (None, None) => c,
            // A scale not given is 1 (FlashInfer's default).
            (k, v) => c.with_scales(
                k.as_deref().unwrap_or(&[1.0]),
                v.as_deref().unwrap_or(&[1.0]),
            ),
        }
    };
    let custom_mask = case
        .mask
        .as_ref()
        .map(|(bits, indptr)| CustomMask { bits, indptr });
    if args.cascade {
        // The levels carry their own page ids: the run takes none (docs/cascade.md).
        let plan = CascadePlan::shared_prefixes(
            case.heads,
            case.qo_indptr.as_deref(),
            pages,
            &case.kv_indices,
            &case.options,
            &config,
        )?;
        let mut ws = HostWorkspace::new(plan.float_requirement(dtype)?.total())?;
        let run = BackendArgs {
            q: case.q.view(),
            kv: kv(&[]),
            o: o.view_mut(),
            lse: Some(&mut lse),
            sinks: case.sinks.as_deref(),
            custom_mask,
        };
        backend.run_cascade(&plan, run, ws.as_bytes_mut())?;
    } else {
        let plan = Plan::from_valid(&vb, &config)?;
        let mut ws = HostWorkspace::new(plan.requirement().float.total())?;
        let run = BackendArgs {
            q: case.q.view(),
            kv: kv(&case.kv_indices),
            o: o.view_mut(),
            lse: Some(&mut lse),
            sinks: case.sinks.as_deref(),
            custom_mask,
        };
        backend.run(&plan, run, ws.as_bytes_mut())?;
    }

    write_output(output, &o, &lse, case.rows, hq, d)
}

/// Serialises `o` and `lse` and commits them to the prepared output (through its temporary
/// file: a failure leaves no partial output).
fn write_output(
    output: files::PreparedOutput,
    o: &Tensor,
    lse: &[f32],
    rows: usize,
    hq: usize,
    d: usize,
) -> Result<(), CliError> {
    let fail = CliError::failure;
    let o_dtype = match o.dtype() {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        // o has q's dtype, which the checks keep float; the FP8 codes as safetensors names
        // them all the same.
        DType::E4M3Fn => Dtype::F8_E4M3,
        DType::E5M2 => Dtype::F8_E5M2,
    };
    let o_bytes = o.to_le_bytes();
    let lse_bytes: Vec<u8> = lse.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = [
        (
            "o",
            TensorView::new(o_dtype, vec![rows, hq, d], &o_bytes)
                .map_err(|e| fail(format!("cannot describe output o: {e}")))?,
        ),
        (
            "lse",
            TensorView::new(Dtype::F32, vec![rows, hq], &lse_bytes)
                .map_err(|e| fail(format!("cannot describe output lse: {e}")))?,
        ),
    ];
    let data = safetensors::serialize(views, None)
        .map_err(|e| fail(format!("cannot serialize the output: {e}")))?;
    output.commit(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_values_are_parsed_and_checked() {
        let m = parse_meta(&meta(&[
            ("causal", "True"),
            ("sm_scale", "0.125"),
            ("window_left", "7"),
            ("kv_layout", "hnd"),
            ("pos_encoding", "rope"),
            ("rope_theta", "500000"),
        ]))
        .map_err(|e| e.message)
        .unwrap();
        assert!(m.options.causal);
        assert_eq!(m.options.sm_scale, Some(0.125));
        assert_eq!(m.options.window_left, Some(7));
        assert_eq!(m.layout, KvLayout::Hnd);
        assert_eq!(
            m.options.pos_encoding,
            PosEncoding::Rope {
                theta: 5e5,
                scale: 1.0
            }
        );
        for (pairs, field) in [
            (&[("causal", "yes")][..], "causal"),
            (&[("sm_scale", "abc")][..], "sm_scale"),
            (&[("sm_scale", "-1")][..], "sm_scale"),
            (&[("window_left", "1.5")][..], "window_left"),
            (&[("window_left", "-2")][..], "window_left"),
            (&[("kv_layout", "NDH")][..], "kv_layout"),
            (&[("pos_encoding", "yarn")][..], "pos_encoding"),
            (&[("rope_theta", "1e4")][..], "rope_theta"),
            (&[("causl", "true")][..], "causl"),
        ] {
            let e = parse_meta(&meta(pairs)).err().expect("must fail");
            assert_eq!(e.code, 2);
            assert!(e.message.contains(field), "{field}: {}", e.message);
        }
    }
}
