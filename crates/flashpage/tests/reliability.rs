//! Regression tests of issue 8 (adversarial inputs to the public API): checked sizes, total
//! public helpers, bounded accessors, graph-mode replans that keep their promise, limits
//! that survive a replan, one thread limit, and messages that name the argument.

use flashpage::backend::cpu::{
    CpuBackend, MAX_THREADS, merge_state, merge_state_in_place, merge_states,
};
use flashpage::backend::{KvCache, RunArgs};
use flashpage::plan::MAX_GRAPH_CAPACITY;
use flashpage::workspace::HostWorkspace;
use flashpage::*;
use flashpage::{WorkspaceLimits, workspace_size};

fn heads() -> HeadConfig {
    HeadConfig::new(8, 2, 64).unwrap()
}

fn opts() -> AttentionOptions {
    AttentionOptions::default()
}

/// A graph-mode decode plan of 3 requests (capacity 4) and its batch builder.
fn graph_decode() -> (BatchBuilder, Plan) {
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(1, 40, &[0, 1, 2]).unwrap();
    b.push(1, 16, &[3]).unwrap();
    b.push(1, 5, &[4]).unwrap();
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.graph_capacity = Some(4);
    let plan = Plan::new(&b.decode(heads(), 8), &opts(), &cfg).unwrap();
    (b, plan)
}

/// Everything a captured graph depends on.
fn snapshot(
    p: &Plan,
) -> (
    Vec<i32>,
    Capacities,
    plan::PlanKind,
    bool,
    usize,
    usize,
    usize,
) {
    (
        p.int_image().to_vec(),
        *p.capacities(),
        p.kind(),
        p.is_paged(),
        p.requirement().float.total(),
        p.requirement().int.total(),
        p.batch_size(),
    )
}

use flashpage::plan::Capacities;

// ---- item 3: garbage sizes --------------------------------------------------------------

