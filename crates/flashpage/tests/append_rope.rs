//! `append_kv` and `apply_rope` against naive references: random batches, shuffled pages,
//! both layouts, combined and split caches with their own strides, strided (fused QKV)
//! inputs, every input × cache dtype; RoPE in both conventions under every scaling against
//! the f64 oracle. Every rejected input is a typed error and leaves the cache bit-identical.

use flashpage::half;
use flashpage::ops::append::{AppendBatch, AppendRope, KvCacheMut, append_kv};
use flashpage::ops::rope::{Rope, RopeScaling, RopeStyle, apply_rope};
use flashpage::ops::{Rows, RowsMut};
use flashpage::*;
use flashpage_testkit::case::Rng;
use flashpage_testkit::reference::rel_error;
use flashpage_testkit::rope_reference;
use proptest::prelude::*;

fn random_tensor(rng: &mut Rng, dtype: DType, n: usize) -> Tensor {
    let v: Vec<f64> = (0..n).map(|_| rng.uniform() * 4.0 - 2.0).collect();
    Tensor::from_f64(dtype, &v)
}

/// `x` (exactly an f32 here) rounded to `dtype` through f32: `half`'s f64 → bf16 drops the
/// low mantissa word before rounding, so it can round a tie the wrong way.
fn round_to(dtype: DType, x: f64) -> f64 {
    let x = x as f32;
    match dtype {
        DType::F32 => x as f64,
        DType::F16 => half::f16::from_f32(x).to_f64(),
        DType::BF16 => half::bf16::from_f32(x).to_f64(),
        // An FP8 cache with scale 1 (fp8_kv.rs tests the scaled append).
        DType::E4M3Fn | DType::E5M2 => {
            let f = dtype.fp8_format().expect("an fp8 dtype");
            f.decode(f.encode(x)) as f64
        }
    }
}

fn all_ropes() -> Vec<Rope> {
    let mut v = Vec::new();
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        for scaling in [
            RopeScaling::None,
            RopeScaling::Linear { factor: 4.0 },
            RopeScaling::Ntk { factor: 8.0 },
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192,
            },
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
        ] {
            v.push(Rope::new(5e5).with_style(style).with_scaling(scaling));
        }
    }
    v
}

/// How the test cache is stored.
#[derive(Debug, Clone, Copy)]
enum Storage {
    Split(KvLayout),
    /// K and V with different (padded) strides.
    SplitPadded,
    Combined(KvLayout),
}

struct AppendCase {
    page_size: usize,
    num_pages: usize,
    hkv: usize,
    d: usize,
    batch: BatchBuilder,
    /// Page list of each request.
    pages: Vec<Vec<i32>>,
    /// (request, position) of every appended row.
    targets: Vec<(usize, usize)>,
}

fn make_case(rng: &mut Rng) -> AppendCase {
    let page_size = [1, 3, 4, 16][rng.below(4)];
    let hkv = 1 + rng.below(3);
    let d = [16, 32][rng.below(2)];
    let b = 1 + rng.below(4);
    let mut lens = Vec::new();
    for _ in 0..b {
        let kv = rng.below(40);
        let append = if kv == 0 {
            0
        } else {
            rng.below(kv.min(20) + 1)
        };
        lens.push((kv, append));
    }
    let needed: usize = lens.iter().map(|&(kv, _)| kv.div_ceil(page_size)).sum();
    let num_pages = needed + 1 + rng.below(4);
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let mut batch = BatchBuilder::new(page_size).unwrap();
    let (mut pages, mut targets, mut next) = (Vec::new(), Vec::new(), 0);
    for (r, &(kv, append)) in lens.iter().enumerate() {
        let n = kv.div_ceil(page_size);
        let p = ids[next..next + n].to_vec();
        next += n;
        batch.push(append, kv, &p).unwrap();
        pages.push(p);
        targets.extend((kv - append..kv).map(|pos| (r, pos)));
    }
    AppendCase {
        page_size,
        num_pages,
        hkv,
        d,
        batch,
        pages,
        targets,
    }
}

