//! `flashpage plan`: validate and plan a batch described in JSON, and explain the plan.
//!
//! The file is read as an untyped JSON value and every field is converted by hand, so a
//! malformed file (wrong types, negative or fractional numbers, numbers beyond int32 in the
//! index arrays, unknown or missing fields) is an `error:` line naming the field and the
//! value, never a panic. No allocation is driven by a number in the file: arrays are as
//! long as the file, and the plan's int image is bounded before it is built.

use std::path::{Path, PathBuf};

use flashpage::validate::{ValidBatch, check_batch, check_page_ids};
use flashpage::{
    AttentionOptions, BatchDesc, DType, Error, HeadConfig, PageTable, Plan, PlanConfig, PosEncoding,
};
use flashpage::{CascadePlan, WorkspaceLimits, workspace_size};
use serde_json::{Map, Value, json};

use crate::CliError;
use crate::files::{MAX_BATCH_JSON_BYTES, read_capped, read_file_capped};
use crate::workspace_cmd::{buffers_json, emit, human_bytes, print_workspace};
use flashpage::plan::{MAX_INT_IMAGE_BYTES, MAX_PARALLELISM};

/// Arguments of `flashpage plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The batch as a JSON object (`-` reads standard input). Fields: kind ("decode" |
    /// "prefill"), num_qo_heads, num_kv_heads, head_dim, page_size, num_pages, qo_indptr
    /// (prefill), kv_indptr, kv_indices, kv_last_page_len; optional causal, window_left,
    /// logits_soft_cap, sm_scale, pos_encoding, rope_theta, rope_scale, graph_capacity,
    /// graph_max_q_rows, graph_max_kv_len, deterministic_chunk, parallelism, q_tile,
    /// min_kv_chunk, workspace_bytes, int_workspace_bytes. At most 64 MiB are read.
    #[arg(long, value_name = "FILE.json")]
    batch: PathBuf,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Also plan the batch as a shared-prefix cascade (`CascadePlan::shared_prefixes`,
    /// docs/cascade.md): the levels found, the pages each references and the workspace.
    #[arg(long)]
    cascade: bool,
}

/// Every field a batch file may contain.
const KNOWN_FIELDS: &[&str] = &[
    "kind",
    "num_qo_heads",
    "num_kv_heads",
    "head_dim",
    "page_size",
    "num_pages",
    "qo_indptr",
    "kv_indptr",
    "kv_indices",
    "kv_last_page_len",
    "causal",
    "window_left",
    "logits_soft_cap",
    "sm_scale",
    "pos_encoding",
    "rope_theta",
    "rope_scale",
    "graph_capacity",
    "graph_max_q_rows",
    "graph_max_kv_len",
    "deterministic_chunk",
    "parallelism",
    "q_tile",
    "min_kv_chunk",
    "workspace_bytes",
    "int_workspace_bytes",
];

/// Which planner path a batch takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Decode,
    Prefill,
}

/// A batch file, converted and type-checked (not yet validated as a batch).
#[derive(Debug, Clone)]
pub struct BatchFile {
    kind: Kind,
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    page_size: usize,
    num_pages: usize,
    qo_indptr: Option<Vec<i32>>,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    kv_last_page_len: Vec<i32>,
    options: AttentionOptions,
    config: PlanConfig,
    parallelism_default: bool,
    workspace_bytes: Option<usize>,
    int_workspace_bytes: Option<usize>,
}

pub fn main(args: PlanArgs) -> Result<(), CliError> {
    let (name, bytes) = read_input(&args.batch)?;
    let file = parse_batch_bytes(&name, &bytes)?;
    let mut report = plan_batch(&file)?;
    if args.cascade {
        cascade_report(&file, &mut report)?;
    }
    if args.json {
        emit(&format!("{}\n", report.json))
    } else {
        emit(&report.human)
    }
}