#[test]
fn workspace_size_names_an_absurd_max_batch() {
    let limits = WorkspaceLimits::new(heads(), DType::BF16, 461168601842738000, 8192, 32768, 8);
    let e = workspace_size(&limits).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "max_batch",
                limit: MAX_GRAPH_CAPACITY,
                actual: 461168601842738000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn graph_partial_rows_past_int32_are_named() {
    // Graph-mode prefill, deterministic chunk 1: partial rows = graph_max_q_rows ×
    // graph_max_kv_len (2.8e11), × 65534 heads × 256 × 4 bytes ≈ 1.8e19 bytes, which used
    // to print as a float workspace near u64::MAX and wrap the total.
    let h = HeadConfig::new(65534, 65534, 256).unwrap();
    let mut b = BatchBuilder::new(1).unwrap();
    b.push(1, 1, &[0]).unwrap();
    let mut cfg = PlanConfig::with_parallelism(1);
    cfg.q_tile = 65536;
    cfg.deterministic_chunk = Some(1);
    cfg.graph_capacity = Some(1);
    cfg.graph_max_q_rows = Some(1_540_243_000);
    cfg.graph_max_kv_len = Some(180);
    let e = Plan::new(&b.prefill(h, 1), &opts(), &cfg).unwrap_err();
    match &e {
        Error::LimitExceeded {
            field: "partial rows",
            limit,
            actual,
            ..
        } => {
            assert_eq!(*limit, i32::MAX as usize);
            assert_eq!(*actual, 1_540_243_000 * 180);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("graph_max_q_rows"), "{e}");
}

#[test]
fn workspace_size_with_absurd_partial_rows_is_named() {
    // Deterministic chunk 1 over 2^31 - 1 keys and 2^31 - 1 rows: 2^62 partial rows, a float
    // workspace past 64 bits; a typed error naming them, not an overflow or a wrapped size.
    let limits = WorkspaceLimits::new(
        HeadConfig::new(65536, 1, 256).unwrap(),
        DType::F32,
        1,
        i32::MAX as usize,
        i32::MAX as usize,
        1,
    )
    .with_config({
        let mut c = PlanConfig::with_parallelism(1);
        c.deterministic_chunk = Some(1);
        c.q_tile = 65536;
        c
    });
    let e = workspace_size(&limits).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "partial rows",
                limit: 2147483647,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("max_q_tokens"), "{e}");
}

// ---- item 5: total public helpers --------------------------------------------------------

#[test]
fn merge_helpers_with_no_rows_do_not_allocate_by_head_dim() {
    // Zero rows pass every length check: the scratch must not be sized by head_dim.
    for head_dim in [1usize << 40, usize::MAX] {
        let (mut vo, mut so) = (Vec::<f32>::new(), Vec::<f32>::new());
        merge_states::<f32>(&[], &[], 1, 1, head_dim, &mut vo, &mut so).unwrap();
        merge_state::<f32>(&[], &[], &[], &[], head_dim, &mut vo, &mut so).unwrap();
        let (mut v, mut s) = (Vec::<f32>::new(), Vec::<f32>::new());
        merge_state_in_place::<f32>(&mut v, &mut s, &[], &[], None, 1, head_dim).unwrap();
    }
}

#[test]
fn merge_helpers_with_head_dim_max_and_rows_are_shape_errors() {
    let (mut vo, mut so) = (vec![0f32; 4], vec![0f32; 1]);
    let e =
        merge_states::<f32>(&[0.0; 4], &[0.0; 1], 1, 1, usize::MAX, &mut vo, &mut so).unwrap_err();
    assert!(matches!(e, Error::TensorShape { .. }), "{e}");
    let e = merge_state::<f32>(&[0.0], &[0.0], &[0.0], &[0.0], usize::MAX, &mut vo, &mut so)
        .unwrap_err();
    assert!(matches!(e, Error::TensorShape { .. }), "{e}");
}

#[test]
fn accessors_past_the_end_are_none() {
    let (_, plan) = graph_decode();
    assert_eq!(plan.batch_size(), 3);
    assert_eq!(plan.padded_batch_size(), 4);
    // Padded requests exist (empty); past the capacity there is nothing.
    assert_eq!(plan.request(3).map(|r| r.kv_len), Some(0));
    assert!(plan.request(4).is_none());
    assert!(plan.request(usize::MAX).is_none());
    let n = plan.num_work_items();
    assert!(plan.work_item(n - 1).is_some());
    assert!(
        plan.work_item(n).is_none(),
        "a padded entry is not a work item"
    );
    assert!(plan.work_item(plan.capacities().work_items).is_none());
    assert!(plan.work_item(usize::MAX).is_none());
    assert_eq!(plan.num_merge_rows(), 0);
    assert!(plan.merge_row(0).is_none());
    assert!(plan.merge_row(usize::MAX).is_none());
    // The iterators still see exactly the batch.
    assert_eq!(plan.work_items().count(), n);
    assert!(plan.work_items().all(|w| w.request < 3));
}

// ---- item 7: graph mode keeps its promise; limits survive replan -----------------------

#[test]
fn graph_replan_refuses_another_kind_and_leaves_the_plan_unchanged() {
    let (b, mut plan) = graph_decode();
    let before = snapshot(&plan);
    let e = plan.replan(&b.prefill(heads(), 8), &opts()).unwrap_err();
    assert!(
        matches!(e, Error::PlanMismatch { .. }) && e.to_string().contains("decode"),
        "{e}"
    );
    assert!(e.to_string().contains("prefill"), "{e}");
    assert_eq!(snapshot(&plan), before);
}

#[test]
fn graph_replan_refuses_another_kv_layout_and_leaves_the_plan_unchanged() {
    let (_, mut plan) = graph_decode();
    let before = snapshot(&plan);
    // A ragged prefill batch of one row per request: decode-shaped, but ragged K/V.
    let qo = [0, 1, 2];
    let kv = [0, 10, 20];
    let ragged = BatchDesc::prefill_ragged(heads(), &qo, &kv);
    let e = plan.replan(&ragged, &opts()).unwrap_err();
    assert!(matches!(e, Error::PlanMismatch { .. }), "{e}");
    assert_eq!(snapshot(&plan), before);

    // A graph-mode ragged prefill plan refuses a paged prefill batch.
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.graph_capacity = Some(4);
    cfg.graph_max_q_rows = Some(8);
    let mut plan = Plan::new(&ragged, &opts(), &cfg).unwrap();
    let before = snapshot(&plan);
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(2, 20, &[0, 1]).unwrap();
    let e = plan.replan(&b.prefill(heads(), 4), &opts()).unwrap_err();
    assert!(
        matches!(e, Error::PlanMismatch { .. }) && e.to_string().contains("ragged"),
        "{e}"
    );
    assert_eq!(snapshot(&plan), before);
    // The captured kind and layout are still accepted.
    plan.replan(
        &BatchDesc::prefill_ragged(heads(), &[0, 2], &[0, 30]),
        &opts(),
    )
    .unwrap();
}

#[test]
fn replan_keeps_the_limits_of_new_within() {
    let limits = WorkspaceLimits::new(heads(), DType::F32, 2, 2, 64, 8);
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(1, 40, &[0, 1, 2]).unwrap();
    let mut plan = Plan::new_within(&b.decode(heads(), 64), &opts(), &limits).unwrap();
    assert_eq!(plan.limits(), Some(&limits));
    let before = snapshot(&plan);
    b.clear();
    let pages: Vec<i32> = (0..7).collect();
    for _ in 0..6 {
        b.push(1, 100, &pages).unwrap();
    }
    let e = plan.replan(&b.decode(heads(), 64), &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "batch_size",
                limit: 2,
                actual: 6,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(snapshot(&plan), before);
    // One request of 100 keys: past max_kv_len 64.
    b.clear();
    b.push(1, 100, &pages).unwrap();
    let e = plan.replan(&b.decode(heads(), 64), &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "kv_len",
                limit: 64,
                ..
            }
        ),
        "{e}"
    );
    // Within the limits: accepted, and the plan fits the bound.
    b.clear();
    b.push(1, 64, &pages[..4]).unwrap();
    plan.replan(&b.decode(heads(), 64), &opts()).unwrap();
    assert!(
        plan.requirement()
            .fits_in(&workspace_size(&limits).unwrap())
    );
}

