//! Kernel parameters and launch shapes: what the CUDA backend launches, described on the
//! host. Public so offline tools work from the very description the backend launches: the
//! kernel report (`flashpage kernels`) compiles [`DecodeVariant`]s, and the host emulation
//! runs the kernels' sources on [`params`]' bytes.
//!
//! [`Params`] is passed by value to both kernels and mirrors `struct Params` in
//! `kernels/common.cuh` field for field (`#[repr(C)]`, 8-byte fields first). In graph mode it
//! is baked into the captured graph, so it holds only what a replan cannot change: buffer
//! addresses and sizes, strides, heads, options and the plan's capacities and offsets.

use cudarc::driver::DeviceRepr;

use crate::error::{Error, Result};
use crate::layout::{DType, HeadConfig, KvStrides, QoStrides, RunStrides};
use crate::options::PosEncoding;
use crate::plan::cascade::CascadePlan;
use crate::plan::{Plan, PlanKind};

/// Threads per block of the decode kernel.
pub const DECODE_THREADS: u32 = 128;
/// Threads per block of the merge kernel.
pub const MERGE_THREADS: u32 = 128;

/// Kernel parameters (see `kernels/common.cuh`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub(crate) q: u64,
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) o: u64,
    pub(crate) lse: u64,
    pub(crate) kv_indices: u64,
    pub(crate) int_ws: u64,
    pub(crate) partial_o: u64,
    pub(crate) partial_lse: u64,
    pub(crate) stride_page: i64,
    pub(crate) stride_token: i64,
    pub(crate) stride_head: i64,
    pub(crate) v_stride_page: i64,
    pub(crate) v_stride_token: i64,
    pub(crate) v_stride_head: i64,
    pub(crate) q_row: i64,
    pub(crate) q_head: i64,
    pub(crate) o_row: i64,
    pub(crate) o_head: i64,
    pub(crate) qo_rows: i64,
    pub(crate) num_indices: i64,
    pub(crate) partial_cap: i64,
    pub(crate) num_pages: i32,
    pub(crate) page_size: i32,
    pub(crate) ps_magic: u32,
    pub(crate) ps_shift: i32,
    pub(crate) num_qo_heads: i32,
    pub(crate) group: i32,
    pub(crate) req_cap: i32,
    pub(crate) work_cap: i32,
    pub(crate) merge_cap: i32,
    pub(crate) req_off: i32,
    pub(crate) work_off: i32,
    pub(crate) merge_off: i32,
    pub(crate) paged: i32,
    pub(crate) causal: i32,
    pub(crate) window_left: i32,
    pub(crate) alibi: i32,
    pub(crate) has_soft_cap: i32,
    pub(crate) soft_cap: f32,
    pub(crate) sm_scale: f32,
    pub(crate) rope_theta: f32,
    pub(crate) rope_scale: f32,
    pub(crate) pad_: i32,
    pub(crate) sinks: u64,
    pub(crate) mask: u64,
    pub(crate) mask_indptr: u64,
    pub(crate) mask_bytes: i64,
    pub(crate) k_scale: [f32; FP_SCALE_SLOTS],
    pub(crate) v_scale: [f32; FP_SCALE_SLOTS],
}

/// Slots of the per-KV-head FP8 scales in [`Params`] (`FP_SCALE_SLOTS` in `common.cuh`): a
/// per-KV-head scale is taken for up to this many KV heads (more is
/// [`Error::Unsupported`] naming the scale); a per-tensor scale for any number.
pub const FP_SCALE_SLOTS: usize = 128;

impl Params {
    /// The parameter block's bytes, exactly as the kernels receive it.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// Sets the FP8 cache's dequantisation scales (`KvCache::k_scale` / `v_scale`: 1 value
    /// per tensor or one per KV head, already checked by
    /// [`crate::backend::check_run_args`]); `None` is 1, a per-tensor scale fills every
    /// slot, more than [`FP_SCALE_SLOTS`] per-KV-head values is [`Error::Unsupported`]
    /// naming the scale.
    pub fn set_kv_scales(
        &mut self,
        k_scale: Option<&[f32]>,
        v_scale: Option<&[f32]>,
    ) -> Result<()> {
        self.k_scale = scale_slots("k_scale", k_scale)?;
        self.v_scale = scale_slots("v_scale", v_scale)?;
        Ok(())
    }
}

