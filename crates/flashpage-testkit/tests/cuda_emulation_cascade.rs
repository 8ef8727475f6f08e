//! Cascade attention on the emulated CUDA kernels (no GPU): every level through the
//! attention kernel (decode kernel for f32, tensor-core prefill kernel for 16-bit) and the
//! split-KV merge into its state in the poisoned float workspace, then the fold kernel, all
//! as `launch::cascade_launches` describes them. Compared with the f64 reference of the
//! flat batch and with the CPU cascade; outputs poisoned (so every element is checked
//! written). FP8 caches (e4m3fn, e5m2) with their scales through every level.
#![cfg(feature = "cuda")]

use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::cuda::launch::{self, CascadeBuffers};
use flashpage::plan::cascade::{CascadeLevel, CascadePlan};
use flashpage::{DType, HeadConfig, KvLayout, KvStrides, PlanConfig};
use flashpage_testkit::case::{CaseData, CaseSpec, Fp8Spec};
use flashpage_testkit::emulate::Emulator;

fn seed(i: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Owned arrays of one explicit level.
#[derive(Debug, Default)]
struct Arrays {
    qo_indptr: Vec<i32>,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    last_page_len: Vec<i32>,
}

impl Arrays {
    fn push(&mut self, rows: usize, pages: &[i32], last: i32) {
        if self.qo_indptr.is_empty() {
            self.qo_indptr.push(0);
            self.kv_indptr.push(0);
        }
        self.qo_indptr
            .push(self.qo_indptr.last().unwrap() + rows as i32);
        self.kv_indices.extend_from_slice(pages);
        self.kv_indptr.push(self.kv_indices.len() as i32);
        self.last_page_len
            .push(if pages.is_empty() { 0 } else { last });
    }

    fn level(&self) -> CascadeLevel<'_> {
        CascadeLevel {
            qo_indptr: &self.qo_indptr,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            last_page_len: &self.last_page_len,
        }
    }
}

/// A prefix tree over `data`'s requests: tier `t` groups the requests (`(sharers, pages)`,
/// covering the batch in order) and each group shares its next `pages` pages; the last
/// level holds every request's remaining pages. Makes the batch share them first
/// (`CaseData::share_prefixes`, cumulatively), so the flat batch is the same attention.
fn tiers(data: &mut CaseData, tiers: &[&[(usize, usize)]]) -> Vec<Arrays> {
    let n = data.batch.len();
    let mut taken = vec![0usize; n];
    for t in tiers {
        let mut r = 0;
        let cumulative: Vec<(usize, usize)> = t
            .iter()
            .map(|&(s, p)| {
                let g = (s, taken[r] + p);
                r += s;
                g
            })
            .collect();
        data.share_prefixes(&cumulative).unwrap();
        let mut r = 0;
        for &(s, p) in *t {
            for x in &mut taken[r..r + s] {
                *x += p;
            }
            r += s;
        }
    }
    let (qo, kvp, ids) = (
        data.batch.qo_indptr(),
        data.batch.kv_indptr(),
        data.batch.kv_indices(),
    );
    let ps = data.batch.page_size() as i32;
    let pages = |r: usize| &ids[kvp[r] as usize..kvp[r + 1] as usize];
    let rows = |r: usize| (qo[r + 1] - qo[r]) as usize;
    let mut out = Vec::new();
    let mut at = vec![0usize; n];
    for t in tiers {
        let mut lv = Arrays::default();
        let mut r = 0;
        for &(s, p) in *t {
            let own = pages(r);
            // Never a request's last page (it is being filled); the batch shares the same cap.
            let p = p.min(own.len().saturating_sub(1).saturating_sub(at[r]));
            let group_rows: usize = (r..r + s).map(rows).sum();
            lv.push(group_rows, &own[at[r]..at[r] + p], ps);
            for x in &mut at[r..r + s] {
                *x += p;
            }
            r += s;
        }
        out.push(lv);
    }
    let mut last = Arrays::default();
    let lpl = data.batch.kv_last_page_len();
    for r in 0..n {
        last.push(rows(r), &pages(r)[at[r]..], lpl[r]);
    }
    out.push(last);
    out
}

fn check(emu: &Emulator, cpu: &CpuBackend, data: &CaseData, plan: &CascadePlan, what: &str) {
    let reference = data.reference().unwrap();
    let (o, lse) = emu.run_cascade(data, plan);
    let c = data.compare(&o, &lse, &reference);
    assert!(c.passed(), "{what}: emulated cascade vs reference: {c:?}");
    let (co, clse) = data.run_cascade_on(cpu, plan).unwrap();
    let (e, el) = CaseData::output_difference(&o, &lse, &co, &clse);
    assert!(
        e <= c.tolerance && el <= c.tolerance,
        "{what}: emulated vs cpu cascade: o {e:e}, lse {el:e}"
    );
}

