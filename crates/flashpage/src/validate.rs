//! Validation: every invariant of a batch (docs/validation.md), checked before any arithmetic.
//!
//! Lengths are taken from the slices themselves and every value is range-checked before it
//! is used as an offset, so no input can make flashpage read out of bounds, allocate an
//! absurd amount, or panic. Each violation is its own [`Error`] variant naming the argument,
//! the expected and the actual value.

use crate::error::{Error, Result};
use crate::layout::{
    BatchDesc, CustomMask, DType, KvIndex, MAX_PAGE_SIZE, PAGE_SIZE_RULE, QueryIndex,
};
use crate::options::AttentionOptions;

/// One request of a validated batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// First query row of the request in `q`/`o`.
    pub qo_start: usize,
    /// Query rows (1 for decode).
    pub qo_len: usize,
    /// Paged: offset of the request's first page id in `kv_indices`; ragged: first token.
    pub kv_start: usize,
    /// Keys of the request.
    pub kv_len: usize,
}

/// A batch whose every invariant holds. Obtained from [`check_batch`] only.
#[derive(Debug, Clone, Copy)]
pub struct ValidBatch<'a> {
    desc: BatchDesc<'a>,
    options: AttentionOptions,
    batch_size: usize,
    num_q_rows: usize,
    max_kv_len: usize,
    max_qo_len: usize,
    total_kv_len: u64,
}

impl<'a> ValidBatch<'a> {
    /// The batch as described by the caller.
    pub fn desc(&self) -> &BatchDesc<'a> {
        &self.desc
    }
    /// The options the batch was validated with.
    pub fn options(&self) -> &AttentionOptions {
        &self.options
    }
    /// Requests in the batch (B), padded ones included.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
    /// Query rows (`qo_indptr[B]`, or B for decode).
    pub fn num_q_rows(&self) -> usize {
        self.num_q_rows
    }
    /// Longest request in keys.
    pub fn max_kv_len(&self) -> usize {
        self.max_kv_len
    }
    /// Longest request in query rows.
    pub fn max_qo_len(&self) -> usize {
        self.max_qo_len
    }
    /// Keys over all requests.
    pub fn total_kv_len(&self) -> u64 {
        self.total_kv_len
    }
    /// Tokens per page (1 for ragged K/V).
    pub fn page_size(&self) -> usize {
        match self.desc.kv {
            KvIndex::Paged(p) => p.page_size,
            KvIndex::Ragged { .. } => 1,
        }
    }

    /// Request `r` (`r < batch_size`; larger `r` yields an empty request).
    #[inline(always)]
    pub fn request(&self, r: usize) -> Request {
        if r >= self.batch_size {
            return Request {
                qo_start: self.num_q_rows,
                qo_len: 0,
                kv_start: 0,
                kv_len: 0,
            };
        }
        let (qo_start, qo_len) = match self.desc.q {
            QueryIndex::Decode => (r, 1),
            QueryIndex::Ragged { qo_indptr } => (
                qo_indptr[r] as usize,
                (qo_indptr[r + 1] - qo_indptr[r]) as usize,
            ),
        };
        let (kv_start, kv_len) = match self.desc.kv {
            KvIndex::Paged(p) => {
                let start = p.indptr[r] as usize;
                let pages = (p.indptr[r + 1] - p.indptr[r]) as usize;
                let len = if pages == 0 {
                    0
                } else {
                    (pages - 1) * p.page_size + p.last_page_len[r] as usize
                };
                (start, len)
            }
            KvIndex::Ragged { indptr } => {
                (indptr[r] as usize, (indptr[r + 1] - indptr[r]) as usize)
            }
        };
        Request {
            qo_start,
            qo_len,
            kv_start,
            kv_len,
        }
    }
}

pub(crate) fn check_indptr(field: &'static str, indptr: &[i32]) -> Result<()> {
    let Some(&first) = indptr.first() else {
        return Err(Error::EmptyIndptr { field });
    };
    if first != 0 {
        return Err(Error::IndptrStart {
            field,
            actual: first as i64,
        });
    }
    for (i, w) in indptr.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::IndptrDecreasing {
                field,
                index: i + 1,
                previous: w[0] as i64,
                actual: w[1] as i64,
            });
        }
    }
    Ok(())
}

