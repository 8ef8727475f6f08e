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
pub const KERNEL_SOURCES: [(&str, &str); 4] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("decode.cu", include_str!("kernels/decode.cu")),
    ("merge.cu", include_str!("kernels/merge.cu")),
    ("bandwidth.cu", include_str!("kernels/bandwidth.cu")),
];

pub(super) const DECODE_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/decode.cu")
);
pub(super) const MERGE_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/merge.cu")
);
pub(super) const BANDWIDTH_SRC: &str = include_str!("kernels/bandwidth.cu");

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

/// Element storage of device tensors: `f32` for [`DType::F32`], `u16` (the raw bits) for
/// [`DType::F16`] and [`DType::BF16`].
pub trait DeviceElem: DeviceRepr + sealed::Sealed {
    /// Bytes per element.
    const BYTES: usize;
}
impl DeviceElem for f32 {
    const BYTES: usize = 4;
}
impl DeviceElem for u16 {
    const BYTES: usize = 2;
}

/// The device tensors of one run (any mix of `CudaSlice`, `CudaView` and `CudaViewMut`).
///
/// Shapes are those of [`crate::backend::RunArgs`]: q and o `[rows, num_qo_heads, head_dim]`, lse
/// `[rows, num_qo_heads]`, K and V addressed by `strides` (a combined K/V cache is two views
/// of one buffer), except that q, o and lse may hold **more** rows than the batch (graph
/// mode: buffers sized for the capacity); rows past the batch are not touched. Base addresses must be 16-byte aligned and strides multiples of 16 bytes.
pub struct DeviceRunArgs<'a, T: DeviceElem> {
    /// Element type of q, k, v and o (`f16`/`bf16` with `T = u16`, `f32` with `T = f32`).
    pub dtype: DType,
    /// Queries.
    pub q: &'a dyn DevicePtr<T>,
    /// K cache.
    pub k: &'a dyn DevicePtr<T>,
    /// V cache.
    pub v: &'a dyn DevicePtr<T>,
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
}

/// The caller's device workspaces: float (partial states) and int (the plan's schedule).
///
/// Allocate once for the deployment's limits ([`crate::plan::workspace_size`]) and
/// keep it: a captured graph points into it.
pub struct DeviceWorkspace {
    pub(super) float: CudaSlice<u8>,
    pub(super) int: CudaSlice<u8>,
    pub(super) uploaded: Option<Uploaded>,
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
