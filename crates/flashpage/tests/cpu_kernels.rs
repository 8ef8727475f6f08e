//! Differential tests of the CPU kernels at every SIMD level this machine has, against the
//! f64 reference: the shapes and boundaries the vectorised kernels specialise on (group
//! sizes, head dims, page sizes, partial key blocks, masks on block boundaries, the direct
//! and the widened K/V paths), plus the public merge operators against an f64 merge.

use flashpage::backend::cpu::{
    CpuBackend, SimdLevel, merge_state, merge_state_in_place, merge_states,
};
use flashpage::*;
use flashpage_testkit::case::{CaseSpec, KvStorage, MaskSpec, Rng};
use half::bf16;

/// Runs `spec` on every level (fresh seeded inputs, poisoned outputs) and checks it.
fn check(spec: &CaseSpec, config: &PlanConfig, seed: u64) {
    let data = spec.materialise(seed).unwrap();
    let r = data.reference().unwrap();
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        let (o, lse) = data.run_cpu(&cpu, config).unwrap();
        let c = data.compare(&o, &lse, &r);
        assert!(
            c.passed(),
            "{} {:?} {:?} d={} g={} ps={} {:?}: {c:?}",
            spec.name,
            spec.dtype,
            level,
            spec.heads.head_dim(),
            spec.heads.group_size(),
            spec.page_size,
            spec.requests,
        );
    }
}

/// As [`check`], and the errors must also stay under `bound` (stricter than the dtype's
/// tolerance): the bf16 dot-product path rounds P to bf16, which must stay well inside it.
fn check_within(spec: &CaseSpec, config: &PlanConfig, seed: u64, bound: f64) {
    let data = spec.materialise(seed).unwrap();
    let r = data.reference().unwrap();
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        let (o, lse) = data.run_cpu(&cpu, config).unwrap();
        let c = data.compare(&o, &lse, &r);
        assert!(
            c.passed() && c.o_error < bound && c.lse_error < bound,
            "{} {:?} {:?} d={} g={} ps={} {:?} (bound {bound}): {c:?}",
            spec.name,
            spec.dtype,
            level,
            spec.heads.head_dim(),
            spec.heads.group_size(),
            spec.page_size,
            spec.requests,
        );
    }
}

#[test]
fn decode_bf16_long_kv_odd_keys_and_options() {
    // The AVX-512 BF16 path pairs keys for P·V (odd key counts leave a tail key), keeps its
    // accumulators in a permuted column order (head dims with a 16-column tail chunk), and
    // computes S in tiles of 16 / rows keys (4, 8 or 16) whose last partial tile repeats
    // the block's last key: the key counts leave every kind of partial tile.
    let mut seed = 500;
    for g in [1, 2, 3, 4, 6, 8] {
        for d in [64, 80, 128, 256] {
            let h = HeadConfig::new(2 * g, 2, d).unwrap();
            let mut s = CaseSpec::decode("bf16-long", h, 16, 1, 0, DType::BF16);
            s.requests = vec![
                (1, 4097),
                (1, 4096 + 33),
                (1, 1),
                (1, 3),
                (1, 31),
                (1, 64 + 13),
                (1, 32 + 6),
                (1, 2048 + 22),
            ];
            seed += 1;
            check_within(&s, &PlanConfig::with_parallelism(1), seed, 4e-3);
        }
    }
    let h = HeadConfig::new(32, 8, 128).unwrap();
    let mut s = CaseSpec::decode("bf16-opts", h, 16, 2, 0, DType::BF16);
    s.requests = vec![(1, 5000), (1, 77)];
    s.options.logits_soft_cap = Some(30.0);
    s.input_scale = 4.0;
    check_within(&s, &PlanConfig::with_parallelism(2), 601, 4e-3);
    s.options.logits_soft_cap = None;
    s.input_scale = 1.0;
    for w in [0, 33, 1000] {
        s.options.window_left = Some(w);
        check_within(&s, &PlanConfig::with_parallelism(8), 602 + w as u64, 4e-3);
    }
    s.options.window_left = None;
    s.options.pos_encoding = PosEncoding::Alibi;
    check_within(&s, &PlanConfig::with_parallelism(1), 610, 4e-3);
    // Page size 1: every key of a pair on its own (shuffled) page.
    let mut s = CaseSpec::decode("bf16-ps1", h, 1, 3, 0, DType::BF16);
    s.requests = vec![(1, 257), (1, 2), (1, 1000)];
    check_within(&s, &PlanConfig::with_parallelism(4), 611, 4e-3);
}

