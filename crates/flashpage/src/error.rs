//! The one error type of flashpage.
//!
//! Every variant carries the data that explains it: the argument or tensor it is about, the
//! value that was expected and the value that was found. Messages are lowercase, have no
//! trailing period and always name the offending value, so a log line alone is enough to
//! find the bug in the caller.

use std::fmt;

/// A convenient alias for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in flashpage, from a malformed batch to a missing GPU.
///
/// Validation errors (the vast majority of variants) are raised before any arithmetic on the
/// caller's data, so an error never leaves partial output or a partially written workspace.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A count that must be positive was zero (or negative in a JSON/CLI input).
    #[error("{field} must be greater than 0, got {actual}")]
    NotPositive {
        /// The argument, e.g. `num_kv_heads`.
        field: &'static str,
        /// The value that was given.
        actual: i64,
    },

    /// `num_qo_heads` is not a multiple of `num_kv_heads`.
    #[error(
        "num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) for grouped-query attention"
    )]
    HeadRatio {
        /// Query/output heads.
        num_qo_heads: usize,
        /// Key/value heads.
        num_kv_heads: usize,
    },

    /// The head dimension is not supported (by the library or by the chosen backend).
    #[error("head_dim {actual} is not supported: expected {expected}")]
    UnsupportedHeadDim {
        /// What would be accepted, e.g. "a multiple of 16 in 16..=256".
        expected: &'static str,
        /// The head dimension that was given.
        actual: usize,
    },

    /// The page size is out of range.
    #[error("page_size {actual} is not supported: expected {expected}")]
    UnsupportedPageSize {
        /// What would be accepted.
        expected: &'static str,
        /// The page size that was given.
        actual: usize,
    },

    /// `qo_indptr` and `kv_indptr` disagree on the batch size (the founding bug).
    #[error(
        "kv_indptr has {kv_indptr_len} {kv_entries}, qo_indptr has {qo_indptr_len} {qo_entries}: both must have batch_size + 1 = {qo_indptr_len} {qo_entries}"
    , kv_entries = entries(*kv_indptr_len), qo_entries = entries(*qo_indptr_len))]
    IndptrLengthMismatch {
        /// Length of `qo_indptr` (B + 1).
        qo_indptr_len: usize,
        /// Length of `kv_indptr`.
        kv_indptr_len: usize,
    },

    /// An array has the wrong number of entries.
    #[error("{field} has {actual} {actual_entries}, expected {expected} ({rule})", actual_entries = entries(*actual))]
    ArrayLength {
        /// The array, e.g. `kv_last_page_len`.
        field: &'static str,
        /// Entries required.
        expected: usize,
        /// Entries found.
        actual: usize,
        /// Why that many, e.g. "batch_size = 8".
        rule: &'static str,
    },

    /// An indptr array is empty (it needs at least the leading 0).
    #[error("{field} is empty: it needs batch_size + 1 >= 1 entries, starting with 0")]
    EmptyIndptr {
        /// The indptr array.
        field: &'static str,
    },

    /// An indptr array does not start at 0.
    #[error("{field}[0] must be 0, got {actual}")]
    IndptrStart {
        /// The indptr array.
        field: &'static str,
        /// Its first entry.
        actual: i64,
    },

    /// An indptr array decreases.
    #[error(
        "{field} must be non-decreasing: {field}[{index}] = {actual} is less than {field}[{prev_index}] = {previous}",
        prev_index = index - 1
    )]
    IndptrDecreasing {
        /// The indptr array.
        field: &'static str,
        /// The first index whose value is smaller than its predecessor.
        index: usize,
        /// The predecessor's value.
        previous: i64,
        /// The offending value.
        actual: i64,
    },

    /// A request's custom mask does not have the bytes its shape needs:
    /// `mask_indptr[r + 1] - mask_indptr[r]` must be `ceil(qo_len·kv_len / 8)` (FlashInfer's
    /// packed layout).
    #[error(
        "mask_indptr gives request {request} {actual} mask bytes, expected ceil({qo_len} x {kv_len} / 8) = {expected} (qo_len x kv_len bits, packed)"
    )]
    CustomMaskLength {
        /// The request.
        request: usize,
        /// Its query rows.
        qo_len: usize,
        /// Its keys.
        kv_len: usize,
        /// Bytes required.
        expected: usize,
        /// Bytes `mask_indptr` gives it.
        actual: usize,
    },

    /// `kv_indptr[B]` points past the end of `kv_indices`.
    #[error(
        "kv_indptr[{batch_size}] = {needed} but kv_indices has only {actual} {actual_entries}",
        actual_entries = entries(*actual)
    )]
    IndicesTooShort {
        /// Batch size B.
        batch_size: usize,
        /// `kv_indptr[B]`: the number of page ids in use.
        needed: usize,
        /// `kv_indices.len()`.
        actual: usize,
    },

    /// A page id in `kv_indices` is outside `0..num_pages`.
    #[error(
        "kv_indices[{index}] = {page_id} is out of range: expected 0 <= page id < num_pages = {num_pages}"
    )]
    PageIdOutOfRange {
        /// Position in `kv_indices`.
        index: usize,
        /// The offending page id.
        page_id: i64,
        /// Pages in the cache.
        num_pages: usize,
    },

    /// `kv_last_page_len[r]` is inconsistent with the request's page count.
    #[error(
        "kv_last_page_len[{request}] = {actual} is invalid: request {request} has {num_pages} {pages}, so expected {expected}",
        pages = if *num_pages == 1 { "page" } else { "pages" },
        expected = if *num_pages == 0 { "0 (an empty request)".to_string() } else { format!("1..={page_size}") }
    )]
    LastPageLen {
        /// Request index.
        request: usize,
        /// The value given.
        actual: i64,
        /// Pages of the request (`kv_indptr[r+1] - kv_indptr[r]`).
        num_pages: usize,
        /// The page size.
        page_size: usize,
    },

    /// The number of query rows does not match `qo_indptr[B]` (or B for decode).
    #[error("{tensor} has {actual} rows but the batch has {expected} query rows ({rule})")]
    QueryRows {
        /// The tensor, usually `q` or `o`.
        tensor: &'static str,
        /// Rows implied by the batch.
        expected: usize,
        /// Rows found.
        actual: usize,
        /// Where the expected count comes from.
        rule: &'static str,
    },

    /// Causal attention with more query rows than keys in one request.
    #[error(
        "request {request} has qo_len {qo_len} > kv_len {kv_len}: causal attention needs qo_len <= kv_len"
    )]
    CausalQueryLongerThanKv {
        /// Request index.
        request: usize,
        /// Query rows of the request.
        qo_len: usize,
        /// Keys of the request.
        kv_len: usize,
    },

    /// An attention option has an invalid value.
    #[error("{field} = {actual} is invalid: expected {expected}")]
    InvalidOption {
        /// The option, e.g. `sm_scale`.
        field: &'static str,
        /// What is accepted.
        expected: &'static str,
        /// The value given, formatted.
        actual: String,
    },

    /// A tensor has the wrong shape or does not fit the memory it describes.
    #[error("{tensor} has shape {actual}, expected {expected}")]
    TensorShape {
        /// The tensor, e.g. `k_cache`.
        tensor: &'static str,
        /// The expected shape (or element count), formatted.
        expected: String,
        /// The actual shape, formatted.
        actual: String,
    },

    /// A tensor's dtype does not match the others.
    #[error("{tensor} has dtype {actual}, expected {expected}")]
    DTypeMismatch {
        /// The tensor.
        tensor: &'static str,
        /// The expected dtype.
        expected: &'static str,
        /// The dtype found.
        actual: &'static str,
    },

    /// A batch is larger than a limit it must respect (graph capacity, workspace limits).
    #[error("{field} = {actual} exceeds the limit {limit} ({rule})")]
    LimitExceeded {
        /// The quantity, e.g. `batch_size`.
        field: &'static str,
        /// The configured limit.
        limit: usize,
        /// The value found.
        actual: usize,
        /// Which limit, e.g. "graph_capacity".
        rule: &'static str,
    },

    /// A size computation overflowed 64 bits (only reachable with absurd limits).
    #[error("size of {what} overflows 64 bits")]
    SizeOverflow {
        /// What was being sized.
        what: &'static str,
    },

    /// The workspace cannot hold a buffer. Set the capacity to at least `required_total`.
    #[error(
        "workspace too small for buffer '{buffer}': requested {requested} bytes at offset {offset}, {available} of {capacity} bytes available; the plan needs {required_total} bytes in total"
    )]
    WorkspaceTooSmall {
        /// The named buffer that did not fit.
        buffer: &'static str,
        /// Bytes the buffer needs.
        requested: usize,
        /// Aligned offset at which it would start.
        offset: usize,
        /// Bytes left at that offset.
        available: usize,
        /// Total workspace capacity.
        capacity: usize,
        /// Bytes the whole plan needs: the capacity to allocate.
        required_total: usize,
    },

    /// The workspace base address is not aligned as the backend requires.
    #[error("{workspace} workspace address {address:#x} is not aligned to {align} bytes")]
    WorkspaceMisaligned {
        /// `float` or `int`.
        workspace: &'static str,
        /// The base address.
        address: usize,
        /// The required alignment.
        align: usize,
    },

    /// A plan was run with arguments of a different batch or configuration.
    #[error("plan mismatch: {what} is {actual} in the arguments but {expected} in the plan")]
    PlanMismatch {
        /// The quantity, e.g. `num_qo_heads`.
        what: &'static str,
        /// The plan's value.
        expected: String,
        /// The arguments' value.
        actual: String,
    },

    /// An append writes more tokens into a request than the request holds after it.
    #[error(
        "request {request} appends {append_len} tokens but holds only kv_len {kv_len} after the append: expected append_len <= kv_len"
    )]
    AppendLongerThanKv {
        /// Request index.
        request: usize,
        /// Tokens appended (`append_indptr[r+1] - append_indptr[r]`).
        append_len: usize,
        /// Tokens of the request after the append (from `kv_indptr` and `kv_last_page_len`).
        kv_len: usize,
    },

    /// The page allocator cannot give a request the pages it needs.
    #[error(
        "request {request} needs {wanted} more {pages} but only {free} of {num_pages} are free",
        pages = if *wanted == 1 { "page" } else { "pages" }
    )]
    OutOfPages {
        /// The request's id.
        request: u64,
        /// Pages the request needed.
        wanted: usize,
        /// Free pages at the time.
        free: usize,
        /// Pages in the cache.
        num_pages: usize,
    },

    /// The page allocator does not know a request (never added, or already released).
    #[error("request {request} is not allocated: expected an id added and not yet released")]
    UnknownRequest {
        /// The request's id.
        request: u64,
    },

    /// The page allocator already holds a request of this id.
    #[error("request {request} is already allocated: expected a new id")]
    DuplicateRequest {
        /// The request's id.
        request: u64,
    },

    /// The backend cannot run here (no driver, no GPU, no NVRTC, feature not built).
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// `cpu` or `cuda`.
        backend: &'static str,
        /// Why, e.g. "libcuda.so not found".
        reason: String,
    },

    /// The backend does not support a requested combination.
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The unsupported feature.
        what: String,
    },

    /// A host allocation of a size that passed every check could not be made (the memory
    /// is not there); nothing was allocated.
    #[error("cannot allocate {bytes} bytes for {what}: out of memory")]
    OutOfMemory {
        /// What was being allocated, e.g. `host workspace`.
        what: &'static str,
        /// Bytes requested.
        bytes: usize,
    },

    /// A failure inside a backend that the caller could not anticipate (device error).
    #[error("backend {backend} failed: {message}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// The device's message.
        message: String,
    },
}