/// Parses the bytes of a batch file (the schema of `flashpage plan --batch`): valid JSON,
/// an object, no field twice, every field known and converted. `name` names the input in
/// messages. Not yet validated as a batch ([`plan_batch`] does that).
pub fn parse_batch_bytes(name: &str, bytes: &[u8]) -> Result<BatchFile, CliError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| CliError::invalid(format!("{name} is not valid json: {e}")))?;
    if value.is_object()
        && let Ok(NoDuplicateKeys(Some(key))) = serde_json::from_slice(bytes)
    {
        // A repeated field would silently keep only its last value.
        let shown: String = key.chars().take(60).collect();
        return Err(CliError::invalid(format!(
            "field {shown:?} appears more than once in the batch"
        )));
    }
    parse_batch(&value)
}

/// Reads the batch file (or standard input), at most [`MAX_BATCH_JSON_BYTES`] bytes.
fn read_input(path: &Path) -> Result<(String, Vec<u8>), CliError> {
    if path.as_os_str() == "-" {
        let buf = read_capped(
            std::io::stdin().lock(),
            "standard input",
            MAX_BATCH_JSON_BYTES,
        )?;
        return Ok(("standard input".into(), buf));
    }
    let name = path.display().to_string();
    let bytes = read_file_capped(path, &format!("batch file {name}"), MAX_BATCH_JSON_BYTES)?;
    Ok((name, bytes))
}

/// Deserializes a JSON object only to find the first key that appears twice.
struct NoDuplicateKeys(Option<String>);

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = NoDuplicateKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a json object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NoDuplicateKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut duplicate = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if duplicate.is_none() && !seen.insert(key.clone()) {
                        duplicate = Some(key);
                    }
                }
                Ok(NoDuplicateKeys(duplicate))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// A short rendering of a JSON value for error messages.
pub fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    } else {
        s
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Levenshtein distance, for "did you mean" on unknown fields.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_field(key: &str) -> CliError {
    let shown: String = key.chars().take(60).collect();
    let best = KNOWN_FIELDS
        .iter()
        .map(|k| (edit_distance(&shown, k), *k))
        .min()
        .filter(|&(d, _)| d <= 3);
    match best {
        Some((_, k)) => CliError::invalid(format!(
            "unknown field {shown:?} in the batch: did you mean {k:?}?"
        )),
        None => CliError::invalid(format!(
            "unknown field {shown:?} in the batch: expected one of {}",
            KNOWN_FIELDS.join(", ")
        )),
    }
}

/// Field access with conversions that name the field and the value on failure.
struct Fields<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The value of `field`, treating `null` as absent.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn require(&self, field: &str, what: &str) -> Result<&'a Value, CliError> {
        self.get(field)
            .ok_or_else(|| CliError::invalid(format!("missing required field {field} ({what})")))
    }

    fn usize_req(&self, field: &str, what: &str) -> Result<usize, CliError> {
        to_usize(field, self.require(field, what)?)
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, CliError> {
        self.get(field).map(|v| to_usize(field, v)).transpose()
    }

    fn f32_opt(&self, field: &str) -> Result<Option<f32>, CliError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let Some(x) = v.as_f64() else {
            return Err(CliError::invalid(format!(
                "{field} must be a number, got {} {}",
                type_name(v),
                show(v)
            )));
        };
        to_f32(field, &show(v), x).map(Some)
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>, CliError> {
        self.get(field)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    CliError::invalid(format!(
                        "{field} must be true or false, got {} {}",
                        type_name(v),
                        show(v)
                    ))
                })
            })
            .transpose()
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>, CliError> {
        self.get(field)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    CliError::invalid(format!(
                        "{field} must be a string, got {} {}",
                        type_name(v),
                        show(v)
                    ))
                })
            })
            .transpose()
    }

    fn i32_array(&self, field: &str, what: &str) -> Result<Vec<i32>, CliError> {
        to_i32_array(field, self.require(field, what)?)
    }
}

/// A number read as f64, refused (naming `field`) when it does not survive conversion to
/// f32: a non-zero value that becomes 0 (underflow) or a finite value that becomes infinite
/// (overflow). Values the conversion only rounds are kept; the option's own validation then
/// judges them.
pub fn to_f32(field: &str, shown: &str, x: f64) -> Result<f32, CliError> {
    let y = x as f32;
    if x.is_finite() && !y.is_finite() {
        return Err(CliError::invalid(format!(
            "{field} = {shown} is out of range for a 32-bit float (it would become infinite)"
        )));
    }
    if x != 0.0 && y == 0.0 {
        return Err(CliError::invalid(format!(
            "{field} = {shown} underflows a 32-bit float (it would become 0)"
        )));
    }
    Ok(y)
}

