//! A serving loop on the CPU backend: requests of different lengths prefill, decode, join and
//! finish; 4 layers alternate a sliding window (Gemma-2) with full attention; K is rotated
//! (RoPE, NTK scaling) on its way into the cache and q before attention. Every layer of
//! every step is checked against the f64 reference; a mismatch exits with status 1.
//!
//! `cargo run --release -p flashpage --example serving_loop`

use flashpage::prelude::*;
use flashpage_testkit::reference::{ReferenceInputs, attention, rel_error, tolerance};

const LAYERS: usize = 4;
const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 64;
const PAGE: usize = 16;

fn main() -> Result<()> {
    let heads = HeadConfig::new(HQ, HKV, D)?;
    let num_pages = pages_for_budget(4 << 20, &heads, DType::BF16, PAGE, LAYERS)?;
    let cache = CacheDesc::new(PAGE, num_pages, KvLayout::Nhd, DType::BF16);
    let mut attn = Attention::new(heads, cache, Limits::new(8, 256, 512), 2)?;
    let mut alloc = PageAllocator::new(num_pages, PAGE)?;
    let zeros = vec![bf16::ZERO; attn.cache_elems()];
    let mut caches = vec![(zeros.clone(), zeros); LAYERS];
    let rope = Rope::new(1e4).with_scaling(RopeScaling::Ntk { factor: 4.0 });
    let layer_options = |l: usize| {
        let o = AttentionOptions::new()
            .with_causal(true)
            .with_logits_soft_cap(50.0);
        if l.is_multiple_of(2) {
            o.with_window_left(31)
        } else {
            o
        }
    };
    // (id, prompt length, step it joins, last step it decodes)
    let requests = [
        (1u64, 37, 0, 6),
        (2, 100, 0, 11),
        (3, 5, 0, 3),
        (4, 70, 4, 11),
        (5, 18, 7, 11),
    ];
    let mut seed = 7u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let mut worst = 0f64;
    for step in 0..12 {
        let mut batch = Vec::new(); // (id, new tokens)
        for &(id, prompt, join, last) in &requests {
            if step == join {
                alloc.reserve(id, prompt)?;
                batch.push((id, prompt));
            } else if step > join && step <= last {
                alloc.extend(id, 1)?;
                batch.push((id, 1));
            } else if step == last + 1 {
                alloc.release(id)?;
            }
        }
        // Positions of this step's tokens: the last `n` of each request.
        let mut positions = Vec::new();
        for &(id, n) in &batch {
            let len = alloc.len_of(id)?;
            positions.extend((len - n..len).map(|p| p as i32));
        }
        let rows = positions.len();
        attn.plan(&alloc.batch(&batch)?, &layer_options(0))?;
        for (l, (k_cache, v_cache)) in caches.iter_mut().enumerate() {
            // This layer's projections of the new tokens: a fused [rows, (HQ + 2 HKV) * D].
            let (row, k0, v0) = ((HQ + 2 * HKV) * D, HQ * D, (HQ + HKV) * D);
            let qkv = random(rows * row);
            let k = Rows::strided(TensorRef::F32(&qkv[k0..]), rows, HKV, D, row, D)?;
            let v = Rows::strided(TensorRef::F32(&qkv[v0..]), rows, HKV, D, row, D)?;
            let at = AppendRope {
                rope: &rope,
                positions: Some(&positions),
            };
            attn.append(
                k,
                v,
                TensorMut::BF16(k_cache),
                TensorMut::BF16(v_cache),
                Some(at),
            )?;
            let mut q: Vec<bf16> = (0..rows)
                .flat_map(|t| &qkv[t * row..t * row + k0])
                .map(|&x| bf16::from_f32(x))
                .collect();
            apply_rope(
                &rope,
                RowsMut::dense(TensorMut::BF16(&mut q), rows, HQ, D)?,
                &positions,
            )?;
            let mut o = vec![bf16::NAN; rows * HQ * D];
            let (kc, vc) = (TensorRef::BF16(k_cache), TensorRef::BF16(v_cache));
            let args = LayerArgs::new(TensorRef::BF16(&q), kc, vc, TensorMut::BF16(&mut o));
            attn.run_with(&layer_options(l), args)?;

            // The f64 reference on the same cache and the same page ids.
            let vb = flashpage::validate::check_batch(&attn.batch_desc()?, &layer_options(l))?;
            let f64s = |x: &[bf16]| x.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
            let (q64, k64, v64) = (f64s(&q), f64s(k_cache), f64s(v_cache));
            let strides = KvStrides::dense(KvLayout::Nhd, PAGE, HKV, D);
            let kv_indices = attn.batch().kv_indices();
            let inputs = ReferenceInputs {
                q: &q64,
                k: &k64,
                v: &v64,
                strides,
                kv_indices,
                sinks: None,
                custom_mask: None,
            };
            let err = rel_error(&f64s(&o), &attention(&vb, &layer_options(l), &inputs)?.o);
            worst = worst.max(err);
            if err.is_nan() || err > tolerance(DType::BF16) {
                eprintln!(
                    "step {step} layer {l}: relative error {err} above {}",
                    tolerance(DType::BF16)
                );
                std::process::exit(1);
            }
        }
        println!(
            "step {step:2}: {} requests, {rows:3} new tokens, {} pages free",
            batch.len(),
            alloc.free_pages()
        );
    }
    println!("all steps match the f64 reference (worst relative error {worst:.2e})");
    Ok(())
}
