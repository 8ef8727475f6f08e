//! The CPU backend: the default everywhere, and the reference the CUDA backend is checked
//! against. It executes the same plan the GPU does: work items write `o`/`lse` or partial
//! states into the float workspace, then the merge step combines split rows.
//!
//! Parallelism is explicit (a thread count, fixed at construction); the unit of parallel
//! work is a work item for one KV head (prefill) or a range of KV heads (decode). The SIMD level is detected once at construction
//! (or chosen, for tests), so every run of a backend uses one specialised loop nest.

mod attend;
mod elem;
mod merge;
pub mod simd;

use std::marker::PhantomData;

use half::{bf16, f16};
use rayon::prelude::*;

pub use elem::Elem;
pub use merge::{merge_state, merge_state_in_place, merge_states};
pub use simd::SimdLevel;

use super::{RunArgs, check_run_args};
use crate::error::{Error, Result};
use crate::layout::KvStrides;
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
    ///
    /// Arguments are checked against the plan first (shapes, dtypes, strides, page ids); on
    /// error nothing is written.
    pub fn run(
        &self,
        plan: &Plan,
        args: RunArgs<'_, '_>,
        float_workspace: &mut [u8],
    ) -> Result<()> {
        check_run_args(plan, &args.shapes())?;
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
        let RunArgs { q, kv, o, lse } = args;
        let ws = SharedMut::new(float_workspace);
        match (q, kv.k, kv.v, o) {
            (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v), TensorMut::F32(o)) => {
                self.run_typed::<f32>(plan, q, k, v, kv.strides, kv.kv_indices, o, lse, ws)
            }
            (TensorRef::F16(q), TensorRef::F16(k), TensorRef::F16(v), TensorMut::F16(o)) => {
                self.run_typed::<f16>(plan, q, k, v, kv.strides, kv.kv_indices, o, lse, ws)
            }
            (TensorRef::BF16(q), TensorRef::BF16(k), TensorRef::BF16(v), TensorMut::BF16(o)) => {
                self.run_typed::<bf16>(plan, q, k, v, kv.strides, kv.kv_indices, o, lse, ws)
            }
            _ => unreachable!("dtypes were checked by check_run_args"),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_typed<E: Elem>(
        &self,
        plan: &Plan,
        q: &[E],
        k: &[E],
        v: &[E],
        strides: KvStrides,
        kv_indices: &[i32],
        o: &mut [E],
        lse: Option<&mut [f32]>,
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
            strides,
            kv_indices,
            page_size: plan.page_size(),
            paged: plan.is_paged(),
            o: SharedMut::new(o),
            lse: lse.map(SharedMut::new),
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
        let units = items * groups;
        let level = self.simd;
        self.pool.install(|| {
            (0..units)
                .into_par_iter()
                .with_min_len(1)
                .for_each_init(Scratch::default, |sc, u| {
                    let (w, gi) = (u / groups, u % groups);
                    let h0 = gi * per_unit;
                    simd::dispatch_attend(level, &ctx, w, (h0, (h0 + per_unit).min(hkv)), sc)
                });
            (0..plan.num_merge_rows())
                .into_par_iter()
                .for_each_init(Vec::new, |buf, m| simd::dispatch_merge(level, &ctx, m, buf));
        });
    }
}

/// Everything a kernel reads, resolved once per run.
pub(crate) struct Ctx<'a, E> {
    pub(crate) plan: &'a Plan,
    pub(crate) q: &'a [E],
    pub(crate) k: &'a [E],
    pub(crate) v: &'a [E],
    pub(crate) strides: KvStrides,
    pub(crate) kv_indices: &'a [i32],
    pub(crate) page_size: usize,
    pub(crate) paged: bool,
    pub(crate) o: SharedMut<'a, E>,
    pub(crate) lse: Option<SharedMut<'a, f32>>,
    pub(crate) partial_o: SharedMut<'a, f32>,
    pub(crate) partial_lse: SharedMut<'a, f32>,
    pub(crate) sm_scale: f32,
    pub(crate) soft_cap: Option<f32>,
    pub(crate) causal: bool,
    pub(crate) window: Option<usize>,
    pub(crate) alibi: bool,
    pub(crate) rope: bool,
    pub(crate) rope_scale: f32,
    pub(crate) inv_freq: Vec<f64>,
}

