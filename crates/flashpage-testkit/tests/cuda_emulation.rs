//! The CUDA kernels run in the host emulation (no GPU): each case is compared with the f64
//! reference and with the CPU backend, outputs and the float workspace poisoned first.
#![cfg(feature = "cuda")]

use flashpage::backend::cpu::CpuBackend;
use flashpage::{AttentionOptions, DType, HeadConfig, KvLayout, PlanConfig, PosEncoding};
use flashpage_testkit::case::{CaseData, CaseSpec, KvStorage};
use flashpage_testkit::emulate::Emulator;

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