#[test]
fn emulated_cascades_match_the_flat_reference() {
    let emu = Emulator::new("cascade").unwrap_or_else(|e| panic!("{e}"));
    let cpu = CpuBackend::new(2).unwrap();
    let gqa = HeadConfig::new(8, 2, 64).unwrap();
    // (name, dtype, decode, causal, soft-cap, sinks, split chunks)
    let cases = [
        (
            "decode bf16 sinks",
            DType::BF16,
            true,
            false,
            None,
            true,
            16,
        ),
        (
            "decode f32 soft-cap",
            DType::F32,
            true,
            false,
            Some(8.0),
            false,
            4096,
        ),
        (
            "prefill bf16 causal sinks",
            DType::BF16,
            false,
            true,
            None,
            true,
            16,
        ),
        (
            "prefill f32 soft-cap sinks",
            DType::F32,
            false,
            false,
            Some(5.0),
            true,
            32,
        ),
    ];
    for (i, (name, dt, decode, causal, cap, sinks, chunk)) in cases.into_iter().enumerate() {
        let mut spec = CaseSpec::decode(name, gqa, 16, 6, 0, dt);
        spec.decode = decode;
        spec.requests = vec![(3, 90), (5, 70), (1, 66), (4, 120), (2, 40), (6, 100)];
        spec.options.causal = causal;
        spec.options.logits_soft_cap = cap;
        spec.sinks = sinks;
        let mut config = PlanConfig::with_parallelism(24);
        config.min_kv_chunk = chunk;
        // Three levels: all six share one page, then pairs/triples share one or two more.
        let mut data = spec.materialise(seed(i as u64)).unwrap();
        let arrays = tiers(&mut data, &[&[(6, 1)], &[(3, 2), (1, 0), (2, 1)]]);
        let levels: Vec<CascadeLevel<'_>> = arrays.iter().map(Arrays::level).collect();
        let plan =
            CascadePlan::new(gqa, 16, data.num_pages, &levels, &data.options(), &config).unwrap();
        assert_eq!(plan.num_levels(), 3);
        assert_eq!(plan.level_kv_indices(0).unwrap().len(), 1);
        check(&emu, &cpu, &data, &plan, &format!("{name}, 3 levels"));
        // Two levels as shared_prefixes finds them in the same batch: one run of all six
        // requests, sharing the one page all of them start with.
        let plan = data.cascade_plan(&config).unwrap();
        assert_eq!(plan.num_levels(), 2);
        assert_eq!(plan.level_kv_indices(0).unwrap().len(), 1);
        check(
            &emu,
            &cpu,
            &data,
            &plan,
            &format!("{name}, shared_prefixes"),
        );
    }
}

/// An FP8 cache (e4m3fn and e5m2, per-tensor and per-KV-head scales) through a cascade:
/// every level's kernel reads the codes with the scales in its parameters, as `run` does;
/// against the f64 reference of the dequantised cache and the CPU backend's cascade.
#[test]
fn emulated_cascades_read_an_fp8_cache() {
    let emu = Emulator::new("cascade-fp8").unwrap_or_else(|e| panic!("{e}"));
    let cpu = CpuBackend::new(2).unwrap();
    let gqa = HeadConfig::new(8, 2, 64).unwrap();
    // (fp8 format, per-head scales, q dtype, decode)
    let cases = [
        (DType::E4M3Fn, true, DType::BF16, true),
        (DType::E5M2, false, DType::F32, true),
        (DType::E4M3Fn, false, DType::BF16, false),
        (DType::E5M2, true, DType::F16, false),
    ];
    for (i, (fp8, per_head, dt, decode)) in cases.into_iter().enumerate() {
        let name = format!(
            "{} {} q {}, {} scales",
            if decode { "decode" } else { "prefill" },
            fp8.name(),
            dt.name(),
            if per_head { "per-head" } else { "per-tensor" }
        );
        let mut spec = CaseSpec::decode(&name, gqa, 16, 6, 0, dt);
        spec.decode = decode;
        spec.requests = vec![(3, 90), (5, 70), (1, 66), (4, 120), (2, 40), (6, 100)];
        spec.options.causal = !decode;
        spec.fp8 = Some(Fp8Spec {
            dtype: fp8,
            per_head,
        });
        let mut config = PlanConfig::with_parallelism(24);
        config.min_kv_chunk = 16;
        let mut data = spec.materialise(seed(50 + i as u64)).unwrap();
        let arrays = tiers(&mut data, &[&[(6, 1)], &[(3, 2), (1, 0), (2, 1)]]);
        let levels: Vec<CascadeLevel<'_>> = arrays.iter().map(Arrays::level).collect();
        let plan =
            CascadePlan::new(gqa, 16, data.num_pages, &levels, &data.options(), &config).unwrap();
        assert_eq!(plan.num_levels(), 3);
        check(&emu, &cpu, &data, &plan, &format!("{name}, 3 levels"));
    }
}

