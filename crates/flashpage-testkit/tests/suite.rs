//! The declarative case suite (tests/data/*.toml) on the CPU backend: every case at every
//! dtype, SIMD level of this machine and listed parallelism against the f64 reference, and
//! every expected-error case at every SIMD level. Inputs are fresh random values; set
//! `FLASHPAGE_SEED` to replay a failure (the seed is printed with it).

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::tensor::Tensor;
use flashpage::{AttentionOptions, DType, HeadConfig, KvLayout, PlanConfig, PosEncoding};
use flashpage_testkit::HostRunner;
use flashpage_testkit::case::{CaseSpec, KvStorage};
use flashpage_testkit::suite::{self, Suite};

fn backends() -> Vec<CpuBackend> {
    SimdLevel::available()
        .into_iter()
        .map(|l| CpuBackend::with_simd(2, l).unwrap())
        .collect()
}

fn runners(backends: &[CpuBackend]) -> Vec<&dyn HostRunner> {
    backends.iter().map(|b| b as &dyn HostRunner).collect()
}

fn run_file(file: &str) {
    let suite = Suite::embedded().unwrap();
    let cases: Vec<_> = suite.cases.iter().filter(|c| c.file == file).collect();
    assert!(!cases.is_empty(), "no cases in {file}");
    let backends = backends();
    let seed = suite::seed_from_env();
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in cases {
        for &dtype in &case.dtypes {
            for run in case.run(dtype, &runners(&backends), seed) {
                runs += 1;
                if !run.passed() {
                    failures.push(run.to_string());
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decode_cases() {
    run_file("decode.toml");
}

#[test]
fn prefill_cases() {
    run_file("prefill.toml");
}

#[test]
fn variant_cases() {
    run_file("variants.toml");
}

#[test]
fn numerics_cases() {
    run_file("numerics.toml");
}

#[test]
fn feature_cases() {
    run_file("features.toml");
}

#[test]
fn mask_cases() {
    run_file("masks.toml");
}

#[test]
fn expected_errors_at_every_simd_level() {
    let suite = Suite::embedded().unwrap();
    assert!(suite.errors.len() >= 25);
    let mut failures = Vec::new();
    for cpu in backends() {
        for e in &suite.errors {
            if let Err(why) = e.check(&cpu) {
                failures.push(format!("simd={}: {why}", cpu.simd().name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn suite_covers_the_required_cases() {
    let suite = Suite::embedded().unwrap();
    let has = |f: &dyn Fn(&suite::SuiteCase) -> bool| suite.cases.iter().any(f);
    let reqs = |c: &suite::SuiteCase| c.spec.requests.clone();
    assert!(has(&|c| reqs(c).iter().any(|r| r.1 == 1)), "kv_len 1");
    assert!(has(&|c| c.spec.page_size == 1), "page size 1");
    assert!(has(&|c| reqs(c).len() == 1), "batch of 1");
    assert!(
        has(&|c| reqs(c).len() == 512 && c.spec.decode),
        "decode batch 512"
    );
    assert!(
        has(&|c| reqs(c).len() == 512 && !c.spec.decode),
        "prefill batch 512"
    );
    assert!(
        has(&|c| reqs(c).iter().any(|r| r.1 == 0) && reqs(c).iter().any(|r| r.1 >= 1000)),
        "empty requests mixed with long ones"
    );
    assert!(has(
        &|c| c.spec.options.causal && reqs(c).iter().any(|r| r.0 == r.1 && r.0 > 1)
    ));
    assert!(has(
        &|c| c.spec.options.causal && reqs(c).iter().any(|r| r.0 < r.1)
    ));
    assert!(has(&|c| c.spec.options.window_left == Some(0)));
    assert!(has(
        &|c| c.spec.options.logits_soft_cap.is_some() && c.spec.input_scale >= 8.0
    ));
    for g in [1, 4, 8] {
        assert!(has(&|c| c.spec.heads.group_size() == g), "group size {g}");
    }
    assert!(has(&|c| c.spec.heads.num_kv_heads() == 1), "mqa");
    for d in [64, 128, 256] {
        assert!(has(&|c| c.spec.heads.head_dim() == d), "head_dim {d}");
    }
    assert!(has(&|c| c.spec.layout == KvLayout::Hnd));
    assert!(has(&|c| c.spec.storage == KvStorage::Combined));
    assert!(has(&|c| c.spec.storage == KvStorage::Ragged));
    assert!(has(&|c| c.spec.options.pos_encoding == PosEncoding::Alibi));
    assert!(has(&|c| matches!(
        c.spec.options.pos_encoding,
        PosEncoding::Rope { .. }
    )));
    assert!(has(&|c| c.spec.options.sm_scale.is_some()));
    assert!(has(&|c| reqs(c)
        .iter()
        .any(|r| r.1 > 0 && r.1.is_multiple_of(c.spec.page_size))));
    // Attention sinks: on empty rows (o = 0, lse = the sink), split rows (the merge's
    // epilogue), prefill, ragged K/V and graph mode.
    assert!(has(&|c| c.spec.sinks && reqs(c).iter().all(|r| r.1 == 0)));
    assert!(has(&|c| c.spec.sinks && c.min_kv_chunk.is_some()));
    assert!(has(&|c| c.spec.sinks && !c.spec.decode));
    assert!(has(&|c| c.spec.sinks && c.spec.storage == KvStorage::Ragged));
    assert!(has(&|c| c.spec.sinks && c.graph_capacity.is_some()));
    // Custom masks: prefill and decode, split, rows that see nothing, every bit set,
    // combined with causal, the window, sinks, ragged K/V and graph mode.
    let mask = |c: &suite::SuiteCase| c.spec.custom_mask;
    assert!(has(&|c| mask(c).is_some() && c.spec.decode));
    assert!(has(&|c| mask(c).is_some()
        && !c.spec.decode
        && c.min_kv_chunk.is_some()));
    assert!(has(&|c| mask(c).is_some_and(|m| m.zero_row_stride > 0)));
    assert!(has(&|c| mask(c).is_some_and(|m| m.density == 0.0)));
    assert!(has(&|c| mask(c).is_some_and(|m| m.density == 1.0)));
    assert!(has(&|c| mask(c).is_some()
        && c.spec.options.causal
        && c.spec.options.window_left.is_some()));
    assert!(has(&|c| mask(c).is_some() && c.spec.sinks));
    assert!(has(
        &|c| mask(c).is_some() && c.spec.storage == KvStorage::Ragged
    ));
    assert!(has(&|c| mask(c).is_some() && c.graph_capacity.is_some()));
    let variants: Vec<&str> = suite
        .errors
        .iter()
        .filter_map(|e| e.expect.map(|k| k.name()))
        .collect();
    for v in [
        "IndptrLengthMismatch",
        "IndptrDecreasing",
        "IndptrStart",
        "IndicesTooShort",
        "PageIdOutOfRange",
        "LastPageLen",
        "CausalQueryLongerThanKv",
        "InvalidOption",
        "HeadRatio",
        "UnsupportedHeadDim",
        "UnsupportedPageSize",
        "CustomMaskLength",
    ] {
        assert!(variants.contains(&v), "no expected-error case for {v}");
    }
}

#[test]
fn a_wrong_expectation_fails() {
    let suite = Suite::parse(
        "inline.toml",
        r#"
[[error]]
name = "wrong"
heads = [8, 2, 64]
num_pages = 8
kv_indptr = [0, 2, 1]
kv_indices = [0, 1]
kv_last_page_len = [4, 4]
expect = "IndptrStart"

[[error]]
name = "accepted"
heads = [8, 2, 64]
num_pages = 8
kv_indptr = [0, 1]
kv_indices = [3]
kv_last_page_len = [4]
message = "anything"
"#,
    )
    .unwrap();
    let cpu = CpuBackend::with_simd(1, SimdLevel::Scalar).unwrap();
    let wrong = suite.errors[0].check(&cpu).unwrap_err();
    assert!(wrong.contains("got IndptrDecreasing"), "{wrong}");
    let accepted = suite.errors[1].check(&cpu).unwrap_err();
    assert!(accepted.contains("the batch was accepted"), "{accepted}");
}

#[test]
fn malformed_suite_files_are_rejected() {
    let bad = [
        (
            "name = \"x\"\nheads = [8, 2, 64]\nkv_lens = [1]\nbogus = 1",
            "bogus",
        ),
        ("name = \"x\"\nheads = [8, 2, 64]", "exactly one of"),
        (
            "name = \"x\"\nheads = [8, 3, 64]\nkv_lens = [1]",
            "multiple of",
        ),
        (
            "name = \"x\"\nheads = [8, 2, 64]\nkv_lens = [1]\ndtypes = [\"f8\"]",
            "f8",
        ),
        (
            "name = \"x\"\nheads = [8, 2, 64]\nkv_lens = [1]\nlayout = \"NDH\"",
            "NDH",
        ),
        (
            "name = \"x\"\nheads = [8, 2, 64]\nkv_lens = [1]\noptions = { pos_encoding = \"xpos\" }",
            "xpos",
        ),
        (
            "name = \"x\"\nheads = [8, 2, 64]\nstorage = \"ragged\"\nkv_lens = [1]",
            "ragged",
        ),
    ];
    for (body, needle) in bad {
        let text = format!("[[case]]\n{body}\n");
        let e = Suite::parse("bad.toml", &text).unwrap_err();
        assert!(e.to_string().contains(needle), "{body:?}: {e}");
    }
}

#[test]
fn a_corrupted_output_fails_the_comparison() {
    let heads = HeadConfig::new(4, 2, 64).unwrap();
    let spec = CaseSpec::decode("corrupt", heads, 16, 3, 40, DType::F32);
    let data = spec.materialise(7).unwrap();
    let cpu = CpuBackend::with_simd(1, SimdLevel::Scalar).unwrap();
    let (o, lse) = data
        .run_cpu(&cpu, &PlanConfig::with_parallelism(1))
        .unwrap();
    let r = data.reference().unwrap();
    assert!(data.compare(&o, &lse, &r).passed());
    let Tensor::F32(mut bad) = o.clone() else {
        unreachable!()
    };
    bad[5] += 0.01;
    assert!(!data.compare(&Tensor::F32(bad), &lse, &r).passed());
    let Tensor::F32(mut holes) = o else {
        unreachable!()
    };
    holes[0] = f32::NAN;
    assert!(!data.compare(&Tensor::F32(holes), &lse, &r).passed());
}

/// The row sampling behind `flashpage bench` verification gives exactly the full
/// reference's rows, for every storage, layout, mask and positional encoding.
#[test]
fn sampled_reference_matches_the_full_reference() {
    let heads = HeadConfig::new(8, 2, 64).unwrap();
    let base = CaseSpec {
        name: "sample".into(),
        heads,
        page_size: 16,
        requests: vec![(5, 40), (0, 0), (17, 17), (1, 100)],
        decode: false,
        dtype: DType::BF16,
        layout: KvLayout::Nhd,
        storage: KvStorage::Separate,
        options: AttentionOptions::default().with_causal(true),
        input_scale: 1.0,
        sinks: false,
        custom_mask: None,
        fp8: None,
    };
    let variants = [
        base.clone(),
        CaseSpec {
            layout: KvLayout::Hnd,
            storage: KvStorage::Combined,
            options: AttentionOptions::default()
                .with_causal(true)
                .with_window_left(7)
                .with_pos_encoding(PosEncoding::ROPE_DEFAULT),
            ..base.clone()
        },
        CaseSpec {
            storage: KvStorage::Ragged,
            options: AttentionOptions::default()
                .with_causal(true)
                .with_pos_encoding(PosEncoding::Alibi)
                .with_logits_soft_cap(5.0),
            ..base.clone()
        },
        CaseSpec {
            decode: true,
            options: AttentionOptions::default()
                .with_window_left(9)
                .with_pos_encoding(PosEncoding::ROPE_DEFAULT),
            ..base.clone()
        },
    ];
    for spec in variants {
        let data = spec.materialise(11).unwrap();
        let full = data.reference().unwrap();
        let rows: Vec<usize> = (0..data.rows()).rev().step_by(2).collect();
        let s = suite::sampled_reference(&data, &rows).unwrap();
        let hq = heads.num_qo_heads();
        let d = heads.head_dim();
        for (n, &row) in rows.iter().enumerate() {
            let want = &full.o[row * hq * d..(row + 1) * hq * d];
            let got = &s.o[n * hq * d..(n + 1) * hq * d];
            assert!(
                want.iter().zip(got).all(|(a, b)| (a - b).abs() <= 1e-12),
                "{:?} row {row}",
                spec.storage
            );
            assert_eq!(
                &full.lse[row * hq..(row + 1) * hq],
                &s.lse[n * hq..(n + 1) * hq]
            );
        }
        // The comparison over the sample catches a wrong row.
        let (o, lse) = data.poisoned_outputs();
        assert!(!suite::compare_rows(&data, &rows, &o, &lse, &s).passed());
    }
}

#[test]
fn fp8_cases() {
    run_file("fp8.toml");
}

#[test]
fn cascade_cases() {
    run_file("cascade.toml");
}
