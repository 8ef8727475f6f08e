//! JSON bytes → a batch description (the schema of `flashpage plan --batch`) → validate →
//! plan → page-id check. Whatever the bytes, nothing panics and every plan is sound.
#![no_main]

use flashpage::validate::{check_batch, check_page_ids};
use flashpage::{AttentionOptions, BatchDesc, HeadConfig, PageTable, PlanConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

mod common;

/// A parse failure (the CLI reports these as `error:` lines); its content is irrelevant here.
struct Bad;

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn count(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<usize>, Bad> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => {
            let n = v.as_u64().ok_or(Bad)?;
            usize::try_from(n).map(Some).map_err(|_| Bad)
        }
    }
}

fn required(obj: &serde_json::Map<String, Value>, key: &str) -> Result<usize, Bad> {
    count(obj, key)?.ok_or(Bad)
}

fn int_array(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<Vec<i32>>, Bad> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .ok_or(Bad)?
            .iter()
            .map(|x| x.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or(Bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

fn float(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<f32>, Bad> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or(Bad),
    }
}

fn run(data: &[u8]) -> Result<(), Bad> {
    let v: Value = serde_json::from_slice(data).map_err(|_| Bad)?;
    let obj = v.as_object().ok_or(Bad)?;
    let decode = match field(obj, "kind").and_then(Value::as_str) {
        Some("decode") => true,
        Some("prefill") => false,
        _ => return Err(Bad),
    };
    let heads = HeadConfig::new(
        required(obj, "num_qo_heads")?,
        required(obj, "num_kv_heads")?,
        required(obj, "head_dim")?,
    )
    .map_err(|_| Bad)?;
    let page_size = required(obj, "page_size")?;
    let num_pages = required(obj, "num_pages")?;
    let qo_indptr = int_array(obj, "qo_indptr")?;
    let kv_indptr = int_array(obj, "kv_indptr")?.ok_or(Bad)?;
    let kv_indices = int_array(obj, "kv_indices")?.unwrap_or_default();
    let last = int_array(obj, "kv_last_page_len")?.ok_or(Bad)?;
    let window_left = match field(obj, "window_left") {
        None => -1,
        Some(w) => w.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or(Bad)?,
    };
    let opts = AttentionOptions {
        causal: match field(obj, "causal") {
            None => false,
            Some(c) => c.as_bool().ok_or(Bad)?,
        },
        sm_scale: float(obj, "sm_scale")?,
        logits_soft_cap: float(obj, "logits_soft_cap")?,
        window_left,
        ..AttentionOptions::default()
    };
    let mut config = PlanConfig::with_parallelism(count(obj, "parallelism")?.unwrap_or(2));
    config.graph_capacity = count(obj, "graph_capacity")?;
    config.deterministic_chunk = count(obj, "deterministic_chunk")?;
    if let Some(p) = count(obj, "parallelism")? {
        config.parallelism = p; // 0 reaches the planner's own check
    }
    let pages = PageTable {
        page_size,
        num_pages,
        indptr: &kv_indptr,
        last_page_len: &last,
        num_indices: kv_indices.len(),
    };
    let desc = match (decode, &qo_indptr) {
        (true, _) => BatchDesc::decode(heads, pages),
        (false, Some(qo)) => BatchDesc::prefill_paged(heads, qo, pages),
        (false, None) => return Err(Bad),
    };
    let valid = check_batch(&desc, &opts).is_ok();
    common::check_plan(&desc, &opts, &config);
    if valid {
        // Where the ids are read: either an error or every used id is in range.
        if check_page_ids(&kv_indptr, &kv_indices, num_pages).is_ok() {
            let used = *kv_indptr.last().unwrap() as usize;
            assert!(
                kv_indices[..used]
                    .iter()
                    .all(|&id| id >= 0 && (id as usize) < num_pages)
            );
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