/// One side's FP8 scales as the kernels read them (attention and append): one slot per KV
/// head, a per-tensor scale repeated in every slot, 1 without scales. More than
/// [`FP_SCALE_SLOTS`] per-KV-head values is an [`Error::Unsupported`] naming the scale.
pub(crate) fn scale_slots(
    name: &'static str,
    scale: Option<&[f32]>,
) -> Result<[f32; FP_SCALE_SLOTS]> {
    let mut slots = [1.0f32; FP_SCALE_SLOTS];
    match scale {
        None => {}
        Some([x]) => slots.fill(*x),
        Some(xs) if xs.len() <= FP_SCALE_SLOTS => slots[..xs.len()].copy_from_slice(xs),
        Some(xs) => {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: format!(
                    "{name} with {} per-kv-head values (the kernels take at most {FP_SCALE_SLOTS}; a per-tensor scale works for any head count)",
                    xs.len()
                ),
            });
        }
    }
    Ok(slots)
}

// SAFETY: Params is #[repr(C)] plain old data (integers and floats) laid out exactly as the
// kernels' `struct Params`; it is passed by value as a kernel argument.
unsafe impl DeviceRepr for Params {}

/// Magic numbers for dividing by `d` (1..=2^31) with a multiply: for every `n < 2^31`,
/// `n / d == (umulhi(n, magic) + n) >> shift`.
pub(crate) fn div_magic(d: u32) -> (u32, u32) {
    debug_assert!(d >= 1);
    let mut shift = 0u32;
    while shift < 32 && (1u64 << shift) < d as u64 {
        shift += 1;
    }
    let magic = ((1u64 << 32) * ((1u64 << shift) - d as u64)) / d as u64 + 1;
    (magic as u32, shift)
}

/// The division the kernels perform, on the host (for tests).
#[cfg(test)]
pub(crate) fn div_with(n: u32, magic: u32, shift: u32) -> u32 {
    let hi = ((n as u64 * magic as u64) >> 32) as u32;
    (hi + n) >> shift
}

/// Compile-time shape of one decode-kernel variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeVariant {
    /// Head dimension.
    pub head_dim: usize,
    /// Element type of q and o (and of K and V unless `kv_dtype` says otherwise).
    pub dtype: DType,
    /// Element type of the K/V cache: `dtype`, or an FP8 dtype (`E4M3Fn`, `E5M2`).
    pub kv_dtype: DType,
    /// Packed rows per pass over the KV chunk.
    pub rows: usize,
    /// Tokens per thread per pipeline stage.
    pub unroll: usize,
    /// Threads per token (a power of two covering head_dim / 8 lanes).
    pub tpr: usize,
    /// RoPE applied on the fly.
    pub rope: bool,
    /// Resident blocks per SM the register budget is set for (`__launch_bounds__`' second
    /// argument): the occupancy the variant reaches without spills.
    pub min_blocks: usize,
}

impl DecodeVariant {
    /// The variant for a plan: a pass covers the whole GQA group up to 8 rows.
    pub fn for_plan(plan: &Plan, dtype: DType) -> Self {
        Self::new(
            plan.heads(),
            plan.kind(),
            dtype,
            matches!(plan.options().pos_encoding, PosEncoding::Rope { .. }),
        )
    }

    /// The variant a plan of `kind` over `heads` with `dtype` launches (what
    /// [`DecodeVariant::for_plan`] returns, known before planning: the occupancy that sets
    /// the plan's parallelism depends on it).
    pub fn new(heads: &HeadConfig, kind: PlanKind, dtype: DType, rope: bool) -> Self {
        let rows = match kind {
            PlanKind::Decode => heads.group_size().next_power_of_two().min(8),
            PlanKind::Prefill => 8,
        };
        Self::with_rows(heads.head_dim(), dtype, rows, rope)
    }

    /// The variant for `rows` packed rows per pass (1, 2, 4 or 8).
    ///
    /// Unroll and register budget per variant, chosen from ptxas's report (sm_90a and sm_80,
    /// NVRTC 13) so that none spills and none has a stack frame (checked by
    /// `tests/nvrtc_compile.rs`). Tokens in flight per thread: 16-bit dtypes 4 up to 2 rows,
    /// 2 from 4 rows or with RoPE (its 8 sin/cos per token per thread); f32 (twice the
    /// registers per token) 2 at 2 and 4 rows, else 1. Budget: 4 blocks of 128 threads per
    /// SM (128 registers) at 1 row without RoPE, 2 (255 registers) at 8 rows, 3 (168
    /// registers) otherwise. Other head dims: one block less (at least 2), 1 token in flight
    /// with RoPE at 8 rows.
    pub fn with_rows(head_dim: usize, dtype: DType, rows: usize, rope: bool) -> Self {
        // Head dims other than 64, 128 and 256 (16 or 80: threads per token padded to a power
        // of two, or 64 token groups) need more registers: one block less, and one token in
        // flight with RoPE at 8 rows.
        let common = matches!(head_dim, 64 | 128 | 256);
        // With RoPE, 16-bit K/V at 2 rows keeps one token in flight and f32 at 4 rows runs at
        // 2 blocks: at the planned 3 blocks, K's and V's strides of their own left those
        // variants a stack frame (ptxas, tests/nvrtc_compile.rs).
        let unroll = match (dtype, rows, rope) {
            (DType::F32, 2 | 4, false) => 2,
            (DType::F32, _, _) => 1,
            (_, 8, true) if !common => 1,
            (_, 2, true) => 1,
            (_, 1 | 2, false) => 4,
            _ => 2,
        };
        let min_blocks = match (dtype, rows, rope) {
            (_, r, _) if r >= 8 => 2,
            (DType::F32, 4, true) => 2,
            (_, 1, false) => 4,
            _ => 3,
        };
        let min_blocks = if common {
            min_blocks
        } else {
            (min_blocks - 1).max(2)
        };
        DecodeVariant {
            head_dim,
            dtype,
            kv_dtype: dtype,
            rows,
            unroll,
            tpr: (head_dim / 8).next_power_of_two(),
            rope,
            min_blocks,
        }
    }

