//! The FFI layer: torch tensors as borrowed Rust slices. The only `unsafe` of the extension.
//!
//! # How a tensor is read
//!
//! A torch tensor is described through its own Python attributes: `dtype` (compared by
//! identity with torch's dtype objects), `is_cpu`, `shape`, `stride()` and `data_ptr()`.
//! That costs a handful of attribute lookups per tensor (well under a microsecond each),
//! needs no copy and no DLPack capsule, and works on every torch version that has those
//! attributes (all of 1.x and 2.x).
//!
//! # Why the memory is valid for the call
//!
//! Every entry point of the extension holds the GIL for its whole duration (kernels
//! included; the CPU backend's worker threads do not touch Python) and holds a strong
//! reference to each tensor it borrows. A CPU tensor's storage can only be freed, resized or
//! replaced (`del`, `resize_`, `set_`) by code that runs Python or holds a reference to
//! that tensor on another thread; while we hold the GIL and the reference, the first cannot
//! run, and the second would be a data race on the tensor that torch's own operators do not
//! guard against either (documented in docs/python.md). So `data_ptr()` stays the address of
//! live, initialised memory of the tensor's dtype for as long as a [`Borrowed`] lives, and
//! every element the tensor's shape and strides address lies inside its storage.
//!
//! Rust aliasing rules are kept by construction: inputs become shared slices (they may
//! overlap each other), and a tensor written to becomes a mutable slice only after its byte
//! range was checked to be dense (no element addressed twice) and disjoint from the range of
//! every other tensor of the same call ([`check_disjoint`]).

use flashpage::fp8::Fp8Format;
use flashpage::half::{bf16, f16};
use flashpage::{DType, Error, TensorMut, TensorRef};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyAnyMethods;
use pyo3::{Py, PyAny, intern};

use crate::errors::{Failure, type_error};

/// Element types the extension reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    BF16,
    /// int32.
    I32,
    /// int64.
    I64,
    /// uint8.
    U8,
    /// bool.
    Bool,
    /// float8_e4m3fn (an FP8 K/V cache).
    E4M3Fn,
    /// float8_e5m2 (an FP8 K/V cache).
    E5M2,
}

impl Kind {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Kind::F32 | Kind::I32 => 4,
            Kind::F16 | Kind::BF16 => 2,
            Kind::I64 => 8,
            Kind::U8 | Kind::Bool | Kind::E4M3Fn | Kind::E5M2 => 1,
        }
    }

    /// torch's name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            Kind::F32 => "torch.float32",
            Kind::F16 => "torch.float16",
            Kind::BF16 => "torch.bfloat16",
            Kind::I32 => "torch.int32",
            Kind::I64 => "torch.int64",
            Kind::U8 => "torch.uint8",
            Kind::Bool => "torch.bool",
            Kind::E4M3Fn => "torch.float8_e4m3fn",
            Kind::E5M2 => "torch.float8_e5m2",
        }
    }

    /// The attention dtype, for the three float kinds and the two FP8 formats.
    pub fn dtype(self) -> Option<DType> {
        match self {
            Kind::F32 => Some(DType::F32),
            Kind::F16 => Some(DType::F16),
            Kind::BF16 => Some(DType::BF16),
            Kind::E4M3Fn => Some(DType::E4M3Fn),
            Kind::E5M2 => Some(DType::E5M2),
            _ => None,
        }
    }
}

/// torch's dtype attribute of each kind (the FP8 ones only where this torch has them).
const KINDS: [(Kind, &str); 9] = [
    (Kind::F32, "float32"),
    (Kind::F16, "float16"),
    (Kind::BF16, "bfloat16"),
    (Kind::I32, "int32"),
    (Kind::I64, "int64"),
    (Kind::U8, "uint8"),
    (Kind::Bool, "bool"),
    (Kind::E4M3Fn, "float8_e4m3fn"),
    (Kind::E5M2, "float8_e5m2"),
];

/// The dtypes a K/V cache tensor may have.
const FLOAT_OR_FP8: &str =
    "torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn or torch.float8_e5m2";