/// Element offset of (page, slot, head, 0) in K's and V's storage, from the layout's
/// definition (not from the strides under test).
fn naive_offsets(c: &AppendCase, s: Storage, page: usize, slot: usize, h: usize) -> (usize, usize) {
    let (ps, hk, d) = (c.page_size, c.hkv, c.d);
    let in_page = |layout: KvLayout| match layout {
        KvLayout::Nhd => (slot * hk + h) * d,
        KvLayout::Hnd => (h * ps + slot) * d,
    };
    let page_elems = ps * hk * d;
    match s {
        Storage::Split(l) => {
            let o = page * page_elems + in_page(l);
            (o, o)
        }
        // K: NHD with 8 spare elements per token row; V: HND with a spare page gap of 5.
        Storage::SplitPadded => (
            page * ps * (hk * d + 8) + slot * (hk * d + 8) + h * d,
            page * (page_elems + 5) + (h * ps + slot) * d,
        ),
        Storage::Combined(l) => {
            let o = page * 2 * page_elems + in_page(l);
            (o, o + page_elems)
        }
    }
}

fn check_append(seed: u64) {
    let mut rng = Rng::new(seed);
    let c = make_case(&mut rng);
    let (ps, np, hk, d) = (c.page_size, c.num_pages, c.hkv, c.d);
    let nnz = c.targets.len();
    let in_dt = DType::ALL[rng.below(3)];
    let (k_dt, v_dt) = (DType::ALL[rng.below(3)], DType::ALL[rng.below(3)]);
    let storage = match rng.below(5) {
        0 => Storage::Split(KvLayout::Nhd),
        1 => Storage::Split(KvLayout::Hnd),
        2 => Storage::SplitPadded,
        3 => Storage::Combined(KvLayout::Nhd),
        _ => Storage::Combined(KvLayout::Hnd),
    };
    let combined = matches!(storage, Storage::Combined(_));
    let v_dt = if combined { k_dt } else { v_dt };
    // Inputs: a fused [nnz, (Hq + 2 Hkv) * D] buffer (Hq = 2 Hkv) or dense K and V.
    let fused = rng.below(2) == 0;
    let row = if fused { 4 * hk * d } else { hk * d };
    let src_k = random_tensor(&mut rng, in_dt, nnz.max(1) * row);
    let src_v = random_tensor(&mut rng, in_dt, nnz.max(1) * row);
    let (k_rows, v_rows) = if fused {
        let (k0, v0) = (2 * hk * d, 3 * hk * d);
        let kr = match src_k.view() {
            TensorRef::F32(s) => TensorRef::F32(&s[k0..]),
            TensorRef::F16(s) => TensorRef::F16(&s[k0..]),
            TensorRef::BF16(s) => TensorRef::BF16(&s[k0..]),
            TensorRef::Fp8(f, s) => TensorRef::Fp8(f, &s[k0..]),
        };
        let vr = match src_v.view() {
            TensorRef::F32(s) => TensorRef::F32(&s[v0..]),
            TensorRef::F16(s) => TensorRef::F16(&s[v0..]),
            TensorRef::BF16(s) => TensorRef::BF16(&s[v0..]),
            TensorRef::Fp8(f, s) => TensorRef::Fp8(f, &s[v0..]),
        };
        (
            Rows::strided(kr, nnz, hk, d, row, d).unwrap(),
            Rows::strided(vr, nnz, hk, d, row, d).unwrap(),
        )
    } else {
        (
            Rows::strided(src_k.view(), nnz, hk, d, row, d).unwrap(),
            Rows::strided(src_v.view(), nnz, hk, d, row, d).unwrap(),
        )
    };
    let page_elems = ps * hk * d;
    let (k_len, v_len) = match storage {
        Storage::Split(_) => (np * page_elems, np * page_elems),
        Storage::SplitPadded => (np * ps * (hk * d + 8), np * (page_elems + 5)),
        Storage::Combined(_) => (2 * np * page_elems, 0),
    };
    let mut k_cache = random_tensor(&mut rng, k_dt, k_len);
    let mut v_cache = random_tensor(&mut rng, v_dt, v_len);
    let (k_before, v_before) = (k_cache.clone(), v_cache.clone());
    let rope = all_ropes()[rng.below(10)];
    let use_rope = rng.below(2) == 0;
    let positions: Option<Vec<i32>> = (use_rope && rng.below(2) == 0)
        .then(|| (0..nnz).map(|_| rng.below(200_000) as i32).collect());
    let ap = use_rope.then_some(AppendRope {
        rope: &rope,
        positions: positions.as_deref(),
    });
    let cache = match storage {
        Storage::Split(l) => KvCacheMut::split(
            k_cache.view_mut(),
            v_cache.view_mut(),
            KvStrides::dense(l, ps, hk, d),
            ps,
            np,
        ),
        Storage::SplitPadded => KvCacheMut::split_strided(
            k_cache.view_mut(),
            v_cache.view_mut(),
            KvStrides {
                page: ps * (hk * d + 8),
                token: hk * d + 8,
                head: d,
            },
            KvStrides {
                page: page_elems + 5,
                token: d,
                head: ps * d,
            },
            ps,
            np,
        ),
        Storage::Combined(l) => KvCacheMut::combined(k_cache.view_mut(), l, ps, hk, d, np),
    };
    append_kv(
        &AppendBatch::from_builder(&c.batch),
        k_rows,
        v_rows,
        cache,
        ap,
    )
    .unwrap();

    // Expected: the old cache with every target replaced.
    let mut want_k = k_before.view().to_f64_vec();
    let mut want_v = if combined {
        Vec::new()
    } else {
        v_before.view().to_f64_vec()
    };
    let mut written_k = vec![false; k_len];
    let mut written_v = vec![false; v_len];
    let mut rotated = vec![false; k_len];
    for (t, &(r, pos)) in c.targets.iter().enumerate() {
        let page = c.pages[r][pos / ps] as usize;
        for h in 0..hk {
            let (ko, vo) = naive_offsets(&c, storage, page, pos % ps, h);
            let kin = k_rows.offset(t, h);
            let vin = v_rows.offset(t, h);
            let mut kx: Vec<f64> = (0..d).map(|i| k_rows.data().get_f64(kin + i)).collect();
            if use_rope {
                let p = positions.as_ref().map_or(pos as f64, |p| p[t] as f64);
                rope_reference::rotate(&rope, &mut kx, p);
            }
            for i in 0..d {
                let vx = v_rows.data().get_f64(vin + i);
                want_k[ko + i] = kx[i];
                written_k[ko + i] = true;
                rotated[ko + i] = use_rope;
                if combined {
                    want_k[vo + i] = vx;
                    written_k[vo + i] = true;
                } else {
                    want_v[vo + i] = vx;
                    written_v[vo + i] = true;
                }
            }
        }
    }
    let tol = |dt: DType| 4.0 * reference_ulp(dt);
    let no_rotation = vec![false; v_len];
    for (name, got, want, written, rot, dt) in [
        ("k", &k_cache, &want_k, &written_k, &rotated, k_dt),
        ("v", &v_cache, &want_v, &written_v, &no_rotation, v_dt),
    ] {
        let got = got.view().to_f64_vec();
        for i in 0..got.len() {
            // Rotated K is checked with a tolerance (f32 rotation, one rounding), everything
            // else (copied values rounded once, untouched elements) exactly.
            let exact = !rot[i];
            let w = if written[i] && exact {
                round_to(dt, want[i])
            } else {
                want[i]
            };
            let ok = if exact {
                got[i] == w
            } else {
                (got[i] - w).abs() <= tol(dt) * w.abs().max(1.0)
            };
            assert!(
                ok,
                "seed {seed} {storage:?} {name}[{i}] = {} want {w} (written {}, in {in_dt:?} cache {dt:?} rope {use_rope})",
                got[i], written[i]
            );
        }
    }
}

