//! Running a [`CascadePlan`] on the device (docs/cascade.md, "CUDA"): every level through
//! the attention kernel (and the split-KV merge) of an ordinary run, into its own state in
//! the float workspace, then one fold kernel that merges the levels' states into o and lse.
//! Everything is enqueued on the backend's stream with no synchronisation between levels
//! ([`launch::cascade_launches`] is the whole sequence), so a cascade can be captured in a
//! CUDA graph.

use cudarc::driver::{CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::device::{check_elem, driver_err};
use super::launch::{self, CascadeBuffers};
use super::{CudaBackend, DeviceRunArgs, DeviceWorkspace, check_kv_dtypes};
use crate::backend::{ArgShapes, check_run_args};
use crate::error::{Error, Result, shape_str};
use crate::layout::DType;
use crate::plan::cascade::{CascadePlan, check_cascade_run};
use crate::workspace::CUDA_BASE_ALIGN;

impl CudaBackend {
    /// Copies `plan`'s device int image ([`CascadePlan::device_int_image`]: every level's
    /// schedule and page ids) into `ws`'s int workspace in **one** asynchronous copy on the
    /// backend's stream. Must not be called while capturing.
    ///
    /// # Errors
    /// [`Error::WorkspaceTooSmall`] when the int workspace is smaller than
    /// [`CascadePlan::device_requirement`]'s; [`Error::Unsupported`] during capture.
    pub fn upload_cascade(&self, plan: &CascadePlan, ws: &mut DeviceWorkspace) -> Result<()> {
        if self.capture.lock().expect("capture lock").is_some() {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: "upload_cascade during graph capture (upload before capture)".into(),
            });
        }
        // The int layout does not depend on the dtype.
        plan.device_requirement(DType::F32)?
            .int
            .check_fits(ws.int.len())?;
        let image = plan.device_int_image()?;
        ws.uploaded = None;
        ws.cascade = None;
        if !image.is_empty() {
            let bytes: &[u8] = bytemuck::cast_slice(&image);
            let mut dst = ws.int.slice_mut(0..bytes.len());
            self.stream
                .memcpy_htod(bytes, &mut dst)
                .map_err(|e| driver_err("uploading the cascade", e))?;
        }
        ws.cascade = Some(image);
        Ok(())
    }

    /// Compiles and loads the kernels `plan`'s run with `dtype` needs (otherwise done by the
    /// first `run_cascade`; call it before capturing a graph).
    pub fn prepare_cascade(&self, plan: &CascadePlan, dtype: DType) -> Result<()> {
        self.prepare_cascade_kv(plan, dtype, dtype)
    }

    /// [`CudaBackend::prepare_cascade`] for a K/V cache of `kv_dtype` (an FP8 dtype, or q's
    /// `dtype`): the levels' variants reading that cache.
    pub fn prepare_cascade_kv(
        &self,
        plan: &CascadePlan,
        dtype: DType,
        kv_dtype: DType,
    ) -> Result<()> {
        for l in 0..plan.num_levels() {
            if let Some(lp) = plan.level_plan(l) {
                self.prepare_kv(lp, dtype, kv_dtype)?;
            }
        }
        self.fold_fn(plan.heads().head_dim(), dtype).map(drop)
    }

    fn fold_fn(&self, head_dim: usize, dtype: DType) -> Result<CudaFunction> {
        let mut map = self.fold.lock().expect("kernel cache lock");
        if let Some(f) = map.get(&(head_dim, dtype)) {
            return Ok(f.clone());
        }
        let defines = launch::merge_defines(head_dim, dtype);
        let f = self.load(
            "merge.cu",
            super::device::MERGE_SRC,
            &defines,
            "fp_cascade_fold",
        )?;
        map.insert((head_dim, dtype), f.clone());
        Ok(f)
    }

    /// Runs a cascade on device tensors: attention of every query row over its keys at all
    /// levels, as if the levels were one flat batch (the contract of
    /// [`crate::backend::cpu::CpuBackend::run_cascade`]). `ws` must hold the cascade
    /// ([`CudaBackend::upload_cascade`]) and be at least
    /// [`CascadePlan::device_requirement`] for the dtype.
    ///
    /// `args.kv_indices` must be **empty** (e.g. `slice.slice(0..0)`: the plan's page ids
    /// are in the int workspace) and `host_kv_indices` `None` or empty; q, o and lse are
    /// contiguous `[rows, num_qo_heads, head_dim]` / `[rows, num_qo_heads]`; `sinks` apply
    /// once, to the merged state. Asynchronous, and nothing but kernel launches is enqueued
    /// (no copy, no synchronisation), so the call can be captured with
    /// [`CudaBackend::capture`]; a captured cascade replays the launches of the cascade
    /// uploaded when it was captured (the replay checks of [`super::CudaGraph::launch`]
    /// cover single plans, not cascades: capture again after planning a new cascade).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming `custom_mask` for a mask; [`Error::TensorShape`]
    /// naming `kv_indices` / `host_kv_indices` for page ids, `o`, `lse` or `sinks` for a
    /// length that is not the cascade's; [`Error::DTypeMismatch`] for an FP8 q,
    /// [`Error::Unsupported`] for strides or addresses the kernels cannot take; every
    /// error of [`CudaBackend::run`]'s argument checks for each level (K, V and the level's
    /// page ids against `num_pages`); [`Error::PlanMismatch`] when the int workspace does not
    /// hold this cascade; workspace size and alignment errors. On error nothing is launched.
    ///
    /// An FP8 cache (`K = u8`, `args.kv_fp8`: format and scales) is read by every level's
    /// kernel as [`CudaBackend::run`] reads it; merge and fold work in f32 on q's dtype.
    pub fn run_cascade<T: super::DeviceElem, K: super::DeviceElem>(
        &self,
        plan: &CascadePlan,
        args: DeviceRunArgs<'_, T, K>,
        ws: &mut DeviceWorkspace,
    ) -> Result<()> {
        check_cascade_run(args.custom_mask.is_some(), args.kv_indices.len())?;
        if let Some(h) = args.host_kv_indices
            && !h.is_empty()
        {
            return Err(Error::TensorShape {
                tensor: "host_kv_indices",
                expected: "none or [] (a cascade plan holds each level's page ids)".into(),
                actual: shape_str(&[h.len()]),
            });
        }
        let dt = args.dtype;
        // The cache's dtype: q's, or the FP8 format of kv_fp8 (as `run`).
        let kdt = args.kv_fp8.map_or(dt, |f| f.dtype);
        let (k_scale, v_scale) = args.kv_fp8.map_or((None, None), |f| (f.k_scale, f.v_scale));
        check_kv_dtypes(dt, kdt)?;
        check_elem::<T>("q", dt)?;
        check_elem::<K>("k", kdt)?;
        let heads = plan.heads();
        let (hq, d) = (heads.num_qo_heads(), heads.head_dim());
        let rows = plan.num_q_rows();
        let states = rows * hq;
        if args.o.len() != states * d {
            return Err(Error::TensorShape {
                tensor: "o",
                expected: shape_str(&[rows, hq, d]),
                actual: shape_str(&[args.o.len()]),
            });
        }
        if let Some(l) = &args.lse
            && l.len() != states
        {
            return Err(Error::TensorShape {
                tensor: "lse",
                expected: shape_str(&[rows, hq]),
                actual: shape_str(&[l.len()]),
            });
        }
        if let Some(s) = &args.sinks
            && s.len() != hq
        {
            return Err(Error::TensorShape {
                tensor: "sinks",
                expected: shape_str(&[hq]),
                actual: shape_str(&[s.len()]),
            });
        }
        for l in 0..plan.num_levels() {
            let (Some(lp), Some(ids)) = (plan.level_plan(l), plan.level_kv_indices(l)) else {
                continue;
            };
            let shapes = ArgShapes {
                q: (dt, args.q.len()),
                k: (kdt, args.k.len()),
                v: (kdt, args.v.len()),
                o: (dt, states * d),
                lse: Some(states),
                sinks: None,
                custom_mask: None,
                k_scale,
                v_scale,
                strides: args.strides,
                v_strides: args.strides,
                qo: None,
                num_pages: args.num_pages,
                kv_indices: Some(ids),
                num_indices: ids.len(),
                paged: Some(true),
            };
            check_run_args(lp, &shapes)?;
        }
        let req = plan.device_requirement(dt)?;
        req.float.check_fits(ws.float.len())?;
        req.int.check_fits(ws.int.len())?;
        if ws.cascade.as_deref() != Some(&plan.device_int_image()?[..]) {
            return Err(Error::PlanMismatch {
                what: "int workspace",
                expected: "this cascade's int image".into(),
                actual: "another plan's or cascade's (call upload_cascade after planning)".into(),
            });
        }
        let vec = 16 / K::BYTES;
        let s = args.strides;
        if !(s.page.is_multiple_of(vec)
            && s.token.is_multiple_of(vec)
            && s.head.is_multiple_of(vec))
        {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: format!(
                    "kv strides (page {}, token {}, head {}) that are not multiples of {vec} elements (16 bytes)",
                    s.page, s.token, s.head
                ),
            });
        }
        if !d.is_multiple_of(8) {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: format!("head_dim {d} in a cascade (a multiple of 8)"),
            });
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
        // Every kernel is loaded before anything is enqueued.
        let mut attend = Vec::with_capacity(plan.num_levels());
        for l in 0..plan.num_levels() {
            if let Some(lp) = plan.level_plan(l) {
                attend.push(self.attend_fn(lp, dt, kdt)?);
            }
        }
        let merge = self.merge_fn(d, dt)?;
        let fold = self.fold_fn(d, dt)?;

        let stream = &*self.stream;
        let (q, _gq) = args.q.device_ptr(stream);
        let (k, _gk) = args.k.device_ptr(stream);
        let (v, _gv) = args.v.device_ptr(stream);
        let (fw, _gf) = ws.float.device_ptr_mut(stream);
        let (iw, _gw) = ws.int.device_ptr(stream);
        let (o, _go) = args.o.device_ptr_mut(stream);
        let mut lse = 0u64;
        let mut _gl = None;
        if let Some(l) = args.lse {
            let (p, g) = l.device_ptr_mut(stream);
            lse = p;
            _gl = Some(g);
        }
        let mut sinks = 0u64;
        let mut _gs = None;
        if let Some(sk) = args.sinks {
            let (p, g) = sk.device_ptr(stream);
            sinks = p;
            _gs = Some(g);
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
        let launches = launch::cascade_launches_scaled(
            plan,
            dt,
            (k_scale, v_scale),
            &CascadeBuffers {
                q,
                k,
                v,
                o,
                lse,
                sinks,
                int_ws: iw,
                float_ws: fw,
                num_pages: args.num_pages,
                strides: args.strides,
            },
        )?;
        for (lv, (f, threads)) in launches.levels.iter().zip(&attend) {
            if lv.work_items > 0 {
                let mut b = stream.launch_builder(f);
                b.arg(&lv.params);
                // SAFETY: Params matches the kernel's struct; q, K, V were checked against
                // the level plan (check_run_args: extents and page ids), the level's o, lse,
                // partial states, int image and page ids lie inside the workspaces
                // (device_requirement checked to fit), and the kernel bounds-checks every
                // index it reads from the int image.
                unsafe {
                    b.launch(LaunchConfig {
                        grid_dim: (lv.work_items, lv.kv_heads, 1),
                        block_dim: (*threads, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| driver_err("launching a cascade level", e))?;
            }
            if lv.merge {
                let mut b = stream.launch_builder(&merge);
                b.arg(&lv.params);
                // SAFETY: as above; the merge reads the level's partial rows and writes the
                // level's state rows below qo_rows only.
                unsafe {
                    b.launch(LaunchConfig {
                        grid_dim: (lv.merge_rows, 1, 1),
                        block_dim: (launch::MERGE_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| driver_err("launching a cascade level's merge", e))?;
            }
        }
        if launches.fold_rows > 0 {
            let mut b = stream.launch_builder(&fold);
            b.arg(&launches.fold);
            // SAFETY: FoldParams matches the kernel's struct; the kernel reads num_levels
            // states of rows x num_qo_heads in the float workspace (inside device_requirement,
            // checked) and writes rows x num_qo_heads rows of o and lse (their lengths
            // checked above) and reads num_qo_heads sinks (checked).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (launches.fold_rows, 1, 1),
                    block_dim: (launch::FOLD_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| driver_err("launching the cascade fold", e))?;
        }
        Ok(())
    }
}
