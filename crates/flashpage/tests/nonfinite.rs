//! Non-finite inputs at every SIMD level (docs: numeric contract): a masked key contributes
//! exactly nothing whatever its V holds (NaN included), and non-finite values a row *does*
//! see propagate as IEEE arithmetic does in the f64 reference — element by element, a NaN
//! where the reference has one, the same infinity where it has one, within tolerance
//! elsewhere. (Cases whose reference has no NaN are also in the suite, numerics.toml.)

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::*;
use flashpage_testkit::case::{CaseData, CaseSpec, Input};
use flashpage_testkit::reference;

/// Runs `data` on every level and parallelism 1 and 64, comparing element by element.
fn check_ieee(data: &CaseData, what: &str) {
    let r = data.reference().unwrap();
    let h = data.spec.heads;
    let d = h.head_dim();
    let tol = reference::tolerance(data.spec.dtype);
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        for par in [1, 64] {
            let (o, lse) = data
                .run_cpu(&cpu, &PlanConfig::with_parallelism(par))
                .unwrap();
            let o = o.view().to_f64_vec();
            for (state, (&l, &rl)) in lse.iter().zip(&r.lse).enumerate() {
                let ctx = format!(
                    "{what} {:?} {level:?} par={par} state {state}",
                    data.spec.dtype
                );
                let got = &o[state * d..(state + 1) * d];
                let want = &r.o[state * d..(state + 1) * d];
                let rl = rl as f32;
                assert!(
                    (l.is_nan() && rl.is_nan()) || l == rl || (l - rl).abs() <= 1e-3 * rl.abs(),
                    "{ctx}: lse {l}, reference {rl}"
                );
                let scale = want
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(0.0f64, |m, x| m.max(x.abs()));
                for (c, (&x, &y)) in got.iter().zip(want).enumerate() {
                    let ok = if y.is_nan() {
                        x.is_nan()
                    } else if y.is_infinite() {
                        x == y
                    } else {
                        x.is_finite() && (x - y).abs() <= 10.0 * tol * scale.max(1e-30)
                    };
                    assert!(ok, "{ctx} column {c}: {x}, reference {y}");
                }
            }
        }
    }
}

fn prefill(
    name: &str,
    heads: (usize, usize, usize),
    req: (usize, usize),
    dtype: DType,
) -> CaseSpec {
    let h = HeadConfig::new(heads.0, heads.1, heads.2).unwrap();
    let mut s = CaseSpec::decode(name, h, 16, 1, 0, dtype);
    s.decode = false;
    s.requests = vec![req];
    s.options.causal = true;
    s
}

#[test]
fn masked_nan_and_inf_values_contribute_nothing() {
    let mut seed = 90;
    for dtype in DType::ALL {
        for (heads, n, key) in [
            ((4, 2, 64), 3, 2),
            ((8, 1, 128), 40, 39),
            ((4, 4, 16), 70, 64),
        ] {
            for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                seed += 1;
                let s = prefill("masked-v", heads, (n, n), dtype);
                let mut data = s.materialise(seed).unwrap();
                data.set_row(Input::V, 0, key, value).unwrap();
                // The rows before `key` cannot see it: finite, as without it.
                let r = data.reference().unwrap();
                let hq = heads.0;
                assert!(r.o[..key * hq * heads.2].iter().all(|x| x.is_finite()));
                check_ieee(&data, &format!("masked V={value} at key {key} of {n}"));
            }
        }
        // A sliding window of 0: each row sees only its own key.
        seed += 1;
        let mut s = prefill("window0", (4, 2, 64), (3, 3), dtype);
        s.options.window_left = Some(0);
        let mut data = s.materialise(seed).unwrap();
        data.set_row(Input::V, 0, 0, f64::NAN).unwrap();
        check_ieee(&data, "window 0, V=NaN at key 0");
    }
}

#[test]
fn masked_nan_keys_contribute_nothing() {
    // A masked key's K (so its score) is NaN or infinite: it is never seen.
    for dtype in DType::ALL {
        for value in [f64::NAN, f64::INFINITY] {
            let s = prefill("masked-k", (4, 2, 64), (5, 5), dtype);
            let mut data = s.materialise(7).unwrap();
            data.set_row(Input::K, 0, 4, value).unwrap();
            data.set_row(Input::V, 0, 4, value).unwrap();
            check_ieee(&data, &format!("masked K=V={value}"));
        }
    }
}

