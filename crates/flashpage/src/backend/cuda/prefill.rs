//! The tensor-core prefill kernel (`kernels/prefill.cu`, entry `fp_prefill`): which plans
//! it runs and its compile-time shape.
//!
//! Routing ([`PrefillVariant::for_plan`]): a **prefill** plan with **f16 or bf16** tensors,
//! **no RoPE**, a head dim that is a multiple of 16 up to [`MAX_HEAD_DIM`], on an
//! architecture with `mma.sync.m16n8k16` for both 16-bit types, `ldmatrix` and `cp.async`
//! (sm_80 and later) runs on `fp_prefill`; everything else (decode plans, f32, RoPE on the
//! fly, sm_75) runs on the attention kernel `fp_decode`, which supports every option. Both
//! read the same plan image and parameter block and write split rows into the same partial
//! states, so the merge kernel is the same.

use crate::layout::{DType, HeadConfig};
use crate::options::PosEncoding;
use crate::plan::{Plan, PlanKind};

use super::launch::dtype_code;

/// Threads per block of the prefill kernel (4 warps of 16 packed rows each).
pub const PREFILL_THREADS: u32 = 128;
/// Packed q rows per pass of one block (16 per warp).
pub const PREFILL_BLOCK_M: usize = 64;
/// Largest head dim the tensor-core kernel takes (its O accumulators live in registers:
/// `head_dim / 2` f32 per thread).
pub const MAX_HEAD_DIM: usize = 128;
/// The first architecture the kernel compiles for (`sm_80`: bf16 `mma.sync`, `cp.async`).
pub const MIN_ARCH: u32 = 80;

/// Compile-time shape of one prefill-kernel variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefillVariant {
    /// Head dimension (a multiple of 16, at most [`MAX_HEAD_DIM`]).
    pub head_dim: usize,
    /// Element type of q and o (f16 or bf16), and of K and V unless `kv_dtype` says
    /// otherwise.
    pub dtype: DType,
    /// Element type of the K/V cache: `dtype`, or an FP8 dtype (its codes are converted
    /// exactly to `dtype` on their way into shared memory).
    pub kv_dtype: DType,
    /// KV tokens per shared-memory tile.
    pub block_n: usize,
    /// Resident blocks per SM the register budget is set for (`__launch_bounds__`' second
    /// argument).
    pub min_blocks: usize,
}

impl PrefillVariant {
    /// The variant for `head_dim` and `dtype`, or `None` where the kernel does not apply
    /// (f32, a head dim that is not a multiple of 16 or above [`MAX_HEAD_DIM`]).
    pub fn with_head_dim(head_dim: usize, dtype: DType) -> Option<Self> {
        if dtype == DType::F32
            || head_dim == 0
            || !head_dim.is_multiple_of(16)
            || head_dim > MAX_HEAD_DIM
        {
            return None;
        }
        Some(PrefillVariant {
            head_dim,
            dtype,
            kv_dtype: dtype,
            block_n: 64,
            min_blocks: 2,
        })
    }

    /// The variant a plan of `kind` over `heads` with `dtype` runs on an architecture of
    /// compute capability `arch` (80 for sm_80, 90 for sm_90a), or `None` when it runs on the
    /// attention kernel (decode plans, RoPE, f32, other head dims, before sm_80).
    pub fn new(
        heads: &HeadConfig,
        kind: PlanKind,
        dtype: DType,
        rope: bool,
        arch: u32,
    ) -> Option<Self> {
        if kind != PlanKind::Prefill || rope || arch < MIN_ARCH {
            return None;
        }
        Self::with_head_dim(heads.head_dim(), dtype)
    }

    /// [`PrefillVariant::new`] for `plan`.
    pub fn for_plan(plan: &Plan, dtype: DType, arch: u32) -> Option<Self> {
        Self::new(
            plan.heads(),
            plan.kind(),
            dtype,
            matches!(plan.options().pos_encoding, PosEncoding::Rope { .. }),
            arch,
        )
    }

    /// The same variant reading a K/V cache of `kv_dtype` (an FP8 dtype, or `dtype` again).
    pub fn with_kv_dtype(self, kv_dtype: DType) -> Self {
        PrefillVariant { kv_dtype, ..self }
    }

    /// [`PrefillVariant::for_plan`] with a K/V cache of `kv_dtype`.
    pub fn for_plan_kv(plan: &Plan, dtype: DType, kv_dtype: DType, arch: u32) -> Option<Self> {
        Self::for_plan(plan, dtype, arch).map(|v| v.with_kv_dtype(kv_dtype))
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        PREFILL_THREADS
    }

    /// NVRTC `-D` options (`FP_KV_DTYPE` only when the cache's dtype is not q's).
    pub fn defines(&self) -> Vec<String> {
        let mut d = vec![
            format!("-DFP_HEAD_DIM={}", self.head_dim),
            format!("-DFP_DTYPE={}", dtype_code(self.dtype)),
            format!("-DFP_BLOCK_N={}", self.block_n),
            format!("-DFP_MIN_BLOCKS={}", self.min_blocks),
            "-DFP_PREFILL=1".to_string(),
        ];
        if self.kv_dtype != self.dtype {
            d.push(format!("-DFP_KV_DTYPE={}", dtype_code(self.kv_dtype)));
        }
        d
    }
}

/// The compute capability of an architecture name (`sm_90a` -> 90), if it is one.
pub fn arch_number(arch: &str) -> Option<u32> {
    arch.strip_prefix("sm_")?
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_follows_kind_dtype_rope_head_dim_and_arch() {
        let llama = HeadConfig::new(32, 8, 128).unwrap();
        let v = PrefillVariant::new(&llama, PlanKind::Prefill, DType::BF16, false, 90).unwrap();
        assert_eq!((v.head_dim, v.block_n, v.threads()), (128, 64, 128));
        assert!(v.defines().contains(&"-DFP_PREFILL=1".to_string()));
        assert!(v.defines().contains(&"-DFP_DTYPE=2".to_string()));
        assert!(PrefillVariant::new(&llama, PlanKind::Prefill, DType::F16, false, 80).is_some());
        // Everything else stays on the attention kernel.
        assert_eq!(
            PrefillVariant::new(&llama, PlanKind::Decode, DType::BF16, false, 90),
            None
        );
        assert_eq!(
            PrefillVariant::new(&llama, PlanKind::Prefill, DType::F32, false, 90),
            None
        );
        assert_eq!(
            PrefillVariant::new(&llama, PlanKind::Prefill, DType::BF16, true, 90),
            None
        );
        assert_eq!(
            PrefillVariant::new(&llama, PlanKind::Prefill, DType::BF16, false, 75),
            None
        );
        let wide = HeadConfig::new(8, 8, 256).unwrap();
        assert_eq!(
            PrefillVariant::new(&wide, PlanKind::Prefill, DType::BF16, false, 90),
            None
        );
        // The helper is total: any head dim the kernel cannot take is None.
        assert_eq!(PrefillVariant::with_head_dim(40, DType::BF16), None);
        assert_eq!(PrefillVariant::with_head_dim(0, DType::F16), None);
        assert!(PrefillVariant::with_head_dim(16, DType::F16).is_some());
        assert_eq!(arch_number("sm_90a"), Some(90));
        assert_eq!(arch_number("sm_80"), Some(80));
        assert_eq!(arch_number("compute_90"), None);
    }
}
