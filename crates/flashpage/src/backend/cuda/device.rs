//! What the CUDA backend's pieces share, below all of them: the kernel sources, device
//! element types and run arguments, the caller's workspaces, the signature of a captured run
//! and the driver-error helper. (`mod.rs` runs; `graph.rs` replays; both import this file.)

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::launch::{DecodeVariant, Params};
use crate::error::{Error, Result};
use crate::layout::{DType, KvStrides};
use crate::plan::{Capacities, Plan};
use crate::workspace::CUDA_BASE_ALIGN;

/// The sources of the kernels, by file name (`common.cuh` is prepended to the others at
/// compile time), for offline tools such as the host emulation.
pub const KERNEL_SOURCES: [(&str, &str); 6] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("decode.cu", include_str!("kernels/decode.cu")),
    ("prefill.cu", include_str!("kernels/prefill.cu")),
    ("merge.cu", include_str!("kernels/merge.cu")),
    ("bandwidth.cu", include_str!("kernels/bandwidth.cu")),
    ("ops.cu", include_str!("kernels/ops.cu")),
];

pub(super) const DECODE_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/decode.cu")
);
pub(super) const PREFILL_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/prefill.cu")
);
pub(super) const MERGE_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/merge.cu")
);
pub(super) const BANDWIDTH_SRC: &str = include_str!("kernels/bandwidth.cu");
/// The append and RoPE kernels: self-contained (no common.cuh, no `-D` options).
pub(super) const OPS_SRC: &str = include_str!("kernels/ops.cu");

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for u16 {}
    impl Sealed for u8 {}
}

/// Element storage of device tensors: `f32`, `half::f16` and `half::bf16` for their dtypes
/// (a candle or cudarc `CudaSlice<half::bf16>` is passed as it is), `u16` for f16 or
/// bf16 held as raw bits (the run's `dtype` says which), and `u8` for the codes of an FP8
/// K/V cache (its [`DeviceKvFp8::dtype`] says which format).
pub trait DeviceElem: DeviceRepr + sealed::Sealed {
    /// Bytes per element.
    const BYTES: usize;
    /// The dtypes this storage type can hold.
    const DTYPES: &'static [DType];
    /// How the dtypes are named in an error.
    const NAME: &'static str;
}
impl DeviceElem for f32 {
    const BYTES: usize = 4;
    const DTYPES: &'static [DType] = &[DType::F32];
    const NAME: &'static str = "f32";
}
impl DeviceElem for half::f16 {
    const BYTES: usize = 2;
    const DTYPES: &'static [DType] = &[DType::F16];
    const NAME: &'static str = "f16";
}
impl DeviceElem for half::bf16 {
    const BYTES: usize = 2;
    const DTYPES: &'static [DType] = &[DType::BF16];
    const NAME: &'static str = "bf16";
}
impl DeviceElem for u16 {
    const BYTES: usize = 2;
    const DTYPES: &'static [DType] = &[DType::F16, DType::BF16];
    const NAME: &'static str = "f16 or bf16 (u16 bits)";
}
impl DeviceElem for u8 {
    const BYTES: usize = 1;
    const DTYPES: &'static [DType] = &DType::FP8;
    const NAME: &'static str = "float8_e4m3fn or float8_e5m2 (u8 codes)";
}

/// Checks that storage type `T` holds `dtype` (the error names `tensor`).
pub(super) fn check_elem<T: DeviceElem>(tensor: &'static str, dtype: DType) -> Result<()> {
    if T::DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(Error::DTypeMismatch {
            tensor,
            expected: T::NAME,
            actual: dtype.name(),
        })
    }
}

/// The device tensors of one run (any mix of `CudaSlice`, `CudaView` and `CudaViewMut`).
///
/// Shapes are those of [`crate::backend::RunArgs`]: q and o `[rows, num_qo_heads, head_dim]`, lse
/// `[rows, num_qo_heads]`, K and V addressed by `strides` (a combined K/V cache is two views
/// of one buffer), except that q, o and lse may hold **more** rows than the batch (graph
/// mode: buffers sized for the capacity); rows past the batch are not touched. Base addresses must be 16-byte aligned and strides multiples of 16 bytes.
///
/// `K` is the K/V cache's storage: q's `T` (the default), or `u8` for an FP8 cache, whose
/// format and scales [`DeviceRunArgs::kv_fp8`] gives (docs/semantics.md, "FP8 KV cache").
pub struct DeviceRunArgs<'a, T: DeviceElem, K: DeviceElem = T> {
    /// Element type of q and o (and of k and v without `kv_fp8`): `T`'s (`f32`,
    /// `half::f16`, `half::bf16`), or with `T = u16` (raw bits) `f16` or `bf16`.
    pub dtype: DType,
    /// Queries.
    pub q: &'a dyn DevicePtr<T>,
    /// K cache.
    pub k: &'a dyn DevicePtr<K>,
    /// V cache.
    pub v: &'a dyn DevicePtr<K>,
    /// Element strides (page, token, head) shared by K and V.
    pub strides: KvStrides,
    /// Pages in the cache (ragged K/V: tokens).
    pub num_pages: usize,
    /// Page ids on the device (paged plans; may be empty for ragged K/V).
    pub kv_indices: &'a dyn DevicePtr<i32>,
    /// A host copy of the page ids, if the caller has one: every id the plan reads is then
    /// checked against `num_pages` (device ids are bounds-checked by the kernel instead,
    /// which skips an out-of-range page).
    pub host_kv_indices: Option<&'a [i32]>,
    /// Output.
    pub o: &'a mut dyn DevicePtrMut<T>,
    /// Log-sum-exp output (natural log), if wanted.
    pub lse: Option<&'a mut dyn DevicePtrMut<f32>>,
    /// Attention sinks `[num_qo_heads]` f32 on the device, if the model has them
    /// (docs/semantics.md, "Attention sinks").
    pub sinks: Option<&'a dyn DevicePtr<f32>>,
    /// A custom attention mask on the device, if the run has one (docs/semantics.md,
    /// "Custom masks").
    pub custom_mask: Option<DeviceCustomMask<'a>>,
    /// An FP8 K/V cache (`K = u8`): its format and dequantisation scales; `None` for a
    /// cache of q's dtype.
    pub kv_fp8: Option<DeviceKvFp8<'a>>,
}

