//! The CPU backend: the default everywhere, and the reference the CUDA backend is checked
//! against. It executes the same plan the GPU does: work items write `o`/`lse` or partial
//! states into the float workspace, then the merge step combines split rows.
//!
//! Parallelism is explicit (a thread count, fixed at construction); the unit of parallel
//! work is a work item for one KV head (prefill) or a range of KV heads (decode). The SIMD level is detected once at construction
//! (or chosen, for tests), so every run of a backend uses one specialised loop nest.

//!
//! Files import downward only (checked by `scripts/import_graph.py`):
//! `elem` → `simd/` (ISA primitives) → `tile`, `ctx` → kernels (`attend`, `decode`,
//! `dpbf16`, `merge`) → `dispatch` (the `#[target_feature]` entry points) → this file.

mod attend;
mod cascade;
mod ctx;
mod decode;
mod dispatch;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
mod elem;
mod merge;
mod prefill;
pub mod simd;
mod tile;

use half::{bf16, f16};
use rayon::prelude::*;

use ctx::{Ctx, Scratch, SharedMut, Strides};
pub use elem::Elem;
use elem::{E4M3, E5M2};
pub use merge::{merge_state, merge_state_in_place, merge_states};
pub use simd::SimdLevel;

use super::{RunArgs, check_run_args};
use crate::error::{Error, Result};
use crate::fp8::Fp8Format;
use crate::layout::{CustomMask, RunStrides};
use crate::options::PosEncoding;
use crate::plan::{Plan, PlanKind};
use crate::tensor::{TensorMut, TensorRef};
use crate::workspace::CPU_BASE_ALIGN;

/// The most threads a [`CpuBackend`] starts (4096): the one thread limit of the library,
/// checked before any thread starts. Callers that take a thread count from users (the CLI's
/// `--threads`) check against it too.
pub const MAX_THREADS: usize = 4096;

/// The CPU backend: a thread pool of an explicit size and a SIMD level.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    simd: SimdLevel,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .field("simd", &self.simd)
            .finish()
    }
}