/// Checks a custom mask ([`CustomMask`]) against a batch of `batch_size` requests whose
/// request `r` has the `(qo_len, kv_len)` that `request(r)` returns, given only the mask's
/// host `mask_indptr` and the length in bytes of its bits buffer (which may live on the
/// device): `mask_indptr` has `batch_size + 1` entries ([`Error::ArrayLength`]), starts at 0
/// ([`Error::IndptrStart`]), never decreases ([`Error::IndptrDecreasing`]), gives each
/// request exactly `ceil(qo_len·kv_len / 8)` bytes ([`Error::CustomMaskLength`]), and ends
/// inside the bits buffer ([`Error::TensorShape`] naming `custom_mask`). O(B); never panics.
///
/// ```
/// use flashpage::validate::check_custom_mask;
/// use flashpage::ErrorKind;
/// // Two requests: 2 x 3 (6 bits: 1 byte) and 1 x 9 (9 bits: 2 bytes).
/// let lens = [(2, 3), (1, 9)];
/// assert!(check_custom_mask(&[0, 1, 3], 3, 2, |r| lens[r]).is_ok());
/// let e = check_custom_mask(&[0, 1, 2], 3, 2, |r| lens[r]).unwrap_err();
/// assert_eq!(e.kind(), ErrorKind::CustomMaskLength);
/// ```
pub fn check_custom_mask(
    mask_indptr: &[i32],
    bits_len: usize,
    batch_size: usize,
    request: impl Fn(usize) -> (usize, usize),
) -> Result<()> {
    const FIELD: &str = "mask_indptr";
    if mask_indptr.len() != batch_size.saturating_add(1) {
        return Err(Error::ArrayLength {
            field: FIELD,
            expected: batch_size.saturating_add(1),
            actual: mask_indptr.len(),
            rule: "batch_size + 1",
        });
    }
    check_indptr(FIELD, mask_indptr)?;
    for (r, w) in mask_indptr.windows(2).enumerate() {
        let (qo_len, kv_len) = request(r);
        let expected = qo_len
            .checked_mul(kv_len)
            .ok_or(Error::SizeOverflow {
                what: "custom mask bits",
            })?
            .div_ceil(8);
        let actual = (w[1] - w[0]) as usize;
        if actual != expected {
            return Err(Error::CustomMaskLength {
                request: r,
                qo_len,
                kv_len,
                expected,
                actual,
            });
        }
    }
    let total = mask_indptr[batch_size] as usize;
    if total > bits_len {
        return Err(Error::TensorShape {
            tensor: "custom_mask",
            expected: format!("at least {total} bytes (mask_indptr[{batch_size}] = {total})"),
            actual: format!("{bits_len} bytes"),
        });
    }
    Ok(())
}

/// [`check_custom_mask`] on host mask data.
pub fn check_custom_mask_host(
    mask: &CustomMask<'_>,
    batch_size: usize,
    request: impl Fn(usize) -> (usize, usize),
) -> Result<()> {
    check_custom_mask(mask.indptr, mask.bits.len(), batch_size, request)
}

/// Checks a batch and its options; O(B), reads nothing but the host-side index arrays.
///
/// The founding scenario is caught by the first check:
///
/// ```
/// use flashpage::{HeadConfig, PageTable, BatchDesc, AttentionOptions, Error};
/// let heads = HeadConfig::new(32, 16, 128).unwrap();
/// let qo_indptr = [0, 1, 2, 3, 4, 5, 6, 7, 8];
/// let pages = PageTable { page_size: 16, num_pages: 64, indptr: &[0], last_page_len: &[], num_indices: 0 };
/// let err = flashpage::validate::check_batch(
///     &BatchDesc::prefill_paged(heads, &qo_indptr, pages), &AttentionOptions::default()).unwrap_err();
/// assert_eq!(err, Error::IndptrLengthMismatch { qo_indptr_len: 9, kv_indptr_len: 1 });
/// ```
pub fn check_batch<'a>(desc: &BatchDesc<'a>, options: &AttentionOptions) -> Result<ValidBatch<'a>> {
    options.validate()?;
    let kv_indptr = match desc.kv {
        KvIndex::Paged(p) => p.indptr,
        KvIndex::Ragged { indptr } => indptr,
    };
    let kv_field = match desc.kv {
        KvIndex::Paged(_) => "kv_indptr",
        KvIndex::Ragged { .. } => "kv_indptr",
    };
    // Batch size and array lengths first: nothing is indexed before they agree.
    if let QueryIndex::Ragged { qo_indptr } = desc.q
        && qo_indptr.len() != kv_indptr.len()
    {
        return Err(Error::IndptrLengthMismatch {
            qo_indptr_len: qo_indptr.len(),
            kv_indptr_len: kv_indptr.len(),
        });
    }
    if kv_indptr.is_empty() {
        return Err(Error::EmptyIndptr { field: kv_field });
    }
    let batch_size = kv_indptr.len() - 1;
    if let KvIndex::Paged(p) = desc.kv {
        if p.page_size == 0 || p.page_size > MAX_PAGE_SIZE {
            return Err(Error::UnsupportedPageSize {
                expected: PAGE_SIZE_RULE,
                actual: p.page_size,
            });
        }
        if p.last_page_len.len() != batch_size {
            return Err(Error::ArrayLength {
                field: "kv_last_page_len",
                expected: batch_size,
                actual: p.last_page_len.len(),
                rule: "batch_size = kv_indptr.len() - 1",
            });
        }
    }
    if let QueryIndex::Ragged { qo_indptr } = desc.q {
        check_indptr("qo_indptr", qo_indptr)?;
    }
    check_indptr(kv_field, kv_indptr)?;
    if let KvIndex::Paged(p) = desc.kv {
        let needed = kv_indptr[batch_size] as usize;
        if needed > p.num_indices {
            return Err(Error::IndicesTooShort {
                batch_size,
                needed,
                actual: p.num_indices,
            });
        }
        for r in 0..batch_size {
            let pages = (kv_indptr[r + 1] - kv_indptr[r]) as usize;
            let last = p.last_page_len[r];
            let ok = if pages == 0 {
                last == 0
            } else {
                last >= 1 && last as usize <= p.page_size
            };
            if !ok {
                return Err(Error::LastPageLen {
                    request: r,
                    actual: last as i64,
                    num_pages: pages,
                    page_size: p.page_size,
                });
            }
        }
    }
    let num_q_rows = match desc.q {
        QueryIndex::Decode => batch_size,
        QueryIndex::Ragged { qo_indptr } => qo_indptr[batch_size] as usize,
    };
    let mut vb = ValidBatch {
        desc: *desc,
        options: *options,
        batch_size,
        num_q_rows,
        max_kv_len: 0,
        max_qo_len: 0,
        total_kv_len: 0,
    };
    let prefill = !desc.is_decode();
    for r in 0..batch_size {
        let req = vb.request(r);
        if options.causal && prefill && req.qo_len > req.kv_len {
            return Err(Error::CausalQueryLongerThanKv {
                request: r,
                qo_len: req.qo_len,
                kv_len: req.kv_len,
            });
        }
        vb.max_kv_len = vb.max_kv_len.max(req.kv_len);
        vb.max_qo_len = vb.max_qo_len.max(req.qo_len);
        vb.total_kv_len += req.kv_len as u64;
    }
    Ok(vb)
}

