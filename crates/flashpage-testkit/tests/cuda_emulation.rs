//! The CUDA kernels run in the host emulation (no GPU): each case is compared with the f64
//! reference and with the CPU backend, outputs and the float workspace poisoned first.
#![cfg(feature = "cuda")]

use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::cuda::prefill::PrefillVariant;
use flashpage::{AttentionOptions, DType, HeadConfig, KvLayout, PlanConfig, PosEncoding};
use flashpage_testkit::HostRunner;
use flashpage_testkit::case::{CaseData, CaseSpec, Fp8Spec, Input, KvStorage, MaskSpec};
use flashpage_testkit::emulate::{EMULATED_ARCH, Emulator};
use flashpage_testkit::mask::PackedMask;
use flashpage_testkit::strided::StridedLayout;
use flashpage_testkit::suite::{self, Suite};

fn check(emu: &Emulator, cpu: &CpuBackend, spec: &CaseSpec, config: &PlanConfig, seed: u64) {
    let data = spec.materialise(seed).unwrap();
    let plan = data.plan(config).unwrap();
    let (o, lse) = emu.run(&data, &plan);
    let reference = data.reference().unwrap();
    let c = data.compare(&o, &lse, &reference);
    assert!(
        c.passed(),
        "{} (seed {seed}) vs reference: {c:?}",
        spec.name
    );
    let (co, clse) = data.run_cpu(cpu, config).unwrap();
    let (e, el) = CaseData::output_difference(&o, &lse, &co, &clse);
    assert!(
        e <= c.tolerance && el <= c.tolerance,
        "{} (seed {seed}) vs cpu: o {e:e}, lse {el:e}",
        spec.name
    );
}

fn setup(test: &str) -> (Emulator, CpuBackend) {
    let emu = Emulator::new(test).unwrap_or_else(|e| panic!("{e}"));
    (emu, CpuBackend::new(2).unwrap())
}

