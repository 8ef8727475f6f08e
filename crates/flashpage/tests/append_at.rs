//! `append_kv_at` (FlashInfer's per-row form: row `i` to token `positions[i]` of request
//! `batch_indices[i]`) against `append_kv` (the CSR form, checked against a naive reference
//! in `append_rope.rs`): the same rows given in a shuffled order with their targets write the
//! same cache bit for bit (RoPE at each row's position included); every malformed target is
//! a typed error naming the argument and leaves the cache untouched.

use flashpage::ops::Rows;
use flashpage::ops::append::{
    AppendAt, AppendBatch, AppendRope, KvCacheMut, append_kv, append_kv_at,
};
use flashpage::ops::rope::{Rope, RopeStyle};
use flashpage::*;
use flashpage_testkit::case::Rng;

fn seed(i: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn per_row_targets_match_the_csr_form() {
    for i in 0..40 {
        let s = seed(i);
        let mut rng = Rng::new(s);
        let ps = [1, 3, 16][rng.below(3)];
        let (hk, d) = (1 + rng.below(2), 16);
        let b = 1 + rng.below(4);
        let mut batch = BatchBuilder::new(ps).unwrap();
        let mut targets = Vec::new();
        let mut next = 0i32;
        for r in 0..b {
            let kv = 1 + rng.below(30);
            let a = rng.below(kv.min(8) + 1);
            let n = kv.div_ceil(ps) as i32;
            let pages: Vec<i32> = (next..next + n).rev().collect();
            next += n;
            batch.push(a, kv, &pages).unwrap();
            targets.extend((kv - a..kv).map(|p| (r as i32, p as i32)));
        }
        let np = next as usize + 1;
        let nnz = targets.len();
        let dt = DType::ALL[rng.below(3)];
        let rows: Vec<f64> = (0..nnz * hk * d).map(|_| rng.uniform() * 2.0).collect();
        let (k_src, v_src) = (
            Tensor::from_f64(DType::F32, &rows),
            Tensor::from_f64(dt, &rows),
        );
        let init: Vec<f64> = (0..np * ps * hk * d).map(|_| rng.uniform()).collect();
        let st = KvStrides::dense(KvLayout::Hnd, ps, hk, d);
        let rope = Rope::new(1e4).with_style(if i % 2 == 0 {
            RopeStyle::RotateHalf
        } else {
            RopeStyle::Interleaved
        });
        let ap = (!i.is_multiple_of(3)).then_some(AppendRope {
            rope: &rope,
            positions: None,
        });
        // The CSR form.
        let (mut k1, mut v1) = (Tensor::from_f64(dt, &init), Tensor::from_f64(dt, &init));
        append_kv(
            &AppendBatch::from_builder(&batch),
            Rows::dense(k_src.view(), nnz, hk, d).unwrap(),
            Rows::dense(v_src.view(), nnz, hk, d).unwrap(),
            KvCacheMut::split(k1.view_mut(), v1.view_mut(), st, ps, np),
            ap,
        )
        .unwrap();
        // The same rows in a shuffled order with their (request, position).
        let mut order: Vec<usize> = (0..nnz).collect();
        rng.shuffle(&mut order);
        let pick = |t: &Tensor| {
            let v = t.view().to_f64_vec();
            let out: Vec<f64> = order
                .iter()
                .flat_map(|&o| v[o * hk * d..(o + 1) * hk * d].to_vec())
                .collect();
            Tensor::from_f64(t.dtype(), &out)
        };
        let (k_sh, v_sh) = (pick(&k_src), pick(&v_src));
        let bi: Vec<i32> = order.iter().map(|&o| targets[o].0).collect();
        let pos: Vec<i32> = order.iter().map(|&o| targets[o].1).collect();
        let at = AppendAt {
            batch_indices: &bi,
            positions: &pos,
            kv_indptr: batch.kv_indptr(),
            kv_indices: batch.kv_indices(),
            kv_last_page_len: batch.kv_last_page_len(),
        };
        let (mut k2, mut v2) = (Tensor::from_f64(dt, &init), Tensor::from_f64(dt, &init));
        append_kv_at(
            &at,
            Rows::dense(k_sh.view(), nnz, hk, d).unwrap(),
            Rows::dense(v_sh.view(), nnz, hk, d).unwrap(),
            KvCacheMut::split(k2.view_mut(), v2.view_mut(), st, ps, np),
            ap,
        )
        .unwrap();
        assert_eq!(k1.to_le_bytes(), k2.to_le_bytes(), "seed {s}: K");
        assert_eq!(v1.to_le_bytes(), v2.to_le_bytes(), "seed {s}: V");

        // Malformed targets: typed errors, nothing written.
        if nnz == 0 {
            continue;
        }
        let mut bad_b = bi.clone();
        bad_b[nnz - 1] = b as i32;
        let mut bad_p = pos.clone();
        bad_p[0] = -1;
        let mut past = pos.clone();
        let r0 = bi[0] as usize;
        let kv_len = {
            let (ip, l) = (batch.kv_indptr(), batch.kv_last_page_len());
            (ip[r0 + 1] - ip[r0] - 1) as usize * ps + l[r0] as usize
        };
        past[0] = kv_len as i32;
        let cases: [(&[i32], &[i32], &str); 4] = [
            (&bad_b, &pos, "batch_indices"),
            (&bi, &bad_p, "positions"),
            (&bi, &past, "positions"),
            (&bi, &pos[..nnz - 1], "positions"),
        ];
        for (bb, pp, field) in cases {
            let at = AppendAt {
                batch_indices: bb,
                positions: pp,
                ..at
            };
            let before = k2.to_le_bytes();
            let e = append_kv_at(
                &at,
                Rows::dense(k_sh.view(), nnz, hk, d).unwrap(),
                Rows::dense(v_sh.view(), nnz, hk, d).unwrap(),
                KvCacheMut::split(k2.view_mut(), v2.view_mut(), st, ps, np),
                None,
            )
            .unwrap_err();
            let named = match &e {
                Error::InvalidOption { field: f, .. } | Error::ArrayLength { field: f, .. } => {
                    *f == field
                }
                _ => false,
            };
            assert!(
                named,
                "seed {s}: expected an error naming {field}, got {e:?}"
            );
            assert_eq!(k2.to_le_bytes(), before, "seed {s}: written on error");
        }
    }
}