    /// The same variant reading a K/V cache of `kv_dtype` (an FP8 dtype, or `dtype` again).
    /// An FP8 cache needs half the registers per token in flight of a 16-bit one (8 bytes
    /// per thread per token), so the unroll and register budget of q's dtype are kept,
    /// except with RoPE at 8 rows: there the decoding left a stack frame at the 255-register
    /// limit (bf16 8 bytes on sm_90a, f32 24 bytes on sm_80, `tests/nvrtc_compile.rs`), so
    /// an FP8 cache with RoPE runs 4 rows per pass (the 4-row variant's unroll and budget).
    pub fn with_kv_dtype(self, kv_dtype: DType) -> Self {
        let base = if kv_dtype.is_fp8() && self.rope && self.rows == 8 {
            Self::with_rows(self.head_dim, self.dtype, 4, true)
        } else {
            self
        };
        DecodeVariant { kv_dtype, ..base }
    }

    /// [`DecodeVariant::for_plan`] with a K/V cache of `kv_dtype`.
    pub fn for_plan_kv(plan: &Plan, dtype: DType, kv_dtype: DType) -> Self {
        Self::for_plan(plan, dtype).with_kv_dtype(kv_dtype)
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        DECODE_THREADS
    }

    /// NVRTC `-D` options (`FP_KV_DTYPE` only when the cache's dtype is not q's).
    pub fn defines(&self) -> Vec<String> {
        let mut d = vec![
            format!("-DFP_HEAD_DIM={}", self.head_dim),
            format!("-DFP_DTYPE={}", dtype_code(self.dtype)),
            format!("-DFP_TPR={}", self.tpr),
            format!("-DFP_ROWS={}", self.rows),
            format!("-DFP_UNROLL={}", self.unroll),
            format!("-DFP_THREADS={DECODE_THREADS}"),
            format!("-DFP_ROPE={}", self.rope as u8),
            format!("-DFP_MIN_BLOCKS={}", self.min_blocks),
        ];
        if self.kv_dtype != self.dtype {
            d.push(format!("-DFP_KV_DTYPE={}", dtype_code(self.kv_dtype)));
        }
        d
    }
}

/// Per-SM limits of an architecture, as the occupancy calculator uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmLimits {
    /// 32-bit registers per SM (split evenly over 4 sub-partitions).
    pub registers: u32,
    /// Resident threads per SM.
    pub threads: u32,
    /// Resident blocks per SM.
    pub blocks: u32,
    /// Shared memory per SM usable by blocks, in bytes.
    pub shared_bytes: u32,
    /// Shared memory the system reserves per block, in bytes.
    pub reserved_shared_per_block: u32,
}

/// The limits of `arch` (`sm_80`, `sm_90a`, ...), for the architectures whose figures are
/// tabulated here (CUDA C++ Programming Guide, "Technical Specifications per Compute
/// Capability"); `None` for others.
pub fn sm_limits(arch: &str) -> Option<SmLimits> {
    let digits: String = arch
        .strip_prefix("sm_")?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let kb = 1024;
    let (threads, blocks, shared_kb, reserved) = match digits.parse::<u32>().ok()? {
        75 => (1024, 16, 64, 0),
        80 => (2048, 32, 164, kb),
        86 => (1536, 16, 100, kb),
        87 => (1536, 16, 164, kb),
        89 => (1536, 24, 100, kb),
        90 => (2048, 32, 228, kb),
        100 => (2048, 32, 228, kb),
        120 => (1536, 32, 100, kb),
        _ => return None,
    };
    Some(SmLimits {
        registers: 65_536,
        threads,
        blocks,
        shared_bytes: shared_kb * kb,
        reserved_shared_per_block: reserved,
    })
}