/// Half an ulp at 1 of a dtype (the relative rounding error).
fn reference_ulp(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-6,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        DType::E4M3Fn => 2f64.powi(-4),
        DType::E5M2 => 2f64.powi(-3),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn append_matches_naive_reference(seed in any::<u64>()) {
        check_append(seed);
    }
}

#[test]
fn append_fixed_seeds() {
    for seed in 0..64 {
        check_append(seed);
    }
}

/// A small valid append to corrupt one argument at a time.
struct Small {
    b: BatchBuilder,
    k_new: Vec<f32>,
    v_new: Vec<f32>,
}

fn small() -> Small {
    let mut b = BatchBuilder::new(4).unwrap();
    b.push(2, 6, &[2, 0]).unwrap();
    b.push(1, 3, &[1]).unwrap();
    let mut rng = Rng::new(7);
    let k_new = (0..3 * 2 * 16)
        .map(|_| rng.uniform() as f32 + 0.5)
        .collect();
    let v_new = (0..3 * 2 * 16)
        .map(|_| rng.uniform() as f32 - 1.5)
        .collect();
    Small { b, k_new, v_new }
}

fn run_small(
    batch: &AppendBatch<'_>,
    s: &Small,
    tokens: usize,
    cache_len: usize,
    rope: Option<AppendRope<'_>>,
) -> (Result<()>, bool) {
    let mut rng = Rng::new(3);
    let mut k: Vec<f32> = (0..3 * 4 * 2 * 16).map(|_| rng.uniform() as f32).collect();
    let mut v: Vec<f32> = (0..cache_len).map(|_| rng.uniform() as f32).collect();
    let (k0, v0) = (k.clone(), v.clone());
    let r = (|| {
        append_kv(
            batch,
            Rows::dense(TensorRef::F32(&s.k_new[..tokens * 32]), tokens, 2, 16)?,
            Rows::dense(TensorRef::F32(&s.v_new[..tokens * 32]), tokens, 2, 16)?,
            KvCacheMut::split(
                TensorMut::F32(&mut k),
                TensorMut::F32(&mut v),
                KvStrides::dense(KvLayout::Nhd, 4, 2, 16),
                4,
                3,
            ),
            rope,
        )
    })();
    (r, k == k0 && v == v0)
}

