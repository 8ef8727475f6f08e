//! The workspace contract: named buffers carved by one bump allocator over byte offsets.
//!
//! A plan needs two caller-owned buffers: a **float** workspace (partial outputs and
//! log-sum-exps of split-KV work items, f32) and an **int** workspace (the plan's schedule,
//! copied to the device in one transfer on CUDA, used in place on the CPU). The same
//! [`AlignedAllocator`] code path both *counts* (no capacity: how many bytes would this take?)
//! and *materialises* (a capacity: where does each buffer go, and does it fit?).
//!
//! This module only carves bytes; how many bytes a plan or a deployment needs is the
//! planner's business ([`crate::plan::workspace_size`] answers, before the first request, how
//! many bytes every valid plan within some [`crate::plan::WorkspaceLimits`] needs at most).
//! Allocate that once, never reallocate (a captured CUDA graph keeps pointing at it), and
//! every plan within the limits fits.

use crate::error::{Error, Result};

/// Alignment of every buffer offset inside a workspace (the CUDA requirement; the CPU
/// needs 64, so one layout serves both backends).
pub const BUFFER_ALIGN: usize = 256;
/// Required alignment of a CPU workspace's base address.
pub const CPU_BASE_ALIGN: usize = 64;
/// Required alignment of a CUDA workspace's base address.
pub const CUDA_BASE_ALIGN: usize = 256;

/// A named buffer inside a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Name, e.g. `partial_o`.
    pub name: &'static str,
    /// Byte offset from the workspace base (a multiple of [`BUFFER_ALIGN`]).
    pub offset: usize,
    /// Bytes of the buffer.
    pub bytes: usize,
}

/// Most buffers one workspace holds.
const MAX_BUFFERS: usize = 8;

/// A bump allocator over byte offsets, with a capacity (materialise) or without (count).
///
/// ```
/// use flashpage::workspace::AlignedAllocator;
/// let mut count = AlignedAllocator::counting(256);
/// count.alloc("a", 10).unwrap();
/// count.alloc("b", 300).unwrap();
/// assert_eq!(count.total(), 256 + 300);
///
/// let mut fixed = AlignedAllocator::with_capacity(256, 400);
/// fixed.alloc("a", 10).unwrap();
/// let err = fixed.alloc("b", 300).unwrap_err();
/// assert!(err.to_string().contains("buffer 'b'"));
/// ```
#[derive(Debug, Clone)]
pub struct AlignedAllocator {
    align: usize,
    capacity: Option<usize>,
    cursor: usize,
    buffers: [Buffer; MAX_BUFFERS],
    len: usize,
    overflow: Option<(&'static str, usize, usize)>,
}

const EMPTY: Buffer = Buffer {
    name: "",
    offset: 0,
    bytes: 0,
};

impl AlignedAllocator {
    /// An allocator that only counts.
    pub fn counting(align: usize) -> Self {
        Self::new(align, None)
    }

    /// An allocator over `capacity` bytes.
    pub fn with_capacity(align: usize, capacity: usize) -> Self {
        Self::new(align, Some(capacity))
    }

    fn new(align: usize, capacity: Option<usize>) -> Self {
        debug_assert!(align.is_power_of_two());
        AlignedAllocator {
            align,
            capacity,
            cursor: 0,
            buffers: [EMPTY; MAX_BUFFERS],
            len: 0,
            overflow: None,
        }
    }

