//! Kernel parameters of the operations around attention (`kernels/ops.cu`): appending K/V
//! into the paged cache (`fp_append`, FP8 caches included: quantised with their scales as
//! the host append does) and rotating rows in place (`fp_rope`, FP8 rows included). Public
//! so the host emulation runs the kernels on the very parameter block the backend launches.
//!
//! [`OpsParams`] mirrors `struct OpsParams` in `kernels/ops.cu` field for field. The builders
//! ([`append_params`], [`rope_params`]) run the host operations' own validation
//! (`ops::append::check_append_shapes`, `Rope::validate`, the positions check) on the shapes
//! first, so the device and host ops accept and refuse exactly the same inputs; then the
//! CUDA-specific limits (head_dim / 2 at most [`MAX_ROPE_PAIRS`] with RoPE, sizes within
//! `i32`).

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

use crate::error::{Error, Result};
use crate::layout::{DType, KvStrides};
use crate::ops::append::{AppendRope, AppendShapes, AppendTargets, check_append_shapes};
use crate::ops::check_rows;
use crate::ops::rope::{Rope, RopeStyle, check_positions};
use crate::validate::check_fp8_scale;

use super::launch::scale_slots;

/// Threads per block of both kernels (one block per token row).
pub const OPS_THREADS: u32 = 64;
/// The most rotation pairs (head_dim / 2) the kernels take.
pub const MAX_ROPE_PAIRS: usize = 128;
/// The most per-KV-head FP8 scales an append takes (a per-tensor scale always fits): the
/// attention kernels' [`super::launch::FP_SCALE_SLOTS`].
pub const MAX_OPS_SCALES: usize = super::launch::FP_SCALE_SLOTS;

/// Kernel parameters (see `kernels/ops.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct OpsParams {
    pub(crate) k_src: u64,
    pub(crate) v_src: u64,
    pub(crate) k_dst: u64,
    pub(crate) v_dst: u64,
    pub(crate) append_indptr: u64,
    pub(crate) kv_indptr: u64,
    pub(crate) kv_indices: u64,
    pub(crate) kv_last_page_len: u64,
    pub(crate) batch_indices: u64,
    pub(crate) positions: u64,
    pub(crate) k_src_row: i64,
    pub(crate) k_src_head: i64,
    pub(crate) v_src_row: i64,
    pub(crate) v_src_head: i64,
    pub(crate) k_page: i64,
    pub(crate) k_token: i64,
    pub(crate) k_head: i64,
    pub(crate) v_page: i64,
    pub(crate) v_token: i64,
    pub(crate) v_head: i64,
    pub(crate) num_indices: i64,
    pub(crate) rows: i32,
    pub(crate) batch: i32,
    pub(crate) heads: i32,
    pub(crate) head_dim: i32,
    pub(crate) page_size: i32,
    pub(crate) num_pages: i32,
    pub(crate) src_dtype: i32,
    pub(crate) dst_dtype: i32,
    pub(crate) rope: i32,
    pub(crate) interleaved: i32,
    pub(crate) mscale: f64,
    pub(crate) freq: [f64; MAX_ROPE_PAIRS],
    pub(crate) k_scale: [f32; MAX_OPS_SCALES],
    pub(crate) v_scale: [f32; MAX_OPS_SCALES],
}

const _: () = assert!(std::mem::size_of::<OpsParams>() == 2264);

// SAFETY: OpsParams is #[repr(C)], plain old data, and matches the kernels' struct layout
// (checked by the emulation driver's static_assert on its size).
unsafe impl DeviceRepr for OpsParams {}

impl OpsParams {
    /// The bytes the kernels receive.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
    /// Token rows: the launch grid.
    pub fn rows(&self) -> u32 {
        self.rows as u32
    }
    /// The pointer fields in kernel order (`k_src`, `v_src`, `k_dst`, `v_dst`,
    /// `append_indptr`, `kv_indptr`, `kv_indices`, `kv_last_page_len`, `batch_indices`,
    /// `positions`).
    pub fn pointers(&self) -> [u64; 10] {
        [
            self.k_src,
            self.v_src,
            self.k_dst,
            self.v_dst,
            self.append_indptr,
            self.kv_indptr,
            self.kv_indices,
            self.kv_last_page_len,
            self.batch_indices,
            self.positions,
        ]
    }
}

/// The kernel's dtype code (the FP8 codes are the attention kernels' `FP_KV_DTYPE`).
fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::E4M3Fn => 3,
        DType::E5M2 => 4,
    }
}