fn seed(i: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn emulated_decode_matches_reference_and_cpu() {
    let (emu, cpu) = setup("decode");
    let mut i = 0;
    let cases: Vec<(usize, usize, usize, DType, usize, KvLayout, KvStorage)> = vec![
        (
            8,
            2,
            128,
            DType::BF16,
            16,
            KvLayout::Nhd,
            KvStorage::Separate,
        ),
        (8, 2, 64, DType::F16, 3, KvLayout::Hnd, KvStorage::Combined),
        (4, 4, 64, DType::F32, 1, KvLayout::Nhd, KvStorage::Separate),
        (6, 2, 80, DType::BF16, 7, KvLayout::Hnd, KvStorage::Separate),
        (
            16,
            1,
            32,
            DType::F16,
            256,
            KvLayout::Nhd,
            KvStorage::Separate,
        ),
        (
            2,
            1,
            256,
            DType::F32,
            16,
            KvLayout::Hnd,
            KvStorage::Combined,
        ),
    ];
    for (hq, hkv, d, dt, ps, layout, storage) in cases {
        let h = HeadConfig::new(hq, hkv, d).unwrap();
        let mut s = CaseSpec::decode("e", h, ps, 4, 0, dt);
        s.name = format!(
            "decode {hq}/{hkv}/{d} {} ps{ps} {layout:?} {storage:?}",
            dt.name()
        );
        s.requests = vec![(1, 300), (1, 0), (1, 1), (1, 77)];
        s.layout = layout;
        s.storage = storage;
        for p in [1, 48] {
            check(&emu, &cpu, &s, &PlanConfig::with_parallelism(p), seed(i));
            i += 1;
        }
    }
}

#[test]
fn emulated_options() {
    let (emu, cpu) = setup("options");
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let opts = [
        AttentionOptions::default()
            .with_logits_soft_cap(3.0)
            .with_sm_scale(0.3),
        AttentionOptions::default()
            .with_causal(true)
            .with_window_left(40),
        AttentionOptions::default().with_window_left(0),
        AttentionOptions::default().with_pos_encoding(PosEncoding::Alibi),
        AttentionOptions::default()
            .with_pos_encoding(PosEncoding::Rope {
                theta: 1e4,
                scale: 2.0,
            })
            .with_window_left(50)
            .with_logits_soft_cap(20.0),
    ];
    for (i, o) in opts.into_iter().enumerate() {
        for dt in [DType::BF16, DType::F32] {
            let mut s = CaseSpec::decode("o", h, 16, 3, 0, dt);
            s.name = format!("options {i} {}", dt.name());
            s.requests = vec![(1, 200), (1, 0), (1, 129)];
            s.options = o;
            s.input_scale = 3.0;
            for p in [1, 32] {
                check(
                    &emu,
                    &cpu,
                    &s,
                    &PlanConfig::with_parallelism(p),
                    seed(i as u64),
                );
            }
        }
    }
}

#[test]
fn emulated_custom_masks() {
    // The mask read of the attention kernel (decode, and f32 prefill tiles) and of the
    // tensor-core prefill kernel (bf16 prefill), split and unsplit, with rows that see
    // nothing; masked keys whose V is infinite or NaN contribute nothing (the tensor-core
    // kernel's non-finite-V path must honour the mask).
    let (emu, cpu) = setup("masks");
    let mut i = 300;
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for (decode, dt, causal) in [
        (true, DType::F32, false),
        (false, DType::F32, true),
        (false, DType::BF16, true),
        (false, DType::BF16, false),
    ] {
        let mut s = CaseSpec::decode("m", h, 16, 1, 1, dt);
        s.name = format!("mask decode {decode} {} causal {causal}", dt.name());
        s.decode = decode;
        s.requests = if decode {
            vec![(1, 300), (1, 0), (1, 2), (1, 90)]
        } else {
            vec![(9, 70), (0, 0), (3, 3), (20, 40)]
        };
        s.options.causal = causal;
        s.custom_mask = Some(MaskSpec {
            density: 0.6,
            zero_row_stride: 4,
        });
        for p in [1, 48] {
            let mut c = PlanConfig::with_parallelism(p);
            c.min_kv_chunk = 16;
            check(&emu, &cpu, &s, &c, seed(i));
            i += 1;
        }
    }
    // Key 5 of request 0 is masked for every row; its V is NaN and its K infinite.
    let mut s = CaseSpec::decode("mv", h, 16, 1, 1, DType::BF16);
    s.name = "mask over non-finite K/V (tensor-core kernel)".into();
    s.decode = false;
    s.requests = vec![(6, 40)];
    let mut data = s.materialise(seed(i)).unwrap();
    let bits: Vec<bool> = (0..6 * 40).map(|e| e % 40 != 5 && e % 7 != 0).collect();
    data.custom_mask = Some(PackedMask::from_requests(&[bits]));
    poison_v_token(&mut data, 5, f64::NAN);
    data.set_row(Input::K, 0, 5, f64::INFINITY).unwrap();
    let plan = data.plan(&PlanConfig::with_parallelism(1)).unwrap();
    let (o, lse) = emu.run(&data, &plan);
    let c = data.compare(&o, &lse, &data.reference().unwrap());
    assert!(c.passed(), "{}: {c:?}", s.name);
    // With RoPE the kernels do not read masks: a typed refusal naming the argument.
    s.options.pos_encoding = PosEncoding::Rope {
        theta: 1e4,
        scale: 1.0,
    };
    let mut data = s.materialise(seed(i)).unwrap();
    data.custom_mask = Some(PackedMask::from_requests(&[vec![true; 6 * 40]]));
    let e = data
        .run_on(&emu, &PlanConfig::with_parallelism(1))
        .unwrap_err();
    assert_eq!(e.kind(), flashpage::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("custom_mask with rope"), "{e}");
}

#[test]
fn emulated_attention_sinks() {
    // The sink epilogue in the decode kernel (unsplit rows) and in the merge kernel (split
    // rows), empty requests included (o = 0, lse = the sink).
    let (emu, cpu) = setup("sinks");
    let mut i = 100;
    for (hq, hkv, d, dt) in [(8, 2, 64, DType::BF16), (4, 4, 128, DType::F32)] {
        let h = HeadConfig::new(hq, hkv, d).unwrap();
        let mut s = CaseSpec::decode("s", h, 16, 4, 0, dt);
        s.name = format!("sinks {hq}/{hkv}/{d} {}", dt.name());
        s.requests = vec![(1, 300), (1, 0), (1, 2), (1, 90)];
        s.sinks = true;
        for p in [1, 48] {
            let mut c = PlanConfig::with_parallelism(p);
            c.min_kv_chunk = 16;
            check(&emu, &cpu, &s, &c, seed(i));
            i += 1;
        }
    }
    // bf16 prefill runs on the tensor-core kernel: its unsplit rows take the epilogue too.
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let mut s = CaseSpec::decode("sp", h, 16, 4, 0, DType::BF16);
    s.name = "sinks prefill bf16 (tensor-core kernel)".into();
    s.decode = false;
    s.requests = vec![(5, 40), (0, 0), (3, 3), (9, 70)];
    s.options.causal = true;
    s.sinks = true;
    for p in [1, 48] {
        let mut c = PlanConfig::with_parallelism(p);
        c.min_kv_chunk = 16;
        check(&emu, &cpu, &s, &c, seed(i));
        i += 1;
    }
}

#[test]
fn emulated_prefill_and_graph_mode() {
    let (emu, cpu) = setup("prefill");
    let h = HeadConfig::new(4, 2, 64).unwrap();
    for storage in [KvStorage::Separate, KvStorage::Ragged] {
        let mut s = CaseSpec::decode("p", h, 16, 3, 0, DType::F32);
        s.name = format!("prefill {storage:?}");
        s.decode = false;
        s.storage = storage;
        s.requests = vec![(5, 40), (0, 0), (3, 3), (9, 70)];
        s.options.causal = true;
        for p in [1, 64] {
            check(
                &emu,
                &cpu,
                &s,
                &PlanConfig::with_parallelism(p),
                seed(p as u64),
            );
        }
    }
    // Graph mode: a fixed launch shape with padded items and merge rows.
    let h = HeadConfig::new(8, 2, 128).unwrap();
    let mut config = PlanConfig::with_parallelism(64);
    config.graph_capacity = Some(6);
    for (i, reqs) in [
        vec![(1, 0); 6],
        vec![(1, 500), (1, 0), (1, 3)],
        vec![(1, 1000), (1, 0), (1, 0), (1, 0), (1, 0), (1, 0)],
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = CaseSpec::decode("g", h, 16, 1, 0, DType::BF16);
        s.name = format!("graph batch {i}");
        s.requests = reqs;
        check(&emu, &cpu, &s, &config, seed(100 + i as u64));
    }
}

/// Sets every element of V at token `t` of the single request of `data` (paged, separate
/// storage) to `x`, for every KV head.
fn poison_v_token(data: &mut CaseData, t: usize, x: f64) {
    let h = data.spec.heads;
    let ps = data.spec.page_size;
    let page = data.batch.kv_indices()[t / ps] as usize;
    let mut v = data.v.view().to_f64_vec();
    for kh in 0..h.num_kv_heads() {
        for e in 0..h.head_dim() {
            let at = page * data.strides.page
                + (t % ps) * data.strides.token
                + kh * data.strides.head
                + e;
            v[at] = x;
        }
    }
    data.v = flashpage::Tensor::from_f64(data.spec.dtype, &v);
}

/// Rows `rows` of the emulated output are finite and within the tolerance of the reference
/// (which skips keys a row cannot see).
fn check_rows(emu: &Emulator, data: &CaseData, rows: &[usize]) {
    let plan = data.plan(&PlanConfig::with_parallelism(1)).unwrap();
    let (o, _) = emu.run(data, &plan);
    let o = o.view().to_f64_vec();
    let reference = data.reference().unwrap();
    let h = data.spec.heads;
    let width = h.num_qo_heads() * h.head_dim();
    let tol = match data.spec.dtype {
        DType::F32 => 1e-5,
        _ => 2e-2,
    };
    for &r in rows {
        let span = r * width..(r + 1) * width;
        for (i, (&got, &want)) in o[span.clone()].iter().zip(&reference.o[span]).enumerate() {
            let i = r * width + i;
            assert!(
                got.is_finite() && (got - want).abs() <= tol * (1.0 + want.abs()),
                "{}: row {r} element {i}: emulated {got}, reference {want}",
                data.spec.name
            );
        }
    }
}

/// A key a row cannot see contributes exactly nothing to P·V, even when its V is +inf or
/// NaN (0 · inf would otherwise poison the row).
#[test]
fn emulated_masked_keys_do_not_poison_visible_rows() {
    let (emu, _cpu) = setup("masked");
    let h = HeadConfig::new(4, 2, 64).unwrap();
    for dt in [DType::F32, DType::BF16] {
        // Causal prefill, 3 rows x 3 keys: V[key 2] = +inf is hidden from rows 0 and 1.
        let mut s = CaseSpec::decode("causal", h, 16, 1, 3, dt);
        s.name = format!("causal 3x3 V[2]=inf {}", dt.name());
        s.decode = false;
        s.requests = vec![(3, 3)];
        s.options.causal = true;
        let mut data = s.materialise(seed(7)).unwrap();
        poison_v_token(&mut data, 2, f64::INFINITY);
        check_rows(&emu, &data, &[0, 1]);
        // Sliding window 0: the decode row sees only its own key; V[key 0] = inf and
        // V[key 1] = NaN are outside it.
        let mut s = CaseSpec::decode("window", h, 16, 1, 3, dt);
        s.name = format!("window 0 V[0]=inf {}", dt.name());
        s.options.window_left = Some(0);
        let mut data = s.materialise(seed(8)).unwrap();
        poison_v_token(&mut data, 0, f64::INFINITY);
        poison_v_token(&mut data, 1, f64::NAN);
        check_rows(&emu, &data, &[0]);
    }
    // The cases above never put a masked and a visible key of one row into the same token
    // group and batch (3 keys land in 3 token groups, and a decode pass starts at its
    // window), so the kernel's online softmax skips the masked keys wholesale. These do:
    // with 16 token groups (head dim 64) and 2 tokens per group per batch (bf16, 8 rows),
    // keys t and t + 16 share a group and a batch.
    let mut s = CaseSpec::decode("causal-long", h, 16, 1, 64, DType::BF16);
    s.name = "causal 3x64 V[62]=inf V[63]=NaN".into();
    s.decode = false;
    s.requests = vec![(3, 64)];
    s.options.causal = true;
    let mut data = s.materialise(seed(11)).unwrap();
    // Row 0 (position 61) sees keys 0..=61: key 62 shares a group and batch with key 46.
    poison_v_token(&mut data, 62, f64::INFINITY);
    poison_v_token(&mut data, 63, f64::NAN);
    check_rows(&emu, &data, &[0]);
    let mut s = CaseSpec::decode("window-15", h, 16, 1, 32, DType::BF16);
    s.name = "causal window 15, 2x32, V[15]=inf".into();
    s.decode = false;
    s.requests = vec![(2, 32)];
    s.options.causal = true;
    s.options.window_left = Some(15);
    let mut data = s.materialise(seed(12)).unwrap();
    // Row 1 (position 31) sees keys 16..=31; key 15 (visible to row 0, so loaded) shares a
    // group and batch with key 31.
    poison_v_token(&mut data, 15, f64::INFINITY);
    check_rows(&emu, &data, &[1]);
}

/// RoPE at long positions (angles of 10^4..10^5 rad) in f32 against the f64 reference: the
/// kernel's fixed-point angle reduction must be as exact as the reference's f64 angles.
#[test]
fn emulated_rope_long_positions_f32() {
    let (emu, cpu) = setup("rope_long");
    let h = HeadConfig::new(2, 1, 64).unwrap();
    let mut s = CaseSpec::decode("rope-long", h, 16, 2, 30_000, DType::F32);
    s.requests = vec![(1, 30_000), (1, 17_001)];
    s.options.pos_encoding = PosEncoding::ROPE_DEFAULT;
    check(&emu, &cpu, &s, &PlanConfig::with_parallelism(16), seed(9));
    let mut s = s.clone();
    s.name = "rope-long scaled".into();
    s.requests = vec![(1, 20_000)];
    s.options.pos_encoding = PosEncoding::Rope {
        theta: 5e5,
        scale: 0.25,
    };
    check(&emu, &cpu, &s, &PlanConfig::with_parallelism(8), seed(10));
}

/// The emulated `ldmatrix` (plain and `.trans`) and `mma.sync.m16n8k16` against a plain
/// matrix product of distinct values, for both 16-bit dtypes: a fragment held in the wrong
/// register, transposed or permuted, gives a different product.
#[test]
fn emulated_tensor_core_fragments_match_a_plain_product() {
    let (emu, _cpu) = setup("tc_self_test");
    for dt in [DType::BF16, DType::F16] {
        let v = PrefillVariant::with_head_dim(64, dt).unwrap();
        let report = emu
            .tensor_core_self_test(&v)
            .unwrap_or_else(|e| panic!("{}: {e}", dt.name()));
        assert!(report.contains(" 0 mismatching"), "{report}");
    }
}

/// Every variant of the tensor-core prefill kernel against the f64 reference and the CPU
/// backend (poisoned outputs and float workspace, bytes after each written buffer checked):
/// f16 and bf16, causal, sliding window, soft-cap, ALiBi, custom scale, GQA groups 1 to 8,
/// head dims 16 to 128, paged (NHD, HND, combined, page sizes 1 to 16) and ragged K/V,
/// unsplit and split (partial states merged by the merge kernel), rows past one 64-row pass
/// and KV past one tile, empty requests.
#[test]
fn emulated_tensor_core_prefill_matches_reference_and_cpu() {
    let (emu, cpu) = setup("tc_prefill");
    let causal = AttentionOptions::default().with_causal(true);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        (usize, usize, usize),
        usize,
        KvLayout,
        KvStorage,
        AttentionOptions,
        Vec<(usize, usize)>,
    )> = vec![
        (
            "gqa4 causal paged",
            (8, 2, 64),
            16,
            KvLayout::Nhd,
            KvStorage::Separate,
            causal,
            vec![(5, 40), (0, 0), (3, 3), (21, 150)],
        ),
        (
            "gqa2 ragged",
            (4, 2, 64),
            16,
            KvLayout::Nhd,
            KvStorage::Ragged,
            AttentionOptions::default(),
            vec![(9, 70), (1, 1), (0, 5), (40, 40)],
        ),
        (
            "window soft-cap causal hnd",
            (4, 1, 64),
            3,
            KvLayout::Hnd,
            KvStorage::Separate,
            causal.with_window_left(20).with_logits_soft_cap(4.0),
            vec![(30, 100), (7, 7)],
        ),
        (
            "alibi scale combined d128",
            (4, 4, 128),
            1,
            KvLayout::Nhd,
            KvStorage::Combined,
            AttentionOptions::default()
                .with_pos_encoding(PosEncoding::Alibi)
                .with_sm_scale(0.05),
            vec![(17, 80), (2, 9)],
        ),
        (
            "gqa8 d80 window only",
            (8, 1, 80),
            7,
            KvLayout::Nhd,
            KvStorage::Separate,
            AttentionOptions::default().with_window_left(33),
            vec![(12, 90)],
        ),
        (
            "mha d16 causal alibi soft-cap",
            (2, 2, 16),
            16,
            KvLayout::Hnd,
            KvStorage::Separate,
            causal
                .with_pos_encoding(PosEncoding::Alibi)
                .with_logits_soft_cap(10.0),
            vec![(33, 70), (4, 64)],
        ),
    ];
    let mut i = 0;
    for (name, (hq, hkv, d), ps, layout, storage, options, requests) in cases {
        for dt in [DType::BF16, DType::F16] {
            let h = HeadConfig::new(hq, hkv, d).unwrap();
            let mut s = CaseSpec::decode("tc", h, ps, 1, 0, dt);
            s.name = format!("tc prefill {name} {}", dt.name());
            s.decode = false;
            s.layout = layout;
            s.storage = storage;
            s.options = options;
            s.requests = requests.clone();
            s.input_scale = 2.0;
            // Unsplit; split into small KV chunks (not multiples of the kernel's tile);
            // two 64-row passes per work item.
            let mut split = PlanConfig::with_parallelism(64);
            split.min_kv_chunk = 16;
            let mut wide = PlanConfig::with_parallelism(1);
            wide.q_tile = 128;
            for (k, config) in [PlanConfig::with_parallelism(1), split, wide]
                .into_iter()
                .enumerate()
            {
                let data = s.materialise(seed(500 + i)).unwrap();
                let plan = data.plan(&config).unwrap();
                assert!(
                    PrefillVariant::for_plan(&plan, dt, EMULATED_ARCH).is_some(),
                    "{}: not routed to the tensor-core kernel",
                    s.name
                );
                if k == 1 {
                    assert!(plan.num_merge_rows() > 0, "{}: no split rows", s.name);
                }
                check(&emu, &cpu, &s, &config, seed(500 + i));
                i += 1;
            }
        }
    }
}

