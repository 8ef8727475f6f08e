//! What a batch looks like: heads, dtypes, the paged page table, ragged offsets and the
//! memory layout of the KV cache.
//!
//! These are plain descriptions over the caller's slices; [`crate::validate`] checks them
//! before anything else reads them.

use crate::error::{Error, Result};

/// Element type of q, k, v and o. Accumulation is always f32.
///
/// q and o are always one of the three float types ([`DType::ALL`]); K and V have q's type,
/// or one of the two FP8 types ([`DType::FP8`]) for a quantised cache whose values are
/// `decode(code) · scale` with the scales of [`crate::backend::KvCache::with_scales`]
/// (docs/semantics.md, "FP8 KV cache").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// OCP FP8 E4M3 without infinities (`float8_e4m3fn`): K/V storage only.
    E4M3Fn,
    /// OCP FP8 E5M2 (`float8_e5m2`): K/V storage only.
    E5M2,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::E4M3Fn | DType::E5M2 => 1,
        }
    }

    /// Lowercase name (`f32`, `f16`, `bf16`, `e4m3fn`, `e5m2`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::E4M3Fn => "e4m3fn",
            DType::E5M2 => "e5m2",
        }
    }

    /// Parses `f32`/`float32`, `f16`/`float16`/`half`, `bf16`/`bfloat16`,
    /// `e4m3fn`/`fp8_e4m3fn`/`float8_e4m3fn`/`fp8` and `e5m2`/`fp8_e5m2`/`float8_e5m2`.
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "e4m3fn" | "fp8_e4m3fn" | "float8_e4m3fn" | "fp8" => Some(DType::E4M3Fn),
            "e5m2" | "fp8_e5m2" | "float8_e5m2" => Some(DType::E5M2),
            _ => None,
        }
    }

    /// The FP8 format of an FP8 dtype (`None` for the float types).
    pub fn fp8_format(self) -> Option<crate::fp8::Fp8Format> {
        match self {
            DType::E4M3Fn => Some(crate::fp8::Fp8Format::E4M3Fn),
            DType::E5M2 => Some(crate::fp8::Fp8Format::E5M2),
            _ => None,
        }
    }

    /// True for the FP8 (K/V storage only) dtypes.
    pub fn is_fp8(self) -> bool {
        self.fp8_format().is_some()
    }

    /// The dtypes of q and o (and of K/V without quantisation).
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// The FP8 dtypes a K/V cache may have besides q's.
    pub const FP8: [DType; 2] = [DType::E4M3Fn, DType::E5M2];
}

/// Head dimensions accepted by every backend: a multiple of 16 in `16..=256`.
pub const HEAD_DIM_RULE: &str = "a multiple of 16 in 16..=256";
/// Page sizes accepted by every backend.
pub const PAGE_SIZE_RULE: &str = "1..=256";
/// Largest supported page size.
pub const MAX_PAGE_SIZE: usize = 256;

/// Attention heads: query/output heads, key/value heads and the head dimension.
///
/// ```
/// let h = flashpage::HeadConfig::new(32, 8, 128).unwrap();
/// assert_eq!(h.group_size(), 4);
/// assert!(flashpage::HeadConfig::new(32, 5, 128).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "HeadCounts", into = "HeadCounts")
)]
pub struct HeadConfig {
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl HeadConfig {
    /// Validates and builds a head configuration (GQA when `num_qo_heads > num_kv_heads`,
    /// MQA when `num_kv_heads == 1`).
    pub fn new(num_qo_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        for (field, v) in [
            ("num_qo_heads", num_qo_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(Error::NotPositive { field, actual: 0 });
            }
        }
        if !num_qo_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::HeadRatio {
                num_qo_heads,
                num_kv_heads,
            });
        }
        if !head_dim.is_multiple_of(16) || head_dim > 256 {
            return Err(Error::UnsupportedHeadDim {
                expected: HEAD_DIM_RULE,
                actual: head_dim,
            });
        }
        if num_qo_heads > 1 << 16 {
            return Err(Error::LimitExceeded {
                field: "num_qo_heads",
                limit: 1 << 16,
                actual: num_qo_heads,
                rule: "largest supported head count",
            });
        }
        Ok(HeadConfig {
            num_qo_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Query/output heads.
    pub fn num_qo_heads(&self) -> usize {
        self.num_qo_heads
    }
    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_qo_heads / self.num_kv_heads
    }
}

/// The paged KV index of a batch, in the CSR form serving engines use.
///
/// Request `r` owns pages `kv_indices[indptr[r]..indptr[r+1]]`; its last page holds
/// `last_page_len[r]` tokens. Only the host-side metadata is needed to plan: the page ids
/// themselves may live on the device, so the table carries their count, and
/// [`crate::validate::check_page_ids`] checks them where they are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTable<'a> {
    /// Tokens per page (`1..=256`).
    pub page_size: usize,
    /// Pages in the cache: every page id must be in `0..num_pages`.
    pub num_pages: usize,
    /// `kv_indptr`: B + 1 offsets into `kv_indices`.
    pub indptr: &'a [i32],
    /// `kv_last_page_len`: B entries.
    pub last_page_len: &'a [i32],
    /// `kv_indices.len()`.
    pub num_indices: usize,
}

