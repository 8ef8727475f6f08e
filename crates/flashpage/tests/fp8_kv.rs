//! FP8 K/V caches (e4m3fn, e5m2) on the CPU backend at every SIMD level this machine has,
//! against the f64 reference on the exactly dequantised cache (docs/numerics.md, "FP8 KV
//! cache"): decode (the memory-order decode kernel and the tile kernel) and prefill (direct
//! and widened tiles, RoPE), both formats, per-tensor and per-head scales, q of every float
//! dtype; then the checks of the dtypes and scales, and `append_kv` quantising into a cache.
//! Inputs are fresh random values (seed from `FLASHPAGE_SEED` or the clock, printed on
//! failure) whose codes reach the format's largest finite values and its subnormals.

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::backend::{KvCache, RunArgs};
use flashpage::fp8::Fp8Format;
use flashpage::ops::Rows;
use flashpage::ops::append::{AppendBatch, KvCacheMut, append_kv};
use flashpage::*;
use flashpage_testkit::case::{CaseSpec, Fp8Spec, KvStorage, Rng};
use flashpage_testkit::suite::seed_from_env;

/// Runs `spec` at every SIMD level (fresh poisoned outputs) and checks it against the
/// reference; `config`'s parallelism splits long requests.
fn check(spec: &CaseSpec, config: &PlanConfig, seed: u64) {
    let data = spec.materialise(seed).unwrap();
    assert_eq!(data.kv_dtype(), spec.fp8.unwrap().dtype);
    let r = data.reference().unwrap();
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        let (o, lse) = data.run_cpu(&cpu, config).unwrap();
        let c = data.compare(&o, &lse, &r);
        assert!(
            c.passed(),
            "{} q {:?} kv {:?} {level:?} seed {seed}: {c:?}",
            spec.name,
            spec.dtype,
            spec.fp8,
        );
    }
}

fn fp8_specs() -> Vec<Fp8Spec> {
    let mut v = Vec::new();
    for dtype in DType::FP8 {
        for per_head in [false, true] {
            v.push(Fp8Spec { dtype, per_head });
        }
    }
    v
}

#[test]
fn decode_every_format_scale_and_q_dtype() {
    let seed = seed_from_env();
    // GQA 4 (a decode tile of 4 rows per head), MQA, and MHA; partial key blocks; a split.
    for (i, (heads, kv_lens)) in [
        ((8, 2, 128), vec![300, 1, 33, 0]),
        ((8, 1, 64), vec![77, 500]),
        ((4, 4, 256), vec![40, 65]),
    ]
    .into_iter()
    .enumerate()
    {
        let h = HeadConfig::new(heads.0, heads.1, heads.2).unwrap();
        for fp8 in fp8_specs() {
            for dtype in DType::ALL {
                let mut spec = CaseSpec::decode("fp8 decode", h, 16, 1, 0, dtype);
                spec.requests = kv_lens.iter().map(|&k| (1, k)).collect();
                spec.fp8 = Some(fp8);
                for p in [1, 64] {
                    let mut config = PlanConfig::with_parallelism(p);
                    config.min_kv_chunk = 16;
                    check(&spec, &config, seed ^ (i as u64) << 8);
                }
            }
        }
    }
}

#[test]
fn decode_options_layouts_and_storage() {
    let seed = seed_from_env();
    let h = HeadConfig::new(16, 4, 64).unwrap();
    let opts = [
        AttentionOptions::default().with_logits_soft_cap(Some(20.0)),
        AttentionOptions::default().with_window_left(Some(50)),
        AttentionOptions::default().with_pos_encoding(PosEncoding::Alibi),
        // RoPE: the tile kernel's widened path (the decode kernel does not rotate).
        AttentionOptions::default().with_pos_encoding(PosEncoding::ROPE_DEFAULT),
    ];
    for (i, o) in opts.into_iter().enumerate() {
        for fp8 in fp8_specs() {
            for (layout, storage) in [
                (KvLayout::Hnd, KvStorage::Separate),
                (KvLayout::Nhd, KvStorage::Combined),
            ] {
                let mut spec = CaseSpec::decode("fp8 decode opts", h, 8, 3, 200, DType::BF16);
                spec.requests = vec![(1, 200), (1, 9), (1, 130)];
                spec.options = o;
                spec.layout = layout;
                spec.storage = storage;
                spec.sinks = i == 1;
                spec.fp8 = Some(fp8);
                check(&spec, &PlanConfig::with_parallelism(8), seed ^ i as u64);
            }
        }
    }
}

