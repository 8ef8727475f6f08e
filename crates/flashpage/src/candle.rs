//! Candle interop (the `candle` feature): flashpage attention and `append_kv` as candle
//! custom ops on candle's CPU storage.
//!
//! - [`attention`] (a [`candle_core::CustomOp3`] over q, the K cache and the V cache) runs a
//!   [`Plan`] (paged decode or prefill, or ragged prefill) on a [`CpuBackend`] and returns o
//!   `[rows, num_qo_heads, head_dim]`. The inputs are read through their candle layouts
//!   without a copy: q may be a narrowed view of a fused QKV projection (its row and head
//!   strides become [`QoStrides`]), K and V may be views of one combined cache
//!   `[pages, 2, …]` or tensors of different layouts (their strides become [`KvStrides`]).
//! - [`append_kv`] (a [`candle_core::InplaceOp3`]) writes new tokens' K/V, of any float
//!   dtype, into a combined paged cache tensor in place, with optional RoPE on K.
//!
//! Only the last dimension must be contiguous. Every shape, dtype and stride is checked as
//! in the rest of the library; a flashpage error comes back as a candle error whose
//! message is the flashpage one. Tensors on a CUDA device are refused with a candle error:
//! candle's CUDA storage needs candle-core's own `cuda` feature, which compiles candle's
//! kernels with `nvcc` at build time (see docs/candle.md).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use flashpage::backend::cpu::CpuBackend;
//! use flashpage::{AttentionOptions, BatchBuilder, HeadConfig, KvLayout, Plan, PlanConfig};
//!
//! let (hq, hkv, d, ps) = (4, 2, 32, 16);
//! let heads = HeadConfig::new(hq, hkv, d)?;
//! let mut b = BatchBuilder::new(ps)?;
//! b.push(1, 20, &[1, 0])?;
//! let cpu = CpuBackend::new(1)?;
//! let plan = Plan::new(&b.decode(heads, 2), &AttentionOptions::new(),
//!                      &PlanConfig::with_parallelism(cpu.threads()))?;
//! let dev = Device::Cpu;
//! // A fused QKV projection row; q is its first hq heads, read in place.
//! let qkv = Tensor::randn(0f32, 1.0, (1, hq + 2 * hkv, d), &dev).unwrap();
//! let q = qkv.narrow(1, 0, hq).unwrap(); // a strided view, not a copy
//! let k = Tensor::randn(0f32, 1.0, (2, ps, hkv, d), &dev).unwrap();
//! let v = Tensor::randn(0f32, 1.0, (2, ps, hkv, d), &dev).unwrap();
//! let o = flashpage::candle::attention(&cpu, &plan, &q, &k, &v, KvLayout::Nhd, b.kv_indices())
//!     .unwrap();
//! assert_eq!(o.dims(), &[1, hq, d]);
//! # Ok::<(), flashpage::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, InplaceOp3, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::backend::cpu::CpuBackend;
use crate::backend::{KvCache, RunArgs};
use crate::error::{Error, Result};
use crate::layout::{KvLayout, KvStrides, QoStrides, RunStrides};
use crate::ops::Rows;
use crate::ops::append::{AppendBatch, AppendRope, KvCacheMut};
use crate::plan::Plan;
use crate::tensor::{TensorMut, TensorRef};
use crate::workspace::HostWorkspace;

fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The elements of `s` from the layout's start offset on, as a flashpage tensor.
fn view<'a>(tensor: &'static str, s: &'a CpuStorage, l: &Layout) -> Result<TensorRef<'a>> {
    let off = l.start_offset();
    let t = match s {
        CpuStorage::F32(v) => v.get(off..).map(TensorRef::F32),
        CpuStorage::F16(v) => v.get(off..).map(TensorRef::F16),
        CpuStorage::BF16(v) => v.get(off..).map(TensorRef::BF16),
        other => {
            return Err(Error::Unsupported {
                backend: "candle",
                what: format!("{tensor} of dtype {:?} (f32, f16 or bf16)", other.dtype()),
            });
        }
    };
    t.ok_or_else(|| Error::TensorShape {
        tensor,
        expected: format!("storage reaching its start offset {off}"),
        actual: "a shorter storage".into(),
    })
}