fn entries(n: usize) -> &'static str {
    if n == 1 { "entry" } else { "entries" }
}

impl Error {
    /// The variant of this error, without its data.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotPositive { .. } => ErrorKind::NotPositive,
            Error::HeadRatio { .. } => ErrorKind::HeadRatio,
            Error::UnsupportedHeadDim { .. } => ErrorKind::UnsupportedHeadDim,
            Error::UnsupportedPageSize { .. } => ErrorKind::UnsupportedPageSize,
            Error::IndptrLengthMismatch { .. } => ErrorKind::IndptrLengthMismatch,
            Error::ArrayLength { .. } => ErrorKind::ArrayLength,
            Error::EmptyIndptr { .. } => ErrorKind::EmptyIndptr,
            Error::IndptrStart { .. } => ErrorKind::IndptrStart,
            Error::IndptrDecreasing { .. } => ErrorKind::IndptrDecreasing,
            Error::CustomMaskLength { .. } => ErrorKind::CustomMaskLength,
            Error::IndicesTooShort { .. } => ErrorKind::IndicesTooShort,
            Error::PageIdOutOfRange { .. } => ErrorKind::PageIdOutOfRange,
            Error::LastPageLen { .. } => ErrorKind::LastPageLen,
            Error::QueryRows { .. } => ErrorKind::QueryRows,
            Error::CausalQueryLongerThanKv { .. } => ErrorKind::CausalQueryLongerThanKv,
            Error::InvalidOption { .. } => ErrorKind::InvalidOption,
            Error::TensorShape { .. } => ErrorKind::TensorShape,
            Error::DTypeMismatch { .. } => ErrorKind::DTypeMismatch,
            Error::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            Error::SizeOverflow { .. } => ErrorKind::SizeOverflow,
            Error::WorkspaceTooSmall { .. } => ErrorKind::WorkspaceTooSmall,
            Error::WorkspaceMisaligned { .. } => ErrorKind::WorkspaceMisaligned,
            Error::PlanMismatch { .. } => ErrorKind::PlanMismatch,
            Error::AppendLongerThanKv { .. } => ErrorKind::AppendLongerThanKv,
            Error::OutOfPages { .. } => ErrorKind::OutOfPages,
            Error::UnknownRequest { .. } => ErrorKind::UnknownRequest,
            Error::DuplicateRequest { .. } => ErrorKind::DuplicateRequest,
            Error::BackendUnavailable { .. } => ErrorKind::BackendUnavailable,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            Error::Backend { .. } => ErrorKind::Backend,
        }
    }

    /// True for errors caused by invalid input (the CLI exits with status 2 for these),
    /// false for environment or device failures (status 1).
    pub fn is_invalid_input(&self) -> bool {
        !matches!(
            self,
            Error::BackendUnavailable { .. }
                | Error::Backend { .. }
                | Error::Unsupported { .. }
                | Error::OutOfMemory { .. }
        )
    }
}