/// A non-negative integer that fits in `usize`.
pub fn to_usize(field: &str, v: &Value) -> Result<usize, CliError> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                usize::try_from(u).map_err(|_| {
                    CliError::invalid(format!("{field} = {u} is too large for this machine"))
                })
            } else if let Some(i) = n.as_i64() {
                Err(CliError::invalid(format!(
                    "{field} must be a non-negative integer, got {i}"
                )))
            } else {
                Err(CliError::invalid(format!(
                    "{field} must be a non-negative integer, got {n}"
                )))
            }
        }
        _ => Err(CliError::invalid(format!(
            "{field} must be a non-negative integer, got {} {}",
            type_name(v),
            show(v)
        ))),
    }
}

/// An integer in the int32 range.
fn to_i32(field: &str, v: &Value) -> Result<i32, CliError> {
    let bad = || {
        CliError::invalid(format!(
            "{field} must be an integer in the int32 range, got {}",
            show(v)
        ))
    };
    match v {
        Value::Number(n) => n
            .as_i64()
            .and_then(|i| i32::try_from(i).ok())
            .ok_or_else(bad),
        _ => Err(CliError::invalid(format!(
            "{field} must be an integer in the int32 range, got {} {}",
            type_name(v),
            show(v)
        ))),
    }
}

fn to_i32_array(field: &str, v: &Value) -> Result<Vec<i32>, CliError> {
    let Value::Array(items) = v else {
        return Err(CliError::invalid(format!(
            "{field} must be an array of int32 integers, got {} {}",
            type_name(v),
            show(v)
        )));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, x) in items.iter().enumerate() {
        out.push(to_i32(&format!("{field}[{i}]"), x)?);
    }
    Ok(out)
}

fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_batch(value: &Value) -> Result<BatchFile, CliError> {
    let Value::Object(map) = value else {
        return Err(CliError::invalid(format!(
            "the batch must be a json object, got {} {}",
            type_name(value),
            show(value)
        )));
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(unknown_field(key));
    }
    let f = Fields { map };
    let kind_v = f.require("kind", "\"decode\" or \"prefill\"")?;
    let kind = match kind_v.as_str() {
        Some("decode") => Kind::Decode,
        Some("prefill") => Kind::Prefill,
        _ => {
            return Err(CliError::invalid(format!(
                "kind must be \"decode\" or \"prefill\", got {}",
                show(kind_v)
            )));
        }
    };
    let num_qo_heads = f.usize_req("num_qo_heads", "query/output heads")?;
    let num_kv_heads = f.usize_req("num_kv_heads", "key/value heads")?;
    let head_dim = f.usize_req("head_dim", "the head dimension")?;
    let page_size = f.usize_req("page_size", "tokens per page")?;
    let num_pages = f.usize_req("num_pages", "pages in the kv cache")?;
    let qo_indptr = match kind {
        Kind::Prefill => {
            Some(f.i32_array("qo_indptr", "kind \"prefill\" needs B + 1 query offsets")?)
        }
        Kind::Decode => f
            .get("qo_indptr")
            .map(|v| to_i32_array("qo_indptr", v))
            .transpose()?,
    };
    let kv_indptr = f.i32_array("kv_indptr", "B + 1 offsets into kv_indices")?;
    let kv_indices = f.i32_array("kv_indices", "the page ids of every request")?;
    let kv_last_page_len = f.i32_array("kv_last_page_len", "B entries")?;

    let mut options = AttentionOptions::default().with_return_lse(true);
    if let Some(c) = f.bool_opt("causal")? {
        options.causal = c;
    }
    if let Some(w) = f.get("window_left") {
        let w = to_i32("window_left", w)?;
        options.window_left = AttentionOptions::window_from_signed(w.into())?;
    }
    options.logits_soft_cap = f.f32_opt("logits_soft_cap")?;
    options.sm_scale = f.f32_opt("sm_scale")?;
    let rope_theta = f.f32_opt("rope_theta")?;
    let rope_scale = f.f32_opt("rope_scale")?;
    let pos = f.str_opt("pos_encoding")?.unwrap_or("none");
    options.pos_encoding = PosEncoding::parse(pos, rope_theta, rope_scale)?;

    let parallelism = f.usize_opt("parallelism")?;
    let mut config = PlanConfig::with_parallelism(parallelism.unwrap_or_else(default_parallelism));
    config.graph_capacity = f.usize_opt("graph_capacity")?;
    config.graph_max_q_rows = f.usize_opt("graph_max_q_rows")?;
    config.graph_max_kv_len = f.usize_opt("graph_max_kv_len")?;
    config.deterministic_chunk = f.usize_opt("deterministic_chunk")?;
    if let Some(t) = f.usize_opt("q_tile")? {
        config.q_tile = t;
    }
    if let Some(m) = f.usize_opt("min_kv_chunk")? {
        config.min_kv_chunk = m;
    }
    for (field, v) in [
        ("parallelism", parallelism),
        ("graph_capacity", config.graph_capacity),
        ("deterministic_chunk", config.deterministic_chunk),
        ("q_tile", Some(config.q_tile)),
        ("min_kv_chunk", Some(config.min_kv_chunk)),
    ] {
        if v == Some(0) {
            return Err(Error::NotPositive { field, actual: 0 }.into());
        }
    }
    if let Some(p) = parallelism
        && p > MAX_PARALLELISM
    {
        return Err(CliError::invalid(format!(
            "parallelism = {p} exceeds the limit {MAX_PARALLELISM} work slots"
        )));
    }
    if config.graph_capacity.is_none() {
        for (field, v) in [
            ("graph_max_q_rows", config.graph_max_q_rows),
            ("graph_max_kv_len", config.graph_max_kv_len),
        ] {
            if let Some(x) = v {
                return Err(CliError::invalid(format!(
                    "{field} = {x} is set but graph_capacity is not: it applies only in graph mode"
                )));
            }
        }
    }
    Ok(BatchFile {
        kind,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        num_pages,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        options,
        config,
        parallelism_default: parallelism.is_none(),
        workspace_bytes: f.usize_opt("workspace_bytes")?,
        int_workspace_bytes: f.usize_opt("int_workspace_bytes")?,
    })
}