/// A device view of token rows `[tokens, heads, head_dim]` with element strides (the head
/// dimension contiguous), as [`crate::ops::Rows`] on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpsRows {
    /// Address of element 0.
    pub addr: u64,
    /// Elements available from `addr`.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
    /// Token rows.
    pub tokens: usize,
    /// Heads per row.
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Elements from one row to the next.
    pub row_stride: usize,
    /// Elements from one head to the next.
    pub head_stride: usize,
}

impl OpsRows {
    fn check(&self, tensor: &'static str) -> Result<()> {
        check_rows(
            tensor,
            self.len,
            (self.tokens, self.heads, self.head_dim),
            (self.row_stride, self.head_stride),
        )
    }
}

/// A device paged cache: K and V buffers (V may live in K's buffer), element offsets and
/// strides, as [`crate::ops::append::KvCacheMut`] on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpsCache {
    /// Address of the K buffer's element 0.
    pub k_addr: u64,
    /// Elements of the K buffer.
    pub k_len: usize,
    /// The V buffer: address and elements; `None`: V lives in K's buffer.
    pub v: Option<(u64, usize)>,
    /// Element type of the cache.
    pub dtype: DType,
    /// Element offset of K's slot (0, 0, 0) in its buffer.
    pub k_base: usize,
    /// Element offset of V's slot (0, 0, 0) in its buffer.
    pub v_base: usize,
    /// K strides.
    pub k_strides: KvStrides,
    /// V strides.
    pub v_strides: KvStrides,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages.
    pub num_pages: usize,
}

/// Device addresses of the index arrays of an append (0 where absent) and their lengths,
/// which must equal the host copies' (the contents must be the same: the host copies are
/// what is validated; the kernel bounds-checks what it reads from the device copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpsArrays {
    /// `append_indptr` ([`AppendTargets::Csr`]).
    pub append_indptr: (u64, usize),
    /// `kv_indptr`.
    pub kv_indptr: (u64, usize),
    /// `kv_indices`.
    pub kv_indices: (u64, usize),
    /// `kv_last_page_len`.
    pub kv_last_page_len: (u64, usize),
    /// `batch_indices` ([`AppendTargets::At`]).
    pub batch_indices: (u64, usize),
    /// `positions`: [`AppendTargets::At`]'s positions, or with [`AppendTargets::Csr`] the
    /// RoPE positions (`AppendRope::positions`), else absent.
    pub positions: (u64, usize),
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Unsupported {
        backend: "cuda",
        what: format!("{what} = {v} (at most {})", i32::MAX),
    })
}

fn set_rope(p: &mut OpsParams, rope: &Rope, head_dim: usize) -> Result<()> {
    let half = head_dim / 2;
    if half > MAX_ROPE_PAIRS {
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!(
                "rope on head_dim {head_dim} (at most {})",
                2 * MAX_ROPE_PAIRS
            ),
        });
    }
    let (freqs, mscale) = rope.frequencies(head_dim);
    p.freq[..half].copy_from_slice(&freqs);
    p.mscale = mscale;
    p.rope = 1;
    p.interleaved = (rope.style == RopeStyle::Interleaved) as i32;
    Ok(())
}

fn array_len(
    field: &'static str,
    host: &[i32],
    dev: (u64, usize),
    rule: &'static str,
) -> Result<u64> {
    if dev.1 < host.len() {
        return Err(Error::ArrayLength {
            field,
            expected: host.len(),
            actual: dev.1,
            rule,
        });
    }
    Ok(dev.0)
}

/// The parameters of one `fp_append` launch: validates the append exactly as the host op
/// ([`crate::ops::append::append_kv`] / [`crate::ops::append::append_kv_at`]) does on the
/// host arrays in `targets`, then the device arrays' lengths and the CUDA limits. An FP8
/// cache quantises with scale 1 ([`append_params_scaled`] takes its scales).
pub fn append_params(
    targets: AppendTargets<'_>,
    k: &OpsRows,
    v: &OpsRows,
    cache: &OpsCache,
    rope: Option<&AppendRope<'_>>,
    arrays: &OpsArrays,
) -> Result<OpsParams> {
    append_params_scaled(targets, k, v, cache, (None, None), rope, arrays)
}

