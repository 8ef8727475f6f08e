//! Borrowed, typed views of the caller's host tensors.

use half::{bf16, f16};

use crate::fp8::Fp8Format;
use crate::layout::DType;

/// The dtype of FP8 data of `format`.
fn fp8_dtype(format: Fp8Format) -> DType {
    match format {
        Fp8Format::E4M3Fn => DType::E4M3Fn,
        Fp8Format::E5M2 => DType::E5M2,
    }
}

/// The FP8 format of an FP8 dtype (E5M2 for the float types, which never reach it).
fn dtype_fp8(dtype: DType) -> Fp8Format {
    dtype.fp8_format().unwrap_or(Fp8Format::E5M2)
}

/// A read-only host tensor of one of the supported dtypes (row-major, contiguous unless a
/// stride says otherwise).
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// f32 data.
    F32(&'a [f32]),
    /// f16 data.
    F16(&'a [f16]),
    /// bf16 data.
    BF16(&'a [bf16]),
    /// FP8 codes of a format (a quantised K/V cache: each value is `decode(code) · scale`
    /// with the cache's scale, see [`crate::backend::KvCache::with_scales`]).
    Fp8(Fp8Format, &'a [u8]),
}

/// A writable host tensor of one of the supported dtypes.
#[derive(Debug)]
pub enum TensorMut<'a> {
    /// f32 data.
    F32(&'a mut [f32]),
    /// f16 data.
    F16(&'a mut [f16]),
    /// bf16 data.
    BF16(&'a mut [bf16]),
    /// FP8 codes of a format (a quantised K/V cache written by `append_kv`).
    Fp8(Fp8Format, &'a mut [u8]),
}

impl TensorRef<'_> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::F16(_) => DType::F16,
            TensorRef::BF16(_) => DType::BF16,
            TensorRef::Fp8(f, _) => fp8_dtype(*f),
        }
    }
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(s) => s.len(),
            TensorRef::F16(s) => s.len(),
            TensorRef::BF16(s) => s.len(),
            TensorRef::Fp8(_, s) => s.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` widened to f64 (an FP8 code decoded exactly, without any scale).
    #[inline]
    pub fn get_f64(&self, i: usize) -> f64 {
        match self {
            TensorRef::F32(s) => s[i] as f64,
            TensorRef::F16(s) => s[i].to_f64(),
            TensorRef::BF16(s) => s[i].to_f64(),
            TensorRef::Fp8(f, s) => f.decode(s[i]) as f64,
        }
    }
    /// All elements widened to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.get_f64(i)).collect()
    }
}

impl TensorMut<'_> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorMut::F32(_) => DType::F32,
            TensorMut::F16(_) => DType::F16,
            TensorMut::BF16(_) => DType::BF16,
            TensorMut::Fp8(f, _) => fp8_dtype(*f),
        }
    }
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            TensorMut::F32(s) => s.len(),
            TensorMut::F16(s) => s.len(),
            TensorMut::BF16(s) => s.len(),
            TensorMut::Fp8(_, s) => s.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A read-only view of the same data.
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            TensorMut::F32(s) => TensorRef::F32(s),
            TensorMut::F16(s) => TensorRef::F16(s),
            TensorMut::BF16(s) => TensorRef::BF16(s),
            TensorMut::Fp8(f, s) => TensorRef::Fp8(*f, s),
        }
    }
    /// Fills with NaN (poison before a run, so unwritten elements are caught).
    pub fn poison(&mut self) {
        match self {
            TensorMut::F32(s) => s.fill(f32::NAN),
            TensorMut::F16(s) => s.fill(f16::NAN),
            TensorMut::BF16(s) => s.fill(bf16::NAN),
            TensorMut::Fp8(f, s) => s.fill(f.encode(f32::NAN)),
        }
    }
}

/// An owned host tensor (used by the CLI, tests and benchmarks).
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// f32 data.
    F32(Vec<f32>),
    /// f16 data.
    F16(Vec<f16>),
    /// bf16 data.
    BF16(Vec<bf16>),
    /// FP8 codes of a format.
    Fp8(Fp8Format, Vec<u8>),
}

impl Tensor {
    /// Rounds f64 values to `dtype` (FP8: rounded to f32, then encoded with scale 1, see
    /// [`crate::fp8`]).
    pub fn from_f64(dtype: DType, v: &[f64]) -> Tensor {
        match dtype {
            DType::F32 => Tensor::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F16 => Tensor::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::BF16 => Tensor::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::E4M3Fn | DType::E5M2 => {
                let f = dtype_fp8(dtype);
                Tensor::Fp8(f, v.iter().map(|&x| f.encode(x as f32)).collect())
            }
        }
    }
    /// Borrowed view.
    pub fn view(&self) -> TensorRef<'_> {
        match self {
            Tensor::F32(v) => TensorRef::F32(v),
            Tensor::F16(v) => TensorRef::F16(v),
            Tensor::BF16(v) => TensorRef::BF16(v),
            Tensor::Fp8(f, v) => TensorRef::Fp8(*f, v),
        }
    }
    /// Mutable view.
    pub fn view_mut(&mut self) -> TensorMut<'_> {
        match self {
            Tensor::F32(v) => TensorMut::F32(v),
            Tensor::F16(v) => TensorMut::F16(v),
            Tensor::BF16(v) => TensorMut::BF16(v),
            Tensor::Fp8(f, v) => TensorMut::Fp8(*f, v),
        }
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.view().dtype()
    }
    /// Elements.
    pub fn len(&self) -> usize {
        self.view().len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Tensor::F32(v) => bytemuck::cast_slice(v).to_vec(),
            Tensor::F16(v) => bytemuck::cast_slice(v).to_vec(),
            Tensor::BF16(v) => bytemuck::cast_slice(v).to_vec(),
            Tensor::Fp8(_, v) => v.clone(),
        }
    }
    /// From little-endian bytes (`None` if the length is not a multiple of the element).
    pub fn from_le_bytes(dtype: DType, b: &[u8]) -> Option<Tensor> {
        if !b.len().is_multiple_of(dtype.size()) {
            return None;
        }
        let n = b.len() / dtype.size();
        Some(match dtype {
            DType::F32 => Tensor::F32(
                (0..n)
                    .map(|i| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
                    .collect(),
            ),
            DType::F16 => Tensor::F16(
                (0..n)
                    .map(|i| f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])))
                    .collect(),
            ),
            DType::BF16 => Tensor::BF16(
                (0..n)
                    .map(|i| bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])))
                    .collect(),
            ),
            DType::E4M3Fn | DType::E5M2 => Tensor::Fp8(dtype_fp8(dtype), b.to_vec()),
        })
    }
}
