//! Strided q and o, and V with strides of its own: q read from a fused QKV projection
//! buffer, o written into a wider buffer (the gaps between its rows and heads must stay
//! untouched), V in another layout than K. Checked against the f64 reference at every SIMD
//! level, decode and prefill, paged and ragged, and bit for bit against the contiguous run
//! of the same inputs; each bad stride is a typed error naming the tensor.

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::backend::{KvCache, RunArgs};
use flashpage::{
    AttentionOptions, DType, Error, HeadConfig, KvLayout, KvStrides, PlanConfig, QoStrides,
    RunStrides, Tensor,
};
use flashpage_testkit::case::{CaseData, CaseSpec, KvStorage};
use flashpage_testkit::strided::StridedLayout;

fn with_v<'a>(data: &'a CaseData, st: &'a StridedLayout) -> KvCache<'a> {
    let kv = data.kv_cache();
    let cache = if data.spec.storage == KvStorage::Ragged {
        KvCache::ragged(kv.k, st.v.view(), kv.strides, kv.num_pages)
    } else {
        KvCache::paged(kv.k, st.v.view(), kv.strides, kv.num_pages, kv.kv_indices)
    };
    cache.with_v_strides(st.v_strides)
}

/// Runs `spec` strided at `simd` and checks it: against the reference, bit for bit against
/// the contiguous run, every o element written and every gap element untouched.
fn check(spec: &CaseSpec, seed: u64, simd: SimdLevel) {
    let data = spec.materialise(seed).unwrap();
    let st = StridedLayout::new(&data, seed ^ 0x5eed);
    let cpu = CpuBackend::with_simd(2, simd).unwrap();
    let config = PlanConfig::with_parallelism(8);
    let plan = data.plan(&config).unwrap();
    let hq = spec.heads.num_qo_heads();
    let rows = data.rows();

    let (dense_o, dense_lse) = data.run_cpu(&cpu, &config).unwrap();

    let poison = flashpage_testkit::case::poisoned(spec.dtype, st.o_len);
    let mut o = poison.clone();
    let mut lse = vec![f32::NAN; rows * hq];
    let mut ws =
        flashpage::workspace::HostWorkspace::new(plan.requirement().float.total()).unwrap();
    cpu.run_strided(
        &plan,
        RunArgs {
            // q starts at the first element of the fused buffer.
            q: st.qkv.view(),
            kv: with_v(&data, &st),
            o: o.view_mut(),
            lse: Some(&mut lse),
            sinks: None,
            custom_mask: None,
        },
        st.strides,
        ws.as_bytes_mut(),
    )
    .unwrap();
    let g = st
        .gather(&data, &o, &poison)
        .unwrap_or_else(|e| panic!("{} ({}): {e}", spec.name, simd.name()));
    assert_eq!(
        g.to_le_bytes(),
        dense_o.to_le_bytes(),
        "{} ({}): strided o differs from the contiguous run",
        spec.name,
        simd.name()
    );
    assert_eq!(
        lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        dense_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let r = data.reference().unwrap();
    let c = data.compare(&g, &lse, &r);
    assert!(c.passed(), "{} ({}): {c:?}", spec.name, simd.name());
}

fn specs() -> Vec<CaseSpec> {
    let mut out = Vec::new();
    for (name, heads, decode, storage, layout, dtype) in [
        (
            "decode gqa nhd bf16",
            HeadConfig::new(8, 2, 64).unwrap(),
            true,
            KvStorage::Separate,
            KvLayout::Nhd,
            DType::BF16,
        ),
        (
            "decode mha hnd f32",
            HeadConfig::new(4, 4, 32).unwrap(),
            true,
            KvStorage::Separate,
            KvLayout::Hnd,
            DType::F32,
        ),
        (
            "prefill gqa nhd f16",
            HeadConfig::new(4, 2, 64).unwrap(),
            false,
            KvStorage::Separate,
            KvLayout::Nhd,
            DType::F16,
        ),
        (
            "prefill ragged bf16",
            HeadConfig::new(6, 2, 32).unwrap(),
            false,
            KvStorage::Ragged,
            KvLayout::Nhd,
            DType::BF16,
        ),
    ] {
        let mut s = CaseSpec::decode(name, heads, 16, 3, 70, dtype);
        s.decode = decode;
        s.storage = storage;
        s.layout = layout;
        if !decode {
            s.requests = vec![(17, 40), (1, 9), (33, 33)];
            s.options = AttentionOptions::new().with_causal(true);
        } else {
            s.requests = vec![(1, 70), (1, 1), (1, 300)];
        }
        out.push(s);
    }
    out
}

#[test]
fn strided_runs_match_the_reference_at_every_simd_level() {
    for simd in SimdLevel::available() {
        for (i, spec) in specs().iter().enumerate() {
            check(spec, 100 + i as u64, simd);
        }
    }
}

#[test]
fn strided_decode_with_rope_and_split_kv() {
    // RoPE widens the tiles; a long request at low parallelism splits and merges, so o is
    // written by the merge step too.
    let heads = HeadConfig::new(8, 1, 128).unwrap();
    let mut s = CaseSpec::decode("decode rope split", heads, 8, 2, 2000, DType::BF16);
    s.options = AttentionOptions::new().with_pos_encoding(flashpage::PosEncoding::Rope {
        theta: 10_000.0,
        scale: 1.0,
    });
    for simd in SimdLevel::available() {
        check(&s, 7, simd);
    }
}

/// A small paged decode case and its plan, for the error tests.
fn error_case() -> (CaseData, flashpage::Plan) {
    let heads = HeadConfig::new(4, 2, 32).unwrap();
    let spec = CaseSpec::decode("errors", heads, 16, 2, 40, DType::F32);
    let data = spec.materialise(3).unwrap();
    let plan = data.plan(&PlanConfig::with_parallelism(2)).unwrap();
    (data, plan)
}

fn run_err(
    data: &CaseData,
    plan: &flashpage::Plan,
    q_len: usize,
    o_len: usize,
    strides: RunStrides,
    v: Option<KvStrides>,
) -> Error {
    let cpu = CpuBackend::new(1).unwrap();
    let q = vec![0.5f32; q_len];
    let mut o = vec![f32::NAN; o_len];
    let mut lse = vec![f32::NAN; 2 * 4];
    let mut ws =
        flashpage::workspace::HostWorkspace::new(plan.requirement().float.total()).unwrap();
    let mut kv = data.kv_cache();
    if let Some(v) = v {
        kv = kv.with_v_strides(v);
    }
    let e = cpu
        .run_strided(
            plan,
            RunArgs {
                q: flashpage::TensorRef::F32(&q),
                kv,
                o: flashpage::TensorMut::F32(&mut o),
                lse: Some(&mut lse),
                sinks: None,
                custom_mask: None,
            },
            strides,
            ws.as_bytes_mut(),
        )
        .unwrap_err();
    assert!(o.iter().all(|x| x.is_nan()), "nothing written on error");
    e
}

fn shape_err(e: &Error) -> (&'static str, &str, &str) {
    match e {
        Error::TensorShape {
            tensor,
            expected,
            actual,
        } => (tensor, expected.as_str(), actual.as_str()),
        other => panic!("expected a tensor shape error, got {other:?}"),
    }
}

#[test]
fn bad_strides_are_typed_errors() {
    let (data, plan) = error_case();
    let (rows, hq, d) = (2, 4, 32);
    let dense = QoStrides::contiguous(hq, d);
    let n = rows * hq * d;

    // o heads overlapping (head stride below head_dim).
    let e = run_err(
        &data,
        &plan,
        n,
        4 * n,
        RunStrides::new(dense, QoStrides::new(hq * d, d - 16)),
        None,
    );
    let (t, exp, act) = shape_err(&e);
    assert_eq!(t, "o");
    assert!(exp.contains("do not overlap"), "{exp}");
    assert_eq!(
        act,
        format!("row stride {}, head stride {}", hq * d, d - 16)
    );

    // o rows overlapping the next row's heads.
    let e = run_err(
        &data,
        &plan,
        n,
        4 * n,
        RunStrides::new(dense, QoStrides::new((hq - 1) * d, d)),
        None,
    );
    assert_eq!(shape_err(&e).0, "o");

    // o (and q) too short for the last element.
    let wide = QoStrides::new(hq * d + 64, d);
    let need = wide.extent(rows, hq, d).unwrap();
    let e = run_err(
        &data,
        &plan,
        need,
        need - 1,
        RunStrides::new(wide, wide),
        None,
    );
    let (t, exp, act) = shape_err(&e);
    assert_eq!(t, "o");
    assert!(exp.contains(&format!("at least {need} elements")), "{exp}");
    assert_eq!(act, format!("{} elements", need - 1));
    let e = run_err(
        &data,
        &plan,
        need - 1,
        need,
        RunStrides::new(wide, dense),
        None,
    );
    assert_eq!(shape_err(&e).0, "q");

    // Overflowing strides are a size error naming q.
    let e = run_err(
        &data,
        &plan,
        n,
        n,
        RunStrides::new(QoStrides::new(usize::MAX, d), dense),
        None,
    );
    assert!(matches!(e, Error::SizeOverflow { what: "q" }), "{e:?}");

    // q may overlap itself (it is only read): a head stride of 0 is accepted.
    let cpu = CpuBackend::new(1).unwrap();
    let q = vec![0.25f32; (rows - 1) * hq * d + d];
    let mut o = vec![f32::NAN; n];
    let mut lse = vec![f32::NAN; rows * hq];
    let mut ws =
        flashpage::workspace::HostWorkspace::new(plan.requirement().float.total()).unwrap();
    cpu.run_strided(
        &plan,
        RunArgs {
            q: flashpage::TensorRef::F32(&q),
            kv: data.kv_cache(),
            o: flashpage::TensorMut::F32(&mut o),
            lse: Some(&mut lse),
            sinks: None,
            custom_mask: None,
        },
        RunStrides::new(QoStrides::new(hq * d, 0), dense),
        ws.as_bytes_mut(),
    )
    .unwrap();
    assert!(o.iter().all(|x| x.is_finite()));

    // V strides: a head stride below head_dim, and strides past V's end.
    let s = data.strides;
    let e = run_err(
        &data,
        &plan,
        n,
        n,
        RunStrides::contiguous(&data.spec.heads),
        Some(KvStrides { head: 16, ..s }),
    );
    let (t, _, act) = shape_err(&e);
    assert_eq!(t, "v_cache");
    assert!(act.contains("head 16"), "{act}");
    let e = run_err(
        &data,
        &plan,
        n,
        n,
        RunStrides::contiguous(&data.spec.heads),
        Some(KvStrides {
            page: s.page + 16,
            ..s
        }),
    );
    let (t, exp, _) = shape_err(&e);
    assert_eq!(t, "v_cache");
    assert!(exp.contains("at least"), "{exp}");
}

#[test]
fn contiguous_strides_equal_the_plain_run() {
    // run_strided with contiguous strides is run (and accepts a larger o, leaving the tail).
    let (data, plan) = error_case();
    let cpu = CpuBackend::new(2).unwrap();
    let config = PlanConfig::with_parallelism(2);
    let (o_plain, _) = data.run_cpu(&cpu, &config).unwrap();
    let n = o_plain.len();
    let mut o = vec![f32::NAN; n + 40];
    let mut lse = vec![f32::NAN; 2 * 4];
    let mut ws =
        flashpage::workspace::HostWorkspace::new(plan.requirement().float.total()).unwrap();
    cpu.run_strided(
        &plan,
        RunArgs {
            q: data.q.view(),
            kv: data.kv_cache(),
            o: flashpage::TensorMut::F32(&mut o),
            lse: Some(&mut lse),
            sinks: None,
            custom_mask: None,
        },
        RunStrides::contiguous(&data.spec.heads),
        ws.as_bytes_mut(),
    )
    .unwrap();
    assert_eq!(Tensor::F32(o[..n].to_vec()), o_plain);
    assert!(o[n..].iter().all(|x| x.is_nan()));
}
