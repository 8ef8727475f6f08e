//! The candle ops (`candle` feature) against candle's own naive attention (matmul +
//! softmax) on random data: K/V appended into a combined paged cache by the candle
//! `append_kv` op (f32 rows into f32 and bf16 caches), then paged decode and causal prefill
//! with q read from a fused QKV tensor; bad inputs are candle errors carrying flashpage's
//! message, and nothing is written.
#![cfg(feature = "candle")]

use candle_core::{D, DType as CDType, Device, IndexOp, Tensor};
use flashpage::backend::cpu::CpuBackend;
use flashpage::ops::append::AppendBatch;
use flashpage::{AttentionOptions, BatchBuilder, HeadConfig, KvLayout, Plan, PlanConfig};

const HQ: usize = 8;
const HKV: usize = 2;
const D_: usize = 64;
const PS: usize = 16;

/// Candle's attention for one request: q `[qo, HQ, D]`, k/v `[kv, HKV, D]`, causal with the
/// queries at the end of the sequence.
fn naive(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
    let (qo, kv) = (q.dim(0).unwrap(), k.dim(0).unwrap());
    let g = HQ / HKV;
    let expand = |t: &Tensor| {
        t.transpose(0, 1)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .expand((HKV, g, kv, D_))
            .unwrap()
            .reshape((HQ, kv, D_))
            .unwrap()
    };
    let (k, v) = (expand(k), expand(v));
    let q = q.transpose(0, 1).unwrap().contiguous().unwrap(); // [HQ, qo, D]
    let scale = 1.0 / (D_ as f64).sqrt();
    let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap(); // [HQ, qo, kv]
    if causal {
        let mask: Vec<f32> = (0..qo)
            .flat_map(|i| {
                (0..kv).map(move |j| {
                    if j <= i + kv - qo {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, qo, kv), &Device::Cpu).unwrap();
        s = s.broadcast_add(&mask).unwrap();
    }
    let m = s.max_keepdim(D::Minus1).unwrap();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&v).unwrap().transpose(0, 1).unwrap() // [qo, HQ, D]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(CDType::F32).unwrap();
    let b = b.to_dtype(CDType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Fills a combined cache with every request's K/V through the candle append op and checks
/// decode and prefill attention against the naive one.
fn run(cache_dtype: CDType, tol: f32) {
    let dev = Device::Cpu;
    let kv_lens = [37usize, 70, 5];
    let heads = HeadConfig::new(HQ, HKV, D_).unwrap();
    // Pages handed out in reverse order (not the identity).
    let total_pages: usize = kv_lens.iter().map(|l| l.div_ceil(PS)).sum();
    let num_pages = total_pages + 1;
    let mut next = num_pages as i32;
    let pages: Vec<Vec<i32>> = kv_lens
        .iter()
        .map(|l| {
            (0..l.div_ceil(PS))
                .map(|_| {
                    next -= 1;
                    next
                })
                .collect()
        })
        .collect();
    let kv_cache = Tensor::randn(0f32, 1.0, (num_pages, 2, PS, HKV, D_), &dev)
        .unwrap()
        .to_dtype(cache_dtype)
        .unwrap();
    let tokens: usize = kv_lens.iter().sum();
    let k_new = Tensor::randn(0f32, 1.0, (tokens, HKV, D_), &dev).unwrap();
    let v_new = Tensor::randn(0f32, 1.0, (tokens, HKV, D_), &dev).unwrap();
    let mut fill = BatchBuilder::new(PS).unwrap();
    for (l, p) in kv_lens.iter().zip(&pages) {
        fill.push(*l, *l, p).unwrap();
    }
    flashpage::candle::append_kv(
        &kv_cache,
        &k_new,
        &v_new,
        AppendBatch::from_builder(&fill),
        KvLayout::Nhd,
        None,
    )
    .unwrap();
    let k_cache = kv_cache.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let v_cache = kv_cache.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
    // What the cache holds: the appended rows, rounded to its dtype.
    let k_new = k_new.to_dtype(cache_dtype).unwrap();
    let v_new = v_new.to_dtype(cache_dtype).unwrap();
    let cpu = CpuBackend::new(2).unwrap();
    let config = PlanConfig::with_parallelism(4);

    // Decode: one query per request, q a view into a fused QKV tensor.
    let b = kv_lens.len();
    let qkv = Tensor::randn(0f32, 1.0, (b, HQ + 2 * HKV, D_), &dev)
        .unwrap()
        .to_dtype(cache_dtype)
        .unwrap();
    let q = qkv.narrow(1, 0, HQ).unwrap();
    assert!(!q.is_contiguous());
    let mut dec = BatchBuilder::new(PS).unwrap();
    for (l, p) in kv_lens.iter().zip(&pages) {
        dec.push(1, *l, p).unwrap();
    }
    let plan = Plan::new(
        &dec.decode(heads, num_pages),
        &AttentionOptions::new(),
        &config,
    )
    .unwrap();
    let o = flashpage::candle::attention(
        &cpu,
        &plan,
        &q,
        &k_cache,
        &v_cache,
        KvLayout::Nhd,
        dec.kv_indices(),
    )
    .unwrap();
    assert_eq!(o.dims(), &[b, HQ, D_]);
    assert_eq!(o.dtype(), cache_dtype);
    let mut t0 = 0;
    for (r, &l) in kv_lens.iter().enumerate() {
        let f32_of = |t: Tensor| t.to_dtype(CDType::F32).unwrap();
        let want = naive(
            &f32_of(q.i(r..r + 1).unwrap()),
            &f32_of(k_new.i(t0..t0 + l).unwrap()),
            &f32_of(v_new.i(t0..t0 + l).unwrap()),
            false,
        );
        let got = o.i(r..r + 1).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err <= tol, "decode request {r}: max error {err}");
        t0 += l;
    }

    // Causal prefill of the last qo tokens of each request.
    let qo_lens = [9usize, 70, 1];
    let rows: usize = qo_lens.iter().sum();
    let q = Tensor::randn(0f32, 1.0, (rows, HQ, D_), &dev)
        .unwrap()
        .to_dtype(cache_dtype)
        .unwrap();
    let mut pre = BatchBuilder::new(PS).unwrap();
    for ((l, p), qo) in kv_lens.iter().zip(&pages).zip(qo_lens) {
        pre.push(qo, *l, p).unwrap();
    }
    let plan = Plan::new(
        &pre.prefill(heads, num_pages),
        &AttentionOptions::new().with_causal(true),
        &config,
    )
    .unwrap();
    let o = flashpage::candle::attention(
        &cpu,
        &plan,
        &q,
        &k_cache,
        &v_cache,
        KvLayout::Nhd,
        pre.kv_indices(),
    )
    .unwrap();
    let (mut q0, mut t0) = (0, 0);
    for (r, (&l, &qo)) in kv_lens.iter().zip(&qo_lens).enumerate() {
        let f32_of = |t: Tensor| t.to_dtype(CDType::F32).unwrap();
        let want = naive(
            &f32_of(q.i(q0..q0 + qo).unwrap()),
            &f32_of(k_new.i(t0..t0 + l).unwrap()),
            &f32_of(v_new.i(t0..t0 + l).unwrap()),
            true,
        );
        let err = max_abs_diff(&o.i(q0..q0 + qo).unwrap(), &want);
        assert!(err <= tol, "prefill request {r}: max error {err}");
        q0 += qo;
        t0 += l;
    }
}

#[test]
fn candle_ops_match_candle_attention_f32() {
    run(CDType::F32, 1e-4);
}

#[test]
fn candle_ops_match_candle_attention_bf16() {
    // Inputs rounded to bf16 alike on both sides; o is rounded to bf16 (2^-8 relative).
    run(CDType::BF16, 2e-2);
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() {
    let dev = Device::Cpu;
    let heads = HeadConfig::new(HQ, HKV, D_).unwrap();
    let mut b = BatchBuilder::new(PS).unwrap();
    b.push(1, 20, &[0, 1]).unwrap();
    let plan = Plan::new(
        &b.decode(heads, 2),
        &AttentionOptions::new(),
        &PlanConfig::with_parallelism(1),
    )
    .unwrap();
    let cpu = CpuBackend::new(1).unwrap();
    let k = Tensor::randn(0f32, 1.0, (2, PS, HKV, D_), &dev).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, HQ, D_), &dev).unwrap();
    // q with the wrong head count.
    let bad_q = Tensor::randn(0f32, 1.0, (1, HQ - 1, D_), &dev).unwrap();
    let e =
        flashpage::candle::attention(&cpu, &plan, &bad_q, &k, &k, KvLayout::Nhd, b.kv_indices())
            .unwrap_err()
            .to_string();
    assert!(e.contains("q") && e.contains("[1, 8, 64]"), "{e}");
    // V in HND order while the call says NHD (dims do not match).
    let v_hnd = Tensor::randn(0f32, 1.0, (2, HKV, PS, D_), &dev).unwrap();
    let e =
        flashpage::candle::attention(&cpu, &plan, &q, &k, &v_hnd, KvLayout::Nhd, b.kv_indices())
            .unwrap_err()
            .to_string();
    assert!(e.contains("v_cache"), "{e}");
    // Mixed dtypes.
    let k16 = k.to_dtype(CDType::BF16).unwrap();
    let e =
        flashpage::candle::attention(&cpu, &plan, &q, &k16, &k16, KvLayout::Nhd, b.kv_indices())
            .unwrap_err()
            .to_string();
    assert!(e.contains("dtype"), "{e}");
    // A page id out of range: an error, and the cache is left as it was.
    let cache = Tensor::randn(0f32, 1.0, (2, 2, PS, HKV, D_), &dev).unwrap();
    let before = cache.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rows = Tensor::randn(0f32, 1.0, (3, HKV, D_), &dev).unwrap();
    let mut fill = BatchBuilder::new(PS).unwrap();
    fill.push(3, 3, &[5]).unwrap();
    let e = flashpage::candle::append_kv(
        &cache,
        &rows,
        &rows,
        AppendBatch::from_builder(&fill),
        KvLayout::Nhd,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("page"), "{e}");
    assert_eq!(
        cache.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        before
    );
}