#[test]
fn prefill_every_format_scale_and_q_dtype() {
    let seed = seed_from_env();
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for fp8 in fp8_specs() {
        for dtype in DType::ALL {
            for (storage, rope) in [
                (KvStorage::Separate, false),
                (KvStorage::Ragged, false),
                (KvStorage::Combined, true),
            ] {
                let mut spec = CaseSpec::decode("fp8 prefill", h, 16, 1, 0, dtype);
                spec.decode = false;
                // 3 rows (a direct tile), 40 rows (a widened, packed tile), an empty one.
                spec.requests = vec![(3, 90), (40, 70), (0, 0), (17, 17)];
                spec.storage = storage;
                spec.options = AttentionOptions::default().with_causal(true);
                if rope {
                    spec.options = spec.options.with_pos_encoding(PosEncoding::ROPE_DEFAULT);
                }
                spec.fp8 = Some(fp8);
                check(&spec, &PlanConfig::with_parallelism(16), seed);
            }
        }
    }
}

#[test]
fn large_inputs_and_tiny_scales() {
    // Values of magnitude 1e4 (E5M2 codes near 57344 with a scale near 0.2; E4M3 codes near
    // 448 with a scale near 25) and of magnitude 1e-3 (tiny scales).
    let seed = seed_from_env();
    let h = HeadConfig::new(8, 2, 128).unwrap();
    for input_scale in [1e4, 1e-3] {
        for fp8 in fp8_specs() {
            let mut spec = CaseSpec::decode("fp8 range", h, 16, 2, 150, DType::F32);
            spec.input_scale = input_scale;
            spec.options =
                AttentionOptions::default().with_sm_scale(Some(1e-6 / input_scale as f32));
            spec.fp8 = Some(fp8);
            check(&spec, &PlanConfig::with_parallelism(4), seed);
        }
    }
}

/// The cache's NaN codes are read as NaN, never as a finite value: a masked NaN key
/// contributes nothing, a visible one makes its rows NaN (as the reference).
#[test]
fn nan_codes_are_nan() {
    let h = HeadConfig::new(4, 2, 64).unwrap();
    for f in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
        let dtype = if f == Fp8Format::E4M3Fn {
            DType::E4M3Fn
        } else {
            DType::E5M2
        };
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(1, level).unwrap();
            let mut spec = CaseSpec::decode("fp8 nan", h, 16, 1, 40, DType::F32);
            spec.options = AttentionOptions::default().with_window_left(Some(10));
            spec.fp8 = Some(Fp8Spec {
                dtype,
                per_head: true,
            });
            // Key 3 (outside the window of the decode row at position 39) and key 35 (inside).
            for (key, visible) in [(3, false), (35, true)] {
                let mut data = spec.materialise(seed_from_env()).unwrap();
                data.set_row(flashpage_testkit::case::Input::V, 0, key, f64::NAN)
                    .unwrap();
                let (o, lse) = data
                    .run_cpu(&cpu, &PlanConfig::with_parallelism(1))
                    .unwrap();
                let ov = o.view().to_f64_vec();
                if visible {
                    assert!(ov.iter().all(|x| x.is_nan()), "{f:?} {level:?}");
                } else {
                    assert!(ov.iter().all(|x| x.is_finite()), "{f:?} {level:?}");
                    let c = data.compare(&o, &lse, &data.reference().unwrap());
                    assert!(c.passed(), "{f:?} {level:?}: {c:?}");
                }
            }
        }
    }
}

// ---- checks of the dtypes and scales ------------------------------------------------------

struct Fixture {
    plan: Plan,
    q: Vec<f32>,
    k8: Vec<u8>,
    kf: Vec<f32>,
    strides: KvStrides,
    ids: Vec<i32>,
}

fn fixture() -> Fixture {
    let heads = HeadConfig::new(4, 2, 16).unwrap();
    let mut b = BatchBuilder::new(4).unwrap();
    b.push(1, 6, &[1, 0]).unwrap();
    let plan = Plan::new(
        &b.decode(heads, 2),
        &AttentionOptions::default(),
        &PlanConfig::with_parallelism(1),
    )
    .unwrap();
    let mut rng = Rng::new(seed_from_env());
    let n = 2 * 4 * 2 * 16;
    Fixture {
        plan,
        q: (0..4 * 16).map(|_| rng.uniform() as f32).collect(),
        k8: (0..n).map(|_| rng.below(0x70) as u8).collect(),
        kf: (0..n).map(|_| rng.uniform() as f32).collect(),
        strides: KvStrides::dense(KvLayout::Nhd, 4, 2, 16),
        ids: vec![1, 0],
    }
}

