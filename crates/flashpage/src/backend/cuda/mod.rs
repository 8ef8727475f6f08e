//! The CUDA backend (feature `cuda`): kernels compiled at run time with NVRTC.
//!
//! The crate builds without any CUDA toolkit: `cudarc` loads the driver and NVRTC at run
//! time, and a machine without them gets [`Error::BackendUnavailable`] from
//! [`CudaBackend::new`], never a panic.
//!
//! # Flow
//!
//! 1. [`CudaBackend::new`] opens the device and a stream.
//! 2. Per step: plan on the host ([`Plan::new`] with [`CudaBackend::parallelism`]), then
//!    [`CudaBackend::upload_plan`] copies the plan's int image into the caller's int
//!    workspace in **one** asynchronous host-to-device copy.
//! 3. Per layer: [`CudaBackend::run`] launches the attention kernel over the plan's work
//!    items (grid: work-item capacity × KV heads) and, for split-KV rows, the merge kernel.
//!    It allocates nothing; both workspaces are the caller's ([`DeviceWorkspace`]).
//!
//! Kernels are CUDA C++ sources in the crate (`kernels/*.cu`), specialised by head
//! dimension, dtype and GQA group with `-D` options, compiled for the device's architecture
//! (`sm_90a` on H100) on first use and cached on disk (`FLASHPAGE_CUDA_CACHE`, see
//! `docs/cuda.md`).
//!
//! # Graph mode
//!
//! With a plan in graph mode (`PlanConfig::graph_capacity`) the launch shape and every
//! kernel argument are fixed: [`CudaBackend::capture`] records `run` calls into a
//! [`CudaGraph`]; for the next batch, [`Plan::replan`] + [`CudaBackend::upload_plan`]
//! rewrite the int workspace in place and [`CudaGraph::launch`] replays.
//!
//! # Streams
//!
//! Everything runs on the backend's stream: its own ([`CudaBackend::new`]), the caller's
//! ([`CudaBackend::with_stream`]) or a raw `CUstream` of another library's
//! ([`CudaBackend::from_raw_stream`], e.g. torch's current stream). The backend never
//! synchronises the stream except in [`CudaBackend::synchronize`] and the bandwidth probe;
//! uploads (`upload_plan`) are asynchronous copies from pageable host memory, which the
//! driver stages before returning. The backend turns off cudarc's cross-stream event
//! tracking on the context it opens (CUDA-graph capture requires it), so buffers written on
//! another stream must be synchronised by the caller before `run`.

mod cascade;
mod context;
mod device;
mod graph;
pub mod launch;
mod nvrtc;
pub mod ops;
pub mod prefill;
pub mod report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};

use device::{
    BANDWIDTH_SRC, DECODE_SRC, MERGE_SRC, OPS_SRC, PREFILL_SRC, RunSignature, Uploaded, check_elem,
    driver_err,
};
pub use device::{
    DeviceCustomMask, DeviceElem, DeviceKvFp8, DeviceRunArgs, DeviceWorkspace, KERNEL_SOURCES,
};
pub use graph::CudaGraph;
pub use nvrtc::CACHE_ENV;
pub use ops::{DeviceAppendArrays, DeviceKvCacheMut, DeviceRows, DeviceRowsMut};

use self::launch::{Buffers, DecodeVariant};
use self::prefill::PrefillVariant;
use super::{ArgShapes, check_run_args};
use crate::error::{Error, Result};
use crate::layout::{DType, HeadConfig, KvStrides, RunStrides};
use crate::ops::append::{AppendRope, AppendTargets};
use crate::ops::rope::Rope;
use crate::options::{AttentionOptions, PosEncoding};
use crate::plan::{Plan, PlanKind};
use crate::workspace::{CUDA_BASE_ALIGN, Requirement};

/// The record of a kernel the backend loaded: where it came from and what it uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedKernel {
    /// Source file (`decode.cu`, ...).
    pub source: &'static str,
    /// Entry function.
    pub entry: &'static str,
    /// The `-D` options it was compiled with.
    pub defines: Vec<String>,
    /// Whether the image came from the disk cache (no compile in this process).
    pub from_cache: bool,
    /// Wall time of the compile that produced the image, in milliseconds (also for a cached
    /// image: the time recorded with it).
    pub compile_ms: f64,
    /// ptxas's resource report for the entry, from NVRTC's log.
    pub resources: Option<report::Resources>,
    /// Warnings in NVRTC's log.
    pub warnings: Vec<String>,
}

/// The CUDA backend: one device, one stream, the compiled kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: context::DeviceInfo,
    compiler: nvrtc::Compiler,
    decode: Mutex<HashMap<DecodeVariant, CudaFunction>>,
    prefill: Mutex<HashMap<PrefillVariant, CudaFunction>>,
    merge: Mutex<HashMap<(usize, DType), CudaFunction>>,
    fold: Mutex<HashMap<(usize, DType), CudaFunction>>,
    bandwidth: Mutex<Option<(CudaFunction, CudaFunction)>>,
    ops: Mutex<HashMap<&'static str, CudaFunction>>,
    capture: Mutex<Option<Vec<RunSignature>>>,
    loaded: Mutex<Vec<LoadedKernel>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.info.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.compiler.arch)
            .field("sms", &self.info.sms)
            .finish()
    }
}

