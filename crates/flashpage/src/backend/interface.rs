//! The one interface every backend implements, and its implementations: the CPU backend
//! and, with the `cuda` feature, the CUDA backend. The backends themselves know nothing of
//! the trait (it sits above them), so the import graph stays one-way.

use crate::error::Result;
use crate::layout::{DType, HeadConfig};
use crate::options::AttentionOptions;
use crate::plan::{Plan, PlanKind};

use super::args::RunArgs;
use super::cpu::CpuBackend;

mod sealed {
    /// Only this crate's backends implement [`super::Backend`].
    pub trait Sealed {}
    impl Sealed for crate::backend::cpu::CpuBackend {}
    #[cfg(feature = "cuda")]
    impl Sealed for crate::backend::cuda::CudaBackend {}
}

/// A backend: where plans run.
///
/// The per-step, per-layer flow is the same on every backend:
///
/// ```text
/// once:       backend.prepare(&plan, dtype)        (compile or load kernels)
/// per step:   plan = Plan::new(..); backend.upload_plan(&plan, &mut workspace)
/// per layer:  backend.run(&plan, args, &mut workspace)
/// ```
///
/// Sealed: the set of backends is this crate's.
///
/// ```
/// use flashpage::backend::{Backend, KvCache, RunArgs, cpu::CpuBackend};
/// use flashpage::{BatchBuilder, HeadConfig, KvLayout, KvStrides, Plan, PlanConfig, TensorMut, TensorRef};
/// use flashpage::{AttentionOptions, DType, workspace::HostWorkspace};
///
/// use flashpage::PlanKind;
/// fn slots<B: Backend>(b: &B, heads: &HeadConfig) -> flashpage::Result<usize> {
///     b.parallelism(heads, PlanKind::Decode, DType::F32, &AttentionOptions::new())
/// }
///
/// let cpu = CpuBackend::new(1)?;
/// let heads = HeadConfig::new(2, 1, 16)?;
/// let mut batch = BatchBuilder::new(4)?;
/// batch.push(1, 5, &[1, 0])?;
/// let plan = Plan::new(&batch.decode(heads, 2), &AttentionOptions::new(),
///                      &PlanConfig::with_parallelism(slots(&cpu, &heads)?))?;
/// cpu.prepare(&plan, DType::F32)?;
/// let mut ws = HostWorkspace::new(plan.requirement().float.total())?;
/// Backend::upload_plan(&cpu, &plan, ws.as_bytes_mut())?;
/// let (k, v) = (vec![0.5f32; 2 * 4 * 16], vec![1.0f32; 2 * 4 * 16]);
/// let q = vec![0.1f32; 2 * 16];
/// let mut o = vec![0f32; 2 * 16];
/// let args = RunArgs {
///     q: TensorRef::F32(&q),
///     kv: KvCache::paged(TensorRef::F32(&k), TensorRef::F32(&v),
///                        KvStrides::dense(KvLayout::Nhd, 4, 1, 16), 2, batch.kv_indices()),
///     o: TensorMut::F32(&mut o),
///     lse: None,
///     sinks: None,
///     custom_mask: None,
/// };
/// Backend::run(&cpu, &plan, args, ws.as_bytes_mut())?;
/// assert!(o.iter().all(|&x| (x - 1.0).abs() < 1e-6));
/// # Ok::<(), flashpage::Error>(())
/// ```
pub trait Backend: sealed::Sealed {
    /// The tensors of one run on this backend.
    type Args<'a>;
    /// The caller-owned workspace a plan runs in (the CPU: the float workspace's bytes; the
    /// plan's int image is read in place).
    type Workspace: ?Sized;

    /// The backend's name: `cpu` or `cuda`.
    fn name(&self) -> &'static str;

    /// Work slots to plan for ([`crate::PlanConfig::with_parallelism`]) a plan of `kind` over
    /// `heads` with `dtype` and `options`: threads on the CPU; on CUDA, SMs × the resident
    /// blocks per SM of the kernel variant that plan launches (from the driver's occupancy
    /// calculator, which loads the variant).
    fn parallelism(
        &self,
        heads: &HeadConfig,
        kind: PlanKind,
        dtype: DType,
        options: &AttentionOptions,
    ) -> Result<usize>;

    /// Gets the kernels `plan` launches ready for `dtype` (compiles or loads them on CUDA, so
    /// the first run pays nothing; nothing to do on the CPU).
    fn prepare(&self, plan: &Plan, dtype: DType) -> Result<()>;