/// Resident blocks per SM of a kernel using `registers` per thread and `shared_bytes` of
/// static shared memory per block, launched with `threads` per block, under `limits`: the
/// minimum of the thread, block, register and shared-memory limits, as the CUDA occupancy
/// calculator (`cuda_occupancy.h`) computes it. Registers are allocated per warp in units of
/// 256 and each of the SM's 4 sub-partitions holds a quarter of the register file.
pub fn blocks_per_sm(limits: &SmLimits, threads: u32, registers: u32, shared_bytes: u32) -> u32 {
    if threads == 0 {
        return 0;
    }
    let warps = threads.div_ceil(32);
    let by_threads = limits.threads / (warps * 32);
    let by_regs = if registers == 0 {
        u32::MAX
    } else {
        let per_warp = (registers * 32).div_ceil(256) * 256;
        let warps_per_sub = (limits.registers / 4) / per_warp;
        warps_per_sub * 4 / warps
    };
    let smem = (shared_bytes + limits.reserved_shared_per_block).div_ceil(128) * 128;
    let by_smem = limits.shared_bytes.checked_div(smem).unwrap_or(u32::MAX);
    by_threads.min(limits.blocks).min(by_regs).min(by_smem)
}

/// `FP_DTYPE` / `FP_KV_DTYPE` code of a dtype. The FP8 dtypes get codes 3 and 4, valid as
/// `FP_KV_DTYPE` (the K/V cache's dtype) only: as `FP_DTYPE` (q's and o's) every kernel source
/// refuses them (`#error` in `common.cuh`).
pub fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::E4M3Fn => 3,
        DType::E5M2 => 4,
    }
}

/// NVRTC `-D` options of the merge kernel.
pub fn merge_defines(head_dim: usize, dtype: DType) -> Vec<String> {
    vec![
        format!("-DFP_HEAD_DIM={head_dim}"),
        format!("-DFP_DTYPE={}", dtype_code(dtype)),
    ]
}

/// Device addresses and sizes of one run's buffers.
#[derive(Debug, Clone, Copy)]
pub struct Buffers {
    /// Address of q.
    pub q: u64,
    /// Address of the K cache.
    pub k: u64,
    /// Address of the V cache.
    pub v: u64,
    /// Address of o.
    pub o: u64,
    /// Address of the LSE (0 when not written).
    pub lse: u64,
    /// Address of the attention sinks, `num_qo_heads` f32 (0 without sinks).
    pub sinks: u64,
    /// Address of the custom mask's bits (0 without a mask), its `mask_indptr` and the
    /// bits buffer's length in bytes.
    pub mask: (u64, u64, usize),
    /// Address of the page ids.
    pub kv_indices: u64,
    /// Address of the int workspace (the plan's image).
    pub int_ws: u64,
    /// Address of the float workspace.
    pub float_ws: u64,
    /// Rows available in q, o and lse (the kernels' bound of every row index).
    pub qo_rows: usize,
    /// Length of the page-id array.
    pub num_indices: usize,
    /// Pages (ragged: tokens) in the cache.
    pub num_pages: usize,
    /// K element strides.
    pub strides: KvStrides,
    /// V element strides.
    pub v_strides: KvStrides,
    /// q and o element strides.
    pub qo: RunStrides,
}