#[test]
fn append_rejects_bad_inputs_and_writes_nothing() {
    let s = small();
    let good = AppendBatch::from_builder(&s.b);
    let (r, unchanged) = run_small(&good, &s, 3, 3 * 4 * 2 * 16, None);
    assert!(r.is_ok() && !unchanged, "{r:?}");

    let bad_ids = [2, 0, 3];
    let mut b = good;
    b.kv_indices = &bad_ids;
    let (r, unchanged) = run_small(&b, &s, 3, 384, None);
    assert_eq!(
        r,
        Err(Error::PageIdOutOfRange {
            index: 2,
            page_id: 3,
            num_pages: 3
        })
    );
    assert!(unchanged);

    let long = [0, 2, 5];
    let mut b = good;
    b.append_indptr = &long;
    let (r, unchanged) = run_small(&b, &s, 3, 384, None);
    assert_eq!(r.unwrap_err().kind(), ErrorKind::TensorShape); // 5 rows wanted, 3 given
    assert!(unchanged);
    let long = [0, 2, 6];
    b.append_indptr = &long;
    let s6 = Small {
        b: s.b.clone(),
        k_new: s.k_new.repeat(2),
        v_new: s.v_new.repeat(2),
    };
    let (r, unchanged) = run_small(&b, &s6, 6, 384, None);
    assert_eq!(
        r,
        Err(Error::AppendLongerThanKv {
            request: 1,
            append_len: 4,
            kv_len: 3
        })
    );
    assert!(unchanged);

    let short = [0, 2];
    let mut b = good;
    b.append_indptr = &short;
    let (r, unchanged) = run_small(&b, &s, 2, 384, None);
    match r {
        Err(Error::ArrayLength {
            field,
            expected,
            actual,
            ..
        }) => assert_eq!((field, expected, actual), ("append_indptr", 3, 2)),
        other => panic!("{other:?}"),
    }
    assert!(unchanged);

    let bad_last = [2, 5];
    let mut b = good;
    b.kv_last_page_len = &bad_last;
    let (r, unchanged) = run_small(&b, &s, 3, 384, None);
    assert_eq!(r.unwrap_err().kind(), ErrorKind::LastPageLen);
    assert!(unchanged);

    let (r, unchanged) = run_small(&good, &s, 3, 383, None);
    match r {
        Err(Error::TensorShape { tensor, .. }) => assert_eq!(tensor, "v_cache"),
        other => panic!("{other:?}"),
    }
    assert!(unchanged);

    let rope = Rope::new(1e4);
    let pos = [1, 2];
    let (r, unchanged) = run_small(
        &good,
        &s,
        3,
        384,
        Some(AppendRope {
            rope: &rope,
            positions: Some(&pos),
        }),
    );
    match r {
        Err(Error::ArrayLength {
            field,
            expected,
            actual,
            ..
        }) => assert_eq!((field, expected, actual), ("positions", 3, 2)),
        other => panic!("{other:?}"),
    }
    assert!(unchanged);
    let bad_rope = Rope::new(1e4).with_scaling(RopeScaling::Linear { factor: 0.0 });
    let (r, unchanged) = run_small(
        &good,
        &s,
        3,
        384,
        Some(AppendRope {
            rope: &bad_rope,
            positions: None,
        }),
    );
    match r {
        Err(Error::InvalidOption { field, .. }) => assert_eq!(field, "rope_scaling.factor"),
        other => panic!("{other:?}"),
    }
    assert!(unchanged);
}

