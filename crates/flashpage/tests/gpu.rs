//! CUDA backend specifics: a missing device is a typed error, arguments are refused before
//! any launch, graph capture/replay, occupancy and a small case for the sanitizers. What the
//! kernels compute is checked by the case suite on the GPU
//! (`crates/flashpage-testkit/tests/gpu_suite.rs`, and `flashpage check --backend cuda`).
//! Each test that needs a GPU first opens one; without a driver, NVRTC or device it prints
//! `skipped: <reason>` and passes, unless `FLASHPAGE_REQUIRE_GPU=1` (the device check sets
//! it): then a missing GPU fails every test. Run them on the GPU machine through
//! `bash .ci/gpu/stage.sh` and `bash .gpu/on_device.sh all`.
#![cfg(feature = "cuda")]

use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::cuda::{CudaBackend, DeviceElem, DeviceRunArgs, DeviceWorkspace};
use flashpage::*;
use flashpage_testkit::case::{CaseData, CaseSpec, KvStorage};
use half::{bf16, f16};

fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(g) => Some(g),
        Err(Error::BackendUnavailable { reason, .. })
            if std::env::var_os("FLASHPAGE_REQUIRE_GPU").is_none_or(|v| v != "1") =>
        {
            println!("skipped: {reason}");
            None
        }
        Err(e) => panic!("opening the gpu failed with an unexpected error: {e}"),
    }
}

/// Host data as the typed storage of the device (`f32`, `f16`, `bf16`: no bit casts).
trait Storage: DeviceElem + Copy + Default + Clone + 'static {
    fn from_tensor(t: &Tensor) -> Vec<Self>;
    fn to_tensor(dtype: DType, v: &[Self]) -> Tensor;
}

impl Storage for f32 {
    fn from_tensor(t: &Tensor) -> Vec<f32> {
        match t {
            Tensor::F32(v) => v.clone(),
            _ => panic!("expected f32"),
        }
    }
    fn to_tensor(_: DType, v: &[f32]) -> Tensor {
        Tensor::F32(v.to_vec())
    }
}

impl Storage for f16 {
    fn from_tensor(t: &Tensor) -> Vec<f16> {
        match t {
            Tensor::F16(v) => v.clone(),
            _ => panic!("expected f16"),
        }
    }
    fn to_tensor(_: DType, v: &[f16]) -> Tensor {
        Tensor::F16(v.to_vec())
    }
}

impl Storage for bf16 {
    fn from_tensor(t: &Tensor) -> Vec<bf16> {
        match t {
            Tensor::BF16(v) => v.clone(),
            _ => panic!("expected bf16"),
        }
    }
    fn to_tensor(_: DType, v: &[bf16]) -> Tensor {
        Tensor::BF16(v.to_vec())
    }
}

/// Raw bits (the `u16` storage, for buffers shared by f16 and bf16 runs: the graph test).
impl Storage for u16 {
    fn from_tensor(t: &Tensor) -> Vec<u16> {
        match t {
            Tensor::F16(v) => v.iter().map(|x| x.to_bits()).collect(),
            Tensor::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
            Tensor::F32(_) | Tensor::Fp8(..) => panic!("expected a 16-bit tensor"),
        }
    }
    fn to_tensor(dtype: DType, v: &[u16]) -> Tensor {
        match dtype {
            DType::F16 => Tensor::F16(v.iter().map(|&b| f16::from_bits(b)).collect()),
            DType::BF16 => Tensor::BF16(v.iter().map(|&b| bf16::from_bits(b)).collect()),
            DType::F32 | DType::E4M3Fn | DType::E5M2 => panic!("expected a 16-bit dtype"),
        }
    }
}

fn nonempty(v: &[i32]) -> Vec<i32> {
    if v.is_empty() { vec![0] } else { v.to_vec() }
}

