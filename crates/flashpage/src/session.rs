//! [`Attention`]: the common path in one object — built once from the heads, the cache and
//! the deployment's limits, it owns the plan, the workspace and the step's index arrays;
//! `plan` once per step, `append` and `run` once per layer.
//!
//! Underneath it is the explicit flow (validate → [`Plan::new_within`] →
//! [`HostWorkspace`] sized by [`workspace_size`] → [`CpuBackend`]), which stays available
//! for everything the wrapper does not cover.
//!
#![doc = include_str!("../../../docs/serving.md")]

use crate::backend::cpu::CpuBackend;
use crate::backend::{KvCache, RunArgs};
use crate::builder::BatchBuilder;
use crate::error::{Error, Result};
use crate::layout::{BatchDesc, DType, HeadConfig, KvLayout, KvStrides};
use crate::ops::Rows;
use crate::ops::append::{AppendBatch, AppendRope, KvCacheMut, append_kv};
use crate::options::AttentionOptions;
use crate::plan::{Plan, PlanKind, WorkspaceLimits, workspace_size};
use crate::tensor::{TensorMut, TensorRef};
use crate::workspace::HostWorkspace;

/// The paged KV cache of one layer, as the wrapper addresses it: K and V each
/// `[num_pages, page_size, num_kv_heads, head_dim]` (NHD) or `[num_pages, num_kv_heads,
/// page_size, head_dim]` (HND).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheDesc {
    /// Tokens per page.
    pub page_size: usize,
    /// Pages in the cache.
    pub num_pages: usize,
    /// Memory order of a page.
    pub layout: KvLayout,
    /// Element type of the cache (and of q and o).
    pub dtype: DType,
}

impl CacheDesc {
    /// A cache of `num_pages` pages of `page_size` tokens in `layout`, elements `dtype`.
    pub fn new(page_size: usize, num_pages: usize, layout: KvLayout, dtype: DType) -> Self {
        CacheDesc {
            page_size,
            num_pages,
            layout,
            dtype,
        }
    }
}

/// The largest step the wrapper will plan: the workspace is sized for it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most requests in a step.
    pub max_batch: usize,
    /// Most query rows (new tokens) in a step.
    pub max_q_tokens: usize,
    /// Longest request in tokens.
    pub max_kv_len: usize,
}

impl Limits {
    /// At most `max_batch` requests and `max_q_tokens` new tokens a step, requests of at
    /// most `max_kv_len` tokens.
    pub fn new(max_batch: usize, max_q_tokens: usize, max_kv_len: usize) -> Self {
        Limits {
            max_batch,
            max_q_tokens,
            max_kv_len,
        }
    }
}

/// The tensors of one layer: q and o `[rows, num_qo_heads, head_dim]` and this layer's cache.
#[derive(Debug)]
pub struct LayerArgs<'a> {
    /// Queries.
    pub q: TensorRef<'a>,
    /// The layer's K cache.
    pub k_cache: TensorRef<'a>,
    /// The layer's V cache.
    pub v_cache: TensorRef<'a>,
    /// Output.
    pub o: TensorMut<'a>,
    /// Log-sum-exp `[rows, num_qo_heads]`, when the options ask for it.
    pub lse: Option<&'a mut [f32]>,
}

impl<'a> LayerArgs<'a> {
    /// A layer's q, caches and o, without the LSE.
    pub fn new(
        q: TensorRef<'a>,
        k_cache: TensorRef<'a>,
        v_cache: TensorRef<'a>,
        o: TensorMut<'a>,
    ) -> Self {
        LayerArgs {
            q,
            k_cache,
            v_cache,
            o,
            lse: None,
        }
    }
}

/// Batched paged attention in one object. See the [module docs](self) for the loop.
pub struct Attention {
    heads: HeadConfig,
    cache: CacheDesc,
    limits: WorkspaceLimits,
    backend: CpuBackend,
    workspace: HostWorkspace,
    /// The step's CSR arrays: what was planned is what runs and what appends.
    batch: BatchBuilder,
    plan: Option<Plan>,
}

