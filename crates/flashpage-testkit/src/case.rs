//! Test cases as data: a batch shape, options and dtype, materialised with fresh random
//! inputs on a paged cache whose pages are shuffled, run on a backend and compared with the
//! f64 reference. Used by the tests, `flashpage check` and `flashpage bench`.

use crate::mask::PackedMask;
use crate::reference::{self, ReferenceInputs};
use crate::runner::HostRunner;
use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::{KvCache, RunArgs};
use flashpage::builder::BatchBuilder;
use flashpage::error::Result;
use flashpage::layout::{BatchDesc, DType, HeadConfig, KvLayout, KvStrides};
use flashpage::options::AttentionOptions;
use flashpage::plan::cascade::CascadePlan;
use flashpage::plan::{Plan, PlanConfig};
use flashpage::tensor::Tensor;
use flashpage::validate::check_batch;

/// A small, fast, seedable random generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Shuffles a slice in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// KV storage: separate K and V tensors, or one combined `[pages, 2, …]` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvStorage {
    /// Two tensors.
    #[default]
    Separate,
    /// One tensor, K then V in every page.
    Combined,
    /// Contiguous ragged K/V (no pages).
    Ragged,
}

/// An FP8 K/V cache for a case: the format and whether the scales are per KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Spec {
    /// [`DType::E4M3Fn`] or [`DType::E5M2`].
    pub dtype: DType,
    /// One scale per KV head (`true`) or one per tensor.
    pub per_head: bool,
}

/// The shape of a test or benchmark case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSpec {
    /// Name for reports.
    pub name: String,
    /// Heads.
    pub heads: HeadConfig,
    /// Tokens per page.
    pub page_size: usize,
    /// `(qo_len, kv_len)` per request; decode when `decode` is set (qo_len ignored).
    pub requests: Vec<(usize, usize)>,
    /// One query row per request.
    pub decode: bool,
    /// Element type.
    pub dtype: DType,
    /// Cache layout.
    pub layout: KvLayout,
    /// Storage form.
    pub storage: KvStorage,
    /// Options (`return_lse` is forced on: the LSE is always checked).
    pub options: AttentionOptions,
    /// Scale of the random inputs (large values stress the soft-cap).
    pub input_scale: f64,
    /// Attention sinks: random per-head sink logits in `[-3, 5)`, drawn after the inputs.
    pub sinks: bool,
    /// An FP8 K/V cache (q and o keep `dtype`): random scales, and K/V quantised from
    /// random values that reach near the format's largest finite value and into its
    /// subnormals (see [`CaseSpec::materialise`]).
    pub fp8: Option<Fp8Spec>,
    /// A custom mask to draw after the inputs (and the sinks), if any.
    pub custom_mask: Option<MaskSpec>,
}

/// How to draw a case's custom mask ([`PackedMask::random`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskSpec {
    /// Probability that a (query row, key) element is visible (1: all bits set).
    pub density: f64,
    /// `n > 0`: every `n`-th query row of each request sees no key; 0: none.
    pub zero_row_stride: usize,
}

/// A materialised case: inputs on the host, the batch arrays and the cache.
#[derive(Debug, Clone)]
pub struct CaseData {
    /// The spec.
    pub spec: CaseSpec,
    /// The batch arrays.
    pub batch: BatchBuilder,
    /// Ragged K/V offsets (ragged storage only).
    pub ragged_indptr: Vec<i32>,
    /// Pages (ragged: tokens) in the cache.
    pub num_pages: usize,
    /// Queries.
    pub q: Tensor,
    /// K (the combined tensor for combined storage).
    pub k: Tensor,
    /// V (empty for combined storage).
    pub v: Tensor,
    /// Offset of V inside `k` for combined storage.
    pub v_offset: usize,
    /// Strides of K and V.
    pub strides: KvStrides,
    /// Attention sinks `[num_qo_heads]` (when the spec asks for them).
    pub sinks: Option<Vec<f32>>,
    /// The custom mask (when the spec asks for one).
    pub custom_mask: Option<PackedMask>,
    /// The FP8 cache's `(k_scale, v_scale)` (1 or `num_kv_heads` values each).
    pub scales: Option<(Vec<f32>, Vec<f32>)>,
}