/// The format and dequantisation scales of an FP8 K/V cache on the device
/// ([`crate::backend::KvCache::with_scales`]'s meaning: element `x` of KV head `h` is
/// `decode(x) · k_scale[h]`, V likewise). The scales are host values: they travel in the
/// kernels' parameter block (so a captured graph keeps the scales it was captured with).
#[derive(Debug, Clone, Copy)]
pub struct DeviceKvFp8<'a> {
    /// `DType::E4M3Fn` or `DType::E5M2` (K and V alike).
    pub dtype: DType,
    /// K scales: 1 value (per tensor) or `num_kv_heads` (per KV head); `None`: 1.
    pub k_scale: Option<&'a [f32]>,
    /// V scales, as `k_scale`.
    pub v_scale: Option<&'a [f32]>,
}

/// A custom attention mask on the device, in FlashInfer's packed layout
/// ([`crate::layout::CustomMask`]): the bits and `mask_indptr` on the device, and a host copy
/// of `mask_indptr` (FlashInfer's wrappers build it on the host at plan time), which is
/// checked against the plan before launch. The device `mask_indptr` must hold the same
/// values; a bit it would place outside the bits buffer reads as masked (the kernels never
/// read out of bounds).
#[derive(Clone, Copy)]
pub struct DeviceCustomMask<'a> {
    /// The packed bits (u8).
    pub bits: &'a dyn DevicePtr<u8>,
    /// `mask_indptr` (B + 1 i32 byte offsets) on the device.
    pub indptr: &'a dyn DevicePtr<i32>,
    /// The same `mask_indptr` on the host.
    pub host_indptr: &'a [i32],
}

impl std::fmt::Debug for DeviceCustomMask<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCustomMask")
            .field("bits", &self.bits.len())
            .field("host_indptr", &self.host_indptr)
            .finish()
    }
}

/// The caller's device workspaces: float (partial states) and int (the plan's schedule).
///
/// Allocate once for the deployment's limits ([`crate::plan::workspace_size`]) and
/// keep it: a captured graph points into it.
pub struct DeviceWorkspace {
    pub(super) float: CudaSlice<u8>,
    pub(super) int: CudaSlice<u8>,
    pub(super) uploaded: Option<Uploaded>,
    /// The cascade int image uploaded last ([`crate::plan::cascade::CascadePlan::device_int_image`]),
    /// if the int workspace holds one (uploading a plan clears it, and the reverse).
    pub(super) cascade: Option<Vec<i32>>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Uploaded {
    pub(super) image: Vec<i32>,
    pub(super) caps: Capacities,
    pub(super) offsets: [usize; 3],
}

impl std::fmt::Debug for DeviceWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWorkspace")
            .field("float_bytes", &self.float.len())
            .field("int_bytes", &self.int.len())
            .field("has_plan", &self.uploaded.is_some())
            .finish()
    }
}

impl DeviceWorkspace {
    /// Wraps caller-allocated device buffers (base addresses aligned to 256 bytes).
    pub fn from_slices(
        float: CudaSlice<u8>,
        int: CudaSlice<u8>,
        stream: &Arc<CudaStream>,
    ) -> Result<Self> {
        for (name, s) in [("float", &float), ("int", &int)] {
            let (addr, _g) = s.device_ptr(stream);
            if !addr.is_multiple_of(CUDA_BASE_ALIGN as u64) {
                return Err(Error::WorkspaceMisaligned {
                    workspace: name,
                    address: addr as usize,
                    align: CUDA_BASE_ALIGN,
                });
            }
        }
        Ok(DeviceWorkspace {
            float,
            int,
            uploaded: None,
            cascade: None,
        })
    }

    /// Bytes of the float workspace.
    pub fn float_bytes(&self) -> usize {
        self.float.len()
    }

    /// Bytes of the int workspace.
    pub fn int_bytes(&self) -> usize {
        self.int.len()
    }

    /// The buffers back.
    pub fn into_slices(self) -> (CudaSlice<u8>, CudaSlice<u8>) {
        (self.float, self.int)
    }

    pub(super) fn holds(&self, plan: &Plan) -> bool {
        self.uploaded.as_ref().is_some_and(|u| {
            u.caps == *plan.capacities()
                && u.offsets == plan.int_offsets()
                && u.image == plan.int_image()
        })
    }
}

/// Everything a captured run depends on besides the int image: a replay is valid only for
/// plans with the same signature.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunSignature {
    pub(super) params: Params,
    pub(super) variant: DecodeVariant,
    /// Decode or prefill: with the dtype, head dim and options above, what selects the
    /// tensor-core prefill kernel (`super::prefill`).
    pub(super) kind: crate::plan::PlanKind,
    pub(super) int_ws: u64,
    pub(super) float_req: crate::workspace::WorkspaceReq,
    pub(super) launch_merge: bool,
}

pub(super) fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "cuda",
        message: format!("{what}: {e:?}"),
    }
}