/// Plans and runs `data` on the GPU into poisoned outputs.
fn run_gpu_typed<T: Storage>(
    gpu: &CudaBackend,
    data: &CaseData,
    config: &PlanConfig,
) -> Result<(Tensor, Vec<f32>)> {
    let plan = data.plan(config)?;
    let s = gpu.stream();
    let dev = |e| Error::Backend {
        backend: "cuda",
        message: format!("{e:?}"),
    };
    let mut ws = DeviceWorkspace::new(gpu, plan.requirement())?;
    gpu.upload_plan(&plan, &mut ws)?;
    let q = s.clone_htod(&T::from_tensor(&data.q)).map_err(dev)?;
    let k = s.clone_htod(&T::from_tensor(&data.k)).map_err(dev)?;
    let v_host = T::from_tensor(&data.v);
    let v = s
        .clone_htod(&if v_host.is_empty() {
            vec![T::default()]
        } else {
            v_host
        })
        .map_err(dev)?;
    let idx = nonempty(data.batch.kv_indices());
    let kvi = s.clone_htod(&idx).map_err(dev)?;
    let (o_poison, lse_poison) = data.poisoned_outputs();
    let mut o = s.clone_htod(&T::from_tensor(&o_poison)).map_err(dev)?;
    let mut lse = s.clone_htod(&lse_poison).map_err(dev)?;
    let combined = data.spec.storage == KvStorage::Combined;
    let v_view = k.slice(data.v_offset..);
    let args = DeviceRunArgs {
        dtype: data.spec.dtype,
        q: &q,
        k: &k,
        v: if combined { &v_view } else { &v },
        strides: data.strides,
        num_pages: data.num_pages,
        kv_indices: &kvi,
        host_kv_indices: Some(&idx),
        o: &mut o,
        lse: Some(&mut lse),
        sinks: None,
        custom_mask: None,
        kv_fp8: None,
    };
    gpu.run(&plan, args, &mut ws)?;
    gpu.synchronize()?;
    let o = s.clone_dtoh(&o).map_err(dev)?;
    let lse = s.clone_dtoh(&lse).map_err(dev)?;
    Ok((T::to_tensor(data.spec.dtype, &o), lse))
}

fn run_gpu(gpu: &CudaBackend, data: &CaseData, config: &PlanConfig) -> Result<(Tensor, Vec<f32>)> {
    match data.spec.dtype {
        DType::F32 => run_gpu_typed::<f32>(gpu, data, config),
        DType::F16 => run_gpu_typed::<f16>(gpu, data, config),
        DType::BF16 => run_gpu_typed::<bf16>(gpu, data, config),
        d @ (DType::E4M3Fn | DType::E5M2) => Err(Error::Unsupported {
            backend: "cuda",
            what: format!("q of dtype {}", d.name()),
        }),
    }
}

/// GPU vs the f64 reference (DESIGN §7 tolerance, fully written) and vs the CPU backend.
fn check(gpu: &CudaBackend, cpu: &CpuBackend, spec: &CaseSpec, parallelism: usize, seed: u64) {
    let data = spec.materialise(seed).unwrap();
    let config = PlanConfig::with_parallelism(parallelism);
    let reference = data.reference().unwrap();
    let (o, lse) = run_gpu(gpu, &data, &config).unwrap();
    let c = data.compare(&o, &lse, &reference);
    assert!(
        c.passed(),
        "{} (p = {parallelism}) vs reference: {c:?}",
        spec.name
    );
    let (co, clse) = data.run_cpu(cpu, &config).unwrap();
    let (e, el) = CaseData::output_difference(&o, &lse, &co, &clse);
    assert!(
        e <= c.tolerance && el <= c.tolerance,
        "{} (p = {parallelism}) vs cpu: o {e:e}, lse {el:e}",
        spec.name
    );
}