#[test]
fn emulated_cascade_rows_without_keys_at_a_level() {
    // A level request with no pages (the single request of the middle tier) and a row whose
    // only keys are its own: empty states add nothing; with sinks lse includes the sink.
    let emu = Emulator::new("cascade-empty").unwrap_or_else(|e| panic!("{e}"));
    let cpu = CpuBackend::new(2).unwrap();
    let h = HeadConfig::new(4, 4, 128).unwrap();
    let mut spec = CaseSpec::decode("empty levels f16", h, 8, 3, 0, DType::F16);
    spec.requests = vec![(1, 30), (1, 5), (1, 17)];
    spec.sinks = true;
    let mut data = spec.materialise(seed(99)).unwrap();
    let arrays = tiers(&mut data, &[&[(1, 0), (2, 1)]]);
    let levels: Vec<CascadeLevel<'_>> = arrays.iter().map(Arrays::level).collect();
    let plan = CascadePlan::new(
        h,
        8,
        data.num_pages,
        &levels,
        &data.options(),
        &PlanConfig::with_parallelism(4),
    )
    .unwrap();
    check(&emu, &cpu, &data, &plan, "empty levels");
}

#[test]
fn cascade_launch_sequence_is_levels_then_one_fold() {
    // What the backend enqueues: each level's kernels with parameters inside the device
    // layout, then one fold over all levels; nothing else (graph-capturable).
    let h = HeadConfig::new(8, 2, 64).unwrap();
    let mut spec = CaseSpec::decode("launches", h, 16, 6, 0, DType::BF16);
    spec.requests = vec![(1, 90); 6];
    let mut data = spec.materialise(7).unwrap();
    let arrays = tiers(&mut data, &[&[(6, 2)], &[(3, 1), (3, 1)]]);
    let levels: Vec<CascadeLevel<'_>> = arrays.iter().map(Arrays::level).collect();
    let mut config = PlanConfig::with_parallelism(16);
    config.min_kv_chunk = 16;
    let plan = CascadePlan::new(h, 16, data.num_pages, &levels, &data.options(), &config).unwrap();
    let req = plan.device_requirement(DType::BF16).unwrap();
    let (fw, iw) = (1u64 << 40, 2u64 << 40);
    let bufs = CascadeBuffers {
        q: 3 << 40,
        k: 4 << 40,
        v: 5 << 40,
        o: 6 << 40,
        lse: 7 << 40,
        sinks: 0,
        int_ws: iw,
        float_ws: fw,
        num_pages: data.num_pages,
        strides: KvStrides::dense(KvLayout::Nhd, 16, 2, 64),
    };
    let l = launch::cascade_launches(&plan, DType::BF16, &bufs).unwrap();
    assert_eq!(l.levels.len(), 3);
    assert_eq!(l.fold_rows as usize, plan.num_q_rows());
    let image = plan.device_int_image().unwrap();
    assert!(image.len() * 4 <= req.int.total());
    for (n, lv) in l.levels.iter().enumerate() {
        let at = plan.device_level(n, DType::BF16).unwrap().unwrap();
        let lp = plan.level_plan(n).unwrap();
        // The level's image and page ids are where the parameters point.
        let img = &image[at.image_offset / 4..][..lp.int_image().len()];
        assert_eq!(img, lp.int_image());
        let ids = plan.level_kv_indices(n).unwrap();
        assert_eq!(&image[at.ids_offset / 4..][..ids.len()], ids);
        assert_eq!(lv.work_items as usize, lp.capacities().work_items);
        // States inside the float workspace, one level after another.
        let state = plan.num_q_rows() * 8 * 64 * 2;
        assert!(at.o_offset + state <= req.float.total());
        assert!(at.lse_offset + plan.num_q_rows() * 8 * 4 <= req.float.total());
    }
    assert_eq!(plan.device_level(3, DType::BF16).unwrap(), None);
    assert_eq!(l.fold.as_bytes().len(), 72);
}

#[test]
fn the_cascade_suite_on_the_emulated_kernels() {
    // cascade.toml through the suite's runner interface (`HostRunner::run_cascade_host`),
    // every dtype and listed parallelism (the whole suite's emulation test runs them too, at
    // their first dtype).
    let emu = Emulator::new("cascade-suite").unwrap_or_else(|e| panic!("{e}"));
    let suite = flashpage_testkit::suite::Suite::embedded().unwrap();
    let seed = flashpage_testkit::suite::seed_from_env();
    let runners: [&dyn flashpage_testkit::HostRunner; 1] = [&emu];
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in suite.cases.iter().filter(|c| c.file == "cascade.toml") {
        for &dtype in &case.dtypes {
            for run in case.run(dtype, &runners, seed) {
                runs += 1;
                if !run.passed() {
                    failures.push(run.to_string());
                }
            }
        }
    }
    assert!(runs >= 8, "{runs} runs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
