//! Custom (bit-packed) attention masks on the CPU backend at every SIMD level: random masks
//! against the f64 reference (decode and prefill, with causal and the window, split and
//! unsplit), an all-ones mask bit for bit equal to no mask, rows that see nothing (o = 0,
//! lse = -inf exactly), masked keys holding infinities and NaN (they contribute nothing), and
//! a speculative-decoding tree of 8 draft tokens against the reference and against each
//! root-to-leaf path run as its own causal request.

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::validate::check_batch;
use flashpage::*;
use flashpage_testkit::case::{CaseData, CaseSpec, Input, KvStorage, MaskSpec};
use flashpage_testkit::mask::PackedMask;
use flashpage_testkit::reference::kv_offset;

fn spec(name: &str, requests: Vec<(usize, usize)>, decode: bool, dtype: DType) -> CaseSpec {
    let mut s = CaseSpec::decode(name, HeadConfig::new(8, 2, 64).unwrap(), 16, 1, 1, dtype);
    s.requests = requests;
    s.decode = decode;
    s
}

fn check_all_levels(data: &CaseData, configs: &[PlanConfig]) {
    let r = data.reference().unwrap();
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        for config in configs {
            let (o, lse) = data.run_cpu(&cpu, config).unwrap();
            let c = data.compare(&o, &lse, &r);
            assert!(
                c.passed(),
                "{} {:?} {:?} parallelism {}: {c:?}",
                data.spec.name,
                level,
                data.spec.dtype,
                config.parallelism
            );
        }
    }
}

fn configs() -> Vec<PlanConfig> {
    let mut split = PlanConfig::with_parallelism(64);
    split.min_kv_chunk = 16;
    vec![PlanConfig::with_parallelism(1), split]
}

#[test]
fn random_masks_match_reference() {
    let options = [
        AttentionOptions::default(),
        AttentionOptions::default().with_causal(true),
        AttentionOptions::default()
            .with_causal(true)
            .with_window_left(Some(20)),
        AttentionOptions::default()
            .with_logits_soft_cap(Some(30.0))
            .with_pos_encoding(PosEncoding::Alibi),
        AttentionOptions::default().with_pos_encoding(PosEncoding::Rope {
            theta: 1e4,
            scale: 1.0,
        }),
    ];
    for (n, opts) in options.iter().enumerate() {
        for dtype in DType::ALL {
            for (density, zero) in [(0.5, 0), (0.9, 3), (0.05, 0)] {
                let mut p = spec(
                    "prefill",
                    vec![(7, 70), (1, 33), (0, 5), (20, 100), (3, 3)],
                    false,
                    dtype,
                );
                p.options = *opts;
                p.custom_mask = Some(MaskSpec {
                    density,
                    zero_row_stride: zero,
                });
                check_all_levels(&p.materialise(n as u64 * 31 + 7).unwrap(), &configs());
                let mut d = spec(
                    "decode",
                    vec![(1, 200), (1, 0), (1, 31), (1, 64)],
                    true,
                    dtype,
                );
                d.options = *opts;
                d.custom_mask = p.custom_mask;
                check_all_levels(&d.materialise(n as u64 * 17 + 3).unwrap(), &configs());
            }
        }
    }
}

#[test]
fn all_ones_mask_equals_no_mask_bit_for_bit() {
    for decode in [false, true] {
        for dtype in DType::ALL {
            let requests = if decode {
                vec![(1, 150), (1, 7)]
            } else {
                vec![(9, 150), (4, 7)]
            };
            let mut s = spec("ones", requests, decode, dtype);
            s.options = AttentionOptions::default().with_causal(true);
            s.custom_mask = Some(MaskSpec {
                density: 1.0,
                zero_row_stride: 0,
            });
            let masked = s.materialise(5).unwrap();
            let mut plain = masked.clone();
            plain.custom_mask = None;
            for level in SimdLevel::available() {
                let cpu = CpuBackend::with_simd(2, level).unwrap();
                for config in configs() {
                    let (o1, l1) = masked.run_cpu(&cpu, &config).unwrap();
                    let (o2, l2) = plain.run_cpu(&cpu, &config).unwrap();
                    assert_eq!(o1.to_le_bytes(), o2.to_le_bytes(), "{level:?} {dtype:?}");
                    let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&l1), bits(&l2), "{level:?} {dtype:?}");
                }
            }
        }
    }
}