    /// Reserves `bytes` for `name` at the next aligned offset and returns that offset.
    ///
    /// With a capacity, a buffer that does not fit is a [`Error::WorkspaceTooSmall`] naming
    /// the buffer, the bytes requested and available, the capacity, and the total the plan
    /// needs (counting continues so that total is exact). A layout names at most 8 buffers:
    /// a ninth is an [`Error::LimitExceeded`] naming `workspace buffers`.
    pub fn alloc(&mut self, name: &'static str, bytes: usize) -> Result<usize> {
        let offset = self
            .cursor
            .checked_next_multiple_of(self.align)
            .ok_or(Error::SizeOverflow { what: name })?;
        let end = offset
            .checked_add(bytes)
            .ok_or(Error::SizeOverflow { what: name })?;
        if let Some(cap) = self.capacity
            && end > cap
            && self.overflow.is_none()
        {
            self.overflow = Some((name, bytes, offset));
        }
        if self.len == MAX_BUFFERS {
            return Err(Error::LimitExceeded {
                field: "workspace buffers",
                limit: MAX_BUFFERS,
                actual: MAX_BUFFERS + 1,
                rule: "buffers one workspace layout names",
            });
        }
        self.buffers[self.len] = Buffer {
            name,
            offset,
            bytes,
        };
        self.len += 1;
        self.cursor = end;
        match (self.overflow, self.capacity) {
            (Some((buffer, requested, at)), Some(capacity)) => Err(Error::WorkspaceTooSmall {
                buffer,
                requested,
                offset: at,
                available: capacity.saturating_sub(at),
                capacity,
                required_total: self.cursor,
            }),
            _ => Ok(offset),
        }
    }

    /// Bytes used so far (end of the last buffer).
    pub fn total(&self) -> usize {
        self.cursor
    }

    /// The buffers carved so far.
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers[..self.len]
    }
}

/// A workspace requirement: where each named buffer goes and the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceReq {
    buffers: [Buffer; MAX_BUFFERS],
    len: usize,
    total: usize,
}

impl WorkspaceReq {
    pub(crate) fn from_allocator(a: &AlignedAllocator) -> Self {
        WorkspaceReq {
            buffers: a.buffers,
            len: a.len,
            total: a.total(),
        }
    }
    /// Total bytes.
    pub fn total(&self) -> usize {
        self.total
    }
    /// The named buffers, in offset order.
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers[..self.len]
    }
    /// The buffer called `name`.
    pub fn buffer(&self, name: &str) -> Option<Buffer> {
        self.buffers().iter().copied().find(|b| b.name == name)
    }
    /// Checks that the requirement fits `capacity` bytes, naming the first buffer that
    /// does not.
    pub fn check_fits(&self, capacity: usize) -> Result<()> {
        for b in self.buffers() {
            if b.offset + b.bytes > capacity {
                return Err(Error::WorkspaceTooSmall {
                    buffer: b.name,
                    requested: b.bytes,
                    offset: b.offset,
                    available: capacity.saturating_sub(b.offset),
                    capacity,
                    required_total: self.total,
                });
            }
        }
        Ok(())
    }
}

/// Both workspaces of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// The float workspace (partial states).
    pub float: WorkspaceReq,
    /// The int workspace (the schedule).
    pub int: WorkspaceReq,
}

impl Requirement {
    /// Bytes of both workspaces together, checked: a sum past
    /// [`crate::plan::MAX_WORKSPACE_BYTES`] is an [`Error::LimitExceeded`], never a wrapped
    /// number.
    pub fn total(&self) -> Result<usize> {
        let limit = crate::plan::MAX_WORKSPACE_BYTES;
        for (field, n) in [
            ("float workspace bytes", self.float.total()),
            ("int workspace bytes", self.int.total()),
        ] {
            if n > limit {
                return Err(Error::LimitExceeded {
                    field,
                    limit,
                    actual: n,
                    rule: "the largest allocation (isize::MAX bytes)",
                });
            }
        }
        let sum = self.float.total() + self.int.total(); // both <= isize::MAX: no overflow
        if sum > limit {
            return Err(Error::LimitExceeded {
                field: "float + int workspace bytes",
                limit,
                actual: sum,
                rule: "the largest allocation (isize::MAX bytes)",
            });
        }
        Ok(sum)
    }

    /// True when both parts are at most `other`'s.
    pub fn fits_in(&self, other: &Requirement) -> bool {
        self.float.total() <= other.float.total() && self.int.total() <= other.int.total()
    }
}

