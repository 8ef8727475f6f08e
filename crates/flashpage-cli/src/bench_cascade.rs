//! `flashpage bench cascade`: a decode batch whose requests share a long prefix, run flat and
//! as a two-level cascade ([`CascadePlan::shared_prefixes`]) on the same inputs. Both runs
//! are verified against the f64 reference on sampled rows before they are timed; the report
//! gives each one's time and the K/V bytes its plan references (a shared page counted once
//! per level request that holds it), and their ratios.

use flashpage::backend::RunArgs;
use flashpage::backend::cpu::CpuBackend;
use flashpage::workspace::HostWorkspace;
use flashpage::{
    AttentionOptions, BatchBuilder, CascadePlan, DType, HeadConfig, KvLayout, KvStrides,
    PlanConfig, Tensor,
};
use flashpage_testkit::case::{CaseData, CaseSpec, KvStorage, Rng};
use flashpage_testkit::suite;
use serde_json::json;

use crate::bench::time_calls;

/// The shape: `REQUESTS` decode requests sharing `PREFIX` tokens, each with `SUFFIX` own.
const REQUESTS: usize = 64;
const PREFIX: usize = 4096;
const SUFFIX: usize = 256;
const PAGE_SIZE: usize = 16;

/// The case's name for `model` (what `--filter` matches).
pub(crate) fn case_name(model: &str) -> String {
    format!("cascade/{model}/b{REQUESTS}-prefix{PREFIX}-suffix{SUFFIX}")
}

/// One cascade case's result.
struct CascadeResult {
    name: String,
    dtype: DType,
    flat_us: f64,
    cascade_us: f64,
    flat_bytes: u64,
    cascade_bytes: u64,
    calls: (usize, usize),
    errors: [(f64, f64); 2],
    sample: String,
}

impl CascadeResult {
    fn print(&self, json: bool) {
        let speedup = self.flat_us / self.cascade_us;
        let byte_ratio = self.flat_bytes as f64 / self.cascade_bytes as f64;
        if json {
            println!(
                "{}",
                json!({
                    "case": self.name, "dtype": self.dtype.name(), "backend": "cpu",
                    "flat_us": self.flat_us, "cascade_us": self.cascade_us,
                    "flat_bytes": self.flat_bytes, "cascade_bytes": self.cascade_bytes,
                    "speedup": speedup, "byte_ratio": byte_ratio,
                    "calls": [self.calls.0, self.calls.1],
                    "o_error": self.errors[1].0, "lse_error": self.errors[1].1,
                    "flat_o_error": self.errors[0].0, "flat_lse_error": self.errors[0].1,
                    "verified": self.sample,
                })
            );
        } else {
            for (what, us, bytes, calls, (eo, el)) in [
                (
                    "flat",
                    self.flat_us,
                    self.flat_bytes,
                    self.calls.0,
                    self.errors[0],
                ),
                (
                    "cascade",
                    self.cascade_us,
                    self.cascade_bytes,
                    self.calls.1,
                    self.errors[1],
                ),
            ] {
                println!(
                    "{:34} {:5} {:>11.1} {:>9.1} MB {:>7} {:>6}  o {:.1e} lse {:.1e} ({})",
                    format!("{}/{what}", self.name),
                    self.dtype.name(),
                    us,
                    bytes as f64 / 1e6,
                    "",
                    calls,
                    eo,
                    el,
                    self.sample
                );
            }
            println!(
                "{:>34} speedup {speedup:.2}x for {byte_ratio:.1}x fewer bytes referenced",
                "cascade vs flat"
            );
        }
    }
}

/// The flat batch: every request's pages are the shared prefix's, then its own (shuffled
/// page ids throughout).
fn shared_batch(heads: HeadConfig, dtype: DType, seed: u64) -> Result<CaseData, String> {
    let mut rng = Rng::new(seed);
    let (prefix_pages, own_pages) = (PREFIX / PAGE_SIZE, SUFFIX / PAGE_SIZE);
    let num_pages = prefix_pages + REQUESTS * own_pages;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let mut batch = BatchBuilder::new(PAGE_SIZE).map_err(|e| e.to_string())?;
    for r in 0..REQUESTS {
        let mut pages = ids[..prefix_pages].to_vec();
        let own = prefix_pages + r * own_pages;
        pages.extend_from_slice(&ids[own..own + own_pages]);
        batch
            .push(1, PREFIX + SUFFIX, &pages)
            .map_err(|e| e.to_string())?;
    }
    let (hq, hkv, d) = (heads.num_qo_heads(), heads.num_kv_heads(), heads.head_dim());
    let mut fill = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect() };
    let q = Tensor::from_f64(dtype, &fill(REQUESTS * hq * d));
    let kv_elems = num_pages * PAGE_SIZE * hkv * d;
    let k = Tensor::from_f64(dtype, &fill(kv_elems));
    let v = Tensor::from_f64(dtype, &fill(kv_elems));
    let mut spec = CaseSpec::decode(
        "cascade",
        heads,
        PAGE_SIZE,
        REQUESTS,
        PREFIX + SUFFIX,
        dtype,
    );
    spec.storage = KvStorage::Separate;
    Ok(CaseData {
        spec,
        batch,
        ragged_indptr: Vec::new(),
        num_pages,
        q,
        k,
        v,
        v_offset: 0,
        strides: KvStrides::dense(KvLayout::Nhd, PAGE_SIZE, hkv, d),
        sinks: None,
        custom_mask: None,
        scales: None,
    })
}

