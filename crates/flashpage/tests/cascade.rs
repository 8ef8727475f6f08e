//! Cascade (shared-prefix) attention on the CPU backend: the cascade of a batch whose
//! requests share prefix pages equals the flat batch (f64 reference, every SIMD level, decode
//! and prefill, causal, soft-cap, sinks), reads each shared page once per level request, and
//! every malformed input is a named error.

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::backend::{KvCache, RunArgs};
use flashpage::validate::check_batch;
use flashpage::workspace::HostWorkspace;
use flashpage::*;
use flashpage_testkit::case::{Rng, poisoned};
use flashpage_testkit::reference::{self, ReferenceInputs, rel_error, tolerance};
use proptest::prelude::*;

/// A flat paged batch whose adjacent requests share prefix pages, with random inputs.
struct Shared {
    heads: HeadConfig,
    batch: BatchBuilder,
    num_pages: usize,
    decode: bool,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    strides: KvStrides,
    sinks: Option<Vec<f32>>,
}

impl Shared {
    /// `groups[i] = (sharers, prefix pages)`; each sharer adds 1..=3 own pages. Prefill rows
    /// are at most the request's own keys (so causal holds).
    fn new(seed: u64, groups: &[(usize, usize)], decode: bool, dtype: DType, sinks: bool) -> Self {
        let mut rng = Rng::new(seed);
        let heads = HeadConfig::new(8, 2, 64).unwrap();
        let ps = 16;
        let mut next = 0i32;
        let mut alloc = |n: usize| {
            let p: Vec<i32> = (next..next + n as i32).collect();
            next += n as i32;
            p
        };
        let mut reqs = Vec::new();
        for &(sharers, prefix) in groups {
            let shared = alloc(prefix);
            for _ in 0..sharers {
                let own = 1 + rng.below(3);
                let mut pages = shared.clone();
                pages.extend(alloc(own));
                let kv_len = (prefix + own - 1) * ps + 1 + rng.below(ps);
                let qo = if decode {
                    1
                } else {
                    1 + rng.below(kv_len.min(2 * ps))
                };
                reqs.push((qo, kv_len, pages));
            }
        }
        // Shuffle page ids (a permutation of the cache) so levels read scattered pages.
        let num_pages = next as usize + 3;
        let mut perm: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut perm);
        let mut batch = BatchBuilder::new(ps).unwrap();
        for (qo, kv, pages) in &reqs {
            let ids: Vec<i32> = pages.iter().map(|&p| perm[p as usize]).collect();
            batch.push(*qo, *kv, &ids).unwrap();
        }
        let (hq, hkv, d) = (8, 2, 64);
        let rows = *batch.qo_indptr().last().unwrap() as usize;
        let rows = if decode { reqs.len() } else { rows };
        let mut fill =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect() };
        let q = Tensor::from_f64(dtype, &fill(rows * hq * d));
        let kv_elems = num_pages * ps * hkv * d;
        let k = Tensor::from_f64(dtype, &fill(kv_elems));
        let v = Tensor::from_f64(dtype, &fill(kv_elems));
        let sinks = sinks.then(|| {
            (0..hq)
                .map(|_| (rng.uniform() * 8.0 - 3.0) as f32)
                .collect()
        });
        Shared {
            heads,
            batch,
            num_pages,
            decode,
            q,
            k,
            v,
            strides: KvStrides::dense(KvLayout::Nhd, ps, hkv, d),
            sinks,
        }
    }

    /// Keys of flat request `r`.
    fn desc_kv_len(&self, r: usize) -> usize {
        let vb = check_batch(&self.desc(), &AttentionOptions::default()).unwrap();
        vb.request(r).kv_len
    }

    fn desc(&self) -> BatchDesc<'_> {
        if self.decode {
            self.batch.decode(self.heads, self.num_pages)
        } else {
            self.batch.prefill(self.heads, self.num_pages)
        }
    }

    fn cascade(&self, opts: &AttentionOptions) -> Result<CascadePlan> {
        CascadePlan::shared_prefixes(
            self.heads,
            (!self.decode).then(|| self.batch.qo_indptr()),
            self.batch.page_table(self.num_pages),
            self.batch.kv_indices(),
            opts,
            &PlanConfig::with_parallelism(4),
        )
    }

    fn reference(&self, opts: &AttentionOptions) -> reference::ReferenceOutput {
        let opts = opts.with_return_lse(true);
        let vb = check_batch(&self.desc(), &opts).unwrap();
        let sinks: Option<Vec<f64>> = self
            .sinks
            .as_ref()
            .map(|s| s.iter().map(|&x| x as f64).collect());
        reference::attention(
            &vb,
            &opts,
            &ReferenceInputs {
                q: &self.q.view().to_f64_vec(),
                k: &self.k.view().to_f64_vec(),
                v: &self.v.view().to_f64_vec(),
                strides: self.strides,
                kv_indices: self.batch.kv_indices(),
                sinks: sinks.as_deref(),
                custom_mask: None,
            },
        )
        .unwrap()
    }

    fn kv(&self) -> KvCache<'_> {
        KvCache::paged(
            self.k.view(),
            self.v.view(),
            self.strides,
            self.num_pages,
            &[],
        )
    }

    fn run(&self, cpu: &CpuBackend, plan: &CascadePlan) -> Result<(Tensor, Vec<f32>)> {
        let hq = self.heads.num_qo_heads();
        let mut o = poisoned(self.q.dtype(), self.q.len());
        let mut lse = vec![f32::NAN; self.q.len() / self.heads.head_dim()];
        assert_eq!(lse.len() % hq, 0);
        let need = plan.float_requirement(self.q.dtype())?.total();
        let mut ws = HostWorkspace::new(need)?;
        cpu.run_cascade(
            plan,
            RunArgs {
                q: self.q.view(),
                kv: self.kv(),
                o: o.view_mut(),
                lse: Some(&mut lse),
                sinks: self.sinks.as_deref(),
                custom_mask: None,
            },
            ws.as_bytes_mut(),
        )?;
        Ok((o, lse))
    }
}