/// A heap buffer whose base is aligned to [`CUDA_BASE_ALIGN`] bytes (so it satisfies every
/// backend): the easy way to own a host workspace.
///
/// [`HostWorkspace::new`] is fallible and never panics or aborts: a size past
/// [`crate::plan::MAX_WORKSPACE_BYTES`] is an [`Error::LimitExceeded`], and an allocation the
/// system cannot satisfy is an [`Error::OutOfMemory`].
///
/// ```
/// use flashpage::workspace::HostWorkspace;
/// let mut ws = HostWorkspace::new(1000)?;
/// assert_eq!(ws.as_bytes_mut().len(), 1000);
/// assert_eq!(ws.as_bytes_mut().as_ptr() as usize % 256, 0);
/// assert!(HostWorkspace::new(usize::MAX).is_err());
/// # Ok::<(), flashpage::Error>(())
/// ```
pub struct HostWorkspace {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(256))]
struct Line([u8; 256]);

impl HostWorkspace {
    /// A zeroed workspace of `bytes` bytes.
    ///
    /// # Errors
    /// [`Error::LimitExceeded`] for more than [`crate::plan::MAX_WORKSPACE_BYTES`] bytes;
    /// [`Error::OutOfMemory`] when the system cannot provide them.
    pub fn new(bytes: usize) -> Result<Self> {
        let limit = crate::plan::MAX_WORKSPACE_BYTES;
        if bytes > limit {
            return Err(Error::LimitExceeded {
                field: "host workspace bytes",
                limit,
                actual: bytes,
                rule: "the largest allocation (isize::MAX bytes)",
            });
        }
        let n = bytes.div_ceil(256);
        let mut lines = Vec::new();
        lines.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
            what: "host workspace",
            bytes,
        })?;
        lines.resize(n, Line([0; 256]));
        Ok(HostWorkspace { lines, len: bytes })
    }
    /// The bytes.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the capacity is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_and_materialising_agree() {
        let mut c = AlignedAllocator::counting(256);
        let mut m = AlignedAllocator::with_capacity(256, 10_000);
        for (n, b) in [("a", 1), ("b", 257), ("c", 0), ("d", 5)] {
            assert_eq!(c.alloc(n, b).unwrap(), m.alloc(n, b).unwrap());
        }
        assert_eq!(c.total(), m.total());
        assert_eq!(c.buffers(), m.buffers());
    }

    #[test]
    fn too_small_names_buffer_and_total() {
        let mut m = AlignedAllocator::with_capacity(256, 300);
        m.alloc("partial_o", 200).unwrap();
        let e = m.alloc("partial_lse", 100).unwrap_err();
        assert_eq!(
            e,
            Error::WorkspaceTooSmall {
                buffer: "partial_lse",
                requested: 100,
                offset: 256,
                available: 44,
                capacity: 300,
                required_total: 356,
            }
        );
    }

    #[test]
    fn host_workspace_of_any_size_is_a_value_or_an_error() {
        for bytes in [usize::MAX, isize::MAX as usize + 1] {
            let e = HostWorkspace::new(bytes).err().expect("too large");
            assert!(matches!(e, Error::LimitExceeded { .. }), "{e}");
        }
        // Within the limit but more than any machine has: an error, not an abort.
        let e = HostWorkspace::new(isize::MAX as usize - 255)
            .err()
            .expect("no memory");
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        assert_eq!(HostWorkspace::new(0).unwrap().len(), 0);
    }

    #[test]
    fn requirement_total_is_checked() {
        let mut big = AlignedAllocator::counting(256);
        big.alloc("partial_o", usize::MAX - 1024).unwrap();
        let mut small = AlignedAllocator::counting(256);
        small.alloc("requests", 4096).unwrap();
        let r = Requirement {
            float: WorkspaceReq::from_allocator(&big),
            int: WorkspaceReq::from_allocator(&small),
        };
        assert!(matches!(r.total(), Err(Error::LimitExceeded { .. })));
        let ok = Requirement {
            float: WorkspaceReq::from_allocator(&small),
            int: WorkspaceReq::from_allocator(&small),
        };
        assert_eq!(ok.total().unwrap(), 8192);
    }

    #[test]
    fn overflow_is_an_error() {
        let mut c = AlignedAllocator::counting(256);
        c.alloc("a", usize::MAX - 10).unwrap();
        assert!(matches!(c.alloc("b", 100), Err(Error::SizeOverflow { .. })));
    }
}