/// The parameters of `plan` over `b` (all values already checked to fit their types, as
/// [`crate::backend::check_run_args`] does before every launch).
pub fn params(plan: &Plan, b: &Buffers) -> Params {
    let h = plan.heads();
    let opts = plan.options();
    let caps = plan.capacities();
    let [ro, wo, mo] = plan.int_offsets();
    let float = plan.requirement().float;
    let po = float.buffer("partial_o").map_or(0, |x| x.offset);
    let pl = float.buffer("partial_lse").map_or(0, |x| x.offset);
    let (magic, shift) = div_magic(plan.page_size() as u32);
    let (rope_theta, rope_scale) = match opts.pos_encoding {
        PosEncoding::Rope { theta, scale } => (theta, scale),
        _ => (1.0, 1.0),
    };
    Params {
        q: b.q,
        k: b.k,
        v: b.v,
        o: b.o,
        lse: b.lse,
        kv_indices: b.kv_indices,
        int_ws: b.int_ws,
        partial_o: b.float_ws + po as u64,
        partial_lse: b.float_ws + pl as u64,
        stride_page: b.strides.page as i64,
        stride_token: b.strides.token as i64,
        stride_head: b.strides.head as i64,
        v_stride_page: b.v_strides.page as i64,
        v_stride_token: b.v_strides.token as i64,
        v_stride_head: b.v_strides.head as i64,
        q_row: b.qo.q.row as i64,
        q_head: b.qo.q.head as i64,
        o_row: b.qo.o.row as i64,
        o_head: b.qo.o.head as i64,
        qo_rows: b.qo_rows as i64,
        num_indices: b.num_indices as i64,
        partial_cap: caps.partial_rows as i64,
        num_pages: b.num_pages as i32,
        page_size: plan.page_size() as i32,
        ps_magic: magic,
        ps_shift: shift as i32,
        num_qo_heads: h.num_qo_heads() as i32,
        group: h.group_size() as i32,
        req_cap: caps.requests as i32,
        work_cap: caps.work_items as i32,
        merge_cap: caps.merge_rows as i32,
        req_off: ro as i32,
        work_off: wo as i32,
        merge_off: mo as i32,
        paged: plan.is_paged() as i32,
        causal: opts.causal as i32,
        // A window wider than any i32 KV length is no window in effect.
        window_left: opts
            .window_left
            .map_or(-1, |w| w.min(i32::MAX as u32) as i32),
        alibi: (opts.pos_encoding == PosEncoding::Alibi) as i32,
        has_soft_cap: opts.logits_soft_cap.is_some() as i32,
        soft_cap: opts.logits_soft_cap.unwrap_or(1.0),
        sm_scale: opts.resolved_sm_scale(h.head_dim()),
        rope_theta,
        rope_scale,
        pad_: 0,
        sinks: b.sinks,
        mask: b.mask.0,
        mask_indptr: b.mask.1,
        mask_bytes: b.mask.2.min(i64::MAX as usize) as i64,
        k_scale: [1.0; FP_SCALE_SLOTS],
        v_scale: [1.0; FP_SCALE_SLOTS],
    }
}

/// Whether the CUDA kernels can apply a custom mask to `plan`: every kernel reads it except
/// the attention kernel's RoPE variants, which have no register left for it (the read made
/// them spill, `tests/nvrtc_compile.rs`): a mask with RoPE is an [`Error::Unsupported`]
/// naming `custom_mask`, raised before anything is launched (never ignored).
pub fn check_custom_mask(plan: &Plan, has_mask: bool) -> Result<()> {
    if has_mask && matches!(plan.options().pos_encoding, PosEncoding::Rope { .. }) {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: "custom_mask with rope (the RoPE attention kernels do not read masks; apply rope to q and k before appending and run without it, or use the cpu backend)".into(),
        });
    }
    Ok(())
}

/// The parameters of `plan` over the buffers captured in `c` (to compare a replay's plan
/// with a captured run).
pub(crate) fn params_like(plan: &Plan, c: &Params) -> Params {
    let po = plan
        .requirement()
        .float
        .buffer("partial_o")
        .map_or(0, |x| x.offset) as u64;
    let b = Buffers {
        q: c.q,
        k: c.k,
        v: c.v,
        o: c.o,
        lse: c.lse,
        sinks: c.sinks,
        mask: (c.mask, c.mask_indptr, c.mask_bytes as usize),
        kv_indices: c.kv_indices,
        int_ws: c.int_ws,
        float_ws: c.partial_o.wrapping_sub(po),
        qo_rows: c.qo_rows as usize,
        num_indices: c.num_indices as usize,
        num_pages: c.num_pages as usize,
        strides: KvStrides {
            page: c.stride_page as usize,
            token: c.stride_token as usize,
            head: c.stride_head as usize,
        },
        v_strides: KvStrides {
            page: c.v_stride_page as usize,
            token: c.v_stride_token as usize,
            head: c.v_stride_head as usize,
        },
        qo: RunStrides::new(
            QoStrides::new(c.q_row as usize, c.q_head as usize),
            QoStrides::new(c.o_row as usize, c.o_head as usize),
        ),
    };
    let mut p = params(plan, &b);
    p.k_scale = c.k_scale;
    p.v_scale = c.v_scale;
    p
}

/// Threads per block of the cascade fold kernel.
pub const FOLD_THREADS: u32 = 128;

/// Parameters of the cascade fold kernel (`fp_cascade_fold`, `struct FoldParams` in
/// `kernels/merge.cu`, field for field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FoldParams {
    pub(crate) level_o: u64,
    pub(crate) level_lse: u64,
    pub(crate) o: u64,
    pub(crate) lse: u64,
    pub(crate) sinks: u64,
    pub(crate) o_stride: i64,
    pub(crate) lse_stride: i64,
    pub(crate) rows: i64,
    pub(crate) num_levels: i32,
    pub(crate) num_qo_heads: i32,
}

impl FoldParams {
    /// The parameter block's bytes, exactly as the kernel receives it.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
}

// SAFETY: FoldParams is #[repr(C)] plain old data laid out exactly as the kernel's
// `struct FoldParams`; it is passed by value as a kernel argument.
unsafe impl DeviceRepr for FoldParams {}