/// Dims and strides of a candle layout of rank `rank` whose last dimension is contiguous.
fn dims_strides<'l>(
    tensor: &'static str,
    l: &'l Layout,
    rank: usize,
    shape: &str,
) -> Result<(&'l [usize], &'l [usize])> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != rank || stride.last() != Some(&1) {
        return Err(Error::TensorShape {
            tensor,
            expected: format!("{shape} with a contiguous last dimension"),
            actual: format!("dims {dims:?}, strides {stride:?}"),
        });
    }
    Ok((dims, stride))
}

/// The K or V cache strides of a candle layout: `[pages, page_size, hkv, d]` (NHD) or
/// `[pages, hkv, page_size, d]` (HND) for a paged plan, `[tokens, hkv, d]` for ragged K/V;
/// returns the strides and the pages (tokens).
fn cache_strides(
    tensor: &'static str,
    l: &Layout,
    plan: &Plan,
    layout: KvLayout,
) -> Result<(KvStrides, usize)> {
    let h = plan.heads();
    let (hkv, d) = (h.num_kv_heads(), h.head_dim());
    if !plan.is_paged() {
        let (dims, s) = dims_strides(tensor, l, 3, "[tokens, num_kv_heads, head_dim]")?;
        if dims[1..] != [hkv, d] {
            return Err(Error::TensorShape {
                tensor,
                expected: format!("[tokens, {hkv}, {d}]"),
                actual: format!("{dims:?}"),
            });
        }
        return Ok((
            KvStrides {
                page: s[0],
                token: 0,
                head: s[1],
            },
            dims[0],
        ));
    }
    let ps = plan.page_size();
    let (want, shape) = match layout {
        KvLayout::Nhd => ([ps, hkv, d], "[pages, page_size, num_kv_heads, head_dim]"),
        KvLayout::Hnd => ([hkv, ps, d], "[pages, num_kv_heads, page_size, head_dim]"),
    };
    let (dims, s) = dims_strides(tensor, l, 4, shape)?;
    if dims[1..] != want {
        return Err(Error::TensorShape {
            tensor,
            expected: format!(
                "[pages, {}, {}, {}] ({})",
                want[0],
                want[1],
                want[2],
                layout.name()
            ),
            actual: format!("{dims:?}"),
        });
    }
    let strides = match layout {
        KvLayout::Nhd => KvStrides {
            page: s[0],
            token: s[1],
            head: s[2],
        },
        KvLayout::Hnd => KvStrides {
            page: s[0],
            token: s[2],
            head: s[1],
        },
    };
    Ok((strides, dims[0]))
}

/// Flashpage attention as a candle op over `(q, k_cache, v_cache)`: see [`attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionOp<'a> {
    /// The backend that runs the plan.
    pub backend: &'a CpuBackend,
    /// The plan of this step.
    pub plan: &'a Plan,
    /// Memory order of the paged caches (ignored for ragged K/V).
    pub layout: KvLayout,
    /// Page ids (paged plans; empty for ragged K/V).
    pub kv_indices: &'a [i32],
}

