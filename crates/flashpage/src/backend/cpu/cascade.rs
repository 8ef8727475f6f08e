//! Running a [`CascadePlan`] on the CPU: each level is an ordinary run into the level buffers
//! of the workspace, folded into f32 accumulators by its LSE; the last step normalises, applies
//! the attention sinks once and writes `o` and `lse`.

use rayon::prelude::*;

use super::CpuBackend;
use super::ctx::sink_epilogue;
use super::elem::Elem;
use crate::backend::{KvCache, RunArgs};
use crate::error::{Error, Result, shape_str};
use crate::plan::cascade::{CascadePlan, check_cascade_run};
use crate::tensor::TensorMut;
use crate::workspace::{CPU_BASE_ALIGN, WorkspaceReq};

impl CpuBackend {
    /// Runs a cascade: attention of every query row over its keys at all levels, as if the
    /// levels were one flat batch (docs/cascade.md).
    ///
    /// `args.kv` is the paged cache with **no** page ids (`kv_indices` empty: the plan holds
    /// each level's); q, o and lse are contiguous `[rows, num_qo_heads, head_dim]` /
    /// `[rows, num_qo_heads]`; `sinks` apply once, to the merged state. The float workspace
    /// holds [`CascadePlan::float_requirement`] for o's dtype, 64-byte aligned.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming `custom_mask` when a mask is passed (its bits index
    /// the flat batch's keys); [`Error::TensorShape`] naming `kv_indices` when page ids are
    /// passed, `o` or `lse` when
    /// their length is not the cascade's; [`Error::DTypeMismatch`] naming `o`;
    /// [`Error::WorkspaceTooSmall`] / [`Error::WorkspaceMisaligned`] for the workspace; every
    /// error of [`CpuBackend::run`] for a level (q, K, V, sinks against the level's plan).
    /// Nothing is written to `o` or `lse` unless every check passes.
    pub fn run_cascade(
        &self,
        plan: &CascadePlan,
        args: RunArgs<'_, '_>,
        float_workspace: &mut [u8],
    ) -> Result<()> {
        check_cascade_run(args.custom_mask.is_some(), args.kv.kv_indices.len())?;
        let (qd, od) = (args.q.dtype(), args.o.dtype());
        if qd != od {
            return Err(Error::DTypeMismatch {
                tensor: "o",
                expected: qd.name(),
                actual: od.name(),
            });
        }
        let heads = plan.heads();
        let (hq, d) = (heads.num_qo_heads(), heads.head_dim());
        let states = plan.num_q_rows() * hq;
        if args.o.len() != states * d {
            return Err(Error::TensorShape {
                tensor: "o",
                expected: shape_str(&[plan.num_q_rows(), hq, d]),
                actual: shape_str(&[args.o.len()]),
            });
        }
        if let Some(l) = &args.lse
            && l.len() != states
        {
            return Err(Error::TensorShape {
                tensor: "lse",
                expected: shape_str(&[plan.num_q_rows(), hq]),
                actual: shape_str(&[l.len()]),
            });
        }
        if let Some(s) = args.sinks
            && s.len() != hq
        {
            return Err(Error::TensorShape {
                tensor: "sinks",
                expected: shape_str(&[hq]),
                actual: shape_str(&[s.len()]),
            });
        }
        let req = plan.float_requirement(od)?;
        req.check_fits(float_workspace.len())?;
        let addr = float_workspace.as_ptr() as usize;
        if !addr.is_multiple_of(CPU_BASE_ALIGN) {
            return Err(Error::WorkspaceMisaligned {
                workspace: "float",
                address: addr,
                align: CPU_BASE_ALIGN,
            });
        }
        let RunArgs {
            q,
            kv,
            o,
            lse,
            sinks,
            custom_mask: _,
        } = args;
        let parts = Parts::carve(&req, float_workspace);
        let run = Cascade { plan, q, kv, sinks };
        match o {
            TensorMut::F32(o) => self.cascade_typed(&run, parts, o, lse, |s| TensorMut::F32(s)),
            TensorMut::F16(o) => self.cascade_typed(&run, parts, o, lse, |s| TensorMut::F16(s)),
            TensorMut::BF16(o) => self.cascade_typed(&run, parts, o, lse, |s| TensorMut::BF16(s)),
            // q and o are float tensors (FP8 is a cache format only).
            TensorMut::Fp8(..) => Err(Error::DTypeMismatch {
                tensor: "q",
                expected: "f32, f16 or bf16",
                actual: qd.name(),
            }),
        }
    }