/// torch's dtype objects, looked up once.
static DTYPES: PyOnceLock<Vec<(Kind, Py<PyAny>)>> = PyOnceLock::new();

fn dtypes(py: Python<'_>) -> PyResult<&Vec<(Kind, Py<PyAny>)>> {
    DTYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        // A torch without FP8 dtypes (before 2.1) has no tensors of them either.
        Ok(KINDS
            .iter()
            .filter_map(|&(k, n)| Some((k, torch.getattr(n).ok()?.unbind())))
            .collect())
    })
}

/// A tensor's description: where its elements are and how they are laid out.
#[derive(Debug, Clone)]
pub struct Borrowed<'py> {
    /// The argument's name, for messages.
    pub name: &'static str,
    /// The tensor (kept alive for as long as this description).
    pub obj: Bound<'py, PyAny>,
    /// Element type.
    pub kind: Kind,
    /// Address of element `[0, 0, ...]`.
    pub ptr: usize,
    /// Sizes.
    pub shape: Vec<usize>,
    /// Strides in elements (torch's are never negative).
    pub strides: Vec<usize>,
}

impl<'py> Borrowed<'py> {
    /// Reads a CPU torch tensor's description. A CUDA tensor is a typed
    /// `BackendUnavailable` error (this build runs on the CPU backend); anything that is not
    /// a tensor of a supported dtype is a `TypeError`.
    pub fn new(obj: &Bound<'py, PyAny>, name: &'static str) -> Result<Self, Failure> {
        let py = obj.py();
        let dtype = obj
            .getattr(intern!(py, "dtype"))
            .map_err(|_| type_error(format!("{name} must be a torch.Tensor")))?;
        let kind = dtypes(py)?
            .iter()
            .find(|(_, d)| d.bind(py).is(&dtype))
            .map(|&(k, _)| k)
            .ok_or_else(|| type_error(format!("{name} has unsupported dtype {dtype}")))?;
        if !obj.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
            let device = obj.getattr(intern!(py, "device"))?.str()?.to_string();
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: format!(
                    "{name} is on {device}, but this build of flashpage runs on the CPU backend only (move the tensors to the cpu)"
                ),
            }
            .into());
        }
        let shape: Vec<usize> = obj.getattr(intern!(py, "shape"))?.extract()?;
        let strides: Vec<usize> = obj.call_method0(intern!(py, "stride"))?.extract()?;
        let ptr: usize = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
        if !ptr.is_multiple_of(kind.size()) {
            return Err(type_error(format!(
                "{name}'s data pointer {ptr:#x} is not aligned to its element size {}",
                kind.size()
            )));
        }
        Ok(Borrowed {
            name,
            obj: obj.clone(),
            kind,
            ptr,
            shape,
            strides,
        })
    }

    /// Elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// One past the largest element offset the shape and strides address (0 when empty).
    pub fn extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        1 + self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n - 1) * s)
            .sum::<usize>()
    }

    /// Byte range `[start, end)` the tensor's elements occupy.
    pub fn byte_range(&self) -> (usize, usize) {
        (self.ptr, self.ptr + self.extent() * self.kind.size())
    }

    /// True when row-major contiguous (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != expect {
                return false;
            }
            expect *= n;
        }
        true
    }

    /// An error unless the tensor is `[dims...]` (`None` entries match anything).
    pub fn expect_shape(&self, dims: &[Option<usize>], what: &str) -> Result<(), Failure> {
        let ok = self.shape.len() == dims.len()
            && self
                .shape
                .iter()
                .zip(dims)
                .all(|(&n, d)| d.is_none_or(|d| d == n));
        if ok {
            Ok(())
        } else {
            Err(shape_error(self.name, what.to_string(), &self.shape))
        }
    }

    /// An error unless row-major contiguous.
    pub fn expect_contiguous(&self) -> Result<(), Failure> {
        if self.is_contiguous() {
            Ok(())
        } else {
            Err(Error::TensorShape {
                tensor: self.name,
                expected: "a contiguous tensor".into(),
                actual: format!("strides {:?} for shape {:?}", self.strides, self.shape),
            }
            .into())
        }
    }

    /// The elements as a shared float slice of `extent()` elements, starting `offset`
    /// elements after the first (for the V half of a combined KV cache).
    pub fn float_ref(&self, offset: usize) -> Result<TensorRef<'_>, Failure> {
        let len = self.extent().saturating_sub(offset);
        let addr = self.ptr + offset * self.kind.size();
        Ok(match self.kind {
            // SAFETY (all three): `addr` is an element of the tensor (offset < extent, or the
            // slice is empty), aligned for the dtype (checked in `new`), and `len` elements
            // from it stay inside the tensor's storage, which is live and not written by
            // anyone for the duration of the borrow (module docs).
            Kind::F32 => TensorRef::F32(unsafe { shared::<f32>(addr, len) }),
            Kind::F16 => TensorRef::F16(unsafe { shared::<f16>(addr, len) }),
            Kind::BF16 => TensorRef::BF16(unsafe { shared::<bf16>(addr, len) }),
            // SAFETY: as above, for one-byte elements (no alignment requirement).
            Kind::E4M3Fn => TensorRef::Fp8(Fp8Format::E4M3Fn, unsafe { shared::<u8>(addr, len) }),
            // SAFETY: as above.
            Kind::E5M2 => TensorRef::Fp8(Fp8Format::E5M2, unsafe { shared::<u8>(addr, len) }),
            _ => return Err(self.dtype_error(FLOAT_OR_FP8)),
        })
    }

    /// The elements as a mutable float slice. Callers check first that the tensor is
    /// contiguous and disjoint from every other tensor of the call ([`check_disjoint`]).
    pub fn float_mut(&mut self) -> Result<TensorMut<'_>, Failure> {
        self.expect_contiguous()?;
        let (addr, len) = (self.ptr, self.numel());
        Ok(match self.kind {
            // SAFETY (all three): as in `float_ref`; in addition the tensor is contiguous
            // (checked above), so the slice addresses each element once, and callers checked
            // with `check_disjoint` that no other slice of this call overlaps it.
            Kind::F32 => TensorMut::F32(unsafe { exclusive::<f32>(addr, len) }),
            Kind::F16 => TensorMut::F16(unsafe { exclusive::<f16>(addr, len) }),
            Kind::BF16 => TensorMut::BF16(unsafe { exclusive::<bf16>(addr, len) }),
            _ => return Err(self.dtype_error("torch.float32, torch.float16 or torch.bfloat16")),
        })
    }

    /// The elements as a mutable float slice of `extent()` elements (the tensor need not be
    /// dense: a strided cache). Callers check first that the tensor is disjoint from every
    /// other tensor of the call ([`check_disjoint`]), and write only elements the tensor's
    /// shape and strides address.
    pub fn float_extent_mut(&mut self) -> Result<TensorMut<'_>, Failure> {
        let (addr, len) = (self.ptr, self.extent());
        Ok(match self.kind {
            // SAFETY (all three): as in `float_ref`; callers checked with `check_disjoint`
            // that no other slice of this call overlaps the tensor's range.
            Kind::F32 => TensorMut::F32(unsafe { exclusive::<f32>(addr, len) }),
            Kind::F16 => TensorMut::F16(unsafe { exclusive::<f16>(addr, len) }),
            Kind::BF16 => TensorMut::BF16(unsafe { exclusive::<bf16>(addr, len) }),
            // SAFETY: as above, for one-byte elements (an FP8 cache being appended to).
            Kind::E4M3Fn => {
                TensorMut::Fp8(Fp8Format::E4M3Fn, unsafe { exclusive::<u8>(addr, len) })
            }
            // SAFETY: as above.
            Kind::E5M2 => TensorMut::Fp8(Fp8Format::E5M2, unsafe { exclusive::<u8>(addr, len) }),
            _ => return Err(self.dtype_error(FLOAT_OR_FP8)),
        })
    }

    /// The elements of a contiguous float32 tensor, mutable (an LSE); same contract as
    /// [`Borrowed::float_mut`].
    pub fn f32_mut(&mut self) -> Result<&mut [f32], Failure> {
        self.expect_contiguous()?;
        if self.kind != Kind::F32 {
            return Err(self.dtype_error("torch.float32"));
        }
        // SAFETY: as in `float_mut`.
        Ok(unsafe { exclusive::<f32>(self.ptr, self.numel()) })
    }

    /// The elements of a float32 tensor, shared, in row-major order (copied if the tensor
    /// is not contiguous).
    pub fn f32_vec(&self) -> Result<Vec<f32>, Failure> {
        if self.kind != Kind::F32 {
            return Err(self.dtype_error("torch.float32"));
        }
        // SAFETY: as in `float_ref`.
        let all = unsafe { shared::<f32>(self.ptr, self.extent()) };
        Ok(self.offsets().map(|o| all[o]).collect())
    }

    /// The tensor's bytes, shared (`extent()` elements), for dtype-agnostic copies.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as in `float_ref`, for bytes (alignment 1).
        unsafe { shared::<u8>(self.ptr, self.extent() * self.kind.size()) }
    }

    /// The tensor's bytes, mutable (`extent()` elements). Callers check that the tensor is
    /// disjoint from every other tensor of the call, and write each element at most once
    /// per offset the shape addresses (the slice may contain elements the shape skips,
    /// which are part of the same storage and are not touched).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `float_ref`; exclusive by the caller's `check_disjoint`.
        unsafe { exclusive::<u8>(self.ptr, self.extent() * self.kind.size()) }
    }

    /// An index tensor (int32 or int64, one dimension, any stride) as i32 values; an int64
    /// value outside the i32 range is an error naming the entry.
    pub fn indices(&self) -> Result<Vec<i32>, Failure> {
        if self.shape.len() != 1 {
            return Err(shape_error(
                self.name,
                "a one-dimensional tensor".into(),
                &self.shape,
            ));
        }
        let (n, s) = (self.shape[0], self.strides[0]);
        match self.kind {
            Kind::I32 => {
                // SAFETY: as in `float_ref`, for i32.
                let all = unsafe { shared::<i32>(self.ptr, self.extent()) };
                Ok((0..n).map(|i| all[i * s]).collect())
            }
            Kind::I64 => {
                // SAFETY: as in `float_ref`, for i64.
                let all = unsafe { shared::<i64>(self.ptr, self.extent()) };
                (0..n)
                    .map(|i| {
                        let v = all[i * s];
                        i32::try_from(v).map_err(|_| {
                            Failure::from(Error::InvalidOption {
                                field: self.name,
                                expected: "entries in the int32 range",
                                actual: format!("{}[{i}] = {v}", self.name),
                            })
                        })
                    })
                    .collect()
            }
            _ => Err(self.dtype_error("torch.int32 or torch.int64")),
        }
    }

    /// A bool (or uint8) tensor of one dimension as bools.
    pub fn bools(&self) -> Result<Vec<bool>, Failure> {
        if !matches!(self.kind, Kind::Bool | Kind::U8) {
            return Err(self.dtype_error("torch.bool"));
        }
        let all = self.bytes();
        Ok(self.offsets().map(|o| all[o] != 0).collect())
    }

    /// Element offsets in row-major order.
    fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.numel();
        (0..n).map(move |mut lin| {
            let mut off = 0;
            for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
                off += (lin % d) * s;
                lin /= d;
            }
            off
        })
    }

    /// A dtype error for this tensor.
    pub fn dtype_error(&self, expected: &'static str) -> Failure {
        Error::DTypeMismatch {
            tensor: self.name,
            expected,
            actual: self.kind.name(),
        }
        .into()
    }
}

