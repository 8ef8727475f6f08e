//! The planner: turns a validated batch into a schedule that every backend executes.
//!
//! A plan is a list of **work items** `(request, q tile, KV chunk)`, each covering all KV
//! heads (a backend runs one `(item, KV head)` pair per thread or thread block), and a
//! **merge map** for query rows whose KV was split into chunks. Items of an unsplit request
//! write `o`/`lse` directly; items of a split request write partial states into the float
//! workspace and the merge step combines them (docs/semantics.md, docs/workspace.md).
//!
//! Query rows are tiled in **packed rows**: within a request, packed row `p` is query row
//! `p / group_size`, head `p % group_size` of every KV head's group. A decode request is one
//! tile (its whole group), so each K/V row is read once for the whole group.
//!
//! The schedule lives in an int image of three arrays (`requests`, `work_items`,
//! `merge_map`) laid out exactly as in the int workspace: a CUDA backend copies it in one
//! transfer, the CPU backend reads it in place. A plan holds offsets only (no pointers), so
//! it is position independent.
//!
//! In **graph mode** (`graph_capacity`) every array has a fixed capacity: the launch shape
//! never changes, padded entries are empty and cost nothing, and [`Plan::replan`] rewrites
//! the image in place. In **deterministic mode** the KV chunk is fixed, so a request's output
//! does not depend on what else is in the batch.

pub mod cascade;
mod config;
mod sizing;
mod split;

pub use config::{
    GraphCapacity, MAX_GRAPH_CAPACITY, MAX_GRAPH_ROWS, MAX_INT_IMAGE_BYTES, MAX_PARALLELISM,
    MAX_WORKSPACE_BYTES, PlanConfig, PlanKind,
};
pub use sizing::WorkspaceLimits;
pub use split::{Capacities, workspace_size};

use crate::error::{Error, Result};
use crate::layout::{BatchDesc, HeadConfig, KvIndex};
use crate::options::AttentionOptions;
use crate::validate::{ValidBatch, check_batch};
use crate::workspace::{AlignedAllocator, BUFFER_ALIGN, Requirement, WorkspaceReq};
use sizing::{MERGE_FIELDS, REQUEST_FIELDS, WORK_FIELDS, carve_float, carve_int};

/// One work item: rows `[row_start, row_end)` (packed) of a request against keys
/// `[kv_start, kv_end)`, for every KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkItem {
    /// Request index.
    pub request: usize,
    /// First packed row (query row × group + head in group) within the request.
    pub row_start: usize,
    /// One past the last packed row.
    pub row_end: usize,
    /// First key (token index within the request).
    pub kv_start: usize,
    /// One past the last key.
    pub kv_end: usize,
    /// `None`: write `o`/`lse` directly. `Some(base)`: write the state of request-local
    /// query row `i` to partial row `base + i`.
    pub partial: Option<usize>,
}

/// One split query row: merge `count` partial rows `first, first + stride, …` into row `row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeRow {
    /// Global query row in `o`.
    pub row: usize,
    /// First partial row.
    pub first: usize,
    /// Number of partial states.
    pub count: usize,
    /// Distance between consecutive partial rows.
    pub stride: usize,
}

/// A request as the backends see it (from the plan's `requests` array).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRequest {
    /// First query row in `q`/`o`.
    pub qo_start: usize,
    /// Query rows.
    pub qo_len: usize,
    /// Paged: offset of the first page id in `kv_indices`; ragged: first token.
    pub kv_start: usize,
    /// Keys.
    pub kv_len: usize,
}

/// A schedule for one batch. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Plan {
    kind: PlanKind,
    heads: HeadConfig,
    options: AttentionOptions,
    config: PlanConfig,
    paged: bool,
    page_size: usize,
    batch_size: usize,
    num_q_rows: usize,
    max_kv_len: usize,
    kv_chunk: usize,
    num_work_items: usize,
    num_merge_rows: usize,
    num_partial_rows: usize,
    caps: Capacities,
    graph: bool,
    int_offsets: [usize; 3],
    image: Vec<i32>,
    req: Requirement,
    /// The limits of [`Plan::new_within`], kept so [`Plan::replan`] enforces them too.
    limits: Option<WorkspaceLimits>,
}

