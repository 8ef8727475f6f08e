//! Every backend seen through host tensors: the suite and the case helpers run on a
//! [`HostRunner`], so one TOML suite runs on the CPU at every SIMD level and on CUDA (upload,
//! run, download) through the library's [`Backend`] trait.

use flashpage::Plan;
use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::backend::{Backend, RunArgs};
use flashpage::error::Result;
use flashpage::plan::cascade::CascadePlan;
use flashpage::workspace::HostWorkspace;

/// A backend driven with host tensors.
pub trait HostRunner {
    /// What ran: `cpu/avx2`, `cuda/<device name>`.
    fn label(&self) -> String;
    /// The CPU SIMD level, for CPU runners.
    fn simd(&self) -> Option<SimdLevel>;
    /// Runs `plan` over host `args`: uploads what the backend needs, runs, and writes `o`
    /// (and `lse`) back into `args`. Errors are the backend's (the checks run first; on error
    /// nothing is written).
    fn run_host(&self, plan: &Plan, args: RunArgs<'_, '_>) -> Result<()>;
    /// Runs cascade `plan` over host `args` (no page ids: the plan holds each level's, see
    /// [`CascadePlan`]) and writes `o` (and `lse`) back, as [`HostRunner::run_host`].
    fn run_cascade_host(&self, plan: &CascadePlan, args: RunArgs<'_, '_>) -> Result<()>;
}

impl HostRunner for CpuBackend {
    fn label(&self) -> String {
        format!("cpu/{}", CpuBackend::simd(self).name())
    }

    fn simd(&self) -> Option<SimdLevel> {
        Some(CpuBackend::simd(self))
    }

    fn run_host(&self, plan: &Plan, args: RunArgs<'_, '_>) -> Result<()> {
        let mut ws = HostWorkspace::new(plan.requirement().float.total())?;
        self.prepare(plan, args.q.dtype())?;
        Backend::upload_plan(self, plan, ws.as_bytes_mut())?;
        Backend::run(self, plan, args, ws.as_bytes_mut())
    }

    fn run_cascade_host(&self, plan: &CascadePlan, args: RunArgs<'_, '_>) -> Result<()> {
        let mut ws = HostWorkspace::new(plan.float_requirement(args.o.dtype())?.total())?;
        self.run_cascade(plan, args, ws.as_bytes_mut())
    }
}

