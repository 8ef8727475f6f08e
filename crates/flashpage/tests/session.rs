//! The one-object wrapper and the plan behaviour it relies on: replans keep the limits of
//! `Plan::new_within`, per-layer options run on one schedule and match a plan made for them,
//! the page ids planned are the ones run, and bad inputs are typed errors.

use flashpage::half;
use flashpage::prelude::*;
use flashpage::{PlanConfig, WorkspaceLimits};

#[test]
fn replan_keeps_the_limits() {
    let heads = HeadConfig::new(4, 2, 64).unwrap();
    let limits = WorkspaceLimits::new(heads, DType::F32, 2, 64, 64, 4);
    let mut small = BatchBuilder::new(16).unwrap();
    small.push(1, 20, &[0, 1]).unwrap();
    let mut plan =
        Plan::new_within(&small.decode(heads, 64), &AttentionOptions::new(), &limits).unwrap();
    let mut big = BatchBuilder::new(16).unwrap();
    for r in 0..6 {
        let pages: Vec<i32> = (0..7).map(|p| r * 7 + p).collect();
        big.push(1, 100, &pages).unwrap();
    }
    let e = plan
        .replan(&big.decode(heads, 64), &AttentionOptions::new())
        .unwrap_err();
    match e {
        Error::LimitExceeded {
            field,
            limit,
            actual,
            ..
        } => assert_eq!((field, limit, actual), ("batch_size", 2, 6)),
        other => panic!("{other:?}"),
    }
    assert_eq!(plan.batch_size(), 1, "a refused replan leaves the plan");
    assert_eq!(plan.limits(), Some(&limits));
}

#[test]
fn set_options_equals_a_plan_made_for_them() {
    let heads = HeadConfig::new(4, 2, 32).unwrap();
    let mut b = BatchBuilder::new(8).unwrap();
    b.push(5, 40, &[4, 0, 2, 1, 3]).unwrap();
    b.push(2, 9, &[5, 6]).unwrap();
    let n = 7 * 8 * 2 * 32;
    let k: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
        .collect();
    let q: Vec<f32> = (0..7 * 4 * 32)
        .map(|i| ((i * 29 % 89) as f32 / 44.0) - 1.0)
        .collect();
    let cpu = flashpage::backend::cpu::CpuBackend::new(2).unwrap();
    let config = PlanConfig::with_parallelism(16);
    let full = AttentionOptions::new().with_causal(true);
    let window = full.with_window_left(5).with_logits_soft_cap(30.0);
    let run = |plan: &Plan| {
        let mut o = vec![f32::NAN; q.len()];
        let mut ws =
            flashpage::workspace::HostWorkspace::new(plan.requirement().float.total()).unwrap();
        let kv = flashpage::backend::KvCache::paged(
            TensorRef::F32(&k),
            TensorRef::F32(&v),
            KvStrides::dense(KvLayout::Hnd, 8, 2, 32),
            7,
            b.kv_indices(),
        );
        let args = flashpage::backend::RunArgs {
            q: TensorRef::F32(&q),
            kv,
            o: TensorMut::F32(&mut o),
            lse: None,
            sinks: None,
            custom_mask: None,
        };
        cpu.run(plan, args, ws.as_bytes_mut()).unwrap();
        o
    };
    let mut shared = Plan::new(&b.prefill(heads, 7), &full, &config).unwrap();
    assert!(shared.split_kv() || shared.num_work_items() > 1);
    shared.set_options(&window).unwrap();
    let fresh = Plan::new(&b.prefill(heads, 7), &window, &config).unwrap();
    let (a, c) = (run(&shared), run(&fresh));
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(a, c);
    // Turning on the causal mask re-checks qo_len <= kv_len.
    let mut nc = BatchBuilder::new(8).unwrap();
    nc.push(10, 4, &[0]).unwrap();
    let mut p = Plan::new(&nc.prefill(heads, 7), &AttentionOptions::new(), &config).unwrap();
    assert_eq!(
        p.set_options(&full).unwrap_err().kind(),
        ErrorKind::CausalQueryLongerThanKv
    );
    assert!(!p.options().causal);
    assert_eq!(
        p.set_options(&AttentionOptions::new().with_sm_scale(-1.0))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidOption
    );
}

