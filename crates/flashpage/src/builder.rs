//! Build the CSR arrays of a batch from per-request page lists, so callers never write
//! indptr arithmetic by hand (the founding bug cannot be written with it).

use crate::error::{Error, Result};
use crate::layout::{BatchDesc, HeadConfig, MAX_PAGE_SIZE, PAGE_SIZE_RULE, PageTable};

/// Builds `qo_indptr`, `kv_indptr`, `kv_indices` and `kv_last_page_len` request by request,
/// including padded (empty) requests for a fixed graph-mode capacity.
///
/// ```
/// use flashpage::{BatchBuilder, HeadConfig, AttentionOptions, Plan, PlanConfig};
/// let mut b = BatchBuilder::new(16).unwrap();
/// b.push(1, 40, &[7, 2, 5]).unwrap(); // 40 tokens in 3 pages
/// b.push(1, 16, &[3]).unwrap();       // a full last page
/// b.pad_to(4).unwrap();               // graph capacity 4
/// assert_eq!(b.kv_indptr(), &[0, 3, 4, 4, 4]);
/// assert_eq!(b.kv_last_page_len(), &[8, 16, 0, 0]);
/// let heads = HeadConfig::new(8, 2, 64).unwrap();
/// let plan = Plan::new(&b.decode(heads, 8), &AttentionOptions::default(),
///                      &PlanConfig::with_parallelism(2)).unwrap();
/// assert_eq!(plan.batch_size(), 4);
/// ```
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    page_size: usize,
    qo_indptr: Vec<i32>,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    last_page_len: Vec<i32>,
}

impl BatchBuilder {
    /// An empty batch over pages of `page_size` tokens.
    pub fn new(page_size: usize) -> Result<Self> {
        if page_size == 0 || page_size > MAX_PAGE_SIZE {
            return Err(Error::UnsupportedPageSize {
                expected: PAGE_SIZE_RULE,
                actual: page_size,
            });
        }
        Ok(BatchBuilder {
            page_size,
            qo_indptr: vec![0],
            kv_indptr: vec![0],
            kv_indices: Vec::new(),
            last_page_len: Vec::new(),
        })
    }

    /// Clears all requests, keeping the memory.
    pub fn clear(&mut self) {
        self.qo_indptr.truncate(1);
        self.kv_indptr.truncate(1);
        self.kv_indices.clear();
        self.last_page_len.clear();
    }

    /// Appends a request with `qo_len` query rows and `kv_len` keys stored in `pages`
    /// (exactly `ceil(kv_len / page_size)` page ids, in token order).
    pub fn push(&mut self, qo_len: usize, kv_len: usize, pages: &[i32]) -> Result<()> {
        let need = kv_len.div_ceil(self.page_size);
        if pages.len() != need {
            return Err(Error::ArrayLength {
                field: "pages",
                expected: need,
                actual: pages.len(),
                rule: "ceil(kv_len / page_size)",
            });
        }
        let q_end = fit(
            (*self.qo_indptr.last().unwrap() as usize).saturating_add(qo_len),
            "qo_indptr",
        )?;
        let kv_end = fit(self.kv_indices.len() + pages.len(), "kv_indptr")?;
        self.qo_indptr.push(q_end);
        self.kv_indptr.push(kv_end);
        self.kv_indices.extend_from_slice(pages);
        let last = if kv_len == 0 {
            0
        } else {
            kv_len - (need - 1) * self.page_size
        };
        self.last_page_len.push(last as i32);
        Ok(())
    }

    /// Appends an empty request (no query rows in prefill, no keys).
    pub fn push_padding(&mut self) {
        let q = *self.qo_indptr.last().unwrap();
        let kv = *self.kv_indptr.last().unwrap();
        self.qo_indptr.push(q);
        self.kv_indptr.push(kv);
        self.last_page_len.push(0);
    }

    /// Pads with empty requests up to `capacity` requests.
    pub fn pad_to(&mut self, capacity: usize) -> Result<()> {
        if self.len() > capacity {
            return Err(Error::LimitExceeded {
                field: "batch_size",
                limit: capacity,
                actual: self.len(),
                rule: "graph_capacity",
            });
        }
        while self.len() < capacity {
            self.push_padding();
        }
        Ok(())
    }