/// The two renderings of a plan.
#[derive(Debug)]
pub struct Report {
    /// The human summary.
    pub human: String,
    /// The JSON object of `--json`.
    pub json: Value,
}

impl BatchFile {
    /// The page table (borrowing the file's arrays).
    fn pages(&self) -> PageTable<'_> {
        PageTable {
            page_size: self.page_size,
            num_pages: self.num_pages,
            indptr: &self.kv_indptr,
            last_page_len: &self.kv_last_page_len,
            num_indices: self.kv_indices.len(),
        }
    }

    /// The batch description (borrowing the file's arrays).
    pub fn desc(&self) -> Result<BatchDesc<'_>, CliError> {
        let heads = HeadConfig::new(self.num_qo_heads, self.num_kv_heads, self.head_dim)?;
        let pages = self.pages();
        Ok(match self.kind {
            Kind::Prefill => {
                BatchDesc::prefill_paged(heads, self.qo_indptr.as_deref().unwrap_or(&[]), pages)
            }
            Kind::Decode => BatchDesc::decode(heads, pages),
        })
    }
    /// The attention options.
    pub fn options(&self) -> &AttentionOptions {
        &self.options
    }
    /// The planner configuration.
    pub fn config(&self) -> &PlanConfig {
        &self.config
    }
    /// The page ids.
    pub fn kv_indices(&self) -> &[i32] {
        &self.kv_indices
    }
}

