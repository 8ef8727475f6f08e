//! The attention tile kernel: one work item's packed q rows against its KV chunk, for one
//! KV head, with an online softmax over key blocks.
//!
//! Decode is the special case of a tile holding one request's whole GQA group, so each K/V
//! row is loaded (and widened to f32) once and used by every query head of its group.

use super::elem::Elem;
use super::simd::Isa;
use super::{Ctx, Scratch};
use crate::options::alibi_slope;

/// Keys per block: S is `rows × KEY_BLOCK`.
pub(crate) const KEY_BLOCK: usize = 32;

/// Rotates a row in place (rotate-half RoPE) at `pos`.
#[inline(always)]
pub(crate) fn rope(x: &mut [f32], pos: f32, inv_freq: &[f32]) {
    let half = x.len() / 2;
    for f in 0..half {
        let (s, c) = (pos * inv_freq[f]).sin_cos();
        let (a, b) = (x[f], x[f + half]);
        x[f] = a * c - b * s;
        x[f + half] = b * c + a * s;
    }
}

/// Runs `(work item w, kv head kvh)`.
#[inline(always)]
pub(crate) fn attend<I: Isa, E: Elem>(ctx: &Ctx<'_, E>, w: usize, kvh: usize, sc: &mut Scratch) {
    let plan = ctx.plan;
    let item = plan.work_item(w);
    let req = plan.request(item.request);
    let heads = plan.heads();
    let (hq, d, g) = (heads.num_qo_heads(), heads.head_dim(), heads.group_size());
    let rows = item.row_end - item.row_start;
    if rows == 0 {
        return;
    }
    let shift = req.kv_len as i64 - req.qo_len as i64;
    sc.prepare(rows, d);

    // Q tile (scaled, rotated) and the visible key range of each row.
    let mut lo_all = i64::MAX;
    let mut hi_all = i64::MIN;
    for p in 0..rows {
        let packed = item.row_start + p;
        let (i, hh) = (packed / g, kvh * g + packed % g);
        let qrow = &mut sc.q[p * d..(p + 1) * d];
        let src = (req.qo_start + i) * hq * d + hh * d;
        I::load(&ctx.q[src..src + d], qrow);
        let qpos = i as i64 + shift;
        if ctx.rope {
            rope(qrow, qpos as f32 / ctx.rope_scale, &ctx.inv_freq);
        }
        I::scale(qrow, ctx.sm_scale);
        let hi = if ctx.causal {
            qpos
        } else {
            req.kv_len as i64 - 1
        };
        let lo = ctx.window.map_or(0, |win| qpos - win as i64);
        sc.lo[p] = lo;
        sc.hi[p] = hi;
        sc.slope[p] = if ctx.alibi {
            alibi_slope(hh, hq) as f32
        } else {
            0.0
        };
        sc.qpos[p] = qpos;
        lo_all = lo_all.min(lo);
        hi_all = hi_all.max(hi);
    }
    let start = (item.kv_start as i64).max(lo_all).max(0) as usize;
    let end = ((item.kv_end as i64).min(hi_all.saturating_add(1))).max(start as i64) as usize;

    let mut j0 = start;
    while j0 < end {
        let nb = KEY_BLOCK.min(end - j0);
        // Load and widen the block's K and V rows once for the whole tile.
        for jj in 0..nb {
            let off = ctx.kv_offset(req.kv_start, j0 + jj, kvh);
            let krow = &mut sc.k[jj * d..(jj + 1) * d];
            I::load(&ctx.k[off..off + d], krow);
            if ctx.rope {
                rope(krow, (j0 + jj) as f32 / ctx.rope_scale, &ctx.inv_freq);
            }
            I::load(&ctx.v[off..off + d], &mut sc.v[jj * d..(jj + 1) * d]);
        }
        for p in 0..rows {
            let qrow = &sc.q[p * d..(p + 1) * d];
            let s = &mut sc.s[..nb];
            let mut mb = f32::NEG_INFINITY;
            for (jj, sj) in s.iter_mut().enumerate() {
                let j = (j0 + jj) as i64;
                if j > sc.hi[p] || j < sc.lo[p] {
                    *sj = f32::NEG_INFINITY;
                    continue;
                }
                let mut x = I::dot(qrow, &sc.k[jj * d..(jj + 1) * d]);
                if let Some(c) = ctx.soft_cap {
                    x = c * (x / c).tanh();
                }
                if ctx.alibi {
                    x += sc.slope[p] * (j - sc.qpos[p]) as f32;
                }
                *sj = x;
                mb = mb.max(x);
            }
            if mb == f32::NEG_INFINITY {
                continue;
            }
            let m_old = sc.m[p];
            let m_new = m_old.max(mb);
            let acc = &mut sc.acc[p * d..(p + 1) * d];
            if m_old != f32::NEG_INFINITY && m_old != m_new {
                let corr = (m_old - m_new).exp();
                I::scale(acc, corr);
                sc.l[p] *= corr;
            }
            sc.m[p] = m_new;
            let mut l = sc.l[p];
            for (jj, &sj) in s.iter().enumerate() {
                if sj == f32::NEG_INFINITY {
                    continue;
                }
                let e = (sj - m_new).exp();
                l += e;
                I::axpy(acc, e, &sc.v[jj * d..(jj + 1) * d]);
            }
            sc.l[p] = l;
        }
        j0 += nb;
    }

    // Finalise and write.
    for p in 0..rows {
        let packed = item.row_start + p;
        let (i, hh) = (packed / g, kvh * g + packed % g);
        let l = sc.l[p];
        let acc = &mut sc.acc[p * d..(p + 1) * d];
        let lse = if l > 0.0 {
            I::scale(acc, 1.0 / l);
            sc.m[p] + l.ln()
        } else {
            acc.fill(0.0);
            f32::NEG_INFINITY
        };
        match item.partial {
            Some(base) => {
                let prow = base + i;
                // SAFETY: (item, kv head) pairs own disjoint partial rows × heads.
                unsafe {
                    ctx.partial_o
                        .slice((prow * hq + hh) * d, d)
                        .copy_from_slice(acc);
                    ctx.partial_lse.slice(prow * hq + hh, 1)[0] = lse;
                }
            }
            None => {
                let row = req.qo_start + i;
                // SAFETY: (item, kv head) pairs of unsplit requests own disjoint rows × heads.
                unsafe {
                    I::store(acc, ctx.o.slice((row * hq + hh) * d, d));
                    if let Some(l) = &ctx.lse {
                        l.slice(row * hq + hh, 1)[0] = lse;
                    }
                }
            }
        }
    }
}