#[test]
fn unavailable_is_typed_not_a_panic() {
    // Everywhere: either a backend or a typed error with a reason.
    match CudaBackend::new(0) {
        Ok(g) => assert!(g.num_sms() > 0 && g.arch().starts_with("sm_")),
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "cuda");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    // A device that does not exist is unavailable too.
    match CudaBackend::new(1 << 20) {
        Err(Error::BackendUnavailable { .. }) => {}
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}

fn seed(i: usize) -> u64 {
    // Fresh inputs per run: mix the clock into the per-case seed.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn errors_before_launch() {
    let Some(g) = gpu() else { return };
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let s = CaseSpec::decode("e", h, 16, 2, 40, DType::BF16);
    let data = s.materialise(seed(0)).unwrap();
    let plan = data.plan(&PlanConfig::with_parallelism(64)).unwrap();
    let st = g.stream();
    let q = st.clone_htod(&bf16::from_tensor(&data.q)).unwrap();
    let k = st.clone_htod(&bf16::from_tensor(&data.k)).unwrap();
    let v = st.clone_htod(&bf16::from_tensor(&data.v)).unwrap();
    let kvi = st.clone_htod(data.batch.kv_indices()).unwrap();
    let mut o = st.alloc_zeros::<bf16>(data.q.len()).unwrap();
    let mut lse = st.alloc_zeros::<f32>(2 * 8).unwrap();
    let mut ws = DeviceWorkspace::new(&g, plan.requirement()).unwrap();
    // Not uploaded yet: the int workspace does not hold the plan.
    macro_rules! args {
        () => {
            DeviceRunArgs {
                dtype: DType::BF16,
                q: &q,
                k: &k,
                v: &v,
                strides: data.strides,
                num_pages: data.num_pages,
                kv_indices: &kvi,
                host_kv_indices: Some(data.batch.kv_indices()),
                o: &mut o,
                lse: Some(&mut lse),
                sinks: None,
                custom_mask: None,
                kv_fp8: None,
            }
        };
    }
    let e = g.run(&plan, args!(), &mut ws).unwrap_err();
    assert!(
        matches!(
            e,
            Error::PlanMismatch {
                what: "int workspace",
                ..
            }
        ),
        "{e}"
    );
    g.upload_plan(&plan, &mut ws).unwrap();
    g.run(&plan, args!(), &mut ws).unwrap();
    // Wrong dtype for the storage (bf16 buffers declared f16 or f32).
    for wrong in [DType::F32, DType::F16] {
        let mut a = args!();
        a.dtype = wrong;
        assert!(matches!(
            g.run(&plan, a, &mut ws),
            Err(Error::DTypeMismatch { .. })
        ));
    }
    let mut a = args!();
    a.dtype = DType::F32;
    assert!(matches!(
        g.run(&plan, a, &mut ws),
        Err(Error::DTypeMismatch { .. })
    ));
    // A page id out of range in the host copy.
    let mut bad = data.batch.kv_indices().to_vec();
    bad[0] = data.num_pages as i32;
    let mut a = args!();
    a.host_kv_indices = Some(&bad);
    assert!(matches!(
        g.run(&plan, a, &mut ws),
        Err(Error::PageIdOutOfRange { .. })
    ));
    // A host copy of the page ids shorter than the device array.
    let short = &data.batch.kv_indices()[..1];
    let mut a = args!();
    a.host_kv_indices = Some(short);
    assert!(matches!(
        g.run(&plan, a, &mut ws),
        Err(Error::TensorShape {
            tensor: "host_kv_indices",
            ..
        })
    ));
    g.synchronize().unwrap();
}

/// Graph mode: capture once, replay for several batches of at most the capacity (padded
/// empty requests, the all-empty warm-up batch of the founding scenario), each compared
/// with the CPU backend and the reference.
#[test]
fn graph_capture_and_replay() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new(0).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let h = HeadConfig::new(32, 8, 128).unwrap();
        let (ps, cap, max_kv) = (16usize, 8usize, 2048usize);
        let parallelism = g
            .parallelism(&h, PlanKind::Decode, dtype, &AttentionOptions::default())
            .unwrap();
        let mut config = PlanConfig::with_parallelism(parallelism);
        config.graph_capacity = Some(cap);
        let pool_pages = cap * max_kv.div_ceil(ps) + 1;
        let page_elems = ps * h.num_kv_heads() * h.head_dim();
        let st = g.stream();
        let rows_elems = cap * h.num_qo_heads() * h.head_dim();
        let mut q = st.alloc_zeros::<u16>(rows_elems).unwrap();
        let mut k = st.alloc_zeros::<u16>(pool_pages * page_elems).unwrap();
        let mut v = st.alloc_zeros::<u16>(pool_pages * page_elems).unwrap();
        let mut kvi = st.alloc_zeros::<i32>(pool_pages).unwrap();
        let mut o = st.alloc_zeros::<u16>(rows_elems).unwrap();
        let mut lse = st.alloc_zeros::<f32>(cap * h.num_qo_heads()).unwrap();

        let batches: Vec<Vec<(usize, usize)>> = vec![
            vec![
                (1, 2048),
                (1, 100),
                (1, 1),
                (1, 1500),
                (1, 16),
                (1, 17),
                (1, 999),
                (1, 2000),
            ],
            vec![(1, 0); cap], // the warm-up batch: every request empty
            vec![
                (1, 300),
                (1, 0),
                (1, 0),
                (1, 2048),
                (1, 0),
                (1, 0),
                (1, 0),
                (1, 0),
            ],
            vec![(1, 1)],
            vec![(1, 2048); 3],
            vec![(1, 0); cap],
            vec![(1, 77), (1, 1234), (1, 0), (1, 5), (1, 640)],
        ];
        let mut graph = None;
        let mut ws = None;
        let mut plan: Option<Plan> = None;
        for (bi, reqs) in batches.iter().enumerate() {
            let mut s = CaseSpec::decode("graph", h, ps, 1, 0, dtype);
            s.requests = reqs.clone();
            s.name = format!("graph {} batch {bi}", dtype.name());
            let data = s.materialise(seed(bi)).unwrap();
            assert!(data.num_pages <= pool_pages);
            // Fresh inputs into the same buffers (addresses fixed for the graph).
            st.memcpy_htod(&u16::from_tensor(&data.q), &mut q.slice_mut(..data.q.len()))
                .unwrap();
            st.memcpy_htod(&u16::from_tensor(&data.k), &mut k.slice_mut(..data.k.len()))
                .unwrap();
            st.memcpy_htod(&u16::from_tensor(&data.v), &mut v.slice_mut(..data.v.len()))
                .unwrap();
            let idx = data.batch.kv_indices();
            if !idx.is_empty() {
                st.memcpy_htod(idx, &mut kvi.slice_mut(..idx.len()))
                    .unwrap();
            }
            // Poison the outputs.
            st.memcpy_htod(&vec![0x7fc0u16; rows_elems], &mut o)
                .unwrap();
            st.memcpy_htod(&vec![f32::NAN; cap * h.num_qo_heads()], &mut lse)
                .unwrap();
            match plan.as_mut() {
                None => plan = Some(data.plan(&config).unwrap()),
                Some(p) => p.replan(&data.desc(), &data.options()).unwrap(),
            }
            let p = plan.as_ref().unwrap();
            assert!(p.is_graph());
            let w = ws.get_or_insert_with(|| DeviceWorkspace::new(&g, p.requirement()).unwrap());
            g.upload_plan(p, w).unwrap();
            if graph.is_none() {
                g.prepare(p, dtype).unwrap();
                let host_idx: Vec<i32> = vec![0; pool_pages];
                graph = Some(
                    g.capture(|b| {
                        b.run(
                            p,
                            DeviceRunArgs {
                                dtype,
                                q: &q,
                                k: &k,
                                v: &v,
                                strides: data.strides,
                                num_pages: pool_pages,
                                kv_indices: &kvi,
                                host_kv_indices: Some(&host_idx),
                                o: &mut o,
                                lse: Some(&mut lse),
                                sinks: None,
                                custom_mask: None,
                                kv_fp8: None,
                            },
                            w,
                        )
                    })
                    .unwrap(),
                );
            }
            // SAFETY: every captured buffer (q, k, v, o, lse, page ids, workspaces) lives until
            // the end of this test and is only used on the backend's stream.
            unsafe { graph.as_ref().unwrap().launch(p, w) }.unwrap();
            g.synchronize().unwrap();
            let rows = data.rows();
            let o_host = st.clone_dtoh(&o).unwrap();
            let lse_host = st.clone_dtoh(&lse).unwrap();
            let n = rows * h.num_qo_heads() * h.head_dim();
            let ot = u16::to_tensor(dtype, &o_host[..n]);
            let lt = &lse_host[..rows * h.num_qo_heads()];
            let reference = data.reference().unwrap();
            let c = data.compare(&ot, lt, &reference);
            assert!(c.passed(), "{}: {c:?}", s.name);
            let (co, clse) = data.run_cpu(&cpu, &config).unwrap();
            let (e, el) = CaseData::output_difference(&ot, lt, &co, &clse);
            assert!(
                e <= c.tolerance && el <= c.tolerance,
                "{}: vs cpu o {e:e} lse {el:e}",
                s.name
            );
            // Rows past the batch are untouched (still poisoned).
            assert!(
                o_host[n..].iter().all(|&b| b == 0x7fc0),
                "{}: wrote past the batch",
                s.name
            );
        }
    }
}