#[cfg(feature = "cuda")]
pub use cuda::CudaHost;

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::CudaSlice;
    use flashpage::backend::cuda::{
        CudaBackend, DeviceCustomMask, DeviceElem, DeviceKvFp8, DeviceRunArgs, DeviceWorkspace,
    };
    use flashpage::backend::{Backend, DeviceArgs, RunArgs, check_run_args};
    use flashpage::error::{Error, Result};
    use flashpage::half::{bf16, f16};
    use flashpage::tensor::{TensorMut, TensorRef};
    use flashpage::{DType, KvStrides, Plan};

    use super::HostRunner;
    use flashpage::backend::cpu::SimdLevel;
    use flashpage::plan::cascade::CascadePlan;

    /// The CUDA backend driven with host tensors: every call uploads q, K, V and the page
    /// ids, runs through [`Backend`], synchronises and downloads o and the LSE. For tests and
    /// `flashpage check --backend cuda`, not for speed.
    pub struct CudaHost {
        backend: CudaBackend,
    }

    impl CudaHost {
        /// Opens device `ordinal` (a typed `BackendUnavailable` where there is no GPU).
        pub fn new(ordinal: usize) -> Result<CudaHost> {
            Ok(CudaHost {
                backend: CudaBackend::new(ordinal)?,
            })
        }
        /// The backend.
        pub fn backend(&self) -> &CudaBackend {
            &self.backend
        }
    }

    fn dev(e: impl std::fmt::Debug) -> Error {
        Error::Backend {
            backend: "cuda",
            message: format!("{e:?}"),
        }
    }

    /// A device buffer never has zero elements (an empty V of a ragged batch, no page ids).
    fn nonempty<T: Clone + Default>(mut v: Vec<T>) -> Vec<T> {
        if v.is_empty() {
            v.push(T::default());
        }
        v
    }

    /// A device storage type and the [`DeviceArgs`] variant that carries it.
    trait Storage: DeviceElem + Default + Clone + Unpin {
        fn wrap(args: DeviceRunArgs<'_, Self>) -> DeviceArgs<'_>;
        /// The variant with an FP8 K/V cache (u8 codes).
        fn wrap_fp8(args: DeviceRunArgs<'_, Self, u8>) -> DeviceArgs<'_>;
    }

    impl Storage for f16 {
        fn wrap(args: DeviceRunArgs<'_, f16>) -> DeviceArgs<'_> {
            DeviceArgs::F16(args)
        }
        fn wrap_fp8(args: DeviceRunArgs<'_, f16, u8>) -> DeviceArgs<'_> {
            DeviceArgs::F16Fp8(args)
        }
    }

    impl Storage for bf16 {
        fn wrap(args: DeviceRunArgs<'_, bf16>) -> DeviceArgs<'_> {
            DeviceArgs::BF16(args)
        }
        fn wrap_fp8(args: DeviceRunArgs<'_, bf16, u8>) -> DeviceArgs<'_> {
            DeviceArgs::BF16Fp8(args)
        }
    }

    impl Storage for f32 {
        fn wrap(args: DeviceRunArgs<'_, f32>) -> DeviceArgs<'_> {
            DeviceArgs::F32(args)
        }
        fn wrap_fp8(args: DeviceRunArgs<'_, f32, u8>) -> DeviceArgs<'_> {
            DeviceArgs::F32Fp8(args)
        }
    }

    /// One device run of host data already converted to the device's storage type `T`.
    struct DevRun<'a> {
        backend: &'a CudaBackend,
        plan: &'a Plan,
        ws: &'a mut DeviceWorkspace,
        dtype: DType,
        strides: KvStrides,
        num_pages: usize,
        kv_indices: &'a CudaSlice<i32>,
        host_kv_indices: Option<&'a [i32]>,
        lse: Option<&'a mut CudaSlice<f32>>,
        sinks: Option<&'a CudaSlice<f32>>,
        /// The custom mask's bits and mask_indptr on the device, and its host mask_indptr.
        mask: Option<(&'a CudaSlice<u8>, &'a CudaSlice<i32>, &'a [i32])>,
        /// An FP8 cache's format and scales.
        kv_fp8: Option<DeviceKvFp8<'a>>,
    }

    impl DevRun<'_> {
        /// Uploads q, K, V and o's initial contents, runs (`wrap`: the [`DeviceArgs`]
        /// variant of `T` and `K`), and returns o.
        fn run<T: Storage, K: DeviceElem + Default + Clone + Unpin>(
            &mut self,
            q: Vec<T>,
            k: Vec<K>,
            v: Vec<K>,
            o_init: Vec<T>,
            wrap: fn(DeviceRunArgs<'_, T, K>) -> DeviceArgs<'_>,
        ) -> Result<Vec<T>> {
            let s = self.backend.stream();
            let q = s.clone_htod(&q).map_err(dev)?;
            let k = s.clone_htod(&nonempty(k)).map_err(dev)?;
            let v = s.clone_htod(&nonempty(v)).map_err(dev)?;
            let mut o = s.clone_htod(&nonempty(o_init)).map_err(dev)?;
            let run = DeviceRunArgs {
                dtype: self.dtype,
                q: &q,
                k: &k,
                v: &v,
                strides: self.strides,
                num_pages: self.num_pages,
                kv_indices: self.kv_indices,
                host_kv_indices: self.host_kv_indices,
                o: &mut o,
                lse: self.lse.as_mut().map(|l| &mut **l as _),
                sinks: self.sinks.map(|s| s as _),
                custom_mask: self.mask.map(|(bits, indptr, host)| DeviceCustomMask {
                    bits,
                    indptr,
                    host_indptr: host,
                }),
                kv_fp8: self.kv_fp8,
            };
            Backend::run(self.backend, self.plan, wrap(run), self.ws)?;
            self.backend.synchronize()?;
            s.clone_dtoh(&o).map_err(dev)
        }
    }

    /// Uploads q, K, V (q's type, or FP8 codes with `kv_fp8`), o's initial contents, the LSE
    /// and the sinks, runs cascade `plan`, synchronises, writes o back and returns the LSE.
    #[allow(clippy::too_many_arguments)]
    fn cascade_on<
        T: DeviceElem + Default + Copy + Unpin,
        K: DeviceElem + Default + Copy + Unpin,
    >(
        b: &CudaBackend,
        plan: &CascadePlan,
        ws: &mut DeviceWorkspace,
        dtype: DType,
        (strides, num_pages): (KvStrides, usize),
        (q, k, v, o_host): (&[T], &[K], &[K], &mut [T]),
        lse: Option<&[f32]>,
        sinks: Option<&[f32]>,
        kv_fp8: Option<DeviceKvFp8<'_>>,
    ) -> Result<Option<Vec<f32>>> {
        let s = b.stream();
        let q = s.clone_htod(q).map_err(dev)?;
        let k = s.clone_htod(&nonempty(k.to_vec())).map_err(dev)?;
        let v = s.clone_htod(&nonempty(v.to_vec())).map_err(dev)?;
        let mut o = s.clone_htod(&nonempty(o_host.to_vec())).map_err(dev)?;
        let ids = s.clone_htod(&[0i32]).map_err(dev)?;
        let mut lse_dev = match lse {
            Some(l) => Some(s.clone_htod(&nonempty(l.to_vec())).map_err(dev)?),
            None => None,
        };
        let sinks_dev = match sinks {
            Some(sk) => Some(s.clone_htod(&nonempty(sk.to_vec())).map_err(dev)?),
            None => None,
        };
        let empty = ids.slice(0..0);
        let run = DeviceRunArgs {
            dtype,
            q: &q,
            k: &k,
            v: &v,
            strides,
            num_pages,
            kv_indices: &empty,
            host_kv_indices: None,
            o: &mut o,
            lse: lse_dev.as_mut().map(|l| l as _),
            sinks: sinks_dev.as_ref().map(|s| s as _),
            custom_mask: None,
            kv_fp8,
        };
        b.run_cascade(plan, run, ws)?;
        b.synchronize()?;
        let out = s.clone_dtoh(&o).map_err(dev)?;
        let n = o_host.len();
        o_host.copy_from_slice(&out[..n]);
        match &lse_dev {
            Some(l) => Ok(Some(s.clone_dtoh(l).map_err(dev)?)),
            None => Ok(None),
        }
    }

    impl HostRunner for CudaHost {
        fn run_cascade_host(&self, plan: &CascadePlan, args: RunArgs<'_, '_>) -> Result<()> {
            let b = &self.backend;
            let dtype = args.q.dtype();
            // The backend's refusals, before anything is uploaded.
            flashpage::plan::cascade::check_cascade_run(
                args.custom_mask.is_some(),
                args.kv.kv_indices.len(),
            )?;
            let kt = args.kv.k.dtype();
            b.prepare_cascade_kv(plan, dtype, kt)?;
            let mut ws = DeviceWorkspace::new(b, &plan.device_requirement(dtype)?)?;
            b.upload_cascade(plan, &mut ws)?;
            let kv = (args.kv.strides, args.kv.num_pages);
            let lse_in = args.lse.as_deref().map(<[f32]>::to_vec);
            let (lse_in, sinks) = (lse_in.as_deref(), args.sinks);
            let fp8 = kt.is_fp8().then_some(DeviceKvFp8 {
                dtype: kt,
                k_scale: args.kv.k_scale,
                v_scale: args.kv.v_scale,
            });
            // One arm per (q dtype, cache dtype) pair: typed device buffers, no bit casts.
            macro_rules! go {
                ($q:expr, $k:expr, $v:expr, $o:expr, $fp8:expr) => {
                    cascade_on(
                        b,
                        plan,
                        &mut ws,
                        dtype,
                        kv,
                        ($q, $k, $v, $o),
                        lse_in,
                        sinks,
                        $fp8,
                    )?
                };
            }
            let lse_out = match (args.q, args.kv.k, args.kv.v, args.o) {
                (TensorRef::F16(q), TensorRef::F16(k), TensorRef::F16(v), TensorMut::F16(o)) => {
                    go!(q, k, v, o, None)
                }
                (
                    TensorRef::BF16(q),
                    TensorRef::BF16(k),
                    TensorRef::BF16(v),
                    TensorMut::BF16(o),
                ) => go!(q, k, v, o, None),
                (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v), TensorMut::F32(o)) => {
                    go!(q, k, v, o, None)
                }
                // An FP8 cache: its codes uploaded as they are.
                (
                    TensorRef::F16(q),
                    TensorRef::Fp8(_, k),
                    TensorRef::Fp8(_, v),
                    TensorMut::F16(o),
                ) => {
                    go!(q, k, v, o, fp8)
                }
                (
                    TensorRef::BF16(q),
                    TensorRef::Fp8(_, k),
                    TensorRef::Fp8(_, v),
                    TensorMut::BF16(o),
                ) => {
                    go!(q, k, v, o, fp8)
                }
                (
                    TensorRef::F32(q),
                    TensorRef::Fp8(_, k),
                    TensorRef::Fp8(_, v),
                    TensorMut::F32(o),
                ) => {
                    go!(q, k, v, o, fp8)
                }
                (_, k, _, _) => {
                    return Err(Error::DTypeMismatch {
                        tensor: "k",
                        expected: dtype.name(),
                        actual: k.dtype().name(),
                    });
                }
            };
            if let (Some(dst), Some(src)) = (args.lse, lse_out) {
                let n = dst.len();
                dst.copy_from_slice(&src[..n]);
            }
            Ok(())
        }

        fn label(&self) -> String {
            format!("cuda/{}", self.backend.device_name())
        }

        fn simd(&self) -> Option<SimdLevel> {
            None
        }

        fn run_host(&self, plan: &Plan, args: RunArgs<'_, '_>) -> Result<()> {
            // The host tensors' own checks first (dtypes, shapes, page ids), so nothing is
            // uploaded for a run that cannot happen.
            check_run_args(plan, &args.shapes())?;
            let b = &self.backend;
            let s = b.stream();
            let dtype = args.q.dtype();
            let kt = args.kv.k.dtype();
            b.prepare_kv(plan, dtype, kt)?;
            let kv_fp8 = kt.is_fp8().then_some(DeviceKvFp8 {
                dtype: kt,
                k_scale: args.kv.k_scale,
                v_scale: args.kv.v_scale,
            });
            let mut ws = DeviceWorkspace::new(b, plan.requirement())?;
            Backend::upload_plan(b, plan, &mut ws)?;
            let ids = nonempty(args.kv.kv_indices.to_vec());
            let kvi = s.clone_htod(&ids).map_err(dev)?;
            let host_ids = (!args.kv.kv_indices.is_empty()).then_some(&ids[..]);
            let lse_host: Option<Vec<f32>> = args.lse.as_ref().map(|l| l.to_vec());
            let mut lse_dev: Option<CudaSlice<f32>> = match &lse_host {
                Some(l) => Some(s.clone_htod(&nonempty(l.clone())).map_err(dev)?),
                None => None,
            };
            let sinks_dev = match args.sinks {
                Some(sk) => Some(s.clone_htod(&nonempty(sk.to_vec())).map_err(dev)?),
                None => None,
            };
            let mask_dev = match args.custom_mask {
                Some(m) => Some((
                    s.clone_htod(&nonempty(m.bits.to_vec())).map_err(dev)?,
                    s.clone_htod(&nonempty(m.indptr.to_vec())).map_err(dev)?,
                )),
                None => None,
            };
            let (strides, num_pages) = (args.kv.strides, args.kv.num_pages);
            let mut dev_run = DevRun {
                backend: b,
                plan,
                ws: &mut ws,
                dtype,
                strides,
                num_pages,
                kv_indices: &kvi,
                host_kv_indices: host_ids,
                lse: lse_dev.as_mut(),
                sinks: sinks_dev.as_ref(),
                mask: match (&mask_dev, args.custom_mask) {
                    (Some((b, i)), Some(m)) => Some((b, i, m.indptr)),
                    _ => None,
                },
                kv_fp8,
            };
            // o starts as the caller's buffer (poisoned in tests), so an element the kernel
            // does not write comes back as it was. Typed device buffers: no bit casts.
            match (args.q, args.kv.k, args.kv.v, args.o) {
                (TensorRef::F16(q), TensorRef::F16(k), TensorRef::F16(v), TensorMut::F16(o)) => {
                    let out =
                        dev_run.run(q.to_vec(), k.to_vec(), v.to_vec(), o.to_vec(), f16::wrap)?;
                    let n = o.len();
                    o.copy_from_slice(&out[..n]);
                }
                (
                    TensorRef::BF16(q),
                    TensorRef::BF16(k),
                    TensorRef::BF16(v),
                    TensorMut::BF16(o),
                ) => {
                    let out =
                        dev_run.run(q.to_vec(), k.to_vec(), v.to_vec(), o.to_vec(), bf16::wrap)?;
                    let n = o.len();
                    o.copy_from_slice(&out[..n]);
                }
                (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v), TensorMut::F32(o)) => {
                    let out =
                        dev_run.run(q.to_vec(), k.to_vec(), v.to_vec(), o.to_vec(), f32::wrap)?;
                    let n = o.len();
                    o.copy_from_slice(&out[..n]);
                }
                // An FP8 cache: its codes uploaded as they are.
                (
                    TensorRef::F16(q),
                    TensorRef::Fp8(_, k),
                    TensorRef::Fp8(_, v),
                    TensorMut::F16(o),
                ) => {
                    let out = dev_run.run(
                        q.to_vec(),
                        k.to_vec(),
                        v.to_vec(),
                        o.to_vec(),
                        f16::wrap_fp8,
                    )?;
                    let n = o.len();
                    o.copy_from_slice(&out[..n]);
                }
                (
                    TensorRef::BF16(q),
                    TensorRef::Fp8(_, k),
                    TensorRef::Fp8(_, v),
                    TensorMut::BF16(o),
                ) => {
                    let out = dev_run.run(
                        q.to_vec(),
                        k.to_vec(),
                        v.to_vec(),
                        o.to_vec(),
                        bf16::wrap_fp8,
                    )?;
                    let n = o.len();
                    o.copy_from_slice(&out[..n]);
                }
                (
                    TensorRef::F32(q),
                    TensorRef::Fp8(_, k),
                    TensorRef::Fp8(_, v),
                    TensorMut::F32(o),
                ) => {
                    let out = dev_run.run(
                        q.to_vec(),
                        k.to_vec(),
                        v.to_vec(),
                        o.to_vec(),
                        f32::wrap_fp8,
                    )?;
                    let n = o.len();
                    o.copy_from_slice(&out[..n]);
                }
                (_, k, _, _) => {
                    return Err(Error::DTypeMismatch {
                        tensor: "k",
                        expected: dtype.name(),
                        actual: k.dtype().name(),
                    });
                }
            }
            if let (Some(dst), Some(src)) = (args.lse, lse_dev) {
                let got = s.clone_dtoh(&src).map_err(dev)?;
                let n = dst.len();
                dst.copy_from_slice(&got[..n]);
            }
            Ok(())
        }
    }
}