    fn cascade_typed<E: Elem>(
        &self,
        run: &Cascade<'_, '_>,
        parts: Parts<'_>,
        o: &mut [E],
        lse: Option<&mut [f32]>,
        wrap: fn(&mut [E]) -> TensorMut<'_>,
    ) -> Result<()> {
        let plan = run.plan;
        let heads = plan.heads();
        let (hq, d) = (heads.num_qo_heads(), heads.head_dim());
        let Parts {
            levels,
            level_o,
            level_lse,
            acc_o,
            acc_sum,
            acc_max,
        } = parts;
        let level_o: &mut [E] = cast(level_o);
        let level_lse: &mut [f32] = cast(level_lse);
        let acc_o: &mut [f32] = cast(acc_o);
        let acc_sum: &mut [f32] = cast(acc_sum);
        let acc_max: &mut [f32] = cast(acc_max);
        // A 256-aligned offset from a 64-aligned base: every level run sees an aligned
        // workspace of the largest level's size.
        acc_o.fill(0.0);
        acc_sum.fill(0.0);
        acc_max.fill(f32::NEG_INFINITY);
        for l in 0..plan.num_levels() {
            let (Some(lp), Some(ids)) = (plan.level_plan(l), plan.level_kv_indices(l)) else {
                continue;
            };
            let kv = KvCache {
                kv_indices: ids,
                ..run.kv
            };
            let args = RunArgs {
                q: run.q,
                kv,
                o: wrap(&mut *level_o),
                lse: Some(&mut *level_lse),
                sinks: None,
                custom_mask: None,
            };
            self.run_checked(lp, args, None, &mut *levels)?;
            let (lo, ll) = (&*level_o, &*level_lse);
            self.pool.install(|| {
                acc_o
                    .par_chunks_mut(d)
                    .zip(acc_sum.par_iter_mut())
                    .zip(acc_max.par_iter_mut())
                    .enumerate()
                    .for_each(|(i, ((acc, sum), mx))| {
                        fold_state(acc, sum, mx, &lo[i * d..(i + 1) * d], ll[i]);
                    });
            });
        }
        let sinks = run.sinks;
        let finish = |i: usize| {
            let (f, l) = finish_state(acc_max[i], acc_sum[i]);
            match sinks {
                Some(s) => {
                    let (g, l) = sink_epilogue(l, s[i % hq]);
                    (f * g, l)
                }
                None => (f, l),
            }
        };
        self.pool.install(|| {
            o.par_chunks_mut(d)
                .zip(acc_o.par_chunks(d))
                .enumerate()
                .for_each(|(i, (out, acc))| {
                    let f = finish(i).0;
                    for (dst, &a) in out.iter_mut().zip(acc) {
                        *dst = E::from_f32(a * f);
                    }
                });
        });
        if let Some(lse) = lse {
            for (i, dst) in lse.iter_mut().enumerate() {
                *dst = finish(i).1;
            }
        }
        Ok(())
    }
}

/// The typed view of a workspace buffer: 256-aligned offsets from a 64-aligned base
/// (checked by `run_cascade`), or empty.
fn cast<T: bytemuck::Pod>(b: &mut [u8]) -> &mut [T] {
    if b.is_empty() {
        &mut []
    } else {
        bytemuck::cast_slice_mut(b)
    }
}

/// The run's inputs shared by every level.
struct Cascade<'p, 'a> {
    plan: &'p CascadePlan,
    q: crate::tensor::TensorRef<'a>,
    kv: KvCache<'a>,
    sinks: Option<&'a [f32]>,
}

/// The workspace's buffers, split from one slice (offsets ascending, checked to fit).
struct Parts<'w> {
    levels: &'w mut [u8],
    level_o: &'w mut [u8],
    level_lse: &'w mut [u8],
    acc_o: &'w mut [u8],
    acc_sum: &'w mut [u8],
    acc_max: &'w mut [u8],
}