/// Device addresses of a cascade run's buffers (the page ids live in the int workspace).
#[derive(Debug, Clone, Copy)]
pub struct CascadeBuffers {
    /// Address of q.
    pub q: u64,
    /// Address of the K cache.
    pub k: u64,
    /// Address of the V cache.
    pub v: u64,
    /// Address of o.
    pub o: u64,
    /// Address of the LSE (0 when not written).
    pub lse: u64,
    /// Address of the attention sinks (0 without sinks).
    pub sinks: u64,
    /// Address of the int workspace (holding [`CascadePlan::device_int_image`]).
    pub int_ws: u64,
    /// Address of the float workspace.
    pub float_ws: u64,
    /// Pages in the cache.
    pub num_pages: usize,
    /// K and V element strides.
    pub strides: KvStrides,
}

/// One level's launches: the attention kernel over the level plan's work items, then (for
/// split rows) the merge kernel, both with `params`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelLaunch {
    /// The level's parameters: o and lse are the level's state in the float workspace, the
    /// int image and page ids the level's in the int workspace, no sinks and no mask.
    pub params: Params,
    /// Attention-kernel blocks along x (the level plan's work-item capacity; 0: no launch).
    pub work_items: u32,
    /// Blocks along y (KV heads).
    pub kv_heads: u32,
    /// Merge-kernel blocks (merge-row capacity), launched when `merge` is set.
    pub merge_rows: u32,
    /// Whether the merge kernel runs.
    pub merge: bool,
}

/// Everything a cascade run enqueues, in order: each level's launches, then one fold
/// (`rows` blocks of [`FOLD_THREADS`]). Nothing else (no copy, no synchronisation), so
/// the sequence can be captured in a CUDA graph. The backend launches exactly this; the
/// host emulation runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeLaunches {
    /// One entry per level, in level order.
    pub levels: Vec<LevelLaunch>,
    /// The fold's parameters.
    pub fold: FoldParams,
    /// Fold blocks (query rows; 0: no launch).
    pub fold_rows: u32,
}

/// The launches of `plan` with outputs of `dtype` over `b` (the workspaces laid out by
/// [`CascadePlan::device_requirement`]).
///
/// # Errors
/// [`Error::SizeOverflow`] from the layout; [`Error::Unsupported`] for more query rows than
/// a grid holds.
pub fn cascade_launches(
    plan: &CascadePlan,
    dtype: DType,
    b: &CascadeBuffers,
) -> Result<CascadeLaunches> {
    cascade_launches_scaled(plan, dtype, (None, None), b)
}