fn to_i32(v: usize, what: &'static str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::LimitExceeded {
        field: what,
        limit: i32::MAX as usize,
        actual: v,
        rule: "plan arrays are int32",
    })
}

impl Plan {
    /// Validates `batch` and `options` and plans them.
    ///
    /// ```
    /// use flashpage::{AttentionOptions, BatchDesc, HeadConfig, PageTable, Plan, PlanConfig};
    /// let heads = HeadConfig::new(32, 8, 128).unwrap();
    /// // Two requests: 63 pages (1000 tokens) and 1 page (5 tokens), page size 16.
    /// let pages = PageTable { page_size: 16, num_pages: 64, indptr: &[0, 63, 64],
    ///                         last_page_len: &[8, 5], num_indices: 64 };
    /// let plan = Plan::new(&BatchDesc::decode(heads, pages), &AttentionOptions::default(),
    ///                      &PlanConfig::with_parallelism(64)).unwrap();
    /// assert_eq!(plan.batch_size(), 2);
    /// // 2 requests cannot fill 64 slots / 8 KV heads = 8 items: the long one is split into
    /// // chunks of 256 keys (the default smallest chunk), 4 + 1 = 5 items.
    /// assert!(plan.split_kv());
    /// assert_eq!((plan.kv_chunk(), plan.num_work_items()), (Some(256), 5));
    /// ```
    pub fn new(
        batch: &BatchDesc<'_>,
        options: &AttentionOptions,
        config: &PlanConfig,
    ) -> Result<Plan> {
        let vb = check_batch(batch, options)?;
        Plan::from_valid(&vb, config)
    }

    /// Plans a batch that was already validated ([`check_batch`]), with the options it was
    /// validated with: the typed path for callers that validate once and then plan, size or
    /// report (the batch is not checked again).
    ///
    /// ```
    /// use flashpage::{AttentionOptions, BatchDesc, HeadConfig, PageTable, Plan, PlanConfig};
    /// use flashpage::validate::check_batch;
    /// let pages = PageTable { page_size: 16, num_pages: 4, indptr: &[0, 2, 3],
    ///                         last_page_len: &[16, 1], num_indices: 3 };
    /// let desc = BatchDesc::decode(HeadConfig::new(8, 2, 64).unwrap(), pages);
    /// let valid = check_batch(&desc, &AttentionOptions::new()).unwrap();
    /// let plan = Plan::from_valid(&valid, &PlanConfig::with_parallelism(4)).unwrap();
    /// assert_eq!((plan.batch_size(), valid.total_kv_len()), (2, 33));
    /// ```
    pub fn from_valid(batch: &ValidBatch<'_>, config: &PlanConfig) -> Result<Plan> {
        let mut plan = Plan::new_empty(batch.desc().heads, batch.options(), config)?;
        plan.build_valid(batch, config, None)?;
        Ok(plan)
    }

    /// A plan of nothing (no allocation), filled by `build`.
    fn new_empty(
        heads: HeadConfig,
        options: &AttentionOptions,
        config: &PlanConfig,
    ) -> Result<Plan> {
        let caps = Capacities {
            requests: 0,
            work_items: 0,
            partial_rows: 0,
            merge_rows: 0,
        };
        Ok(Plan {
            kind: PlanKind::Decode,
            heads,
            options: *options,
            config: *config,
            paged: true,
            page_size: 1,
            batch_size: 0,
            num_q_rows: 0,
            max_kv_len: 0,
            kv_chunk: usize::MAX,
            num_work_items: 0,
            num_merge_rows: 0,
            num_partial_rows: 0,
            caps,
            graph: false,
            int_offsets: [0; 3],
            image: Vec::new(),
            req: caps.requirement(&heads)?,
            limits: None,
        })
    }

