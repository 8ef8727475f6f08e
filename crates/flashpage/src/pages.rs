//! Page allocation for the paged KV cache: a free list, per-sequence page lists that grow as
//! tokens are appended, and the CSR arrays of a step built from them; and sizing a cache
//! from a memory budget.
//!
//! ```
//! use flashpage::pages::PageAllocator;
//! let mut alloc = PageAllocator::new(16, 4)?;   // 16 pages of 4 tokens
//! alloc.reserve(7, 10)?;                        // request 7: a 10-token prompt (3 pages)
//! alloc.reserve(9, 3)?;                         // request 9: 3 tokens (1 page)
//! alloc.extend(7, 1)?;                          // one decode token for request 7
//! let batch = alloc.batch(&[(7, 1), (9, 1)])?;  // one query row each
//! assert_eq!(batch.kv_indptr(), &[0, 3, 4]);
//! assert_eq!(batch.kv_last_page_len(), &[3, 3]);
//! assert_eq!(alloc.release(7)?, 3);
//! let e = alloc.reserve(11, 100).unwrap_err();  // 25 pages wanted, 15 free
//! assert_eq!(e.to_string(), "request 11 needs 25 more pages but only 15 of 16 are free");
//! # Ok::<(), flashpage::Error>(())
//! ```

use std::collections::BTreeMap;

use crate::builder::BatchBuilder;
use crate::error::{Error, Result};
use crate::layout::{DType, HeadConfig, MAX_PAGE_SIZE, PAGE_SIZE_RULE};

#[derive(Debug, Clone, Default)]
struct Sequence {
    pages: Vec<i32>,
    len: usize,
}

/// Hands out the pages of a cache of `num_pages` pages to sequences by id.
///
/// Every operation either succeeds completely or changes nothing.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    page_size: usize,
    num_pages: usize,
    /// Free page ids; the next one handed out is the last.
    free: Vec<i32>,
    seqs: BTreeMap<u64, Sequence>,
}

impl PageAllocator {
    /// A cache of `num_pages` pages of `page_size` tokens, all free.
    pub fn new(num_pages: usize, page_size: usize) -> Result<Self> {
        if page_size == 0 || page_size > MAX_PAGE_SIZE {
            return Err(Error::UnsupportedPageSize {
                expected: PAGE_SIZE_RULE,
                actual: page_size,
            });
        }
        if num_pages > i32::MAX as usize {
            return Err(Error::LimitExceeded {
                field: "num_pages",
                limit: i32::MAX as usize,
                actual: num_pages,
                rule: "page ids are int32",
            });
        }
        Ok(PageAllocator {
            page_size,
            num_pages,
            free: (0..num_pages as i32).rev().collect(),
            seqs: BTreeMap::new(),
        })
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Pages in the cache.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    /// Pages not held by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// True if sequence `id` holds pages (was reserved and not released).
    pub fn contains(&self, id: u64) -> bool {
        self.seqs.contains_key(&id)
    }
    /// Ids of the sequences held, in increasing order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.seqs.keys().copied()
    }

    fn seq(&self, id: u64) -> Result<&Sequence> {
        self.seqs
            .get(&id)
            .ok_or(Error::UnknownRequest { request: id })
    }

    /// Tokens of sequence `id`.
    pub fn len_of(&self, id: u64) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }
    /// Page ids of sequence `id`, in token order.
    pub fn pages_of(&self, id: u64) -> Result<&[i32]> {
        Ok(&self.seq(id)?.pages)
    }

    /// Pages needed to grow a sequence of `pages` pages to `len` tokens.
    fn wanted(&self, id: u64, pages: usize, len: usize) -> Result<usize> {
        let wanted = len.div_ceil(self.page_size).saturating_sub(pages);
        if wanted > self.free.len() {
            return Err(Error::OutOfPages {
                request: id,
                wanted,
                free: self.free.len(),
                num_pages: self.num_pages,
            });
        }
        Ok(wanted)
    }

    /// Starts sequence `id` with room for `tokens` tokens.
    pub fn reserve(&mut self, id: u64, tokens: usize) -> Result<()> {
        if self.contains(id) {
            return Err(Error::DuplicateRequest { request: id });
        }
        let wanted = self.wanted(id, 0, tokens)?;
        let pages = self.free.split_off(self.free.len() - wanted);
        self.seqs.insert(
            id,
            Sequence {
                pages: pages.into_iter().rev().collect(),
                len: tokens,
            },
        );
        Ok(())
    }

    /// Grows sequence `id` by `tokens` tokens, taking pages as needed.
    pub fn extend(&mut self, id: u64, tokens: usize) -> Result<()> {
        let s = self.seq(id)?;
        let len = s.len.checked_add(tokens).ok_or(Error::SizeOverflow {
            what: "sequence length",
        })?;
        let wanted = self.wanted(id, s.pages.len(), len)?;
        let new = self.free.split_off(self.free.len() - wanted);
        let s = self.seqs.get_mut(&id).expect("checked above");
        s.pages.extend(new.into_iter().rev());
        s.len = len;
        Ok(())
    }

    /// Ends sequence `id`; returns the number of pages it gave back.
    pub fn release(&mut self, id: u64) -> Result<usize> {
        let s = self
            .seqs
            .remove(&id)
            .ok_or(Error::UnknownRequest { request: id })?;
        let n = s.pages.len();
        self.free.extend(s.pages.into_iter().rev());
        Ok(n)
    }

    /// Adds request `id` to `batch` with `qo_len` query rows (the tokens appended this step,
    /// already counted in its length) over all its tokens and pages.
    pub fn push_to(&self, batch: &mut BatchBuilder, id: u64, qo_len: usize) -> Result<()> {
        if batch.page_size() != self.page_size {
            return Err(Error::PlanMismatch {
                what: "page_size",
                expected: self.page_size.to_string(),
                actual: batch.page_size().to_string(),
            });
        }
        let s = self.seq(id)?;
        batch.push(qo_len, s.len, &s.pages)
    }

    /// The CSR arrays of a step: one entry per `(id, qo_len)`, in that order.
    pub fn batch(&self, requests: &[(u64, usize)]) -> Result<BatchBuilder> {
        let mut b = BatchBuilder::new(self.page_size)?;
        self.fill(&mut b, requests)?;
        Ok(b)
    }

    /// Clears `batch` and fills it with the requests (reusing its memory).
    pub fn fill(&self, batch: &mut BatchBuilder, requests: &[(u64, usize)]) -> Result<()> {
        batch.clear();
        for &(id, qo_len) in requests {
            self.push_to(batch, id, qo_len)?;
        }
        Ok(())
    }
}