impl std::fmt::Debug for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attention")
            .field("heads", &self.heads)
            .field("cache", &self.cache)
            .field("limits", &self.limits)
            .field("workspace_bytes", &self.workspace.len())
            .field("batch", &self.batch)
            .field(
                "plan",
                &self.plan.as_ref().map(|p| (p.kind(), p.batch_size())),
            )
            .finish()
    }
}

impl Attention {
    /// Builds the wrapper on the CPU backend with `threads` threads: checks the cache
    /// description and sizes the workspace for `limits` (allocated here, once).
    pub fn new(
        heads: HeadConfig,
        cache: CacheDesc,
        limits: Limits,
        threads: usize,
    ) -> Result<Self> {
        let backend = CpuBackend::new(threads)?;
        let batch = BatchBuilder::new(cache.page_size)?;
        if cache.num_pages == 0 || cache.num_pages > i32::MAX as usize {
            return Err(Error::InvalidOption {
                field: "num_pages",
                expected: "1..=2147483647",
                actual: cache.num_pages.to_string(),
            });
        }
        let limits = WorkspaceLimits::new(
            heads,
            cache.dtype,
            limits.max_batch,
            limits.max_q_tokens,
            limits.max_kv_len,
            backend.threads(),
        );
        let req = workspace_size(&limits)?;
        Ok(Attention {
            heads,
            cache,
            limits,
            workspace: HostWorkspace::new(req.float.total())?,
            backend,
            batch,
            plan: None,
        })
    }