#[test]
fn visible_non_finite_inputs_propagate_as_ieee() {
    let mut seed = 300;
    for dtype in DType::ALL {
        for (input, value) in [
            (Input::V, f64::INFINITY),
            (Input::V, f64::NEG_INFINITY),
            (Input::V, f64::NAN),
            (Input::K, f64::NAN),
            (Input::K, f64::INFINITY),
            (Input::K, f64::NEG_INFINITY),
            (Input::Q, f64::NAN),
            (Input::Q, f64::INFINITY),
        ] {
            seed += 1;
            // Decode (every key visible) and a causal prefill (key 1 seen by rows 1..).
            let h = HeadConfig::new(8, 2, 64).unwrap();
            let mut s = CaseSpec::decode("visible", h, 16, 2, 0, dtype);
            s.requests = vec![(1, 5), (1, 300)];
            let mut data = s.materialise(seed).unwrap();
            let pos = if input == Input::Q { 0 } else { 1 };
            data.set_row(input, 0, pos, value).unwrap();
            data.set_row(input, 1, if input == Input::Q { 0 } else { 200 }, value)
                .unwrap();
            check_ieee(&data, &format!("decode {input:?}={value}"));
            let s = prefill("visible-prefill", (8, 2, 64), (6, 6), dtype);
            let mut data = s.materialise(seed).unwrap();
            data.set_row(input, 0, if input == Input::Q { 3 } else { 1 }, value)
                .unwrap();
            check_ieee(&data, &format!("prefill {input:?}={value}"));
        }
    }
}

#[test]
fn extreme_logits_agree_across_levels() {
    // q = 1e20, K[0] = 1e20, K[1] = -1e20: the logits overflow f32; the answer is V[0].
    for dtype in [DType::F32, DType::BF16] {
        let h = HeadConfig::new(4, 1, 64).unwrap();
        let mut s = CaseSpec::decode("extreme", h, 16, 1, 2, dtype);
        s.requests = vec![(1, 2)];
        let mut data = s.materialise(11).unwrap();
        data.set_row(Input::Q, 0, 0, 1e20).unwrap();
        data.set_row(Input::K, 0, 0, 1e20).unwrap();
        data.set_row(Input::K, 0, 1, -1e20).unwrap();
        let mut outs = Vec::new();
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(1, level).unwrap();
            let (o, lse) = data
                .run_cpu(&cpu, &PlanConfig::with_parallelism(1))
                .unwrap();
            let o = o.view().to_f64_vec();
            assert!(o.iter().all(|x| x.is_finite()), "{level:?}: {o:?}");
            assert!(
                lse.iter().all(|&l| l == f32::INFINITY),
                "{level:?}: lse {lse:?}"
            );
            outs.push(o);
        }
        let v0 = data.reference().unwrap().o;
        for o in &outs {
            assert_eq!(o, &outs[0], "levels disagree");
            assert!(
                o.iter()
                    .zip(&v0)
                    .all(|(a, b)| (a - b).abs() <= 1e-2 * b.abs().max(1e-3))
            );
        }
        // Every score hugely negative is not an empty row: o is the mean of the values.
        data.set_row(Input::K, 0, 0, -1e20).unwrap();
        let r = data.reference().unwrap();
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(1, level).unwrap();
            let (o, _) = data
                .run_cpu(&cpu, &PlanConfig::with_parallelism(1))
                .unwrap();
            let o = o.view().to_f64_vec();
            let err = reference::rel_error(&o, &r.o);
            assert!(err <= reference::tolerance(dtype), "{level:?}: error {err}");
        }
    }
}

