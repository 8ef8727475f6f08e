//! Property tests of the planner: (a) arbitrary, also malformed, inputs never panic and never
//! request more than the limits allow; (b) every valid batch within limits fits
//! `workspace_size(limits)`, buffer by buffer; (c) work items cover every (request, packed
//! row, KV position) exactly once, partial rows and the merge map are consistent; graph mode
//! keeps its launch shape across replans; deterministic mode does not depend on the batch.

use std::collections::{BTreeMap, BTreeSet};

use flashpage::plan::MAX_INT_IMAGE_BYTES;
use flashpage::validate::check_batch;
use flashpage::workspace::Requirement;
use flashpage::*;
use flashpage::{WorkspaceLimits, workspace_size};
use flashpage_testkit::case::Rng;
use proptest::prelude::*;

// ---- generators -----------------------------------------------------------------------

/// A value that is usually small, sometimes at an edge, sometimes huge or negative.
fn wild_i32(rng: &mut Rng, small: usize, huge: i32) -> i32 {
    match rng.below(20) {
        0 => huge,
        1 => i32::MIN,
        2 => -1 - rng.below(5) as i32,
        3 => (rng.next_u64() as i32).min(huge),
        4 => huge / 2 + rng.below(huge as usize / 2) as i32,
        _ => rng.below(small + 1) as i32,
    }
}

fn wild_usize(rng: &mut Rng, small: usize) -> usize {
    match rng.below(16) {
        0 => 0,
        1 => usize::MAX,
        2 => 1 << (20 + rng.below(40)),
        _ => rng.below(small + 1),
    }
}

/// A mostly non-decreasing array (so deep checks are reached) that is sometimes malformed.
/// Values up to `huge` (query rows are kept below 2^16 so that a valid batch's schedule,
/// which grows with its rows, stays small enough for a test).
fn wild_indptr(rng: &mut Rng, len: usize, step: usize, huge: i32) -> Vec<i32> {
    let mut v = Vec::with_capacity(len);
    let mut x = 0i32;
    for i in 0..len {
        if i > 0 {
            x = x.saturating_add(rng.below(step + 1) as i32);
        }
        v.push(if rng.below(12) == 0 {
            wild_i32(rng, 40, huge)
        } else {
            x
        });
    }
    v
}

fn wild_f32(rng: &mut Rng) -> Option<f32> {
    match rng.below(10) {
        0 => None,
        1 => Some(f32::NAN),
        2 => Some(f32::INFINITY),
        3 => Some(-1.0),
        4 => Some(0.0),
        _ => Some((rng.uniform().abs() * 60.0) as f32 + 1e-3),
    }
}

fn wild_options(rng: &mut Rng) -> AttentionOptions {
    AttentionOptions::default()
        .with_causal(rng.below(2) == 0)
        .with_sm_scale(if rng.below(2) == 0 {
            None
        } else {
            wild_f32(rng)
        })
        .with_logits_soft_cap(if rng.below(2) == 0 {
            None
        } else {
            wild_f32(rng)
        })
        .with_window_left(match rng.below(6) {
            0 => Some(u32::MAX - rng.below(10) as u32),
            1 => Some(0),
            2 | 3 => None,
            _ => Some(rng.below(100) as u32),
        })
        .with_pos_encoding(match rng.below(4) {
            0 => PosEncoding::Alibi,
            1 => PosEncoding::Rope {
                theta: wild_f32(rng).unwrap_or(1e4),
                scale: wild_f32(rng).unwrap_or(1.0),
            },
            _ => PosEncoding::None,
        })
        .with_return_lse(rng.below(2) == 0)
}