/// An input tensor of a case, for [`CaseData::set_row`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Queries.
    Q,
    /// Keys.
    K,
    /// Values.
    V,
}

impl Input {
    /// Parses `"q"`, `"k"` or `"v"`.
    pub fn parse(s: &str) -> Option<Input> {
        match s {
            "q" => Some(Input::Q),
            "k" => Some(Input::K),
            "v" => Some(Input::V),
            _ => None,
        }
    }
}

fn fill_tensor(t: &mut Tensor, start: usize, len: usize, value: f64) {
    use half::{bf16, f16};
    match t {
        Tensor::F32(v) => v[start..start + len].fill(value as f32),
        Tensor::F16(v) => v[start..start + len].fill(f16::from_f64(value)),
        Tensor::BF16(v) => v[start..start + len].fill(bf16::from_f64(value)),
        Tensor::Fp8(f, v) => v[start..start + len].fill(f.encode(value as f32)),
    }
}

/// Result of comparing a run with the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `‖o − ref‖ / ‖ref‖`.
    pub o_error: f64,
    /// `‖lse − ref‖ / ‖ref‖` (infinities must match exactly).
    pub lse_error: f64,
    /// The tolerance for the dtype.
    pub tolerance: f64,
    /// Every output element was written (no poison left).
    pub fully_written: bool,
}

impl Comparison {
    /// True when within tolerance and fully written.
    pub fn passed(&self) -> bool {
        self.fully_written && self.o_error <= self.tolerance && self.lse_error <= self.tolerance
    }
}

impl CaseSpec {
    /// A decode case with `batch` requests of `kv_len` keys.
    pub fn decode(
        name: &str,
        heads: HeadConfig,
        page_size: usize,
        batch: usize,
        kv_len: usize,
        dtype: DType,
    ) -> Self {
        CaseSpec {
            name: name.to_string(),
            heads,
            page_size,
            requests: vec![(1, kv_len); batch],
            decode: true,
            dtype,
            layout: KvLayout::Nhd,
            storage: KvStorage::Separate,
            options: AttentionOptions::default(),
            input_scale: 1.0,
            sinks: false,
            custom_mask: None,
            fp8: None,
        }
    }

