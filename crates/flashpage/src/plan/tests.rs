//! Unit tests of the planner's internals (the public behaviour is covered by
//! tests/validation.rs and tests/proptest_plan.rs).

use super::*;
use crate::builder::BatchBuilder;

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
