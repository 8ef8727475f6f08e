//! Regression tests of issue 8 through the `flashpage` binary: no data loss (output checked
//! before running, written through a temporary file), bounded reads, checked sizes, one
//! thread limit, and messages that name the argument.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

fn flashpage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashpage"))
        .args(args)
        .output()
        .expect("the flashpage binary starts")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 2, one `error:` line containing every needle, no panic.
fn assert_invalid(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error:"), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

/// A fresh directory in the temp directory, removed with its contents when dropped.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(name: &str) -> TmpDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "flashpage-rel-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// The names of the files in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A valid decode case: 2 query heads, 1 KV head, head_dim 16, page size 4, one request of
/// 6 keys in pages 1 and 0.
fn case_bytes() -> Vec<u8> {
    let (hq, hkv, d, ps, pages) = (2usize, 1usize, 16usize, 4usize, 2usize);
    let q: Vec<f32> = (0..hq * d).map(|i| (i as f32 * 0.3).sin()).collect();
    let k: Vec<f32> = (0..pages * ps * hkv * d)
        .map(|i| (i as f32 * 0.7).cos())
        .collect();
    let v: Vec<f32> = (0..pages * ps * hkv * d)
        .map(|i| (i as f32 * 0.1).sin())
        .collect();
    let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("q", Dtype::F32, vec![1, hq, d], f32_bytes(&q)),
        (
            "k_cache",
            Dtype::F32,
            vec![pages, ps, hkv, d],
            f32_bytes(&k),
        ),
        (
            "v_cache",
            Dtype::F32,
            vec![pages, ps, hkv, d],
            f32_bytes(&v),
        ),
        ("kv_indptr", Dtype::I32, vec![2], i32_bytes(&[0, 2])),
        ("kv_indices", Dtype::I32, vec![2], i32_bytes(&[1, 0])),
        ("kv_last_page_len", Dtype::I32, vec![1], i32_bytes(&[2])),
    ];
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.to_string(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = HashMap::new();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn run(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    flashpage(&args)
}

// ---- item 2: data loss ------------------------------------------------------------------

#[test]
fn run_refuses_to_overwrite_its_input() {
    let dir = TmpDir::new("same");
    let input = dir.join("case.safetensors");
    let bytes = case_bytes();
    std::fs::write(&input, &bytes).unwrap();
    // The same path, another spelling of it, a hard link and a symlink to it.
    let hard = dir.join("hard.safetensors");
    std::fs::hard_link(&input, &hard).unwrap();
    let soft = dir.join("soft.safetensors");
    std::os::unix::fs::symlink(&input, &soft).unwrap();
    let dotted = dir.0.join(".").join("case.safetensors");
    for out in [&input, &dotted, &hard, &soft] {
        let o = run(&input, out, &["--threads", "1"]);
        assert_invalid(&o, &["--output", "is the input file"]);
        assert_eq!(std::fs::read(&input).unwrap(), bytes, "the input is intact");
    }
    // The input through the symlink, the output the real file.
    let o = run(&soft, &input, &["--threads", "1"]);
    assert_invalid(&o, &["is the input file"]);
    assert_eq!(std::fs::read(&input).unwrap(), bytes);
    assert_eq!(
        dir.names(),
        ["case.safetensors", "hard.safetensors", "soft.safetensors"],
        "no temporary file left"
    );
}

#[test]
fn run_checks_the_output_path_before_running() {
    let dir = TmpDir::new("outpath");
    let input = dir.join("case.safetensors");
    std::fs::write(&input, case_bytes()).unwrap();
    // A missing directory, a directory, a device: exit 2, found before the run (the input
    // here is invalid too, so an error about it would mean the output was checked late).
    let bad_input = dir.join("bad.safetensors");
    std::fs::write(&bad_input, b"not a safetensors file").unwrap();
    for (out, needle) in [
        (dir.join("missing/out.safetensors"), "does not exist"),
        (dir.0.clone(), "is a directory"),
        (PathBuf::from("/dev/full"), "not a regular file"),
    ] {
        for inp in [&input, &bad_input] {
            let o = run(inp, &out, &["--threads", "1"]);
            assert_invalid(&o, &["--output", needle]);
        }
    }
    assert_eq!(dir.names(), ["bad.safetensors", "case.safetensors"]);
}

#[test]
fn run_reports_an_unwritable_directory_before_running() {
    // Root ignores directory permissions; a directory on a read-only mount would be needed
    // then, so this check runs only where permissions apply.
    let dir = TmpDir::new("ro");
    let input = dir.join("case.safetensors");
    std::fs::write(&input, case_bytes()).unwrap();
    let ro = dir.join("ro");
    std::fs::create_dir(&ro).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = std::fs::File::create(ro.join("probe"));
    if probe.is_ok() {
        // Permissions do not apply (root): the same refusal through a read-only filesystem
        // path instead, /proc being one everywhere.
        let _ = std::fs::remove_file(ro.join("probe"));
        let o = run(&input, Path::new("/proc/flashpage-out.safetensors"), &[]);
        assert_invalid(&o, &["--output", "cannot create"]);
    } else {
        let o = run(&input, &ro.join("out.safetensors"), &["--threads", "1"]);
        assert_invalid(&o, &["--output", "cannot create"]);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_failed_write_leaves_no_partial_output() {
    // A file-size limit of 0 makes every write fail (EFBIG, with SIGXFSZ ignored): the
    // output cannot be written. Nothing may be left behind, and
    // an existing output keeps its contents.
    let dir = TmpDir::new("efbig");
    let input = dir.join("case.safetensors");
    std::fs::write(&input, case_bytes()).unwrap();
    let output = dir.join("out.safetensors");
    let script = format!(
        "trap '' XFSZ; ulimit -f 0; exec '{}' run --input '{}' --output '{}' --threads 1",
        env!("CARGO_BIN_EXE_flashpage"),
        input.display(),
        output.display()
    );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("cannot write output file"), "{err}");
    assert_eq!(
        dir.names(),
        ["case.safetensors"],
        "no partial or temporary file"
    );
    // An existing output is replaced only by a complete one.
    std::fs::write(&output, b"previous").unwrap();
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(&o));
    assert_eq!(std::fs::read(&output).unwrap(), b"previous");
    assert_eq!(dir.names(), ["case.safetensors", "out.safetensors"]);
    // Without the limit the run succeeds and replaces it whole.
    let o = run(&input, &output, &["--threads", "1"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    assert_eq!(st.tensor("o").unwrap().shape(), &[1, 2, 16]);
    assert_eq!(dir.names(), ["case.safetensors", "out.safetensors"]);
}

#[test]
fn inputs_are_read_with_a_bound() {
    // /dev/zero never ends: plan refuses it at the JSON cap, run at its declared header
    // (a zero header length is no safetensors file). Neither may read until memory runs out.
    let t0 = std::time::Instant::now();
    let o = flashpage(&["plan", "--batch", "/dev/zero"]);
    assert_invalid(&o, &["/dev/zero", "limit of 67108864 bytes"]);
    let dir = TmpDir::new("zero");
    let o = run(Path::new("/dev/zero"), &dir.join("o.safetensors"), &[]);
    assert_invalid(&o, &["/dev/zero", "safetensors"]);
    assert!(t0.elapsed().as_secs() < 60);
    // A header that declares more data than the file holds is refused before reading it.
    let mut bytes = case_bytes();
    bytes.truncate(bytes.len() - 4);
    let input = dir.join("short.safetensors");
    std::fs::write(&input, &bytes).unwrap();
    let o = run(&input, &dir.join("o.safetensors"), &[]);
    assert_invalid(&o, &["declares", "the file has"]);
    // A stream declaring a gigantic header is refused at the format's header limit.
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let input = dir.join("huge.safetensors");
    std::fs::write(&input, &huge).unwrap();
    let o = run(&input, &dir.join("o.safetensors"), &[]);
    assert_invalid(&o, &["header", "limit"]);
}

// ---- item 3: garbage sizes --------------------------------------------------------------

#[test]
fn workspace_with_an_absurd_max_batch_names_the_flag() {
    let o = flashpage(&[
        "workspace",
        "--num-qo-heads",
        "32",
        "--num-kv-heads",
        "8",
        "--head-dim",
        "128",
        "--max-batch",
        "461168601842738000",
        "--max-tokens",
        "8192",
        "--max-kv-len",
        "32768",
        "--parallelism",
        "264",
    ]);
    assert_invalid(&o, &["--max-batch 461168601842738000 exceeds the limit"]);
    assert!(o.stdout.is_empty());
}

fn plan_json(v: &Value) -> Output {
    let dir = TmpDir::new("plan");
    let p = dir.join("batch.json");
    std::fs::write(&p, v.to_string()).unwrap();
    flashpage(&["plan", "--batch", p.to_str().unwrap(), "--json"])
}

fn decode_batch() -> Value {
    json!({
        "kind": "decode", "num_qo_heads": 8, "num_kv_heads": 2, "head_dim": 64,
        "page_size": 16, "num_pages": 8, "kv_indptr": [0, 3], "kv_indices": [0, 1, 2],
        "kv_last_page_len": [8], "parallelism": 8
    })
}

#[test]
fn plan_with_garbage_graph_sizes_is_a_named_error() {
    let b = json!({
        "kind": "prefill", "num_qo_heads": 65534, "num_kv_heads": 65534, "head_dim": 256,
        "page_size": 1, "num_pages": 1, "qo_indptr": [0, 1], "kv_indptr": [0, 1],
        "kv_indices": [0], "kv_last_page_len": [1], "parallelism": 1, "q_tile": 65536,
        "deterministic_chunk": 1, "graph_capacity": 1, "graph_max_q_rows": 1540243000u64,
        "graph_max_kv_len": 180
    });
    let o = plan_json(&b);
    assert_invalid(&o, &["partial rows", "graph_max_q_rows"]);
    assert!(o.stdout.is_empty());
}

// ---- item 4: thread bomb ----------------------------------------------------------------

#[test]
fn thread_bombs_are_refused_before_any_thread_starts() {
    let dir = TmpDir::new("threads");
    let input = dir.join("case.safetensors");
    std::fs::write(&input, case_bytes()).unwrap();
    let t0 = std::time::Instant::now();
    for args in [
        &["check", "--threads", "100000000"][..],
        &["bench", "--threads", "100000000"][..],
        &[
            "bench",
            "--threads",
            "100000000",
            "--filter",
            "nothing-matches",
        ][..],
        &["check", "--threads", "100000000", "--filter", "decode"][..],
    ] {
        let o = flashpage(args);
        assert_invalid(&o, &["--threads 100000000 exceeds the limit 4096"]);
    }
    let o = run(
        &input,
        &dir.join("o.safetensors"),
        &["--threads", "100000000"],
    );
    assert_invalid(&o, &["--threads 100000000 exceeds the limit 4096"]);
    assert!(
        t0.elapsed().as_secs() < 30,
        "refused without starting threads"
    );
    // --filter is checked before the benchmark's threads start.
    let o = flashpage(&[
        "bench",
        "--threads",
        "4096",
        "--filter",
        "no-such-case-anywhere",
    ]);
    assert_invalid(&o, &["--filter"]);
    assert_eq!(dir.names(), ["case.safetensors"]);
}

// ---- item 8: messages that name the argument -------------------------------------------

#[test]
fn sm_scale_that_underflows_f32_says_so() {
    let mut b = decode_batch();
    b["sm_scale"] = json!(1e-50);
    let o = plan_json(&b);
    assert_invalid(&o, &["sm_scale", "underflows a 32-bit float"]);
    assert!(!stderr(&o).contains("sm_scale = 0 is invalid"));
    b["sm_scale"] = json!(1e300);
    assert_invalid(
        &plan_json(&b),
        &["sm_scale", "out of range for a 32-bit float"],
    );
    for field in ["logits_soft_cap", "rope_scale", "rope_theta"] {
        let mut b = decode_batch();
        b["pos_encoding"] = json!("rope");
        b[field] = json!(1e-60);
        assert_invalid(&plan_json(&b), &[field, "underflows"]);
    }
}

#[test]
fn graph_capacity_errors_name_graph_capacity() {
    for (cap, limit) in [(1u64 << 62, "16777216"), (10_000_000, "")] {
        let mut b = decode_batch();
        b["graph_capacity"] = json!(cap);
        let o = plan_json(&b);
        assert_invalid(
            &o,
            &[
                "graph_capacity",
                &cap.to_string(),
                "exceeds the limit",
                limit,
            ],
        );
        assert!(!stderr(&o).contains("overflows 64 bits"), "{}", stderr(&o));
    }
}

#[test]
fn decode_row_mismatch_counts_entries_in_english() {
    // kv_indptr [0] (one entry, no request) but q with one row.
    let dir = TmpDir::new("entries");
    let (hq, d) = (2usize, 16usize);
    let q = vec![0f32; hq * d];
    let kv = vec![0f32; 4 * d];
    let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("q", Dtype::F32, vec![1, hq, d], f32_bytes(&q)),
        ("k_cache", Dtype::F32, vec![1, 4, 1, d], f32_bytes(&kv)),
        ("v_cache", Dtype::F32, vec![1, 4, 1, d], f32_bytes(&kv)),
        ("kv_indptr", Dtype::I32, vec![1], i32_bytes(&[0])),
        ("kv_indices", Dtype::I32, vec![0], Vec::new()),
        ("kv_last_page_len", Dtype::I32, vec![0], Vec::new()),
    ];
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.to_string(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    let input = dir.join("case.safetensors");
    std::fs::write(&input, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = run(&input, &dir.join("o.safetensors"), &[]);
    assert_invalid(&o, &["kv_indptr has 1 entry)"]);
    assert!(!stderr(&o).contains("1 entries"), "{}", stderr(&o));
}
