//! # flashpage
//!
//! Attention for LLM serving over a **paged KV cache**: batched decode and prefill, with
//! GQA/MQA, causal masks, sliding windows, logits soft-capping, ALiBi, RoPE, custom scale,
//! LSE output and split-KV merging — behind strict validation and a workspace whose size is
//! known before the first request. K/V may be an FP8 cache (e4m3fn or e5m2 codes with
//! per-tensor or per-head scales: [`TensorRef::Fp8`], [`backend::KvCache::with_scales`],
//! docs/semantics.md) on the CPU backend.
//!
//! ## The one-way flow
//!
//! ```text
//! layout + options  --validate-->  ValidBatch  --plan-->  Plan  --workspace-->  backend.run
//! ```
//!
//! 1. **Describe** the batch ([`BatchDesc`]: [`HeadConfig`], a [`PageTable`] or ragged
//!    offsets, [`AttentionOptions`]); or build the CSR arrays with [`BatchBuilder`].
//! 2. **Plan** once per step on the host ([`Plan::new`], microseconds): every invariant is
//!    checked first ([`validate`]), each violation a typed [`Error`] that names the argument,
//!    the expected and the actual value. The plan is a list of work items
//!    `(request, q tile, KV chunk)` and a merge map, stored as offsets in an int image.
//! 3. **Run** it per layer on a backend ([`backend::cpu::CpuBackend`], or the CUDA backend
//!    with the `cuda` feature), into the caller's workspaces.
//!
//! ## The serving loop
//!
//! For the common path, [`Attention`] (in [`prelude`] with everything it needs) owns plan,
//! workspace and the step's index arrays; [`pages::PageAllocator`] hands out pages and
//! builds each step's CSR arrays; [`ops::append::append_kv`] writes new K/V into the cache
//! and [`ops::rope::apply_rope`] rotates q/k. See [`session`] for the loop, and for the
//! build profile a program using flashpage should set (`opt-level = 3` for flashpage in
//! debug builds: the kernels are ~10x slower unoptimised).
//!
//! ## Strided tensors, and candle
//!
//! q and o may be strided ([`RunStrides`]: a row and a head stride each, so q can be a view
//! into a fused QKV projection and o a view into a wider buffer, whose gaps are never
//! written: `CpuBackend::run_strided`, and `CudaBackend::run_strided` with the `cuda`
//! feature); V may have strides of its own ([`backend::KvCache::with_v_strides`]), so split
//! caches of different layouts need no copy. With the `candle` feature, `flashpage::candle`
//! offers attention and `append_kv` as candle custom ops on candle's CPU storage
//! (docs/candle.md).
//!
//! ## Shared prefixes (cascade)
//!
//! Requests that share prefix pages can run as a [`CascadePlan`]: levels of one batch over
//! the same query rows (the shared pages once for all their sharers, then each request's
//! own), merged by LSE into exactly the flat batch's attention;
//! [`CascadePlan::shared_prefixes`] finds the sharing in a flat paged batch, and
//! `CpuBackend::run_cascade` runs it (docs/cascade.md).
//!
//! ## The workspace contract
//!
//! A plan needs a float workspace (f32 partial states of split-KV items) and an int
//! workspace (its schedule). [`workspace_size`] bounds both for a deployment's
//! limits (max batch, tokens, KV length, heads, graph capacity, parallelism): allocate that
//! once, and every plan within the limits fits — in graph mode the layout never moves, so a
//! captured CUDA graph stays valid across replans. A workspace that is too small is a
//! [`Error::WorkspaceTooSmall`] naming the buffer, the bytes requested and available, and
//! the capacity to allocate instead.
//!
//! ## Example
//!
//! ```
//! use flashpage::*;
//! use flashpage::backend::cpu::CpuBackend;
//! use flashpage::backend::{KvCache, RunArgs};
//!
//! let heads = HeadConfig::new(4, 2, 64)?;
//! let (page_size, num_pages) = (16, 4);
//! let mut batch = BatchBuilder::new(page_size)?;
//! batch.push(1, 20, &[3, 0])?; // request 0: 20 keys in pages 3 and 0
//! batch.push(1, 7, &[2])?;     // request 1: 7 keys in page 2
//!
//! let opts = AttentionOptions::default().with_return_lse(true);
//! let plan = Plan::new(&batch.decode(heads, num_pages), &opts, &PlanConfig::with_parallelism(2))?;
//!
//! let kv_elems = num_pages * page_size * 2 * 64;
//! let k: Vec<f32> = (0..kv_elems).map(|i| (i as f32 * 0.37).sin()).collect();
//! let v: Vec<f32> = (0..kv_elems).map(|i| (i as f32 * 0.11).cos()).collect();
//! let q: Vec<f32> = (0..2 * 4 * 64).map(|i| (i as f32 * 0.05).sin()).collect();
//! let mut o = vec![0f32; 2 * 4 * 64];
//! let mut lse = vec![0f32; 2 * 4];
//!
//! let mut ws = workspace::HostWorkspace::new(plan.requirement().float.total())?;
//! let cpu = CpuBackend::new(2)?;
//! cpu.run(&plan, RunArgs {
//!     q: TensorRef::F32(&q),
//!     kv: KvCache::paged(TensorRef::F32(&k), TensorRef::F32(&v),
//!                        KvStrides::dense(KvLayout::Nhd, page_size, 2, 64), num_pages, batch.kv_indices()),
//!     o: TensorMut::F32(&mut o),
//!     lse: Some(&mut lse),
//!     sinks: None,
//!     custom_mask: None,
//! }, ws.as_bytes_mut())?;
//! assert!(o.iter().all(|x| x.is_finite()));
//! # Ok::<(), flashpage::Error>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod builder;
#[cfg(feature = "candle")]
pub mod candle;
pub mod error;
pub mod fp8;
pub mod layout;
pub mod ops;
pub mod options;
pub mod pages;
pub mod plan;
pub mod prelude;
pub mod session;
pub mod tensor;
pub mod validate;
pub mod workspace;

/// The `half` crate, whose `f16` and `bf16` are the library's 16-bit element types.
pub use half;

pub use builder::BatchBuilder;
pub use error::{Error, ErrorKind, Result};
pub use layout::{
    BatchDesc, CustomMask, DType, HeadConfig, KvIndex, KvLayout, KvStrides, PageTable, QoStrides,
    QueryIndex, RunStrides,
};
pub use options::{AttentionOptions, PosEncoding};
pub use plan::cascade::{CascadeLevel, CascadePlan};
pub use plan::{Plan, PlanConfig, PlanKind, WorkItem, WorkspaceLimits, workspace_size};
pub use session::{Attention, CacheDesc, LayerArgs, Limits};
pub use tensor::{Tensor, TensorMut, TensorRef};

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