#[test]
fn levels_are_detected_consistently() {
    let all = SimdLevel::available();
    assert_eq!(all[0], SimdLevel::Scalar);
    assert_eq!(SimdLevel::detect(), *all.last().unwrap());
    for l in all {
        assert_eq!(SimdLevel::parse(l.name()), Some(l));
        assert_eq!(CpuBackend::with_simd(1, l).unwrap().simd(), l);
    }
}

#[test]
fn decode_group_sizes_head_dims_page_sizes() {
    let mut seed = 1;
    // Group sizes cover every row-tile split of the microkernels (4, 2 and 1 rows).
    for g in [1, 2, 3, 4, 6, 8] {
        for d in [64, 80, 128, 256] {
            for ps in [1, 16, 256] {
                for dtype in DType::ALL {
                    let h = HeadConfig::new(2 * g, 2, d).unwrap();
                    let mut s = CaseSpec::decode("decode", h, ps, 1, 0, dtype);
                    // Key counts around the 32-key block: partial, exact, one over, empty.
                    s.requests = vec![(1, 33), (1, 32), (1, 0), (1, 1), (1, 95), (1, 300)];
                    seed += 1;
                    check(&s, &PlanConfig::with_parallelism(1), seed);
                }
            }
        }
    }
}

#[test]
fn decode_split_kv_and_layouts() {
    let h = HeadConfig::new(32, 8, 128).unwrap();
    for dtype in DType::ALL {
        for (layout, storage) in [
            (KvLayout::Nhd, KvStorage::Separate),
            (KvLayout::Hnd, KvStorage::Separate),
            (KvLayout::Hnd, KvStorage::Combined),
        ] {
            let mut s = CaseSpec::decode("split", h, 16, 3, 1000, dtype);
            s.layout = layout;
            s.storage = storage;
            s.requests = vec![(1, 1000), (1, 17), (1, 513)];
            check(&s, &PlanConfig::with_parallelism(64), 11);
        }
    }
}

#[test]
fn decode_soft_cap_alibi_window_on_block_boundaries() {
    let h = HeadConfig::new(16, 2, 128).unwrap();
    for dtype in DType::ALL {
        let mut s = CaseSpec::decode("opts", h, 16, 2, 200, dtype);
        s.requests = vec![(1, 200), (1, 64)];
        s.options.logits_soft_cap = Some(50.0);
        s.input_scale = 4.0;
        check(&s, &PlanConfig::with_parallelism(1), 21);
        s.options.logits_soft_cap = None;
        s.input_scale = 1.0;
        // Windows ending inside, at and just past a block boundary.
        for w in [0, 31, 32, 33, 100] {
            s.options.window_left = Some(w);
            check(&s, &PlanConfig::with_parallelism(4), 22 + w as u64);
        }
        s.options.window_left = None;
        s.options.pos_encoding = PosEncoding::Alibi;
        check(&s, &PlanConfig::with_parallelism(1), 23);
    }
}

#[test]
fn prefill_tiles_and_causal_boundaries() {
    let mut seed = 100;
    for (hq, hkv, d) in [(4, 4, 64), (8, 2, 80), (8, 1, 128), (4, 2, 256)] {
        let h = HeadConfig::new(hq, hkv, d).unwrap();
        for dtype in DType::ALL {
            for q_tile in [1, 3, 16, 64] {
                let mut s = CaseSpec::decode("prefill", h, 16, 1, 0, dtype);
                s.decode = false;
                s.options.causal = true;
                // qo_len = kv_len, qo_len < kv_len, rows not a multiple of the register tile.
                s.requests = vec![(37, 37), (5, 70), (1, 1), (0, 0), (66, 129)];
                let mut cfg = PlanConfig::with_parallelism(2);
                cfg.q_tile = q_tile;
                seed += 1;
                check(&s, &cfg, seed);
            }
        }
    }
}