    /// Materialises the case with fresh random inputs from `seed`; pages are shuffled.
    pub fn materialise(&self, seed: u64) -> Result<CaseData> {
        let mut rng = Rng::new(seed);
        let (hq, hkv, d) = (
            self.heads.num_qo_heads(),
            self.heads.num_kv_heads(),
            self.heads.head_dim(),
        );
        let ps = if self.storage == KvStorage::Ragged {
            1
        } else {
            self.page_size
        };
        let total_pages: usize = self.requests.iter().map(|r| r.1.div_ceil(ps)).sum();
        let num_pages = total_pages + 1; // one spare page nobody uses
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let mut batch = BatchBuilder::new(self.page_size)?;
        let mut ragged_indptr = vec![0i32];
        let mut next = 0;
        for &(qo, kv) in &self.requests {
            let n = kv.div_ceil(ps);
            let qo = if self.decode { 1 } else { qo };
            if self.storage == KvStorage::Ragged {
                ragged_indptr.push(ragged_indptr.last().unwrap() + kv as i32);
                batch.push(qo, 0, &[])?;
            } else {
                batch.push(qo, kv, &ids[next..next + n])?;
            }
            next += n;
        }
        let rows = if self.decode {
            self.requests.len()
        } else {
            self.requests.iter().map(|r| r.0).sum()
        };
        let s = self.input_scale;
        let mut gen_vec = |n: usize| (0..n).map(|_| rng.uniform() * s).collect::<Vec<f64>>();
        let q = Tensor::from_f64(self.dtype, &gen_vec(rows * hq * d));
        let kv_dtype = self.fp8.map_or(self.dtype, |f| f.dtype);
        let page_elems = ps * hkv * d;
        let (k, v, v_offset, strides) = match self.storage {
            KvStorage::Separate => {
                let st = KvStrides::dense(self.layout, ps, hkv, d);
                (
                    Tensor::from_f64(kv_dtype, &gen_vec(num_pages * page_elems)),
                    Tensor::from_f64(kv_dtype, &gen_vec(num_pages * page_elems)),
                    0,
                    st,
                )
            }
            KvStorage::Combined => {
                let mut st = KvStrides::dense(self.layout, ps, hkv, d);
                st.page *= 2;
                (
                    Tensor::from_f64(kv_dtype, &gen_vec(num_pages * 2 * page_elems)),
                    Tensor::from_f64(kv_dtype, &[]),
                    page_elems,
                    st,
                )
            }
            KvStorage::Ragged => {
                let st = KvStrides::ragged(hkv, d);
                (
                    Tensor::from_f64(kv_dtype, &gen_vec(num_pages * page_elems)),
                    Tensor::from_f64(kv_dtype, &gen_vec(num_pages * page_elems)),
                    0,
                    st,
                )
            }
        };
        // Drawn last, so the other inputs do not depend on whether a case has sinks.
        let sinks = self.sinks.then(|| {
            (0..hq)
                .map(|_| (rng.uniform() * 4.0 + 1.0) as f32)
                .collect()
        });
        let (mut k, mut v) = (k, v);
        let scales = self.fp8.map(|f| {
            let fmt = f.dtype.fp8_format().expect("an fp8 dtype");
            let n = if f.per_head { hkv } else { 1 };
            // Each scale maps the inputs' range (|x| < s) to at most the largest finite
            // code, within a factor 1.25 of it: the largest codes are used.
            let mut scale = || {
                (0..n)
                    .map(|_| (s * (1.125 + 0.125 * rng.uniform()) / fmt.max_finite() as f64) as f32)
                    .collect::<Vec<f32>>()
            };
            let (ks, vs) = (scale(), scale());
            let geo = (num_pages, ps, hkv, d);
            quantise_fp8(&mut k, 0, &strides, geo, &ks, s, &mut rng);
            match self.storage {
                KvStorage::Combined => {
                    quantise_fp8(&mut k, page_elems, &strides, geo, &vs, s, &mut rng)
                }
                _ => quantise_fp8(&mut v, 0, &strides, geo, &vs, s, &mut rng),
            }
            (ks, vs)
        });
        // Drawn after the sinks, for the same reason.
        let custom_mask = self.custom_mask.map(|m| {
            let lens: Vec<(usize, usize)> = self
                .requests
                .iter()
                .map(|&(qo, kv)| (if self.decode { 1 } else { qo }, kv))
                .collect();
            PackedMask::random(&mut rng, &lens, m.density, m.zero_row_stride)
        });
        Ok(CaseData {
            spec: self.clone(),
            sinks,
            custom_mask,
            scales,
            batch,
            ragged_indptr,
            num_pages,
            q,
            k,
            v,
            v_offset,
            strides,
        })
    }
}

impl CaseData {
    /// Options with the LSE on.
    pub fn options(&self) -> AttentionOptions {
        self.spec.options.with_return_lse(true)
    }