/// [`append_params`] into an FP8 cache with its scales `(k_scale, v_scale)`, as
/// [`crate::ops::append::KvCacheMut::with_scales`] on the host: 1 (per tensor) or
/// `num_kv_heads` finite positive values each (checked as the host op checks them), only
/// with an FP8 cache; at most [`MAX_OPS_SCALES`] per-head values.
pub fn append_params_scaled(
    targets: AppendTargets<'_>,
    k: &OpsRows,
    v: &OpsRows,
    cache: &OpsCache,
    (k_scale, v_scale): (Option<&[f32]>, Option<&[f32]>),
    rope: Option<&AppendRope<'_>>,
    arrays: &OpsArrays,
) -> Result<OpsParams> {
    k.check("k")?;
    v.check("v")?;
    check_fp8_scale("k_scale", cache.dtype, k_scale, k.heads)?;
    check_fp8_scale("v_scale", cache.dtype, v_scale, k.heads)?;
    if v.dtype != k.dtype {
        return Err(Error::DTypeMismatch {
            tensor: "v",
            expected: k.dtype.name(),
            actual: v.dtype.name(),
        });
    }
    let shapes = AppendShapes {
        k_rows: (k.tokens, k.heads, k.head_dim),
        v_rows: (v.tokens, v.heads, v.head_dim),
        k_len: cache.k_len,
        v_len: cache.v.map(|(_, n)| n),
        k_base: cache.k_base,
        v_base: cache.v_base,
        k_strides: cache.k_strides,
        v_strides: cache.v_strides,
        page_size: cache.page_size,
        num_pages: cache.num_pages,
    };
    let nnz = check_append_shapes(targets, &shapes, rope)?;
    let (kv_indptr, kv_indices, last) = targets.kv();
    let rule = "at least the host copy's entries";
    let mut p: OpsParams = bytemuck::Zeroable::zeroed();
    p.kv_indptr = array_len("kv_indptr", kv_indptr, arrays.kv_indptr, rule)?;
    p.kv_indices = array_len("kv_indices", kv_indices, arrays.kv_indices, rule)?;
    p.kv_last_page_len = array_len("kv_last_page_len", last, arrays.kv_last_page_len, rule)?;
    p.num_indices = kv_indices.len() as i64;
    match targets {
        AppendTargets::Csr(b) => {
            p.append_indptr =
                array_len("append_indptr", b.append_indptr, arrays.append_indptr, rule)?;
            if let Some(pos) = rope.and_then(|r| r.positions) {
                p.positions = array_len("positions", pos, arrays.positions, rule)?;
            }
        }
        AppendTargets::At(a) => {
            p.batch_indices =
                array_len("batch_indices", a.batch_indices, arrays.batch_indices, rule)?;
            p.positions = array_len("positions", a.positions, arrays.positions, rule)?;
        }
    }
    let es = cache.dtype.size() as u64;
    p.k_src = k.addr;
    p.v_src = v.addr;
    p.k_dst = cache.k_addr + cache.k_base as u64 * es;
    p.v_dst = cache.v.map_or(cache.k_addr, |(a, _)| a) + cache.v_base as u64 * es;
    p.k_src_row = k.row_stride as i64;
    p.k_src_head = k.head_stride as i64;
    p.v_src_row = v.row_stride as i64;
    p.v_src_head = v.head_stride as i64;
    let (ks, vs) = (cache.k_strides, cache.v_strides);
    (p.k_page, p.k_token, p.k_head) = (ks.page as i64, ks.token as i64, ks.head as i64);
    (p.v_page, p.v_token, p.v_head) = (vs.page as i64, vs.token as i64, vs.head as i64);
    p.rows = to_i32("appended rows", nnz)?;
    p.batch = to_i32("batch size", kv_indptr.len() - 1)?;
    p.heads = to_i32("num_kv_heads", k.heads)?;
    p.head_dim = to_i32("head_dim", k.head_dim)?;
    to_i32("num_kv_heads * head_dim", k.heads * k.head_dim)?;
    p.page_size = to_i32("page_size", cache.page_size)?;
    p.num_pages = to_i32("num_pages", cache.num_pages)?;
    p.src_dtype = dtype_code(k.dtype);
    p.dst_dtype = dtype_code(cache.dtype);
    p.mscale = 1.0;
    p.k_scale = scale_slots("k_scale", k_scale)?;
    p.v_scale = scale_slots("v_scale", v_scale)?;
    if let Some(r) = rope {
        set_rope(&mut p, r.rope, k.head_dim)?;
    }
    Ok(p)
}

