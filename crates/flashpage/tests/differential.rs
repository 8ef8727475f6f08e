//! Differential tests: random batches on the CPU backend, at every SIMD level this machine
//! has, against the f64 reference. Inputs are fresh random values on a paged cache whose
//! pages are shuffled; outputs are poisoned (NaN) before each run and must be fully written;
//! tolerances per docs/semantics.md.

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::*;
use flashpage_testkit::case::{CaseSpec, Fp8Spec, KvStorage, MaskSpec, Rng};
use proptest::prelude::*;

/// A random case and planner configuration from `seed`.
fn random_case(seed: u64) -> (CaseSpec, PlanConfig) {
    let mut rng = Rng::new(seed);
    let hkv = [1, 2, 4][rng.below(3)];
    let group = [1, 2, 3, 4, 8][rng.below(5)];
    let d = [16, 64, 128, 256, 80][rng.below(5)];
    let heads = HeadConfig::new(hkv * group, hkv, d).unwrap();
    let page_size = if rng.below(8) == 0 {
        256
    } else {
        1 + rng.below(32)
    };
    let storage = [KvStorage::Separate, KvStorage::Combined, KvStorage::Ragged][rng.below(3)];
    let decode = storage != KvStorage::Ragged && rng.below(2) == 0;
    let causal = rng.below(2) == 0;
    let batch = 1 + rng.below(5);
    // Keep the work small: fewer keys for wide heads.
    let max_kv = if d >= 128 { 160 } else { 400 };
    let requests: Vec<(usize, usize)> = (0..batch)
        .map(|_| {
            let kv = match rng.below(6) {
                0 => 0,
                1 => 1,
                2 => page_size.min(max_kv),
                _ => rng.below(max_kv + 1),
            };
            let qo = if decode {
                1
            } else {
                let q = match rng.below(4) {
                    0 => 0,
                    1 => 1,
                    _ => rng.below(24) + 1,
                };
                if causal { q.min(kv) } else { q }
            };
            (qo, kv)
        })
        .collect();
    let options = AttentionOptions::default()
        .with_causal(causal)
        .with_sm_scale((rng.below(3) == 0).then(|| 0.02 + rng.uniform().abs() as f32 * 0.3))
        .with_logits_soft_cap((rng.below(3) == 0).then(|| [1.0, 5.0, 30.0, 50.0][rng.below(4)]))
        .with_window_left(if rng.below(3) == 0 {
            Some(rng.below(40) as u32)
        } else {
            None
        })
        .with_pos_encoding(match rng.below(4) {
            0 => PosEncoding::Alibi,
            1 => PosEncoding::Rope {
                theta: [1e4, 5e5][rng.below(2)],
                scale: [1.0, 4.0][rng.below(2)],
            },
            _ => PosEncoding::None,
        })
        .with_return_lse(true);
    let input_scale = if options.logits_soft_cap.is_some() && rng.below(2) == 0 {
        6.0
    } else {
        1.0
    };
    let spec = CaseSpec {
        name: format!("seed {seed}"),
        heads,
        page_size,
        requests,
        decode,
        dtype: DType::ALL[rng.below(3)],
        layout: [KvLayout::Nhd, KvLayout::Hnd][rng.below(2)],
        storage,
        options,
        input_scale,
        sinks: rng.below(3) == 0,
        // A custom mask in a third of the cases: sparse, dense, all ones, with or without
        // rows that see nothing.
        custom_mask: (rng.below(3) == 0).then(|| MaskSpec {
            density: [0.1, 0.5, 0.9, 1.0][rng.below(4)],
            zero_row_stride: [0, 0, 2, 5][rng.below(4)],
        }),
        // An FP8 cache in one case in three: either format, per-tensor or per-head scales.
        fp8: (rng.below(3) == 0).then(|| Fp8Spec {
            dtype: DType::FP8[rng.below(2)],
            per_head: rng.below(2) == 0,
        }),
    };
    // Parallelism from 1 (no split) to 512 (split everything that is long enough).
    let mut config = PlanConfig::with_parallelism([1, 2, 8, 64, 512][rng.below(5)]);
    config.min_kv_chunk = [1, 16, 256][rng.below(3)];
    config.q_tile = [16, 64][rng.below(2)];
    let unit = if storage == KvStorage::Ragged {
        1
    } else {
        page_size
    };
    if rng.below(4) == 0 {
        config.deterministic_chunk = Some(unit * (1 + rng.below(8)));
    }
    if rng.below(4) == 0 {
        let cap = batch + rng.below(3);
        config.graph_capacity = Some(cap);
        let rows: usize = spec.requests.iter().map(|r| r.0).sum();
        config.graph_max_q_rows = Some(rows.max(cap) + rng.below(5));
        config.graph_max_kv_len = Some(max_kv);
    }
    (spec, config)
}

