//! Tests of the kernels' logic without a GPU: `kernels/host_emulation.cpp` runs the same
//! CUDA sources on the host (one std::thread per CUDA thread, barrier-based shuffles), built
//! with the host C++ compiler and the same `-D` options NVRTC gets. Each case is compared with
//! the f64 reference and the CPU backend, outputs and the float workspace poisoned first.
//! Where no C++20 compiler is found the tests print `skipped: <reason>` and pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::launch::{self, Buffers, DecodeVariant};
use crate::backend::cpu::CpuBackend;
use crate::case::{CaseData, CaseSpec, KvStorage};
use crate::layout::{DType, HeadConfig, KvLayout};
use crate::options::{AttentionOptions, PosEncoding};
use crate::plan::{Plan, PlanConfig};
use crate::tensor::Tensor;

/// The sources, embedded so the test runs wherever its binary is copied.
const SOURCES: [(&str, &str); 4] = [
    (
        "host_emulation.cpp",
        include_str!("kernels/host_emulation.cpp"),
    ),
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("decode.cu", include_str!("kernels/decode.cu")),
    ("merge.cu", include_str!("kernels/merge.cu")),
];

fn compiler() -> Option<String> {
    let cands = [
        std::env::var("CXX").ok(),
        Some("g++".into()),
        Some("c++".into()),
    ];
    cands.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn scratch_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashpage-emulation-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for (name, text) in SOURCES {
        std::fs::write(d.join(name), text).unwrap();
    }
    d
}