// ---- item 4: one thread limit ----------------------------------------------------------

#[test]
fn cpu_backend_refuses_a_thread_bomb_before_starting_threads() {
    let t0 = std::time::Instant::now();
    let e = CpuBackend::new(100_000_000).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                field: "threads",
                limit: MAX_THREADS,
                actual: 100_000_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 5);
    assert!(CpuBackend::new(MAX_THREADS + 1).is_err());
}

// ---- item 8: messages that name the argument -------------------------------------------

#[test]
fn graph_capacity_errors_name_graph_capacity() {
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(1, 40, &[0, 1, 2]).unwrap();
    for cap in [1usize << 62, 10_000_000] {
        let mut cfg = PlanConfig::with_parallelism(8);
        cfg.graph_capacity = Some(cap);
        let e = Plan::new(&b.decode(heads(), 8), &opts(), &cfg).unwrap_err();
        match &e {
            Error::LimitExceeded {
                field: "graph_capacity",
                limit,
                actual,
                ..
            } => {
                assert_eq!(*actual, cap);
                assert!(*limit < cap && *limit > 0, "{e}");
            }
            other => panic!("{cap}: {other}"),
        }
        let msg = e.to_string();
        assert!(msg.starts_with("graph_capacity = "), "{msg}");
    }
    // The limit named is one that works.
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.graph_capacity = Some(10_000_000);
    let Err(Error::LimitExceeded { limit, .. }) = Plan::new(&b.decode(heads(), 8), &opts(), &cfg)
    else {
        panic!("refused above")
    };
    cfg.graph_capacity = Some(limit);
    Plan::new(&b.decode(heads(), 8), &opts(), &cfg).unwrap();
    cfg.graph_capacity = Some(limit + 1);
    assert!(Plan::new(&b.decode(heads(), 8), &opts(), &cfg).is_err());
}

fn run_with(plan: &Plan, kv: KvCache<'_>) -> Error {
    let h = plan.heads();
    let n = plan.num_q_rows() * h.num_qo_heads() * h.head_dim();
    let q = vec![0.5f32; n];
    let mut o = vec![f32::NAN; n];
    let mut ws = HostWorkspace::new(plan.requirement().float.total()).unwrap();
    let e = CpuBackend::new(1)
        .unwrap()
        .run(
            plan,
            RunArgs {
                q: TensorRef::F32(&q),
                kv,
                o: TensorMut::F32(&mut o),
                lse: None,
                sinks: None,
                custom_mask: None,
            },
            ws.as_bytes_mut(),
        )
        .unwrap_err();
    assert!(o.iter().all(|x| x.is_nan()), "nothing written on error");
    e
}

#[test]
fn kv_cache_of_the_other_kind_is_named() {
    let h = heads();
    let kv = vec![0.25f32; 64 * 16 * 2 * 64];
    // A paged plan given ragged K/V.
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(1, 40, &[0, 1, 2]).unwrap();
    let plan = Plan::new(&b.decode(h, 64), &opts(), &PlanConfig::with_parallelism(2)).unwrap();
    let e = run_with(
        &plan,
        KvCache::ragged(
            TensorRef::F32(&kv),
            TensorRef::F32(&kv),
            KvStrides::ragged(2, 64),
            64 * 16,
        ),
    );
    let msg = e.to_string();
    assert!(matches!(e, Error::PlanMismatch { .. }), "{msg}");
    assert!(
        msg.contains("kv cache kind") && msg.contains("ragged") && msg.contains("paged"),
        "{msg}"
    );
    assert!(!msg.contains("stride"), "{msg}");
    // A ragged plan given a paged cache.
    let plan = Plan::new(
        &BatchDesc::prefill_ragged(h, &[0, 2], &[0, 30]),
        &opts(),
        &PlanConfig::with_parallelism(2),
    )
    .unwrap();
    let e = run_with(
        &plan,
        KvCache::paged(
            TensorRef::F32(&kv),
            TensorRef::F32(&kv),
            KvStrides::dense(KvLayout::Nhd, 16, 2, 64),
            64,
            &[0, 1],
        ),
    );
    let msg = e.to_string();
    assert!(
        matches!(e, Error::PlanMismatch { .. }) && msg.contains("kv cache kind"),
        "{msg}"
    );
}
