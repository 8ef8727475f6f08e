//! Compiling the kernels with no GPU and no driver: the kernel report and the ahead-of-time
//! cache.
//!
//! [`OfflineCompiler`] needs only `libnvrtc` (NVRTC compiles to a CUBIN with its embedded
//! ptxas): it compiles each [`KernelSpec`] for a named architecture through the very compile
//! path the backend uses (same sources, same options, same cache key), and returns the
//! compile's record as a [`KernelReport`]: ptxas's resource report from NVRTC's log
//! (registers, spills, shared memory, stack), the warnings, the compile time and the resident
//! blocks per SM those resources allow ([`launch::blocks_per_sm`]). With a cache directory the
//! images are written into the on-disk kernel cache, keyed as the device will look them up:
//! a device whose NVRTC has the same major.minor version loads them without compiling.
//! `flashpage kernels` is the command-line face of this module.

use std::path::PathBuf;

use super::device::{BANDWIDTH_SRC, DECODE_SRC, MERGE_SRC, OPS_SRC, PREFILL_SRC};
use super::launch::{self, DecodeVariant, FOLD_THREADS, MERGE_THREADS};
use super::nvrtc::{self, Compiler};
use super::ops::OPS_THREADS;
use super::prefill::PrefillVariant;
use crate::error::{Error, Result};
use crate::layout::DType;

pub use super::nvrtc::{Resources, log_warnings, parse_resources};

/// One kernel to compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSpec {
    /// The attention kernel (`fp_decode`): decode, and the prefill plans the tensor-core
    /// kernel does not take.
    Decode(DecodeVariant),
    /// The tensor-core prefill kernel (`fp_prefill`).
    Prefill(PrefillVariant),
    /// The split-KV merge kernel (`fp_merge`).
    Merge {
        /// Head dimension.
        head_dim: usize,
        /// Output element type.
        dtype: DType,
    },
    /// The cascade fold kernel (`fp_cascade_fold`, in `merge.cu`: the same module as
    /// `Merge` for the same head dim and dtype).
    CascadeFold {
        /// Head dimension.
        head_dim: usize,
        /// Output element type.
        dtype: DType,
    },
    /// The read-bandwidth probe (`fp_read_bw` and `fp_fill`, one module).
    Bandwidth,
    /// The K/V append kernel (`fp_append`, in `ops.cu`; dtypes and head dim at run time).
    Append,
    /// The standalone RoPE kernel (`fp_rope`, in `ops.cu`, the same module as `Append`).
    Rope,
}

impl KernelSpec {
    /// Source file name, source text, `-D` options, entry function and threads per block.
    fn parts(&self) -> (&'static str, &'static str, Vec<String>, &'static str, u32) {
        match self {
            KernelSpec::Decode(v) => (
                "decode.cu",
                DECODE_SRC,
                v.defines(),
                "fp_decode",
                v.threads(),
            ),
            KernelSpec::Prefill(v) => (
                "prefill.cu",
                PREFILL_SRC,
                v.defines(),
                "fp_prefill",
                v.threads(),
            ),
            KernelSpec::Merge { head_dim, dtype } => (
                "merge.cu",
                MERGE_SRC,
                launch::merge_defines(*head_dim, *dtype),
                "fp_merge",
                MERGE_THREADS,
            ),
            KernelSpec::CascadeFold { head_dim, dtype } => (
                "merge.cu",
                MERGE_SRC,
                launch::merge_defines(*head_dim, *dtype),
                "fp_cascade_fold",
                FOLD_THREADS,
            ),
            KernelSpec::Bandwidth => ("bandwidth.cu", BANDWIDTH_SRC, Vec::new(), "fp_read_bw", 256),
            KernelSpec::Append => ("ops.cu", OPS_SRC, Vec::new(), "fp_append", OPS_THREADS),
            KernelSpec::Rope => ("ops.cu", OPS_SRC, Vec::new(), "fp_rope", OPS_THREADS),
        }
    }

    /// The entry function the report describes.
    pub fn entry(&self) -> &'static str {
        self.parts().3
    }

    /// Threads per block the backend launches it with.
    pub fn threads(&self) -> u32 {
        self.parts().4
    }

    /// A short name: `decode bf16 d128 rows4 u2 mb3`, `decode ... rope`, `... kv
    /// float8_e4m3fn` (an FP8 cache), `merge bf16 d128`, `cascade-fold bf16 d128`,
    /// `bandwidth`, `append`, `rope`.
    pub fn name(&self) -> String {
        match self {
            KernelSpec::Decode(v) => format!(
                "decode {} d{} rows{} u{} mb{}{}{}",
                v.dtype.name(),
                v.head_dim,
                v.rows,
                v.unroll,
                v.min_blocks,
                if v.rope { " rope" } else { "" },
                kv_suffix(v.dtype, v.kv_dtype)
            ),
            KernelSpec::Prefill(v) => format!(
                "prefill-tc {} d{} n{} mb{}{}",
                v.dtype.name(),
                v.head_dim,
                v.block_n,
                v.min_blocks,
                kv_suffix(v.dtype, v.kv_dtype)
            ),
            KernelSpec::Merge { head_dim, dtype } => {
                format!("merge {} d{head_dim}", dtype.name())
            }
            KernelSpec::CascadeFold { head_dim, dtype } => {
                format!("cascade-fold {} d{head_dim}", dtype.name())
            }
            KernelSpec::Bandwidth => "bandwidth".into(),
            KernelSpec::Append => "append".into(),
            KernelSpec::Rope => "rope".into(),
        }
    }
}