impl<E> Ctx<'_, E> {
    /// Offsets of tokens `j0..j0 + out.len()` (head `h`) of the request whose KV starts at
    /// `kv_start`, walking pages incrementally; each offset plus `span` (the distance to the
    /// last head a kernel reads) is checked to leave `head_dim` elements in both K and V, so
    /// kernels may read rows through raw pointers.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_offsets(
        &self,
        kv_start: usize,
        j0: usize,
        n: usize,
        h: usize,
        span: usize,
        out: &mut [usize],
    ) {
        let d = self.plan.heads().head_dim() + span;
        let limit = self.k.len().min(self.v.len());
        let check = |o: usize| {
            assert!(o <= limit && d <= limit - o, "kv row out of bounds");
            o
        };
        if self.paged {
            let (mut page, mut slot) = (j0 / self.page_size, j0 % self.page_size);
            for o in &mut out[..n] {
                let id = self.kv_indices[kv_start + page] as usize;
                *o = check(
                    id * self.strides.page + slot * self.strides.token + h * self.strides.head,
                );
                slot += 1;
                if slot == self.page_size {
                    slot = 0;
                    page += 1;
                }
            }
        } else {
            for (t, o) in out[..n].iter_mut().enumerate() {
                *o = check((kv_start + j0 + t) * self.strides.page + h * self.strides.head);
            }
        }
    }
}

/// Per-thread scratch of the tile kernel.
pub(crate) struct Scratch {
    pub(crate) q: Vec<f32>,
    /// q rows as bf16 bits (the bf16 dot-product path).
    pub(crate) qb: Vec<u16>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) acc: Vec<f32>,
    pub(crate) m: Vec<f32>,
    pub(crate) l: Vec<f32>,
    pub(crate) lo: Vec<i64>,
    pub(crate) hi: Vec<i64>,
    pub(crate) qpos: Vec<i64>,
    pub(crate) slope: Vec<f32>,
    pub(crate) corr: Vec<f32>,
    pub(crate) off: [usize; attend::KEY_BLOCK],
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            q: Vec::new(),
            qb: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            s: Vec::new(),
            acc: Vec::new(),
            m: Vec::new(),
            l: Vec::new(),
            lo: Vec::new(),
            hi: Vec::new(),
            qpos: Vec::new(),
            slope: Vec::new(),
            corr: Vec::new(),
            off: [0; attend::KEY_BLOCK],
        }
    }
}

impl Scratch {
    pub(crate) fn prepare(&mut self, rows: usize, d: usize) {
        let kb = attend::KEY_BLOCK;
        self.q.resize(rows * d, 0.0);
        self.k.resize(kb * d, 0.0);
        self.v.resize(kb * d, 0.0);
        self.s.resize(rows * kb, 0.0);
        self.corr.resize(rows, 1.0);
        self.acc.clear();
        self.acc.resize(rows * d, 0.0);
        self.m.clear();
        self.m.resize(rows, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(rows, 0.0);
        self.lo.resize(rows, 0);
        self.hi.resize(rows, 0);
        self.qpos.resize(rows, 0);
        self.slope.resize(rows, 0.0);
    }
}

/// A mutable buffer shared by the threads of one run; each thread writes disjoint ranges.
pub(crate) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _life: PhantomData<&'a mut [T]>,
}

// SAFETY: SharedMut hands out disjoint sub-slices only (see `slice`); T is Send.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
// SAFETY: as above: concurrent users touch disjoint ranges.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    fn new(s: &'a mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _life: PhantomData,
        }
    }

    /// `[off, off + len)` as a mutable slice.
    ///
    /// # Safety
    /// No other live slice from this buffer may overlap the range while this one is used.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        assert!(
            off <= self.len && len <= self.len - off,
            "shared slice out of bounds"
        );
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl<'a> SharedMut<'a, u8> {
    /// The f32 view of bytes `[off, off + bytes)` (offset 4-aligned: a multiple of 256 from
    /// a 64-aligned base).
    fn cast_f32(&self, off: usize, bytes: usize) -> SharedMut<'a, f32> {
        assert!(off <= self.len && bytes <= self.len - off);
        // SAFETY: in bounds; the address is 4-aligned (base 64-aligned checked by `run`,
        // offset a multiple of 256 or the range is empty).
        let ptr = unsafe { self.ptr.add(off) } as *mut f32;
        assert!(bytes == 0 || (ptr as usize).is_multiple_of(4));
        SharedMut {
            ptr,
            len: bytes / 4,
            _life: PhantomData,
        }
    }
}
