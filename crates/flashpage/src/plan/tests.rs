//! Unit tests of the planner's internals (the public behaviour is covered by
//! tests/validation.rs and tests/proptest_plan.rs).

use super::*;
use crate::builder::BatchBuilder;
use crate::{DType, PageTable};

fn heads(hq: usize, hkv: usize) -> HeadConfig {
    HeadConfig::new(hq, hkv, 64).unwrap()
}

#[test]
fn fields_split_consecutive_slices() {
    let mut v: Vec<i32> = (0..7).collect();
    let [a, b, c] = fields::<3>(&mut v, 2);
    assert_eq!(
        (&a[..], &b[..], &c[..]),
        (&[0, 1][..], &[2, 3][..], &[4, 5][..])
    );
    let [x, y] = fields::<2>(&mut v, 0);
    assert!(x.is_empty() && y.is_empty());
}

#[test]
fn chunk_is_the_smallest_page_multiple_within_the_target() {
    // One decode request of 1000 keys, page 16, 8 KV heads, 64 slots: target 8 items, so
    // the chunk is the smallest multiple of 16 (>= min_kv_chunk 1) with ceil(1000/c) <= 8:
    // 125 rounds up to 128.
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(1, 1000, &(0..63).collect::<Vec<_>>()).unwrap();
    let mut cfg = PlanConfig::with_parallelism(64);
    cfg.min_kv_chunk = 1;
    let plan = Plan::new(
        &b.decode(heads(8, 8), 63),
        &AttentionOptions::default(),
        &cfg,
    )
    .unwrap();
    assert_eq!(plan.kv_chunk(), Some(128));
    assert_eq!(plan.num_work_items(), 8);
    assert_eq!(plan.num_partial_rows(), 8);
    // min_kv_chunk 256 wins over the target: 4 chunks.
    cfg.min_kv_chunk = 256;
    let plan = Plan::new(
        &b.decode(heads(8, 8), 63),
        &AttentionOptions::default(),
        &cfg,
    )
    .unwrap();
    assert_eq!(plan.kv_chunk(), Some(256));
    assert_eq!(plan.num_work_items(), 4);
    // A batch that fills the slots with tiles is not split.
    let plan = Plan::new(
        &b.decode(heads(8, 8), 63),
        &AttentionOptions::default(),
        &PlanConfig::with_parallelism(8),
    )
    .unwrap();
    assert_eq!(plan.kv_chunk(), None);
    assert!(!plan.split_kv());
}

#[test]
fn replan_reuses_the_image_allocation() {
    let mut b = BatchBuilder::new(16).unwrap();
    for i in 0..32 {
        b.push(1, 100 + i, &[0; 16][..(100 + i).div_ceil(16)])
            .unwrap();
    }
    let mut cfg = PlanConfig::with_parallelism(16);
    cfg.graph_capacity = Some(32);
    let opts = AttentionOptions::default();
    let mut plan = Plan::new(&b.decode(heads(8, 2), 1), &opts, &cfg).unwrap();
    let ptr = plan.int_image().as_ptr();
    b.clear();
    b.push(1, 5000, &[0; 313]).unwrap();
    b.pad_to(32).unwrap();
    plan.replan(&b.decode(heads(8, 2), 1), &opts).unwrap();
    assert_eq!(
        plan.int_image().as_ptr(),
        ptr,
        "graph replan writes in place"
    );
    assert!(plan.split_kv());
    let fresh = Plan::new(&b.decode(heads(8, 2), 1), &opts, &cfg).unwrap();
    assert_eq!(fresh.int_image(), plan.int_image());
}