fn run(fx: &Fixture, q: TensorRef<'_>, kv: KvCache<'_>) -> Result<Vec<f32>> {
    let cpu = CpuBackend::new(1)?;
    let mut o = vec![f32::NAN; 4 * 16];
    let mut ws = workspace::HostWorkspace::new(fx.plan.requirement().float.total())?;
    let args = RunArgs {
        q,
        kv,
        o: TensorMut::F32(&mut o),
        lse: None,
        sinks: None,
        custom_mask: None,
    };
    cpu.run(&fx.plan, args, ws.as_bytes_mut())?;
    Ok(o)
}

#[test]
fn dtypes_and_scales_are_checked() {
    let fx = fixture();
    let e4 = |s: &'static [u8]| TensorRef::Fp8(Fp8Format::E4M3Fn, s);
    let k8: &'static [u8] = fx.k8.clone().leak();
    let paged = |k, v| KvCache::paged(k, v, fx.strides, 2, &fx.ids);
    let q = TensorRef::F32(&fx.q);
    // Accepted: per tensor, per head, no scales (scale 1).
    for (ks, vs) in [
        (&[0.5f32][..], &[2.0f32][..]),
        (&[0.5, 0.25][..], &[1.0, 3.0][..]),
    ] {
        let o = run(&fx, q, paged(e4(k8), e4(k8)).with_scales(ks, vs)).unwrap();
        assert!(o.iter().all(|x| x.is_finite()));
    }
    run(&fx, q, paged(e4(k8), e4(k8))).unwrap();

    let expect = |r: Result<Vec<f32>>, kind: ErrorKind, needle: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
    };
    // q must be a float type.
    expect(
        run(&fx, e4(k8), paged(e4(k8), e4(k8))),
        ErrorKind::DTypeMismatch,
        "q",
    );
    // K and V: one fp8 format for both.
    expect(
        run(&fx, q, paged(e4(k8), TensorRef::Fp8(Fp8Format::E5M2, k8))),
        ErrorKind::DTypeMismatch,
        "e5m2",
    );
    expect(
        run(&fx, q, paged(e4(k8), TensorRef::F32(&fx.kf))),
        ErrorKind::DTypeMismatch,
        "v",
    );
    // A float cache of another type than q's.
    let kb: Vec<half::bf16> = fx.kf.iter().map(|&x| half::bf16::from_f32(x)).collect();
    expect(
        run(&fx, q, paged(TensorRef::BF16(&kb), TensorRef::BF16(&kb))),
        ErrorKind::DTypeMismatch,
        "e4m3fn",
    );
    // Scales only with an fp8 cache.
    expect(
        run(
            &fx,
            q,
            paged(TensorRef::F32(&fx.kf), TensorRef::F32(&fx.kf)).with_scales(&[1.0], &[1.0]),
        ),
        ErrorKind::InvalidOption,
        "k_scale",
    );
    // Count: 1 or num_kv_heads (2).
    expect(
        run(
            &fx,
            q,
            paged(e4(k8), e4(k8)).with_scales(&[1.0], &[1.0, 2.0, 3.0]),
        ),
        ErrorKind::TensorShape,
        "v_scale",
    );
    expect(
        run(&fx, q, paged(e4(k8), e4(k8)).with_scales(&[], &[1.0])),
        ErrorKind::TensorShape,
        "num_kv_heads = 2",
    );
    // Finite, positive, normal.
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY, 1e-40] {
        expect(
            run(
                &fx,
                q,
                paged(e4(k8), e4(k8)).with_scales(&[1.0, bad], &[1.0]),
            ),
            ErrorKind::InvalidOption,
            "k_scale[1]",
        );
    }
}