impl DeviceWorkspace {
    /// Allocates both workspaces for `req` (e.g. `workspace_size(&limits)`), zeroed.
    pub fn new(backend: &CudaBackend, req: &Requirement) -> Result<Self> {
        // At least one 256-byte line each, so the addresses are real allocations.
        let f = req.float.total().max(CUDA_BASE_ALIGN);
        let i = req.int.total().max(CUDA_BASE_ALIGN);
        let float = backend
            .stream
            .alloc_zeros::<u8>(f)
            .map_err(|e| driver_err("allocating the float workspace", e))?;
        let int = backend
            .stream
            .alloc_zeros::<u8>(i)
            .map_err(|e| driver_err("allocating the int workspace", e))?;
        Self::from_slices(float, int, &backend.stream)
    }
}

impl CudaBackend {
    /// Opens device `ordinal` with a new stream.
    ///
    /// Without an NVIDIA driver, NVRTC or a device this is
    /// [`Error::BackendUnavailable`] with the reason (checked before any call that could
    /// panic):
    ///
    /// ```
    /// # use flashpage::backend::cuda::CudaBackend;
    /// match CudaBackend::new(0) {
    ///     Ok(gpu) => println!("running on {gpu:?}"),
    ///     Err(flashpage::Error::BackendUnavailable { reason, .. }) => println!("no gpu: {reason}"),
    ///     Err(e) => panic!("{e}"),
    /// }
    /// ```
    pub fn new(ordinal: usize) -> Result<Self> {
        let (ctx, info) = context::open(ordinal)?;
        context::guarded("cuda stream creation", || {
            // SAFETY: the backend uses one stream and orders its own work; graph capture
            // needs cross-stream event tracking off (documented on the type).
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx
                .new_stream()
                .map_err(|e| driver_err("creating a stream", e))?;
            Self::assemble(stream, info)
        })
    }

