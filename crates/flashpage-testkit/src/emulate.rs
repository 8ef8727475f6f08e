//! The CUDA kernels' logic without a GPU: `emulation/host_emulation.cpp` runs the library's
//! CUDA sources on the host (one std::thread per CUDA thread, barrier-based shuffles), built
//! with the host C++ compiler and the same `-D` options NVRTC gets, over the same parameter
//! block ([`launch::params`]) the backend launches. Outputs and the float workspace are
//! poisoned first. A missing C++20 compiler is an error (set `CXX`), never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flashpage::Plan;
use flashpage::backend::cuda::KERNEL_SOURCES;
use flashpage::backend::cuda::launch::{self, Buffers, DecodeVariant};
use flashpage::layout::RunStrides;
use flashpage::tensor::Tensor;

use crate::case::{CaseData, KvStorage};
use crate::strided::StridedLayout;

/// The emulator's driver, embedded so the emulation runs wherever its binary is copied.
const DRIVER: (&str, &str) = (
    "host_emulation.cpp",
    include_str!("../emulation/host_emulation.cpp"),
);

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

/// A host C++ compiler and a scratch directory holding the kernel sources; the directory is
/// removed when the emulator is dropped.
pub struct Emulator {
    cxx: String,
    dir: PathBuf,
}

impl Emulator {
    /// Finds a C++20 compiler (`CXX`, `g++` or `c++`) and writes the sources to a fresh
    /// scratch directory named after `tag`.
    pub fn new(tag: &str) -> Result<Emulator, String> {
        let cxx = compiler().ok_or_else(|| {
            "no C++ compiler found to build the kernel emulator: install g++ or set CXX".to_string()
        })?;
        let dir =
            std::env::temp_dir().join(format!("flashpage-emulation-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (name, text) in KERNEL_SOURCES.iter().chain(std::iter::once(&DRIVER)) {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(Emulator { cxx, dir })
    }

    /// Runs `plan` over `data` on the emulated kernels: decode items, then the merge.
    /// Returns `(o, lse)`.
    pub fn run(&self, data: &CaseData, plan: &Plan) -> (Tensor, Vec<f32>) {
        emulate(&self.cxx, &self.dir, data, plan, None)
    }

    /// Runs `plan` over `data` with q, V and o laid out as `strided` says (the kernels'
    /// strided addressing). Returns the whole o buffer (`strided.o_len` elements, poisoned
    /// before the run: see [`StridedLayout::gather`]) and the LSE.
    pub fn run_strided(
        &self,
        data: &CaseData,
        plan: &Plan,
        strided: &StridedLayout,
    ) -> (Tensor, Vec<f32>) {
        emulate(&self.cxx, &self.dir, data, plan, Some(strided))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// FNV-1a over the defines: the emulator binary's name.
fn key_of(defines: &[String]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in defines.iter().flat_map(|d| d.bytes().chain([0])) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Builds the emulator for `defines` (once per variant per process).
fn build(cxx: &str, dir: &Path, defines: &[String]) -> PathBuf {
    let key = key_of(defines);
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
fn emulate(
    cxx: &str,
    dir: &Path,
    data: &CaseData,
    plan: &Plan,
    strided: Option<&StridedLayout>,
) -> (Tensor, Vec<f32>) {
    let dt = data.spec.dtype;
    let h = data.spec.heads;
    let rows = data.rows();
    let mut ids = data.batch.kv_indices().to_vec();
    if ids.is_empty() {
        ids.push(0);
    }
    let (mut o, lse) = data.poisoned_outputs();
    if let Some(st) = strided {
        o = crate::case::poisoned(dt, st.o_len);
    }
    let combined = data.spec.storage == KvStorage::Combined;
    let kb = data.k.to_le_bytes();
    let vb = match strided {
        Some(st) => st.v.to_le_bytes(),
        None if combined => kb[data.v_offset * dt.size()..].to_vec(),
        None => data.v.to_le_bytes(),
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
        qo_rows: rows,
        num_indices: ids.len(),
        num_pages: data.num_pages,
        strides: data.strides,
        v_strides: strided.map_or(data.strides, |st| st.v_strides),
        qo: strided.map_or(RunStrides::contiguous(&h), |st| st.strides),
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
    input.extend_from_slice(params.as_bytes());
    put(
        &mut input,
        &strided.map_or(&data.q, |st| &st.qkv).to_le_bytes(),
    );
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