/// Runs the case for `heads` (a model's) and `dtype`, verified then timed.
fn run_case(
    cpu: &CpuBackend,
    model: &str,
    heads: HeadConfig,
    dtype: DType,
) -> Result<CascadeResult, String> {
    let seed = suite::seed_from_env();
    let data = shared_batch(heads, dtype, seed)?;
    let err = |e: flashpage::Error| e.to_string();
    let config = PlanConfig::with_parallelism(cpu.threads());
    let opts = AttentionOptions::default().with_return_lse(true);
    let flat = data.plan(&config).map_err(err)?;
    let cascade = CascadePlan::shared_prefixes(
        heads,
        None,
        data.batch.page_table(data.num_pages),
        data.batch.kv_indices(),
        &opts,
        &config,
    )
    .map_err(err)?;
    let mut flat_ws = HostWorkspace::new(flat.requirement().float.total()).map_err(err)?;
    let need = cascade.float_requirement(dtype).map_err(err)?.total();
    let mut cascade_ws = HostWorkspace::new(need).map_err(err)?;
    let (mut o, mut lse) = data.poisoned_outputs();
    let (mut co, mut clse) = data.poisoned_outputs();
    let mut run_flat = |o: &mut Tensor, lse: &mut Vec<f32>| {
        cpu.run(
            &flat,
            RunArgs {
                q: data.q.view(),
                kv: data.kv_cache(),
                o: o.view_mut(),
                lse: Some(lse),
                sinks: None,
                custom_mask: None,
            },
            flat_ws.as_bytes_mut(),
        )
        .map_err(err)
    };
    let mut kv = data.kv_cache();
    kv.kv_indices = &[];
    let mut run_cascade = |o: &mut Tensor, lse: &mut Vec<f32>| {
        cpu.run_cascade(
            &cascade,
            RunArgs {
                q: data.q.view(),
                kv,
                o: o.view_mut(),
                lse: Some(lse),
                sinks: None,
                custom_mask: None,
            },
            cascade_ws.as_bytes_mut(),
        )
        .map_err(err)
    };
    // Verify both on sampled requests (every element written, against the f64 reference).
    run_flat(&mut o, &mut lse)?;
    run_cascade(&mut co, &mut clse)?;
    let rows = [0, REQUESTS / 2, REQUESTS - 1];
    let reference = suite::sampled_reference(&data, &rows).map_err(err)?;
    let mut errors = [(0.0, 0.0); 2];
    for (i, (o, lse)) in [(&o, &lse), (&co, &clse)].into_iter().enumerate() {
        let cmp = suite::compare_rows(&data, &rows, o, lse, &reference);
        if !cmp.passed() {
            return Err(format!(
                "verification failed ({} run, seed {seed}): o error {:.3e}, lse error {:.3e}, tolerance {:.0e}, fully written {}",
                ["flat", "cascade"][i],
                cmp.o_error,
                cmp.lse_error,
                cmp.tolerance,
                cmp.fully_written
            ));
        }
        errors[i] = (cmp.o_error, cmp.lse_error);
    }
    let (flat_s, flat_calls) = time_calls(|| run_flat(&mut o, &mut lse))?;
    let (cascade_s, cascade_calls) = time_calls(|| run_cascade(&mut co, &mut clse))?;
    let page_bytes =
        (PAGE_SIZE * heads.num_kv_heads() * heads.head_dim() * 2 * dtype.size()) as u64;
    Ok(CascadeResult {
        name: case_name(model),
        dtype,
        flat_us: flat_s * 1e6,
        cascade_us: cascade_s * 1e6,
        flat_bytes: data.batch.kv_indices().len() as u64 * page_bytes,
        cascade_bytes: cascade.pages_referenced() as u64 * page_bytes,
        calls: (flat_calls, cascade_calls),
        errors,
        sample: format!("{} of {REQUESTS} requests", rows.len()),
    })
}

/// Runs the cascade case for one model and each dtype; failures are returned as messages.
pub(crate) fn run(
    cpu: &CpuBackend,
    model: (&str, HeadConfig),
    dtypes: &[DType],
    json: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    for &dtype in dtypes {
        match run_case(cpu, model.0, model.1, dtype) {
            Ok(r) => r.print(json),
            Err(e) => {
                let name = format!("cascade/{} {}", model.0, dtype.name());
                if json {
                    println!(
                        "{}",
                        json!({"case": name, "dtype": dtype.name(), "backend": "cpu", "error": e})
                    );
                } else {
                    println!("{name:34} FAILED: {e}");
                }
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    failures
}