fn check(s: &Shared, cpu: &CpuBackend, opts: &AttentionOptions, what: &str) {
    let plan = s.cascade(opts).unwrap();
    let (o, lse) = s.run(cpu, &plan).unwrap();
    let r = s.reference(opts);
    let ov = o.view().to_f64_vec();
    assert!(
        ov.iter().all(|x| x.is_finite()),
        "{what}: o not fully written"
    );
    let lv: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    let rl: Vec<f64> = r.lse.iter().map(|&x| x as f32 as f64).collect();
    let tol = tolerance(s.q.dtype());
    let (eo, el) = (rel_error(&ov, &r.o), rel_error(&lv, &rl));
    assert!(
        eo <= tol && el <= tol,
        "{what}: o error {eo:.2e}, lse error {el:.2e} > {tol:.1e}"
    );
}

#[test]
fn cascade_equals_the_flat_batch_at_every_level() {
    let groups = [(3, 4), (1, 2), (2, 2), (4, 1)];
    for level in SimdLevel::available() {
        let cpu = CpuBackend::with_simd(2, level).unwrap();
        for (seed, dtype) in [(1, DType::F32), (2, DType::BF16), (3, DType::F16)] {
            for decode in [true, false] {
                let s = Shared::new(seed, &groups, decode, dtype, false);
                let opts = AttentionOptions::default().with_causal(!decode);
                check(
                    &s,
                    &cpu,
                    &opts,
                    &format!("{level:?} {dtype:?} decode={decode}"),
                );
            }
        }
    }
}

