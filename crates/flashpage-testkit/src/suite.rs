//! The declarative case suite: the cases of `tests/data/*.toml`, embedded in the library so
//! `flashpage check` runs them from any directory, and the runner that checks a backend
//! against the f64 reference (the regex crate's testdata pattern).
//!
//! A file holds two kinds of tables. A `[[case]]` is a batch shape to run and compare:
//!
//! ```toml
//! [[case]]
//! name = "decode/gqa4/mixed-empty"
//! heads = [32, 8, 128]          # num_qo_heads, num_kv_heads, head_dim
//! page_size = 16                # default 16
//! kind = "decode"               # "decode" (default) or "prefill"
//! storage = "separate"          # "separate" (default), "combined" or "ragged" (prefill)
//! layout = "NHD"                # "NHD" (default) or "HND"
//! kv_lens = [0, 4000, 0, 17]    # or requests = [[qo_len, kv_len], ...],
//!                               # or batch = 512, kv_len = 33 (and qo_len, default 1)
//! dtypes = ["f32", "bf16"]      # default all three
//! options = { causal = true, window_left = 0, logits_soft_cap = 50.0, sm_scale = 0.1,
//!             pos_encoding = "rope", rope_theta = 1e4, rope_scale = 1.0 }
//! input_scale = 1.0             # scale of the random inputs
//! parallelism = [1, 64, 1024]   # plans to try (default [1, 1024])
//! min_kv_chunk = 16             # smallest split chunk (default: the planner's)
//! deterministic_chunk = 32      # fixed chunk: outputs must be identical for every parallelism
//! graph_capacity = 8            # graph mode (also graph_max_q_rows, graph_max_kv_len)
//! sinks = true                 # attention sinks: random per-head sink logits (run argument)
//! custom_mask = { density = 0.5, zero_row_stride = 3 }
//!                               # a random custom mask (run argument): each (row, key) visible
//!                               # with probability density; every 3rd query row masked whole
//! kv_dtype = "e4m3fn"           # an FP8 K/V cache ("e4m3fn" or "e5m2"; q/o keep `dtypes`)
//! kv_scale = "head"             # its scales: "tensor" (default) or "head" (per KV head)
//! cascade = [[3, 2], [1, 0], [2, 1]]
//!                               # shared prefixes, run as a cascade: [sharers, pages] groups
//!                               # of adjacent requests share their first pages
//!                               # (CaseData::share_prefixes); CascadePlan::shared_prefixes
//!                               # finds the levels; compared with the flat batch's reference
//! set = [{ input = "v", request = 0, pos = 2, value = inf }]
//!                               # after the random fill, every element of a q row ("q":
//!                               # query row `pos`) or a key's K or V rows ("k", "v": key
//!                               # `pos`, all KV heads) of a request is `value` (inf, nan ok)
//! ```
//!
//! An `[[error]]` is a batch given as raw arrays that must be rejected:
//!
//! ```toml
//! [[error]]
//! name = "founding-scenario"
//! heads = [32, 16, 128]
//! kind = "prefill"
//! page_size = 16
//! num_pages = 64
//! qo_indptr = [0, 1, 2, 3, 4, 5, 6, 7, 8]
//! kv_indptr = [0]
//! expect = "IndptrLengthMismatch"          # the Error variant
//! message = "both must have batch_size + 1" # a substring of the message
//! # mask_indptr = [0, 1], mask_bytes = 1    # optional: the run carries a custom mask
//! ```
//!
//! ```
//! let suite = flashpage_testkit::suite::Suite::embedded().unwrap();
//! assert!(suite.cases.iter().any(|c| c.name.contains("founding")) ||
//!         suite.errors.iter().any(|e| e.name.contains("founding")));
//! ```

use std::fmt;

use serde::Deserialize;

use crate::case::{CaseData, CaseSpec, Comparison, Fp8Spec, Input, KvStorage, MaskSpec, Rng};
use crate::mask::PackedMask;
use crate::reference::{self, ReferenceInputs, ReferenceOutput};
use crate::runner::HostRunner;
use flashpage::backend::cpu::SimdLevel;
use flashpage::backend::{KvCache, RunArgs};
use flashpage::error::{Error, ErrorKind, Result};
use flashpage::layout::{BatchDesc, CustomMask, DType, HeadConfig, KvLayout, KvStrides, PageTable};
use flashpage::options::{AttentionOptions, PosEncoding};
use flashpage::plan::{Plan, PlanConfig};
use flashpage::tensor::{Tensor, TensorRef};
use flashpage::validate::check_batch;