    /// Plans `batch` only if it lies within `limits`, so the plan is guaranteed to fit the
    /// workspace sized by [`workspace_size`]`(limits)`. The plan's requirement is checked
    /// against that bound before its schedule is allocated.
    pub fn new_within(
        batch: &BatchDesc<'_>,
        options: &AttentionOptions,
        limits: &WorkspaceLimits,
    ) -> Result<Plan> {
        let (vb, bound) = check_within(batch, options, limits)?;
        let mut plan = Plan::new_empty(batch.heads, options, &limits.config)?;
        plan.build_valid(&vb, &limits.config, Some(&bound))?;
        plan.limits = Some(*limits);
        Ok(plan)
    }

    /// Plans a new batch into this plan, reusing its memory. In graph mode the launch shape
    /// and the int image layout stay fixed and the image is rewritten in place: the batch
    /// must have the captured heads, kind (decode or prefill) and KV layout (paged or
    /// ragged), and fit the capacity. A plan made with [`Plan::new_within`] keeps enforcing
    /// its limits. Any error leaves the plan unchanged.
    pub fn replan(&mut self, batch: &BatchDesc<'_>, options: &AttentionOptions) -> Result<()> {
        let config = self.config;
        if self.graph {
            if batch.heads != self.heads {
                return Err(Error::PlanMismatch {
                    what: "head configuration",
                    expected: format!("{:?}", self.heads),
                    actual: format!("{:?}", batch.heads),
                });
            }
            let kind = if batch.is_decode() {
                PlanKind::Decode
            } else {
                PlanKind::Prefill
            };
            if kind != self.kind {
                return Err(Error::PlanMismatch {
                    what: "batch kind of a graph-mode replan",
                    expected: self.kind.name().into(),
                    actual: kind.name().into(),
                });
            }
            let paged = matches!(batch.kv, KvIndex::Paged(_));
            if paged != self.paged {
                let name = |p: bool| if p { "paged" } else { "ragged" };
                return Err(Error::PlanMismatch {
                    what: "kv layout of a graph-mode replan",
                    expected: name(self.paged).into(),
                    actual: name(paged).into(),
                });
            }
        }
        match self.limits {
            Some(limits) => {
                let (vb, bound) = check_within(batch, options, &limits)?;
                self.build_valid(&vb, &limits.config, Some(&bound))
            }
            None => self.build(batch, options, &config, None),
        }
    }

    /// The limits this plan was made within ([`Plan::new_within`]), which every
    /// [`Plan::replan`] enforces.
    pub fn limits(&self) -> Option<&WorkspaceLimits> {
        self.limits.as_ref()
    }

    fn build(
        &mut self,
        batch: &BatchDesc<'_>,
        options: &AttentionOptions,
        config: &PlanConfig,
        bound: Option<&Requirement>,
    ) -> Result<()> {
        let vb = check_batch(batch, options)?;
        self.build_valid(&vb, config, bound)
    }