#[test]
fn options_and_sinks_apply_once() {
    let cpu = CpuBackend::new(2).unwrap();
    let s = Shared::new(7, &[(5, 3), (2, 1)], false, DType::F32, true);
    let opts = AttentionOptions::default()
        .with_causal(true)
        .with_logits_soft_cap(Some(5.0))
        .with_sm_scale(Some(0.3));
    check(&s, &cpu, &opts, "soft-cap, scale, sinks");
    let s = Shared::new(8, &[(6, 2)], true, DType::BF16, true);
    check(&s, &cpu, &AttentionOptions::default(), "decode sinks");
}

#[test]
fn shared_pages_are_referenced_once_per_group() {
    let s = Shared::new(3, &[(64, 8)], true, DType::F32, false);
    let plan = s.cascade(&AttentionOptions::default()).unwrap();
    let flat = s.batch.kv_indices().len();
    // 64 requests × (8 shared + own) pages flat; the cascade references the 8 once.
    assert_eq!(plan.num_levels(), 2);
    assert_eq!(plan.pages_referenced(), flat - 63 * 8);
    assert_eq!(plan.level_kv_indices(0).unwrap().len(), 8);
}

#[test]
fn malformed_cascades_are_named_errors() {
    let cpu = CpuBackend::new(1).unwrap();
    let s = Shared::new(4, &[(2, 2)], true, DType::F32, false);
    let opts = AttentionOptions::default();
    let window = opts.with_window_left(Some(8));
    let e = s.cascade(&window).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                field: "window_left",
                ..
            }
        ),
        "{e}"
    );
    let alibi = opts.with_pos_encoding(PosEncoding::Alibi);
    let e = s.cascade(&alibi).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                field: "pos_encoding",
                ..
            }
        ),
        "{e}"
    );

    let heads = s.heads;
    let e =
        CascadePlan::new(heads, 16, 4, &[], &opts, &PlanConfig::with_parallelism(2)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                field: "levels",
                ..
            }
        ),
        "{e}"
    );
    // Level 1 covers 3 rows, level 0 two.
    let l0 = CascadeLevel {
        qo_indptr: &[0, 2],
        kv_indptr: &[0, 1],
        kv_indices: &[0],
        last_page_len: &[16],
    };
    let l1 = CascadeLevel {
        qo_indptr: &[0, 1, 3],
        kv_indptr: &[0, 1, 2],
        kv_indices: &[1, 2],
        last_page_len: &[3, 4],
    };
    let e = CascadePlan::new(
        heads,
        16,
        4,
        &[l0, l1],
        &opts,
        &PlanConfig::with_parallelism(2),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::QueryRows {
                tensor: "qo_indptr",
                expected: 2,
                actual: 3,
                ..
            }
        ),
        "{e}"
    );
    // A page id past the cache.
    let bad = CascadeLevel {
        kv_indices: &[9],
        ..l0
    };
    let e = CascadePlan::new(
        heads,
        16,
        4,
        &[bad],
        &opts,
        &PlanConfig::with_parallelism(2),
    )
    .unwrap_err();
    assert!(matches!(e, Error::PageIdOutOfRange { .. }), "{e}");

    // Run arguments: page ids given, o of another length or dtype, a small workspace.
    let plan = s.cascade(&opts).unwrap();
    let need = plan.float_requirement(DType::F32).unwrap().total();
    let mut ws = HostWorkspace::new(need).unwrap();
    let mut o = vec![7.0f32; s.q.len()];
    let ids = [0i32];
    let kv_ids = KvCache::paged(s.k.view(), s.v.view(), s.strides, s.num_pages, &ids);
    fn args<'a, 'o>(s: &'a Shared, kv: KvCache<'a>, o: &'o mut [f32]) -> RunArgs<'a, 'o> {
        RunArgs {
            q: s.q.view(),
            kv,
            o: TensorMut::F32(o),
            lse: None,
            sinks: None,
            custom_mask: None,
        }
    }
    let e = cpu
        .run_cascade(&plan, args(&s, kv_ids, &mut o), ws.as_bytes_mut())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TensorShape {
                tensor: "kv_indices",
                ..
            }
        ),
        "{e}"
    );
    let mut short = vec![7.0f32; s.q.len() - 1];
    let e = cpu
        .run_cascade(&plan, args(&s, s.kv(), &mut short), ws.as_bytes_mut())
        .unwrap_err();
    assert!(matches!(e, Error::TensorShape { tensor: "o", .. }), "{e}");
    let e = cpu
        .run_cascade(
            &plan,
            args(&s, s.kv(), &mut o),
            &mut ws.as_bytes_mut()[..need - 1],
        )
        .unwrap_err();
    assert!(matches!(e, Error::WorkspaceTooSmall { .. }), "{e}");
    let mut o16 = vec![half::f16::ZERO; s.q.len()];
    let e = cpu
        .run_cascade(
            &plan,
            RunArgs {
                q: s.q.view(),
                kv: s.kv(),
                o: TensorMut::F16(&mut o16),
                lse: None,
                sinks: None,
                custom_mask: None,
            },
            ws.as_bytes_mut(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { tensor: "o", .. }), "{e}");
    // A custom mask indexes the flat batch's keys: refused by name.
    let (bits, indptr) = ([0xffu8; 64], [0i32, 8, 16]);
    let mut masked = args(&s, s.kv(), &mut o);
    masked.custom_mask = Some(CustomMask {
        bits: &bits,
        indptr: &indptr,
    });
    let e = cpu
        .run_cascade(&plan, masked, ws.as_bytes_mut())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                field: "custom_mask",
                ..
            }
        ),
        "{e}"
    );
    // Nothing was written by a refused run.
    assert!(o.iter().all(|&x| x == 7.0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Every (request, row, key) of the flat batch is covered exactly once across the levels:
    /// each row's keys at level 0 then level 1 are its request's pages in order, and a page
    /// shared by a run of requests appears once at level 0.
    #[test]
    fn levels_cover_every_key_once(
        groups in prop::collection::vec((1usize..5, 0usize..4), 1..6),
        decode in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let s = Shared::new(seed, &groups, decode, DType::F32, false);
        let plan = s.cascade(&AttentionOptions::default()).unwrap();
        let b = &s.batch;
        let rows_of = |qo: &[i32], i: usize| qo[i] as usize..qo[i + 1] as usize;
        let flat_qo: Vec<i32> = if decode { (0..=b.kv_indptr().len() as i32 - 1).collect() } else { b.qo_indptr().to_vec() };
        // Per flat row: its keys' pages in order, from the levels.
        let rows = *flat_qo.last().unwrap() as usize;
        let mut seen: Vec<Vec<i32>> = vec![Vec::new(); rows];
        let mut keys = vec![0usize; rows];
        let mut referenced = 0;
        for l in 0..plan.num_levels() {
            let lp = plan.level_plan(l).unwrap();
            let ids = plan.level_kv_indices(l).unwrap();
            referenced += ids.len();
            prop_assert_eq!(lp.num_q_rows(), rows);
            for w in 0..lp.batch_size() {
                let q = lp.request(w).unwrap();
                let pages = &ids[q.kv_start..q.kv_start + q.kv_len.div_ceil(16)];
                for r in q.qo_start..q.qo_start + q.qo_len {
                    seen[r].extend_from_slice(pages);
                    keys[r] += q.kv_len;
                }
            }
        }
        prop_assert_eq!(referenced, plan.pages_referenced());
        for req in 0..b.kv_indptr().len() - 1 {
            let pages = &b.kv_indices()[b.kv_indptr()[req] as usize..b.kv_indptr()[req + 1] as usize];
            let kv_len = s.desc_kv_len(req);
            for r in rows_of(&flat_qo, req) {
                prop_assert_eq!(&seen[r][..], pages);
                prop_assert_eq!(keys[r], kv_len);
            }
        }
        // Sharing: every group of ≥ 2 requests with a full shared page references it once.
        let shared: usize = groups.iter().filter(|g| g.0 >= 2).map(|g| (g.0 - 1) * g.1).sum();
        prop_assert_eq!(plan.pages_referenced(), b.kv_indices().len() - shared);
    }
}