/// The kernel's output with per-head scales equals the output on a float cache holding the
/// dequantised values (f32, exact), to f32 accuracy.
#[test]
fn scales_match_a_dequantised_f32_cache() {
    let fx = fixture();
    // Codes of magnitude below 2 (exponent field at most the bias), subnormals and zero
    // included: the scores stay O(10), so the f32 rounding of a score (relative to the
    // score) stays well inside the 1e-5 tolerance whichever kernel computes it. With the
    // fixture's codes up to 7168 (E5M2) scores reach 1e4–1e5, where two f32 kernels summing
    // in different orders differ by 1e-4 for a seed in ten. Large codes are checked against
    // the f64 reference by the suite (`fp8.toml`).
    let k8: Vec<u8> = fx.k8.iter().map(|&c| c & 0x3f).collect();
    let q = TensorRef::F32(&fx.q);
    let (ks, vs) = ([0.125f32, 3.0], [0.5f32, 1.0 / 3.0]);
    for f in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
        let deq = |scale: &[f32; 2]| -> Vec<f32> {
            k8.iter()
                .enumerate()
                .map(|(i, &c)| f.decode(c) * scale[(i / 16) % 2])
                .collect()
        };
        let (kd, vd) = (deq(&ks), deq(&vs));
        let want = run(
            &fx,
            q,
            KvCache::paged(
                TensorRef::F32(&kd),
                TensorRef::F32(&vd),
                fx.strides,
                2,
                &fx.ids,
            ),
        )
        .unwrap();
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(1, level).unwrap();
            let mut o = vec![f32::NAN; 4 * 16];
            let mut ws = workspace::HostWorkspace::new(0).unwrap();
            let kv = KvCache::paged(
                TensorRef::Fp8(f, &k8),
                TensorRef::Fp8(f, &k8),
                fx.strides,
                2,
                &fx.ids,
            )
            .with_scales(&ks, &vs);
            let args = RunArgs {
                q,
                kv,
                o: TensorMut::F32(&mut o),
                lse: None,
                sinks: None,
                custom_mask: None,
            };
            cpu.run(&fx.plan, args, ws.as_bytes_mut()).unwrap();
            for (a, b) in o.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{f:?} {level:?}: {a} vs {b}"
                );
            }
        }
    }
}

// ---- append_kv into an fp8 cache ----------------------------------------------------------

#[test]
fn append_quantises_with_the_head_scale() {
    let (ps, pages, hkv, d) = (4, 3, 2, 16);
    let mut b = BatchBuilder::new(ps).unwrap();
    b.push(3, 7, &[2, 0]).unwrap(); // positions 4, 5, 6: page 0 slots 0..3
    let mut rng = Rng::new(seed_from_env());
    // Values up to 600 (past E4M3's 448 once divided by a scale below 1.34) and tiny ones.
    let mut vals = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = rng.uniform() as f32;
                if i % 5 == 0 { u * 1e-3 } else { u * 600.0 }
            })
            .collect()
    };
    let (kn, vn) = (vals(3 * hkv * d), vals(3 * hkv * d));
    let st = KvStrides::dense(KvLayout::Nhd, ps, hkv, d);
    for f in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
        for (ks, vs) in [
            (vec![0.75f32], vec![2.0f32]),
            (vec![1.0, 0.01], vec![0.3, 5.0]),
        ] {
            let n = pages * ps * hkv * d;
            let (mut kc, mut vc) = (vec![0x11u8; n], vec![0x22u8; n]);
            append_kv(
                &AppendBatch::from_builder(&b),
                Rows::dense(TensorRef::F32(&kn), 3, hkv, d).unwrap(),
                Rows::dense(TensorRef::F32(&vn), 3, hkv, d).unwrap(),
                KvCacheMut::split(
                    TensorMut::Fp8(f, &mut kc),
                    TensorMut::Fp8(f, &mut vc),
                    st,
                    ps,
                    pages,
                )
                .with_scales(&ks, &vs),
                None,
            )
            .unwrap();
            let sc = |s: &[f32], h: usize| if s.len() == 1 { s[0] } else { s[h] };
            for t in 0..3 {
                for h in 0..hkv {
                    for c in 0..d {
                        let src = (t * hkv + h) * d + c;
                        let dst = t * st.token + h * st.head + c; // page 0, slot t
                        assert_eq!(
                            kc[dst],
                            f.encode(kn[src] / sc(&ks, h)),
                            "{f:?} k {t} {h} {c}"
                        );
                        assert_eq!(
                            vc[dst],
                            f.encode(vn[src] / sc(&vs, h)),
                            "{f:?} v {t} {h} {c}"
                        );
                    }
                }
            }
            // Nothing else written (page 0 slot 3, pages 1 and 2).
            assert!(kc[3 * st.token..].iter().all(|&x| x == 0x11));
            assert!(vc[3 * st.token..].iter().all(|&x| x == 0x22));
            // Saturation (E4M3) or overflow to infinity (E5M2) for the largest values.
            if ks.len() == 2 {
                let big = kn.iter().position(|x| x.abs() / 0.01 > 61440.0);
                if let Some(i) = big {
                    let (t, h, c) = (i / (hkv * d), (i / d) % hkv, i % d);
                    if h == 1 {
                        let code = kc[t * st.token + h * st.head + c];
                        let want = if f == Fp8Format::E4M3Fn {
                            448.0
                        } else {
                            f32::INFINITY
                        };
                        assert_eq!(f.decode(code).abs(), want);
                    }
                }
            }
        }
    }
}