    /// The batch description.
    pub fn desc(&self) -> BatchDesc<'_> {
        let h = self.spec.heads;
        match (self.spec.storage, self.spec.decode) {
            (KvStorage::Ragged, _) => {
                BatchDesc::prefill_ragged(h, self.batch.qo_indptr(), &self.ragged_indptr)
            }
            (_, true) => self.batch.decode(h, self.num_pages),
            (_, false) => self.batch.prefill(h, self.num_pages),
        }
    }

    /// Query rows.
    pub fn rows(&self) -> usize {
        self.q.len() / (self.spec.heads.num_qo_heads() * self.spec.heads.head_dim())
    }

    /// The K and V views of the cache (with the FP8 scales of an FP8 case).
    pub fn kv_cache(&self) -> KvCache<'_> {
        let (k, v) = match self.spec.storage {
            KvStorage::Combined => {
                let all = self.k.view();
                (all, slice_from(all, self.v_offset))
            }
            _ => (self.k.view(), self.v.view()),
        };
        let cache = match self.spec.storage {
            KvStorage::Ragged => KvCache::ragged(k, v, self.strides, self.num_pages),
            _ => KvCache::paged(k, v, self.strides, self.num_pages, self.batch.kv_indices()),
        };
        match &self.scales {
            Some((ks, vs)) => cache.with_scales(ks, vs),
            None => cache,
        }
    }

    /// `(k_scale, v_scale)` of KV head `h` (1 without an FP8 cache).
    pub fn kv_scales_of(&self, h: usize) -> (f64, f64) {
        match &self.scales {
            Some((ks, vs)) => {
                let at = |s: &[f32]| s[if s.len() == 1 { 0 } else { h }] as f64;
                (at(ks), at(vs))
            }
            None => (1.0, 1.0),
        }
    }

    /// The dtype of K and V: the spec's dtype, or the FP8 one of an FP8 case.
    pub fn kv_dtype(&self) -> DType {
        self.spec.fp8.map_or(self.spec.dtype, |f| f.dtype)
    }

    /// Bytes of K and V the batch reads (the decode bandwidth numerator).
    pub fn kv_bytes(&self) -> u64 {
        let h = self.spec.heads;
        let toks: usize = self.spec.requests.iter().map(|r| r.1).sum();
        (toks * h.num_kv_heads() * h.head_dim() * 2 * self.kv_dtype().size()) as u64
    }

    /// Plans the case.
    pub fn plan(&self, config: &PlanConfig) -> Result<Plan> {
        Plan::new(&self.desc(), &self.options(), config)
    }

    /// The f64 reference output `(o, lse)`.
    pub fn reference(&self) -> Result<reference::ReferenceOutput> {
        let opts = self.options();
        let vb = check_batch(&self.desc(), &opts)?;
        let q = self.q.view().to_f64_vec();
        let (mut k, mut v) = match self.spec.storage {
            KvStorage::Combined => {
                let all = self.k.view().to_f64_vec();
                let v = all[self.v_offset..].to_vec();
                (all, v)
            }
            _ => (self.k.view().to_f64_vec(), self.v.view().to_f64_vec()),
        };
        if let Some((ks, vs)) = &self.scales {
            // Dequantise exactly: code value times the head's scale (an f64 product of a
            // 4-bit and a 24-bit significand).
            let h = self.spec.heads;
            let ps = if self.spec.storage == KvStorage::Ragged {
                1
            } else {
                self.spec.page_size
            };
            let geo = (self.num_pages, ps, h.num_kv_heads(), h.head_dim());
            for_each_kv_elem(&self.strides, geo, |off, head| {
                let sc = |s: &[f32]| s[if s.len() == 1 { 0 } else { head }] as f64;
                k[off] *= sc(ks);
                if let Some(x) = v.get_mut(off) {
                    *x *= sc(vs);
                }
            });
        }
        let sinks: Option<Vec<f64>> = self
            .sinks
            .as_ref()
            .map(|s| s.iter().map(|&x| x as f64).collect());
        reference::attention(
            &vb,
            &opts,
            &ReferenceInputs {
                q: &q,
                k: &k,
                v: &v,
                strides: self.strides,
                kv_indices: self.batch.kv_indices(),
                sinks: sinks.as_deref(),
                custom_mask: self.custom_mask.as_ref().map(PackedMask::view),
            },
        )
    }

    /// Sets every element of one row of an input to `value` (rounded to the dtype): for
    /// [`Input::Q`] query row `pos` of request `request` (all query heads), for [`Input::K`]
    /// and [`Input::V`] key `pos` of request `request` (all KV heads). Extreme and
    /// non-finite inputs are cases of their own (the suite's `set`).
    pub fn set_row(
        &mut self,
        input: Input,
        request: usize,
        pos: usize,
        value: f64,
    ) -> std::result::Result<(), String> {
        let h = self.spec.heads;
        let (hq, hkv, d) = (h.num_qo_heads(), h.num_kv_heads(), h.head_dim());
        let &(qo, kv) = self
            .spec
            .requests
            .get(request)
            .ok_or_else(|| format!("request {request} does not exist"))?;
        let qo = if self.spec.decode { 1 } else { qo };
        if input == Input::Q {
            if pos >= qo {
                return Err(format!(
                    "request {request} has {qo} query rows, not {}",
                    pos + 1
                ));
            }
            let row = self.batch.qo_indptr()[request] as usize + pos;
            fill_tensor(&mut self.q, row * hq * d, hq * d, value);
            return Ok(());
        }
        if pos >= kv {
            return Err(format!("request {request} has {kv} keys, not {}", pos + 1));
        }
        let base = if self.spec.storage == KvStorage::Ragged {
            (self.ragged_indptr[request] as usize + pos) * self.strides.page
        } else {
            let ps = self.spec.page_size;
            let first = self.batch.kv_indptr()[request] as usize;
            let page = self.batch.kv_indices()[first + pos / ps] as usize;
            page * self.strides.page + (pos % ps) * self.strides.token
        };
        for head in 0..hkv {
            let off = base + head * self.strides.head;
            match (input, self.spec.storage) {
                (Input::V, KvStorage::Combined) => {
                    fill_tensor(&mut self.k, self.v_offset + off, d, value)
                }
                (Input::V, _) => fill_tensor(&mut self.v, off, d, value),
                _ => fill_tensor(&mut self.k, off, d, value),
            }
        }
        Ok(())
    }

    /// Makes adjacent requests share prefix pages (a shared-prefix batch for cascade runs):
    /// `groups[i] = (sharers, pages)` takes the next `sharers` requests, in order, and gives
    /// each of them the first `pages` page ids of the group's first request (at most each
    /// request's page count less its last page, which stays its own). Requests past the
    /// groups keep their pages; pages no request reads any more stay in the cache. Calling
    /// it first with coarse groups, then with finer groups and more pages, nests the sharing
    /// (a prefix tree). K/V data is per page, so the flat batch (and its f64 reference) sees the
    /// shared keys in every sharer.
    ///
    /// # Errors
    /// [`flashpage::Error::InvalidOption`] naming `cascade` for ragged storage or groups
    /// covering more requests than the batch has.
    pub fn share_prefixes(&mut self, groups: &[(usize, usize)]) -> Result<()> {
        let n = self.batch.len();
        let covered: usize = groups.iter().map(|g| g.0).sum();
        if self.spec.storage == KvStorage::Ragged || covered > n {
            return Err(flashpage::Error::InvalidOption {
                field: "cascade",
                expected: "groups of a paged batch's requests (at most its batch size)",
                actual: format!("{covered} requests in groups of a batch of {n}"),
            });
        }
        let (indptr, ids) = (self.batch.kv_indptr(), self.batch.kv_indices());
        let mut pages: Vec<Vec<i32>> = (0..n)
            .map(|r| ids[indptr[r] as usize..indptr[r + 1] as usize].to_vec())
            .collect();
        let mut r = 0;
        for &(sharers, take) in groups {
            let first = pages.get(r).cloned().unwrap_or_default();
            for p in pages.iter_mut().skip(r).take(sharers) {
                let k = take.min(p.len().saturating_sub(1)).min(first.len());
                p[..k].copy_from_slice(&first[..k]);
            }
            r += sharers;
        }
        let mut batch = BatchBuilder::new(self.batch.page_size())?;
        let qo = self.batch.qo_indptr();
        for (i, p) in pages.iter().enumerate() {
            let qo_len = (qo[i + 1] - qo[i]) as usize;
            batch.push(qo_len, self.spec.requests[i].1, p)?;
        }
        self.batch = batch;
        Ok(())
    }

    /// The cascade of the batch as [`CascadePlan::shared_prefixes`] finds it.
    pub fn cascade_plan(&self, config: &PlanConfig) -> Result<CascadePlan> {
        CascadePlan::shared_prefixes(
            self.spec.heads,
            (!self.spec.decode).then(|| self.batch.qo_indptr()),
            self.batch.page_table(self.num_pages),
            self.batch.kv_indices(),
            &self.options(),
            config,
        )
    }

    /// Runs cascade `plan` over the case's inputs on `backend` into fresh poisoned outputs.
    pub fn run_cascade_on(
        &self,
        backend: &dyn HostRunner,
        plan: &CascadePlan,
    ) -> Result<(Tensor, Vec<f32>)> {
        let (mut o, mut lse) = self.poisoned_outputs();
        backend.run_cascade_host(
            plan,
            RunArgs {
                q: self.q.view(),
                kv: KvCache {
                    kv_indices: &[],
                    ..self.kv_cache()
                },
                o: o.view_mut(),
                lse: Some(&mut lse),
                sinks: self.sinks.as_deref(),
                custom_mask: None,
            },
        )?;
        Ok((o, lse))
    }

    /// Poisoned output buffers `(o, lse)` of the right size.
    pub fn poisoned_outputs(&self) -> (Tensor, Vec<f32>) {
        let h = self.spec.heads;
        let rows = self.rows();
        (
            poisoned(self.spec.dtype, rows * h.num_qo_heads() * h.head_dim()),
            vec![f32::NAN; rows * h.num_qo_heads()],
        )
    }

    /// Plans and runs on the CPU backend into fresh poisoned outputs.
    pub fn run_cpu(&self, cpu: &CpuBackend, config: &PlanConfig) -> Result<(Tensor, Vec<f32>)> {
        self.run_on(cpu, config)
    }

    /// Plans and runs on any backend (through host tensors) into fresh poisoned outputs.
    pub fn run_on(
        &self,
        backend: &dyn HostRunner,
        config: &PlanConfig,
    ) -> Result<(Tensor, Vec<f32>)> {
        let plan = self.plan(config)?;
        let (mut o, mut lse) = self.poisoned_outputs();
        backend.run_host(
            &plan,
            RunArgs {
                q: self.q.view(),
                kv: self.kv_cache(),
                o: o.view_mut(),
                lse: Some(&mut lse),
                sinks: self.sinks.as_deref(),
                custom_mask: self.custom_mask.as_ref().map(PackedMask::view),
            },
        )?;
        Ok((o, lse))
    }

    /// `(o error, lse error)` of one run's outputs against another's (e.g. a GPU run against
    /// the CPU backend), relative to the second, as [`reference::rel_error`] measures them.
    pub fn output_difference(
        o: &Tensor,
        lse: &[f32],
        base_o: &Tensor,
        base_lse: &[f32],
    ) -> (f64, f64) {
        let widen = |l: &[f32]| l.iter().map(|&x| x as f64).collect::<Vec<_>>();
        (
            reference::rel_error(&o.view().to_f64_vec(), &base_o.view().to_f64_vec()),
            reference::rel_error(&widen(lse), &widen(base_lse)),
        )
    }

    /// Compares outputs with a reference.
    pub fn compare(&self, o: &Tensor, lse: &[f32], r: &reference::ReferenceOutput) -> Comparison {
        let ov = o.view().to_f64_vec();
        let lv: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
        // The kernels' LSE is f32: the best it can be is the reference rounded to f32 (an
        // LSE past the f32 range, from extreme logits, is an infinity).
        let rl: Vec<f64> = r.lse.iter().map(|&x| x as f32 as f64).collect();
        let fully_written = ov.iter().all(|x| !x.is_nan()) && lv.iter().all(|x| !x.is_nan());
        Comparison {
            o_error: reference::rel_error_stored(&ov, &r.o, self.spec.dtype),
            lse_error: reference::rel_error(&lv, &rl),
            tolerance: reference::tolerance(self.spec.dtype),
            fully_written,
        }
    }
}