#[test]
fn wrapper_errors_are_typed_and_write_nothing() {
    let heads = HeadConfig::new(2, 1, 16).unwrap();
    let cache = CacheDesc::new(4, 4, KvLayout::Nhd, DType::F32);
    let mut attn = Attention::new(heads, cache, Limits::new(2, 8, 16), 1).unwrap();
    let (mut kc, mut vc) = (
        vec![0.5f32; attn.cache_elems()],
        vec![0.5f32; attn.cache_elems()],
    );
    let new = vec![1.0f32; 16];
    // Nothing planned yet.
    let r = attn.append(
        Rows::dense(TensorRef::F32(&new), 1, 1, 16).unwrap(),
        Rows::dense(TensorRef::F32(&new), 1, 1, 16).unwrap(),
        TensorMut::F32(&mut kc),
        TensorMut::F32(&mut vc),
        None,
    );
    assert_eq!(r.unwrap_err().kind(), ErrorKind::PlanMismatch);
    // A page id outside the cache is refused at plan time.
    let mut b = BatchBuilder::new(4).unwrap();
    b.push(1, 3, &[4]).unwrap();
    assert_eq!(
        attn.plan(&b, &AttentionOptions::new()).unwrap_err(),
        Error::PageIdOutOfRange {
            index: 0,
            page_id: 4,
            num_pages: 4
        }
    );
    // Beyond the limits: 9 query rows > max_q_tokens 8.
    let mut b = BatchBuilder::new(4).unwrap();
    b.push(9, 9, &[0, 1, 2]).unwrap();
    match attn.plan(&b, &AttentionOptions::new()).unwrap_err() {
        Error::LimitExceeded { field, .. } => assert_eq!(field, "query rows"),
        other => panic!("{other:?}"),
    }
    // A valid step, then a cache of the wrong dtype.
    let mut b = BatchBuilder::new(4).unwrap();
    b.push(1, 3, &[2]).unwrap();
    attn.plan(&b, &AttentionOptions::new()).unwrap();
    let mut bad = vec![half::f16::ZERO; attn.cache_elems()];
    let r = attn.append(
        Rows::dense(TensorRef::F32(&new), 1, 1, 16).unwrap(),
        Rows::dense(TensorRef::F32(&new), 1, 1, 16).unwrap(),
        TensorMut::F16(&mut bad),
        TensorMut::F32(&mut vc),
        None,
    );
    assert_eq!(r.unwrap_err().kind(), ErrorKind::DTypeMismatch);
    assert!(vc.iter().all(|&x| x == 0.5));
    // The planned page ids are the ones written and read: position 2 of page 2.
    attn.append(
        Rows::dense(TensorRef::F32(&new), 1, 1, 16).unwrap(),
        Rows::dense(TensorRef::F32(&new), 1, 1, 16).unwrap(),
        TensorMut::F32(&mut kc),
        TensorMut::F32(&mut vc),
        None,
    )
    .unwrap();
    let at = (2 * 4 + 2) * 16;
    assert!(kc[at..at + 16].iter().all(|&x| x == 1.0));
    assert_eq!(kc.iter().filter(|&&x| x == 1.0).count(), 16);
    let q = vec![0.3f32; 2 * 16];
    let mut o = vec![f32::NAN; 2 * 16];
    attn.run(LayerArgs::new(
        TensorRef::F32(&q),
        TensorRef::F32(&kc),
        TensorRef::F32(&vc),
        TensorMut::F32(&mut o),
    ))
    .unwrap();
    assert!(o.iter().all(|x| x.is_finite()));
}