/// The record of one compile.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelReport {
    /// What was compiled.
    pub spec: KernelSpec,
    /// Architecture (`sm_90a`, ...).
    pub arch: String,
    /// Threads per block at launch.
    pub threads: u32,
    /// ptxas's resource report for the entry function.
    pub resources: Resources,
    /// Resident blocks per SM at `threads` per block (`None` for an architecture whose limits
    /// are not tabulated in [`launch::sm_limits`]).
    pub blocks_per_sm: Option<u32>,
    /// Wall time of the compile, in milliseconds.
    pub compile_ms: f64,
    /// Bytes of the compiled image.
    pub image_bytes: usize,
    /// Warnings in NVRTC's log.
    pub warnings: Vec<String>,
    /// NVRTC's whole log.
    pub log: String,
}

/// NVRTC without a device: compiles kernels for any architecture it supports.
#[derive(Debug, Clone)]
pub struct OfflineCompiler {
    version: (i32, i32),
    archs: Vec<i32>,
    cache: Option<PathBuf>,
}

impl OfflineCompiler {
    /// Loads NVRTC (from the loader's search path, `LD_LIBRARY_PATH` included). `cache`:
    /// a directory the compiled images are written into, as the backend's on-disk cache.
    /// Without NVRTC this is [`Error::BackendUnavailable`].
    pub fn new(cache: Option<PathBuf>) -> Result<Self> {
        // SAFETY: is_culib_present only attempts to dlopen the candidate library names.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: "libnvrtc (the cuda run-time compiler) was not found: install the cuda toolkit or `pip install nvidia-cuda-nvrtc` and put its lib directory on LD_LIBRARY_PATH".into(),
            });
        }
        super::context::guarded("loading nvrtc", || {
            Ok(OfflineCompiler {
                version: nvrtc::nvrtc_version()?,
                archs: nvrtc::supported_archs()?,
                cache,
            })
        })
    }

    /// NVRTC's version (major, minor): the cache key includes it.
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.version
    }

    /// The architectures NVRTC can compile for (`80` for `sm_80`).
    pub fn supported_archs(&self) -> &[i32] {
        &self.archs
    }

    /// Whether the cache directory holds an intact image of `spec` for `arch` under the key
    /// the backend computes on a device with this NVRTC version (what it would load without
    /// compiling).
    pub fn is_cached(&self, spec: &KernelSpec, arch: &str) -> bool {
        let compiler = Compiler {
            arch: arch.to_string(),
            version: self.version,
            cache: self.cache.clone(),
        };
        let (_, src, defines, _, _) = spec.parts();
        compiler.lookup(src, &defines).is_some()
    }

    /// Compiles `spec` for `arch` (`sm_90a`, `sm_80`, ...): always a fresh compile (its time
    /// is measured), written into the cache directory if there is one (a write failure is an
    /// error here).
    pub fn compile(&self, spec: &KernelSpec, arch: &str) -> Result<KernelReport> {
        let number = arch
            .strip_prefix("sm_")
            .map(|d| d.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
            .and_then(|d| d.parse::<i32>().ok());
        match number {
            Some(n) if self.archs.contains(&n) => {}
            _ => {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    what: format!(
                        "architecture {arch:?}: nvrtc {}.{} compiles for sm_{}",
                        self.version.0,
                        self.version.1,
                        self.archs
                            .iter()
                            .map(i32::to_string)
                            .collect::<Vec<_>>()
                            .join(", sm_")
                    ),
                });
            }
        }
        let compiler = Compiler {
            arch: arch.to_string(),
            version: self.version,
            cache: self.cache.clone(),
        };
        let (name, src, defines, entry, threads) = spec.parts();
        let c = super::context::guarded("nvrtc compile", || {
            compiler.compile_with(name, src, &defines, false)
        })?;
        let resources = parse_resources(&c.log, entry).ok_or_else(|| Error::Backend {
            backend: "cuda",
            message: format!(
                "nvrtc's log for {} has no ptxas resource report for {entry}: {}",
                spec.name(),
                c.log.trim()
            ),
        })?;
        let blocks_per_sm = launch::sm_limits(arch).map(|l| {
            launch::blocks_per_sm(&l, threads, resources.registers, resources.shared_bytes)
        });
        Ok(KernelReport {
            spec: *spec,
            arch: arch.to_string(),
            threads,
            resources,
            blocks_per_sm,
            compile_ms: c.compile_ms,
            image_bytes: c.image.len(),
            warnings: log_warnings(&c.log),
            log: c.log,
        })
    }
}

/// ` kv <dtype>` for a K/V cache whose dtype is not q's (an FP8 cache), else nothing.
fn kv_suffix(dtype: crate::layout::DType, kv: crate::layout::DType) -> String {
    if kv == dtype {
        String::new()
    } else {
        format!(" kv {}", kv.name())
    }
}