    fn build_valid(
        &mut self,
        vb: &ValidBatch<'_>,
        config: &PlanConfig,
        bound: Option<&Requirement>,
    ) -> Result<()> {
        config.validate()?;
        let batch = vb.desc();
        let options = vb.options();
        let kind = if batch.is_decode() {
            PlanKind::Decode
        } else {
            PlanKind::Prefill
        };
        let heads = batch.heads;
        let page_size = vb.page_size();
        if let Some(d) = config.deterministic_chunk
            && d % page_size != 0
        {
            return Err(Error::InvalidOption {
                field: "deterministic_chunk",
                expected: "a multiple of page_size",
                actual: format!("{d} (page_size {page_size})"),
            });
        }
        to_i32(vb.max_kv_len(), "kv_len")?;
        to_i32(vb.num_q_rows(), "query rows")?;
        // Work items store packed rows (query row × group + head) as int32.
        to_i32(
            vb.max_qo_len().saturating_mul(heads.group_size()),
            "packed rows",
        )?;
        let chunk = split::choose_chunk(vb, kind, config, &heads);
        let tile = split::tile_rows(kind, config, &heads);
        let group = heads.group_size();

        // Exact counts (one cheap pass) so a non-graph plan is sized exactly.
        let mut items = 0usize;
        let mut partial = 0usize;
        let mut merges = 0usize;
        // Saturating: absurd inputs saturate and are rejected by the int32 checks below.
        for r in 0..vb.batch_size() {
            let q = vb.request(r);
            let tiles = split::tiles_of(q.qo_len, group, tile);
            let n = split::chunks_of(q.kv_len, chunk);
            items = items.saturating_add(tiles.saturating_mul(n));
            if n > 1 && q.qo_len > 0 {
                partial = partial.saturating_add(q.qo_len.saturating_mul(n));
                merges += q.qo_len;
            }
        }
        to_i32(items, "work items")?;
        to_i32(partial, "partial rows")?;
        let caps = match config.graph() {
            Some(g) => {
                let q_cap = match kind {
                    PlanKind::Decode => g.batch,
                    PlanKind::Prefill => g.q_rows.unwrap_or(g.batch),
                };
                let kv_cap = match (config.deterministic_chunk, g.kv_len) {
                    (Some(_), None) => {
                        return Err(Error::InvalidOption {
                            field: "graph_max_kv_len",
                            expected: "a value: graph mode with a deterministic chunk needs the longest request",
                            actual: "none".into(),
                        });
                    }
                    (_, kv) => kv.unwrap_or(vb.max_kv_len()),
                };
                for (field, actual, limit, rule) in [
                    ("batch_size", vb.batch_size(), g.batch, "graph_capacity"),
                    ("query rows", vb.num_q_rows(), q_cap, "graph_max_q_rows"),
                    ("kv_len", vb.max_kv_len(), kv_cap, "graph_max_kv_len"),
                ] {
                    if actual > limit {
                        return Err(Error::LimitExceeded {
                            field,
                            limit,
                            actual,
                            rule,
                        });
                    }
                }
                let c = Capacities::bound(kind, &heads, config, g.batch, q_cap, kv_cap)?;
                debug_assert!(items <= c.work_items && partial <= c.partial_rows);
                debug_assert!(merges <= c.merge_rows);
                c
            }
            None => Capacities {
                requests: vb.batch_size(),
                work_items: items,
                partial_rows: partial,
                merge_rows: merges,
            },
        };
        to_i32(caps.work_items, "work items")?;

        // Layout (one code path with workspace_size).
        let mut ia = AlignedAllocator::counting(BUFFER_ALIGN);
        let offsets = match carve_int(&mut ia, caps.requests, caps.work_items, caps.merge_rows) {
            Ok(o) if ia.total() <= MAX_INT_IMAGE_BYTES => o,
            other => {
                // `other` is an overflow or a schedule past the limit.
                // Too large a schedule: in graph mode name the capacity that fits.
                if let Some(g) = config.graph() {
                    let fits = largest_graph_capacity(kind, &heads, config, g);
                    if fits > 0 {
                        return Err(Error::LimitExceeded {
                            field: "graph_capacity",
                            limit: fits,
                            actual: g.batch,
                            rule: "largest graph capacity whose schedule fits the 268435456-byte int workspace limit",
                        });
                    }
                }
                other?;
                return Err(Error::LimitExceeded {
                    field: "int workspace bytes",
                    limit: MAX_INT_IMAGE_BYTES,
                    actual: ia.total(),
                    rule: "largest plan schedule",
                });
            }
        };
        let mut fa = AlignedAllocator::counting(BUFFER_ALIGN);
        carve_float(&mut fa, &heads, caps.partial_rows)?;
        let req = Requirement {
            float: WorkspaceReq::from_allocator(&fa),
            int: WorkspaceReq::from_allocator(&ia),
        };
        req.total()?;
        if let Some(b) = bound
            && !req.fits_in(b)
        {
            let (field, limit, actual) = if req.float.total() > b.float.total() {
                ("float workspace bytes", b.float.total(), req.float.total())
            } else {
                ("int workspace bytes", b.int.total(), req.int.total())
            };
            return Err(Error::LimitExceeded {
                field,
                limit,
                actual,
                rule: "workspace_size(limits)",
            });
        }
        let words = ia.total() / 4;

        // Everything checked: commit.
        self.kind = kind;
        self.heads = heads;
        self.options = *options;
        self.config = *config;
        self.paged = matches!(batch.kv, KvIndex::Paged(_));
        self.page_size = page_size;
        self.batch_size = vb.batch_size();
        self.num_q_rows = vb.num_q_rows();
        self.max_kv_len = vb.max_kv_len();
        self.kv_chunk = chunk;
        self.num_work_items = items;
        self.num_partial_rows = partial;
        self.num_merge_rows = merges;
        self.caps = caps;
        self.graph = config.graph_capacity.is_some();
        self.int_offsets = offsets.map(|o| o / 4);
        self.req = req;
        // emit writes every word, so only a change of length needs the allocator.
        self.image.resize(words, 0);
        self.emit(vb, tile, group, chunk);
        Ok(())
    }