    /// Makes `plan` the schedule `workspace` holds (one host-to-device copy of the int image
    /// on CUDA). On the CPU it checks that the workspace fits the plan.
    fn upload_plan(&self, plan: &Plan, workspace: &mut Self::Workspace) -> Result<()>;

    /// Runs `plan` over `args` in `workspace`. Arguments are checked against the plan first;
    /// on error nothing is written.
    fn run(&self, plan: &Plan, args: Self::Args<'_>, workspace: &mut Self::Workspace)
    -> Result<()>;
}

impl Backend for CpuBackend {
    type Args<'a> = RunArgs<'a, 'a>;
    type Workspace = [u8];

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn parallelism(
        &self,
        _heads: &HeadConfig,
        _kind: PlanKind,
        _dtype: DType,
        _options: &AttentionOptions,
    ) -> Result<usize> {
        Ok(self.threads())
    }

    fn prepare(&self, _plan: &Plan, _dtype: DType) -> Result<()> {
        Ok(())
    }

    fn upload_plan(&self, plan: &Plan, workspace: &mut [u8]) -> Result<()> {
        plan.requirement().float.check_fits(workspace.len())
    }

    fn run(&self, plan: &Plan, args: RunArgs<'_, '_>, workspace: &mut [u8]) -> Result<()> {
        CpuBackend::run(self, plan, args, workspace)
    }
}

#[cfg(feature = "cuda")]
pub use self::device::DeviceArgs;

#[cfg(feature = "cuda")]
mod device {
    use super::Backend;
    use crate::backend::cuda::{CudaBackend, DeviceRunArgs, DeviceWorkspace};
    use crate::error::Result;
    use crate::layout::{DType, HeadConfig};
    use crate::options::AttentionOptions;
    use crate::plan::{Plan, PlanKind};

    /// The device tensors of a CUDA run, by storage type: typed `f32`, `f16`, `bf16`
    /// tensors, or 16-bit tensors held as raw bits.
    pub enum DeviceArgs<'a> {
        /// f32 tensors.
        F32(DeviceRunArgs<'a, f32>),
        /// f16 tensors.
        F16(DeviceRunArgs<'a, half::f16>),
        /// bf16 tensors.
        BF16(DeviceRunArgs<'a, half::bf16>),
        /// f16 or bf16 tensors as raw bits (their `dtype` says which).
        Half(DeviceRunArgs<'a, u16>),
        /// f32 q and o over an FP8 K/V cache (u8 codes; `kv_fp8` gives format and scales).
        F32Fp8(DeviceRunArgs<'a, f32, u8>),
        /// f16 q and o over an FP8 K/V cache.
        F16Fp8(DeviceRunArgs<'a, half::f16, u8>),
        /// bf16 q and o over an FP8 K/V cache.
        BF16Fp8(DeviceRunArgs<'a, half::bf16, u8>),
        /// f16 or bf16 q and o as raw bits over an FP8 K/V cache.
        HalfFp8(DeviceRunArgs<'a, u16, u8>),
    }

    impl Backend for CudaBackend {
        type Args<'a> = DeviceArgs<'a>;
        type Workspace = DeviceWorkspace;

        fn name(&self) -> &'static str {
            "cuda"
        }

        fn parallelism(
            &self,
            heads: &HeadConfig,
            kind: PlanKind,
            dtype: DType,
            options: &AttentionOptions,
        ) -> Result<usize> {
            CudaBackend::parallelism(self, heads, kind, dtype, options)
        }

        fn prepare(&self, plan: &Plan, dtype: DType) -> Result<()> {
            CudaBackend::prepare(self, plan, dtype)
        }

        fn upload_plan(&self, plan: &Plan, workspace: &mut DeviceWorkspace) -> Result<()> {
            CudaBackend::upload_plan(self, plan, workspace)
        }

        fn run(
            &self,
            plan: &Plan,
            args: DeviceArgs<'_>,
            workspace: &mut DeviceWorkspace,
        ) -> Result<()> {
            match args {
                DeviceArgs::F32(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::F16(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::BF16(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::Half(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::F32Fp8(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::F16Fp8(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::BF16Fp8(a) => CudaBackend::run(self, plan, a, workspace),
                DeviceArgs::HalfFp8(a) => CudaBackend::run(self, plan, a, workspace),
            }
        }
    }
}