#[test]
fn rows_that_see_nothing_are_empty_and_masked_keys_contribute_nothing() {
    for decode in [false, true] {
        let requests = if decode {
            vec![(1, 90), (1, 40)]
        } else {
            vec![(6, 90), (5, 40)]
        };
        let s = spec("holes", requests.clone(), decode, DType::F32);
        let mut data = s.materialise(11).unwrap();
        // Request 0: every row hides keys 3 and 40 (their K and V are infinite / NaN); row
        // 1 (decode: none) sees nothing. Request 1: row 0 sees only key 39.
        let masks: Vec<Vec<bool>> = requests
            .iter()
            .enumerate()
            .map(|(r, &(qo, kv))| {
                (0..qo * kv)
                    .map(|e| {
                        let (i, j) = (e / kv, e % kv);
                        match r {
                            0 => j != 3 && j != 40 && (decode || i != 1),
                            _ => i != 0 || j == 39,
                        }
                    })
                    .collect()
            })
            .collect();
        data.custom_mask = Some(PackedMask::from_requests(&masks));
        data.set_row(Input::K, 0, 3, f64::INFINITY).unwrap();
        data.set_row(Input::V, 0, 3, f64::NAN).unwrap();
        data.set_row(Input::K, 0, 40, f64::NAN).unwrap();
        data.set_row(Input::V, 0, 40, f64::NEG_INFINITY).unwrap();
        let r = data.reference().unwrap();
        let hq = s.heads.num_qo_heads();
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(2, level).unwrap();
            for config in configs() {
                let (o, lse) = data.run_cpu(&cpu, &config).unwrap();
                let c = data.compare(&o, &lse, &r);
                assert!(c.passed(), "{level:?} decode {decode}: {c:?}");
                if !decode {
                    // Row 1 of request 0: no key, o = 0 and lse = -inf exactly.
                    let d = s.heads.head_dim();
                    let ov = o.view();
                    for x in 0..hq * d {
                        assert_eq!(ov.get_f64(hq * d + x).to_bits(), 0f64.to_bits());
                    }
                    for h in 0..hq {
                        assert_eq!(lse[hq + h], f32::NEG_INFINITY);
                    }
                }
            }
        }
    }
}

/// A speculative-decoding tree of 8 draft tokens after a prefix of `PREFIX` tokens: draft
/// token `t` has parent `PARENT[t]` (`-1`: the prefix), and sees the prefix, its ancestors
/// and itself.
const PREFIX: usize = 37;
const PARENT: [i32; 8] = [-1, 0, 0, 1, 1, 2, 3, 5];

fn tree_mask() -> Vec<bool> {
    let kv = PREFIX + 8;
    let mut m = vec![false; 8 * kv];
    for i in 0..8 {
        m[i * kv..i * kv + PREFIX].fill(true);
        let mut a = i as i32;
        while a >= 0 {
            m[i * kv + PREFIX + a as usize] = true;
            a = PARENT[a as usize];
        }
    }
    m
}

/// Root-to-leaf paths of the tree.
fn paths() -> Vec<Vec<usize>> {
    let leaves = (0..8i32).filter(|i| !PARENT.contains(i));
    leaves
        .map(|leaf| {
            let mut p = vec![];
            let mut a = leaf;
            while a >= 0 {
                p.push(a as usize);
                a = PARENT[a as usize];
            }
            p.reverse();
            p
        })
        .collect()
}

