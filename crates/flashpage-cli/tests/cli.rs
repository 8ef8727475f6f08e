//! The `flashpage` binary: `plan`, `workspace` and `run`, driven as a user would (files in a
//! temporary directory, exit status, stdout and stderr).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use flashpage::*;
use flashpage::{WorkspaceLimits, workspace_size};
use flashpage_testkit::case::{CaseData, CaseSpec, Fp8Spec, MaskSpec};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

const FOUNDING: &str = "error: kv_indptr has 1 entry, qo_indptr has 9 entries: both must have batch_size + 1 = 9 entries";

fn flashpage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashpage"))
        .args(args)
        .output()
        .expect("the flashpage binary starts")
}

/// A fresh path in the temp directory, removed when dropped.
struct TmpPath(PathBuf);

impl std::ops::Deref for TmpPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp(name: &str) -> TmpPath {
    static N: AtomicUsize = AtomicUsize::new(0);
    TmpPath(std::env::temp_dir().join(format!(
        "flashpage-cli-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )))
}

fn write_tmp(name: &str, bytes: &[u8]) -> TmpPath {
    let p = tmp(name);
    std::fs::write(&*p, bytes).unwrap();
    p
}

fn data(name: &str) -> String {
    format!("{}/tests/data/batches/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(o));
}

/// Exit 2, one `error:` line on stderr containing every needle, no panic.
fn assert_invalid(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error:"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn plan_file(path: &Path, json_out: bool) -> Output {
    let p = path.to_str().unwrap();
    if json_out {
        flashpage(&["plan", "--batch", p, "--json"])
    } else {
        flashpage(&["plan", "--batch", p])
    }
}

fn plan_value(v: &Value, json_out: bool) -> Output {
    plan_file(&write_tmp("batch.json", v.to_string().as_bytes()), json_out)
}

fn load(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(name)).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect()
}

fn us(v: &Value, k: &str) -> usize {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}")) as usize
}

/// Plans the JSON batch `b` with the library directly (the CLI must agree).
fn library_plan(b: &Value) -> Plan {
    try_library_plan(b).unwrap()
}

fn opt_us(b: &Value, k: &str) -> Option<usize> {
    b.get(k).and_then(Value::as_u64).map(|x| x as usize)
}

fn try_library_plan(b: &Value) -> Result<Plan, Error> {
    let heads = HeadConfig::new(
        us(b, "num_qo_heads"),
        us(b, "num_kv_heads"),
        us(b, "head_dim"),
    )?;
    let (kv_indptr, last) = (ints(&b["kv_indptr"]), ints(&b["kv_last_page_len"]));
    let pages = PageTable {
        page_size: us(b, "page_size"),
        num_pages: us(b, "num_pages"),
        indptr: &kv_indptr,
        last_page_len: &last,
        num_indices: b["kv_indices"].as_array().unwrap().len(),
    };
    let qo = b.get("qo_indptr").map(ints).unwrap_or_default();
    let desc = if b["kind"] == "prefill" {
        BatchDesc::prefill_paged(heads, &qo, pages)
    } else {
        BatchDesc::decode(heads, pages)
    };
    let opts = AttentionOptions::default()
        .with_causal(b.get("causal").and_then(Value::as_bool).unwrap_or(false))
        .with_sm_scale(b.get("sm_scale").and_then(Value::as_f64).map(|x| x as f32))
        .with_logits_soft_cap(
            b.get("logits_soft_cap")
                .and_then(Value::as_f64)
                .map(|x| x as f32),
        )
        .with_window_left(
            AttentionOptions::window_from_signed(
                b.get("window_left").and_then(Value::as_i64).unwrap_or(-1),
            )
            .unwrap(),
        )
        .with_return_lse(true);
    let mut cfg = PlanConfig::with_parallelism(us(b, "parallelism"));
    cfg.graph_capacity = opt_us(b, "graph_capacity");
    cfg.graph_max_q_rows = opt_us(b, "graph_max_q_rows");
    cfg.graph_max_kv_len = opt_us(b, "graph_max_kv_len");
    cfg.deterministic_chunk = opt_us(b, "deterministic_chunk");
    let plan = Plan::new(&desc, &opts, &cfg)?;
    flashpage::validate::check_page_ids(&kv_indptr, &ints(&b["kv_indices"]), pages.num_pages)?;
    Ok(plan)
}

/// Checks the `--json` plan report against the library's plan of the same batch.
fn check_plan_json(batch: &Value, out: &Output) -> Value {
    assert_ok(out);
    let j: Value = serde_json::from_str(&stdout(out)).expect("--json prints one JSON object");
    let plan = library_plan(batch);
    assert_eq!(us(&j, "work_items"), plan.num_work_items());
    assert_eq!(j["split_kv"], json!(plan.split_kv()));
    assert_eq!(us(&j, "padded_batch"), plan.padded_batch_size());
    assert_eq!(us(&j, "batch_size"), plan.batch_size());
    assert_eq!(us(&j, "query_rows"), plan.num_q_rows());
    assert_eq!(us(&j, "merge_rows"), plan.num_merge_rows());
    assert_eq!(j["kv_chunk"], json!(plan.kv_chunk()));
    let req = plan.requirement();
    assert_eq!(us(&j, "float_bytes"), req.float.total());
    assert_eq!(us(&j, "int_bytes"), req.int.total());
    let bufs = j["buffers"].as_array().unwrap();
    let expected: Vec<(&str, &str, usize, usize)> = req
        .float
        .buffers()
        .iter()
        .map(|b| ("float", b.name, b.offset, b.bytes))
        .chain(
            req.int
                .buffers()
                .iter()
                .map(|b| ("int", b.name, b.offset, b.bytes)),
        )
        .collect();
    assert_eq!(bufs.len(), expected.len());
    for (b, (ws, name, offset, bytes)) in bufs.iter().zip(expected) {
        assert_eq!(b["workspace"], ws);
        assert_eq!(b["name"], name);
        assert_eq!(us(b, "offset"), offset);
        assert_eq!(us(b, "bytes"), bytes);
        assert_eq!(offset % 256, 0);
    }
    j
}

#[test]
fn plan_decode_human_and_json() {
    let b = load("decode.json");
    let out = plan_file(Path::new(&data("decode.json")), false);
    assert_ok(&out);
    let text = stdout(&out);
    for needle in [
        "batch: decode, 3 requests (padded to 3), 3 query rows",
        "kv length max 1000 / total 1550 tokens",
        "work items: ",
        "split-kv: yes, kv chunk ",
        "partial_o",
        "partial_lse",
        "requests",
        "work_items",
        "merge_map",
        "total: ",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
    let j = check_plan_json(&b, &plan_file(Path::new(&data("decode.json")), true));
    assert_eq!(j["split_kv"], true, "1000 keys over 64 slots must split");
    assert_eq!(j["kind"], "decode");
    assert!(us(&j, "float_bytes") > 0);
}

#[test]
fn plan_prefill_graph_and_deterministic() {
    for name in [
        "prefill.json",
        "graph_decode.json",
        "deterministic_decode.json",
    ] {
        let b = load(name);
        let j = check_plan_json(&b, &plan_file(Path::new(&data(name)), true));
        match name {
            "prefill.json" => {
                assert_eq!(j["kind"], "prefill");
                assert_eq!(us(&j, "query_rows"), 41);
                assert_eq!(j["causal"], true);
            }
            "graph_decode.json" => {
                assert_eq!(j["graph_mode"], true);
                assert_eq!(us(&j, "padded_batch"), 8);
                assert!(us(&j, "work_item_capacity") >= us(&j, "work_items"));
            }
            _ => {
                assert_eq!(us(&j, "kv_chunk"), 64);
                assert_eq!(j["split_kv"], true);
                assert_eq!(us(&j, "merge_rows"), 1);
            }
        }
        // The human summary of the same file succeeds and names every buffer.
        let out = plan_file(Path::new(&data(name)), false);
        assert_ok(&out);
        assert!(stdout(&out).contains("merge_map"));
    }
}

#[test]
fn plan_graph_mode_pads_smaller_batches_and_refuses_larger() {
    let mut b = load("decode.json");
    b["graph_capacity"] = json!(16);
    let j = check_plan_json(&b, &plan_value(&b, true));
    assert_eq!(us(&j, "padded_batch"), 16);
    assert_eq!(us(&j, "batch_size"), 3);
    b["graph_capacity"] = json!(2);
    assert_invalid(
        &plan_value(&b, false),
        &["batch_size = 3", "graph_capacity"],
    );
}

#[test]
fn plan_founding_scenario_is_the_exact_message() {
    let out = plan_file(Path::new(&data("founding.json")), false);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), format!("{FOUNDING}\n"));
    assert!(stdout(&out).is_empty());
    // Same for a decode batch that carries the same qo_indptr.
    let mut b = load("founding.json");
    b["kind"] = json!("decode");
    let out = plan_value(&b, true);
    assert_eq!(stderr(&out), format!("{FOUNDING}\n"));
}

#[test]
fn plan_reads_standard_input() {
    use std::io::Write;
    let text = std::fs::read(data("deterministic_decode.json")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashpage"))
        .args(["plan", "--batch", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    check_plan_json(&load("deterministic_decode.json"), &out);
}

#[test]
fn plan_workspace_capacity_is_checked() {
    let mut b = load("decode.json");
    b["workspace_bytes"] = json!(1000);
    assert_invalid(
        &plan_value(&b, false),
        &[
            "workspace too small for buffer 'partial_o'",
            "1000 of 1000 bytes available",
        ],
    );
    let float = us(
        &check_plan_json(
            &load("decode.json"),
            &plan_value(&load("decode.json"), true),
        ),
        "float_bytes",
    );
    b["workspace_bytes"] = json!(float);
    assert_ok(&plan_value(&b, false));
    b["int_workspace_bytes"] = json!(10);
    assert_invalid(&plan_value(&b, false), &["int workspace", "'requests'"]);
}

/// Malformed batches: each is exit 2 with an `error:` line naming the field and the value.
#[test]
fn plan_malformed_inputs_name_the_field() {
    let base = load("prefill.json");
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b.to_string()
    };
    let without = |k: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(k);
        b.to_string()
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("{".into(), vec!["not valid json"]),
        ("".into(), vec!["not valid json"]),
        ("[1, 2]".into(), vec!["json object", "an array"]),
        ("\"x\"".into(), vec!["json object"]),
        (
            r#"{"kind": "decode", "kind": "prefill"}"#.into(),
            vec!["field \"kind\" appears more than once"],
        ),
        (without("kind"), vec!["missing required field kind"]),
        (with("kind", json!("verify")), vec!["kind", "\"verify\""]),
        (with("kind", json!(3)), vec!["kind", "3"]),
        (
            without("num_qo_heads"),
            vec!["missing required field num_qo_heads"],
        ),
        (
            without("qo_indptr"),
            vec!["missing required field qo_indptr"],
        ),
        (
            without("kv_indices"),
            vec!["missing required field kv_indices"],
        ),
        (
            with("num_qo_heads", json!(-32)),
            vec!["num_qo_heads", "-32"],
        ),
        (with("num_qo_heads", json!(0)), vec!["num_qo_heads", "0"]),
        (
            with("num_kv_heads", json!(5)),
            vec!["num_kv_heads (5)", "num_qo_heads (32)"],
        ),
        (with("head_dim", json!(127.5)), vec!["head_dim", "127.5"]),
        (with("head_dim", json!(100)), vec!["head_dim 100"]),
        (with("head_dim", json!("128")), vec!["head_dim", "\"128\""]),
        (with("page_size", json!(1e300)), vec!["page_size", "1e+300"]),
        (with("page_size", json!(0)), vec!["page_size 0"]),
        (with("page_size", json!(100000)), vec!["page_size 100000"]),
        (with("num_pages", json!(-1)), vec!["num_pages", "-1"]),
        (
            with("num_pages", json!(2)),
            vec!["kv_indices", "num_pages = 2"],
        ),
        (
            with("num_pages", json!(184467440737095516160.0)),
            vec!["num_pages must be a non-negative integer"],
        ),
        (
            with("kv_indices", json!([12, 7, -40, 3])),
            vec!["kv_indices[2] = -40"],
        ),
        (
            with("kv_indices", json!([12, 7, 3000000000u64, 3])),
            vec!["kv_indices[2]", "3000000000"],
        ),
        (
            with("kv_indices", json!([12, 7])),
            vec!["kv_indices has only 2"],
        ),
        (
            with("kv_indices", json!("12,7")),
            vec!["kv_indices", "a string"],
        ),
        (
            with("kv_indptr", json!([0, 3, 4, 2])),
            vec!["kv_indptr[3] = 2"],
        ),
        (
            with("kv_indptr", json!([1, 3, 4, 4])),
            vec!["kv_indptr[0] must be 0, got 1"],
        ),
        (
            with("kv_indptr", json!([0, 3.5, 4, 4])),
            vec!["kv_indptr[1]", "3.5"],
        ),
        (
            with("kv_indptr", json!([])),
            vec!["kv_indptr has 0 entries", "qo_indptr has 4"],
        ),
        (
            with("qo_indptr", json!([0, 40, 41])),
            vec!["qo_indptr has 3", "kv_indptr has 4"],
        ),
        (
            with("qo_indptr", json!([0, 40, 39, 41])),
            vec!["qo_indptr[2] = 39"],
        ),
        (
            with("qo_indptr", json!([0, 2147483647, 2147483647, 2147483647])),
            vec!["qo_len 2147483647 > kv_len 40"],
        ),
        (
            with("kv_last_page_len", json!([8, 16])),
            vec!["kv_last_page_len has 2", "expected 3"],
        ),
        (
            with("kv_last_page_len", json!([8, 17, 0])),
            vec!["kv_last_page_len[1] = 17"],
        ),
        (
            with("kv_last_page_len", json!([8, 16, 5])),
            vec!["kv_last_page_len[2] = 5"],
        ),
        (with("causal", json!("yes")), vec!["causal", "\"yes\""]),
        (with("sm_scale", json!(-1.0)), vec!["sm_scale = -1"]),
        (with("sm_scale", json!(1e300)), vec!["sm_scale", "1e+300"]),
        (
            with("logits_soft_cap", json!(0)),
            vec!["logits_soft_cap = 0"],
        ),
        (with("window_left", json!(-5)), vec!["window_left = -5"]),
        (
            with("window_left", json!(1e10)),
            vec!["window_left", "10000000000"],
        ),
        (
            with("pos_encoding", json!("yarn")),
            vec!["pos_encoding", "\"yarn\""],
        ),
        (
            with("rope_theta", json!(1e4)),
            vec!["rope_theta", "pos_encoding"],
        ),
        (
            with("parallelism", json!(0)),
            vec!["parallelism must be greater than 0"],
        ),
        (
            with("parallelism", json!(true)),
            vec!["parallelism", "true"],
        ),
        (
            with("graph_capacity", json!(0)),
            vec!["graph_capacity must be greater than 0"],
        ),
        (
            with("graph_max_q_rows", json!(64)),
            vec!["graph_max_q_rows", "graph_capacity"],
        ),
        (
            with("deterministic_chunk", json!(0)),
            vec!["deterministic_chunk must be greater than 0"],
        ),
        (
            with("deterministic_chunk", json!(24)),
            vec!["deterministic_chunk", "24", "page_size 16"],
        ),
        (
            with("q_tile", json!(0)),
            vec!["q_tile must be greater than 0"],
        ),
        (
            with("workspace_bytes", json!(-1)),
            vec!["workspace_bytes", "-1"],
        ),
        (
            with("kv_indice", json!([])),
            vec!["unknown field \"kv_indice\"", "did you mean \"kv_indices\""],
        ),
        (
            with("zzz_unrelated_field", json!(1)),
            vec!["unknown field \"zzz_unrelated_field\""],
        ),
        // Huge numbers never drive an allocation: the schedule is bounded first.
        (
            {
                let mut b = base.clone();
                b["graph_capacity"] = json!(1u64 << 40);
                b.to_string()
            },
            vec![
                "graph_capacity = 1099511627776",
                "exceeds the limit 16777216",
            ],
        ),
        (
            {
                let mut b = base.clone();
                b["q_tile"] = json!(1);
                b["num_qo_heads"] = json!(65536);
                b["num_kv_heads"] = json!(1);
                b["causal"] = json!(false);
                b["qo_indptr"] = json!([0, 2147483647, 2147483647, 2147483647]);
                b.to_string()
            },
            vec!["int workspace"],
        ),
    ];
    for (text, needles) in &cases {
        let out = plan_file(&write_tmp("bad.json", text.as_bytes()), false);
        assert!(
            out.status.code() == Some(2),
            "input {text}\nexit {:?}\nstderr {}",
            out.status.code(),
            stderr(&out)
        );
        assert_invalid(&out, needles);
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    // A missing file, and the base itself (so the table's failures come from the edits).
    assert_invalid(
        &flashpage(&["plan", "--batch", "/nonexistent/flashpage.json"]),
        &["/nonexistent/flashpage.json"],
    );
    assert_ok(&plan_value(&base, false));
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e20f64..1e20).prop_map(Value::from),
        (-40i64..300).prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec(-3i64..20, 0..10).prop_map(Value::from),
            prop::collection::hash_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// No panic, whatever the file: exit 0, or 2 with an `error:` line.
fn assert_clean_exit(out: &Output, input: &str) {
    let err = stderr(out);
    assert!(!err.contains("panicked"), "input {input}: {err}");
    match out.status.code() {
        Some(0) => {}
        Some(2) => assert!(err.starts_with("error:"), "input {input}: {err}"),
        other => panic!("input {input}: exit {other:?}, stderr {err}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn plan_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let out = plan_file(&write_tmp("random.json", &bytes), false);
        assert_clean_exit(&out, &format!("{bytes:?}"));
    }

    #[test]
    fn plan_never_panics_on_random_fields(
        edits in prop::collection::vec((0usize..27, json_value()), 1..4),
        json_out in any::<bool>(),
    ) {
        const FIELDS: [&str; 27] = [
            "kind", "num_qo_heads", "num_kv_heads", "head_dim", "page_size", "num_pages",
            "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len", "causal", "window_left",
            "logits_soft_cap", "sm_scale", "pos_encoding", "rope_theta", "rope_scale",
            "graph_capacity", "graph_max_q_rows", "graph_max_kv_len", "deterministic_chunk",
            "parallelism", "q_tile", "min_kv_chunk", "workspace_bytes", "int_workspace_bytes",
            "unknown",
        ];
        let mut b = load("prefill.json");
        for (f, v) in edits {
            b[FIELDS[f]] = v;
        }
        let out = plan_value(&b, json_out);
        assert_clean_exit(&out, &b.to_string());
    }
}

/// A structurally valid batch: random requests, page size, parallelism, graph and
/// deterministic settings (some combinations are still invalid, e.g. causal qo > kv).
fn batch_strategy() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        prop::collection::vec((0usize..40, 0usize..2000), 1..12),
        prop::sample::select(vec![1usize, 5, 16, 64]),
        1usize..300,
        prop::option::of(0usize..6),
        prop::option::of(1usize..6),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(prefill, reqs, ps, par, graph, det, causal, seed)| {
            let mut rng = flashpage_testkit::case::Rng::new(seed);
            let total: usize = reqs.iter().map(|r| r.1.div_ceil(ps)).sum();
            let mut ids: Vec<i32> = (0..total as i32).collect();
            rng.shuffle(&mut ids);
            let mut bb = BatchBuilder::new(ps).unwrap();
            let mut next = 0;
            for &(qo, kv) in &reqs {
                let n = kv.div_ceil(ps);
                bb.push(if prefill { qo } else { 1 }, kv, &ids[next..next + n])
                    .unwrap();
                next += n;
            }
            let mut b = json!({
                "kind": if prefill { "prefill" } else { "decode" },
                "num_qo_heads": 8, "num_kv_heads": 2, "head_dim": 64,
                "page_size": ps, "num_pages": total.max(1),
                "kv_indptr": bb.kv_indptr(), "kv_indices": bb.kv_indices(),
                "kv_last_page_len": bb.kv_last_page_len(),
                "parallelism": par, "causal": causal,
            });
            if prefill {
                b["qo_indptr"] = json!(bb.qo_indptr());
            }
            if let Some(extra) = graph {
                b["graph_capacity"] = json!(reqs.len() + extra);
                if prefill {
                    b["graph_max_q_rows"] =
                        json!(bb.qo_indptr().last().copied().unwrap_or(0) as usize + extra);
                }
                b["graph_max_kv_len"] = json!(2000);
            }
            if let Some(m) = det {
                b["deterministic_chunk"] = json!(ps * m * 16);
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// The CLI's plan is the library's plan: same counts and the same buffers, or the same
    /// error (exit 2 and the library's message).
    #[test]
    fn plan_json_matches_the_library(b in batch_strategy()) {
        let out = plan_value(&b, true);
        match try_library_plan(&b) {
            Ok(_) => {
                check_plan_json(&b, &out);
            }
            Err(e) => {
                prop_assert_eq!(out.status.code(), Some(2));
                prop_assert_eq!(stderr(&out), format!("error: {e}\n"));
            }
        }
    }
}

fn workspace_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "workspace",
        "--num-qo-heads",
        "32",
        "--num-kv-heads",
        "16",
        "--head-dim",
        "128",
        "--max-batch",
        "256",
        "--max-tokens",
        "8192",
        "--max-kv-len",
        "32768",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn workspace(extra: &[&str]) -> Output {
    let a = workspace_args(extra);
    flashpage(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn workspace_json_equals_the_library() {
    let heads = HeadConfig::new(32, 16, 128).unwrap();
    for (extra, graph, det) in [
        (&["--parallelism", "16"][..], None, None),
        (
            &["--parallelism", "264", "--graph-capacity", "512"][..],
            Some(512),
            None,
        ),
        (
            &[
                "--parallelism",
                "8",
                "--deterministic-chunk",
                "1024",
                "--dtype",
                "f32",
            ][..],
            None,
            Some(1024),
        ),
    ] {
        let out = workspace(&[extra, &["--json"]].concat());
        assert_ok(&out);
        let j: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let p = us(&j, "parallelism");
        let mut limits = WorkspaceLimits::new(heads, DType::BF16, 256, 8192, 32768, p);
        limits.config.graph_capacity = graph;
        if graph.is_some() {
            limits.config.graph_max_q_rows = Some(8192);
            limits.config.graph_max_kv_len = Some(32768);
        }
        limits.config.deterministic_chunk = det;
        let req = workspace_size(&limits).unwrap();
        assert_eq!(us(&j, "float_bytes"), req.float.total(), "{extra:?}");
        assert_eq!(us(&j, "int_bytes"), req.int.total(), "{extra:?}");
        assert_eq!(us(&j, "total_bytes"), req.float.total() + req.int.total());
        assert!(req.float.total() > 0 && req.int.total() > 0);
        let bufs = j["buffers"].as_array().unwrap();
        let lib: Vec<_> = req
            .float
            .buffers()
            .iter()
            .chain(req.int.buffers())
            .collect();
        assert_eq!(bufs.len(), lib.len());
        for (b, l) in bufs.iter().zip(lib) {
            assert_eq!(b["name"], l.name);
            assert_eq!(us(b, "offset"), l.offset);
            assert_eq!(us(b, "bytes"), l.bytes);
        }
        assert_eq!(us(&j, "max_batch"), 256);
        assert_eq!(us(&j, "max_tokens"), 8192);
        assert_eq!(us(&j, "max_kv_len"), 32768);
        assert_eq!(us(&j, "num_qo_heads"), 32);
        assert_eq!(j["graph_capacity"], json!(graph));
    }
}

#[test]
fn workspace_human_summary() {
    let out = workspace(&["--parallelism", "16"]);
    assert_ok(&out);
    let text = stdout(&out);
    for needle in [
        "float workspace: ",
        "int workspace: ",
        "partial_o",
        "partial_lse",
        "requests",
        "work_items",
        "merge_map",
        "allocate: float workspace ",
        "KiB",
        "total: ",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

#[test]
fn workspace_invalid_flags_are_named() {
    for (flags, needles) in [
        (
            vec![
                "workspace",
                "--num-qo-heads",
                "0",
                "--num-kv-heads",
                "1",
                "--head-dim",
                "64",
                "--max-batch",
                "1",
                "--max-tokens",
                "1",
                "--max-kv-len",
                "1",
            ],
            vec!["--num-qo-heads must be greater than 0, got 0"],
        ),
        (
            vec![
                "workspace",
                "--num-qo-heads",
                "32",
                "--num-kv-heads",
                "5",
                "--head-dim",
                "64",
                "--max-batch",
                "1",
                "--max-tokens",
                "1",
                "--max-kv-len",
                "1",
            ],
            vec!["--num-qo-heads 32", "--num-kv-heads 5"],
        ),
        (
            vec![
                "workspace",
                "--num-qo-heads",
                "32",
                "--num-kv-heads",
                "8",
                "--head-dim",
                "100",
                "--max-batch",
                "1",
                "--max-tokens",
                "1",
                "--max-kv-len",
                "1",
            ],
            vec!["--head-dim 100"],
        ),
        (
            vec![
                "workspace",
                "--num-qo-heads",
                "32",
                "--num-kv-heads",
                "8",
                "--head-dim",
                "64",
                "--max-batch",
                "0",
                "--max-tokens",
                "1",
                "--max-kv-len",
                "1",
            ],
            vec!["--max-batch must be greater than 0"],
        ),
        (
            vec![
                "workspace",
                "--num-qo-heads",
                "-3",
                "--num-kv-heads",
                "8",
                "--head-dim",
                "64",
                "--max-batch",
                "1",
                "--max-tokens",
                "1",
                "--max-kv-len",
                "1",
            ],
            vec!["invalid value '-3' for '--num-qo-heads"],
        ),
    ] {
        assert_invalid(&flashpage(&flags), &needles);
    }
    assert_invalid(
        &workspace(&["--graph-capacity", "8"]),
        &["--graph-capacity 8", "--max-batch 256"],
    );
    assert_invalid(&workspace(&["--dtype", "f64"]), &["--dtype", "\"f64\""]);
    assert_invalid(
        &flashpage(&[
            "workspace",
            "--num-qo-heads",
            "8",
            "--num-kv-heads",
            "2",
            "--head-dim",
            "64",
            "--max-batch",
            "1",
            "--max-tokens",
            "18446744073709551615",
            "--max-kv-len",
            "9",
            "--q-tile",
            "1",
        ]),
        &[
            "--max-tokens 18446744073709551615",
            "exceeds the limit 2147483647",
        ],
    );
    assert_invalid(
        &workspace(&["--parallelism", "100000000000"]),
        &["--parallelism 100000000000 exceeds the limit"],
    );
    assert_invalid(
        &workspace(&["--parallelism", "0"]),
        &["--parallelism must be greater than 0"],
    );
    assert_invalid(
        &workspace(&["--deterministic-chunk", "0"]),
        &["--deterministic-chunk"],
    );
    assert_invalid(
        &workspace(&["--graph-capacity", "abc"]),
        &["--graph-capacity", "abc"],
    );
}

// ---- run ----

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::E4M3Fn => Dtype::F8_E4M3,
        DType::E5M2 => Dtype::F8_E5M2,
    }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors and metadata of a case file, editable before writing.
struct CaseFile {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl CaseFile {
    fn from_case(d: &CaseData) -> CaseFile {
        let s = &d.spec;
        let h = s.heads;
        let (hq, hkv, dim) = (h.num_qo_heads(), h.num_kv_heads(), h.head_dim());
        let kv_shape = match s.layout {
            KvLayout::Nhd => vec![d.num_pages, s.page_size, hkv, dim],
            KvLayout::Hnd => vec![d.num_pages, hkv, s.page_size, dim],
        };
        let dt = st_dtype(s.dtype);
        let kv_dt = st_dtype(d.kv_dtype());
        let b = &d.batch;
        let mut tensors = vec![
            (
                "q".to_string(),
                dt,
                vec![d.rows(), hq, dim],
                d.q.to_le_bytes(),
            ),
            (
                "k_cache".to_string(),
                kv_dt,
                kv_shape.clone(),
                d.k.to_le_bytes(),
            ),
            ("v_cache".to_string(), kv_dt, kv_shape, d.v.to_le_bytes()),
            (
                "kv_indptr".to_string(),
                Dtype::I32,
                vec![b.kv_indptr().len()],
                i32_bytes(b.kv_indptr()),
            ),
            (
                "kv_indices".to_string(),
                Dtype::I32,
                vec![b.kv_indices().len()],
                i32_bytes(b.kv_indices()),
            ),
            (
                "kv_last_page_len".to_string(),
                Dtype::I32,
                vec![b.kv_last_page_len().len()],
                i32_bytes(b.kv_last_page_len()),
            ),
        ];
        if !s.decode {
            tensors.push((
                "qo_indptr".to_string(),
                Dtype::I32,
                vec![b.qo_indptr().len()],
                i32_bytes(b.qo_indptr()),
            ));
        }
        if let Some(m) = &d.custom_mask {
            tensors.push((
                "custom_mask".to_string(),
                Dtype::U8,
                vec![m.bits.len()],
                m.bits.clone(),
            ));
            tensors.push((
                "mask_indptr".to_string(),
                Dtype::I32,
                vec![m.indptr.len()],
                i32_bytes(&m.indptr),
            ));
        }
        if let Some((ks, vs)) = &d.scales {
            for (n, sc) in [("k_scale", ks), ("v_scale", vs)] {
                tensors.push((
                    n.to_string(),
                    Dtype::F32,
                    vec![sc.len()],
                    sc.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ));
            }
        }
        if let Some(sk) = &d.sinks {
            tensors.push((
                "sinks".to_string(),
                Dtype::F32,
                vec![sk.len()],
                sk.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
        let o = &s.options;
        let mut meta = HashMap::new();
        meta.insert("causal".to_string(), o.causal.to_string());
        meta.insert(
            "window_left".to_string(),
            o.window_left.map_or(-1, i64::from).to_string(),
        );
        meta.insert("kv_layout".to_string(), s.layout.name().to_string());
        if let Some(x) = o.sm_scale {
            meta.insert("sm_scale".to_string(), x.to_string());
        }
        if let Some(x) = o.logits_soft_cap {
            meta.insert("logits_soft_cap".to_string(), x.to_string());
        }
        meta.insert(
            "pos_encoding".to_string(),
            o.pos_encoding.name().to_string(),
        );
        if let PosEncoding::Rope { theta, scale } = o.pos_encoding {
            meta.insert("rope_theta".to_string(), theta.to_string());
            meta.insert("rope_scale".to_string(), scale.to_string());
        }
        CaseFile { tensors, meta }
    }

    fn remove(&mut self, name: &str) {
        self.tensors.retain(|t| t.0 != name);
    }

    fn tensor(&mut self, name: &str) -> &mut (String, Dtype, Vec<usize>, Vec<u8>) {
        self.tensors.iter_mut().find(|t| t.0 == name).unwrap()
    }

    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, dt, shape, data)| {
                (
                    n.clone(),
                    TensorView::new(*dt, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, Some(self.meta.clone())).unwrap()
    }

    fn write(&self) -> TmpPath {
        write_tmp("case.safetensors", &self.bytes())
    }
}

fn run_file(input: &Path, extra: &[&str]) -> (Output, TmpPath) {
    let output = tmp("out.safetensors");
    let mut args = vec![
        "run",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (flashpage(&args), output)
}

/// Runs a case through the binary and compares the output file with the f64 reference.
fn round_trip(spec: &CaseSpec, seed: u64, threads: &str) {
    round_trip_with(spec, seed, &["--threads", threads]);
}

/// [`round_trip`] with any extra arguments of `flashpage run`.
fn round_trip_with(spec: &CaseSpec, seed: u64, extra: &[&str]) {
    let threads = extra.join(" ");
    let d = spec.materialise(seed).unwrap();
    let input = CaseFile::from_case(&d).write();
    let (out, output) = run_file(&input, extra);
    assert_ok(&out);
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let h = spec.heads;
    let o = st.tensor("o").unwrap();
    let lse = st.tensor("lse").unwrap();
    assert_eq!(o.dtype(), st_dtype(spec.dtype));
    assert_eq!(o.shape(), &[d.rows(), h.num_qo_heads(), h.head_dim()]);
    assert_eq!(lse.dtype(), Dtype::F32);
    assert_eq!(lse.shape(), &[d.rows(), h.num_qo_heads()]);
    assert_eq!(st.len(), 2);
    let o = Tensor::from_le_bytes(spec.dtype, o.data()).unwrap();
    let lse: Vec<f32> = lse
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let r = d.reference().unwrap();
    assert!(
        r.o.iter().any(|&x| x != 0.0),
        "{}: the reference must not be all zero",
        spec.name
    );
    let c = d.compare(&o, &lse, &r);
    assert!(
        c.passed(),
        "{} ({:?}, threads {threads}): {c:?}",
        spec.name,
        spec.dtype
    );
}

#[test]
fn run_round_trip_decode_and_prefill() {
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let mut dec = CaseSpec::decode("decode", h, 16, 4, 300, dtype);
        dec.requests = vec![(1, 300), (1, 0), (1, 17), (1, 1000)];
        round_trip(&dec, 11 + i as u64, "1");
        round_trip(&dec, 21 + i as u64, "3");

        let mut pre = dec.clone();
        pre.name = "prefill causal".into();
        pre.decode = false;
        pre.requests = vec![(20, 300), (0, 0), (1, 1), (70, 100)];
        pre.options.causal = true;
        round_trip(&pre, 31 + i as u64, "2");

        let mut hnd = pre.clone();
        hnd.name = "prefill hnd rope soft-cap window".into();
        hnd.layout = KvLayout::Hnd;
        hnd.page_size = 5;
        hnd.options.logits_soft_cap = Some(5.0);
        hnd.options.window_left = Some(30);
        hnd.options.sm_scale = Some(0.1);
        hnd.options.pos_encoding = PosEncoding::Rope {
            theta: 5e5,
            scale: 2.0,
        };
        round_trip(&hnd, 41 + i as u64, "2");

        let mut alibi = dec.clone();
        alibi.name = "decode alibi".into();
        alibi.options.pos_encoding = PosEncoding::Alibi;
        round_trip(&alibi, 51 + i as u64, "2");

        let mut sinks = pre.clone();
        sinks.name = "prefill causal sinks".into();
        sinks.sinks = true;
        round_trip(&sinks, 61 + i as u64, "2");

        let mut masked = pre.clone();
        masked.name = "prefill causal custom mask".into();
        masked.custom_mask = Some(MaskSpec {
            density: 0.5,
            zero_row_stride: 3,
        });
        round_trip(&masked, 71 + i as u64, "2");
    }
}

#[test]
fn run_custom_masks_are_checked() {
    let h = HeadConfig::new(4, 2, 32).unwrap();
    let mut s = CaseSpec::decode("mask", h, 8, 2, 20, DType::F32);
    s.decode = false;
    s.requests = vec![(3, 20), (2, 9)];
    s.custom_mask = Some(MaskSpec {
        density: 0.5,
        zero_row_stride: 0,
    });
    let d = s.materialise(5).unwrap();
    let mut f = CaseFile::from_case(&d);
    f.remove("mask_indptr");
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["custom_mask needs mask_indptr"]);
    // Request 0 has 3 x 20 = 60 bits: 8 bytes; request 1 2 x 9 = 18 bits: 3 bytes.
    let mut f = CaseFile::from_case(&d);
    f.tensor("mask_indptr").3 = [0i32, 7, 11].iter().flat_map(|x| x.to_le_bytes()).collect();
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(
        &out,
        &["mask_indptr gives request 0 7 mask bytes, expected ceil(3 x 20 / 8) = 8"],
    );
}

#[test]
fn run_sinks_are_checked() {
    let h = HeadConfig::new(4, 2, 32).unwrap();
    let mut s = CaseSpec::decode("sinks", h, 8, 2, 20, DType::F32);
    s.sinks = true;
    let d = s.materialise(5).unwrap();
    let mut f = CaseFile::from_case(&d);
    f.tensor("sinks").2 = vec![2, 2];
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["sinks has shape [2, 2]", "expected [4]"]);
    let mut f = CaseFile::from_case(&d);
    let t = f.tensor("sinks");
    t.1 = Dtype::F16;
    t.3.truncate(8);
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["sinks has dtype F16, expected F32"]);
}

#[test]
fn run_fp8_caches_with_scales() {
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for (i, kv) in DType::FP8.into_iter().enumerate() {
        for (j, q) in [DType::BF16, DType::F32].into_iter().enumerate() {
            let seed = 100 + 10 * i as u64 + j as u64;
            let mut dec = CaseSpec::decode("fp8 decode", h, 16, 3, 100, q);
            dec.requests = vec![(1, 100), (1, 0), (1, 33)];
            dec.fp8 = Some(Fp8Spec {
                dtype: kv,
                per_head: false,
            });
            round_trip(&dec, seed, "2");
            let mut pre = dec.clone();
            pre.name = "fp8 prefill causal per-head scales".into();
            pre.decode = false;
            pre.requests = vec![(9, 40), (3, 3), (20, 70)];
            pre.options.causal = true;
            pre.fp8 = Some(Fp8Spec {
                dtype: kv,
                per_head: true,
            });
            round_trip(&pre, seed + 5, "2");
        }
    }
}

#[test]
fn run_fp8_inputs_are_checked() {
    let h = HeadConfig::new(4, 2, 32).unwrap();
    let mut s = CaseSpec::decode("fp8", h, 8, 2, 20, DType::BF16);
    s.fp8 = Some(Fp8Spec {
        dtype: DType::E4M3Fn,
        per_head: true,
    });
    let d = s.materialise(5).unwrap();
    // A scale of three values for two KV heads.
    let mut f = CaseFile::from_case(&d);
    let t = f.tensor("k_scale");
    t.2 = vec![3];
    t.3.extend(1f32.to_le_bytes());
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["k_scale has shape [3]", "[2] (num_kv_heads"]);
    // A non-positive scale, named by the library's check.
    let mut f = CaseFile::from_case(&d);
    f.tensor("v_scale").3[4..8].copy_from_slice(&(-1f32).to_le_bytes());
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["v_scale[1] = -1"]);
    // K and V of different FP8 formats.
    let mut f = CaseFile::from_case(&d);
    f.tensor("v_cache").1 = Dtype::F8_E5M2;
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["v_cache has dtype e5m2, expected e4m3fn"]);
    // Scales with a 16-bit cache: they belong to FP8 caches only.
    let mut plain = s.clone();
    plain.fp8 = None;
    let mut f = CaseFile::from_case(&plain.materialise(6).unwrap());
    f.tensors.push((
        "k_scale".into(),
        Dtype::F32,
        vec![1],
        0.5f32.to_le_bytes().to_vec(),
    ));
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["k_scale", "fp8"]);
    // A 16-bit cache of another dtype than q's.
    let mut f = CaseFile::from_case(&plain.materialise(7).unwrap());
    for n in ["k_cache", "v_cache"] {
        f.tensor(n).1 = Dtype::F16;
    }
    let (out, _o) = run_file(&f.write(), &["--threads", "1"]);
    assert_invalid(&out, &["k_cache has dtype f16, expected bf16"]);
}

/// `run --cascade` on a batch whose requests share their first pages gives the flat run's
/// output (which `run_round_trip_decode_and_prefill` checks against the f64 reference).
#[test]
fn run_cascade_matches_the_flat_run() {
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for (seed, decode, dtype) in [(3, true, DType::F32), (4, false, DType::BF16)] {
        let mut s = CaseSpec::decode("cascade", h, 8, 4, 50, dtype);
        if !decode {
            s.decode = false;
            s.requests = vec![(3, 50), (1, 41), (4, 60), (2, 45)];
            s.options.causal = true;
        }
        s.sinks = true;
        let d = s.materialise(seed).unwrap();
        let mut f = CaseFile::from_case(&d);
        // Every request's first 4 pages (32 keys) become request 0's: a shared prefix.
        let indptr = d.batch.kv_indptr().to_vec();
        let mut ids = d.batch.kv_indices().to_vec();
        for r in 1..indptr.len() - 1 {
            for p in 0..4 {
                ids[indptr[r] as usize + p] = ids[p];
            }
        }
        f.tensor("kv_indices").3 = i32_bytes(&ids);
        let input = f.write();
        let read = |extra: &[&str]| {
            let (out, output) = run_file(&input, extra);
            assert_ok(&out);
            let bytes = std::fs::read(&output).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let o = Tensor::from_le_bytes(dtype, st.tensor("o").unwrap().data()).unwrap();
            let lse: Vec<f32> = st
                .tensor("lse")
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (o.view().to_f64_vec(), lse)
        };
        let (flat_o, flat_lse) = read(&["--threads", "2"]);
        let (cas_o, cas_lse) = read(&["--threads", "2", "--cascade"]);
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        for (a, b) in flat_o.iter().zip(&cas_o) {
            assert!((a - b).abs() <= tol * (1.0 + a.abs()), "o: {a} vs {b}");
        }
        for (a, b) in flat_lse.iter().zip(&cas_lse) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "lse: {a} vs {b}");
        }
    }
    // Options a cascade does not take are refused by name, before anything is written.
    let mut s = CaseSpec::decode("cascade window", h, 8, 2, 20, DType::F32);
    s.options.window_left = Some(5);
    let input = CaseFile::from_case(&s.materialise(9).unwrap()).write();
    let (out, output) = run_file(&input, &["--cascade"]);
    assert_invalid(&out, &["window"]);
    assert!(!output.exists());
}

/// A small valid prefill case file, to break one piece at a time.
fn small_case() -> CaseFile {
    let h = HeadConfig::new(4, 2, 32).unwrap();
    let mut s = CaseSpec::decode("small", h, 8, 2, 20, DType::F32);
    s.decode = false;
    s.requests = vec![(3, 20), (2, 9)];
    CaseFile::from_case(&s.materialise(5).unwrap())
}

#[test]
fn run_small_case_is_valid() {
    let (out, output) = run_file(&small_case().write(), &["--threads", "2"]);
    assert_ok(&out);
    assert!(output.exists());
}

#[test]
fn run_invalid_inputs_name_the_tensor_or_field() {
    type Edit = Box<dyn Fn(&mut CaseFile)>;
    let cases: Vec<(Edit, Vec<&str>)> = vec![
        (Box::new(|c| c.remove("v_cache")), vec!["v_cache"]),
        (Box::new(|c| c.remove("kv_indices")), vec!["kv_indices"]),
        (Box::new(|c| c.remove("q")), vec!["\"q\""]),
        (
            Box::new(|c| {
                let t = c.tensor("v_cache");
                let n = t.2[0];
                t.2 = vec![n, 8, 1, 64];
            }),
            vec!["v_cache has shape [", ", 8, 1, 64]", ", 8, 2, 32]"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("q");
                t.2 = vec![5, 4, 16, 2];
            }),
            vec!["q has shape [5, 4, 16, 2]"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("q");
                t.2 = vec![10, 2, 32];
            }),
            vec!["q has shape [10, 2, 32]", "query rows"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("q");
                t.2 = vec![10, 1, 64];
            }),
            vec![
                "k_cache has shape [6, 8, 2, 32]",
                "head_dim 64",
                "q [10, 1, 64]",
            ],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("q");
                t.2 = vec![5, 3, 32];
                t.3.truncate(5 * 3 * 32 * 4);
            }),
            vec!["num_qo_heads (3)", "num_kv_heads (2)", "q [5, 3, 32]"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("kv_indptr");
                t.1 = Dtype::I64;
                t.2 = vec![1];
                t.3.truncate(8);
            }),
            vec!["kv_indptr has dtype I64, expected I32"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("k_cache");
                t.1 = Dtype::F16;
                t.2[3] *= 2;
            }),
            vec!["k_cache has dtype f16, expected f32"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("kv_indices");
                t.3[0..4].copy_from_slice(&1000i32.to_le_bytes());
            }),
            vec!["kv_indices[0] = 1000"],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("qo_indptr");
                t.2 = vec![2];
                t.3.truncate(8);
            }),
            vec!["qo_indptr has 2", "kv_indptr has 3"],
        ),
        (
            Box::new(|c| c.remove("qo_indptr")),
            vec!["q has shape [5, 4, 32]", "2 query rows", "decode"],
        ),
        (
            Box::new(|c| {
                c.meta.insert("causal".into(), "maybe".into());
            }),
            vec!["causal", "\"maybe\""],
        ),
        (
            Box::new(|c| {
                c.meta.insert("sm_scale".into(), "fast".into());
            }),
            vec!["sm_scale", "\"fast\""],
        ),
        (
            Box::new(|c| {
                c.meta.insert("window_left".into(), "-3".into());
            }),
            vec!["window_left = -3"],
        ),
        (
            Box::new(|c| {
                c.meta.insert("kv_layout".into(), "NDH".into());
            }),
            vec!["kv_layout", "\"NDH\""],
        ),
        (
            Box::new(|c| {
                c.meta.insert("pos_encoding".into(), "yarn".into());
            }),
            vec!["pos_encoding", "\"yarn\""],
        ),
        (
            Box::new(|c| {
                c.meta.insert("casual".into(), "true".into());
            }),
            vec!["unknown metadata key \"casual\""],
        ),
        (
            Box::new(|c| {
                let t = c.tensor("q").clone();
                c.tensors.push(("qo_indptrs".into(), t.1, t.2, t.3));
            }),
            vec!["unknown tensor \"qo_indptrs\""],
        ),
        (
            Box::new(|c| {
                // Causal prefill with more rows than keys in request 1.
                c.meta.insert("causal".into(), "true".into());
                c.tensor("kv_indptr").3 = i32_bytes(&[0, 3, 4]);
                c.tensor("kv_last_page_len").3 = i32_bytes(&[4, 1]);
            }),
            vec!["request 1 has qo_len 2 > kv_len 1"],
        ),
    ];
    for (i, (edit, needles)) in cases.iter().enumerate() {
        let mut c = small_case();
        edit(&mut c);
        let (out, output) = run_file(&c.write(), &["--threads", "2"]);
        assert!(out.status.code() == Some(2), "case {i}: {}", stderr(&out));
        assert_invalid(&out, needles);
        assert!(!output.exists(), "case {i}: no output on error");
    }

    // Garbage, truncated and missing files.
    let good = small_case().bytes();
    for (name, bytes) in [
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("empty", Vec::new()),
        ("truncated", good[..good.len() - 7].to_vec()),
        ("header only", good[..40].to_vec()),
    ] {
        let (out, _) = run_file(&write_tmp("bad.safetensors", &bytes), &[]);
        assert!(out.status.code() == Some(2), "{name}: {}", stderr(&out));
        assert_invalid(&out, &["not a valid safetensors file"]);
    }
    let (out, _) = run_file(Path::new("/nonexistent/case.safetensors"), &[]);
    assert_invalid(&out, &["/nonexistent/case.safetensors"]);

    // Flags.
    let input = small_case().write();
    assert_invalid(&run_file(&input, &["--threads", "0"]).0, &["--threads"]);
    assert_invalid(
        &run_file(&input, &["--threads", "-1"]).0,
        &["invalid value '-1' for '--threads"],
    );
    let (out, _) = run_file(&input, &["--backend", "cuda"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("error: the cuda backend is not available"));
    let (out, _) = run_file(&input, &["--threads", "2"]);
    assert_ok(&out);
    // An output in a missing directory is invalid input (2), found before running.
    let out = flashpage(&[
        "run",
        "--input",
        input.to_str().unwrap(),
        "--output",
        "/nonexistent/dir/out.safetensors",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("/nonexistent/dir/out.safetensors"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// Corrupting any bytes of a valid case file never panics the binary.
    #[test]
    fn run_never_panics_on_corrupted_files(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = small_case().bytes();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let (out, _) = run_file(&write_tmp("fuzz.safetensors", &bytes), &["--threads", "1"]);
        assert_clean_exit(&out, "corrupted case file");
    }
}

#[test]
fn run_empty_batch_writes_empty_outputs() {
    let h = HeadConfig::new(4, 2, 32).unwrap();
    let mut s = CaseSpec::decode("empty", h, 8, 0, 0, DType::BF16);
    s.requests.clear();
    let (out, output) = run_file(
        &CaseFile::from_case(&s.materialise(9).unwrap()).write(),
        &["--threads", "2"],
    );
    assert_ok(&out);
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("o").unwrap().shape(), &[0, 4, 32]);
    assert_eq!(st.tensor("o").unwrap().dtype(), Dtype::BF16);
    assert_eq!(st.tensor("lse").unwrap().shape(), &[0, 4]);
}

#[test]
fn usage_errors_are_one_error_line_with_status_2() {
    let cases: [(&[&str], &str); 4] = [
        (&["plan"], "--batch"),
        (&["workspace", "--max-batch", "-1"], "--max-batch"),
        (&["bogus"], "bogus"),
        (&["run", "--input", "x.safetensors"], "--output"),
    ];
    for (args, needle) in cases {
        let o = flashpage(args);
        assert_invalid(&o, &[needle]);
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
    }
    assert_ok(&flashpage(&["--version"]));
    assert_ok(&flashpage(&["plan", "--help"]));
}

/// `plan --cascade`: a decode batch of four requests, three of which share three full
/// pages, is planned as two levels; the shared pages are referenced once.
#[test]
fn plan_cascade_finds_the_shared_prefix() {
    let b = json!({"kind": "decode", "num_qo_heads": 8, "num_kv_heads": 2, "head_dim": 64,
        "page_size": 16, "num_pages": 32,
        "kv_indptr": [0, 4, 9, 13, 15],
        "kv_indices": [7, 8, 9, 1, 7, 8, 9, 2, 3, 7, 8, 9, 4, 5, 6],
        "kv_last_page_len": [3, 16, 1, 9]});
    let path = write_tmp("cascade.json", b.to_string().as_bytes());
    let p = path.to_str().unwrap();
    let o = flashpage(&["plan", "--batch", p, "--json", "--cascade"]);
    assert_ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let c = &v["cascade"];
    assert_eq!(c["flat_pages"], 15);
    assert_eq!(c["pages_referenced"], 15 - 2 * 3);
    let levels = c["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    // Level 0: the run of three sharers (3 rows, 3 pages) and request 3 alone (no pages).
    assert_eq!(
        (us(&levels[0], "requests"), us(&levels[0], "query_rows")),
        (2, 4)
    );
    assert_eq!(us(&levels[0], "pages"), 3);
    assert_eq!(
        (us(&levels[1], "requests"), us(&levels[1], "pages")),
        (4, 6)
    );
    assert!(us(c, "float_bytes_f32") > us(c, "float_bytes_16bit"));
    // The summary names the levels; the flat plan is reported as before.
    let o = flashpage(&["plan", "--batch", p, "--cascade"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(
        out.contains("cascade: 2 levels; pages referenced 9 of the flat batch's 15"),
        "{out}"
    );
    // A cascade refuses a window by name.
    let mut w = b.clone();
    w["window_left"] = json!(8);
    let path = write_tmp("cascade-window.json", w.to_string().as_bytes());
    assert_invalid(
        &flashpage(&["plan", "--batch", path.to_str().unwrap(), "--cascade"]),
        &["window_left"],
    );
}
