//! The CUDA kernels' logic without a GPU: `emulation/host_emulation.cpp` runs the library's
//! CUDA sources on the host (one fiber per CUDA thread, barrier-based shuffles), built
//! with the host C++ compiler and the same `-D` options NVRTC gets, over the same parameter
//! block ([`launch::params`]) the backend launches. Outputs and the float workspace are
//! poisoned first. A missing C++20 compiler is an error (set `CXX`), never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use flashpage::Plan;
use flashpage::backend::cpu::SimdLevel;
use flashpage::backend::cuda::KERNEL_SOURCES;
use flashpage::backend::cuda::launch::{self, Buffers, CascadeBuffers, DecodeVariant};
use flashpage::backend::cuda::prefill::PrefillVariant;
use flashpage::backend::{KvCache, RunArgs, check_run_args};
use flashpage::error::{Error, Result};
use flashpage::layout::RunStrides;
use flashpage::plan::cascade::CascadePlan;
use flashpage::tensor::{Tensor, TensorMut, TensorRef};

use crate::case::CaseData;
use crate::mask::PackedMask;
use crate::runner::HostRunner;
use crate::strided::StridedLayout;

/// The emulator's driver, embedded so the emulation runs wherever its binary is copied.
const DRIVER: (&str, &str) = (
    "host_emulation.cpp",
    include_str!("../emulation/host_emulation.cpp"),
);

/// The host `mma.sync` / `ldmatrix` / `cp.async` the prefill kernel runs on.
const TENSOR_CORE: (&str, &str) = (
    "tensor_core_emulation.hpp",
    include_str!("../emulation/tensor_core_emulation.hpp"),
);

/// The compute capability the emulation stands for when it picks a plan's kernel (an
/// H100's: prefill plans the tensor-core kernel takes run on it, as on the device).
pub const EMULATED_ARCH: u32 = 90;

/// The host C++ compiler the emulators build with: `CXX`, else `g++`, else `c++`, the first
/// that runs.
pub(crate) fn compiler() -> Option<String> {
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
        for (name, text) in KERNEL_SOURCES.iter().chain([&DRIVER, &TENSOR_CORE]) {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(Emulator { cxx, dir })
    }

    /// Runs `plan` over `data` on the emulated kernels: the work items (on the tensor-core
    /// prefill kernel where the device would run them there, else the attention kernel),
    /// then the merge. Returns `(o, lse)`, the outputs poisoned first. Panics where the
    /// emulator fails (a test helper: the message says why).
    pub fn run(&self, data: &CaseData, plan: &Plan) -> (Tensor, Vec<f32>) {
        let (mut o, mut lse) = data.poisoned_outputs();
        let args = RunArgs {
            q: data.q.view(),
            kv: data.kv_cache(),
            o: o.view_mut(),
            lse: Some(&mut lse),
            sinks: data.sinks.as_deref(),
            custom_mask: data.custom_mask.as_ref().map(PackedMask::view),
        };
        if let Err(e) = emulate(&self.cxx, &self.dir, plan, args, None) {
            panic!("{}: {e}", data.spec.name);
        }
        (o, lse)
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
        let (_, mut lse) = data.poisoned_outputs();
        let mut o = crate::case::poisoned(data.spec.dtype, strided.o_len);
        let kv = data.kv_cache();
        let kv = KvCache {
            v: strided.v.view(),
            v_strides: strided.v_strides,
            ..kv
        };
        let args = RunArgs {
            q: strided.qkv.view(),
            kv,
            o: o.view_mut(),
            lse: Some(&mut lse),
            sinks: data.sinks.as_deref(),
            custom_mask: data.custom_mask.as_ref().map(PackedMask::view),
        };
        if let Err(e) = emulate(&self.cxx, &self.dir, plan, args, Some(strided.strides)) {
            panic!("{}: {e}", data.spec.name);
        }
        (o, lse)
    }

    /// Runs cascade `plan` over `data`'s q, cache and sinks (its page ids are the plan's) on
    /// the emulated kernels: every level's launches, then the fold, exactly as
    /// [`launch::cascade_launches`] describes them. Returns `(o, lse)`, poisoned first.
    /// Panics where the emulator fails (a test helper).
    pub fn run_cascade(&self, data: &CaseData, plan: &CascadePlan) -> (Tensor, Vec<f32>) {
        let (mut o, mut lse) = data.poisoned_outputs();
        let args = RunArgs {
            q: data.q.view(),
            kv: KvCache {
                kv_indices: &[],
                ..data.kv_cache()
            },
            o: o.view_mut(),
            lse: Some(&mut lse),
            sinks: data.sinks.as_deref(),
            custom_mask: None,
        };
        if let Err(e) = emulate_cascade(&self.cxx, &self.dir, plan, args) {
            panic!("{}: {e}", data.spec.name);
        }
        (o, lse)
    }

    /// Runs the emulated `ldmatrix` + `mma.sync` of `variant`'s dtype on one warp against a
    /// plain matrix product of distinct values (`host_emulation --self-test`); returns the
    /// emulator's report, or what went wrong.
    pub fn tensor_core_self_test(
        &self,
        variant: &PrefillVariant,
    ) -> std::result::Result<String, String> {
        let exe = build(&self.cxx, &self.dir, &variant.defines())?;
        let out = Command::new(&exe)
            .arg("--self-test")
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{}: {text}", out.status))
        }
    }
}