/// Upper bound of the int image a plan of `desc` with `config` builds (counted, nothing
/// allocated): the library's `workspace_size` for limits equal to this batch.
fn int_image_bound(vb: &ValidBatch<'_>, config: &PlanConfig) -> Result<usize, CliError> {
    let desc = vb.desc();
    let batch = config.graph_capacity.unwrap_or(0).max(vb.batch_size());
    let q_rows = match config.graph_capacity {
        _ if desc.is_decode() => batch,
        // Graph-mode prefill sizes its rows for graph_max_q_rows, by default the capacity.
        Some(cap) => config.graph_max_q_rows.unwrap_or(cap).max(vb.num_q_rows()),
        None => vb.num_q_rows(),
    };
    let kv = config.graph_max_kv_len.unwrap_or(0).max(vb.max_kv_len());
    let limits =
        WorkspaceLimits::new(desc.heads, DType::F32, batch, q_rows, kv, 1).with_config(*config);
    match workspace_size(&limits) {
        Ok(req) => Ok(req.int.total()),
        // The library names limits as a deployment's; here they come from the batch.
        Err(Error::LimitExceeded {
            field: "max_batch",
            limit,
            actual,
            ..
        }) => Err(CliError::invalid(format!(
            "graph_capacity or batch size {actual} exceeds the limit {limit} (16-byte requests entries in the largest plan schedule)"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Validates and plans a parsed batch (bounded before anything is allocated for it), checks
/// its page ids and workspace sizes, and renders the plan.
pub fn plan_batch(b: &BatchFile) -> Result<Report, CliError> {
    let heads = HeadConfig::new(b.num_qo_heads, b.num_kv_heads, b.head_dim)?;
    let pages = b.pages();
    let desc = match b.kind {
        // Parsing guarantees qo_indptr for prefill; an empty one would fail validation.
        Kind::Prefill => {
            BatchDesc::prefill_paged(heads, b.qo_indptr.as_deref().unwrap_or(&[]), pages)
        }
        Kind::Decode => {
            if let Some(qo) = &b.qo_indptr {
                check_decode_qo_indptr(qo, &b.kv_indptr)?;
            }
            BatchDesc::decode(heads, pages)
        }
    };
    // Validate (once) and bound the schedule before anything is allocated for it.
    let vb = check_batch(&desc, &b.options)?;
    let bound = int_image_bound(&vb, &b.config)?;
    if bound > MAX_INT_IMAGE_BYTES {
        // In graph mode the planner names the capacity that fits (it counts before it
        // allocates, so asking it costs nothing).
        if b.config.graph_capacity.is_some()
            && let Err(e) = Plan::new(&desc, &b.options, &b.config)
        {
            return Err(e.into());
        }
        return Err(CliError::invalid(format!(
            "the plan could need up to {bound} bytes of int workspace (graph_capacity {}, parallelism {}, q_tile {}), more than the {MAX_INT_IMAGE_BYTES} bytes this command plans",
            b.config
                .graph_capacity
                .map_or("none".to_string(), |c| c.to_string()),
            b.config.parallelism,
            b.config.q_tile
        )));
    }
    let plan = Plan::from_valid(&vb, &b.config)?;
    check_page_ids(&b.kv_indptr, &b.kv_indices, b.num_pages)?;
    let req = plan.requirement();
    req.total()?;
    if let Some(cap) = b.workspace_bytes {
        req.float.check_fits(cap)?;
    }
    if let Some(cap) = b.int_workspace_bytes {
        req.int.check_fits(cap).map_err(|e| match e {
            Error::WorkspaceTooSmall { .. } => CliError::invalid(format!("int workspace: {e}")),
            other => other.into(),
        })?;
    }
    Ok(render(b, &plan, vb.total_kv_len()))
}

/// Plans the (already planned and checked) batch as a shared-prefix cascade and adds its
/// levels to the report: `"cascade"` in the JSON, a section in the summary.
fn cascade_report(b: &BatchFile, report: &mut Report) -> Result<(), CliError> {
    use std::fmt::Write;
    let heads = HeadConfig::new(b.num_qo_heads, b.num_kv_heads, b.head_dim)?;
    let pages = b.pages();
    let qo = match b.kind {
        Kind::Prefill => b.qo_indptr.as_deref(),
        Kind::Decode => None,
    };
    let plan =
        CascadePlan::shared_prefixes(heads, qo, pages, &b.kv_indices, &b.options, &b.config)?;
    let flat_pages = b.kv_indptr.last().map_or(0, |&n| n.max(0) as usize);
    let referenced = plan.pages_referenced();
    let (f32_bytes, bf16_bytes) = (
        plan.float_requirement(DType::F32)?.total(),
        plan.float_requirement(DType::BF16)?.total(),
    );
    let h = &mut report.human;
    let _ = writeln!(
        h,
        "cascade: {} levels; pages referenced {referenced} of the flat batch's {flat_pages}",
        plan.num_levels()
    );
    let mut levels = Vec::new();
    for l in 0..plan.num_levels() {
        let (Some(lp), Some(ids)) = (plan.level_plan(l), plan.level_kv_indices(l)) else {
            continue;
        };
        let _ = writeln!(
            h,
            "  level {l}: {} requests, {} query rows, {} pages, {} work items, float workspace {} bytes",
            lp.batch_size(),
            lp.num_q_rows(),
            ids.len(),
            lp.num_work_items(),
            lp.requirement().float.total()
        );
        levels.push(json!({
            "requests": lp.batch_size(),
            "query_rows": lp.num_q_rows(),
            "pages": ids.len(),
            "causal": lp.options().causal,
            "work_items": lp.num_work_items(),
            "float_bytes": lp.requirement().float.total(),
        }));
    }
    let _ = writeln!(
        h,
        "  cascade float workspace: {f32_bytes} bytes with f32 outputs, {bf16_bytes} with f16/bf16"
    );
    report.json["cascade"] = json!({
        "levels": levels,
        "pages_referenced": referenced,
        "flat_pages": flat_pages,
        "float_bytes_f32": f32_bytes,
        "float_bytes_16bit": bf16_bytes,
    });
    Ok(())
}

/// A decode batch may carry `qo_indptr`; it must then describe one row per request.
fn check_decode_qo_indptr(qo: &[i32], kv_indptr: &[i32]) -> Result<(), CliError> {
    if qo.len() != kv_indptr.len() {
        return Err(Error::IndptrLengthMismatch {
            qo_indptr_len: qo.len(),
            kv_indptr_len: kv_indptr.len(),
        }
        .into());
    }
    for (i, &x) in qo.iter().enumerate() {
        if i64::from(x) != i as i64 {
            return Err(CliError::invalid(format!(
                "qo_indptr[{i}] = {x} but a decode batch has one query row per request: expected {i} (or use kind \"prefill\")"
            )));
        }
    }
    Ok(())
}

/// The window as the batch schema writes it: `-1` for none.
fn window_signed(opts: &AttentionOptions) -> i64 {
    opts.window_left.map_or(-1, i64::from)
}

fn opt_str<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_string(), |x| x.to_string())
}

fn render(b: &BatchFile, plan: &Plan, total_kv: u64) -> Report {
    use std::fmt::Write;
    let heads = plan.heads();
    let req = plan.requirement();
    let opts = plan.options();
    let cfg = plan.config();
    let sm_scale = opts.resolved_sm_scale(heads.head_dim());
    let float = req.float.total();
    let int = req.int.total();
    let caps = plan.capacities();

    let mut h = String::new();
    let kind = plan.kind().name();
    let _ = writeln!(
        h,
        "batch: {kind}, {} requests (padded to {}), {} query rows, kv length max {} / total {} tokens",
        plan.batch_size(),
        plan.padded_batch_size(),
        plan.num_q_rows(),
        plan.max_kv_len(),
        total_kv
    );
    let _ = writeln!(
        h,
        "heads: {} qo / {} kv (group {}), head_dim {}, page_size {}, {} pages in the cache, {} page ids",
        heads.num_qo_heads(),
        heads.num_kv_heads(),
        heads.group_size(),
        heads.head_dim(),
        plan.page_size(),
        b.num_pages,
        b.kv_indices.len()
    );
    let _ = writeln!(
        h,
        "options: causal {}, sm_scale {sm_scale}{}, logits_soft_cap {}, window_left {}, pos_encoding {}",
        opts.causal,
        if opts.sm_scale.is_none() {
            " (1/sqrt(head_dim))"
        } else {
            ""
        },
        opt_str(opts.logits_soft_cap),
        window_signed(opts),
        opts.pos_encoding.name()
    );
    let _ = writeln!(
        h,
        "planner: parallelism {}{}, graph mode {}, deterministic chunk {}, q tile {}",
        cfg.parallelism,
        if b.parallelism_default {
            " (this machine)"
        } else {
            ""
        },
        cfg.graph_capacity
            .map_or("off".to_string(), |c| format!("on (capacity {c})")),
        opt_str(cfg.deterministic_chunk),
        cfg.q_tile
    );
    let _ = writeln!(
        h,
        "work items: {} (capacity {})",
        plan.num_work_items(),
        caps.work_items
    );
    match plan.kv_chunk() {
        Some(c) if plan.split_kv() => {
            let _ = writeln!(
                h,
                "split-kv: yes, kv chunk {c} tokens, {} merge rows (capacity {}), {} partial rows (capacity {})",
                plan.num_merge_rows(),
                caps.merge_rows,
                plan.num_partial_rows(),
                caps.partial_rows
            );
        }
        Some(c) => {
            let _ = writeln!(
                h,
                "split-kv: no (kv chunk {c} tokens covers every request), 0 merge rows"
            );
        }
        None => {
            let _ = writeln!(h, "split-kv: no, 0 merge rows");
        }
    }
    print_workspace(&mut h, "float", &req.float);
    print_workspace(&mut h, "int", &req.int);
    // Checked by plan_batch (Requirement::total): at most isize::MAX, no overflow.
    let total = float.saturating_add(int);
    let _ = writeln!(h, "total: {total} bytes ({})", human_bytes(total as u64));
    if let Some(cap) = b.workspace_bytes {
        let _ = writeln!(
            h,
            "workspace_bytes {cap}: the float workspace fits ({} bytes to spare)",
            cap.saturating_sub(float)
        );
    }
    if let Some(cap) = b.int_workspace_bytes {
        let _ = writeln!(
            h,
            "int_workspace_bytes {cap}: the int workspace fits ({} bytes to spare)",
            cap.saturating_sub(int)
        );
    }

    let mut buffers = buffers_json("float", &req.float);
    buffers.extend(buffers_json("int", &req.int));
    let j = json!({
        "kind": kind,
        "batch_size": plan.batch_size(),
        "padded_batch": plan.padded_batch_size(),
        "query_rows": plan.num_q_rows(),
        "max_kv_len": plan.max_kv_len(),
        "total_kv_len": total_kv,
        "num_qo_heads": heads.num_qo_heads(),
        "num_kv_heads": heads.num_kv_heads(),
        "group_size": heads.group_size(),
        "head_dim": heads.head_dim(),
        "page_size": plan.page_size(),
        "num_pages": b.num_pages,
        "causal": opts.causal,
        "sm_scale": sm_scale,
        "logits_soft_cap": opts.logits_soft_cap,
        "window_left": window_signed(opts),
        "pos_encoding": opts.pos_encoding.name(),
        "parallelism": cfg.parallelism,
        "graph_mode": plan.is_graph(),
        "graph_capacity": cfg.graph_capacity,
        "deterministic_chunk": cfg.deterministic_chunk,
        "q_tile": cfg.q_tile,
        "work_items": plan.num_work_items(),
        "work_item_capacity": caps.work_items,
        "split_kv": plan.split_kv(),
        "kv_chunk": plan.kv_chunk(),
        "merge_rows": plan.num_merge_rows(),
        "merge_row_capacity": caps.merge_rows,
        "partial_rows": plan.num_partial_rows(),
        "partial_row_capacity": caps.partial_rows,
        "float_bytes": float,
        "int_bytes": int,
        "total_bytes": total,
        "buffers": buffers,
    });
    Report { human: h, json: j }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_suggests_close_fields() {
        assert_eq!(edit_distance("kv_indice", "kv_indices"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        let e = unknown_field("kv_indice");
        assert!(
            e.message.contains("did you mean \"kv_indices\""),
            "{}",
            e.message
        );
        assert_eq!(e.code, 2);
    }

    #[test]
    fn integers_are_checked() {
        assert_eq!(to_usize("x", &json!(5)).unwrap(), 5);
        for bad in [json!(-1), json!(1.5), json!("5"), json!(1e30), json!(null)] {
            let e = to_usize("x", &bad).unwrap_err();
            assert_eq!(e.code, 2);
            assert!(e.message.starts_with("x must be"), "{}", e.message);
        }
        assert_eq!(to_i32("y", &json!(-7)).unwrap(), -7);
        assert!(to_i32("y", &json!(3_000_000_000u64)).is_err());
        assert!(to_i32("y", &json!(2.0)).is_err());
    }
}
