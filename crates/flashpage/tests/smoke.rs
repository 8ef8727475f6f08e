use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::*;
use flashpage_testkit::case::{CaseSpec, KvStorage};

fn check(spec: &CaseSpec, parallelism: usize) {
    let data = spec.materialise(7).unwrap();
    let r = data.reference().unwrap();
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        let (o, lse) = data
            .run_cpu(&cpu, &PlanConfig::with_parallelism(parallelism))
            .unwrap();
        let c = data.compare(&o, &lse, &r);
        assert!(
            c.passed(),
            "{} {:?} p={parallelism}: {c:?}",
            spec.name,
            level
        );
    }
}

#[test]
fn smoke_decode_and_prefill() {
    let h = HeadConfig::new(8, 2, 64).unwrap();
    for dtype in DType::ALL {
        let mut s = CaseSpec::decode("d", h, 16, 3, 100, dtype);
        s.requests = vec![(1, 100), (1, 0), (1, 1), (1, 700)];
        check(&s, 1);
        check(&s, 64);
        let mut p = s.clone();
        p.decode = false;
        p.requests = vec![(5, 100), (0, 0), (1, 1), (70, 300)];
        p.options.causal = true;
        check(&p, 1);
        check(&p, 256);
        p.storage = KvStorage::Ragged;
        check(&p, 64);
        p.storage = KvStorage::Combined;
        p.layout = KvLayout::Hnd;
        p.options.window_left = Some(20);
        p.options.logits_soft_cap = Some(5.0);
        p.options.pos_encoding = PosEncoding::ROPE_DEFAULT;
        check(&p, 64);
        p.options.pos_encoding = PosEncoding::Alibi;
        check(&p, 64);
    }
}

/// At long context the RoPE angle `pos · θ` reaches 10^4..10^5 rad: formed in f32 it would
/// be off by ~10^-3 rad and break the f32 tolerance.
#[test]
fn rope_long_positions_f32() {
    let h = HeadConfig::new(4, 2, 64).unwrap();
    let mut s = CaseSpec::decode("rope-long", h, 16, 2, 30_000, DType::F32);
    s.requests = vec![(1, 30_000), (1, 17_001)];
    s.options.pos_encoding = PosEncoding::ROPE_DEFAULT;
    check(&s, 1);
    check(&s, 64);
    let mut p = s.clone();
    p.decode = false;
    p.requests = vec![(3, 25_000)];
    p.options.causal = true;
    check(&p, 16);
}