impl AttentionOp<'_> {
    fn run(
        &self,
        (q, ql): (&CpuStorage, &Layout),
        (k, kl): (&CpuStorage, &Layout),
        (v, vl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let plan = self.plan;
        let h = plan.heads();
        let (hq, d) = (h.num_qo_heads(), h.head_dim());
        let rows = plan.num_q_rows();
        let (qd, qs) = dims_strides("q", ql, 3, "[rows, num_qo_heads, head_dim]")?;
        if qd != [rows, hq, d] {
            return Err(Error::TensorShape {
                tensor: "q",
                expected: format!("[{rows}, {hq}, {d}]"),
                actual: format!("{qd:?}"),
            });
        }
        let (ks, kpages) = cache_strides("k_cache", kl, plan, self.layout)?;
        let (vs, vpages) = cache_strides("v_cache", vl, plan, self.layout)?;
        if kpages != vpages {
            return Err(Error::TensorShape {
                tensor: "v_cache",
                expected: format!("{kpages} pages (as k_cache)"),
                actual: format!("{vpages} pages"),
            });
        }
        let (qt, kt, vt) = (
            view("q", q, ql)?,
            view("k_cache", k, kl)?,
            view("v_cache", v, vl)?,
        );
        let kv = if plan.is_paged() {
            KvCache::paged(kt, vt, ks, kpages, self.kv_indices)
        } else {
            KvCache::ragged(kt, vt, ks, kpages)
        }
        .with_v_strides(vs);
        let strides = RunStrides::new(QoStrides::new(qs[0], qs[1]), QoStrides::contiguous(hq, d));
        let n = rows * hq * d;
        let mut lse = plan.options().return_lse.then(|| vec![0f32; rows * hq]);
        let mut ws = HostWorkspace::new(plan.requirement().float.total())?;
        let run = |o: TensorMut<'_>, lse: Option<&mut [f32]>, ws: &mut HostWorkspace| {
            let args = RunArgs {
                q: qt,
                kv,
                o,
                lse,
                sinks: None,
                custom_mask: None,
            };
            self.backend
                .run_strided(plan, args, strides, ws.as_bytes_mut())
        };
        let out = match qt {
            TensorRef::F32(_) => {
                let mut o = vec![0f32; n];
                run(TensorMut::F32(&mut o), lse.as_deref_mut(), &mut ws)?;
                CpuStorage::F32(o)
            }
            TensorRef::F16(_) => {
                let mut o = vec![f16::ZERO; n];
                run(TensorMut::F16(&mut o), lse.as_deref_mut(), &mut ws)?;
                CpuStorage::F16(o)
            }
            TensorRef::BF16(_) => {
                let mut o = vec![bf16::ZERO; n];
                run(TensorMut::BF16(&mut o), lse.as_deref_mut(), &mut ws)?;
                CpuStorage::BF16(o)
            }
            TensorRef::Fp8(..) => {
                return Err(Error::DTypeMismatch {
                    tensor: "q",
                    expected: "f32, f16 or bf16",
                    actual: qt.dtype().name(),
                });
            }
        };
        Ok((out, Shape::from((rows, hq, d))))
    }
}

impl CustomOp3 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "flashpage-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((q, ql), (k, kl), (v, vl)).map_err(wrap)
    }
}