    /// Writes every word of the image: the three arrays field by field (entries, then inert
    /// padding up to the capacity) and the alignment gaps between them (zeros), so a replan
    /// leaves no stale word behind and equals a fresh plan.
    fn emit(&mut self, vb: &ValidBatch<'_>, tile: usize, group: usize, chunk: usize) {
        let [ro, wo, mo] = self.int_offsets;
        let (rc, wc, mc) = (
            self.caps.requests,
            self.caps.work_items,
            self.caps.merge_rows,
        );
        let img = &mut self.image[..];
        // Field slices (one bounds check each, not one per store).
        let (head, merge) = img.split_at_mut(mo);
        let (reqs, work) = head.split_at_mut(wo);
        reqs[ro + REQUEST_FIELDS * rc..].fill(0);
        work[WORK_FIELDS * wc..].fill(0);
        merge[MERGE_FIELDS * mc..].fill(0);
        let [r_qo, r_ql, r_kv, r_kl] = fields::<REQUEST_FIELDS>(&mut reqs[ro..], rc);
        let [w_req, w_r0, w_r1, w_k0, w_k1, w_part] = fields::<WORK_FIELDS>(work, wc);
        let [m_row, m_first, m_count, m_stride] = fields::<MERGE_FIELDS>(merge, mc);

        let b = vb.batch_size();
        let mut w = 0usize;
        let mut m = 0usize;
        let mut slot = 0usize;
        // Two passes (requests, then items and merge rows): with a power-of-two capacity the
        // field arrays are 4 KiB apart and map to one L1 set, and ten interleaved store
        // streams thrash it (3× slower at capacity 1024 in one pass).
        for r in 0..b {
            let q = vb.request(r);
            r_qo[r] = q.qo_start as i32;
            r_ql[r] = q.qo_len as i32;
            r_kv[r] = q.kv_start as i32;
            r_kl[r] = q.kv_len as i32;
        }
        for r in 0..b {
            let q = vb.request(r);
            let packed = q.qo_len * group;
            let n = split::chunks_of(q.kv_len, chunk);
            if n == 1 {
                // Unsplit: one item per tile over all keys, written directly.
                let mut row = 0;
                while row < packed {
                    let row_end = (row + tile).min(packed);
                    w_req[w] = r as i32;
                    w_r0[w] = row as i32;
                    w_r1[w] = row_end as i32;
                    w_k0[w] = 0;
                    w_k1[w] = q.kv_len as i32;
                    w_part[w] = -1;
                    w += 1;
                    row = row_end;
                }
                continue;
            }
            let base = slot;
            if q.qo_len > 0 {
                for i in 0..q.qo_len {
                    m_row[m] = (q.qo_start + i) as i32;
                    m_first[m] = (base + i) as i32;
                    m_count[m] = n as i32;
                    m_stride[m] = q.qo_len as i32;
                    m += 1;
                }
                slot += q.qo_len * n;
            }
            let mut row = 0;
            while row < packed {
                let row_end = (row + tile).min(packed);
                for c in 0..n {
                    let kv_start = c.saturating_mul(chunk).min(q.kv_len);
                    let kv_end = kv_start.saturating_add(chunk).min(q.kv_len);
                    w_req[w] = r as i32;
                    w_r0[w] = row as i32;
                    w_r1[w] = row_end as i32;
                    w_k0[w] = kv_start as i32;
                    w_k1[w] = kv_end as i32;
                    w_part[w] = (base + c * q.qo_len) as i32;
                    w += 1;
                }
                row = row_end;
            }
        }
        // Padding: requests are empty, items and merge rows have request/row -1.
        for f in [r_qo, r_ql, r_kv, r_kl] {
            f[b..].fill(0);
        }
        for (i, f) in [w_req, w_r0, w_r1, w_k0, w_k1, w_part]
            .into_iter()
            .enumerate()
        {
            f[w..].fill(if i == 0 || i == 5 { -1 } else { 0 });
        }
        for (i, f) in [m_row, m_first, m_count, m_stride].into_iter().enumerate() {
            f[m..].fill(if i == 0 { -1 } else { 0 });
        }
        debug_assert_eq!(w, self.num_work_items);
        debug_assert_eq!(m, self.num_merge_rows);
        debug_assert_eq!(slot, self.num_partial_rows);
    }