    /// The head configuration.
    pub fn heads(&self) -> &HeadConfig {
        &self.heads
    }
    /// The cache description.
    pub fn cache(&self) -> &CacheDesc {
        &self.cache
    }
    /// The current plan (after [`Attention::plan`]).
    pub fn current_plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }
    /// The step's CSR arrays (after [`Attention::plan`]).
    pub fn batch(&self) -> &BatchBuilder {
        &self.batch
    }
    /// The planned step as a batch description (decode or prefill, as planned), e.g. to
    /// run a reference on it.
    pub fn batch_desc(&self) -> Result<BatchDesc<'_>> {
        let plan = self.planned()?;
        Ok(match plan.kind() {
            PlanKind::Decode => self.batch.decode(self.heads, self.cache.num_pages),
            PlanKind::Prefill => self.batch.prefill(self.heads, self.cache.num_pages),
        })
    }

    /// Elements of one layer's K (or V) cache.
    pub fn cache_elems(&self) -> usize {
        self.cache.num_pages
            * self.cache.page_size
            * self.heads.num_kv_heads()
            * self.heads.head_dim()
    }
    fn strides(&self) -> KvStrides {
        KvStrides::dense(
            self.cache.layout,
            self.cache.page_size,
            self.heads.num_kv_heads(),
            self.heads.head_dim(),
        )
    }

    /// Plans a step: `batch` holds every request's query rows (the tokens appended this
    /// step) and all its pages after the append (e.g. from
    /// [`PageAllocator::batch`](crate::pages::PageAllocator::batch)). A step where every
    /// request has one row is planned as decode, otherwise as prefill. The arrays are copied:
    /// the appends and runs of this step use exactly these page ids. A step beyond the
    /// limits is an error and keeps the previous plan.
    pub fn plan(&mut self, batch: &BatchBuilder, options: &AttentionOptions) -> Result<()> {
        if batch.page_size() != self.cache.page_size {
            return Err(Error::PlanMismatch {
                what: "page_size",
                expected: self.cache.page_size.to_string(),
                actual: batch.page_size().to_string(),
            });
        }
        let decode = batch.qo_indptr().windows(2).all(|w| w[1] - w[0] == 1);
        let desc = if decode {
            batch.decode(self.heads, self.cache.num_pages)
        } else {
            batch.prefill(self.heads, self.cache.num_pages)
        };
        crate::validate::check_page_ids(
            batch.kv_indptr(),
            batch.kv_indices(),
            self.cache.num_pages,
        )?;
        match &mut self.plan {
            Some(p) => p.replan(&desc, options)?,
            None => self.plan = Some(Plan::new_within(&desc, options, &self.limits)?),
        }
        self.batch.clone_from(batch);
        Ok(())
    }

    fn planned(&self) -> Result<&Plan> {
        self.plan.as_ref().ok_or(Error::PlanMismatch {
            what: "plan",
            expected: "a step planned with Attention::plan".into(),
            actual: "none".into(),
        })
    }

    /// Writes this step's new K/V rows (`[rows, num_kv_heads, head_dim]`, any dtype, any
    /// strides) into one layer's cache, at the positions the planned step gives them,
    /// rotating K by `rope` when given.
    pub fn append(
        &self,
        k: Rows<'_>,
        v: Rows<'_>,
        k_cache: TensorMut<'_>,
        v_cache: TensorMut<'_>,
        rope: Option<AppendRope<'_>>,
    ) -> Result<()> {
        self.planned()?;
        for (tensor, rows) in [("k", &k), ("v", &v)] {
            if (rows.heads(), rows.head_dim()) != (self.heads.num_kv_heads(), self.heads.head_dim())
            {
                return Err(Error::TensorShape {
                    tensor,
                    expected: format!(
                        "{} heads x {}",
                        self.heads.num_kv_heads(),
                        self.heads.head_dim()
                    ),
                    actual: format!("{} heads x {}", rows.heads(), rows.head_dim()),
                });
            }
        }
        for (tensor, t) in [("k_cache", k_cache.dtype()), ("v_cache", v_cache.dtype())] {
            if t != self.cache.dtype {
                return Err(Error::DTypeMismatch {
                    tensor,
                    expected: self.cache.dtype.name(),
                    actual: t.name(),
                });
            }
        }
        let cache = KvCacheMut::split(
            k_cache,
            v_cache,
            self.strides(),
            self.cache.page_size,
            self.cache.num_pages,
        );
        append_kv(&AppendBatch::from_builder(&self.batch), k, v, cache, rope)
    }

    /// Runs one layer with the options of the step's plan.
    pub fn run(&mut self, layer: LayerArgs<'_>) -> Result<()> {
        let options = *self.planned()?.options();
        self.run_with(&options, layer)
    }

    /// Runs one layer with its own options on the step's schedule (Gemma-2's alternating
    /// sliding window, a per-layer soft-cap): no second plan (see [`Plan::set_options`]).
    pub fn run_with(&mut self, options: &AttentionOptions, layer: LayerArgs<'_>) -> Result<()> {
        let strides = self.strides();
        let Some(plan) = self.plan.as_mut() else {
            return Err(Error::PlanMismatch {
                what: "plan",
                expected: "a step planned with Attention::plan".into(),
                actual: "none".into(),
            });
        };
        if plan.options() != options {
            plan.set_options(options)?;
        }
        for (tensor, t) in [("q", layer.q.dtype()), ("k_cache", layer.k_cache.dtype())] {
            if t != self.cache.dtype {
                return Err(Error::DTypeMismatch {
                    tensor,
                    expected: self.cache.dtype.name(),
                    actual: t.name(),
                });
            }
        }
        let args = RunArgs {
            q: layer.q,
            kv: KvCache::paged(
                layer.k_cache,
                layer.v_cache,
                strides,
                self.cache.num_pages,
                self.batch.kv_indices(),
            ),
            o: layer.o,
            lse: layer.lse,
            sinks: None,
            custom_mask: None,
        };
        self.backend.run(plan, args, self.workspace.as_bytes_mut())
    }
}