#[test]
fn rope_matches_f64_reference_every_style_and_scaling() {
    let mut rng = Rng::new(11);
    for rope in all_ropes() {
        for dt in DType::ALL {
            for d in [16, 64, 128] {
                let (tokens, heads) = (5, 3);
                // A fused row of 3 q/k heads plus 2 more (v) that must stay untouched.
                let row = (heads + 2) * d;
                let x = random_tensor(&mut rng, dt, tokens * row);
                let positions: Vec<i32> = [0, 1, 4095, 8191, 131_071]
                    .iter()
                    .map(|&p| p + rng.below(3) as i32)
                    .collect();
                let mut y = x.clone();
                apply_rope(
                    &rope,
                    RowsMut::strided(y.view_mut(), tokens, heads, d, row, d).unwrap(),
                    &positions,
                )
                .unwrap();
                let (xs, ys) = (x.view().to_f64_vec(), y.view().to_f64_vec());
                let mut want = Vec::new();
                let mut got = Vec::new();
                for (t, &pos) in positions.iter().enumerate() {
                    for h in 0..heads + 2 {
                        let o = t * row + h * d;
                        let mut w = xs[o..o + d].to_vec();
                        if h < heads {
                            rope_reference::rotate(&rope, &mut w, pos as f64);
                            want.extend_from_slice(&w);
                            got.extend_from_slice(&ys[o..o + d]);
                        } else {
                            assert_eq!(&ys[o..o + d], &w[..], "v heads are untouched");
                        }
                    }
                }
                let e = rel_error(&got, &want);
                let tol = match dt {
                    DType::F32 => 2e-6,
                    DType::F16 => 1e-3,
                    DType::BF16 => 8e-3,
                    DType::E4M3Fn | DType::E5M2 => 0.13,
                };
                assert!(e <= tol, "{rope:?} {dt:?} d {d}: rel error {e}");
            }
        }
    }
}

#[test]
fn rope_scalings_differ_from_plain() {
    // A scaling that had no effect would pass the reference test trivially if the reference
    // ignored it too: check that each changes the long-wavelength rotation.
    let plain = Rope::new(5e5);
    let x: Vec<f64> = (0..128).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
    let mut a = x.clone();
    rope_reference::rotate(&plain, &mut a, 30_000.0);
    for rope in all_ropes()
        .into_iter()
        .filter(|r| r.style == RopeStyle::RotateHalf)
    {
        if rope.scaling == RopeScaling::None {
            continue;
        }
        let mut b = x.clone();
        rope_reference::rotate(&rope, &mut b, 30_000.0);
        assert!(rel_error(&b, &a) > 1e-3, "{rope:?} changes nothing");
    }
}

#[test]
fn rope_rejects_bad_inputs_and_writes_nothing() {
    let mut x = vec![0.25f32; 2 * 2 * 16];
    let before = x.clone();
    let r = apply_rope(
        &Rope::new(1e4),
        RowsMut::dense(TensorMut::F32(&mut x), 2, 2, 16).unwrap(),
        &[3, -1],
    );
    match r {
        Err(Error::InvalidOption { field, actual, .. }) => {
            assert_eq!(field, "positions");
            assert!(actual.contains("positions[1] = -1"), "{actual}");
        }
        other => panic!("{other:?}"),
    }
    let r = apply_rope(
        &Rope::new(1e4),
        RowsMut::dense(TensorMut::F32(&mut x), 2, 2, 16).unwrap(),
        &[3],
    );
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ArrayLength);
    let mut odd = vec![0.25f32; 2 * 15];
    let r = apply_rope(
        &Rope::new(1e4),
        RowsMut::dense(TensorMut::F32(&mut odd), 2, 1, 15).unwrap(),
        &[1, 2],
    );
    match r {
        Err(Error::InvalidOption { field, .. }) => assert_eq!(field, "head_dim"),
        other => panic!("{other:?}"),
    }
    let yarn = Rope::new(1e4).with_scaling(RopeScaling::Yarn {
        factor: 4.0,
        original_max_position: 4096,
        beta_fast: 1.0,
        beta_slow: 32.0,
    });
    let r = apply_rope(
        &yarn,
        RowsMut::dense(TensorMut::F32(&mut x), 2, 2, 16).unwrap(),
        &[0, 1],
    );
    match r {
        Err(Error::InvalidOption { field, .. }) => assert_eq!(field, "rope_scaling.beta_fast"),
        other => panic!("{other:?}"),
    }
    assert_eq!(x, before);
    // Overlapping rows are refused when the view is made.
    let e = RowsMut::strided(TensorMut::F32(&mut x), 2, 2, 16, 16, 16).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TensorShape);
}