/// Checks that every page id a batch uses is in `0..num_pages` (O(used pages)).
///
/// Run it where the ids are read: the CPU backend does before every run; callers whose ids
/// live on the device check their host copy.
pub fn check_page_ids(kv_indptr: &[i32], kv_indices: &[i32], num_pages: usize) -> Result<()> {
    let used = kv_indptr.last().map_or(0, |&n| n.max(0) as usize);
    if used > kv_indices.len() {
        return Err(Error::IndicesTooShort {
            batch_size: kv_indptr.len().saturating_sub(1),
            needed: used,
            actual: kv_indices.len(),
        });
    }
    // Branch-free scan; locate the culprit only on failure. A negative id reads as a u32 of
    // at least 2^31, so the bound is clamped to 2^31 (no i32 id reaches it) to keep every
    // negative id out of range whatever num_pages is.
    let limit = num_pages.min(1 << 31);
    let bad = kv_indices[..used]
        .iter()
        .fold(false, |acc, &id| acc | (id as u32 as usize >= limit));
    if bad
        && let Some((index, &id)) = kv_indices[..used]
            .iter()
            .enumerate()
            .find(|&(_, &id)| id < 0 || id as usize >= num_pages)
    {
        return Err(Error::PageIdOutOfRange {
            index,
            page_id: id as i64,
            num_pages,
        });
    }
    Ok(())
}

/// Checks an FP8 scale argument (`k_scale` or `v_scale`, named by `field`) of a cache whose
/// elements are `dtype`: scales belong to an FP8 cache only (`InvalidOption` otherwise), hold
/// 1 (per tensor) or `num_kv_heads` (per head) values (`TensorShape`), each finite, positive
/// and normal (`InvalidOption` naming the first bad element, e.g. `k_scale[1] = NaN`).
pub fn check_fp8_scale(
    field: &'static str,
    dtype: DType,
    scale: Option<&[f32]>,
    num_kv_heads: usize,
) -> Result<()> {
    let Some(s) = scale else {
        return Ok(());
    };
    if !dtype.is_fp8() {
        return Err(Error::InvalidOption {
            field,
            expected: "no scale: scales belong to an fp8 (e4m3fn or e5m2) k/v cache",
            actual: format!("{} values with a {} cache", s.len(), dtype.name()),
        });
    }
    if s.len() != 1 && s.len() != num_kv_heads {
        return Err(Error::TensorShape {
            tensor: field,
            expected: format!("1 (per tensor) or num_kv_heads = {num_kv_heads} (per head) values"),
            actual: format!("{} values", s.len()),
        });
    }
    if let Some((i, x)) = s
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() && **x >= f32::MIN_POSITIVE))
    {
        return Err(Error::InvalidOption {
            field,
            expected: "finite positive normal f32 values",
            actual: format!("{field}[{i}] = {x}"),
        });
    }
    Ok(())
}
