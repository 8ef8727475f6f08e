//! Element types the CPU kernels read and write.

use half::{bf16, f16};

use crate::layout::DType;

/// A storage element: f32, f16 or bf16. Arithmetic is always f32.
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