impl<'w> Parts<'w> {
    fn carve(req: &WorkspaceReq, ws: &'w mut [u8]) -> Parts<'w> {
        let mut rest = ws;
        let mut at = 0;
        let mut take = |name: &str| {
            // The layout fits the workspace (checked by the caller); a buffer of no bytes is
            // not recorded and is empty.
            let Some(b) = req.buffer(name) else {
                return &mut [][..];
            };
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(b.offset - at);
            let (buf, tail) = tail.split_at_mut(b.bytes);
            rest = tail;
            at = b.offset + b.bytes;
            buf
        };
        Parts {
            levels: take("levels"),
            level_o: take("level_o"),
            level_lse: take("level_lse"),
            acc_o: take("acc_o"),
            acc_sum: take("acc_sum"),
            acc_max: take("acc_max"),
        }
    }
}

/// Folds a level's normalised state `(o, lse)` into the accumulator `(acc, sum, mx)`, which
/// holds `Σ w_i o_i` and `Σ w_i` with `w_i = e^(lse_i − mx)`. The rules are the split-KV
/// merge's (docs/numerics.md): an empty state (`-inf`) adds nothing; a `NaN` state makes the
/// row `NaN`; past the f32 range (`mx = +inf`) the `+inf` states share the weight equally.
#[inline]
fn fold_state(acc: &mut [f32], sum: &mut f32, mx: &mut f32, o: &[impl Elem], lse: f32) {
    if mx.is_nan() || lse == f32::NEG_INFINITY {
        return;
    }
    if lse.is_nan() {
        *mx = f32::NAN;
        return;
    }
    if lse > *mx {
        let scale = if lse == f32::INFINITY || *mx == f32::NEG_INFINITY {
            0.0
        } else {
            (*mx - lse).exp()
        };
        *sum *= scale;
        acc.iter_mut().for_each(|a| *a *= scale);
        *mx = lse;
    }
    let w = if *mx == f32::INFINITY {
        if lse == f32::INFINITY { 1.0 } else { 0.0 }
    } else {
        (lse - *mx).exp()
    };
    if w == 0.0 {
        return;
    }
    *sum += w;
    for (a, x) in acc.iter_mut().zip(o) {
        *a = w.mul_add(x.to_f32(), *a);
    }
}

/// `(factor, lse)` of a finished accumulator: the output is `acc · factor`.
#[inline]
fn finish_state(mx: f32, sum: f32) -> (f32, f32) {
    if mx.is_nan() {
        (f32::NAN, f32::NAN)
    } else if mx == f32::NEG_INFINITY || sum == 0.0 {
        (0.0, f32::NEG_INFINITY)
    } else if mx == f32::INFINITY {
        (1.0 / sum, f32::INFINITY)
    } else {
        (1.0 / sum, mx + sum.ln())
    }
}

#[cfg(test)]
mod tests {
    use super::{finish_state, fold_state};

    #[test]
    fn folding_matches_the_closed_form() {
        // States (o, lse) = (1, 0), (3, ln 3), (-, -inf): merged o = (1 + 9) / 4, lse = ln 4.
        let (mut acc, mut sum, mut mx) = ([0f32], 0f32, f32::NEG_INFINITY);
        fold_state(&mut acc, &mut sum, &mut mx, &[1f32], 0.0);
        fold_state(&mut acc, &mut sum, &mut mx, &[3f32], 3f32.ln());
        fold_state(&mut acc, &mut sum, &mut mx, &[100f32], f32::NEG_INFINITY);
        let (f, l) = finish_state(mx, sum);
        assert!((acc[0] * f - 2.5).abs() < 1e-6 && (l - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn non_finite_states_follow_the_merge_rules() {
        let (mut acc, mut sum, mut mx) = ([0f32], 0f32, f32::NEG_INFINITY);
        let (f, l) = finish_state(mx, sum);
        assert_eq!((acc[0] * f, l), (0.0, f32::NEG_INFINITY));
        fold_state(&mut acc, &mut sum, &mut mx, &[5f32], 2.0);
        fold_state(&mut acc, &mut sum, &mut mx, &[1f32], f32::INFINITY);
        fold_state(&mut acc, &mut sum, &mut mx, &[3f32], f32::INFINITY);
        fold_state(&mut acc, &mut sum, &mut mx, &[7f32], 1.0);
        let (f, l) = finish_state(mx, sum);
        assert_eq!((acc[0] * f, l), (2.0, f32::INFINITY));
        fold_state(&mut acc, &mut sum, &mut mx, &[0f32], f32::NAN);
        fold_state(&mut acc, &mut sum, &mut mx, &[1f32], 0.0);
        assert!(finish_state(mx, sum).1.is_nan());
    }
}