    /// Decode or prefill.
    pub fn kind(&self) -> PlanKind {
        self.kind
    }
    /// Head configuration.
    pub fn heads(&self) -> &HeadConfig {
        &self.heads
    }
    /// Attention options the plan was made for.
    pub fn options(&self) -> &AttentionOptions {
        &self.options
    }

    /// Runs the same schedule with other attention options: a model whose layers differ in
    /// window, soft-cap, scale or LSE (Gemma-2's alternating sliding windows) needs one plan
    /// per step, not one per kind of layer. The planner splits the KV range without looking
    /// at the options, so the schedule is valid for any of them; the new options are
    /// validated, and turning on the causal mask re-checks `qo_len <= kv_len` of every
    /// prefill request. On error the plan is unchanged.
    pub fn set_options(&mut self, options: &AttentionOptions) -> Result<()> {
        options.validate()?;
        if options.causal && self.kind == PlanKind::Prefill {
            for r in 0..self.batch_size {
                let q = self.request_at(r);
                if q.qo_len > q.kv_len {
                    return Err(Error::CausalQueryLongerThanKv {
                        request: r,
                        qo_len: q.qo_len,
                        kv_len: q.kv_len,
                    });
                }
            }
        }
        self.options = *options;
        Ok(())
    }

    /// The planner configuration.
    pub fn config(&self) -> &PlanConfig {
        &self.config
    }
    /// True for a paged KV cache, false for ragged K/V.
    pub fn is_paged(&self) -> bool {
        self.paged
    }
    /// Tokens per page (1 for ragged K/V).
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Requests in the batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
    /// Requests the launch shape is sized for (the graph capacity in graph mode).
    pub fn padded_batch_size(&self) -> usize {
        self.caps.requests
    }
    /// Query rows (rows of `q` and `o`).
    pub fn num_q_rows(&self) -> usize {
        self.num_q_rows
    }
    /// Longest request in keys.
    pub fn max_kv_len(&self) -> usize {
        self.max_kv_len
    }
    /// True when some request's KV is split into chunks.
    pub fn split_kv(&self) -> bool {
        self.num_merge_rows > 0
    }
    /// The KV chunk in tokens, or `None` when the KV is not split.
    pub fn kv_chunk(&self) -> Option<usize> {
        (self.kv_chunk != usize::MAX).then_some(self.kv_chunk)
    }
    /// Work items in this batch.
    pub fn num_work_items(&self) -> usize {
        self.num_work_items
    }
    /// Query rows that need a merge.
    pub fn num_merge_rows(&self) -> usize {
        self.num_merge_rows
    }
    /// Partial rows written to the float workspace.
    pub fn num_partial_rows(&self) -> usize {
        self.num_partial_rows
    }
    /// Array capacities: the launch shape (fixed in graph mode).
    pub fn capacities(&self) -> &Capacities {
        &self.caps
    }
    /// True in graph mode.
    pub fn is_graph(&self) -> bool {
        self.graph
    }
    /// Both workspace requirements, buffer by buffer.
    pub fn requirement(&self) -> &Requirement {
        &self.req
    }
    /// The int image: exactly the bytes the int workspace must hold.
    pub fn int_image(&self) -> &[i32] {
        &self.image
    }
    /// Offsets (in i32 words) of `requests`, `work_items` and `merge_map` in the image.
    pub fn int_offsets(&self) -> [usize; 3] {
        self.int_offsets
    }