    /// Requests so far (padding included).
    pub fn len(&self) -> usize {
        self.last_page_len.len()
    }
    /// True when there is no request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// `qo_indptr` (B + 1 entries).
    pub fn qo_indptr(&self) -> &[i32] {
        &self.qo_indptr
    }
    /// `kv_indptr` (B + 1 entries).
    pub fn kv_indptr(&self) -> &[i32] {
        &self.kv_indptr
    }
    /// `kv_indices`.
    pub fn kv_indices(&self) -> &[i32] {
        &self.kv_indices
    }
    /// `kv_last_page_len` (B entries).
    pub fn kv_last_page_len(&self) -> &[i32] {
        &self.last_page_len
    }

    /// The page table over a cache of `num_pages` pages.
    pub fn page_table(&self, num_pages: usize) -> PageTable<'_> {
        PageTable {
            page_size: self.page_size,
            num_pages,
            indptr: &self.kv_indptr,
            last_page_len: &self.last_page_len,
            num_indices: self.kv_indices.len(),
        }
    }

    /// A decode batch (one query row per request, padding included).
    pub fn decode(&self, heads: HeadConfig, num_pages: usize) -> BatchDesc<'_> {
        BatchDesc::decode(heads, self.page_table(num_pages))
    }

    /// A prefill batch over the paged cache.
    pub fn prefill(&self, heads: HeadConfig, num_pages: usize) -> BatchDesc<'_> {
        BatchDesc::prefill_paged(heads, &self.qo_indptr, self.page_table(num_pages))
    }
}

fn fit(v: usize, field: &'static str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::LimitExceeded {
        field,
        limit: i32::MAX as usize,
        actual: v,
        rule: "index arrays are int32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::AttentionOptions;
    use crate::validate::check_batch;

    #[test]
    fn builder_output_always_validates() {
        let mut b = BatchBuilder::new(4).unwrap();
        b.push(3, 9, &[0, 1, 2]).unwrap();
        b.push(0, 0, &[]).unwrap();
        b.push(2, 4, &[3]).unwrap();
        b.pad_to(6).unwrap();
        assert_eq!(b.qo_indptr(), &[0, 3, 3, 5, 5, 5, 5]);
        assert_eq!(b.kv_last_page_len(), &[1, 0, 4, 0, 0, 0]);
        let heads = HeadConfig::new(4, 2, 64).unwrap();
        let opts = AttentionOptions::default().with_causal(true);
        let vb = check_batch(&b.prefill(heads, 4), &opts).unwrap();
        assert_eq!(vb.batch_size(), 6);
        assert_eq!(vb.request(0).kv_len, 9);
        assert_eq!(vb.request(2).kv_len, 4);
    }

    #[test]
    fn wrong_page_count_is_rejected() {
        let mut b = BatchBuilder::new(16).unwrap();
        let e = b.push(1, 17, &[1]).unwrap_err();
        assert!(
            e.to_string().contains("pages has 1 entry, expected 2"),
            "{e}"
        );
        assert!(b.is_empty(), "a rejected push changes nothing");
    }

    #[test]
    fn huge_lengths_are_rejected_without_change() {
        let mut b = BatchBuilder::new(16).unwrap();
        b.push(5, 1, &[0]).unwrap();
        let e = b.push(usize::MAX, 0, &[]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::LimitExceeded {
                    field: "qo_indptr",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = b.push(i32::MAX as usize, 0, &[]).unwrap_err();
        assert!(e.to_string().contains("qo_indptr = 2147483652"), "{e}");
        assert_eq!(b.len(), 1);
        assert_eq!(b.qo_indptr(), &[0, 5]);
    }

    #[test]
    fn pad_below_len_is_rejected() {
        let mut b = BatchBuilder::new(16).unwrap();
        b.push(1, 1, &[0]).unwrap();
        b.push(1, 1, &[1]).unwrap();
        assert!(matches!(b.pad_to(1), Err(Error::LimitExceeded { .. })));
        assert!(BatchBuilder::new(0).is_err());
        assert!(BatchBuilder::new(257).is_err());
    }
}
