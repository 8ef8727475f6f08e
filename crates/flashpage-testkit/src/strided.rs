//! Strided layouts of a case's inputs and outputs: q as the first heads of a fused QKV
//! projection buffer (random values in the K/V part and in the padding of every row), V
//! re-laid out with strides of its own (the other layout than K's, padded pages), and an o
//! buffer with gaps between its heads and rows. Every stride is a multiple of 16 elements
//! (16-byte aligned for every dtype, as the CUDA kernels need).

use flashpage::layout::{KvLayout, KvStrides, QoStrides, RunStrides};
use flashpage::tensor::Tensor;

use crate::case::{CaseData, KvStorage, Rng};

/// The strided inputs of a case and the shape of its strided o buffer.
#[derive(Debug, Clone)]
pub struct StridedLayout {
    /// The fused QKV buffer whose first `num_qo_heads` heads of every row are q.
    pub qkv: Tensor,
    /// V laid out with `v_strides`.
    pub v: Tensor,
    /// V's strides.
    pub v_strides: KvStrides,
    /// Elements of the o buffer.
    pub o_len: usize,
    /// q and o strides.
    pub strides: RunStrides,
}

impl StridedLayout {
    /// Lays out `data`'s inputs strided; the padding is random (from `seed`).
    pub fn new(data: &CaseData, seed: u64) -> StridedLayout {
        let mut rng = Rng::new(seed);
        let h = data.spec.heads;
        let (hq, hkv, d) = (h.num_qo_heads(), h.num_kv_heads(), h.head_dim());
        let rows = data.rows();
        let dt = data.spec.dtype;
        let q_row = (hq + 2 * hkv) * d + 16;
        let q = data.q.view().to_f64_vec();
        let mut qkv: Vec<f64> = (0..rows.max(1) * q_row)
            .map(|_| rng.uniform() * 2.0 - 1.0)
            .collect();
        for r in 0..rows {
            qkv[r * q_row..][..hq * d].copy_from_slice(&q[r * hq * d..][..hq * d]);
        }
        let s = data.strides;
        let ragged = data.spec.storage == KvStorage::Ragged;
        let ps = if ragged { 1 } else { data.spec.page_size };
        let v_strides = if ragged {
            KvStrides {
                page: hkv * (d + 16) + 32,
                token: 0,
                head: d + 16,
            }
        } else {
            let other = match data.spec.layout {
                KvLayout::Nhd => KvLayout::Hnd,
                KvLayout::Hnd => KvLayout::Nhd,
            };
            let dense = KvStrides::dense(other, ps, hkv, d);
            KvStrides {
                page: dense.page + 48,
                ..dense
            }
        };
        let v_src = data.kv_cache().v.to_f64_vec();
        let v_len = v_strides.extent(data.num_pages, ps, hkv, d).unwrap() + 16;
        let mut v: Vec<f64> = (0..v_len).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        for p in 0..data.num_pages {
            for t in 0..ps {
                for hh in 0..hkv {
                    let src = p * s.page + t * s.token + hh * s.head;
                    let dst = p * v_strides.page + t * v_strides.token + hh * v_strides.head;
                    v[dst..dst + d].copy_from_slice(&v_src[src..src + d]);
                }
            }
        }
        let o = QoStrides::new(hq * (d + 16) + 16, d + 16);
        let o_len = o.extent(rows, hq, d).unwrap() + 32;
        StridedLayout {
            qkv: Tensor::from_f64(dt, &qkv),
            v: Tensor::from_f64(dt, &v),
            v_strides,
            o_len,
            strides: RunStrides::new(QoStrides::new(q_row, d), o),
        }
    }

    /// The `[rows, num_qo_heads, head_dim]` output inside the strided buffer `o` of `data`,
    /// after checking that every gap element still has the bits of `poison` (`Err` names
    /// the first written gap element).
    pub fn gather(&self, data: &CaseData, o: &Tensor, poison: &Tensor) -> Result<Tensor, String> {
        let h = data.spec.heads;
        let (hq, d) = (h.num_qo_heads(), h.head_dim());
        let rows = data.rows();
        let os = self.strides.o;
        let all = o.view().to_f64_vec();
        let mut gathered = vec![0f64; rows * hq * d];
        let mut inside = vec![false; self.o_len];
        for r in 0..rows {
            for hh in 0..hq {
                let at = r * os.row + hh * os.head;
                gathered[(r * hq + hh) * d..][..d].copy_from_slice(&all[at..at + d]);
                inside[at..at + d].iter_mut().for_each(|w| *w = true);
            }
        }
        let (bytes, pb) = (o.to_le_bytes(), poison.to_le_bytes());
        let es = data.spec.dtype.size();
        if let Some(i) = (0..self.o_len)
            .find(|&i| !inside[i] && bytes[i * es..(i + 1) * es] != pb[i * es..(i + 1) * es])
        {
            return Err(format!("o gap element {i} was written"));
        }
        Ok(Tensor::from_f64(data.spec.dtype, &gathered))
    }
}
