//! The CUDA kernels run in the host emulation (no GPU): each case is compared with the f64
//! reference and with the CPU backend, outputs and the float workspace poisoned first.
#![cfg(feature = "cuda")]

use flashpage::backend::cpu::CpuBackend;
use flashpage::{AttentionOptions, DType, HeadConfig, KvLayout, PlanConfig, PosEncoding};
use flashpage_testkit::case::{CaseData, CaseSpec, KvStorage};
use flashpage_testkit::emulate::Emulator;
use flashpage_testkit::strided::StridedLayout;

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
    cases.push(rag);
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