    /// Request `r` as planned, for `r <` [`Plan::padded_batch_size`] (padded entries are
    /// empty); `None` past the end.
    #[inline]
    pub fn request(&self, r: usize) -> Option<PlannedRequest> {
        (r < self.caps.requests).then(|| self.request_at(r))
    }

    /// Request `r < capacities().requests`: the backends' accessor, for indices that are in
    /// range by construction of the schedule (a work item's request).
    #[inline]
    pub(crate) fn request_at(&self, r: usize) -> PlannedRequest {
        let (ro, rc) = (self.int_offsets[0], self.caps.requests);
        let g = |f: usize| self.image[ro + f * rc + r] as usize;
        PlannedRequest {
            qo_start: g(0),
            qo_len: g(1),
            kv_start: g(2),
            kv_len: g(3),
        }
    }

    /// Work item `w < capacities().work_items` (not checked against the batch): the
    /// backends' accessor, for indices that are in range by construction of the schedule.
    #[inline]
    pub(crate) fn work_item_at(&self, w: usize) -> WorkItem {
        let (wo, wc) = (self.int_offsets[1], self.caps.work_items);
        let g = |f: usize| self.image[wo + f * wc + w];
        let p = g(5);
        WorkItem {
            request: g(0) as usize,
            row_start: g(1) as usize,
            row_end: g(2) as usize,
            kv_start: g(3) as usize,
            kv_end: g(4) as usize,
            partial: (p >= 0).then_some(p as usize),
        }
    }

    /// Merge row `m < capacities().merge_rows` (not checked against the batch): the
    /// backends' accessor, for indices that are in range by construction of the schedule.
    #[inline]
    pub(crate) fn merge_row_at(&self, m: usize) -> MergeRow {
        let (mo, mc) = (self.int_offsets[2], self.caps.merge_rows);
        let g = |f: usize| self.image[mo + f * mc + m] as usize;
        MergeRow {
            row: g(0),
            first: g(1),
            count: g(2),
            stride: g(3),
        }
    }

    /// Work item `w` for `w <` [`Plan::num_work_items`]; `None` past the end (padded
    /// entries of a graph-mode image are not work items).
    #[inline]
    pub fn work_item(&self, w: usize) -> Option<WorkItem> {
        (w < self.num_work_items).then(|| self.work_item_at(w))
    }