fn wild_config(rng: &mut Rng) -> PlanConfig {
    let mut c = PlanConfig::with_parallelism(1 + rng.below(300));
    c.parallelism = if rng.below(20) == 0 {
        flashpage::plan::MAX_PARALLELISM
    } else {
        wild_usize(rng, 3000)
    };
    c.q_tile = if rng.below(4) == 0 {
        wild_usize(rng, 200)
    } else {
        [1, 3, 16, 64, 128][rng.below(5)]
    };
    c.min_kv_chunk = wild_usize(rng, 300);
    if rng.below(3) == 0 {
        c.graph_capacity = Some(wild_usize(rng, 40));
        c.graph_max_q_rows = (rng.below(2) == 0).then(|| wild_usize(rng, 300));
        c.graph_max_kv_len = (rng.below(2) == 0).then(|| wild_usize(rng, 3000));
    }
    if rng.below(3) == 0 {
        c.deterministic_chunk = Some(wild_usize(rng, 512));
    }
    c
}

/// Limits taken from a batch itself: every plan of the batch must fit them.
fn own_limits(
    desc: &BatchDesc<'_>,
    opts: &AttentionOptions,
    config: &PlanConfig,
) -> Option<WorkspaceLimits> {
    let vb = check_batch(desc, opts).ok()?;
    Some(
        WorkspaceLimits::new(
            desc.heads,
            DType::BF16,
            vb.batch_size(),
            vb.num_q_rows(),
            vb.max_kv_len(),
            1,
        )
        .with_config(*config),
    )
}

/// `a <= b` for both parts (float and int workspace totals: a plan carves its own buffers
/// inside the workspace it is given).
fn assert_fits(a: &Requirement, b: &Requirement, what: &str) {
    assert!(
        a.float.total() <= b.float.total(),
        "{what}: float {a:?} > {b:?}"
    );
    assert!(a.int.total() <= b.int.total(), "{what}: int {a:?} > {b:?}");
}

// ---- (a) arbitrary inputs -------------------------------------------------------------

fn arbitrary_case(seed: u64) {
    let mut rng = Rng::new(seed);
    let hq = [0, 1, 2, 4, 8, 12, 32, 64][rng.below(8)];
    let hkv = [0, 1, 2, 3, 4, 8][rng.below(6)];
    let d = [0, 16, 64, 80, 100, 128, 256, 272][rng.below(8)];
    let Ok(heads) = HeadConfig::new(hq, hkv, d) else {
        return;
    };
    let b = rng.below(10);
    let qo_len = if rng.below(8) == 0 {
        rng.below(3)
    } else {
        b + 1
    };
    let kv_len = if rng.below(8) == 0 {
        rng.below(3)
    } else {
        b + 1
    };
    let qo_indptr = wild_indptr(&mut rng, qo_len, 40, 1 << 16);
    let kv_indptr = wild_indptr(&mut rng, kv_len, 6, i32::MAX);
    let last_len = if rng.below(8) == 0 {
        rng.below(12)
    } else {
        kv_len.saturating_sub(1)
    };
    let page_size = [0, 1, 3, 16, 64, 256, 257][rng.below(7)];
    let last: Vec<i32> = (0..last_len)
        .map(|_| wild_i32(&mut rng, page_size.min(300), i32::MAX))
        .collect();
    let num_indices = wild_usize(&mut rng, 80);
    let pages = PageTable {
        page_size,
        num_pages: wild_usize(&mut rng, 100),
        indptr: &kv_indptr,
        last_page_len: &last,
        num_indices,
    };
    let desc = match rng.below(3) {
        0 => BatchDesc::decode(heads, pages),
        1 => BatchDesc::prefill_paged(heads, &qo_indptr, pages),
        _ => BatchDesc::prefill_ragged(heads, &qo_indptr, &kv_indptr),
    };
    let opts = wild_options(&mut rng);
    let config = wild_config(&mut rng);

    if let Ok(plan) = Plan::new(&desc, &opts, &config) {
        let req = plan.requirement();
        assert!(req.int.total() <= MAX_INT_IMAGE_BYTES);
        assert_eq!(plan.int_image().len() * 4, req.int.total());
        // Bounded by the closed formula of workspace_size for the batch's own limits.
        let limits = own_limits(&desc, &opts, &config).expect("a planned batch validates");
        let bound = workspace_size(&limits).expect("sizes of a planned batch fit 64 bits");
        assert_fits(req, &bound, "own limits");
        let within = Plan::new_within(&desc, &opts, &limits).expect("fits its own limits");
        assert_eq!(within.int_image(), plan.int_image());
        if plan.num_work_items() < 1 << 16 && plan.num_q_rows() * heads.group_size() < 1 << 18 {
            check_schedule(&plan, &desc, &opts);
        }
    }
    // Arbitrary limits: new_within never returns a plan larger than the limits allow.
    let limits = WorkspaceLimits::new(
        heads,
        DType::F16,
        wild_usize(&mut rng, 12),
        wild_usize(&mut rng, 300),
        wild_usize(&mut rng, 3000),
        1,
    )
    .with_config(config);
    if let Ok(plan) = Plan::new_within(&desc, &opts, &limits) {
        assert_fits(
            plan.requirement(),
            &workspace_size(&limits).unwrap(),
            "limits",
        );
    }
}