/// Where a request's keys and values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvIndex<'a> {
    /// A paged cache.
    Paged(PageTable<'a>),
    /// Contiguous (ragged) K/V: request `r` owns tokens `indptr[r]..indptr[r+1]`.
    Ragged {
        /// B + 1 token offsets.
        indptr: &'a [i32],
    },
}

/// A custom attention mask per request, in FlashInfer's packed layout
/// (`packed_custom_mask`, `bitorder = "little"`): request `r`'s mask is the row-major
/// `qo_len × kv_len` boolean matrix starting at byte `indptr[r]` of `bits`, element
/// `(i, j)` at bit `8·indptr[r] + i·kv_len + j`, bit `b` of the buffer being bit `b % 8` (least
/// significant first) of byte `b / 8`. A set bit makes key `j` visible to query row `i`; the
/// mask combines with causal and the sliding window (a key is visible only if every active
/// mask admits it). See docs/semantics.md, "Custom masks".
///
/// `indptr` has `batch_size + 1` entries starting at 0, and request `r` owns exactly
/// `ceil(qo_len·kv_len / 8)` bytes (`flashinfer.packbits` of each request's flattened mask,
/// concatenated); [`crate::validate::check_custom_mask`] checks all of it.
///
/// ```
/// use flashpage::layout::CustomMask;
/// // One request of 2 query rows × 3 keys: row 0 sees keys 0 and 2, row 1 sees key 1.
/// let bits = [0b0001_0101u8];
/// let mask = CustomMask { bits: &bits, indptr: &[0, 1] };
/// assert_eq!(mask.bits.len(), 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomMask<'a> {
    /// The packed bits of every request, concatenated (bytes).
    pub bits: &'a [u8],
    /// `mask_indptr`: B + 1 byte offsets into `bits`.
    pub indptr: &'a [i32],
}

/// How query rows map to requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryIndex<'a> {
    /// One query row per request (batch decode).
    Decode,
    /// Ragged rows: request `r` owns rows `qo_indptr[r]..qo_indptr[r+1]` (prefill,
    /// chunked prefill, speculative verification).
    Ragged {
        /// B + 1 row offsets.
        qo_indptr: &'a [i32],
    },
}

/// A batch as the caller describes it: heads, query rows and the KV index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchDesc<'a> {
    /// Head configuration.
    pub heads: HeadConfig,
    /// Query rows per request.
    pub q: QueryIndex<'a>,
    /// Keys and values per request.
    pub kv: KvIndex<'a>,
}

impl<'a> BatchDesc<'a> {
    /// A decode batch over a paged cache.
    pub fn decode(heads: HeadConfig, pages: PageTable<'a>) -> Self {
        BatchDesc {
            heads,
            q: QueryIndex::Decode,
            kv: KvIndex::Paged(pages),
        }
    }

    /// A prefill batch over a paged cache.
    pub fn prefill_paged(heads: HeadConfig, qo_indptr: &'a [i32], pages: PageTable<'a>) -> Self {
        BatchDesc {
            heads,
            q: QueryIndex::Ragged { qo_indptr },
            kv: KvIndex::Paged(pages),
        }
    }