impl CpuBackend {
    /// A backend with `threads` threads (0: one per available core) and the best SIMD level.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_simd(threads, SimdLevel::detect())
    }

    /// A backend with a chosen SIMD level (an error if this machine lacks it). More than
    /// [`MAX_THREADS`] threads is an [`Error::LimitExceeded`], raised before any thread starts.
    pub fn with_simd(threads: usize, simd: SimdLevel) -> Result<Self> {
        if threads > MAX_THREADS {
            return Err(Error::LimitExceeded {
                field: "threads",
                limit: MAX_THREADS,
                actual: threads,
                rule: "most threads of a cpu backend",
            });
        }
        if !simd.is_available() {
            return Err(Error::BackendUnavailable {
                backend: "cpu",
                reason: format!("simd level {} is not supported by this cpu", simd.name()),
            });
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("flashpage-cpu-{i}"))
            .build()
            .map_err(|e| Error::BackendUnavailable {
                backend: "cpu",
                reason: format!("cannot start {threads} threads: {e}"),
            })?;
        Ok(CpuBackend {
            pool,
            threads,
            simd,
        })
    }

    /// Threads of the pool: pass it as the plan's parallelism.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The SIMD level in use.
    pub fn simd(&self) -> SimdLevel {
        self.simd
    }

    /// Runs `plan` on host tensors, using `float_workspace` (at least
    /// `plan.requirement().float.total()` bytes, base aligned to 64) for partial states.
    /// q and o are contiguous `[rows, num_qo_heads, head_dim]` (see
    /// [`CpuBackend::run_strided`] for strided ones).
    ///
    /// Arguments are checked against the plan first (shapes, dtypes, strides, page ids); on
    /// error nothing is written.
    pub fn run(
        &self,
        plan: &Plan,
        args: RunArgs<'_, '_>,
        float_workspace: &mut [u8],
    ) -> Result<()> {
        self.run_checked(plan, args, None, float_workspace)
    }

    /// [`CpuBackend::run`] with strided q and o: element `(row, head, d)` of q is at
    /// `row*strides.q.row + head*strides.q.head + d` (a view into a fused QKV buffer), and
    /// of o likewise (o may be a view into a larger buffer: elements between its rows and
    /// heads are never written). The buffers must reach the last element; o's blocks must
    /// not overlap (typed errors naming `q` or `o` otherwise, and nothing is written).
    pub fn run_strided(
        &self,
        plan: &Plan,
        args: RunArgs<'_, '_>,
        strides: RunStrides,
        float_workspace: &mut [u8],
    ) -> Result<()> {
        self.run_checked(plan, args, Some(strides), float_workspace)
    }

    fn run_checked(
        &self,
        plan: &Plan,
        args: RunArgs<'_, '_>,
        strides: Option<RunStrides>,
        float_workspace: &mut [u8],
    ) -> Result<()> {
        let mut shapes = args.shapes();
        shapes.qo = strides;
        check_run_args(plan, &shapes)?;
        let need = plan.requirement().float;
        need.check_fits(float_workspace.len())?;
        let addr = float_workspace.as_ptr() as usize;
        if need.total() > 0 && !addr.is_multiple_of(CPU_BASE_ALIGN) {
            return Err(Error::WorkspaceMisaligned {
                workspace: "float",
                address: addr,
                align: CPU_BASE_ALIGN,
            });
        }
        let qo = strides.unwrap_or_else(|| RunStrides::contiguous(plan.heads()));
        let RunArgs {
            q,
            kv,
            o,
            lse,
            sinks,
            custom_mask,
        } = args;
        let ws = SharedMut::new(float_workspace);
        let st = Strides {
            k: kv.strides,
            v: kv.v_strides,
            q: qo.q,
            o: qo.o,
        };
        // Scales per KV head (a per-tensor scale repeated; 1 for a float cache).
        let hkv = plan.heads().num_kv_heads();
        let per_head = |s: Option<&[f32]>| -> Vec<f32> {
            match s {
                Some(s) if s.len() == hkv => s.to_vec(),
                Some(s) => vec![s[0]; hkv],
                None => vec![1.0; hkv],
            }
        };
        let scales = [per_head(kv.k_scale), per_head(kv.v_scale)];
        let ids = kv.kv_indices;
        let extra = (sinks, custom_mask);
        match (q, kv.k, kv.v, o) {
            (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v), TensorMut::F32(o)) => {
                self.run_typed::<f32, f32>(plan, q, k, v, scales, st, ids, o, lse, extra, ws)
            }
            (TensorRef::F16(q), TensorRef::F16(k), TensorRef::F16(v), TensorMut::F16(o)) => {
                self.run_typed::<f16, f16>(plan, q, k, v, scales, st, ids, o, lse, extra, ws)
            }
            (TensorRef::BF16(q), TensorRef::BF16(k), TensorRef::BF16(v), TensorMut::BF16(o)) => {
                self.run_typed::<bf16, bf16>(plan, q, k, v, scales, st, ids, o, lse, extra, ws)
            }
            (q, TensorRef::Fp8(f, k), TensorRef::Fp8(_, v), o) => {
                self.run_fp8(plan, q, f, (k, v), scales, st, ids, o, lse, extra, ws)
            }
            _ => unreachable!("dtypes were checked by check_run_args"),
        }
        Ok(())
    }

    /// [`CpuBackend::run_typed`] for an FP8 cache of format `f` (one format for K and V,
    /// checked by `check_run_args`), with q and o of any float type.
    #[allow(clippy::too_many_arguments)]
    fn run_fp8(
        &self,
        plan: &Plan,
        q: TensorRef<'_>,
        f: Fp8Format,
        (k, v): (&[u8], &[u8]),
        scales: [Vec<f32>; 2],
        st: Strides,
        ids: &[i32],
        o: TensorMut<'_>,
        lse: Option<&mut [f32]>,
        extra: (Option<&[f32]>, Option<CustomMask<'_>>),
        ws: SharedMut<'_, u8>,
    ) {
        macro_rules! go {
            ($e:ty, $q:expr, $o:expr) => {
                match f {
                    Fp8Format::E4M3Fn => self.run_typed::<$e, E4M3>(
                        plan,
                        $q,
                        bytemuck::cast_slice(k),
                        bytemuck::cast_slice(v),
                        scales,
                        st,
                        ids,
                        $o,
                        lse,
                        extra,
                        ws,
                    ),
                    Fp8Format::E5M2 => self.run_typed::<$e, E5M2>(
                        plan,
                        $q,
                        bytemuck::cast_slice(k),
                        bytemuck::cast_slice(v),
                        scales,
                        st,
                        ids,
                        $o,
                        lse,
                        extra,
                        ws,
                    ),
                }
            };
        }
        match (q, o) {
            (TensorRef::F32(q), TensorMut::F32(o)) => go!(f32, q, o),
            (TensorRef::F16(q), TensorMut::F16(o)) => go!(f16, q, o),
            (TensorRef::BF16(q), TensorMut::BF16(o)) => go!(bf16, q, o),
            _ => unreachable!("dtypes were checked by check_run_args"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_typed<E: Elem, K: Elem>(
        &self,
        plan: &Plan,
        q: &[E],
        k: &[K],
        v: &[K],
        [k_scale, v_scale]: [Vec<f32>; 2],
        strides: Strides,
        kv_indices: &[i32],
        o: &mut [E],
        lse: Option<&mut [f32]>,
        (sinks, custom_mask): (Option<&[f32]>, Option<CustomMask<'_>>),
        ws: SharedMut<'_, u8>,
    ) {
        let heads = plan.heads();
        let d = heads.head_dim();
        let opts = plan.options();
        let float = plan.requirement().float;
        let po = float
            .buffer("partial_o")
            .expect("float layout has partial_o");
        let pl = float
            .buffer("partial_lse")
            .expect("float layout has partial_lse");
        let (rope, theta, rope_scale) = match opts.pos_encoding {
            PosEncoding::Rope { theta, scale } => (true, theta, scale),
            _ => (false, 1.0, 1.0),
        };
        let inv_freq = (0..d / 2)
            .map(|f| (theta as f64).powf(-2.0 * f as f64 / d as f64))
            .collect();
        let ctx = Ctx {
            plan,
            q,
            k,
            v,
            k_scale,
            v_scale,
            strides: strides.k,
            v_strides: strides.v,
            q_strides: strides.q,
            o_strides: strides.o,
            kv_indices,
            page_size: plan.page_size(),
            paged: plan.is_paged(),
            o: SharedMut::new(o),
            lse: lse.map(SharedMut::new),
            sinks,
            mask: custom_mask,
            partial_o: ws.cast_f32(po.offset, po.bytes),
            partial_lse: ws.cast_f32(pl.offset, pl.bytes),
            sm_scale: opts.resolved_sm_scale(d),
            soft_cap: opts.logits_soft_cap,
            causal: opts.causal,
            window: opts.window(),
            alibi: opts.pos_encoding == PosEncoding::Alibi,
            rope,
            rope_scale,
            inv_freq,
        };
        let hkv = heads.num_kv_heads();
        let items = plan.num_work_items();
        // Decode streams the cache: a unit takes several KV heads, so it reads each token's
        // K/V rows of those heads together (contiguous in NHD), keeping about two units per
        // thread. Prefill reuses each K/V row across a q tile: one KV head per unit.
        let per_unit = if plan.kind() == PlanKind::Decode {
            let groups = (2 * self.threads).div_ceil(items.max(1)).clamp(1, hkv);
            hkv.div_ceil(groups)
        } else {
            1
        };
        let groups = hkv.div_ceil(per_unit);
        // Prefill: a unit runs up to `merge` consecutive items, and those of one request
        // over the same keys as one tile (`ctx::merge_factor`; docs/perf/cpu.md, prefill
        // step 11), so the K/V of the keys are streamed once per merged tile instead of once
        // per q tile.
        let merge = if plan.kind() == PlanKind::Prefill {
            ctx::merge_factor(plan, groups, self.threads)
        } else {
            1
        };
        let units = items.div_ceil(merge) * groups;
        let level = self.simd;
        self.pool.install(|| {
            (0..units)
                .into_par_iter()
                .with_min_len(1)
                .for_each_init(Scratch::default, |sc, u| {
                    let (wg, gi) = (u / groups, u % groups);
                    let h0 = gi * per_unit;
                    let (mut w, w1) = (wg * merge, ((wg + 1) * merge).min(items));
                    while w < w1 {
                        let mut e = w + 1;
                        while e < w1 && ctx::mergeable(plan, e - 1) {
                            e += 1;
                        }
                        sc.span = e - w;
                        dispatch::attend(level, &ctx, w, (h0, (h0 + per_unit).min(hkv)), sc);
                        w = e;
                    }
                });
            (0..plan.num_merge_rows())
                .into_par_iter()
                .for_each_init(Vec::new, |buf, m| dispatch::merge(level, &ctx, m, buf));
        });
    }
}
