//! Element types the CPU kernels read and write.

use half::{bf16, f16};

use crate::fp8::Fp8Format;
use crate::layout::DType;

/// A storage element: f32, f16 or bf16 (q, K, V, o), or an FP8 code (`E4M3`, `E5M2`: K and
/// V of a quantised cache). Arithmetic is always f32.
pub trait Elem: Copy + Send + Sync + bytemuck::Pod + 'static {
    /// The dtype.
    const DTYPE: DType;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// Rounds from f32 (round to nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// An FP8 E4M3Fn code of a quantised K/V cache (`TensorRef::Fp8`), read as its exact
/// unscaled value (the kernels apply the cache's scales per score and per output row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct E4M3(pub u8);

/// An FP8 E5M2 code of a quantised K/V cache (as [`E4M3`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct E5M2(pub u8);

impl Elem for E4M3 {
    const DTYPE: DType = DType::E4M3Fn;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        Fp8Format::E4M3Fn.decode(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        E4M3(Fp8Format::E4M3Fn.encode(x))
    }
}

impl Elem for E5M2 {
    const DTYPE: DType = DType::E5M2;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        Fp8Format::E5M2.decode(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        E5M2(Fp8Format::E5M2.encode(x))
    }
}
