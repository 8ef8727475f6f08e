//! Arbitrary index arrays, heads, options and planner settings → validate → plan; every plan
//! that comes out satisfies its invariants and its workspace bound.
#![no_main]

use arbitrary::Arbitrary;
use flashpage::validate::{check_batch, check_custom_mask, check_page_ids};
use flashpage::{WorkspaceLimits, workspace_size};
use flashpage::{
    AttentionOptions, BatchDesc, DType, HeadConfig, PageTable, Plan, PlanConfig, PosEncoding,
};
use libfuzzer_sys::fuzz_target;

mod common;

#[derive(Arbitrary, Debug)]
struct Input {
    hq: u16,
    hkv: u16,
    head_dim: u16,
    page_size: u16,
    num_pages: u32,
    kind: u8,
    qo_indptr: Vec<i32>,
    kv_indptr: Vec<i32>,
    last_page_len: Vec<i32>,
    kv_indices: Vec<i32>,
    causal: bool,
    window_left: i32,
    soft_cap: Option<f32>,
    sm_scale: Option<f32>,
    rope: Option<(f32, f32)>,
    parallelism: u16,
    graph: Option<(u16, Option<u16>, Option<u32>)>,
    deterministic_chunk: Option<u32>,
    q_tile: u16,
    min_kv_chunk: u16,
    limits: (u16, u32, u32),
    mask_indptr: Vec<i32>,
    mask_bytes: u16,
}

fuzz_target!(|inp: Input| {
    let Ok(heads) = HeadConfig::new(inp.hq as usize, inp.hkv as usize, inp.head_dim as usize)
    else {
        return;
    };
    let pages = PageTable {
        page_size: inp.page_size as usize,
        num_pages: inp.num_pages as usize,
        indptr: &inp.kv_indptr,
        last_page_len: &inp.last_page_len,
        num_indices: inp.kv_indices.len(),
    };
    let desc = match inp.kind % 3 {
        0 => BatchDesc::decode(heads, pages),
        1 => BatchDesc::prefill_paged(heads, &inp.qo_indptr, pages),
        _ => BatchDesc::prefill_ragged(heads, &inp.qo_indptr, &inp.kv_indptr),
    };
    let opts = AttentionOptions::default().with_causal(inp.causal).with_sm_scale(inp.sm_scale).with_logits_soft_cap(inp.soft_cap).with_window_left(AttentionOptions::window_from_signed(inp.window_left.into()).ok().flatten()).with_pos_encoding(match inp.rope {
            Some((theta, scale)) => PosEncoding::Rope { theta, scale },
            None => PosEncoding::None,
        }).with_return_lse(inp.causal);
    let mut config = PlanConfig::with_parallelism(inp.parallelism as usize);
    config.parallelism = inp.parallelism as usize;
    config.q_tile = inp.q_tile as usize;
    config.min_kv_chunk = inp.min_kv_chunk as usize;
    config.deterministic_chunk = inp.deterministic_chunk.map(|d| d as usize);
    if let Some((cap, q_rows, kv_len)) = inp.graph {
        config.graph_capacity = Some(cap as usize);
        config.graph_max_q_rows = q_rows.map(|q| q as usize);
        config.graph_max_kv_len = kv_len.map(|k| k as usize);
    }
    common::check_plan(&desc, &opts, &config);

    // Arbitrary limits: whenever new_within accepts, the plan fits workspace_size(limits).
    let limits = WorkspaceLimits::new(heads, DType::BF16, inp.limits.0 as usize, inp.limits.1 as usize, inp.limits.2 as usize, 1).with_config(config);
    if let Ok(plan) = Plan::new_within(&desc, &opts, &limits) {
        let bound = workspace_size(&limits).expect("sized limits");
        assert!(plan.requirement().fits_in(&bound));
    }

    // A custom mask's indptr against the batch: never a panic; when accepted, every
    // request's bits lie inside the buffer.
    if let Ok(vb) = check_batch(&desc, &opts) {
        let lens = |r: usize| {
            let q = vb.request(r);
            (q.qo_len, q.kv_len)
        };
        let bytes = inp.mask_bytes as usize;
        if check_custom_mask(&inp.mask_indptr, bytes, vb.batch_size(), lens).is_ok() {
            for r in 0..vb.batch_size() {
                let (qo, kv) = lens(r);
                let start = inp.mask_indptr[r] as usize;
                assert!(start * 8 + qo * kv <= bytes * 8);
            }
        }
    }

    if let Ok(()) = check_page_ids(&inp.kv_indptr, &inp.kv_indices, inp.num_pages as usize) {
        let used = inp.kv_indptr.last().map_or(0, |&n| n.max(0) as usize);
        assert!(
            inp.kv_indices[..used]
                .iter()
                .all(|&id| id >= 0 && (id as usize) < inp.num_pages as usize)
        );
    }
});
