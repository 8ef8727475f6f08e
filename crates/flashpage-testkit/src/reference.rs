//! The oracle: naive attention in f64, straight from the semantics of docs/semantics.md.
//!
//! Slow on purpose (no tiling, no online softmax, no split): it is what every backend and
//! SIMD level is checked against in tests and in `flashpage check`.

use flashpage::Error;
use flashpage::layout::{CustomMask, KvIndex, KvStrides};
use flashpage::options::{AttentionOptions, PosEncoding, alibi_slope};
use flashpage::validate::ValidBatch;

/// Inputs of the reference, widened to f64.
#[derive(Debug, Clone, Copy)]
pub struct ReferenceInputs<'a> {
    /// `[rows, num_qo_heads, head_dim]`.
    pub q: &'a [f64],
    /// K cache (paged, or ragged `[tokens, Hkv, D]`), addressed by `strides`.
    pub k: &'a [f64],
    /// V cache, addressed by `strides`.
    pub v: &'a [f64],
    /// Element strides of K and V.
    pub strides: KvStrides,
    /// Page ids (paged batches; ignored for ragged K/V).
    pub kv_indices: &'a [i32],
    /// Attention sinks `[num_qo_heads]`: one extra logit per query head in every row's
    /// softmax, with no value (docs/semantics.md, "Attention sinks").
    pub sinks: Option<&'a [f64]>,
    /// A custom mask (FlashInfer's packed layout): key `j` is visible to query row `i` of
    /// request `r` only where bit `8·mask_indptr[r] + i·kv_len + j` is set.
    pub custom_mask: Option<CustomMask<'a>>,
}

/// Output of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// `[rows, num_qo_heads, head_dim]`.
    pub o: Vec<f64>,
    /// `[rows, num_qo_heads]`, natural log; `-inf` for rows that see no key.
    pub lse: Vec<f64>,
}

/// Element offset of `(token t of the request starting at kv_start, kv head h)`.
pub fn kv_offset(
    vb: &ValidBatch<'_>,
    strides: &KvStrides,
    kv_indices: &[i32],
    kv_start: usize,
    t: usize,
    h: usize,
) -> usize {
    match vb.desc().kv {
        KvIndex::Paged(p) => {
            let page = kv_indices[kv_start + t / p.page_size] as usize;
            page * strides.page + (t % p.page_size) * strides.token + h * strides.head
        }
        KvIndex::Ragged { .. } => (kv_start + t) * strides.page + h * strides.head,
    }
}

/// Rotates `x` (length D) in place to position `pos` (rotate-half RoPE).
pub fn rope_rotate(x: &mut [f64], pos: f64, theta: f64, scale: f64) {
    let d = x.len();
    let half = d / 2;
    for f in 0..half {
        let ang = (pos / scale) * theta.powf(-2.0 * f as f64 / d as f64);
        let (s, c) = ang.sin_cos();
        let (a, b) = (x[f], x[f + half]);
        x[f] = a * c - b * s;
        x[f + half] = b * c + a * s;
    }
}