/// Which [`Error`] variant an error is, without its data: for matching on the kind of
/// failure (logs, metrics, language bindings) without depending on the fields.
///
/// ```
/// use flashpage::error::{Error, ErrorKind};
/// let e = Error::IndptrLengthMismatch { qo_indptr_len: 3, kv_indptr_len: 1 };
/// assert_eq!(e.kind(), ErrorKind::IndptrLengthMismatch);
/// assert_eq!(e.kind().name(), "IndptrLengthMismatch");
/// assert_eq!("IndptrLengthMismatch".parse::<ErrorKind>(), Ok(ErrorKind::IndptrLengthMismatch));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::NotPositive`].
    NotPositive,
    /// [`Error::HeadRatio`].
    HeadRatio,
    /// [`Error::UnsupportedHeadDim`].
    UnsupportedHeadDim,
    /// [`Error::UnsupportedPageSize`].
    UnsupportedPageSize,
    /// [`Error::IndptrLengthMismatch`].
    IndptrLengthMismatch,
    /// [`Error::ArrayLength`].
    ArrayLength,
    /// [`Error::EmptyIndptr`].
    EmptyIndptr,
    /// [`Error::IndptrStart`].
    IndptrStart,
    /// [`Error::IndptrDecreasing`].
    IndptrDecreasing,
    /// [`Error::CustomMaskLength`].
    CustomMaskLength,
    /// [`Error::IndicesTooShort`].
    IndicesTooShort,
    /// [`Error::PageIdOutOfRange`].
    PageIdOutOfRange,
    /// [`Error::LastPageLen`].
    LastPageLen,
    /// [`Error::QueryRows`].
    QueryRows,
    /// [`Error::CausalQueryLongerThanKv`].
    CausalQueryLongerThanKv,
    /// [`Error::InvalidOption`].
    InvalidOption,
    /// [`Error::TensorShape`].
    TensorShape,
    /// [`Error::DTypeMismatch`].
    DTypeMismatch,
    /// [`Error::LimitExceeded`].
    LimitExceeded,
    /// [`Error::SizeOverflow`].
    SizeOverflow,
    /// [`Error::WorkspaceTooSmall`].
    WorkspaceTooSmall,
    /// [`Error::WorkspaceMisaligned`].
    WorkspaceMisaligned,
    /// [`Error::PlanMismatch`].
    PlanMismatch,
    /// [`Error::AppendLongerThanKv`].
    AppendLongerThanKv,
    /// [`Error::OutOfPages`].
    OutOfPages,
    /// [`Error::UnknownRequest`].
    UnknownRequest,
    /// [`Error::DuplicateRequest`].
    DuplicateRequest,
    /// [`Error::BackendUnavailable`].
    BackendUnavailable,
    /// [`Error::Unsupported`].
    Unsupported,
    /// [`Error::OutOfMemory`].
    OutOfMemory,
    /// [`Error::Backend`].
    Backend,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::NotPositive,
        ErrorKind::HeadRatio,
        ErrorKind::UnsupportedHeadDim,
        ErrorKind::UnsupportedPageSize,
        ErrorKind::IndptrLengthMismatch,
        ErrorKind::ArrayLength,
        ErrorKind::EmptyIndptr,
        ErrorKind::IndptrStart,
        ErrorKind::IndptrDecreasing,
        ErrorKind::CustomMaskLength,
        ErrorKind::IndicesTooShort,
        ErrorKind::PageIdOutOfRange,
        ErrorKind::LastPageLen,
        ErrorKind::QueryRows,
        ErrorKind::CausalQueryLongerThanKv,
        ErrorKind::InvalidOption,
        ErrorKind::TensorShape,
        ErrorKind::DTypeMismatch,
        ErrorKind::LimitExceeded,
        ErrorKind::SizeOverflow,
        ErrorKind::WorkspaceTooSmall,
        ErrorKind::WorkspaceMisaligned,
        ErrorKind::PlanMismatch,
        ErrorKind::AppendLongerThanKv,
        ErrorKind::OutOfPages,
        ErrorKind::UnknownRequest,
        ErrorKind::DuplicateRequest,
        ErrorKind::BackendUnavailable,
        ErrorKind::Unsupported,
        ErrorKind::OutOfMemory,
        ErrorKind::Backend,
    ];

    /// The variant's name, e.g. `"IndptrLengthMismatch"`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotPositive => "NotPositive",
            ErrorKind::HeadRatio => "HeadRatio",
            ErrorKind::UnsupportedHeadDim => "UnsupportedHeadDim",
            ErrorKind::UnsupportedPageSize => "UnsupportedPageSize",
            ErrorKind::IndptrLengthMismatch => "IndptrLengthMismatch",
            ErrorKind::ArrayLength => "ArrayLength",
            ErrorKind::EmptyIndptr => "EmptyIndptr",
            ErrorKind::IndptrStart => "IndptrStart",
            ErrorKind::IndptrDecreasing => "IndptrDecreasing",
            ErrorKind::CustomMaskLength => "CustomMaskLength",
            ErrorKind::IndicesTooShort => "IndicesTooShort",
            ErrorKind::PageIdOutOfRange => "PageIdOutOfRange",
            ErrorKind::LastPageLen => "LastPageLen",
            ErrorKind::QueryRows => "QueryRows",
            ErrorKind::CausalQueryLongerThanKv => "CausalQueryLongerThanKv",
            ErrorKind::InvalidOption => "InvalidOption",
            ErrorKind::TensorShape => "TensorShape",
            ErrorKind::DTypeMismatch => "DTypeMismatch",
            ErrorKind::LimitExceeded => "LimitExceeded",
            ErrorKind::SizeOverflow => "SizeOverflow",
            ErrorKind::WorkspaceTooSmall => "WorkspaceTooSmall",
            ErrorKind::WorkspaceMisaligned => "WorkspaceMisaligned",
            ErrorKind::PlanMismatch => "PlanMismatch",
            ErrorKind::AppendLongerThanKv => "AppendLongerThanKv",
            ErrorKind::OutOfPages => "OutOfPages",
            ErrorKind::UnknownRequest => "UnknownRequest",
            ErrorKind::DuplicateRequest => "DuplicateRequest",
            ErrorKind::BackendUnavailable => "BackendUnavailable",
            ErrorKind::Unsupported => "Unsupported",
            ErrorKind::OutOfMemory => "OutOfMemory",
            ErrorKind::Backend => "Backend",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ErrorKind {
    type Err = String;
    /// Parses a variant name (exact, as [`ErrorKind::name`] writes it).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ErrorKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown error kind {s:?}"))
    }
}

