//! Instruction-set levels and the vector primitives the kernels are written in: ISA
//! primitives only, no kernel logic, and nothing imported from the kernels.
//!
//! - `isa`: the `Isa` trait (a vector register of f32 lanes and its operations) and the
//!   constants of the shared vectorised `exp`;
//! - `scalar`, `avx2`, `avx512`: one implementation per level.
//!
//! Kernels (`attend`, `merge`) are generic over `Isa`; the `#[target_feature]` entry points
//! that instantiate them per level live in one file, `dispatch.rs`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod isa;
pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;
pub(crate) use isa::Isa;
pub(crate) use scalar::Scalar;

/// A SIMD level of this machine, chosen once per backend (and so per plan run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, DQ) with FMA and F16C; bf16 is widened in registers,
    /// except in decode tiles on CPUs with AVX-512 BF16, which multiply bf16 pairs
    /// directly (`vdpbf16ps`, P rounded to bf16 for P·V).
    Avx512,
}

impl SimdLevel {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Parses a name as printed by [`SimdLevel::name`].
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// True when this machine can run the level.
    pub fn is_available(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this machine can run, best last.
    pub fn available() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| l.is_available())
            .collect()
    }

    /// The best level of this machine.
    pub fn detect() -> SimdLevel {
        *Self::available().last().unwrap_or(&SimdLevel::Scalar)
    }
}

/// True when this CPU has AVX-512 BF16 (`vdpbf16ps`): the AVX-512 level then runs bf16
/// decode tiles on bf16 dot products (see [`dpbf16`]). Detection is cached by `std`.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}