/// Checks that the inputs cover what `vb` reads: `q` has exactly its rows, every page id it
/// reads exists in `kv_indices` and is non-negative, and every K/V row it reads lies inside
/// `k` and `v` (checked arithmetic).
pub fn check_inputs(vb: &ValidBatch<'_>, inp: &ReferenceInputs<'_>) -> Result<(), Error> {
    let heads = vb.desc().heads;
    let (hq, hkv, d) = (heads.num_qo_heads(), heads.num_kv_heads(), heads.head_dim());
    let rows = vb.num_q_rows();
    let q_elems = rows
        .checked_mul(hq)
        .and_then(|x| x.checked_mul(d))
        .ok_or(Error::SizeOverflow { what: "q" })?;
    if inp.q.len() != q_elems {
        return Err(Error::TensorShape {
            tensor: "q",
            expected: format!("[{rows}, {hq}, {d}] ({q_elems} elements)"),
            actual: format!("{} elements", inp.q.len()),
        });
    }
    if let Some(s) = inp.sinks
        && s.len() != hq
    {
        return Err(Error::TensorShape {
            tensor: "sinks",
            expected: format!("[{hq}]"),
            actual: format!("{} elements", s.len()),
        });
    }
    if let Some(m) = &inp.custom_mask {
        flashpage::validate::check_custom_mask_host(m, vb.batch_size(), |r| {
            let q = vb.request(r);
            (q.qo_len, q.kv_len)
        })?;
    }
    let s = &inp.strides;
    for r in 0..vb.batch_size() {
        let req = vb.request(r);
        for t in 0..req.kv_len {
            let base = match vb.desc().kv {
                KvIndex::Paged(p) => {
                    let i = req.kv_start + t / p.page_size;
                    let Some(&page) = inp.kv_indices.get(i) else {
                        return Err(Error::IndicesTooShort {
                            batch_size: vb.batch_size(),
                            needed: i + 1,
                            actual: inp.kv_indices.len(),
                        });
                    };
                    let page = usize::try_from(page).map_err(|_| Error::PageIdOutOfRange {
                        index: i,
                        page_id: page.into(),
                        num_pages: inp.k.len() / s.page.max(1),
                    })?;
                    page.checked_mul(s.page)
                        .and_then(|x| x.checked_add((t % p.page_size).checked_mul(s.token)?))
                }
                KvIndex::Ragged { .. } => (req.kv_start + t).checked_mul(s.page),
            };
            let end = base
                .and_then(|b| b.checked_add((hkv - 1).checked_mul(s.head)?))
                .and_then(|b| b.checked_add(d));
            for (tensor, len) in [("k", inp.k.len()), ("v", inp.v.len())] {
                if end.is_none_or(|e| e > len) {
                    return Err(Error::TensorShape {
                        tensor,
                        expected: format!(
                            "elements for token {t} of request {r} (up to offset {})",
                            end.map_or("overflow".to_string(), |e| e.to_string())
                        ),
                        actual: format!("{len} elements"),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Computes attention for every request, row and head of `vb`.
///
/// # Errors
/// Inputs that do not cover what the batch reads ([`check_inputs`]): a short `q`, `k` or
/// `v`, missing or negative page ids. Never panics.
pub fn attention(
    vb: &ValidBatch<'_>,
    options: &AttentionOptions,
    inp: &ReferenceInputs<'_>,
) -> Result<ReferenceOutput, Error> {
    check_inputs(vb, inp)?;
    let heads = vb.desc().heads;
    let (hq, d, g) = (heads.num_qo_heads(), heads.head_dim(), heads.group_size());
    let rows = vb.num_q_rows();
    let mut o = vec![0.0; rows * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; rows * hq];
    let sm = options.resolved_sm_scale(d) as f64;
    let mut qv = vec![0.0; d];
    let mut kv = vec![0.0; d];
    let mut s = Vec::new();
    for r in 0..vb.batch_size() {
        let req = vb.request(r);
        for i in 0..req.qo_len {
            let row = req.qo_start + i;
            let qpos = (i + req.kv_len) as i64 - req.qo_len as i64;
            for h in 0..hq {
                let kh = h / g;
                qv.copy_from_slice(&inp.q[(row * hq + h) * d..][..d]);
                if let PosEncoding::Rope { theta, scale } = options.pos_encoding {
                    rope_rotate(&mut qv, qpos as f64, theta as f64, scale as f64);
                }
                s.clear();
                for j in 0..req.kv_len {
                    let jj = j as i64;
                    let visible = (!options.causal || jj <= qpos)
                        && options.window().is_none_or(|w| jj >= qpos - w as i64)
                        && inp.custom_mask.is_none_or(|m| {
                            let bit = m.indptr[r] as usize * 8 + i * req.kv_len + j;
                            m.bits[bit / 8] >> (bit % 8) & 1 == 1
                        });
                    if !visible {
                        s.push(f64::NEG_INFINITY);
                        continue;
                    }
                    let off = kv_offset(vb, &inp.strides, inp.kv_indices, req.kv_start, j, kh);
                    kv.copy_from_slice(&inp.k[off..off + d]);
                    if let PosEncoding::Rope { theta, scale } = options.pos_encoding {
                        rope_rotate(&mut kv, j as f64, theta as f64, scale as f64);
                    }
                    let mut x = qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f64>() * sm;
                    if let Some(c) = options.logits_soft_cap {
                        let c = c as f64;
                        x = c * (x / c).tanh();
                    }
                    if options.pos_encoding == PosEncoding::Alibi {
                        x += alibi_slope(h, hq) * (jj - qpos) as f64;
                    }
                    s.push(x);
                }
                // The sink is one more logit of the softmax, with no value vector.
                let sink = inp.sinks.map_or(f64::NEG_INFINITY, |x| x[h]);
                // A NaN score (NaN or infinite inputs) makes the row NaN: IEEE propagation
                // (`f64::max` alone would drop it).
                let m = if s.iter().any(|x| x.is_nan()) || sink.is_nan() {
                    f64::NAN
                } else {
                    s.iter().copied().fold(sink, f64::max)
                };
                if m == f64::NEG_INFINITY {
                    continue; // no visible key and no sink: o = 0, lse = -inf
                }
                if sink == f64::INFINITY {
                    // The limit: the sink takes all the weight.
                    lse[row * hq + h] = f64::INFINITY;
                    continue;
                }
                let mut sum = if sink == f64::NEG_INFINITY {
                    0.0
                } else {
                    (sink - m).exp()
                };
                let out = &mut o[(row * hq + h) * d..][..d];
                for (j, &x) in s.iter().enumerate() {
                    if x == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = (x - m).exp();
                    sum += p;
                    let off = kv_offset(vb, &inp.strides, inp.kv_indices, req.kv_start, j, kh);
                    for (acc, &vv) in out.iter_mut().zip(&inp.v[off..off + d]) {
                        *acc += p * vv;
                    }
                }
                for x in out.iter_mut() {
                    *x /= sum;
                }
                lse[row * hq + h] = m + sum.ln();
            }
        }
    }
    Ok(ReferenceOutput { o, lse })
}

/// `‖a − b‖ / ‖b‖` over finite pairs; `inf` if any element of `a` is NaN, or non-finite
/// where `b` is finite. `b` all zero compares absolutely.
pub fn rel_error(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        if y.is_infinite() || x.is_infinite() {
            if x != y {
                return f64::INFINITY;
            }
            continue;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// [`rel_error`] of an output stored in `dtype`, forgiving per element an absolute
/// difference of up to the dtype's smallest subnormal ([`subnormal_spacing`]): an `o` below
/// the dtype's normal range (f16 below 6.1e-5, e.g. a row whose weight a sink takes) is
/// stored to that absolute step, so a correct kernel is off by up to half of it (plus its
/// own f32 error across a rounding boundary) — a relative error unbounded as `o` shrinks.
/// `‖max(|a − b| − s, 0)‖ / ‖b‖`; non-finite elements as in [`rel_error`].
pub fn rel_error_stored(a: &[f64], b: &[f64], dtype: flashpage::layout::DType) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let s = subnormal_spacing(dtype);
    let shrunk: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x - y;
            if !d.is_finite() {
                x
            } else if d.abs() <= s {
                y
            } else {
                x - s.copysign(d)
            }
        })
        .collect();
    rel_error(&shrunk, b)
}

/// The spacing of `dtype`'s subnormals (its smallest positive value).
pub fn subnormal_spacing(dtype: flashpage::layout::DType) -> f64 {
    use flashpage::layout::DType;
    2f64.powi(match dtype {
        DType::F32 => -149,
        DType::BF16 => -133,
        DType::F16 => -24,
        DType::E4M3Fn => -9,
        DType::E5M2 => -16,
    })
}

/// The tolerance of docs/semantics.md (Accuracy) for q's dtype (`‖out − ref‖ / ‖ref‖`).
/// An FP8 K/V cache keeps the tolerance of q's dtype: the reference dequantises it exactly,
/// so the kernels' error is f32 accumulation and o's rounding (docs/numerics.md, "FP8 KV
/// cache"). The FP8 dtypes are never q's; given one, the bf16 tolerance (the loosest).
pub fn tolerance(dtype: flashpage::layout::DType) -> f64 {
    use flashpage::layout::DType;
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 | DType::E4M3Fn | DType::E5M2 => 1e-2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashpage::layout::DType;

    #[test]
    fn stored_error_forgives_the_subnormal_step_only() {
        // A row of f16 outputs near 5e-7 (8 subnormal steps of 2^-24): correct values
        // rounded to f16 are off by up to half a step, 3% relative.
        let step = 2f64.powi(-24);
        let want = [4.84e-7, 5.15e-7, -6.65e-7, 2.39e-7];
        let stored: Vec<f64> = want
            .iter()
            .map(|&y: &f64| (y / step).round() * step)
            .collect();
        assert!(rel_error(&stored, &want) > 1e-2);
        assert_eq!(rel_error_stored(&stored, &want, DType::F16), 0.0);
        // One step too far in one element is an error the tolerance sees.
        let mut wrong = stored.clone();
        wrong[0] += 2.0 * step;
        assert!(rel_error_stored(&wrong, &want, DType::F16) > tolerance(DType::F16));
        // f32 forgives nothing measurable; NaN and mismatched lengths still fail.
        assert!(rel_error_stored(&stored, &want, DType::F32) > 1e-2);
        assert_eq!(
            rel_error_stored(&[f64::NAN], &[1.0], DType::F16),
            f64::INFINITY
        );
        assert_eq!(rel_error_stored(&[1.0], &[], DType::F16), f64::INFINITY);
    }
}