// ---- (b), (c) valid batches -----------------------------------------------------------

/// A valid batch with its limits and planner configuration.
struct Valid {
    heads: HeadConfig,
    decode: bool,
    ragged: bool,
    builder: BatchBuilder,
    ragged_indptr: Vec<i32>,
    num_pages: usize,
    opts: AttentionOptions,
    limits: WorkspaceLimits,
}

impl Valid {
    fn desc(&self) -> BatchDesc<'_> {
        if self.ragged {
            BatchDesc::prefill_ragged(self.heads, self.builder.qo_indptr(), &self.ragged_indptr)
        } else if self.decode {
            self.builder.decode(self.heads, self.num_pages)
        } else {
            self.builder.prefill(self.heads, self.num_pages)
        }
    }
}

/// Parallelism from 1 to 2048, biased to the extremes.
fn parallelism(rng: &mut Rng) -> usize {
    match rng.below(5) {
        0 => 1,
        1 => 2048,
        2 => 1 << rng.below(12),
        _ => 1 + rng.below(2048),
    }
}

fn limits_for(rng: &mut Rng, heads: HeadConfig, page_size: usize) -> WorkspaceLimits {
    let big = rng.below(4) == 0;
    let max_batch = 1 + rng.below(if big { 300 } else { 12 });
    let max_q_tokens = 1 + rng.below(300);
    let max_kv_len = [1, 2, 16, 300, 5000][rng.below(5)] + rng.below(64);
    let mut config = PlanConfig::with_parallelism(parallelism(rng));
    config.q_tile = [1, 3, 16, 64, 128][rng.below(5)];
    config.min_kv_chunk = [1, 16, 256][rng.below(3)];
    if rng.below(3) == 0 {
        config.deterministic_chunk = Some(page_size * (1 + rng.below(40)));
    }
    if rng.below(3) == 0 {
        config.graph_capacity = Some(max_batch + rng.below(8));
        config.graph_max_q_rows = (rng.below(2) == 0).then_some(max_q_tokens + rng.below(8));
        if config.deterministic_chunk.is_some() || rng.below(2) == 0 {
            config.graph_max_kv_len = Some(max_kv_len + rng.below(8));
        }
    }
    WorkspaceLimits::new(
        heads,
        DType::ALL[rng.below(3)],
        max_batch,
        max_q_tokens,
        max_kv_len,
        1,
    )
    .with_config(config)
}

/// Request lengths within `limits` (and within the graph's capacities).
fn requests_within(
    rng: &mut Rng,
    limits: &WorkspaceLimits,
    decode: bool,
    causal: bool,
) -> Vec<(usize, usize)> {
    let c = &limits.config;
    let max_b = limits.max_batch.min(c.graph_capacity.unwrap_or(usize::MAX));
    let mut rows_left = if decode {
        usize::MAX
    } else {
        limits.max_q_tokens.min(
            c.graph_max_q_rows
                .or(c.graph_capacity)
                .unwrap_or(usize::MAX),
        )
    };
    let max_kv = limits
        .max_kv_len
        .min(c.graph_max_kv_len.unwrap_or(usize::MAX));
    let n = 1 + rng.below(max_b);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kv = match rng.below(6) {
            0 => 0,
            1 => max_kv,
            2 => (1 + rng.below(4)).min(max_kv),
            _ => rng.below(max_kv + 1),
        };
        let mut qo = if decode {
            1
        } else {
            match rng.below(4) {
                0 => 0,
                1 => 1,
                _ => rng.below(kv.min(80) + 2),
            }
        };
        if causal && !decode {
            qo = qo.min(kv);
        }
        if !decode {
            qo = qo.min(rows_left);
            rows_left -= qo;
        }
        out.push((qo, kv));
    }
    out
}

