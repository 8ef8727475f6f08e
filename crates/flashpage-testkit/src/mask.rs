//! Custom masks for tests: packing boolean matrices into FlashInfer's layout (row-major bits,
//! least significant bit first, one byte range per request) and drawing random ones.

use flashpage::layout::CustomMask;

use crate::case::Rng;

/// A packed custom mask that owns its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedMask {
    /// The bits of every request, concatenated.
    pub bits: Vec<u8>,
    /// `mask_indptr`: B + 1 byte offsets.
    pub indptr: Vec<i32>,
}

/// Packs booleans little-endian within each byte (`flashinfer.packbits(x, "little")`):
/// element `e` is bit `e % 8` of byte `e / 8`; the last byte is padded with zeros.
pub fn pack_bits(bools: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bools.len().div_ceil(8)];
    for (e, &b) in bools.iter().enumerate() {
        if b {
            out[e / 8] |= 1 << (e % 8);
        }
    }
    out
}

impl PackedMask {
    /// Packs one row-major `qo_len × kv_len` boolean matrix per request (`true`: visible),
    /// each starting on a byte boundary, as FlashInfer's `segment_packbits` does.
    pub fn from_requests(masks: &[Vec<bool>]) -> PackedMask {
        let mut bits = Vec::new();
        let mut indptr = vec![0i32];
        for m in masks {
            bits.extend(pack_bits(m));
            indptr.push(bits.len() as i32);
        }
        PackedMask { bits, indptr }
    }

    /// Draws a mask for requests of `(qo_len, kv_len)`: each element visible with
    /// probability `density`; with `zero_row_stride = n > 0`, every `n`-th query row of each
    /// request (rows `0, n, 2n, …`) sees no key.
    pub fn random(
        rng: &mut Rng,
        requests: &[(usize, usize)],
        density: f64,
        zero_row_stride: usize,
    ) -> PackedMask {
        let masks: Vec<Vec<bool>> = requests
            .iter()
            .map(|&(qo, kv)| {
                (0..qo * kv)
                    .map(|e| {
                        let visible = rng.uniform() < density;
                        let zero = zero_row_stride > 0 && (e / kv.max(1)) % zero_row_stride == 0;
                        visible && !zero
                    })
                    .collect()
            })
            .collect();
        PackedMask::from_requests(&masks)
    }

    /// The borrowed view the library takes.
    pub fn view(&self) -> CustomMask<'_> {
        CustomMask {
            bits: &self.bits,
            indptr: &self.indptr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_little_endian_per_request() {
        // Bit e of byte e / 8, least significant first (flashinfer.packbits "little").
        assert_eq!(
            pack_bits(&[true, false, true, true, false, false, false, false, true]),
            vec![0b0000_1101, 0b0000_0001]
        );
        let m = PackedMask::from_requests(&[vec![true; 3], vec![false, true], vec![]]);
        assert_eq!(m.bits, vec![0b111, 0b10]);
        assert_eq!(m.indptr, vec![0, 1, 2, 2]);
    }
}