/// [`cascade_launches`] over an FP8 cache with its scales `(k_scale, v_scale)` (checked by
/// [`crate::backend::check_run_args`]; `None` is 1): every level's parameters carry them
/// ([`Params::set_kv_scales`]). The cache's format is the attention kernels' variant.
pub fn cascade_launches_scaled(
    plan: &CascadePlan,
    dtype: DType,
    (k_scale, v_scale): (Option<&[f32]>, Option<&[f32]>),
    b: &CascadeBuffers,
) -> Result<CascadeLaunches> {
    let heads = plan.heads();
    let rows = plan.num_q_rows();
    if rows > i32::MAX as usize {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!("a cascade of {rows} query rows (at most {})", i32::MAX),
        });
    }
    let req = plan.device_requirement(dtype)?;
    let levels_off = req.float.buffer("levels").map_or(0, |x| x.offset) as u64;
    let mut levels = Vec::with_capacity(plan.num_levels());
    let mut offs = Vec::with_capacity(plan.num_levels());
    for l in 0..plan.num_levels() {
        let (Some(lp), Some(ids), Some(at)) = (
            plan.level_plan(l),
            plan.level_kv_indices(l),
            plan.device_level(l, dtype)?,
        ) else {
            continue;
        };
        offs.push(at);
        let bufs = Buffers {
            q: b.q,
            k: b.k,
            v: b.v,
            o: b.float_ws + at.o_offset as u64,
            lse: b.float_ws + at.lse_offset as u64,
            sinks: 0,
            mask: (0, 0, 0),
            kv_indices: b.int_ws + at.ids_offset as u64,
            int_ws: b.int_ws + at.image_offset as u64,
            float_ws: b.float_ws + levels_off,
            qo_rows: rows,
            num_indices: ids.len(),
            num_pages: b.num_pages,
            strides: b.strides,
            v_strides: b.strides,
            qo: RunStrides::contiguous(heads),
        };
        let caps = lp.capacities();
        let mut p = params(lp, &bufs);
        p.set_kv_scales(k_scale, v_scale)?;
        levels.push(LevelLaunch {
            params: p,
            work_items: caps.work_items as u32,
            kv_heads: heads.num_kv_heads() as u32,
            merge_rows: caps.merge_rows as u32,
            merge: caps.merge_rows > 0 && (lp.is_graph() || lp.num_merge_rows() > 0),
        });
    }
    // Levels sit one stride apart (CascadePlan::device_level); one level needs no stride.
    let (o_stride, lse_stride) = match (offs.first(), offs.get(1)) {
        (Some(a), Some(b)) => (
            (b.o_offset - a.o_offset) as i64,
            (b.lse_offset - a.lse_offset) as i64,
        ),
        _ => (0, 0),
    };
    let (o0, l0) = offs.first().map_or((0, 0), |a| (a.o_offset, a.lse_offset));
    let fold = FoldParams {
        level_o: b.float_ws + o0 as u64,
        level_lse: b.float_ws + l0 as u64,
        o: b.o,
        lse: b.lse,
        sinks: b.sinks,
        o_stride,
        lse_stride,
        rows: rows as i64,
        num_levels: levels.len() as i32,
        num_qo_heads: heads.num_qo_heads() as i32,
    };
    Ok(CascadeLaunches {
        levels,
        fold,
        fold_rows: rows as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernels() {
        // 9 pointers + 13 i64 = 176 bytes, then 22 four-byte fields = 88, then the sinks
        // and custom-mask pointers and the mask's byte count: 296 bytes, then the two FP8
        // scale arrays (2 * 128 f32), no padding anywhere (the C struct has the same fields
        // in the same order).
        assert_eq!(std::mem::size_of::<Params>(), 296 + 8 * FP_SCALE_SLOTS);
        assert!(src_defines_slots(include_str!("kernels/common.cuh")));
        assert_eq!(std::mem::align_of::<Params>(), 8);
        let src = include_str!("kernels/common.cuh");
        let start = src.find("struct Params {").unwrap();
        let body = &src[start..start + src[start..].find("};").unwrap()];
        let fields: Vec<&str> = body
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().split(';').next())
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        let rust = [
            "q",
            "k",
            "v",
            "o",
            "lse",
            "kv_indices",
            "int_ws",
            "partial_o",
            "partial_lse",
            "stride_page",
            "stride_token",
            "stride_head",
            "v_stride_page",
            "v_stride_token",
            "v_stride_head",
            "q_row",
            "q_head",
            "o_row",
            "o_head",
            "qo_rows",
            "num_indices",
            "partial_cap",
            "num_pages",
            "page_size",
            "ps_magic",
            "ps_shift",
            "num_qo_heads",
            "group",
            "req_cap",
            "work_cap",
            "merge_cap",
            "req_off",
            "work_off",
            "merge_off",
            "paged",
            "causal",
            "window_left",
            "alibi",
            "has_soft_cap",
            "soft_cap",
            "sm_scale",
            "rope_theta",
            "rope_scale",
            "pad_",
            "sinks",
            "mask",
            "mask_indptr",
            "mask_bytes",
            "k_scale[FP_SCALE_SLOTS]",
            "v_scale[FP_SCALE_SLOTS]",
        ];
        assert_eq!(fields, rust);
    }

    fn src_defines_slots(src: &str) -> bool {
        src.contains(&format!("#define FP_SCALE_SLOTS {FP_SCALE_SLOTS}\n"))
    }

    #[test]
    fn kv_scales_fill_the_slots() {
        let mut p: Params = bytemuck::Zeroable::zeroed();
        p.set_kv_scales(Some(&[0.5]), None).unwrap();
        assert!(p.k_scale.iter().all(|&x| x == 0.5));
        assert!(p.v_scale.iter().all(|&x| x == 1.0));
        p.set_kv_scales(Some(&[0.25, 2.0]), Some(&[3.0, 4.0]))
            .unwrap();
        assert_eq!((p.k_scale[0], p.k_scale[1], p.k_scale[2]), (0.25, 2.0, 1.0));
        assert_eq!((p.v_scale[0], p.v_scale[1]), (3.0, 4.0));
        let many = vec![1.0f32; FP_SCALE_SLOTS + 1];
        match p.set_kv_scales(None, Some(&many)) {
            Err(Error::Unsupported { what, .. }) => assert!(what.starts_with("v_scale")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fold_params_layout_matches_the_kernel() {
        // 5 pointers + 3 i64 + 2 i32 = 72 bytes, no padding (merge.cu's struct FoldParams).
        assert_eq!(std::mem::size_of::<FoldParams>(), 72);
        let src = include_str!("kernels/merge.cu");
        let start = src.find("struct FoldParams {").unwrap();
        let body = &src[start..start + src[start..].find("};").unwrap()];
        let fields: Vec<&str> = body
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().split(';').next())
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        let rust = [
            "level_o",
            "level_lse",
            "o",
            "lse",
            "sinks",
            "o_stride",
            "lse_stride",
            "rows",
            "num_levels",
            "num_qo_heads",
        ];
        assert_eq!(fields, rust);
    }

    #[test]
    fn magic_division_is_exact() {
        for d in 1..=256u32 {
            let (m, s) = div_magic(d);
            let check = |n: u32| assert_eq!(div_with(n, m, s), n / d, "{n} / {d}");
            for n in 0..5000 {
                check(n);
            }
            for k in 1..2000u32 {
                let n = k.wrapping_mul(2_654_435_761) & 0x7fff_ffff;
                check(n);
            }
            for n in (i32::MAX as u32 - 600)..=(i32::MAX as u32) {
                check(n);
            }
        }
    }

    #[test]
    fn occupancy_follows_the_calculator() {
        let h100 = sm_limits("sm_90a").unwrap();
        let a100 = sm_limits("sm_80").unwrap();
        // 128 threads: 4 warps; 128 registers -> 4096 per warp, 4 warps per sub-partition.
        assert_eq!(blocks_per_sm(&h100, 128, 128, 4160), 4);
        assert_eq!(blocks_per_sm(&h100, 128, 125, 4160), 4);
        // 168 registers: 5376 per warp, 3 per sub-partition; 230 (7424): 2.
        assert_eq!(blocks_per_sm(&h100, 128, 168, 16640), 3);
        assert_eq!(blocks_per_sm(&h100, 128, 169, 16640), 2);
        assert_eq!(blocks_per_sm(&h100, 128, 230, 16640), 2);
        assert_eq!(blocks_per_sm(&h100, 128, 255, 33280), 2);
        // Tiny kernels hit the block limit, big shared memory the shared-memory limit.
        assert_eq!(blocks_per_sm(&h100, 32, 16, 0), 32);
        assert_eq!(blocks_per_sm(&h100, 128, 32, 100 * 1024), 2);
        assert_eq!(blocks_per_sm(&a100, 128, 32, 100 * 1024), 1);
        // Threads: 1024-thread blocks, 2 per SM on sm_80/sm_90.
        assert_eq!(blocks_per_sm(&a100, 1024, 32, 0), 2);
        assert_eq!(sm_limits("sm_70"), None);
        assert_eq!(sm_limits("compute_90"), None);
    }

    #[test]
    fn variants_follow_the_plan_shape() {
        let llama = HeadConfig::new(32, 8, 128).unwrap();
        let gemma = HeadConfig::new(32, 16, 128).unwrap();
        let v = DecodeVariant::new(&llama, PlanKind::Decode, DType::BF16, false);
        assert_eq!((v.rows, v.unroll, v.min_blocks), (4, 2, 3));
        let v = DecodeVariant::new(&gemma, PlanKind::Decode, DType::BF16, false);
        assert_eq!((v.rows, v.unroll, v.min_blocks), (2, 4, 3));
        let v = DecodeVariant::new(&gemma, PlanKind::Prefill, DType::F32, true);
        assert_eq!((v.rows, v.unroll, v.min_blocks), (8, 1, 2));
        assert!(v.defines().contains(&"-DFP_MIN_BLOCKS=2".to_string()));
        // Other head dims: one block less, one token in flight with RoPE at 8 rows.
        let v = DecodeVariant::with_rows(80, DType::BF16, 4, false);
        assert_eq!((v.unroll, v.min_blocks), (2, 2));
        let v = DecodeVariant::with_rows(16, DType::F16, 1, false);
        assert_eq!((v.unroll, v.min_blocks), (4, 3));
        let v = DecodeVariant::with_rows(80, DType::BF16, 8, true);
        assert_eq!((v.unroll, v.min_blocks), (1, 2));
        // An FP8 cache keeps q's dtype's shape, except RoPE at 8 rows: 4 rows per pass.
        let v = DecodeVariant::with_rows(128, DType::BF16, 4, false).with_kv_dtype(DType::E4M3Fn);
        assert_eq!((v.rows, v.unroll, v.min_blocks), (4, 2, 3));
        assert!(v.defines().contains(&"-DFP_KV_DTYPE=3".to_string()));
        let v = DecodeVariant::with_rows(128, DType::F32, 8, true).with_kv_dtype(DType::E5M2);
        assert_eq!((v.rows, v.kv_dtype), (4, DType::E5M2));
        assert!(v.defines().contains(&"-DFP_KV_DTYPE=4".to_string()));
        let v = DecodeVariant::with_rows(128, DType::F16, 8, true).with_kv_dtype(DType::F16);
        assert_eq!(v.rows, 8);
        assert!(!v.defines().iter().any(|d| d.contains("FP_KV_DTYPE")));
    }
}