/// Formats a shape as `[a, b, c]`.
pub(crate) fn shape_str(dims: &[usize]) -> String {
    struct S<'a>(&'a [usize]);
    impl fmt::Display for S<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("[")?;
            for (i, d) in self.0.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{d}")?;
            }
            f.write_str("]")
        }
    }
    S(dims).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn founding_message_names_both_arrays() {
        let e = Error::IndptrLengthMismatch {
            qo_indptr_len: 9,
            kv_indptr_len: 1,
        };
        assert_eq!(
            e.to_string(),
            "kv_indptr has 1 entry, qo_indptr has 9 entries: both must have batch_size + 1 = 9 entries"
        );
    }

    #[test]
    fn founding_message_counts_entries_in_both_numbers() {
        // One entry in qo_indptr too: no "1 entries" anywhere.
        let e = Error::IndptrLengthMismatch {
            qo_indptr_len: 1,
            kv_indptr_len: 2,
        };
        assert_eq!(
            e.to_string(),
            "kv_indptr has 2 entries, qo_indptr has 1 entry: both must have batch_size + 1 = 1 entry"
        );
    }

    #[test]
    fn shape_formatting() {
        assert_eq!(shape_str(&[2, 3, 4]), "[2, 3, 4]");
        assert_eq!(shape_str(&[]), "[]");
    }
}