#[test]
fn minus_inf_logits_are_keys_of_weight_zero() {
    // K = -inf against q = 1 gives a logit of -inf (the random inputs have both signs, so q
    // is set to 1 first: mixed signs would give inf - inf = NaN): a key of weight exactly 0, which
    // contributes nothing even where its V is infinite or NaN (0 × inf would be NaN), as in
    // the reference. Decode (the memory-order kernel and, for bf16 on AVX-512 BF16, the
    // dot-product tiles) and causal prefill (the tile kernel), split or not (check_ieee runs
    // parallelism 1 and 64).
    let mut seed = 500;
    for dtype in DType::ALL {
        for v in [f64::INFINITY, f64::NAN] {
            seed += 1;
            let h = HeadConfig::new(8, 2, 64).unwrap();
            let mut s = CaseSpec::decode("ninf-decode", h, 16, 2, 0, dtype);
            s.requests = vec![(1, 5), (1, 300)];
            let mut data = s.materialise(seed).unwrap();
            data.set_row(Input::Q, 0, 0, 1.0).unwrap();
            data.set_row(Input::Q, 1, 0, 1.0).unwrap();
            for (r, pos) in [(0, 1), (1, 200), (1, 7)] {
                data.set_row(Input::K, r, pos, f64::NEG_INFINITY).unwrap();
                data.set_row(Input::V, r, pos, v).unwrap();
            }
            let r = data.reference().unwrap();
            assert!(r.o.iter().all(|x| x.is_finite()));
            check_ieee(&data, &format!("decode K=-inf, V={v}"));

            let s = prefill("ninf-prefill", (8, 2, 64), (6, 40), dtype);
            let mut data = s.materialise(seed).unwrap();
            for row in 0..6 {
                data.set_row(Input::Q, 0, row, 1.0).unwrap();
            }
            for pos in [1, 33, 39] {
                data.set_row(Input::K, 0, pos, f64::NEG_INFINITY).unwrap();
                data.set_row(Input::V, 0, pos, v).unwrap();
            }
            check_ieee(&data, &format!("prefill K=-inf, V={v}"));
        }
        // Every key of logit -inf: the row sees no key (o = 0, lse = -inf), not NaN.
        let h = HeadConfig::new(4, 1, 32).unwrap();
        let mut s = CaseSpec::decode("all-ninf", h, 4, 1, 0, dtype);
        s.requests = vec![(1, 6)];
        let mut data = s.materialise(seed).unwrap();
        data.set_row(Input::Q, 0, 0, 1.0).unwrap();
        for pos in 0..6 {
            data.set_row(Input::K, 0, pos, f64::NEG_INFINITY).unwrap();
            data.set_row(Input::V, 0, pos, f64::INFINITY).unwrap();
        }
        assert!(
            data.reference()
                .unwrap()
                .lse
                .iter()
                .all(|&l| l == f64::NEG_INFINITY)
        );
        check_ieee(&data, "every K = -inf, V = inf");
    }
}

#[test]
fn a_soft_cap_maps_infinite_logits_into_its_range() {
    // With a soft-cap, an infinite logit (K = ±inf against q = 1) is capped to ±c
    // (c·tanh(±inf/c)), a finite score: the row is finite, as in the reference, not NaN or
    // empty.
    for dtype in DType::ALL {
        for k in [f64::INFINITY, f64::NEG_INFINITY] {
            let h = HeadConfig::new(4, 1, 64).unwrap();
            let mut s = CaseSpec::decode("cap-inf", h, 16, 1, 0, dtype);
            s.requests = vec![(1, 9)];
            s.options.logits_soft_cap = Some(30.0);
            let mut data = s.materialise(41).unwrap();
            data.set_row(Input::Q, 0, 0, 1.0).unwrap();
            data.set_row(Input::K, 0, 3, k).unwrap();
            let r = data.reference().unwrap();
            assert!(r.o.iter().chain(&r.lse).all(|x| x.is_finite()));
            check_ieee(&data, &format!("soft-cap 30, K={k}"));
            let mut s = prefill("cap-inf-prefill", (4, 1, 64), (4, 9), dtype);
            s.options.logits_soft_cap = Some(30.0);
            let mut data = s.materialise(42).unwrap();
            for row in 0..4 {
                data.set_row(Input::Q, 0, row, 1.0).unwrap();
            }
            data.set_row(Input::K, 0, 2, k).unwrap();
            check_ieee(&data, &format!("prefill soft-cap 30, K={k}"));
        }
    }
}