/// Long prefills whose consecutive q tiles the backend runs as one merged tile (the unit
/// test `long_prefills_merge_consecutive_q_tiles` checks that this batch merges; docs/perf/
/// cpu.md step 11), with every option a tile applies per row, on every level.
#[test]
fn prefill_merged_q_tiles() {
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let mut seed = 400;
    for dtype in DType::ALL {
        let mut s = CaseSpec::decode("prefill-merged", h, 16, 1, 0, dtype);
        s.decode = false;
        s.requests = vec![(300, 700), (130, 130), (70, 90)];
        s.options.causal = true;
        s.sinks = true;
        let cfg = PlanConfig::with_parallelism(2);
        let variants: [fn(&mut CaseSpec); 5] = [
            |_| {},
            |s| {
                s.options.window_left = Some(100);
                s.options.logits_soft_cap = Some(20.0);
                s.input_scale = 3.0;
            },
            |s| s.options.pos_encoding = PosEncoding::ROPE_DEFAULT,
            |s| s.options.pos_encoding = PosEncoding::Alibi,
            |s| {
                s.custom_mask = Some(MaskSpec {
                    density: 0.6,
                    zero_row_stride: 7,
                })
            },
        ];
        for v in variants {
            let mut c = s.clone();
            v(&mut c);
            seed += 1;
            check(&c, &cfg, seed);
        }
    }
}

#[test]
fn prefill_options_and_storage() {
    let h = HeadConfig::new(8, 2, 128).unwrap();
    for dtype in DType::ALL {
        let mut s = CaseSpec::decode("prefill-opts", h, 1, 1, 0, dtype);
        s.decode = false;
        s.requests = vec![(40, 100), (33, 33)];
        for storage in [KvStorage::Separate, KvStorage::Ragged] {
            s.storage = storage;
            s.options.causal = false;
            check(&s, &PlanConfig::with_parallelism(8), 31);
            s.options.causal = true;
            s.options.window_left = Some(32);
            s.options.logits_soft_cap = Some(30.0);
            s.input_scale = 3.0;
            check(&s, &PlanConfig::with_parallelism(8), 32);
            s.options.pos_encoding = PosEncoding::ROPE_DEFAULT;
            check(&s, &PlanConfig::with_parallelism(1), 33);
            s.options.pos_encoding = PosEncoding::Alibi;
            s.options.logits_soft_cap = None;
            s.input_scale = 1.0;
            check(&s, &PlanConfig::with_parallelism(3), 34);
            s.options = AttentionOptions::default();
        }
    }
}

/// f64 merge of states `(o_i, lse_i)`.
fn merge_f64(states: &[(Vec<f64>, f64)], d: usize) -> (Vec<f64>, f64) {
    let mx = states.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let mut o = vec![0.0; d];
    let mut sum = 0.0;
    for (v, l) in states {
        let w = (l - mx).exp();
        sum += w;
        for (a, x) in o.iter_mut().zip(v) {
            *a += w * x;
        }
    }
    o.iter_mut().for_each(|a| *a /= sum);
    (o, mx + sum.ln())
}