/// The emulated CUDA kernels as a [`HostRunner`]: the declarative suite runs on them like
/// on any backend (`cuda-emulation` in its reports). Emulator failures (build, hang, crash)
/// are `Error::Backend` naming `cuda-emulation`.
impl HostRunner for Emulator {
    fn label(&self) -> String {
        "cuda-emulation".into()
    }

    fn simd(&self) -> Option<SimdLevel> {
        None
    }

    fn run_host(&self, plan: &Plan, args: RunArgs<'_, '_>) -> Result<()> {
        emulate(&self.cxx, &self.dir, plan, args, None)
    }

    fn run_cascade_host(&self, plan: &CascadePlan, args: RunArgs<'_, '_>) -> Result<()> {
        emulate_cascade(&self.cxx, &self.dir, plan, args)
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
fn build(cxx: &str, dir: &Path, defines: &[String]) -> std::result::Result<PathBuf, String> {
    let key = key_of(defines);
    let exe = dir.join(format!("emu-{key:016x}"));
    if exe.exists() {
        return Ok(exe);
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
        .map_err(|e| format!("{cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "emulator build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, &exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    Ok(exe)
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Little-endian bytes of a host tensor.
fn ref_bytes(t: TensorRef<'_>) -> Vec<u8> {
    match t {
        TensorRef::F32(v) => bytemuck::cast_slice(v).to_vec(),
        TensorRef::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorRef::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorRef::Fp8(_, v) => v.to_vec(),
    }
}

fn mut_bytes(t: &TensorMut<'_>) -> Vec<u8> {
    match t {
        TensorMut::F32(v) => bytemuck::cast_slice(v).to_vec(),
        TensorMut::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorMut::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorMut::Fp8(_, v) => v.to_vec(),
    }
}

/// Runs `plan` over host `args` in the emulator (the checks of `check_run_args` first, as
/// every backend does); writes o and lse back into `args`. `qo`: q and o strides (contiguous
/// when `None`).
fn emulate(
    cxx: &str,
    dir: &Path,
    plan: &Plan,
    args: RunArgs<'_, '_>,
    qo: Option<RunStrides>,
) -> Result<()> {
    let mut shapes = args.shapes();
    shapes.qo = qo;
    check_run_args(plan, &shapes)?;
    launch::check_custom_mask(plan, args.custom_mask.is_some())?;
    let fail = |message: String| Error::Backend {
        backend: "cuda-emulation",
        message,
    };
    let dt = args.q.dtype();
    // The cache's dtype: q's, or an FP8 format (the kernels' FP_KV_DTYPE).
    let kt = args.kv.k.dtype();
    let h = plan.heads();
    let mut ids = args.kv.kv_indices.to_vec();
    if ids.is_empty() {
        ids.push(0);
    }
    let bufs = Buffers {
        q: 0,
        k: 0,
        v: 0,
        o: 0,
        lse: 0,
        sinks: args.sinks.is_some() as u64,
        mask: (
            args.custom_mask.is_some() as u64,
            0,
            args.custom_mask.map_or(0, |m| m.bits.len()),
        ),
        kv_indices: 0,
        int_ws: 0,
        float_ws: 0,
        qo_rows: plan.num_q_rows(),
        num_indices: ids.len(),
        num_pages: args.kv.num_pages,
        strides: args.kv.strides,
        v_strides: args.kv.v_strides,
        qo: qo.unwrap_or_else(|| RunStrides::contiguous(h)),
    };
    let mut params = launch::params(plan, &bufs);
    params.set_kv_scales(args.kv.k_scale, args.kv.v_scale)?;
    let req = plan.requirement();
    let mut int_ws = vec![0u8; req.int.total()];
    let img: &[u8] = bytemuck::cast_slice(plan.int_image());
    int_ws[..img.len()].copy_from_slice(img);
    // The float workspace starts poisoned: the merge must read only what was written.
    let float_ws: Vec<u8> = std::iter::repeat_n(f32::NAN.to_le_bytes(), req.float.total() / 4)
        .flatten()
        .collect();
    let lse_init: Vec<f32> = args.lse.as_deref().map_or_else(Vec::new, <[f32]>::to_vec);
    let mut input = Vec::new();
    input.extend_from_slice(params.as_bytes());
    put(&mut input, &ref_bytes(args.q));
    put(&mut input, &ref_bytes(args.kv.k));
    put(&mut input, &ref_bytes(args.kv.v));
    put(&mut input, bytemuck::cast_slice(&ids));
    put(&mut input, &int_ws);
    put(&mut input, &float_ws);
    put(&mut input, &mut_bytes(&args.o));
    put(&mut input, bytemuck::cast_slice(&lse_init));
    put(&mut input, bytemuck::cast_slice(args.sinks.unwrap_or(&[])));
    put(&mut input, args.custom_mask.map_or(&[][..], |m| m.bits));
    put(
        &mut input,
        bytemuck::cast_slice(args.custom_mask.map_or(&[][..], |m| m.indptr)),
    );
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
    let defines = match PrefillVariant::for_plan_kv(plan, dt, kt, EMULATED_ARCH) {
        Some(v) => v.defines(),
        None => DecodeVariant::for_plan_kv(plan, dt, kt).defines(),
    };
    let exe = build(cxx, dir, &defines).map_err(fail)?;
    let tag = format!(
        "{:?}-{}",
        std::thread::current().id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let (inp, outp) = (
        dir.join(format!("in-{tag}")),
        dir.join(format!("out-{tag}")),
    );
    let io = |e: std::io::Error| fail(format!("emulator i/o: {e}"));
    std::fs::write(&inp, &input).map_err(io)?;
    let mut child = Command::new(&exe)
        .arg(&inp)
        .arg(&outp)
        .spawn()
        .map_err(io)?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(io)? {
            break s;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail("the emulated kernel ran past 120 s".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = std::fs::remove_file(&inp);
    if !status.success() {
        // Status 6: lanes diverged at a shuffle or barrier (the emulator's stderr says where).
        return Err(fail(format!("emulator failed: {status}")));
    }
    let out = std::fs::read(&outp).map_err(io)?;
    let _ = std::fs::remove_file(&outp);
    let ob = args.o.len() * dt.size();
    if out.len() != ob + lse_init.len() * 4 {
        return Err(fail(format!(
            "emulator output has {} bytes, expected {}",
            out.len(),
            ob + lse_init.len() * 4
        )));
    }
    let o =
        Tensor::from_le_bytes(dt, &out[..ob]).ok_or_else(|| fail("emulator output: o".into()))?;
    match (args.o, o) {
        (TensorMut::F32(d), Tensor::F32(s)) => d.copy_from_slice(&s),
        (TensorMut::F16(d), Tensor::F16(s)) => d.copy_from_slice(&s),
        (TensorMut::BF16(d), Tensor::BF16(s)) => d.copy_from_slice(&s),
        _ => return Err(fail("emulator output: o has another dtype".into())),
    }
    if let Some(l) = args.lse {
        for (d, c) in l.iter_mut().zip(out[ob..].chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}

/// Per-process counter naming the emulator's input and output files.
static RUN: AtomicU64 = AtomicU64::new(0);

/// Runs the emulator binary `exe` on `input` (`extra` arguments first); returns its output
/// file's bytes.
fn run_exe(exe: &Path, dir: &Path, extra: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let fail = |message: String| Error::Backend {
        backend: "cuda-emulation",
        message,
    };
    let tag = format!(
        "{:?}-{}",
        std::thread::current().id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let (inp, outp) = (
        dir.join(format!("in-{tag}")),
        dir.join(format!("out-{tag}")),
    );
    let io = |e: std::io::Error| fail(format!("emulator i/o: {e}"));
    std::fs::write(&inp, input).map_err(io)?;
    let mut child = Command::new(exe)
        .args(extra)
        .arg(&inp)
        .arg(&outp)
        .spawn()
        .map_err(io)?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(io)? {
            break s;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail("the emulated kernels ran past 120 s".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = std::fs::remove_file(&inp);
    if !status.success() {
        return Err(fail(format!("emulator failed: {status}")));
    }
    let out = std::fs::read(&outp).map_err(io)?;
    let _ = std::fs::remove_file(&outp);
    Ok(out)
}

/// Fake device address of emulator buffer `i` (the driver's cascade mode relocates it).
fn fake_base(i: u64) -> u64 {
    (i + 1) << 40
}

/// Runs cascade `plan` over host `args` (page ids empty: the plan's) in the emulator: the
/// checks of every level's run first (as the CUDA backend's), then the launch sequence of
/// [`launch::cascade_launches`] over the device layout of
/// [`CascadePlan::device_requirement`], with the float workspace poisoned.
fn emulate_cascade(cxx: &str, dir: &Path, plan: &CascadePlan, args: RunArgs<'_, '_>) -> Result<()> {
    let fail = |message: String| Error::Backend {
        backend: "cuda-emulation",
        message,
    };
    flashpage::plan::cascade::check_cascade_run(
        args.custom_mask.is_some(),
        args.kv.kv_indices.len(),
    )?;
    let dt = args.q.dtype();
    // The cache's dtype: q's, or an FP8 format (the variants read it; check_run_args checks
    // the pair and the scales).
    let kdt = args.kv.k.dtype();
    let h = plan.heads();
    let states = plan.num_q_rows() * h.num_qo_heads();
    if args.o.len() != states * h.head_dim() || args.lse.as_ref().is_some_and(|l| l.len() != states)
    {
        return Err(Error::TensorShape {
            tensor: "o",
            expected: "the cascade's rows".into(),
            actual: format!("{} elements", args.o.len()),
        });
    }
    let mut shapes = args.shapes();
    shapes.o = (dt, states * h.head_dim());
    shapes.lse = Some(states);
    shapes.sinks = None;
    let mut defines = None;
    for l in 0..plan.num_levels() {
        let (Some(lp), Some(ids)) = (plan.level_plan(l), plan.level_kv_indices(l)) else {
            continue;
        };
        shapes.kv_indices = Some(ids);
        shapes.num_indices = ids.len();
        check_run_args(lp, &shapes)?;
        let d = match PrefillVariant::for_plan_kv(lp, dt, kdt, EMULATED_ARCH) {
            Some(v) => v.defines(),
            None => DecodeVariant::for_plan_kv(lp, dt, kdt).defines(),
        };
        if defines.get_or_insert_with(|| d.clone()) != &d {
            return Err(fail("cascade levels on different kernel variants".into()));
        }
    }
    if let Some(s) = args.sinks
        && s.len() != h.num_qo_heads()
    {
        return Err(Error::TensorShape {
            tensor: "sinks",
            expected: format!("[{}]", h.num_qo_heads()),
            actual: format!("[{}]", s.len()),
        });
    }
    let req = plan.device_requirement(dt)?;
    let bufs = CascadeBuffers {
        q: fake_base(0),
        k: fake_base(1),
        v: fake_base(2),
        o: fake_base(3),
        lse: if args.lse.is_some() { fake_base(4) } else { 0 },
        sinks: if args.sinks.is_some() {
            fake_base(5)
        } else {
            0
        },
        int_ws: fake_base(6),
        float_ws: fake_base(7),
        num_pages: args.kv.num_pages,
        strides: args.kv.strides,
    };
    let launches =
        launch::cascade_launches_scaled(plan, dt, (args.kv.k_scale, args.kv.v_scale), &bufs)?;
    let image = plan.device_int_image()?;
    let mut int_ws = vec![0u8; req.int.total()];
    let img: &[u8] = bytemuck::cast_slice(&image);
    int_ws[..img.len()].copy_from_slice(img);
    let float_ws: Vec<u8> = std::iter::repeat_n(f32::NAN.to_le_bytes(), req.float.total() / 4)
        .flatten()
        .collect();
    let lse_init: Vec<f32> = args.lse.as_deref().map_or_else(Vec::new, <[f32]>::to_vec);
    let mut input = Vec::new();
    put(&mut input, &ref_bytes(args.q));
    put(&mut input, &ref_bytes(args.kv.k));
    put(&mut input, &ref_bytes(args.kv.v));
    put(&mut input, &mut_bytes(&args.o));
    put(&mut input, bytemuck::cast_slice(&lse_init));
    put(&mut input, bytemuck::cast_slice(args.sinks.unwrap_or(&[])));
    put(&mut input, &int_ws);
    put(&mut input, &float_ws);
    input.extend_from_slice(&(launches.levels.len() as u32).to_le_bytes());
    for lv in &launches.levels {
        input.extend_from_slice(lv.params.as_bytes());
        for d in [lv.work_items, lv.kv_heads, lv.merge_rows, lv.merge as u32] {
            input.extend_from_slice(&d.to_le_bytes());
        }
    }
    input.extend_from_slice(launches.fold.as_bytes());
    input.extend_from_slice(&launches.fold_rows.to_le_bytes());
    // A cascade of no level runs no attention kernel: any variant's binary holds the fold.
    let defines = defines.unwrap_or_else(|| launch::merge_defines(h.head_dim(), dt));
    let exe = build(cxx, dir, &defines).map_err(fail)?;
    let out = run_exe(&exe, dir, &["--cascade"], &input)?;
    let ob = args.o.len() * dt.size();
    if out.len() != ob + lse_init.len() * 4 {
        return Err(fail(format!(
            "emulator output has {} bytes, expected {}",
            out.len(),
            ob + lse_init.len() * 4
        )));
    }
    let o =
        Tensor::from_le_bytes(dt, &out[..ob]).ok_or_else(|| fail("emulator output: o".into()))?;
    match (args.o, o) {
        (TensorMut::F32(d), Tensor::F32(s)) => d.copy_from_slice(&s),
        (TensorMut::F16(d), Tensor::F16(s)) => d.copy_from_slice(&s),
        (TensorMut::BF16(d), Tensor::BF16(s)) => d.copy_from_slice(&s),
        _ => return Err(fail("emulator output: o has another dtype".into())),
    }
    if let Some(l) = args.lse {
        for (d, c) in l.iter_mut().zip(out[ob..].chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}