    /// A backend on the caller's stream (and so on its context): an engine that owns its
    /// CUDA context and stream (candle, torch) orders flashpage's work with its own. A raw
    /// `CUstream` is wrapped with cudarc's `CudaContext::wrap_borrowed_stream` first.
    ///
    /// The caller's context keeps its settings: cudarc's cross-stream event tracking is
    /// left as the caller set it (graph capture needs it off:
    /// `CudaContext::disable_event_tracking`). Without a driver or NVRTC this is
    /// [`Error::BackendUnavailable`].
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let info = context::describe(stream.context())?;
        context::guarded("cuda backend on a caller's stream", || {
            Self::assemble(stream, info)
        })
    }

    /// A backend on a raw `CUstream` owned by another library (torch's
    /// `torch.cuda.current_stream().cuda_stream`, candle's device stream), on device
    /// `ordinal`'s **primary** context (the context torch, candle and the CUDA runtime use).
    /// The stream is borrowed, never destroyed by the backend. A null stream is the legacy
    /// default stream of that context.
    ///
    /// Checked (no synchronisation): libraries and device as [`CudaBackend::new`]; that the
    /// stream belongs to the primary context (`cuStreamGetCtx`), else
    /// [`Error::BackendUnavailable`] naming both contexts. A stream of a context that is not
    /// primary goes through [`CudaBackend::with_stream`] with the caller's own
    /// `Arc<CudaContext>` (`CudaContext::wrap_borrowed_stream`).
    ///
    /// cudarc's cross-stream event tracking is turned off on the backend's own context
    /// handle (it is the backend's, not the caller's): nothing is recorded or waited on
    /// behind the caller's back, and graph capture works.
    ///
    /// # Safety
    ///
    /// - `stream` must be a valid stream (or null) of device `ordinal`'s primary context, and
    ///   must stay alive while the backend, or anything made with it (workspaces, graphs),
    ///   is used.
    /// - The caller orders work on the stream from other streams: buffers written elsewhere
    ///   must be complete (or waited for on `stream`) before a call that reads them.
    pub unsafe fn from_raw_stream(
        ordinal: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<Self> {
        let (ctx, info) = context::open(ordinal)?;
        context::guarded("cuda backend on a raw stream", || {
            ctx.bind_to_thread()
                .map_err(|e| driver_err("binding the context", e))?;
            if !stream.is_null() {
                let mut owner: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
                // SAFETY: the caller guarantees `stream` is a live stream handle; the call
                // only writes the owning context into `owner`.
                let r = unsafe { cudarc::driver::sys::cuStreamGetCtx(stream, &mut owner) };
                if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                    return Err(driver_err("querying the stream's context", r));
                }
                if owner != ctx.cu_ctx() {
                    return Err(Error::BackendUnavailable {
                        backend: "cuda",
                        reason: format!(
                            "the stream belongs to context {owner:?}, not to device {ordinal}'s primary context {:?} (use CudaBackend::with_stream with that context)",
                            ctx.cu_ctx()
                        ),
                    });
                }
            }
            // SAFETY: `ctx` is this backend's own handle of the primary context; turning off
            // its event tracking affects only work submitted through this handle.
            unsafe { ctx.disable_event_tracking() };
            // SAFETY: the caller guarantees the stream is valid for this context and outlives
            // the backend (the function's contract).
            let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
            Self::assemble(stream, info)
        })
    }

    fn assemble(stream: Arc<CudaStream>, info: context::DeviceInfo) -> Result<Self> {
        let version = nvrtc::nvrtc_version()?;
        Ok(CudaBackend {
            compiler: nvrtc::Compiler {
                arch: context::arch_for(info.compute_capability),
                version,
                cache: nvrtc::cache_dir(),
            },
            ctx: stream.context().clone(),
            stream,
            info,
            decode: Mutex::new(HashMap::new()),
            prefill: Mutex::new(HashMap::new()),
            merge: Mutex::new(HashMap::new()),
            fold: Mutex::new(HashMap::new()),
            bandwidth: Mutex::new(None),
            ops: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
            loaded: Mutex::new(Vec::new()),
        })
    }

    /// The stream every operation of this backend is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device name.
    pub fn device_name(&self) -> &str {
        &self.info.name
    }

    /// The NVRTC architecture kernels are compiled for (`sm_90a` on H100).
    pub fn arch(&self) -> &str {
        &self.compiler.arch
    }

    /// Streaming multiprocessors.
    pub fn num_sms(&self) -> usize {
        self.info.sms
    }

    /// Work slots to pass as [`crate::PlanConfig::parallelism`] for a plan of `kind` over
    /// `heads` with `dtype` and `options`: SMs × the resident blocks per SM of the kernel
    /// variant that plan launches, from the driver's occupancy calculator
    /// (`cuOccupancyMaxActiveBlocksPerMultiprocessor`). Loads (compiles, or reads from the
    /// cache) that variant.
    pub fn parallelism(
        &self,
        heads: &HeadConfig,
        kind: PlanKind,
        dtype: DType,
        options: &AttentionOptions,
    ) -> Result<usize> {
        self.parallelism_kv(heads, kind, dtype, dtype, options)
    }

    /// [`CudaBackend::parallelism`] for a K/V cache of `kv_dtype` (an FP8 dtype, or q's
    /// `dtype`): the variants reading an FP8 cache are kernels of their own.
    pub fn parallelism_kv(
        &self,
        heads: &HeadConfig,
        kind: PlanKind,
        dtype: DType,
        kv_dtype: DType,
        options: &AttentionOptions,
    ) -> Result<usize> {
        check_kv_dtypes(dtype, kv_dtype)?;
        let rope = matches!(options.pos_encoding, PosEncoding::Rope { .. });
        let blocks = match PrefillVariant::new(heads, kind, dtype, rope, self.arch_number()) {
            Some(v) => self.prefill_blocks_per_sm(v.with_kv_dtype(kv_dtype))?,
            None => self.blocks_per_sm(
                DecodeVariant::new(heads, kind, dtype, rope).with_kv_dtype(kv_dtype),
            )?,
        };
        Ok(self.info.sms * blocks.max(1) as usize)
    }

    /// Resident blocks per SM of decode variant `v` at its launch shape, from the driver's
    /// occupancy calculator (the figure `flashpage kernels` computes offline from the
    /// compile report).
    pub fn blocks_per_sm(&self, v: DecodeVariant) -> Result<u32> {
        let f = self.decode_fn(v)?;
        f.occupancy_max_active_blocks_per_multiprocessor(v.threads(), 0, None)
            .map_err(|e| driver_err("querying the decode kernel's occupancy", e))
    }

    /// Resident blocks per SM of tensor-core prefill variant `v`, from the driver's
    /// occupancy calculator.
    pub fn prefill_blocks_per_sm(&self, v: PrefillVariant) -> Result<u32> {
        let f = self.prefill_fn(v)?;
        f.occupancy_max_active_blocks_per_multiprocessor(v.threads(), 0, None)
            .map_err(|e| driver_err("querying the prefill kernel's occupancy", e))
    }

    /// The compute capability the kernels are compiled for (90 for `sm_90a`).
    fn arch_number(&self) -> u32 {
        prefill::arch_number(&self.compiler.arch).unwrap_or(0)
    }

    /// The tensor-core prefill variant `plan` runs with `dtype` on this device, or `None`
    /// when it runs on the attention kernel (see [`prefill`]).
    pub fn prefill_variant(&self, plan: &Plan, dtype: DType) -> Option<PrefillVariant> {
        PrefillVariant::for_plan(plan, dtype, self.arch_number())
    }

    /// The kernels this backend has loaded so far, in load order, with their compile records.
    pub fn loaded_kernels(&self) -> Vec<LoadedKernel> {
        self.loaded.lock().expect("kernel record lock").clone()
    }

    /// Waits for all work on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronising the stream", e))
    }

    /// Copies `plan`'s int image into `ws`'s int workspace: one asynchronous host-to-device
    /// copy on the backend's stream (the image is staged by the driver, so the plan may be
    /// replanned as soon as this returns). In graph mode this is the in-place rewrite that
    /// precedes [`CudaGraph::launch`]. Must not be called while capturing.
    pub fn upload_plan(&self, plan: &Plan, ws: &mut DeviceWorkspace) -> Result<()> {
        if self.capture.lock().expect("capture lock").is_some() {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: "upload_plan during graph capture (upload before capture and before each launch)".into(),
            });
        }
        plan.requirement().int.check_fits(ws.int.len())?;
        let image = plan.int_image();
        // Forget the previous plan (and cascade) first: after a failed copy the workspace
        // holds none.
        ws.cascade = None;
        let mut up = ws.uploaded.take().unwrap_or_else(|| Uploaded {
            image: Vec::new(),
            caps: *plan.capacities(),
            offsets: plan.int_offsets(),
        });
        if !image.is_empty() {
            let bytes: &[u8] = bytemuck::cast_slice(image);
            let mut dst = ws.int.slice_mut(0..bytes.len());
            self.stream
                .memcpy_htod(bytes, &mut dst)
                .map_err(|e| driver_err("uploading the plan", e))?;
        }
        up.image.clear();
        up.image.extend_from_slice(image);
        up.caps = *plan.capacities();
        up.offsets = plan.int_offsets();
        ws.uploaded = Some(up);
        Ok(())
    }

    /// Compiles and loads the kernels `plan` needs for `dtype` (otherwise done by the first
    /// `run`; call it before capturing a graph so no compile happens during capture).
    pub fn prepare(&self, plan: &Plan, dtype: DType) -> Result<()> {
        self.prepare_kv(plan, dtype, dtype)
    }

    /// [`CudaBackend::prepare`] for a K/V cache of `kv_dtype` (an FP8 dtype, or q's
    /// `dtype`).
    pub fn prepare_kv(&self, plan: &Plan, dtype: DType, kv_dtype: DType) -> Result<()> {
        check_kv_dtypes(dtype, kv_dtype)?;
        self.attend_fn(plan, dtype, kv_dtype)?;
        self.merge_fn(plan.heads().head_dim(), dtype)?;
        Ok(())
    }

    /// The attention kernel `plan` runs on with q of `dtype` and a cache of `kv_dtype`, and
    /// its block size: the tensor-core prefill kernel where it takes the plan, else
    /// `fp_decode`.
    fn attend_fn(&self, plan: &Plan, dtype: DType, kv_dtype: DType) -> Result<(CudaFunction, u32)> {
        Ok(
            match PrefillVariant::for_plan_kv(plan, dtype, kv_dtype, self.arch_number()) {
                Some(v) => (self.prefill_fn(v)?, v.threads()),
                None => {
                    let v = DecodeVariant::for_plan_kv(plan, dtype, kv_dtype);
                    (self.decode_fn(v)?, v.threads())
                }
            },
        )
    }

    fn load(
        &self,
        name: &'static str,
        src: &str,
        defines: &[String],
        func: &'static str,
    ) -> Result<CudaFunction> {
        let c = self.compiler.compile(name, src, defines)?;
        self.loaded
            .lock()
            .expect("kernel record lock")
            .push(LoadedKernel {
                source: name,
                entry: func,
                defines: defines.to_vec(),
                from_cache: c.cached,
                compile_ms: c.compile_ms,
                resources: report::parse_resources(&c.log, func),
                warnings: report::log_warnings(&c.log),
            });
        let ptx = match c.image {
            nvrtc::Image::Cubin(b) => cudarc::nvrtc::Ptx::from_binary(b),
            nvrtc::Image::Ptx(s) => cudarc::nvrtc::Ptx::from_src(s),
        };
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(|e| driver_err(&format!("loading {name}"), e))?;
        module
            .load_function(func)
            .map_err(|e| driver_err(&format!("loading {func}"), e))
    }

    fn decode_fn(&self, v: DecodeVariant) -> Result<CudaFunction> {
        let mut map = self.decode.lock().expect("kernel cache lock");
        if let Some(f) = map.get(&v) {
            return Ok(f.clone());
        }
        let f = self.load("decode.cu", DECODE_SRC, &v.defines(), "fp_decode")?;
        map.insert(v, f.clone());
        Ok(f)
    }

    fn prefill_fn(&self, v: PrefillVariant) -> Result<CudaFunction> {
        let mut map = self.prefill.lock().expect("kernel cache lock");
        if let Some(f) = map.get(&v) {
            return Ok(f.clone());
        }
        let f = self.load("prefill.cu", PREFILL_SRC, &v.defines(), "fp_prefill")?;
        map.insert(v, f.clone());
        Ok(f)
    }

    fn merge_fn(&self, head_dim: usize, dtype: DType) -> Result<CudaFunction> {
        let mut map = self.merge.lock().expect("kernel cache lock");
        if let Some(f) = map.get(&(head_dim, dtype)) {
            return Ok(f.clone());
        }
        let defines = launch::merge_defines(head_dim, dtype);
        let f = self.load("merge.cu", MERGE_SRC, &defines, "fp_merge")?;
        map.insert((head_dim, dtype), f.clone());
        Ok(f)
    }

    /// Runs `plan` on device tensors. `ws` must hold the plan (see
    /// [`CudaBackend::upload_plan`]); arguments are checked against the plan first (shapes,
    /// dtypes, strides, host page ids, workspace sizes and alignment) and on error nothing is
    /// launched. Asynchronous: synchronise the stream before reading `o` on the host.
    pub fn run<T: DeviceElem, K: DeviceElem>(
        &self,
        plan: &Plan,
        args: DeviceRunArgs<'_, T, K>,
        ws: &mut DeviceWorkspace,
    ) -> Result<()> {
        self.run_inner(plan, args, None, None, ws)
    }

    /// [`CudaBackend::run`] with strided q and o (`strides`, as
    /// [`crate::backend::cpu::CpuBackend::run_strided`]: q a view into a fused QKV buffer, o
    /// a view into a larger buffer whose gaps are never written) and, if given, V strides of
    /// its own (`args.strides` are then K's). Every stride must be a multiple of 16 bytes.
    /// The row bound of the kernels is the number of whole rows q, o and lse hold.
    pub fn run_strided<T: DeviceElem, K: DeviceElem>(
        &self,
        plan: &Plan,
        args: DeviceRunArgs<'_, T, K>,
        strides: RunStrides,
        v_strides: Option<KvStrides>,
        ws: &mut DeviceWorkspace,
    ) -> Result<()> {
        self.run_inner(plan, args, Some(strides), v_strides, ws)
    }

    fn run_inner<T: DeviceElem, K: DeviceElem>(
        &self,
        plan: &Plan,
        args: DeviceRunArgs<'_, T, K>,
        strides: Option<RunStrides>,
        v_strides: Option<KvStrides>,
        ws: &mut DeviceWorkspace,
    ) -> Result<()> {
        let dt = args.dtype;
        // The cache's dtype: q's, or the FP8 format of kv_fp8 (check_run_args checks the
        // pair and the scales).
        let kdt = args.kv_fp8.map_or(dt, |f| f.dtype);
        let (k_scale, v_scale) = args.kv_fp8.map_or((None, None), |f| (f.k_scale, f.v_scale));
        check_elem::<T>("q", dt)?;
        check_elem::<K>("k", kdt)?;
        // The host copy is read where the device ids are: same length (checked first).
        if let Some(h) = args.host_kv_indices
            && h.len() != args.kv_indices.len()
        {
            return Err(Error::TensorShape {
                tensor: "host_kv_indices",
                expected: format!(
                    "{} entries (as kv_indices on the device)",
                    args.kv_indices.len()
                ),
                actual: format!("{} entries", h.len()),
            });
        }
        if let Some(m) = &args.custom_mask
            && m.indptr.len() < m.host_indptr.len()
        {
            return Err(Error::TensorShape {
                tensor: "mask_indptr",
                expected: format!(
                    "at least {} entries on the device (as host_indptr)",
                    m.host_indptr.len()
                ),
                actual: format!("{} entries", m.indptr.len()),
            });
        }
        // Device buffers may be larger than the batch (graph mode: sized for the capacity);
        // the kernels' row bound is what all of q, o and lse can hold.
        let heads = plan.heads();
        let (hq, d) = (heads.num_qo_heads(), heads.head_dim());
        let rows = plan.num_q_rows();
        let at_least = |len: usize, need: usize| if len >= need { need } else { len };
        let (q_len, o_len) = (args.q.len(), args.o.len());
        let lse_len = args.lse.as_ref().map(|l| l.len());
        let (qn, on) = match strides {
            // Strided: the extent check of check_run_args takes larger buffers as they are.
            Some(_) => (q_len, o_len),
            None => (
                at_least(q_len, rows * hq * d),
                at_least(o_len, rows * hq * d),
            ),
        };
        let v_strides = v_strides.unwrap_or(args.strides);
        let shapes = ArgShapes {
            q: (dt, qn),
            k: (kdt, args.k.len()),
            v: (kdt, args.v.len()),
            o: (dt, on),
            lse: lse_len.map(|n| at_least(n, rows * hq)),
            strides: args.strides,
            v_strides,
            qo: strides,
            num_pages: args.num_pages,
            kv_indices: args.host_kv_indices,
            num_indices: args.kv_indices.len(),
            paged: None,
            sinks: None,
            custom_mask: args.custom_mask.map(|m| (m.host_indptr, m.bits.len())),
            k_scale,
            v_scale,
        };
        let qo = strides.unwrap_or_else(|| RunStrides::contiguous(heads));
        // Whole rows a buffer of `len` elements holds with row stride `row`.
        let rows_in = |len: usize, st: crate::layout::QoStrides| {
            let one = (hq - 1).saturating_mul(st.head).saturating_add(d);
            match len.checked_sub(one) {
                None => 0,
                Some(_) if st.row == 0 => usize::MAX,
                Some(rest) => rest / st.row + 1,
            }
        };
        let row_cap = rows_in(q_len, qo.q)
            .min(rows_in(o_len, qo.o))
            .min(lse_len.map_or(usize::MAX, |n| n / hq))
            .min(i64::MAX as usize);
        check_run_args(plan, &shapes)?;
        launch::check_custom_mask(plan, args.custom_mask.is_some())?;
        let req = plan.requirement();
        req.float.check_fits(ws.float.len())?;
        req.int.check_fits(ws.int.len())?;
        if !ws.holds(plan) {
            return Err(Error::PlanMismatch {
                what: "int workspace",
                expected: "this plan's int image".into(),
                actual: "another plan's (call upload_plan after planning)".into(),
            });
        }
        let vec = 16 / K::BYTES;
        for (which, s) in [("kv", args.strides), ("v", v_strides)] {
            if !(s.page.is_multiple_of(vec)
                && s.token.is_multiple_of(vec)
                && s.head.is_multiple_of(vec))
            {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    what: format!(
                        "{which} strides (page {}, token {}, head {}) that are not multiples of {vec} elements (16 bytes)",
                        s.page, s.token, s.head
                    ),
                });
            }
        }
        let vec = 16 / T::BYTES;
        for (which, s) in [("q", qo.q), ("o", qo.o)] {
            if !(s.row.is_multiple_of(vec) && s.head.is_multiple_of(vec)) {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    what: format!(
                        "{which} strides (row {}, head {}) that are not multiples of {vec} elements (16 bytes)",
                        s.row, s.head
                    ),
                });
            }
        }
        for (what, v, lim) in [
            ("num_pages", args.num_pages, i32::MAX as usize),
            ("num_kv_heads", heads.num_kv_heads(), 65_535),
        ] {
            if v > lim {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    what: format!("{what} = {v} (at most {lim})"),
                });
            }
        }

        // The decode variant is the run's signature for graph replays; prefill plans the
        // tensor-core kernel takes run on it, the rest on fp_decode.
        let variant = DecodeVariant::for_plan_kv(plan, dt, kdt);
        let (attend, attend_threads) = self.attend_fn(plan, dt, kdt)?;
        let caps = *plan.capacities();
        let launch_merge = caps.merge_rows > 0 && (plan.is_graph() || plan.num_merge_rows() > 0);
        let merge = if launch_merge {
            Some(self.merge_fn(heads.head_dim(), dt)?)
        } else {
            None
        };

        let stream = &*self.stream;
        let (q, _gq) = args.q.device_ptr(stream);
        let (k, _gk) = args.k.device_ptr(stream);
        let (v, _gv) = args.v.device_ptr(stream);
        let (kvi, _gi) = args.kv_indices.device_ptr(stream);
        let (fw, _gf) = ws.float.device_ptr_mut(stream);
        let (iw, _gw) = ws.int.device_ptr(stream);
        let (o, _go) = args.o.device_ptr_mut(stream);
        let mut lse_ptr = 0u64;
        let mut _gl = None;
        if let Some(l) = args.lse {
            let (p, g) = l.device_ptr_mut(stream);
            lse_ptr = p;
            _gl = Some(g);
        }
        let mut sinks_ptr = 0u64;
        let mut _gs = None;
        if let Some(sk) = args.sinks {
            let (p, g) = sk.device_ptr(stream);
            sinks_ptr = p;
            _gs = Some(g);
        }
        let mut mask = (0u64, 0u64, 0usize);
        let mut _gm = None;
        if let Some(m) = &args.custom_mask {
            let (b, gb) = m.bits.device_ptr(stream);
            let (i, gi) = m.indptr.device_ptr(stream);
            mask = (b, i, m.bits.len());
            _gm = Some((gb, gi));
        }
        for (tensor, p) in [("q", q), ("k", k), ("v", v), ("o", o)] {
            if !p.is_multiple_of(16) {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    what: format!("{tensor} at address {p:#x}, not 16-byte aligned"),
                });
            }
        }
        for (name, p) in [("float", fw), ("int", iw)] {
            if !p.is_multiple_of(CUDA_BASE_ALIGN as u64) {
                return Err(Error::WorkspaceMisaligned {
                    workspace: name,
                    address: p as usize,
                    align: CUDA_BASE_ALIGN,
                });
            }
        }
        let bufs = Buffers {
            q,
            k,
            v,
            o,
            lse: lse_ptr,
            sinks: sinks_ptr,
            mask,
            kv_indices: kvi,
            int_ws: iw,
            float_ws: fw,
            qo_rows: row_cap,
            num_indices: args.kv_indices.len(),
            num_pages: args.num_pages,
            strides: args.strides,
            v_strides,
            qo,
        };
        let mut params = launch::params(plan, &bufs);
        params.set_kv_scales(k_scale, v_scale)?;
        {
            let mut cap = self.capture.lock().expect("capture lock");
            if let Some(sigs) = cap.as_mut() {
                sigs.push(RunSignature {
                    params,
                    variant,
                    kind: plan.kind(),
                    int_ws: iw,
                    float_req: req.float,
                    launch_merge,
                });
            }
        }
        if caps.work_items > 0 {
            let cfg = LaunchConfig {
                grid_dim: (caps.work_items as u32, heads.num_kv_heads() as u32, 1),
                block_dim: (attend_threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&attend);
            b.arg(&params);
            // SAFETY: Params matches the kernel's parameter struct; every address in it is a
            // live device allocation of at least the size checked above (check_run_args and
            // the workspace checks), and the kernel bounds-checks every index it reads from
            // the int image against those sizes.
            unsafe { b.launch(cfg) }
                .map_err(|e| driver_err("launching the attention kernel", e))?;
        }
        if let Some(m) = merge {
            let cfg = LaunchConfig {
                grid_dim: (caps.merge_rows as u32, 1, 1),
                block_dim: (launch::MERGE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&m);
            b.arg(&params);
            // SAFETY: as above; the merge kernel reads partial rows below partial_cap and
            // writes rows of o/lse below qo_rows only.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err("launching the merge kernel", e))?;
        }
        Ok(())
    }

    fn ops_fn(&self, entry: &'static str) -> Result<CudaFunction> {
        let mut map = self.ops.lock().expect("kernel cache lock");
        if let Some(f) = map.get(entry) {
            return Ok(f.clone());
        }
        let f = self.load("ops.cu", OPS_SRC, &[], entry)?;
        map.insert(entry, f.clone());
        Ok(f)
    }

    fn launch_ops(&self, entry: &'static str, p: &ops::OpsParams) -> Result<()> {
        if p.rows() == 0 {
            return Ok(());
        }
        let f = self.ops_fn(entry)?;
        let cfg = LaunchConfig {
            grid_dim: (p.rows(), 1, 1),
            block_dim: (ops::OPS_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(p);
        // SAFETY: OpsParams matches the kernel's struct; every address in it is a live device
        // buffer at least as long as the validated shapes need (ops::append_params /
        // ops::rope_params checked the host shapes and the device lengths), and the kernel
        // bounds-checks every index it reads from the device index arrays.
        unsafe { b.launch(cfg) }.map_err(|e| driver_err(&format!("launching {entry}"), e))?;
        Ok(())
    }

    /// Appends new tokens' K/V into a device paged cache, on the backend's stream
    /// (asynchronous; no synchronisation): the device version of
    /// [`crate::ops::append::append_kv`] (`targets` = [`AppendTargets::Csr`]) and
    /// [`crate::ops::append::append_kv_at`] ([`AppendTargets::At`], FlashInfer's
    /// `append_paged_kv_cache`). Input rows of any dtype (`S`), the cache's dtype (`C`)
    /// may differ; K rotated by `rope` when given. An FP8 cache (`C = u8`) is quantised with
    /// its scales ([`DeviceKvCacheMut::k_scale`] / `v_scale`: `encode(x / scale[h])`, round
    /// to nearest even, e4m3fn saturating, e5m2 overflowing to inf), as the host op.
    ///
    /// The host arrays in `targets` are validated as the host op validates them (page ids,
    /// CSR arrays, positions, shapes, strides, RoPE parameters) and `arrays` must hold the
    /// same contents on the device (at least as many entries); on error nothing is launched.
    /// The result equals the host op's bit for bit on the same inputs (same f64 angles, f32
    /// rotation without contraction, one rounding).
    pub fn append_kv<S: DeviceElem, C: DeviceElem>(
        &self,
        targets: AppendTargets<'_>,
        arrays: &DeviceAppendArrays<'_>,
        k: DeviceRows<'_, S>,
        v: DeviceRows<'_, S>,
        cache: DeviceKvCacheMut<'_, C>,
        rope: Option<AppendRope<'_>>,
    ) -> Result<()> {
        check_elem::<S>("k", k.dtype)?;
        check_elem::<S>("v", v.dtype)?;
        check_elem::<C>("k_cache", cache.dtype)?;
        let st = &*self.stream;
        let (ka, _gk) = k.data.device_ptr(st);
        let (va, _gv) = v.data.device_ptr(st);
        let k_len = cache.k.len();
        let (kc, _gkc) = cache.k.device_ptr_mut(st);
        let mut _gvc = None;
        let vc = match cache.v {
            Some(vb) => {
                let n = vb.len();
                let (a, g) = vb.device_ptr_mut(st);
                _gvc = Some(g);
                Some((a, n))
            }
            None => None,
        };
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        fn dev<'a>(
            a: Option<&'a dyn DevicePtr<i32>>,
            st: &'a CudaStream,
            guards: &mut Vec<SyncOnDrop<'a>>,
        ) -> (u64, usize) {
            match a {
                Some(a) => {
                    let n = a.len();
                    let (p, g) = a.device_ptr(st);
                    guards.push(g);
                    (p, n)
                }
                None => (0, 0),
            }
        }
        let arr = ops::OpsArrays {
            append_indptr: dev(arrays.append_indptr, st, &mut guards),
            kv_indptr: dev(Some(arrays.kv_indptr), st, &mut guards),
            kv_indices: dev(Some(arrays.kv_indices), st, &mut guards),
            kv_last_page_len: dev(Some(arrays.kv_last_page_len), st, &mut guards),
            batch_indices: dev(arrays.batch_indices, st, &mut guards),
            positions: dev(arrays.positions, st, &mut guards),
        };
        let rows = |r: &DeviceRows<'_, S>, addr: u64| ops::OpsRows {
            addr,
            len: r.data.len(),
            dtype: r.dtype,
            tokens: r.tokens,
            heads: r.heads,
            head_dim: r.head_dim,
            row_stride: r.row_stride,
            head_stride: r.head_stride,
        };
        let c = ops::OpsCache {
            k_addr: kc,
            k_len,
            v: vc,
            dtype: cache.dtype,
            k_base: cache.k_base,
            v_base: cache.v_base,
            k_strides: cache.k_strides,
            v_strides: cache.v_strides,
            page_size: cache.page_size,
            num_pages: cache.num_pages,
        };
        let p = ops::append_params_scaled(
            targets,
            &rows(&k, ka),
            &rows(&v, va),
            &c,
            (cache.k_scale, cache.v_scale),
            rope.as_ref(),
            &arr,
        )?;
        self.launch_ops("fp_append", &p)
    }

    /// Rotates every head of every row of `x` in place, row `t` to position
    /// `positions[t]`, on the backend's stream (asynchronous): the device version of
    /// [`crate::ops::rope::apply_rope`], bit for bit. `host_positions` is the host copy of
    /// the device `positions` (validated: one per row, none negative); on error nothing is
    /// launched.
    pub fn apply_rope<T: DeviceElem>(
        &self,
        rope: &Rope,
        x: DeviceRowsMut<'_, T>,
        host_positions: &[i32],
        positions: &dyn DevicePtr<i32>,
    ) -> Result<()> {
        check_elem::<T>("x", x.dtype)?;
        let st = &*self.stream;
        let len = x.data.len();
        let (xa, _gx) = x.data.device_ptr_mut(st);
        let (pa, _gp) = positions.device_ptr(st);
        let rows = ops::OpsRows {
            addr: xa,
            len,
            dtype: x.dtype,
            tokens: x.tokens,
            heads: x.heads,
            head_dim: x.head_dim,
            row_stride: x.row_stride,
            head_stride: x.head_stride,
        };
        let p = ops::rope_params(rope, &rows, host_positions, (pa, positions.len()))?;
        self.launch_ops("fp_rope", &p)
    }

    /// Records the runs `f` issues on the backend's stream into a [`CudaGraph`] (nothing
    /// executes during capture). Every run inside must use one plan signature (graph-mode
    /// plans of one capacity, same options, buffers and workspace). Upload the plan and call
    /// [`CudaBackend::prepare`] (or run once) before capturing.
    pub fn capture(&self, f: impl FnOnce(&Self) -> Result<()>) -> Result<CudaGraph> {
        {
            let mut cap = self.capture.lock().expect("capture lock");
            if cap.is_some() {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    what: "nested graph capture".into(),
                });
            }
            *cap = Some(Vec::new());
        }
        let begun = self.stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        );
        if let Err(e) = begun {
            self.capture.lock().expect("capture lock").take();
            return Err(driver_err("beginning graph capture", e));
        }
        let body = f(self);
        let ended = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        let sigs = self
            .capture
            .lock()
            .expect("capture lock")
            .take()
            .unwrap_or_default();
        body?;
        let g = ended
            .map_err(|e| driver_err("ending graph capture", e))?
            .ok_or_else(|| driver_err("ending graph capture", "no graph was captured"))?;
        if sigs.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: "a graph whose runs use different plans or buffers".into(),
            });
        }
        Ok(CudaGraph::new(g, sigs.into_iter().next()))
    }

    /// Measures the device's read bandwidth in bytes per second: `reps` timed passes (median)
    /// of a streaming read kernel over `bytes` bytes of non-zero data (at least 1 GiB
    /// recommended), after one warm-up pass. Allocates the buffer for the measurement.
    pub fn measure_read_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let (f, fill) = {
            let mut slot = self.bandwidth.lock().expect("kernel cache lock");
            match &*slot {
                Some(fs) => fs.clone(),
                None => {
                    let f = self.load("bandwidth.cu", BANDWIDTH_SRC, &[], "fp_read_bw")?;
                    let fill = self.load("bandwidth.cu", BANDWIDTH_SRC, &[], "fp_fill")?;
                    *slot = Some((f.clone(), fill.clone()));
                    (f, fill)
                }
            }
        };
        let n16 = (bytes / 16).max(1);
        // SAFETY: every byte is written by fp_fill below before it is read.
        let mut src = unsafe { self.stream.alloc::<u8>(n16 * 16) }
            .map_err(|e| driver_err("allocating the bandwidth buffer", e))?;
        let mut sink = self
            .stream
            .alloc_zeros::<u32>(1)
            .map_err(|e| driver_err("allocating the bandwidth sink", e))?;
        let n = n16 as u64;
        {
            let seed = 0x1234_5678u32;
            let mut b = self.stream.launch_builder(&fill);
            b.arg(&mut src).arg(&n).arg(&seed);
            // SAFETY: the kernel writes n 16-byte vectors, exactly the n16 * 16 bytes of src.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: ((self.info.sms * 8) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| driver_err("launching the fill kernel", e))?;
        }
        let blocks = (self.info.sms * 8) as u32;
        let key = 0x9e37_79b9u32;
        let mut times = Vec::with_capacity(reps);
        for rep in 0..=reps.max(1) {
            let start = self
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_err("creating an event", e))?;
            let end = self
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_err("creating an event", e))?;
            start
                .record(&self.stream)
                .map_err(|e| driver_err("recording an event", e))?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&src).arg(&n).arg(&key).arg(&mut sink);
            // SAFETY: the kernel reads n 16-byte vectors of src (n16 * 16 bytes allocated)
            // and writes at most sink[0].
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| driver_err("launching the bandwidth kernel", e))?;
            end.record(&self.stream)
                .map_err(|e| driver_err("recording an event", e))?;
            end.synchronize()
                .map_err(|e| driver_err("waiting for an event", e))?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| driver_err("reading an event", e))?;
            if rep > 0 {
                times.push(ms as f64 * 1e-3);
            }
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        Ok((n16 * 16) as f64 / t)
    }
}

/// The dtypes a run may pair: q (and o) f32, f16 or bf16 (an FP8 dtype there is a
/// [`Error::DTypeMismatch`] naming `q`), and a K/V cache of q's dtype or an FP8 dtype
/// (anything else is a mismatch naming `k`), as [`crate::backend::check_run_args`] pairs them.
fn check_kv_dtypes(dtype: DType, kv_dtype: DType) -> Result<()> {
    if dtype.is_fp8() {
        return Err(Error::DTypeMismatch {
            tensor: "q",
            expected: "f32, f16 or bf16 (an fp8 dtype is the k/v cache's: prepare_kv, parallelism_kv)",
            actual: dtype.name(),
        });
    }
    if kv_dtype != dtype && !kv_dtype.is_fp8() {
        return Err(Error::DTypeMismatch {
            tensor: "k",
            expected: "q's dtype or an fp8 dtype",
            actual: kv_dtype.name(),
        });
    }
    Ok(())
}