fn valid_case(seed: u64) -> Valid {
    let mut rng = Rng::new(seed);
    let hkv = [1, 2, 4, 8][rng.below(4)];
    let group = [1, 1, 2, 4, 8, 8, 3][rng.below(7)];
    let heads = HeadConfig::new(hkv * group, hkv, [16, 64, 128][rng.below(3)]).unwrap();
    let decode = rng.below(2) == 0;
    let ragged = !decode && rng.below(3) == 0;
    let page_size = if ragged {
        1
    } else {
        [1, 3, 16, 64, 256][rng.below(5)]
    };
    let limits = limits_for(&mut rng, heads, page_size);
    let opts = AttentionOptions::default()
        .with_causal(rng.below(2) == 0)
        .with_window_left(if rng.below(3) == 0 {
            Some(rng.below(50) as u32)
        } else {
            None
        });
    let reqs = requests_within(&mut rng, &limits, decode, opts.causal);
    let mut builder = BatchBuilder::new(page_size).unwrap();
    let mut ragged_indptr = vec![0i32];
    let mut next = 0i32;
    for &(qo, kv) in &reqs {
        if ragged {
            builder.push(qo, 0, &[]).unwrap();
            ragged_indptr.push(ragged_indptr.last().unwrap() + kv as i32);
        } else {
            let n = kv.div_ceil(page_size) as i32;
            builder
                .push(qo, kv, &(next..next + n).collect::<Vec<_>>())
                .unwrap();
            next += n;
        }
    }
    // Sometimes pad to the graph capacity with empty requests, as an engine does.
    if let Some(cap) = limits.config.graph_capacity
        && rng.below(2) == 0
    {
        builder.pad_to(cap.min(limits.max_batch)).unwrap();
        while ragged_indptr.len() < builder.len() + 1 {
            ragged_indptr.push(*ragged_indptr.last().unwrap());
        }
    }
    Valid {
        heads,
        decode,
        ragged,
        builder,
        ragged_indptr,
        num_pages: next as usize + 1,
        opts,
        limits,
    }
}