#[test]
fn append_checks_fp8_arguments() {
    let (ps, pages, hkv, d) = (4, 2, 2, 16);
    let mut b = BatchBuilder::new(ps).unwrap();
    b.push(1, 1, &[1]).unwrap();
    let st = KvStrides::dense(KvLayout::Nhd, ps, hkv, d);
    let x = vec![0.5f32; hkv * d];
    let x8 = vec![0x30u8; hkv * d];
    let n = pages * ps * hkv * d;
    let attempt = |rows: TensorRef<'_>, fp8: bool, ks: Option<&[f32]>| {
        let (mut kc, mut vc) = (vec![0u8; n], vec![0u8; n]);
        let (mut kf, mut vf) = (vec![0f32; n], vec![0f32; n]);
        let cache = if fp8 {
            KvCacheMut::split(
                TensorMut::Fp8(Fp8Format::E5M2, &mut kc),
                TensorMut::Fp8(Fp8Format::E5M2, &mut vc),
                st,
                ps,
                pages,
            )
        } else {
            KvCacheMut::split(
                TensorMut::F32(&mut kf),
                TensorMut::F32(&mut vf),
                st,
                ps,
                pages,
            )
        };
        let cache = match ks {
            Some(s) => cache.with_scales(s, &[1.0]),
            None => cache,
        };
        let r = append_kv(
            &AppendBatch::from_builder(&b),
            Rows::dense(rows, 1, hkv, d).unwrap(),
            Rows::dense(TensorRef::F32(&x), 1, hkv, d).unwrap(),
            cache,
            None,
        );
        let untouched = kc.iter().all(|&c| c == 0) && kf.iter().all(|&c| c == 0.0);
        (r, untouched)
    };
    let (r, _) = attempt(TensorRef::F32(&x), true, Some(&[2.0, 4.0]));
    r.unwrap();
    // FP8 rows are taken at face value: into a cache of their format without a scale
    // they are a copy (FlashInfer's append of already-quantised rows).
    let (r, untouched) = attempt(TensorRef::Fp8(Fp8Format::E5M2, &x8[..]), true, None);
    r.unwrap();
    assert!(!untouched, "the fp8 rows were written");
    for (rows, fp8, ks, kind, needle) in [
        (
            TensorRef::F32(&x[..]),
            false,
            Some(&[1.0f32][..]),
            ErrorKind::InvalidOption,
            "k_scale",
        ),
        (
            TensorRef::F32(&x[..]),
            true,
            Some(&[1.0, 2.0, 3.0][..]),
            ErrorKind::TensorShape,
            "k_scale",
        ),
        (
            TensorRef::F32(&x[..]),
            true,
            Some(&[f32::NAN][..]),
            ErrorKind::InvalidOption,
            "k_scale[0]",
        ),
    ] {
        let (r, untouched) = attempt(rows, fp8, ks);
        let e = r.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(needle), "{e}");
        assert!(untouched, "{e}: nothing is written on error");
    }
}

/// FP8 rows appended into a cache of their own format without a scale keep every code's
/// value (a copy of already-quantised K/V, as engines quantising themselves append them).
#[test]
fn append_copies_fp8_rows_of_the_cache_format() {
    let (ps, hkv, d) = (1, 1, 256);
    for f in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
        let codes: Vec<u8> = (0..=255u8).collect();
        let mut b = BatchBuilder::new(ps).unwrap();
        b.push(1, 1, &[0]).unwrap();
        let st = KvStrides::dense(KvLayout::Nhd, ps, hkv, d);
        let (mut kc, mut vc) = (vec![0u8; d], vec![0u8; d]);
        append_kv(
            &AppendBatch::from_builder(&b),
            Rows::dense(TensorRef::Fp8(f, &codes), 1, hkv, d).unwrap(),
            Rows::dense(TensorRef::Fp8(f, &codes), 1, hkv, d).unwrap(),
            KvCacheMut::split(
                TensorMut::Fp8(f, &mut kc),
                TensorMut::Fp8(f, &mut vc),
                st,
                ps,
                1,
            ),
            None,
        )
        .unwrap();
        for (i, (&k, &v)) in kc.iter().zip(&vc).enumerate() {
            let want = f.decode(i as u8);
            for got in [f.decode(k), f.decode(v)] {
                if want.is_nan() {
                    assert!(got.is_nan(), "{f:?} code {i:#x}");
                } else {
                    assert_eq!(got.to_bits(), want.to_bits(), "{f:?} code {i:#x}");
                }
            }
        }
    }
}