    /// A prefill batch over contiguous (ragged) K/V.
    pub fn prefill_ragged(heads: HeadConfig, qo_indptr: &'a [i32], kv_indptr: &'a [i32]) -> Self {
        BatchDesc {
            heads,
            q: QueryIndex::Ragged { qo_indptr },
            kv: KvIndex::Ragged { indptr: kv_indptr },
        }
    }

    /// True for a decode batch.
    pub fn is_decode(&self) -> bool {
        matches!(self.q, QueryIndex::Decode)
    }
}

/// The serialized form of a [`HeadConfig`], validated by [`HeadConfig::new`] when read.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
struct HeadCounts {
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[cfg(feature = "serde")]
impl TryFrom<HeadCounts> for HeadConfig {
    type Error = Error;
    fn try_from(h: HeadCounts) -> Result<HeadConfig> {
        HeadConfig::new(h.num_qo_heads, h.num_kv_heads, h.head_dim)
    }
}

#[cfg(feature = "serde")]
impl From<HeadConfig> for HeadCounts {
    fn from(h: HeadConfig) -> HeadCounts {
        HeadCounts {
            num_qo_heads: h.num_qo_heads,
            num_kv_heads: h.num_kv_heads,
            head_dim: h.head_dim,
        }
    }
}

/// Memory order of a paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum KvLayout {
    /// `[num_pages, page_size, num_kv_heads, head_dim]`.
    #[default]
    Nhd,
    /// `[num_pages, num_kv_heads, page_size, head_dim]`.
    Hnd,
}

impl KvLayout {
    /// `NHD` or `HND`.
    pub fn name(self) -> &'static str {
        match self {
            KvLayout::Nhd => "NHD",
            KvLayout::Hnd => "HND",
        }
    }
    /// Parses `NHD`/`HND` (any case).
    pub fn parse(s: &str) -> Option<KvLayout> {
        match s.to_ascii_uppercase().as_str() {
            "NHD" => Some(KvLayout::Nhd),
            "HND" => Some(KvLayout::Hnd),
            _ => None,
        }
    }
}

/// Element strides of a K or V cache; the head dimension is always contiguous.
///
/// Element `(page p, slot t, kv head h, d)` lives at `p*page + t*token + h*head + d`. Both
/// layouts, and K/V stored in one combined tensor (`[pages, 2, ...]`: double the page
/// stride, V's slice starting one half-page later), are all just strides. For ragged K/V,
/// `page` is the stride of one token and page size is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvStrides {
    /// Elements between pages.
    pub page: usize,
    /// Elements between tokens within a page.
    pub token: usize,
    /// Elements between KV heads.
    pub head: usize,
}

impl KvStrides {
    /// Strides of a dense cache in `layout`.
    ///
    /// ```
    /// use flashpage::{KvLayout, KvStrides};
    /// let s = KvStrides::dense(KvLayout::Hnd, 16, 8, 128);
    /// assert_eq!((s.page, s.token, s.head), (16 * 8 * 128, 128, 16 * 128));
    /// ```
    pub fn dense(layout: KvLayout, page_size: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let page = page_size * num_kv_heads * head_dim;
        match layout {
            KvLayout::Nhd => KvStrides {
                page,
                token: num_kv_heads * head_dim,
                head: head_dim,
            },
            KvLayout::Hnd => KvStrides {
                page,
                token: head_dim,
                head: page_size * head_dim,
            },
        }
    }

    /// Strides of contiguous ragged K/V `[tokens, num_kv_heads, head_dim]`.
    pub fn ragged(num_kv_heads: usize, head_dim: usize) -> Self {
        KvStrides {
            page: num_kv_heads * head_dim,
            token: 0,
            head: head_dim,
        }
    }