/// (c): the schedule covers every (request, packed row, key) exactly once; partial rows and
/// merge rows are consistent and inside the float buffer.
fn check_schedule(plan: &Plan, desc: &BatchDesc<'_>, opts: &AttentionOptions) {
    let vb = check_batch(desc, opts).unwrap();
    let g = desc.heads.group_size();
    let b = vb.batch_size();
    assert_eq!(plan.batch_size(), b);
    // Per request and packed row: the KV intervals of its items.
    let mut cover: Vec<Vec<Vec<(usize, usize)>>> = (0..b)
        .map(|r| vec![Vec::new(); vb.request(r).qo_len * g])
        .collect();
    // (partial row, head in group) cells written, and partial row → (global row, chunk start).
    let mut cells = BTreeSet::new();
    let mut partial_of: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut split_chunks: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for w in plan.work_items() {
        assert!(w.request < b, "{w:?}");
        let q = vb.request(w.request);
        assert!(
            w.row_start < w.row_end && w.row_end <= q.qo_len * g,
            "{w:?} {q:?}"
        );
        assert!(
            w.kv_start <= w.kv_end && w.kv_end <= q.kv_len,
            "{w:?} {q:?}"
        );
        assert!(
            w.kv_start < w.kv_end || q.kv_len == 0,
            "empty item of a non-empty request"
        );
        let rows = &mut cover[w.request][w.row_start..w.row_end];
        for (p, ivs) in (w.row_start..).zip(rows.iter_mut()) {
            ivs.push((w.kv_start, w.kv_end));
            if let Some(base) = w.partial {
                let i = p / g;
                let prow = base + i;
                assert!(prow < plan.num_partial_rows(), "{w:?}");
                assert!(
                    cells.insert((prow, p % g)),
                    "partial cell written twice: {w:?}"
                );
                let global = q.qo_start + i;
                let prev = partial_of.insert(prow, (global, w.kv_start));
                assert!(
                    prev.is_none() || prev == Some((global, w.kv_start)),
                    "{w:?}"
                );
                split_chunks.entry(global).or_default().insert(prow);
            }
        }
    }
    for (r, rows) in cover.iter_mut().enumerate() {
        let q = vb.request(r);
        for (p, ivs) in rows.iter_mut().enumerate() {
            ivs.sort_unstable();
            if q.kv_len == 0 {
                assert_eq!(ivs, &vec![(0, 0)], "request {r} row {p}: one empty item");
                continue;
            }
            let mut at = 0;
            for &(s, e) in ivs.iter() {
                assert_eq!(
                    s, at,
                    "request {r} packed row {p}: gap or overlap in {ivs:?}"
                );
                at = e;
            }
            assert_eq!(at, q.kv_len, "request {r} packed row {p}: {ivs:?}");
        }
    }
    // Every written partial row holds all g heads of its row.
    assert_eq!(cells.len(), partial_of.len() * g);
    assert!(
        plan.requirement()
            .float
            .buffer("partial_lse")
            .unwrap()
            .bytes
            >= plan.num_partial_rows() * desc.heads.num_qo_heads() * 4
    );
    // The merge map names each split row exactly once, with exactly its partial rows.
    let mut merged = BTreeSet::new();
    for m in plan.merge_rows() {
        assert!(merged.insert(m.row), "row {} merged twice", m.row);
        let want = split_chunks.get(&m.row).expect("merged row was split");
        let got: BTreeSet<usize> = (0..m.count).map(|k| m.first + k * m.stride).collect();
        assert_eq!(&got, want, "merge row {m:?}");
        assert!(m.count >= 2);
    }
    assert_eq!(
        merged.len(),
        split_chunks.len(),
        "every split row is merged"
    );
    assert_eq!(plan.num_merge_rows(), merged.len());
    assert_eq!(plan.split_kv(), !merged.is_empty());
}

fn valid_within(seed: u64) {
    let v = valid_case(seed);
    let desc = v.desc();
    let bound = workspace_size(&v.limits).unwrap();
    let plan = match Plan::new_within(&desc, &v.opts, &v.limits) {
        // A schedule past the library's hard ceiling is refused by design, before anything
        // is allocated; the refusal must be genuine and the bound must cover it.
        Err(Error::LimitExceeded {
            rule: "largest plan schedule",
            actual,
            limit,
            ..
        }) => {
            assert_eq!(limit, flashpage::plan::MAX_INT_IMAGE_BYTES);
            assert!(actual > limit, "seed {seed}");
            assert!(
                bound.int.total() >= actual,
                "seed {seed}: bound below the schedule"
            );
            return;
        }
        r => r.unwrap_or_else(|e| panic!("seed {seed}: a batch within limits is refused: {e}")),
    };
    assert_fits(plan.requirement(), &bound, &format!("seed {seed}"));
    let free = Plan::new(&desc, &v.opts, &v.limits.config).unwrap();
    assert_eq!(free.requirement(), plan.requirement());
    check_schedule(&plan, &desc, &v.opts);
}