/// One small case per path (decode split into partial states and merged; causal prefill),
/// against the CPU backend and the reference: the case the device check runs under
/// `compute-sanitizer` (memcheck and racecheck).
#[test]
fn sanitizer_small_case() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new(2).unwrap();
    let h = HeadConfig::new(8, 2, 128).unwrap();
    let mut s = CaseSpec::decode("sanitizer decode", h, 16, 3, 0, DType::BF16);
    s.requests = vec![(1, 300), (1, 0), (1, 37)];
    check(&g, &cpu, &s, 64, seed(1));
    let mut p = CaseSpec::decode("sanitizer prefill", h, 16, 2, 0, DType::F16);
    p.decode = false;
    p.requests = vec![(20, 70), (3, 3)];
    p.options.causal = true;
    check(&g, &cpu, &p, 16, seed(2));
}

/// The driver's occupancy calculator agrees with the offline figure from the compile report
/// (the `flashpage kernels` column), and every variant of the standard matrix reaches the
/// budget it is compiled for. With `FLASHPAGE_REQUIRE_CACHE=1` (the device check sets it,
/// the cache having been built by `flashpage kernels --cache`) every kernel must have come
/// from the cache: no compile on the device.
#[test]
fn occupancy_matches_the_compile_report() {
    use flashpage::backend::cuda::launch::{DecodeVariant, blocks_per_sm, sm_limits};
    let Some(g) = gpu() else { return };
    let limits = sm_limits(g.arch()).expect("the device's architecture is tabulated");
    for (hq, hkv) in [(32, 8), (32, 16), (32, 32)] {
        let h = HeadConfig::new(hq, hkv, 128).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            for kind in [PlanKind::Decode, PlanKind::Prefill] {
                let v = DecodeVariant::new(&h, kind, dtype, false);
                let api = g.blocks_per_sm(v).unwrap();
                let rec = g
                    .loaded_kernels()
                    .into_iter()
                    .rfind(|k| k.entry == "fp_decode" && k.defines == v.defines())
                    .expect("the variant was loaded");
                let r = rec
                    .resources
                    .expect("the compile record has the resource report");
                let offline = blocks_per_sm(&limits, v.threads(), r.registers, r.shared_bytes);
                assert_eq!(api, offline, "{v:?}: occupancy API vs compile report {r:?}");
                assert!(api as usize >= v.min_blocks, "{v:?}: {api} blocks per SM");
                let p = g
                    .parallelism(&h, kind, dtype, &AttentionOptions::default())
                    .unwrap();
                assert_eq!(p, g.num_sms() * api as usize);
            }
        }
    }
    if std::env::var_os("FLASHPAGE_REQUIRE_CACHE").is_some_and(|v| v == "1") {
        let compiled: Vec<_> = g
            .loaded_kernels()
            .into_iter()
            .filter(|k| !k.from_cache)
            .map(|k| (k.source, k.defines))
            .collect();
        assert!(compiled.is_empty(), "compiled on the device: {compiled:?}");
    }
}