    /// The work items of this batch.
    pub fn work_items(&self) -> impl ExactSizeIterator<Item = WorkItem> + '_ {
        (0..self.num_work_items).map(|w| self.work_item_at(w))
    }

    /// Merge row `m` for `m <` [`Plan::num_merge_rows`]; `None` past the end.
    #[inline]
    pub fn merge_row(&self, m: usize) -> Option<MergeRow> {
        (m < self.num_merge_rows).then(|| self.merge_row_at(m))
    }

    /// The merge map of this batch.
    pub fn merge_rows(&self) -> impl ExactSizeIterator<Item = MergeRow> + '_ {
        (0..self.num_merge_rows).map(|m| self.merge_row_at(m))
    }
}

/// Checks `batch` against `limits` (heads, batch size, query rows, longest request) and
/// returns the validated batch (so it is not validated again to be planned) and the
/// workspace bound every plan within the limits fits.
fn check_within<'a>(
    batch: &BatchDesc<'a>,
    options: &AttentionOptions,
    limits: &WorkspaceLimits,
) -> Result<(ValidBatch<'a>, Requirement)> {
    if batch.heads != limits.heads {
        return Err(Error::PlanMismatch {
            what: "head configuration",
            expected: format!("{:?}", limits.heads),
            actual: format!("{:?}", batch.heads),
        });
    }
    let kind = if batch.is_decode() {
        PlanKind::Decode
    } else {
        PlanKind::Prefill
    };
    if let Some(k) = limits.kind
        && k != kind
    {
        return Err(Error::PlanMismatch {
            what: "plan kind",
            expected: format!("{} (the kind the workspace limits size)", k.name()),
            actual: kind.name().to_string(),
        });
    }
    let vb = check_batch(batch, options)?;
    let checks = [
        ("batch_size", vb.batch_size(), limits.max_batch, "max_batch"),
        (
            "query rows",
            vb.num_q_rows(),
            if batch.is_decode() {
                limits.max_batch
            } else {
                limits.max_q_tokens
            },
            "max_q_tokens",
        ),
        ("kv_len", vb.max_kv_len(), limits.max_kv_len, "max_kv_len"),
    ];
    for (field, actual, limit, rule) in checks {
        if actual > limit {
            return Err(Error::LimitExceeded {
                field,
                limit,
                actual,
                rule,
            });
        }
    }
    Ok((vb, workspace_size(limits)?))
}

/// The largest graph capacity (at most `g.batch`) whose graph-mode schedule fits
/// [`MAX_INT_IMAGE_BYTES`] (0 when none does). Counts only; capacities are monotone in the
/// batch, so a binary search finds it.
fn largest_graph_capacity(
    kind: PlanKind,
    heads: &HeadConfig,
    config: &PlanConfig,
    g: GraphCapacity,
) -> usize {
    let fits = |c: usize| {
        let q = match kind {
            PlanKind::Decode => c,
            PlanKind::Prefill => g.q_rows.unwrap_or(c),
        };
        let kv = g.kv_len.unwrap_or(0);
        Capacities::bound(kind, heads, config, c, q, kv).is_ok_and(|caps| {
            let mut a = AlignedAllocator::counting(BUFFER_ALIGN);
            carve_int(&mut a, caps.requests, caps.work_items, caps.merge_rows).is_ok()
                && a.total() <= MAX_INT_IMAGE_BYTES
        })
    };
    let (mut lo, mut hi) = (0usize, g.batch);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Splits `s` into `N` consecutive field slices of `len` words each.
fn fields<const N: usize>(s: &mut [i32], len: usize) -> [&mut [i32]; N] {
    let mut rest = s;
    std::array::from_fn(|_| {
        let (f, r) = std::mem::take(&mut rest).split_at_mut(len);
        rest = r;
        f
    })
}

#[cfg(test)]
mod tests;