/// Fuzz finding: a prefill graph of 4 rows with a deterministic chunk plans, but the decode
/// graph of the same capacity (63325 rows × 66576 chunks) passes int32. `workspace_size` must
/// size the prefill graph (the only kind that plans) rather than fail, so that limits taken
/// from a planned batch admit it.
#[test]
fn graph_limits_size_the_kind_that_plans() {
    let heads = HeadConfig::new(4, 4, 96).unwrap();
    let mut cfg = PlanConfig::with_parallelism(64);
    cfg.graph_capacity = Some(63325);
    cfg.graph_max_q_rows = Some(4);
    cfg.graph_max_kv_len = Some(1_065_216);
    cfg.deterministic_chunk = Some(16);
    let (qo, kv) = ([0i32, 1], [0i32, 100]);
    let desc = BatchDesc::prefill_ragged(heads, &qo, &kv);
    let opts = AttentionOptions::default();
    let plan = Plan::new(&desc, &opts, &cfg).unwrap();
    let limits = WorkspaceLimits::new(heads, DType::F32, 1, 1, 100, 1).with_config(cfg);
    let bound = workspace_size(&limits).unwrap();
    assert!(plan.requirement().fits_in(&bound));
    let within = Plan::new_within(&desc, &opts, &limits).unwrap();
    assert_eq!(within.int_image(), plan.int_image());
    // The decode graph of that capacity cannot plan: a named limit, not a size.
    let pages = PageTable {
        page_size: 16,
        num_pages: 1,
        indptr: &[0, 1],
        last_page_len: &[1],
        num_indices: 1,
    };
    let err = Plan::new(&BatchDesc::decode(heads, pages), &opts, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                field: "partial rows",
                ..
            }
        ),
        "{err:?}"
    );
    // Neither kind plans: the error stands.
    cfg.graph_max_q_rows = Some(63325);
    let limits = WorkspaceLimits::new(heads, DType::F32, 1, 1, 100, 1).with_config(cfg);
    assert!(matches!(
        workspace_size(&limits),
        Err(Error::LimitExceeded {
            field: "partial rows",
            ..
        })
    ));
}

/// Outside graph mode limits are sized for every batch within them: limits whose largest
/// decode batch passes int32 partial rows are a named error, unless they are for prefill
/// plans only (`with_kind`), whose bound is then sized and enforced.
#[test]
fn limits_for_one_kind_size_that_kind_only() {
    let heads = HeadConfig::new(1, 1, 16).unwrap();
    let mut cfg = PlanConfig::with_parallelism(4);
    cfg.deterministic_chunk = Some(1);
    let kv_len = 1usize << 30;
    let limits = WorkspaceLimits::new(heads, DType::F32, 2, 1, kv_len, 1).with_config(cfg);
    // Decode: 2 requests × 2^30 chunks = 2^31 partial rows.
    let e = workspace_size(&limits).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "partial rows",
                ..
            }
        ),
        "{e:?}"
    );
    let e = workspace_size(&limits.with_kind(PlanKind::Decode)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "partial rows",
                ..
            }
        ),
        "{e:?}"
    );
    // Prefill: one row × 2^30 chunks.
    let prefill = limits.with_kind(PlanKind::Prefill);
    let bound = workspace_size(&prefill).unwrap();
    let p = bound.float.buffer("partial_lse").unwrap().bytes / 4;
    assert!(p >= kv_len && p <= kv_len + 64, "{p}");
    // A small prefill batch plans within them; a decode batch is the wrong kind.
    let (qo, kv) = ([0i32, 1], [0i32, 40]);
    let plan = Plan::new_within(
        &BatchDesc::prefill_ragged(heads, &qo, &kv),
        &AttentionOptions::default(),
        &prefill,
    )
    .unwrap();
    assert!(plan.requirement().fits_in(&bound));
    let pages = PageTable {
        page_size: 16,
        num_pages: 1,
        indptr: &[0, 1],
        last_page_len: &[1],
        num_indices: 1,
    };
    let e = Plan::new_within(
        &BatchDesc::decode(heads, pages),
        &AttentionOptions::default(),
        &prefill,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::PlanMismatch {
                what: "plan kind",
                ..
            }
        ),
        "{e:?}"
    );
}