/// Random LSEs, with about one in five empty (`-inf`).
fn random_lse(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if rng.below(5) == 0 {
                f32::NEG_INFINITY
            } else {
                (rng.uniform() * 20.0) as f32
            }
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}[{i}] is NaN");
        if w.is_infinite() {
            assert_eq!(g, w, "{what}[{i}]");
        } else {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn merge_state_matches_f64() {
    let mut rng = Rng::new(5);
    let (n, d) = (37, 24);
    let va: Vec<f32> = (0..n * d).map(|_| rng.uniform() as f32).collect();
    let vb: Vec<f32> = (0..n * d).map(|_| rng.uniform() as f32).collect();
    let mut sa = random_lse(&mut rng, n);
    let mut sb = random_lse(&mut rng, n);
    // Two empty states, and a huge LSE gap.
    sa[0] = f32::NEG_INFINITY;
    sb[0] = f32::NEG_INFINITY;
    sa[1] = 80.0;
    sb[1] = -80.0;
    let mut vo = vec![f32::NAN; n * d];
    let mut so = vec![f32::NAN; n];
    merge_state(&va, &sa, &vb, &sb, d, &mut vo, &mut so).unwrap();
    for i in 0..n {
        let st = |v: &[f32], s: &[f32]| {
            let row = v[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect();
            (row, s[i] as f64)
        };
        let (o, l) = merge_f64(&[st(&va, &sa), st(&vb, &sb)], d);
        let got: Vec<f64> = vo[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect();
        assert_close(&got, &o, 1e-6, "o");
        assert_close(&[so[i] as f64], &[l], 1e-6, "lse");
    }
    assert!(vo[..d].iter().all(|&x| x == 0.0));
    assert_eq!(so[0], f32::NEG_INFINITY);
}

#[test]
fn merge_state_in_place_respects_mask() {
    let mut rng = Rng::new(6);
    let (rows, heads, d) = (9, 3, 16);
    let n = rows * heads;
    let v0: Vec<bf16> = (0..n * d).map(|_| bf16::from_f64(rng.uniform())).collect();
    let vo: Vec<bf16> = (0..n * d).map(|_| bf16::from_f64(rng.uniform())).collect();
    let s0 = random_lse(&mut rng, n);
    let so = random_lse(&mut rng, n);
    let mask: Vec<bool> = (0..rows).map(|r| r % 3 != 1).collect();
    let (mut v, mut s) = (v0.clone(), s0.clone());
    merge_state_in_place(&mut v, &mut s, &vo, &so, Some(&mask), heads, d).unwrap();
    for (r, &keep) in mask.iter().enumerate() {
        for h in 0..heads {
            let i = r * heads + h;
            let span = i * d..(i + 1) * d;
            if !keep {
                assert_eq!(&v[span.clone()], &v0[span], "masked row {r} changed");
                assert_eq!(s[i].to_bits(), s0[i].to_bits());
                continue;
            }
            let st = |v: &[bf16], s: &[f32]| {
                let row = v[span.clone()].iter().map(|x| x.to_f64()).collect();
                (row, s[i] as f64)
            };
            let (o, l) = merge_f64(&[st(&v0, &s0), st(&vo, &so)], d);
            let got: Vec<f64> = v[span.clone()].iter().map(|x| x.to_f64()).collect();
            assert_close(&got, &o, 8e-3, "o");
            assert_close(&[s[i] as f64], &[l], 1e-6, "lse");
        }
    }
    // Without a mask every row merges.
    let (mut v2, mut s2) = (v0.clone(), s0.clone());
    merge_state_in_place(&mut v2, &mut s2, &vo, &so, None, heads, d).unwrap();
    assert_ne!(v2, v0);
}

#[test]
fn merge_states_matches_f64() {
    let mut rng = Rng::new(7);
    let (rows, k, heads, d) = (5, 4, 3, 32);
    let v: Vec<f32> = (0..rows * k * heads * d)
        .map(|_| rng.uniform() as f32)
        .collect();
    let mut s = random_lse(&mut rng, rows * k * heads);
    // Row 0, head 0: every state empty.
    for st in 0..k {
        s[st * heads] = f32::NEG_INFINITY;
    }
    let mut vo = vec![f32::NAN; rows * heads * d];
    let mut so = vec![f32::NAN; rows * heads];
    merge_states(&v, &s, k, heads, d, &mut vo, &mut so).unwrap();
    for r in 0..rows {
        for h in 0..heads {
            let states: Vec<(Vec<f64>, f64)> = (0..k)
                .map(|st| {
                    let i = (r * k + st) * heads + h;
                    let row = v[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect();
                    (row, s[i] as f64)
                })
                .collect();
            let (o, l) = merge_f64(&states, d);
            let i = r * heads + h;
            let got: Vec<f64> = vo[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect();
            assert_close(&got, &o, 1e-6, "o");
            assert_close(&[so[i] as f64], &[l], 1e-6, "lse");
        }
    }
    assert_eq!(so[0], f32::NEG_INFINITY);
    assert!(vo[..d].iter().all(|&x| x == 0.0));
}

#[test]
fn merge_operators_reject_bad_shapes() {
    let v = [0.0f32; 8];
    let s = [0.0f32; 2];
    let (mut vo, mut so) = ([0.0f32; 8], [0.0f32; 2]);
    let e = merge_state(&v, &s, &v[..6], &s, 4, &mut vo, &mut so).unwrap_err();
    assert_eq!(
        e.to_string(),
        "v_b has shape [6], expected [2, 4] (8 elements)"
    );
    let e = merge_state(&v, &s, &v, &s, 0, &mut vo, &mut so).unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
    let e = merge_states(&v, &s, 3, 1, 4, &mut vo[..4], &mut so[..1]).unwrap_err();
    assert!(e.to_string().starts_with("s has shape [2]"), "{e}");
    let e = merge_states(&v, &s, 2, 3, 4, &mut vo, &mut so).unwrap_err();
    assert_eq!(
        e.to_string(),
        "s_out has shape [2], expected [rows, 3] (a multiple of 3 elements)"
    );
    let e = merge_state_in_place(&mut vo, &mut so, &v, &s, Some(&[true]), 1, 4).unwrap_err();
    assert!(e.to_string().starts_with("mask has shape"), "{e}");
}
