//! Merging attention states `(o, lse)` (DESIGN §3): the split-KV merge step of a plan, and
//! the public merge operators for cascades and custom splits.

use super::Ctx;
use super::elem::Elem;
use super::simd::Isa;

/// Merges the partial states of plan merge row `m` for every head into `o`/`lse`.
#[inline(always)]
pub(crate) fn merge_row<I: Isa, E: Elem>(ctx: &Ctx<'_, E>, m: usize, buf: &mut Vec<f32>) {
    let plan = ctx.plan;
    let mr = plan.merge_row(m);
    let heads = plan.heads();
    let (hq, d) = (heads.num_qo_heads(), heads.head_dim());
    buf.resize(d, 0.0);
    for h in 0..hq {
        // SAFETY: partial rows are read-only during the merge step.
        let lse_of = |i: usize| unsafe {
            ctx.partial_lse
                .slice((mr.first + i * mr.stride) * hq + h, 1)[0]
        };
        let mut mx = f32::NEG_INFINITY;
        for i in 0..mr.count {
            mx = mx.max(lse_of(i));
        }
        let acc = &mut buf[..d];
        acc.fill(0.0);
        let lse = if mx == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            let mut sum = 0.0f32;
            for i in 0..mr.count {
                let li = lse_of(i);
                if li == f32::NEG_INFINITY {
                    continue;
                }
                let wgt = (li - mx).exp();
                sum += wgt;
                let prow = mr.first + i * mr.stride;
                // SAFETY: as above.
                let src = unsafe { ctx.partial_o.slice((prow * hq + h) * d, d) };
                I::axpy(acc, wgt, src);
            }
            I::scale(acc, 1.0 / sum);
            mx + sum.ln()
        };
        // SAFETY: merge rows are distinct query rows; each writes only its own row × heads.
        unsafe {
            I::store(acc, ctx.o.slice((mr.row * hq + h) * d, d));
            if let Some(l) = &ctx.lse {
                l.slice(mr.row * hq + h, 1)[0] = lse;
            }
        }
    }
}