    /// One past the largest element offset touched by `num_pages` pages (0 when empty), or
    /// `None` on overflow.
    pub fn extent(
        &self,
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Option<usize> {
        if num_pages == 0 {
            return Some(0);
        }
        let last = (num_pages - 1)
            .checked_mul(self.page)?
            .checked_add((page_size - 1).checked_mul(self.token)?)?
            .checked_add((num_kv_heads - 1).checked_mul(self.head)?)?
            .checked_add(head_dim)?;
        Some(last)
    }
}

/// Element strides of q or o `[rows, heads, head_dim]`: between rows (tokens) and between
/// heads; the head dimension is always contiguous.
///
/// Element `(row r, head h, d)` lives at `r*row + h*head + d`. A query slice of a fused QKV
/// projection `[tokens, (Hq + 2·Hkv)·D]` is `QoStrides { row: (Hq + 2·Hkv)·D, head: D }`
/// over the buffer starting at the first q element; an output written into a wider buffer
/// has that buffer's row stride.
///
/// ```
/// use flashpage::QoStrides;
/// let s = QoStrides::contiguous(32, 128);
/// assert_eq!((s.row, s.head), (32 * 128, 128));
/// // q of a fused QKV buffer (32 q heads, 8 kv heads): rows are (32 + 2*8)*128 apart.
/// let fused = QoStrides::new((32 + 2 * 8) * 128, 128);
/// assert_eq!(fused.extent(3, 32, 128), Some(2 * 48 * 128 + 32 * 128));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QoStrides {
    /// Elements between rows (tokens).
    pub row: usize,
    /// Elements between heads of one row.
    pub head: usize,
}

impl QoStrides {
    /// Strides `row` and `head` (checked against a plan when a run uses them).
    pub fn new(row: usize, head: usize) -> Self {
        QoStrides { row, head }
    }

    /// Strides of a contiguous `[rows, num_heads, head_dim]` tensor.
    pub fn contiguous(num_heads: usize, head_dim: usize) -> Self {
        QoStrides {
            row: num_heads.saturating_mul(head_dim),
            head: head_dim,
        }
    }

    /// One past the largest element offset of `rows` rows of `num_heads` heads (0 when
    /// `rows`, `num_heads` or `head_dim` is 0), or `None` on overflow.
    pub fn extent(&self, rows: usize, num_heads: usize, head_dim: usize) -> Option<usize> {
        if rows == 0 || num_heads == 0 || head_dim == 0 {
            return Some(0);
        }
        (rows - 1)
            .checked_mul(self.row)?
            .checked_add((num_heads - 1).checked_mul(self.head)?)?
            .checked_add(head_dim)
    }

    /// True when no two `(row, head)` blocks of `head_dim` elements overlap: the heads
    /// nest inside rows (`head ≥ head_dim`, `row ≥ (heads − 1)·head + head_dim`) or rows
    /// inside heads (the same with the roles swapped). A stride that only matters for one
    /// row or one head is free.
    pub fn is_disjoint(&self, rows: usize, num_heads: usize, head_dim: usize) -> bool {
        let nests = |inner: usize, n_inner: usize, outer: usize, n_outer: usize| {
            (n_inner <= 1 || inner >= head_dim)
                && (n_outer <= 1
                    || (n_inner.saturating_sub(1))
                        .checked_mul(inner)
                        .and_then(|x| x.checked_add(head_dim))
                        .is_some_and(|need| outer >= need))
        };
        nests(self.head, num_heads, self.row, rows) || nests(self.row, rows, self.head, num_heads)
    }
}

/// The strides of a run's q and o (a strided run: `CpuBackend::run_strided`; the plain
/// `run` uses [`RunStrides::contiguous`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunStrides {
    /// Strides of q (rows may overlap: q is only read).
    pub q: QoStrides,
    /// Strides of o (no two row/head blocks may overlap; gaps are left untouched).
    pub o: QoStrides,
}

impl RunStrides {
    /// Contiguous q and o `[rows, num_qo_heads, head_dim]`.
    pub fn contiguous(heads: &HeadConfig) -> Self {
        let s = QoStrides::contiguous(heads.num_qo_heads(), heads.head_dim());
        RunStrides { q: s, o: s }
    }

    /// Strided q and o.
    pub fn new(q: QoStrides, o: QoStrides) -> Self {
        RunStrides { q, o }
    }
}