/// The declarative suite (`data/*.toml`) on the emulated kernels through the same runner
/// interface as the CPU and GPU suites, against the f64 reference, plus every
/// expected-error case. To keep the emulation (every CUDA thread of every block run on the
/// host) within CI time, each case runs at the first and last parallelism it lists
/// (unsplit and most split) and at the first dtype it lists (the kernels differ between
/// dtypes only in their loads and stores, which the other emulation tests cover), prefill
/// cases (and masks.toml's prefill cases) also at their first 16-bit dtype (the tensor-core
/// kernel), numerics.toml at every
/// dtype. `--nocapture` prints each case's time.
#[test]
fn the_suite_on_the_emulated_kernels() {
    let emu = Emulator::new("suite").unwrap_or_else(|e| panic!("{e}"));
    let suite = Suite::embedded().unwrap();
    let seed = suite::seed_from_env();
    let runners: [&dyn HostRunner; 1] = [&emu];
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in &suite.cases {
        let mut case = case.clone();
        let (first, last) = (
            case.parallelism[0],
            case.parallelism[case.parallelism.len() - 1],
        );
        case.parallelism = if first == last {
            vec![first]
        } else {
            vec![first, last]
        };
        let dtypes = if case.file == "numerics.toml" {
            case.dtypes.clone()
        } else {
            let mut d = case.dtypes[..1].to_vec();
            // Prefill also at its first 16-bit dtype: the tensor-core kernel's plans.
            if (case.file == "prefill.toml"
                || (case.file == "masks.toml" || case.file == "fp8.toml") && !case.spec.decode)
                && let Some(&h) = case.dtypes.iter().find(|t| t.size() == 2)
                && h != d[0]
            {
                d.push(h);
            }
            d
        };
        let t = std::time::Instant::now();
        for dtype in dtypes {
            for run in case.run(dtype, &runners, seed) {
                runs += 1;
                if !run.passed() {
                    failures.push(run.to_string());
                }
            }
        }
        println!("{}: {:.1} s", case.name, t.elapsed().as_secs_f64());
    }
    for e in &suite.errors {
        if let Err(why) = e.check(&emu) {
            failures.push(why);
        }
    }
    assert!(runs > 0);
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Element by element against the reference: NaN where it has NaN, the same infinity, and
/// within tolerance of the row's finite scale elsewhere (docs/numerics.md, guarantee 3).
fn check_ieee(emu: &Emulator, data: &CaseData, what: &str) {
    let r = data.reference().unwrap();
    let d = data.spec.heads.head_dim();
    let tol = flashpage_testkit::reference::tolerance(data.spec.dtype);
    for par in [1, 64] {
        let plan = data.plan(&PlanConfig::with_parallelism(par)).unwrap();
        let (o, lse) = emu.run(data, &plan);
        let o = o.view().to_f64_vec();
        for (state, (&l, &rl)) in lse.iter().zip(&r.lse).enumerate() {
            let ctx = format!("{what} {:?} par={par} state {state}", data.spec.dtype);
            let rl = rl as f32;
            assert!(
                (l.is_nan() && rl.is_nan()) || l == rl || (l - rl).abs() <= 1e-3 * rl.abs(),
                "{ctx}: lse {l}, reference {rl}"
            );
            let want = &r.o[state * d..(state + 1) * d];
            let scale = want
                .iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |m, x| m.max(x.abs()));
            for (c, (&x, &y)) in o[state * d..(state + 1) * d].iter().zip(want).enumerate() {
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

#[test]
fn emulated_non_finite_and_extreme_inputs() {
    use flashpage_testkit::case::Input;
    let emu = Emulator::new("nonfinite").unwrap_or_else(|e| panic!("{e}"));
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let decode = |seed: u64| {
            let mut s = CaseSpec::decode("nf", h, 16, 2, 0, dtype);
            s.requests = vec![(1, 5), (1, 90)];
            s.materialise(seed).unwrap()
        };
        // NaN in a visible q or K element: the row is NaN, not empty.
        let mut data = decode(1);
        data.set_row(Input::Q, 0, 0, f64::NAN).unwrap();
        data.set_row(Input::K, 1, 70, f64::NAN).unwrap();
        check_ieee(&emu, &data, "q/K NaN");
        // K = -inf against q = 1 (logit -inf: weight 0) with V = inf: contributes nothing.
        let mut data = decode(2);
        data.set_row(Input::Q, 0, 0, 1.0).unwrap();
        data.set_row(Input::Q, 1, 0, 1.0).unwrap();
        data.set_row(Input::K, 0, 1, f64::NEG_INFINITY).unwrap();
        data.set_row(Input::V, 0, 1, f64::INFINITY).unwrap();
        data.set_row(Input::K, 1, 40, f64::NEG_INFINITY).unwrap();
        data.set_row(Input::V, 1, 40, f64::NAN).unwrap();
        check_ieee(&emu, &data, "K -inf, V inf");
        // Every key of logit -inf: an empty row (o = 0, lse = -inf).
        let mut data = decode(3);
        data.set_row(Input::Q, 0, 0, 1.0).unwrap();
        for pos in 0..5 {
            data.set_row(Input::K, 0, pos, f64::NEG_INFINITY).unwrap();
        }
        check_ieee(&emu, &data, "all K -inf");
        // Visible V = inf: that element non-finite where the reference's is.
        let mut data = decode(4);
        data.set_row(Input::V, 1, 3, f64::INFINITY).unwrap();
        check_ieee(&emu, &data, "V inf");
        // Logits past the f32 range (+inf and -inf in f32) from finite inputs of one sign: the
        // softmax's limit, finite o. (Every logit hugely negative, or an overflow of mixed
        // signs, needs a recomputation the CUDA kernels do not do yet: docs/numerics.md.)
        let mut data = decode(5);
        data.set_row(Input::Q, 0, 0, 1e20).unwrap();
        data.set_row(Input::K, 0, 0, 1e20).unwrap();
        data.set_row(Input::K, 0, 1, -1e20).unwrap();
        check_ieee(&emu, &data, "extreme logits");
        // A soft-cap maps an infinite logit to +-c: finite.
        let mut s = CaseSpec::decode("cap", h, 16, 1, 0, dtype);
        s.requests = vec![(1, 9)];
        s.options.logits_soft_cap = Some(30.0);
        let mut data = s.materialise(6).unwrap();
        data.set_row(Input::Q, 0, 0, 1.0).unwrap();
        data.set_row(Input::K, 0, 3, f64::INFINITY).unwrap();
        check_ieee(&emu, &data, "soft-cap, K inf");
        // The smallest valid scale: a proper softmax (the mean of V), not an empty row.
        let mut s = CaseSpec::decode("tiny-scale", h, 16, 1, 0, dtype);
        s.requests = vec![(1, 33)];
        s.options.sm_scale = Some(f32::MIN_POSITIVE);
        check_ieee(&emu, &s.materialise(7).unwrap(), "sm_scale = MIN_POSITIVE");
    }
}

#[test]
fn emulated_strided_q_o_and_v() {
    // q from a fused QKV buffer, o into a buffer with gaps (left untouched), V in the other
    // layout than K: decode (split and merged) and causal prefill, paged and ragged.
    let (emu, cpu) = setup("strided");
    let config = PlanConfig::with_parallelism(8);
    let mut cases = Vec::new();
    let mut dec = CaseSpec::decode(
        "strided decode",
        HeadConfig::new(8, 2, 64).unwrap(),
        16,
        3,
        700,
        DType::BF16,
    );
    dec.requests = vec![(1, 700), (1, 1), (1, 90)];
    cases.push(dec);
    let mut pre = CaseSpec::decode(
        "strided prefill hnd",
        HeadConfig::new(4, 2, 32).unwrap(),
        8,
        2,
        40,
        DType::F32,
    );
    pre.decode = false;
    pre.layout = KvLayout::Hnd;
    pre.requests = vec![(17, 40), (5, 9)];
    pre.options = AttentionOptions::new().with_causal(true);
    let mut rag = pre.clone();
    cases.push(pre);
    rag.name = "strided ragged f16".into();
    rag.storage = KvStorage::Ragged;
    rag.dtype = DType::F16;
    let mut tc = rag.clone();
    cases.push(rag);
    // Paged bf16 prefill: the tensor-core kernel (V offsets of its own, strided q and o).
    tc.name = "strided paged prefill bf16 (tensor-core)".into();
    tc.storage = KvStorage::Separate;
    tc.dtype = DType::BF16;
    cases.push(tc);
    for (i, spec) in cases.iter().enumerate() {
        let s = seed(300 + i as u64);
        let data = spec.materialise(s).unwrap();
        let plan = data.plan(&config).unwrap();
        let st = StridedLayout::new(&data, s ^ 1);
        let (o, lse) = emu.run_strided(&data, &plan, &st);
        let poison = flashpage_testkit::poisoned(spec.dtype, st.o_len);
        let g = st
            .gather(&data, &o, &poison)
            .unwrap_or_else(|e| panic!("{} (seed {s}): {e}", spec.name));
        let reference = data.reference().unwrap();
        let c = data.compare(&g, &lse, &reference);
        assert!(c.passed(), "{} (seed {s}) vs reference: {c:?}", spec.name);
        let (co, clse) = data.run_cpu(&cpu, &config).unwrap();
        let (e, el) = CaseData::output_difference(&g, &lse, &co, &clse);
        assert!(
            e <= c.tolerance && el <= c.tolerance,
            "{} (seed {s}) vs cpu: o {e:e}, lse {el:e}",
            spec.name
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

/// FP8 caches (e4m3fn and e5m2, per-tensor and per-KV-head scales) on the emulated attention
/// kernel (decode plans, q of every float dtype, split KV) and tensor-core prefill kernel (f16
/// and bf16 q, causal, split), against the f64 reference on the exactly dequantised cache with
/// q's tolerance (as the CPU's FP8 tests) and against the CPU backend.
#[test]
fn emulated_fp8_decode_and_prefill() {
    let (emu, cpu) = setup("fp8");
    let mut i = 0u64;
    let hd = HeadConfig::new(8, 2, 128).unwrap();
    let hp = HeadConfig::new(8, 2, 64).unwrap();
    for fp8 in fp8_specs() {
        for dtype in DType::ALL {
            let mut spec = CaseSpec::decode("fp8 decode", hd, 16, 1, 0, dtype);
            spec.requests = vec![(1, 300), (1, 1), (1, 33), (1, 0)];
            spec.fp8 = Some(fp8);
            let mut config = PlanConfig::with_parallelism(16);
            config.min_kv_chunk = 16;
            i += 1;
            check(&emu, &cpu, &spec, &config, seed(500 + i));
        }
        for dtype in [DType::F16, DType::BF16] {
            let mut spec = CaseSpec::decode("fp8 prefill", hp, 16, 1, 0, dtype);
            spec.decode = false;
            spec.requests = vec![(3, 90), (40, 70), (0, 0), (17, 17)];
            spec.options = AttentionOptions::default().with_causal(true);
            spec.fp8 = Some(fp8);
            let mut config = PlanConfig::with_parallelism(16);
            config.min_kv_chunk = 16;
            let data = spec.materialise(1).unwrap();
            let plan = data.plan(&config).unwrap();
            assert!(
                PrefillVariant::for_plan(&plan, dtype, EMULATED_ARCH).is_some(),
                "the tensor-core kernel runs these plans"
            );
            i += 1;
            check(&emu, &cpu, &spec, &config, seed(500 + i));
        }
    }
}

/// The cache's non-finite codes on the emulated kernels (decode with f32 q, tensor-core
/// prefill with bf16 q): a NaN V code (e4m3fn's S.1111.111, e5m2's S.11111.1x) in a key the
/// rows cannot see (outside the sliding window) contributes nothing, one they see makes the
/// rows NaN; an e5m2 infinity behaves as the reference's.
#[test]
fn emulated_fp8_non_finite_codes() {
    let emu = Emulator::new("fp8nan").unwrap_or_else(|e| panic!("{e}"));
    let h = HeadConfig::new(4, 2, 64).unwrap();
    for dtype in DType::FP8 {
        for (decode, qdt) in [(true, DType::F32), (false, DType::BF16)] {
            let mut spec = CaseSpec::decode("fp8 nan", h, 16, 1, 40, qdt);
            if !decode {
                spec.decode = false;
                spec.requests = vec![(4, 40)];
            }
            spec.options = AttentionOptions::default()
                .with_causal(true)
                .with_window_left(Some(10));
            spec.fp8 = Some(Fp8Spec {
                dtype,
                per_head: true,
            });
            // Key 3 is outside every row's window (positions 36..=39 see 26..=39), key 35
            // inside.
            for (key, visible) in [(3, false), (35, true)] {
                let mut data = spec.materialise(seed(key as u64)).unwrap();
                data.set_row(Input::V, 0, key, f64::NAN).unwrap();
                let plan = data.plan(&PlanConfig::with_parallelism(1)).unwrap();
                assert_eq!(
                    PrefillVariant::for_plan(&plan, qdt, EMULATED_ARCH).is_some(),
                    !decode
                );
                let (o, lse) = emu.run(&data, &plan);
                let ov = o.view().to_f64_vec();
                let what = format!("{} {} key {key}", dtype.name(), qdt.name());
                if visible {
                    assert!(ov.iter().all(|x| x.is_nan()), "{what}");
                } else {
                    assert!(ov.iter().all(|x| x.is_finite()), "{what}");
                    let c = data.compare(&o, &lse, &data.reference().unwrap());
                    assert!(c.passed(), "{what}: {c:?}");
                }
            }
            if dtype == DType::E5M2 {
                // +inf in a visible V: the reference's IEEE result (inf or NaN per element).
                let mut data = spec.materialise(seed(77)).unwrap();
                data.set_row(Input::V, 0, 36, f64::INFINITY).unwrap();
                check_ieee(&emu, &data, &format!("e5m2 inf {}", qdt.name()));
            }
        }
    }
}