fn run_case(seed: u64) -> Result<(), TestCaseError> {
    let (spec, config) = random_case(seed);
    let data = spec.materialise(seed ^ 0x5EED).unwrap();
    let reference = data.reference().unwrap();
    let plan = data.plan(&config).unwrap();
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        let (o, lse) = data.run_cpu(&cpu, &config).unwrap();
        let c = data.compare(&o, &lse, &reference);
        prop_assert!(
            c.passed(),
            "{:?} {:?} split {} items {}: {c:?}\n{spec:?}\n{config:?}",
            level,
            spec.dtype,
            plan.split_kv(),
            plan.num_work_items()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn cpu_matches_reference(seed in any::<u64>()) {
        run_case(seed)?;
    }
}

/// Fixed seeds that exercise a split with a merge on every storage form, so the merge path
/// is always covered whatever proptest draws.
#[test]
fn split_cases_match_reference() {
    let mut split = 0;
    let mut seed = 1u64;
    while split < 6 && seed < 500 {
        let (spec, config) = random_case(seed);
        let data = spec.materialise(seed).unwrap();
        if data.plan(&config).unwrap().split_kv() {
            run_case(seed).unwrap();
            split += 1;
        }
        seed += 1;
    }
    assert_eq!(split, 6, "found six split cases");
}

/// Sinks of `-inf` are no sinks (bit for bit); sinks of `+inf` take all the weight
/// (`o = 0`, `lse = +inf`), split or not, at every SIMD level.
#[test]
fn infinite_sinks_are_the_limits() {
    let heads = HeadConfig::new(8, 2, 64).unwrap();
    let mut spec = CaseSpec::decode("inf sinks", heads, 16, 3, 0, DType::BF16);
    spec.requests = vec![(1, 600), (1, 0), (1, 9)];
    spec.sinks = true;
    let mut data = spec.materialise(77).unwrap();
    for p in [1, 64] {
        let mut config = PlanConfig::with_parallelism(p);
        config.min_kv_chunk = 16;
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(2, level).unwrap();
            data.sinks = None;
            let (o0, l0) = data.run_cpu(&cpu, &config).unwrap();
            data.sinks = Some(vec![f32::NEG_INFINITY; 8]);
            let (o1, l1) = data.run_cpu(&cpu, &config).unwrap();
            assert_eq!(o0.to_le_bytes(), o1.to_le_bytes(), "{level:?} p {p}");
            assert_eq!(
                l0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            data.sinks = Some(vec![f32::INFINITY; 8]);
            let (o2, l2) = data.run_cpu(&cpu, &config).unwrap();
            assert!(
                o2.view().to_f64_vec().iter().all(|&x| x == 0.0),
                "{level:?}"
            );
            assert!(l2.iter().all(|&x| x == f32::INFINITY), "{level:?}");
            let r = data.reference().unwrap();
            assert!(data.compare(&o2, &l2, &r).passed());
        }
    }
}