/// The suite files, embedded at build time: `(file name, contents)`.
pub const FILES: &[(&str, &str)] = &[
    ("decode.toml", include_str!("../data/decode.toml")),
    ("prefill.toml", include_str!("../data/prefill.toml")),
    ("variants.toml", include_str!("../data/variants.toml")),
    ("numerics.toml", include_str!("../data/numerics.toml")),
    ("features.toml", include_str!("../data/features.toml")),
    ("masks.toml", include_str!("../data/masks.toml")),
    ("fp8.toml", include_str!("../data/fp8.toml")),
    ("cascade.toml", include_str!("../data/cascade.toml")),
    ("errors.toml", include_str!("../data/errors.toml")),
];

/// A suite file that does not parse, or a case that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteError {
    /// The file.
    pub file: String,
    /// What is wrong (names the case when there is one).
    pub message: String,
}

impl fmt::Display for SuiteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for SuiteError {}

/// All cases of a suite.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    /// Cases to run and compare with the reference.
    pub cases: Vec<SuiteCase>,
    /// Batches that must be rejected.
    pub errors: Vec<ErrorCase>,
}

/// A case to run on every dtype, SIMD level and parallelism it lists.
#[derive(Debug, Clone)]
pub struct SuiteCase {
    /// Name (unique in the suite).
    pub name: String,
    /// File it comes from.
    pub file: String,
    /// The shape; its `dtype` is replaced by each of `dtypes`.
    pub spec: CaseSpec,
    /// Element types to run.
    pub dtypes: Vec<DType>,
    /// Parallelism (work slots) of each plan to try.
    pub parallelism: Vec<usize>,
    /// Smallest split chunk in tokens (planner default when `None`).
    pub min_kv_chunk: Option<usize>,
    /// Prefill q tile in packed rows (planner default when `None`).
    pub q_tile: Option<usize>,
    /// Deterministic mode: a fixed KV chunk in tokens.
    pub deterministic_chunk: Option<usize>,
    /// Graph mode: a fixed batch capacity.
    pub graph_capacity: Option<usize>,
    /// Graph mode: most query rows.
    pub graph_max_q_rows: Option<usize>,
    /// Graph mode: longest request.
    pub graph_max_kv_len: Option<usize>,
    /// Input rows set after the random fill: `(input, request, pos, value)` (see
    /// [`CaseData::set_row`]).
    pub set: Vec<(Input, usize, usize, f64)>,
    /// Shared prefixes `(sharers, pages)` of adjacent requests: the case runs as the cascade
    /// [`CaseData::cascade_plan`] finds ([`CaseData::share_prefixes`]).
    pub cascade: Option<Vec<(usize, usize)>>,
}