#[test]
fn speculative_tree_matches_reference_and_its_paths() {
    assert_eq!(
        paths(),
        vec![vec![0, 1, 4], vec![0, 1, 3, 6], vec![0, 2, 5, 7]]
    );
    for causal in [false, true] {
        for dtype in [DType::F32, DType::BF16] {
            // One request: 8 query rows (the draft tokens) over prefix + drafts; a second,
            // unmasked-looking request (all ones) shares the batch.
            let mut s = spec("tree", vec![(8, PREFIX + 8), (3, 20)], false, dtype);
            s.options = AttentionOptions::default().with_causal(causal);
            let mut tree = s.materialise(2024).unwrap();
            tree.custom_mask = Some(PackedMask::from_requests(&[tree_mask(), vec![true; 60]]));
            check_all_levels(&tree, &configs());

            // Each root-to-leaf path as its own causal request over prefix + path tokens.
            let ps = paths();
            let reqs: Vec<(usize, usize)> =
                ps.iter().map(|p| (p.len(), PREFIX + p.len())).collect();
            let mut ps_spec = spec("paths", reqs, false, dtype);
            ps_spec.storage = KvStorage::Ragged;
            ps_spec.options = AttentionOptions::default().with_causal(true);
            let mut path = ps_spec.materialise(1).unwrap();
            let (hq, hkv, d) = (8, 2, 64);
            let tvb = check_batch(&tree.desc(), &tree.options()).unwrap();
            let treq = tvb.request(0);
            let tkv = tree.kv_cache();
            let st = path.strides;
            let mut q = path.q.view().to_f64_vec();
            let mut k = path.k.view().to_f64_vec();
            let mut v = path.v.view().to_f64_vec();
            let tq = tree.q.view();
            let mut row = 0;
            let mut tok = 0;
            for p in &ps {
                let keys: Vec<usize> = (0..PREFIX).chain(p.iter().map(|&a| PREFIX + a)).collect();
                for &kt in &keys {
                    for h in 0..hkv {
                        let src =
                            kv_offset(&tvb, &tkv.strides, tkv.kv_indices, treq.kv_start, kt, h);
                        for x in 0..d {
                            k[tok * st.page + h * st.head + x] = tkv.k.get_f64(src + x);
                            v[tok * st.page + h * st.head + x] = tkv.v.get_f64(src + x);
                        }
                    }
                    tok += 1;
                }
                for &a in p {
                    for x in 0..hq * d {
                        q[row * hq * d + x] = tq.get_f64((treq.qo_start + a) * hq * d + x);
                    }
                    row += 1;
                }
            }
            path.q = Tensor::from_f64(dtype, &q);
            path.k = Tensor::from_f64(dtype, &k);
            path.v = Tensor::from_f64(dtype, &v);
            check_all_levels(&path, &configs());

            for level in SimdLevel::available() {
                let cpu = CpuBackend::with_simd(2, level).unwrap();
                let config = PlanConfig::with_parallelism(1);
                let (to, tl) = tree.run_cpu(&cpu, &config).unwrap();
                let (po, pl) = path.run_cpu(&cpu, &config).unwrap();
                let (tv, pv) = (to.view(), po.view());
                let mut row = 0;
                for p in &ps {
                    for &a in p {
                        let trow = treq.qo_start + a;
                        let (mut num, mut den) = (0.0, 0.0);
                        for x in 0..hq * d {
                            let (t, b) =
                                (tv.get_f64(trow * hq * d + x), pv.get_f64(row * hq * d + x));
                            num += (t - b) * (t - b);
                            den += b * b;
                        }
                        let tol = flashpage_testkit::reference::tolerance(dtype);
                        assert!(
                            (num / den).sqrt() <= tol,
                            "{level:?} {dtype:?} causal {causal}: draft {a} differs from its path"
                        );
                        for h in 0..hq {
                            let (a, b) = (tl[trow * hq + h], pl[row * hq + h]);
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "lse {a} vs {b}");
                        }
                        row += 1;
                    }
                }
            }
        }
    }
}