/// Builds the emulator for `defines` (once per variant per process).
fn build(cxx: &str, dir: &Path, defines: &[String]) -> PathBuf {
    let key = super::nvrtc::cache_key("emulator", defines, "host", (0, 0));
    let exe = dir.join(format!("emu-{key:016x}"));
    if exe.exists() {
        return exe;
    }
    let tmp = dir.join(format!(
        "emu-{key:016x}.tmp{:?}",
        std::thread::current().id()
    ));
    let out = Command::new(cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-DFP_HOST_EMULATION"])
        .args(defines)
        .arg(dir.join("host_emulation.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "emulator build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &exe).unwrap();
    exe
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Runs `plan` over `data` in the emulator; returns (o, lse).
fn emulate(cxx: &str, dir: &Path, data: &CaseData, plan: &Plan) -> (Tensor, Vec<f32>) {
    let dt = data.spec.dtype;
    let h = data.spec.heads;
    let rows = data.rows();
    let mut ids = data.batch.kv_indices().to_vec();
    if ids.is_empty() {
        ids.push(0);
    }
    let (o, lse) = data.poisoned_outputs();
    let combined = data.spec.storage == KvStorage::Combined;
    let kb = data.k.to_le_bytes();
    let vb = if combined {
        kb[data.v_offset * dt.size()..].to_vec()
    } else {
        data.v.to_le_bytes()
    };
    let bufs = Buffers {
        q: 0,
        k: 0,
        v: 0,
        o: 0,
        lse: 0,
        kv_indices: 0,
        int_ws: 0,
        float_ws: 0,
        qo_elems: rows * h.num_qo_heads() * h.head_dim(),
        num_indices: ids.len(),
        num_pages: data.num_pages,
        strides: data.strides,
    };
    let params = launch::params(plan, &bufs);
    let req = plan.requirement();
    let mut int_ws = vec![0u8; req.int.total()];
    let img: &[u8] = bytemuck::cast_slice(plan.int_image());
    int_ws[..img.len()].copy_from_slice(img);
    // The float workspace starts poisoned: the merge must read only what was written.
    let float_ws: Vec<u8> = std::iter::repeat_n(f32::NAN.to_le_bytes(), req.float.total() / 4)
        .flatten()
        .collect();
    let mut input = Vec::new();
    // SAFETY: Params is #[repr(C)] plain old data without padding (checked by
    // params_layout_matches_the_kernels); its bytes are read as bytes.
    input.extend_from_slice(unsafe {
        std::slice::from_raw_parts(
            (&params as *const launch::Params).cast::<u8>(),
            std::mem::size_of::<launch::Params>(),
        )
    });
    put(&mut input, &data.q.to_le_bytes());
    put(&mut input, &kb);
    put(&mut input, &vb);
    put(&mut input, bytemuck::cast_slice(&ids));
    put(&mut input, &int_ws);
    put(&mut input, &float_ws);
    put(&mut input, &o.to_le_bytes());
    put(&mut input, bytemuck::cast_slice(&lse));
    let caps = plan.capacities();
    let merge = caps.merge_rows > 0 && (plan.is_graph() || plan.num_merge_rows() > 0);
    for d in [
        caps.work_items as u32,
        h.num_kv_heads() as u32,
        caps.merge_rows as u32,
        merge as u32,
    ] {
        input.extend_from_slice(&d.to_le_bytes());
    }
    let variant = DecodeVariant::for_plan(plan, dt);
    let exe = build(cxx, dir, &variant.defines());
    let tag = format!("{:?}-{}", std::thread::current().id(), data.spec.name.len());
    let (inp, outp) = (
        dir.join(format!("in-{tag}")),
        dir.join(format!("out-{tag}")),
    );
    std::fs::write(&inp, &input).unwrap();
    let mut child = Command::new(&exe).arg(&inp).arg(&outp).spawn().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!(
                "{}: the emulated kernel hung (lanes diverged at a shuffle or barrier?)",
                data.spec.name
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        status.success(),
        "{}: emulator failed: {status}",
        data.spec.name
    );
    let out = std::fs::read(&outp).unwrap();
    let ob = o.len() * dt.size();
    let o = Tensor::from_le_bytes(dt, &out[..ob]).unwrap();
    let lse = out[ob..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (o, lse)
}

fn check(cxx: &str, dir: &Path, cpu: &CpuBackend, spec: &CaseSpec, config: &PlanConfig, seed: u64) {
    let data = spec.materialise(seed).unwrap();
    let plan = data.plan(config).unwrap();
    let (o, lse) = emulate(cxx, dir, &data, &plan);
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

/// Removes the scratch directory when a test ends (passing or not).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(test: &str) -> Option<(String, Scratch, CpuBackend)> {
    match compiler() {
        Some(c) => Some((c, Scratch(scratch_dir(test)), CpuBackend::new(2).unwrap())),
        None => {
            println!("skipped: no c++ compiler (set CXX) to build the kernel emulator");
            None
        }
    }
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
    let Some((cxx, scratch, cpu)) = setup("decode") else {
        return;
    };
    let dir = &scratch.0;
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
            check(
                &cxx,
                dir,
                &cpu,
                &s,
                &PlanConfig::with_parallelism(p),
                seed(i),
            );
            i += 1;
        }
    }
}

#[test]
fn emulated_options() {
    let Some((cxx, scratch, cpu)) = setup("options") else {
        return;
    };
    let dir = &scratch.0;
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let opts = [
        AttentionOptions {
            logits_soft_cap: Some(3.0),
            sm_scale: Some(0.3),
            ..Default::default()
        },
        AttentionOptions {
            causal: true,
            window_left: 40,
            ..Default::default()
        },
        AttentionOptions {
            window_left: 0,
            ..Default::default()
        },
        AttentionOptions {
            pos_encoding: PosEncoding::Alibi,
            ..Default::default()
        },
        AttentionOptions {
            pos_encoding: PosEncoding::Rope {
                theta: 1e4,
                scale: 2.0,
            },
            window_left: 50,
            logits_soft_cap: Some(20.0),
            ..Default::default()
        },
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
                    &cxx,
                    dir,
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
    let Some((cxx, scratch, cpu)) = setup("prefill") else {
        return;
    };
    let dir = &scratch.0;
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
                &cxx,
                dir,
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
        check(&cxx, dir, &cpu, &s, &config, seed(100 + i as u64));
    }
}