fn slice_from(t: flashpage::tensor::TensorRef<'_>, off: usize) -> flashpage::tensor::TensorRef<'_> {
    use flashpage::tensor::TensorRef;
    match t {
        TensorRef::F32(s) => TensorRef::F32(&s[off..]),
        TensorRef::F16(s) => TensorRef::F16(&s[off..]),
        TensorRef::BF16(s) => TensorRef::BF16(&s[off..]),
        TensorRef::Fp8(f, s) => TensorRef::Fp8(f, &s[off..]),
    }
}

/// Calls `f(offset, head)` for every element of a cache of `(pages, page_size, heads,
/// head_dim)` with `strides` (offsets from the tensor's start; in bounds of the tensor).
fn for_each_kv_elem(
    strides: &KvStrides,
    (pages, ps, hkv, d): (usize, usize, usize, usize),
    mut f: impl FnMut(usize, usize),
) {
    for p in 0..pages {
        for t in 0..ps {
            for h in 0..hkv {
                let base = p * strides.page + t * strides.token + h * strides.head;
                for c in 0..d {
                    f(base + c, h);
                }
            }
        }
    }
}

/// Quantises fresh random values into the FP8 cache tensor `t` (from element `base`): each
/// element becomes `encode(x / scale[head])`, where `x` is uniform in `[-s, s)` for 7
/// elements in 8 and, for the eighth, of magnitude below 4 times the format's smallest
/// normal times the scale (codes in the subnormal range and around the smallest normals).
#[allow(clippy::too_many_arguments)]
fn quantise_fp8(
    t: &mut Tensor,
    base: usize,
    strides: &KvStrides,
    geo: (usize, usize, usize, usize),
    scale: &[f32],
    s: f64,
    rng: &mut Rng,
) {
    let Tensor::Fp8(fmt, codes) = t else {
        return;
    };
    let fmt = *fmt;
    // The smallest normal: 2^-6 (E4M3Fn) or 2^-14 (E5M2).
    let min_normal = match fmt {
        flashpage::fp8::Fp8Format::E4M3Fn => 2f64.powi(-6),
        flashpage::fp8::Fp8Format::E5M2 => 2f64.powi(-14),
    };
    for_each_kv_elem(strides, geo, |off, h| {
        let sc = scale[if scale.len() == 1 { 0 } else { h }];
        let x = if rng.below(8) == 0 {
            rng.uniform() * 4.0 * min_normal * sc as f64
        } else {
            rng.uniform() * s
        };
        codes[base + off] = fmt.encode((x / sc as f64) as f32);
    });
}

/// `len` NaNs of `dtype`: an output buffer whose every element must be written (NaN never
/// compares equal, so an element a kernel skipped fails every comparison).
pub fn poisoned(dtype: DType, len: usize) -> Tensor {
    use half::{bf16, f16};
    match dtype {
        DType::F32 => Tensor::F32(vec![f32::NAN; len]),
        DType::F16 => Tensor::F16(vec![f16::NAN; len]),
        DType::BF16 => Tensor::BF16(vec![bf16::NAN; len]),
        DType::E4M3Fn | DType::E5M2 => {
            let f = dtype.fp8_format().expect("an fp8 dtype");
            Tensor::Fp8(f, vec![f.encode(f32::NAN); len])
        }
    }
}