/// The parameters of one `fp_rope` launch over `x` (rotated in place) at the positions at
/// device address `positions.0`: validates as [`crate::ops::rope::apply_rope`] does on the
/// host copy of the positions, then the device array's length and the CUDA limits.
pub fn rope_params(
    rope: &Rope,
    x: &OpsRows,
    host_positions: &[i32],
    positions: (u64, usize),
) -> Result<OpsParams> {
    x.check("x")?;
    rope.validate(x.head_dim)?;
    check_positions(host_positions, x.tokens)?;
    let mut p: OpsParams = bytemuck::Zeroable::zeroed();
    p.positions = array_len(
        "positions",
        host_positions,
        positions,
        "at least the host copy's entries",
    )?;
    p.k_src = x.addr;
    p.k_src_row = x.row_stride as i64;
    p.k_src_head = x.head_stride as i64;
    p.rows = to_i32("token rows", x.tokens)?;
    p.heads = to_i32("heads", x.heads)?;
    p.head_dim = to_i32("head_dim", x.head_dim)?;
    to_i32("heads * head_dim", x.heads * x.head_dim)?;
    p.src_dtype = dtype_code(x.dtype);
    p.dst_dtype = p.src_dtype;
    (p.k_scale, p.v_scale) = ([1.0; MAX_OPS_SCALES], [1.0; MAX_OPS_SCALES]);
    set_rope(&mut p, rope, x.head_dim)?;
    Ok(p)
}

/// Device token rows `[tokens, heads, head_dim]` read by an operation (element strides, head
/// dimension contiguous), typed storage `T` holding `dtype`.
pub struct DeviceRows<'a, T> {
    /// The buffer (a `CudaSlice<T>` or a view).
    pub data: &'a dyn DevicePtr<T>,
    /// Element type (`T`'s; f16 or bf16 for `u16` bits).
    pub dtype: DType,
    /// Token rows.
    pub tokens: usize,
    /// Heads per row.
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Elements from one row to the next (`heads * head_dim` when dense; larger for a slice
    /// of a fused QKV projection).
    pub row_stride: usize,
    /// Elements from one head to the next.
    pub head_stride: usize,
}

/// Device token rows written in place ([`super::CudaBackend::apply_rope`]).
pub struct DeviceRowsMut<'a, T> {
    /// The buffer.
    pub data: &'a mut dyn DevicePtrMut<T>,
    /// Element type.
    pub dtype: DType,
    /// Token rows.
    pub tokens: usize,
    /// Heads per row.
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Elements from one row to the next.
    pub row_stride: usize,
    /// Elements from one head to the next.
    pub head_stride: usize,
}

/// A device paged cache written by [`super::CudaBackend::append_kv`]: K's slot
/// `(page, token, head)` at element `k_base + page * k_strides.page + token *
/// k_strides.token + head * k_strides.head` of `k`, V's likewise from `v_base` in `v` (or in
/// `k`'s buffer when `v` is `None`: a combined cache).
pub struct DeviceKvCacheMut<'a, T> {
    /// The K buffer (and V's, for a combined cache).
    pub k: &'a mut dyn DevicePtrMut<T>,
    /// The V buffer; `None`: in `k`'s.
    pub v: Option<&'a mut dyn DevicePtrMut<T>>,
    /// Element type of the cache.
    pub dtype: DType,
    /// Element offset of K's first slot.
    pub k_base: usize,
    /// Element offset of V's first slot.
    pub v_base: usize,
    /// K strides.
    pub k_strides: KvStrides,
    /// V strides.
    pub v_strides: KvStrides,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages.
    pub num_pages: usize,
    /// An FP8 cache's K scale: 1 (per tensor) or `num_kv_heads` values, each stored `x` of
    /// head `h` is `encode(x / k_scale[h])`; `None`: scale 1. Only an FP8 cache takes
    /// scales (as [`crate::ops::append::KvCacheMut::with_scales`]).
    pub k_scale: Option<&'a [f32]>,
    /// An FP8 cache's V scale (as `k_scale`).
    pub v_scale: Option<&'a [f32]>,
}

/// The device copies of an append's index arrays, with the **same contents** as the host
/// arrays given in [`AppendTargets`] (those are validated; the kernel bounds-checks every
/// index it reads from these and skips a row that falls outside).
pub struct DeviceAppendArrays<'a> {
    /// `append_indptr` (with [`AppendTargets::Csr`]).
    pub append_indptr: Option<&'a dyn DevicePtr<i32>>,
    /// `kv_indptr`.
    pub kv_indptr: &'a dyn DevicePtr<i32>,
    /// `kv_indices`.
    pub kv_indices: &'a dyn DevicePtr<i32>,
    /// `kv_last_page_len`.
    pub kv_last_page_len: &'a dyn DevicePtr<i32>,
    /// `batch_indices` (with [`AppendTargets::At`]).
    pub batch_indices: Option<&'a dyn DevicePtr<i32>>,
    /// [`AppendTargets::At`]'s positions, or with [`AppendTargets::Csr`] the RoPE positions
    /// (when `AppendRope::positions` is given).
    pub positions: Option<&'a dyn DevicePtr<i32>>,
}