/// A batch given as raw arrays, and the error it must produce.
#[derive(Debug, Clone)]
pub struct ErrorCase {
    /// Name (unique in the suite).
    pub name: String,
    /// File it comes from.
    pub file: String,
    /// `(num_qo_heads, num_kv_heads, head_dim)`, unchecked.
    pub heads: [usize; 3],
    /// Decode (no `qo_indptr`) or prefill.
    pub decode: bool,
    /// Ragged K/V (`kv_indptr` counts tokens).
    pub ragged: bool,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages in the cache.
    pub num_pages: usize,
    /// `qo_indptr` (prefill).
    pub qo_indptr: Vec<i32>,
    /// `kv_indptr`.
    pub kv_indptr: Vec<i32>,
    /// `kv_indices`.
    pub kv_indices: Vec<i32>,
    /// `kv_last_page_len`.
    pub kv_last_page_len: Vec<i32>,
    /// Options, unchecked (or the error their conversion raised).
    pub options: Result<AttentionOptions>,
    /// Expected [`Error`] variant.
    pub expect: Option<ErrorKind>,
    /// Expected substring of the message.
    pub message: Option<String>,
    /// A custom mask's `mask_indptr` and the length of its bits buffer (random bytes), if
    /// the run carries one.
    pub custom_mask: Option<(Vec<i32>, usize)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    case: Vec<CaseToml>,
    #[serde(default)]
    error: Vec<ErrorToml>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptionsToml {
    #[serde(default)]
    causal: bool,
    window_left: Option<i64>,
    logits_soft_cap: Option<f32>,
    sm_scale: Option<f32>,
    pos_encoding: Option<String>,
    rope_theta: Option<f32>,
    rope_scale: Option<f32>,
}

fn default_page_size() -> usize {
    16
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseToml {
    name: String,
    heads: [usize; 3],
    #[serde(default = "default_page_size")]
    page_size: usize,
    kind: Option<String>,
    storage: Option<String>,
    layout: Option<String>,
    requests: Option<Vec<[usize; 2]>>,
    kv_lens: Option<Vec<usize>>,
    batch: Option<usize>,
    qo_len: Option<usize>,
    kv_len: Option<usize>,
    dtypes: Option<Vec<String>>,
    #[serde(default)]
    options: OptionsToml,
    input_scale: Option<f64>,
    parallelism: Option<Vec<usize>>,
    min_kv_chunk: Option<usize>,
    q_tile: Option<usize>,
    deterministic_chunk: Option<usize>,
    graph_capacity: Option<usize>,
    graph_max_q_rows: Option<usize>,
    graph_max_kv_len: Option<usize>,
    #[serde(default)]
    set: Vec<SetToml>,
    #[serde(default)]
    sinks: bool,
    kv_dtype: Option<String>,
    kv_scale: Option<String>,
    custom_mask: Option<MaskToml>,
    cascade: Option<Vec<[usize; 2]>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaskToml {
    density: f64,
    #[serde(default)]
    zero_row_stride: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetToml {
    input: String,
    request: usize,
    pos: usize,
    value: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorToml {
    name: String,
    heads: [usize; 3],
    kind: Option<String>,
    storage: Option<String>,
    #[serde(default = "default_page_size")]
    page_size: usize,
    #[serde(default)]
    num_pages: usize,
    qo_indptr: Option<Vec<i32>>,
    kv_indptr: Vec<i32>,
    #[serde(default)]
    kv_indices: Vec<i32>,
    #[serde(default)]
    kv_last_page_len: Vec<i32>,
    #[serde(default)]
    options: OptionsToml,
    expect: Option<String>,
    message: Option<String>,
    mask_indptr: Option<Vec<i32>>,
    mask_bytes: Option<usize>,
}

/// The options of a case as the library's own parsers read them (so an error case can expect
/// their errors, e.g. `window_left = -2`).
fn options_from(o: &OptionsToml) -> Result<AttentionOptions> {
    let pos_encoding = PosEncoding::parse(
        o.pos_encoding.as_deref().unwrap_or("none"),
        o.rope_theta,
        o.rope_scale,
    )?;
    let window_left = match o.window_left {
        None => None,
        Some(w) => AttentionOptions::window_from_signed(w)?,
    };
    Ok(AttentionOptions::default()
        .with_causal(o.causal)
        .with_sm_scale(o.sm_scale)
        .with_logits_soft_cap(o.logits_soft_cap)
        .with_window_left(window_left)
        .with_pos_encoding(pos_encoding)
        .with_return_lse(true))
}

fn parse_kind(kind: Option<&str>) -> std::result::Result<bool, String> {
    match kind.unwrap_or("decode") {
        "decode" => Ok(true),
        "prefill" => Ok(false),
        other => Err(format!(
            "kind {other:?} is unknown: expected decode or prefill"
        )),
    }
}

fn parse_storage(s: Option<&str>) -> std::result::Result<KvStorage, String> {
    match s.unwrap_or("separate") {
        "separate" => Ok(KvStorage::Separate),
        "combined" => Ok(KvStorage::Combined),
        "ragged" => Ok(KvStorage::Ragged),
        other => Err(format!(
            "storage {other:?} is unknown: expected separate, combined or ragged"
        )),
    }
}

impl CaseToml {
    /// The FP8 cache of `kv_dtype` / `kv_scale`.
    fn fp8_spec(&self) -> std::result::Result<Option<Fp8Spec>, String> {
        let per_head = match self.kv_scale.as_deref() {
            None | Some("tensor") => false,
            Some("head") => true,
            Some(other) => {
                return Err(format!(
                    "kv_scale {other:?} is unknown: expected tensor or head"
                ));
            }
        };
        let Some(name) = self.kv_dtype.as_deref() else {
            if self.kv_scale.is_some() {
                return Err("kv_scale needs kv_dtype (an fp8 cache)".into());
            }
            return Ok(None);
        };
        match DType::parse(name) {
            Some(dtype) if dtype.is_fp8() => Ok(Some(Fp8Spec { dtype, per_head })),
            _ => Err(format!(
                "kv_dtype {name:?} is not an fp8 dtype: expected e4m3fn or e5m2"
            )),
        }
    }

    fn requests(&self, decode: bool) -> std::result::Result<Vec<(usize, usize)>, String> {
        let given = [
            self.requests.is_some(),
            self.kv_lens.is_some(),
            self.batch.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if given != 1 {
            return Err("give exactly one of requests, kv_lens or batch (with kv_len)".into());
        }
        if let Some(r) = &self.requests {
            if self.qo_len.is_some() || self.kv_len.is_some() {
                return Err("qo_len/kv_len are for kv_lens or batch, not requests".into());
            }
            return Ok(r.iter().map(|&[q, k]| (q, k)).collect());
        }
        let qo = self.qo_len.unwrap_or(1);
        if decode && qo != 1 {
            return Err(format!("a decode case has qo_len 1, got {qo}"));
        }
        if let Some(kv) = &self.kv_lens {
            if self.kv_len.is_some() {
                return Err("kv_len is for batch, not kv_lens".into());
            }
            return Ok(kv.iter().map(|&k| (qo, k)).collect());
        }
        let batch = self.batch.unwrap_or(0);
        let kv = self.kv_len.ok_or("batch needs kv_len")?;
        Ok(vec![(qo, kv); batch])
    }

    fn build(&self, file: &str) -> std::result::Result<SuiteCase, String> {
        let decode = parse_kind(self.kind.as_deref())?;
        let storage = parse_storage(self.storage.as_deref())?;
        if decode && storage == KvStorage::Ragged {
            return Err("ragged storage is for prefill cases".into());
        }
        let layout = match self.layout.as_deref() {
            None => KvLayout::Nhd,
            Some(s) => KvLayout::parse(s)
                .ok_or_else(|| format!("layout {s:?} is unknown: expected NHD or HND"))?,
        };
        let heads = HeadConfig::new(self.heads[0], self.heads[1], self.heads[2])
            .map_err(|e| e.to_string())?;
        let dtypes = match &self.dtypes {
            None => DType::ALL.to_vec(),
            Some(v) => v
                .iter()
                .map(|s| DType::parse(s).ok_or_else(|| format!("dtype {s:?} is unknown")))
                .collect::<std::result::Result<Vec<_>, _>>()?,
        };
        let parallelism = self.parallelism.clone().unwrap_or_else(|| vec![1, 1024]);
        if parallelism.is_empty() || parallelism.contains(&0) {
            return Err("parallelism must list numbers > 0".into());
        }
        if let Some(groups) = &self.cascade {
            if groups.is_empty() {
                return Err("cascade must list [sharers, pages] groups".into());
            }
            if storage == KvStorage::Ragged
                || self.custom_mask.is_some()
                || self.graph_capacity.is_some()
            {
                return Err(
                    "a cascade case has a paged cache, no custom mask and no graph mode".into(),
                );
            }
        }
        Ok(SuiteCase {
            name: self.name.clone(),
            file: file.to_string(),
            spec: CaseSpec {
                name: self.name.clone(),
                heads,
                page_size: self.page_size,
                requests: self.requests(decode)?,
                decode,
                dtype: dtypes.first().copied().unwrap_or(DType::F32),
                layout,
                storage,
                options: options_from(&self.options).map_err(|e| e.to_string())?,
                input_scale: self.input_scale.unwrap_or(1.0),
                sinks: self.sinks,
                custom_mask: match &self.custom_mask {
                    None => None,
                    Some(m) if !(0.0..=1.0).contains(&m.density) => {
                        return Err(format!(
                            "custom_mask density {} is not in [0, 1]",
                            m.density
                        ));
                    }
                    Some(m) => Some(MaskSpec {
                        density: m.density,
                        zero_row_stride: m.zero_row_stride,
                    }),
                },
                fp8: self.fp8_spec()?,
            },
            dtypes,
            parallelism,
            min_kv_chunk: self.min_kv_chunk,
            q_tile: self.q_tile,
            deterministic_chunk: self.deterministic_chunk,
            graph_capacity: self.graph_capacity,
            graph_max_q_rows: self.graph_max_q_rows,
            graph_max_kv_len: self.graph_max_kv_len,
            set: self
                .set
                .iter()
                .map(|x| {
                    let input = Input::parse(&x.input)
                        .ok_or_else(|| format!("set: input {:?} is not q, k or v", x.input))?;
                    Ok((input, x.request, x.pos, x.value))
                })
                .collect::<std::result::Result<Vec<_>, String>>()?,
            cascade: self
                .cascade
                .as_ref()
                .map(|g| g.iter().map(|&[s, p]| (s, p)).collect()),
        })
    }
}

impl ErrorToml {
    fn build(&self, file: &str) -> std::result::Result<ErrorCase, String> {
        let decode = parse_kind(self.kind.as_deref())?;
        let ragged = parse_storage(self.storage.as_deref())? == KvStorage::Ragged;
        if decode == self.qo_indptr.is_some() {
            return Err(
                "a prefill error case needs qo_indptr, a decode one must not have it".into(),
            );
        }
        if ragged && decode {
            return Err("ragged storage is for prefill cases".into());
        }
        if self.expect.is_none() && self.message.is_none() {
            return Err("give expect (a variant), message (a substring) or both".into());
        }
        Ok(ErrorCase {
            name: self.name.clone(),
            file: file.to_string(),
            heads: self.heads,
            decode,
            ragged,
            page_size: self.page_size,
            num_pages: self.num_pages,
            qo_indptr: self.qo_indptr.clone().unwrap_or_default(),
            kv_indptr: self.kv_indptr.clone(),
            kv_indices: self.kv_indices.clone(),
            kv_last_page_len: self.kv_last_page_len.clone(),
            options: options_from(&self.options),
            expect: self
                .expect
                .as_deref()
                .map(str::parse::<ErrorKind>)
                .transpose()?,
            message: self.message.clone(),
            custom_mask: match (&self.mask_indptr, self.mask_bytes) {
                (None, None) => None,
                (Some(i), Some(n)) => Some((i.clone(), n)),
                _ => return Err("mask_indptr and mask_bytes go together".into()),
            },
        })
    }
}

impl Suite {
    /// Parses one suite file.
    pub fn parse(file: &str, text: &str) -> std::result::Result<Suite, SuiteError> {
        let err = |message: String| SuiteError {
            file: file.to_string(),
            message,
        };
        let parsed: FileToml = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut suite = Suite::default();
        for c in &parsed.case {
            suite.cases.push(
                c.build(file)
                    .map_err(|m| err(format!("case {:?}: {m}", c.name)))?,
            );
        }
        for e in &parsed.error {
            suite.errors.push(
                e.build(file)
                    .map_err(|m| err(format!("error case {:?}: {m}", e.name)))?,
            );
        }
        Ok(suite)
    }

    /// The suite embedded in the library ([`FILES`]); names are checked to be unique.
    pub fn embedded() -> std::result::Result<Suite, SuiteError> {
        let mut all = Suite::default();
        for (file, text) in FILES {
            let s = Suite::parse(file, text)?;
            all.cases.extend(s.cases);
            all.errors.extend(s.errors);
        }
        let mut names: Vec<&str> = all
            .cases
            .iter()
            .map(|c| c.name.as_str())
            .chain(all.errors.iter().map(|e| e.name.as_str()))
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(SuiteError {
                file: "suite".into(),
                message: format!("case name {:?} is used twice", w[0]),
            });
        }
        Ok(all)
    }

    /// Keeps only the cases whose name contains `filter`.
    pub fn filter(&mut self, filter: &str) {
        self.cases.retain(|c| c.name.contains(filter));
        self.errors.retain(|e| e.name.contains(filter));
    }
}

/// One run of a case at one dtype, SIMD level and parallelism.
#[derive(Debug, Clone)]
pub struct CaseRun {
    /// Case name.
    pub case: String,
    /// Element type.
    pub dtype: DType,
    /// The backend that ran it ([`HostRunner::label`], e.g. `cpu/avx2`).
    pub backend: String,
    /// SIMD level of a CPU backend.
    pub simd: Option<SimdLevel>,
    /// Parallelism of the plan.
    pub parallelism: usize,
    /// Seed of the random inputs (reproduce with `FLASHPAGE_SEED`).
    pub seed: u64,
    /// The comparison with the reference, or why there is none.
    pub result: std::result::Result<Comparison, String>,
}

impl CaseRun {
    /// True when the run compared within tolerance and wrote every element.
    pub fn passed(&self) -> bool {
        matches!(&self.result, Ok(c) if c.passed())
    }
}

impl fmt::Display for CaseRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} backend={} parallelism={} seed={}: ",
            self.case,
            self.dtype.name(),
            self.backend,
            self.parallelism,
            self.seed
        )?;
        match &self.result {
            Ok(c) => write!(
                f,
                "o error {:.3e}, lse error {:.3e}, tolerance {:.0e}{}",
                c.o_error,
                c.lse_error,
                c.tolerance,
                if c.fully_written {
                    ""
                } else {
                    ", output not fully written"
                }
            ),
            Err(e) => f.write_str(e),
        }
    }
}

/// The seed of a run: `FLASHPAGE_SEED` if set, else fresh from the clock (printed with
/// every failure so it can be replayed).
pub fn seed_from_env() -> u64 {
    if let Some(s) = std::env::var("FLASHPAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5eed, |d| d.as_nanos() as u64)
}

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl SuiteCase {
    /// The spec at `dtype`.
    pub fn spec(&self, dtype: DType) -> CaseSpec {
        CaseSpec {
            dtype,
            ..self.spec.clone()
        }
    }

    /// The plan configuration for one parallelism.
    pub fn plan_config(&self, parallelism: usize) -> PlanConfig {
        let mut c = PlanConfig::with_parallelism(parallelism);
        if let Some(m) = self.min_kv_chunk {
            c.min_kv_chunk = m;
        }
        if let Some(t) = self.q_tile {
            c.q_tile = t;
        }
        c.deterministic_chunk = self.deterministic_chunk;
        c.graph_capacity = self.graph_capacity;
        if self.graph_capacity.is_some() {
            let rows = if self.spec.decode {
                self.spec.requests.len()
            } else {
                self.spec.requests.iter().map(|r| r.0).sum()
            };
            let kv = self.spec.requests.iter().map(|r| r.1).max().unwrap_or(0);
            c.graph_max_q_rows = Some(self.graph_max_q_rows.unwrap_or(rows));
            c.graph_max_kv_len = Some(self.graph_max_kv_len.unwrap_or(kv));
        }
        c
    }

    /// The case at `dtype` with fresh random inputs from `seed`, then its `set` rows.
    pub fn materialise(&self, dtype: DType, seed: u64) -> std::result::Result<CaseData, String> {
        let mut data = self
            .spec(dtype)
            .materialise(seed)
            .map_err(|e| e.to_string())?;
        if let Some(groups) = &self.cascade {
            data.share_prefixes(groups).map_err(|e| e.to_string())?;
        }
        for &(input, request, pos, value) in &self.set {
            data.set_row(input, request, pos, value)?;
        }
        Ok(data)
    }

    /// One run of materialised `data` on `backend` at `parallelism` into fresh poisoned
    /// outputs: the flat batch, or the cascade [`CaseData::cascade_plan`] finds for a case
    /// with `cascade`.
    pub fn run_data(
        &self,
        data: &CaseData,
        backend: &dyn HostRunner,
        parallelism: usize,
    ) -> Result<(Tensor, Vec<f32>)> {
        let config = self.plan_config(parallelism);
        match &self.cascade {
            None => data.run_on(backend, &config),
            Some(_) => data
                .cascade_plan(&config)
                .and_then(|plan| data.run_cascade_on(backend, &plan)),
        }
    }

    /// Runs the case at `dtype` on every backend and parallelism, comparing each run with the
    /// f64 reference (computed once). Inputs are fresh random values from `seed` (mixed with
    /// the case name and dtype); outputs are poisoned before every run. In deterministic mode
    /// the outputs of one backend must also be bit-identical across parallelisms.
    pub fn run(&self, dtype: DType, backends: &[&dyn HostRunner], seed: u64) -> Vec<CaseRun> {
        let seed = seed ^ name_hash(&self.name) ^ name_hash(dtype.name()).rotate_left(17);
        let mk = |backend: Option<&dyn HostRunner>, parallelism, result| CaseRun {
            case: self.name.clone(),
            dtype,
            backend: backend.map_or_else(|| "none".to_string(), |b| b.label()),
            simd: backend.and_then(|b| b.simd()),
            parallelism,
            seed,
            result,
        };
        let data = match self.materialise(dtype, seed) {
            Ok(d) => d,
            Err(e) => return vec![mk(None, 0, Err(format!("materialise: {e}")))],
        };
        let reference = match data.reference() {
            Ok(r) => r,
            Err(e) => return vec![mk(None, 0, Err(format!("reference: {e}")))],
        };
        let mut runs = Vec::new();
        for &backend in backends {
            let mut first: Option<(usize, Tensor, Vec<f32>)> = None;
            for &p in &self.parallelism {
                let result = match self.run_data(&data, backend, p) {
                    Err(e) => Err(format!("run failed: {e}")),
                    Ok((o, lse)) => {
                        let c = data.compare(&o, &lse, &reference);
                        match &first {
                            Some((p0, o0, l0))
                                if self.deterministic_chunk.is_some()
                                    && (!same_bits(o0, &o) || !same_bits_f32(l0, &lse)) =>
                            {
                                Err(format!(
                                    "deterministic mode: output differs between parallelism {p0} and {p} ({c:?})"
                                ))
                            }
                            Some(_) => Ok(c),
                            None => {
                                first = Some((p, o, lse));
                                Ok(c)
                            }
                        }
                    }
                };
                runs.push(mk(Some(backend), p, result));
            }
        }
        runs
    }
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.to_le_bytes() == b.to_le_bytes()
}

fn same_bits_f32(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Largest cache an error case may allocate to reach the backend's checks (elements).
const MAX_ERROR_CASE_ELEMS: usize = 1 << 24;

impl ErrorCase {
    /// Runs the whole pipeline on `cpu`: head configuration, batch validation, planning,
    /// then a run on random tensors of the right shapes (which checks the page ids). Returns
    /// the first error, or `Ok(())` if the batch was accepted.
    pub fn outcome(&self, backend: &dyn HostRunner) -> Result<()> {
        let [hq, hkv, d] = self.heads;
        let heads = HeadConfig::new(hq, hkv, d)?;
        let pages = PageTable {
            page_size: self.page_size,
            num_pages: self.num_pages,
            indptr: &self.kv_indptr,
            last_page_len: &self.kv_last_page_len,
            num_indices: self.kv_indices.len(),
        };
        let desc = if self.ragged {
            BatchDesc::prefill_ragged(heads, &self.qo_indptr, &self.kv_indptr)
        } else if self.decode {
            BatchDesc::decode(heads, pages)
        } else {
            BatchDesc::prefill_paged(heads, &self.qo_indptr, pages)
        };
        let options = self.options.clone()?;
        let plan = Plan::new(&desc, &options, &PlanConfig::with_parallelism(4))?;
        let (ps, tokens) = if self.ragged {
            (
                1,
                self.kv_indptr.last().copied().unwrap_or(0).max(0) as usize,
            )
        } else {
            (self.page_size, self.num_pages)
        };
        let kv_elems = tokens
            .saturating_mul(ps)
            .saturating_mul(hkv)
            .saturating_mul(d);
        let q_elems = plan.num_q_rows().saturating_mul(hq).saturating_mul(d);
        if kv_elems.max(q_elems) > MAX_ERROR_CASE_ELEMS {
            return Err(Error::LimitExceeded {
                field: "error case tensor elements",
                limit: MAX_ERROR_CASE_ELEMS,
                actual: kv_elems.max(q_elems),
                rule: "error cases stay small",
            });
        }
        let mut rng = Rng::new(name_hash(&self.name));
        let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() as f32).collect() };
        let (q, k, v) = (random(q_elems), random(kv_elems), random(kv_elems));
        let mut o = vec![f32::NAN; q_elems];
        let mut lse = vec![f32::NAN; plan.num_q_rows() * hq];
        let mask: Option<(Vec<u8>, Vec<i32>)> = match &self.custom_mask {
            Some((_, n)) if *n > MAX_ERROR_CASE_ELEMS => {
                return Err(Error::LimitExceeded {
                    field: "error case mask bytes",
                    limit: MAX_ERROR_CASE_ELEMS,
                    actual: *n,
                    rule: "error cases stay small",
                });
            }
            Some((indptr, n)) => Some((
                (0..*n).map(|_| rng.next_u64() as u8).collect(),
                indptr.clone(),
            )),
            None => None,
        };
        let kv = if self.ragged {
            let s = KvStrides::ragged(hkv, d);
            KvCache::ragged(TensorRef::F32(&k), TensorRef::F32(&v), s, tokens)
        } else {
            let s = KvStrides::dense(KvLayout::Nhd, ps, hkv, d);
            KvCache::paged(
                TensorRef::F32(&k),
                TensorRef::F32(&v),
                s,
                tokens,
                &self.kv_indices,
            )
        };
        backend.run_host(
            &plan,
            RunArgs {
                q: TensorRef::F32(&q),
                kv,
                o: flashpage::tensor::TensorMut::F32(&mut o),
                lse: Some(&mut lse),
                sinks: None,
                custom_mask: mask.as_ref().map(|(bits, indptr)| CustomMask {
                    bits,
                    indptr: indptr.as_slice(),
                }),
            },
        )
    }

    /// Runs the case and checks the error: `Ok(message)` when it matches the expectation,
    /// `Err(why)` otherwise.
    pub fn check(&self, backend: &dyn HostRunner) -> std::result::Result<String, String> {
        match self.outcome(backend) {
            Ok(()) => Err(format!(
                "{}: the batch was accepted, expected {}",
                self.name,
                self.expectation()
            )),
            Err(e) => {
                let msg = e.to_string();
                let variant = e.kind();
                let variant_ok = self.expect.is_none_or(|v| v == variant);
                let msg_ok = self.message.as_ref().is_none_or(|m| msg.contains(m));
                if variant_ok && msg_ok {
                    Ok(format!("{variant}: {msg}"))
                } else {
                    Err(format!(
                        "{}: got {variant}: {msg:?}, expected {}",
                        self.name,
                        self.expectation()
                    ))
                }
            }
        }
    }

    fn expectation(&self) -> String {
        match (&self.expect, &self.message) {
            (Some(v), Some(m)) => format!("{v} with a message containing {m:?}"),
            (Some(v), None) => v.to_string(),
            (None, Some(m)) => format!("an error containing {m:?}"),
            (None, None) => "an error".into(),
        }
    }
}

/// The reference for a sample of query rows of a materialised case, computed on a compact
/// copy of only the pages those rows read, so verifying a large batch stays cheap.
///
/// Each sampled row `i` of request `r` becomes a one-row request over the keys it can see:
/// with a causal mask its keys are `0..=i + kv_len - qo_len`, and a one-row request over
/// exactly those keys places the query at the same position, so masks, windows, RoPE and
/// ALiBi give the same logits. Without a causal mask only decode rows (`qo_len = 1`) or
/// options without positions (no window, RoPE or ALiBi) can be sampled; other rows are an
/// error. Returns the reference `(o, lse)` of the sampled rows, in the order given.
pub fn sampled_reference(data: &CaseData, rows: &[usize]) -> Result<ReferenceOutput> {
    let opts = data.options();
    let vb = check_batch(&data.desc(), &opts)?;
    let h = data.spec.heads;
    let (hq, hkv, d) = (h.num_qo_heads(), h.num_kv_heads(), h.head_dim());
    let kv = data.kv_cache();
    let s = kv.strides;
    let paged = data.spec.storage != KvStorage::Ragged;
    let ps = if paged { data.spec.page_size } else { 1 };
    // Elements of one page (or ragged token) that any view touches.
    let page_extent = s.extent(1, ps, hkv, d).unwrap_or(0);
    let chunk = s.page.max(page_extent);
    let sub_strides = KvStrides { page: chunk, ..s };
    let positional = opts.window().is_some() || opts.pos_encoding != PosEncoding::None;
    let mut q = Vec::with_capacity(rows.len() * hq * d);
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let mut qo_indptr = vec![0i32];
    let mut kv_indptr = vec![0i32];
    let mut last = Vec::new();
    let mut indices = Vec::new();
    let mut sub_masks: Vec<Vec<bool>> = Vec::new();
    let q_all = data.q.view();
    for &row in rows {
        let r = (0..vb.batch_size())
            .find(|&r| {
                let req = vb.request(r);
                row >= req.qo_start && row < req.qo_start + req.qo_len
            })
            .ok_or(Error::QueryRows {
                tensor: "sample",
                expected: vb.num_q_rows(),
                actual: row + 1,
                rule: "sampled rows must exist",
            })?;
        let req = vb.request(r);
        let i = row - req.qo_start;
        let visible = if opts.causal {
            i + req.kv_len - req.qo_len + 1
        } else if req.qo_len == 1 || !positional {
            req.kv_len
        } else {
            return Err(Error::Unsupported {
                backend: "reference sample",
                what:
                    "sampling rows of a non-causal multi-row request with a window, rope or alibi"
                        .into(),
            });
        };
        for x in 0..hq * d {
            q.push(q_all.get_f64(row * hq * d + x));
        }
        if let Some(m) = &data.custom_mask {
            // The row's mask bits over the keys the one-row request keeps.
            let base = m.indptr[r] as usize * 8 + i * req.kv_len;
            sub_masks.push(
                (base..base + visible)
                    .map(|b| m.bits[b / 8] >> (b % 8) & 1 == 1)
                    .collect(),
            );
        }
        let n = visible.div_ceil(ps);
        for p in 0..n {
            let src = if paged {
                data.batch.kv_indices()[req.kv_start + p] as usize * s.page
            } else {
                (req.kv_start + p) * s.page
            };
            indices.push(indices.len() as i32);
            let base = k.len();
            k.resize(base + chunk, 0.0);
            v.resize(base + chunk, 0.0);
            for x in 0..page_extent {
                k[base + x] = kv.k.get_f64(src + x);
                v[base + x] = kv.v.get_f64(src + x);
            }
            if data.scales.is_some() {
                // An FP8 cache: dequantise exactly with each head's scales.
                for t in 0..ps {
                    for hh in 0..hkv {
                        let (ks, vs) = data.kv_scales_of(hh);
                        let o = base + t * s.token + hh * s.head;
                        k[o..o + d].iter_mut().for_each(|x| *x *= ks);
                        v[o..o + d].iter_mut().for_each(|x| *x *= vs);
                    }
                }
            }
        }
        qo_indptr.push(qo_indptr.len() as i32);
        let used = if paged { n } else { visible };
        let end = kv_indptr.last().copied().unwrap_or(0) + used as i32;
        kv_indptr.push(end);
        last.push(if n == 0 {
            0
        } else {
            (visible - (n - 1) * ps) as i32
        });
    }
    let num = indices.len();
    let desc = if paged {
        BatchDesc::prefill_paged(
            h,
            &qo_indptr,
            PageTable {
                page_size: ps,
                num_pages: num,
                indptr: &kv_indptr,
                last_page_len: &last,
                num_indices: num,
            },
        )
    } else {
        BatchDesc::prefill_ragged(h, &qo_indptr, &kv_indptr)
    };
    let sub = check_batch(&desc, &opts)?;
    let sub_mask = data
        .custom_mask
        .as_ref()
        .map(|_| PackedMask::from_requests(&sub_masks));
    let sinks: Option<Vec<f64>> = data
        .sinks
        .as_ref()
        .map(|s| s.iter().map(|&x| x as f64).collect());
    reference::attention(
        &sub,
        &opts,
        &ReferenceInputs {
            q: &q,
            k: &k,
            v: &v,
            strides: sub_strides,
            kv_indices: &indices,
            sinks: sinks.as_deref(),
            custom_mask: sub_mask.as_ref().map(PackedMask::view),
        },
    )
}

/// Compares the sampled rows of a run's output with [`sampled_reference`]; the whole output
/// must also be written (no poison left anywhere).
pub fn compare_rows(
    data: &CaseData,
    rows: &[usize],
    o: &Tensor,
    lse: &[f32],
    r: &ReferenceOutput,
) -> Comparison {
    let hq = data.spec.heads.num_qo_heads();
    let d = data.spec.heads.head_dim();
    let ov = o.view();
    let mut os = Vec::with_capacity(rows.len() * hq * d);
    let mut ls = Vec::with_capacity(rows.len() * hq);
    for &row in rows {
        os.extend((0..hq * d).map(|x| ov.get_f64(row * hq * d + x)));
        ls.extend(lse[row * hq..(row + 1) * hq].iter().map(|&x| x as f64));
    }
    let fully_written =
        (0..ov.len()).all(|i| !ov.get_f64(i).is_nan()) && lse.iter().all(|x| !x.is_nan());
    Comparison {
        o_error: reference::rel_error(&os, &r.o),
        lse_error: reference::rel_error(&ls, &r.lse),
        tolerance: reference::tolerance(data.spec.dtype),
        fully_written,
    }
}