/// A shape error naming the tensor.
pub fn shape_error(tensor: &'static str, expected: String, actual: &[usize]) -> Failure {
    Error::TensorShape {
        tensor,
        expected,
        actual: format!("{actual:?}"),
    }
    .into()
}

/// An error if the byte range of any tensor in `written` overlaps that of another tensor in
/// `written` or in `read` (empty tensors overlap nothing). This is what makes the mutable
/// slices of a call exclusive.
pub fn check_disjoint(written: &[&Borrowed<'_>], read: &[&Borrowed<'_>]) -> Result<(), Failure> {
    for (i, w) in written.iter().enumerate() {
        let (a0, a1) = w.byte_range();
        if a0 == a1 {
            continue;
        }
        for r in written[i + 1..].iter().chain(read) {
            let (b0, b1) = r.byte_range();
            if b0 != b1 && a0 < b1 && b0 < a1 {
                return Err(Error::InvalidOption {
                    field: w.name,
                    expected: "memory that no other argument of the call uses",
                    actual: format!("{} overlaps {}", w.name, r.name),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// A shared slice of `len` elements at `addr` (a dangling, aligned pointer when empty).
///
/// # Safety
/// When `len > 0`, `addr` must be aligned for `T` and `len` elements from it must be live,
/// initialised memory that nobody writes while the slice lives.
unsafe fn shared<'a, T>(addr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(addr as *const T, len) }
}

/// A mutable slice of `len` elements at `addr` (empty when `len == 0`).
///
/// # Safety
/// As for [`shared`], and no other reference to any of the `len` elements may exist while
/// the slice lives.
unsafe fn exclusive<'a, T>(addr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut T, len) }
}

/// When the byte ranges of `a` and `b` (two float tensors of one dtype) overlap (two views
/// of one storage, e.g. the K and V halves of one cache tensor), one mutable float slice over
/// their union and the element offsets of `a` and `b` in it; `None` when they are disjoint.
/// Writes through the slice to elements of both tensors are then ordinary writes to one
/// buffer (no two live mutable references). Callers check the union is disjoint from every
/// other tensor of the call.
pub fn union_float_mut<'a>(
    a: &'a mut Borrowed<'_>,
    b: &'a mut Borrowed<'_>,
) -> Result<Option<(TensorMut<'a>, usize, usize)>, Failure> {
    let ((a0, a1), (b0, b1)) = (a.byte_range(), b.byte_range());
    if a0 == a1 || b0 == b1 || a1 <= b0 || b1 <= a0 {
        return Ok(None);
    }
    if b.kind != a.kind {
        return Err(b.dtype_error(a.kind.name()));
    }
    let es = a.kind.size();
    let (lo, hi) = (a0.min(b0), a1.max(b1));
    // Both starts are aligned to the element size (checked in `Borrowed::new`), so is the
    // union's start, its length and both offsets.
    let (n, ka, kb) = ((hi - lo) / es, (a0 - lo) / es, (b0 - lo) / es);
    Ok(Some((
        match a.kind {
            // SAFETY (all three): the two ranges overlap, so every element of [lo, hi) lies
            // in the range of `a` or of `b`, each inside its tensor's live storage (as in
            // `Borrowed::float_ref`), aligned for the dtype; both descriptions are borrowed
            // mutably for the slice's lifetime, so no other slice of either exists.
            Kind::F32 => TensorMut::F32(unsafe { exclusive::<f32>(lo, n) }),
            Kind::F16 => TensorMut::F16(unsafe { exclusive::<f16>(lo, n) }),
            Kind::BF16 => TensorMut::BF16(unsafe { exclusive::<bf16>(lo, n) }),
            // SAFETY: as above, one-byte elements.
            Kind::E4M3Fn => TensorMut::Fp8(Fp8Format::E4M3Fn, unsafe { exclusive::<u8>(lo, n) }),
            // SAFETY: as above.
            Kind::E5M2 => TensorMut::Fp8(Fp8Format::E5M2, unsafe { exclusive::<u8>(lo, n) }),
            _ => return Err(a.dtype_error(FLOAT_OR_FP8)),
        },
        ka,
        kb,
    )))
}