/// Found by CI: limits whose graph schedule exceeds `MAX_INT_IMAGE_BYTES`.
#[test]
fn schedule_past_the_ceiling_is_refused_consistently() {
    valid_within(1109439193955673438);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_inputs_never_panic_nor_overreach(seed in any::<u64>()) {
        arbitrary_case(seed);
    }

    #[test]
    fn valid_batches_fit_workspace_size_and_are_covered(seed in any::<u64>()) {
        valid_within(seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn graph_replans_keep_the_launch_shape(seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let mut first = valid_case(seed);
        let cap = first.limits.max_batch + rng.below(4);
        let max_q = first.limits.max_q_tokens;
        first.limits.config.graph_capacity = Some(cap);
        first.limits.config.graph_max_q_rows.get_or_insert(max_q);
        first.limits.config.graph_max_kv_len = Some(first.limits.max_kv_len);
        let mut plan = Plan::new(&first.desc(), &first.opts, &first.limits.config).unwrap();
        let (caps, len, offsets, req) =
            (*plan.capacities(), plan.int_image().len(), plan.int_offsets(), *plan.requirement());
        prop_assert_eq!(caps.requests, cap);
        for k in 0..4u64 {
            // Another batch of the same deployment (heads, kind, page size, limits).
            let mut next = valid_case(seed ^ (k + 1).wrapping_mul(0x9E37_79B9));
            next.heads = first.heads;
            next.decode = first.decode;
            next.ragged = first.ragged;
            next.opts = first.opts;
            let reqs = requests_within(&mut rng, &first.limits, first.decode, first.opts.causal);
            let ps = first.builder.page_size();
            next.builder = BatchBuilder::new(ps).unwrap();
            next.ragged_indptr = vec![0];
            let mut p = 0i32;
            for &(qo, kv) in &reqs {
                if first.ragged {
                    next.builder.push(qo, 0, &[]).unwrap();
                    next.ragged_indptr.push(next.ragged_indptr.last().unwrap() + kv as i32);
                } else {
                    let n = kv.div_ceil(ps) as i32;
                    next.builder.push(qo, kv, &(p..p + n).collect::<Vec<_>>()).unwrap();
                    p += n;
                }
            }
            next.num_pages = p as usize + 1;
            let desc = next.desc();
            plan.replan(&desc, &next.opts).unwrap();
            prop_assert_eq!(*plan.capacities(), caps);
            prop_assert_eq!(plan.int_image().len(), len);
            prop_assert_eq!(plan.int_offsets(), offsets);
            prop_assert_eq!(*plan.requirement(), req);
            check_schedule(&plan, &desc, &next.opts);
            // Identical to a fresh plan of the same batch.
            let fresh = Plan::new(&desc, &next.opts, &first.limits.config).unwrap();
            prop_assert_eq!(fresh.int_image(), plan.int_image());
            // Padded entries are inert.
            let img = plan.int_image();
            let [ro, wo, mo] = offsets;
            for r in plan.batch_size()..caps.requests {
                for f in 0..4 {
                    prop_assert_eq!(img[ro + f * caps.requests + r], 0);
                }
            }
            for w in plan.num_work_items()..caps.work_items {
                prop_assert_eq!(img[wo + w], -1, "padded work item {}", w);
                prop_assert_eq!(img[wo + 5 * caps.work_items + w], -1);
            }
            for m in plan.num_merge_rows()..caps.merge_rows {
                prop_assert_eq!(img[mo + m], -1, "padded merge row {}", m);
            }
        }
    }

    #[test]
    fn deterministic_items_do_not_depend_on_the_batch(seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let hkv = [1, 2, 8][rng.below(3)];
        let heads = HeadConfig::new(hkv * [1, 4, 8][rng.below(3)], hkv, 64).unwrap();
        let ps = [1, 16, 64][rng.below(3)];
        let decode = rng.below(2) == 0;
        let mut cfg = PlanConfig::with_parallelism(parallelism(&mut rng));
        cfg.deterministic_chunk = Some(ps * (1 + rng.below(20)));
        let target = (if decode { 1 } else { 1 + rng.below(40) }, rng.below(3000));
        let items_of_target = |others: &[(usize, usize)], at: usize| {
            let mut b = BatchBuilder::new(ps).unwrap();
            let mut p = 0i32;
            let mut all = others.to_vec();
            all.insert(at, target);
            for &(qo, kv) in &all {
                let n = kv.div_ceil(ps) as i32;
                b.push(qo, kv, &(p..p + n).collect::<Vec<_>>()).unwrap();
                p += n;
            }
            let desc = if decode { b.decode(heads, p as usize) } else { b.prefill(heads, p as usize) };
            let plan = Plan::new(&desc, &AttentionOptions::default(), &cfg).unwrap();
            plan.work_items()
                .filter(|w| w.request == at)
                .map(|w| (w.row_start, w.row_end, w.kv_start, w.kv_end, w.partial.is_some()))
                .collect::<Vec<_>>()
        };
        let batch = |rng: &mut Rng| (0..rng.below(12))
            .map(|_| (if decode { 1 } else { rng.below(30) }, rng.below(4000)))
            .collect::<Vec<_>>();
        let a = batch(&mut rng);
        let b = batch(&mut rng);
        let ia = items_of_target(&a, rng.below(a.len() + 1));
        let ib = items_of_target(&b, rng.below(b.len() + 1));
        prop_assert!(!ia.is_empty() || target.0 == 0);
        prop_assert_eq!(ia, ib);
    }
}

// ---- worst cases of the bound, found on purpose ----------------------------------------

/// Scans the extremes (tiny KV, group size 1 and 8, parallelism up to 2048, q tile 1..128)
/// for the plan closest to the bound, checks the bound holds everywhere, and that it is
/// reached (tight) for a split decode batch and for an unsplit prefill batch.
#[test]
fn bound_worst_cases() {
    let mut worst_float = 0.0f64;
    for group in [1, 8] {
        let heads = HeadConfig::new(8 * group, 8, 128).unwrap();
        for par in [1, 2, 7, 64, 264, 1000, 2048] {
            for q_tile in [1, 3, 64, 128] {
                for max_kv in [1, 2, 17, 300, 4096] {
                    let mut limits = WorkspaceLimits::new(heads, DType::BF16, 64, 256, max_kv, par);
                    limits.config.q_tile = q_tile;
                    limits.config.min_kv_chunk = 1;
                    let bound = workspace_size(&limits).unwrap();
                    for (b, qo) in [(1, 1), (1, 256), (2, 128), (64, 4), (7, 1), (64, 1)] {
                        for decode in [true, false] {
                            let mut bb = BatchBuilder::new(1).unwrap();
                            for r in 0..b {
                                let q = if decode { 1 } else { qo };
                                bb.push(q, max_kv, &vec![r; max_kv]).unwrap();
                            }
                            let desc = if decode {
                                bb.decode(heads, 64)
                            } else {
                                bb.prefill(heads, 64)
                            };
                            let plan =
                                Plan::new_within(&desc, &AttentionOptions::default(), &limits)
                                    .unwrap_or_else(|e| {
                                        panic!(
                                            "g{group} p{par} t{q_tile} kv{max_kv} b{b} q{qo}: {e}"
                                        )
                                    });
                            assert_fits(plan.requirement(), &bound, "worst case");
                            check_schedule(&plan, &desc, &AttentionOptions::default());
                            if bound.float.total() > 0 {
                                worst_float = worst_float.max(
                                    plan.requirement().float.total() as f64
                                        / bound.float.total() as f64,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    // Some plan uses the float bound in full: it is exact, not just safe.
    assert_eq!(worst_float, 1.0, "the float bound is reached");
    // Decode with one long request splits into exactly T = parallelism / Hkv partial rows.
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let limits = WorkspaceLimits::new(heads, DType::BF16, 256, 8192, 32768, 264);
    let mut bb = BatchBuilder::new(16).unwrap();
    bb.push(1, 32768, &vec![0; 2048]).unwrap();
    let plan =
        Plan::new_within(&bb.decode(heads, 1), &AttentionOptions::default(), &limits).unwrap();
    assert_eq!(plan.num_partial_rows(), 33);
    assert!(plan.requirement().float.total() <= workspace_size(&limits).unwrap().float.total());
}