/// Bytes of one page of K and V for one layer.
pub fn page_bytes(heads: &HeadConfig, dtype: DType, page_size: usize) -> Result<usize> {
    2usize
        .checked_mul(page_size)
        .and_then(|b| b.checked_mul(heads.num_kv_heads()))
        .and_then(|b| b.checked_mul(heads.head_dim()))
        .and_then(|b| b.checked_mul(dtype.size()))
        .ok_or(Error::SizeOverflow { what: "page bytes" })
}

/// Pages that fit a budget of `bytes` for the K/V caches of `num_layers` layers (each layer
/// holds its own K and V of every page).
///
/// ```
/// use flashpage::{DType, HeadConfig, pages::pages_for_budget};
/// // Llama-3-8B: 8 KV heads of 128, bf16, 32 layers, pages of 16 tokens: 2 MiB a page.
/// let heads = HeadConfig::new(32, 8, 128)?;
/// assert_eq!(pages_for_budget(40 << 30, &heads, DType::BF16, 16, 32)?, 20480);
/// # Ok::<(), flashpage::Error>(())
/// ```
pub fn pages_for_budget(
    bytes: usize,
    heads: &HeadConfig,
    dtype: DType,
    page_size: usize,
    num_layers: usize,
) -> Result<usize> {
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(Error::UnsupportedPageSize {
            expected: PAGE_SIZE_RULE,
            actual: page_size,
        });
    }
    if num_layers == 0 {
        return Err(Error::NotPositive {
            field: "num_layers",
            actual: 0,
        });
    }
    let per = page_bytes(heads, dtype, page_size)?
        .checked_mul(num_layers)
        .ok_or(Error::SizeOverflow { what: "page bytes" })?;
    Ok((bytes / per).min(i32::MAX as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_exclusive_and_failures_change_nothing() {
        let mut a = PageAllocator::new(8, 4).unwrap();
        a.reserve(1, 9).unwrap(); // 3 pages
        a.reserve(2, 0).unwrap(); // none
        a.extend(2, 5).unwrap(); // 2 pages
        assert_eq!(a.free_pages(), 3);
        let before = (a.pages_of(1).unwrap().to_vec(), a.free.clone());
        assert_eq!(
            a.extend(1, 4 * 4),
            Err(Error::OutOfPages {
                request: 1,
                wanted: 4,
                free: 3,
                num_pages: 8
            })
        );
        assert_eq!((a.pages_of(1).unwrap().to_vec(), a.free.clone()), before);
        assert_eq!(a.len_of(1).unwrap(), 9);
        assert_eq!(a.reserve(1, 1), Err(Error::DuplicateRequest { request: 1 }));
        assert_eq!(a.release(3), Err(Error::UnknownRequest { request: 3 }));
        a.extend(1, 3).unwrap(); // 12 tokens: still 3 pages
        assert_eq!(a.pages_of(1).unwrap().len(), 3);
        let mut all: Vec<i32> = a.pages_of(1).unwrap().to_vec();
        all.extend(a.pages_of(2).unwrap());
        all.extend(&a.free);
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(a.release(1).unwrap(), 3);
        assert_eq!(a.free_pages(), 6);
        a.reserve(4, 24).unwrap();
        assert_eq!(a.free_pages(), 0);
    }

    #[test]
    fn batch_arrays_follow_the_sequences() {
        let mut a = PageAllocator::new(10, 3).unwrap();
        a.reserve(5, 7).unwrap();
        a.reserve(6, 3).unwrap();
        let b = a.batch(&[(6, 3), (5, 7)]).unwrap();
        assert_eq!(b.qo_indptr(), &[0, 3, 10]);
        assert_eq!(b.kv_indptr(), &[0, 1, 4]);
        assert_eq!(b.kv_last_page_len(), &[3, 1]);
        let mut ids = a.pages_of(6).unwrap().to_vec();
        ids.extend(a.pages_of(5).unwrap());
        assert_eq!(b.kv_indices(), &ids[..]);
        assert_eq!(
            a.batch(&[(9, 1)]).unwrap_err(),
            Error::UnknownRequest { request: 9 }
        );
    }

    #[test]
    fn budget_sizing() {
        let h = HeadConfig::new(8, 2, 64).unwrap();
        assert_eq!(page_bytes(&h, DType::F32, 16).unwrap(), 2 * 16 * 2 * 64 * 4);
        assert_eq!(
            pages_for_budget(16384 * 10 - 1, &h, DType::F32, 16, 1).unwrap(),
            9
        );
        assert_eq!(
            pages_for_budget(16384 * 10, &h, DType::F16, 16, 2).unwrap(),
            10
        );
        assert!(pages_for_budget(1 << 20, &h, DType::F16, 0, 2).is_err());
        assert!(pages_for_budget(1 << 20, &h, DType::F16, 16, 0).is_err());
    }
}