/// Runs `plan` on `backend` over candle tensors: q `[rows, num_qo_heads, head_dim]`, the K
/// and V caches `[pages, page_size, num_kv_heads, head_dim]` (NHD) or
/// `[pages, num_kv_heads, page_size, head_dim]` (HND) for a paged plan, `[tokens,
/// num_kv_heads, head_dim]` for ragged K/V, all of one float dtype on the CPU; returns o
/// `[rows, num_qo_heads, head_dim]` (contiguous, q's dtype). Strided views are read in place
/// (last dimension contiguous). The float workspace is allocated per call.
pub fn attention(
    backend: &CpuBackend,
    plan: &Plan,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    layout: KvLayout,
    kv_indices: &[i32],
) -> candle_core::Result<Tensor> {
    let op = AttentionOp {
        backend,
        plan,
        layout,
        kv_indices,
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// `append_kv` as an in-place candle op on a combined cache (see [`append_kv`]).
#[derive(Debug, Clone, Copy)]
pub struct AppendKvOp<'a> {
    /// Where the rows go (the cache's CSR arrays after the append).
    pub batch: AppendBatch<'a>,
    /// Memory order of each page's K and V halves.
    pub layout: KvLayout,
    /// RoPE on K at append, if wanted.
    pub rope: Option<AppendRope<'a>>,
}

fn rows_of<'a>(tensor: &'static str, s: &'a CpuStorage, l: &Layout) -> Result<Rows<'a>> {
    let (dims, st) = dims_strides(tensor, l, 3, "[tokens, num_kv_heads, head_dim]")?;
    Rows::strided(view(tensor, s, l)?, dims[0], dims[1], dims[2], st[0], st[1])
}

impl AppendKvOp<'_> {
    fn run(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        (k, kl): (&CpuStorage, &Layout),
        (v, vl): (&CpuStorage, &Layout),
    ) -> Result<()> {
        let dims = cl.dims();
        let contiguous = cl.is_contiguous();
        if dims.len() != 5 || dims[1] != 2 || !contiguous {
            return Err(Error::TensorShape {
                tensor: "kv_cache",
                expected: format!(
                    "a contiguous combined cache [pages, 2, {}]",
                    match self.layout {
                        KvLayout::Nhd => "page_size, num_kv_heads, head_dim",
                        KvLayout::Hnd => "num_kv_heads, page_size, head_dim",
                    }
                ),
                actual: format!("dims {dims:?}, strides {:?}", cl.stride()),
            });
        }
        let (pages, (ps, hkv), d) = match self.layout {
            KvLayout::Nhd => (dims[0], (dims[2], dims[3]), dims[4]),
            KvLayout::Hnd => (dims[0], (dims[3], dims[2]), dims[4]),
        };
        let (kr, vr) = (rows_of("k", k, kl)?, rows_of("v", v, vl)?);
        let off = cl.start_offset();
        let n = cl.shape().elem_count();
        let range = off..off + n;
        let dst = match cache {
            CpuStorage::F32(c) => c.get_mut(range).map(TensorMut::F32),
            CpuStorage::F16(c) => c.get_mut(range).map(TensorMut::F16),
            CpuStorage::BF16(c) => c.get_mut(range).map(TensorMut::BF16),
            other => {
                return Err(Error::Unsupported {
                    backend: "candle",
                    what: format!("kv_cache of dtype {:?} (f32, f16 or bf16)", other.dtype()),
                });
            }
        }
        .ok_or_else(|| Error::TensorShape {
            tensor: "kv_cache",
            expected: format!("storage holding elements {off}..{}", off + n),
            actual: "a shorter storage".into(),
        })?;
        let cache = KvCacheMut::combined(dst, self.layout, ps, hkv, d, pages);
        crate::ops::append::append_kv(&self.batch, kr, vr, cache, self.rope)
    }
}

impl InplaceOp3 for AppendKvOp<'_> {
    fn name(&self) -> &'static str {
        "flashpage-append-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        self.run(cache, cl, (k, kl), (v, vl)).map_err(wrap)
    }
}

/// Appends new tokens' `k` and `v` (`[tokens, num_kv_heads, head_dim]`, any float dtype,
/// strided views allowed) into `kv_cache`, a contiguous combined paged cache
/// `[pages, 2, page_size, num_kv_heads, head_dim]` (NHD) or
/// `[pages, 2, num_kv_heads, page_size, head_dim]` (HND) on the CPU, in place; with `rope`,
/// K is rotated on the way in. Validated like [`crate::ops::append::append_kv`]: on error
/// nothing is written. Attention reads the K and V halves as views:
/// `kv_cache.narrow(1, 0, 1)?.squeeze(1)?` and `kv_cache.narrow(1, 1, 1)?.squeeze(1)?`.
pub fn append_kv(
    kv_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: AppendBatch<'_>,
    layout: KvLayout,
    rope: Option<AppendRope<'_>>,
) -> candle_core::Result<()> {
    kv_cache.inplace_op3(
        k,
        v,
        &AppendKvOp {
            batch,
            layout,
            rope,
        },
    )
}
