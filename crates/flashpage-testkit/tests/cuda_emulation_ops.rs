//! The append and RoPE kernels (`kernels/ops.cu`) in the host emulation (no GPU), on the
//! parameter block the backend launches: random batches with shuffled pages, both layouts,
//! split / combined / padded caches, strided (fused QKV) inputs, every input × cache dtype,
//! both append forms (CSR and FlashInfer's per-row), RoPE in both conventions under every
//! scaling with explicit positions, FP8 caches (e4m3fn, e5m2) with per-tensor or per-head
//! scales and FP8 rows. Each run is compared bit for bit with the CPU op on the
//! same inputs over the **whole** cache (so every byte outside the written slots is
//! untouched, as the CPU op leaves it), every written slot is checked to differ from its
//! poison, and rotated values are compared with the f64 oracle (`rope_reference`).
#![cfg(feature = "cuda")]

use flashpage::backend::cuda::ops::{
    OpsArrays, OpsCache, OpsParams, OpsRows, append_params, append_params_scaled, rope_params,
};
use flashpage::ops::append::{
    AppendAt, AppendBatch, AppendRope, AppendTargets, KvCacheMut, append_kv, append_kv_at,
};
use flashpage::ops::rope::{Rope, RopeScaling, RopeStyle, apply_rope};
use flashpage::ops::{Rows, RowsMut};
use flashpage::{BatchBuilder, DType, Error, KvLayout, KvStrides, Tensor, TensorRef};
use flashpage_testkit::case::Rng;
use flashpage_testkit::emulate_ops::OpsEmulator;
use flashpage_testkit::rope_reference;

fn seed(i: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn random(rng: &mut Rng, dtype: DType, n: usize) -> Tensor {
    let v: Vec<f64> = (0..n).map(|_| rng.uniform() * 2.0).collect(); // [-2, 2)
    Tensor::from_f64(dtype, &v)
}

/// A cache element that no append can produce from inputs in [-2, 2] (|x| <= 2 sqrt 2 after
/// a rotation, times at most YaRN's 1.14): a written slot always differs from it.
fn poison(dtype: DType, n: usize) -> Tensor {
    Tensor::from_f64(dtype, &vec![-1000.0; n])
}

fn ropes() -> Vec<Rope> {
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

/// Absolute tolerance against the f64 oracle for values of magnitude <= ~3.3 (the FP8
/// dtypes: [`close`]).
fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
        DType::E4M3Fn | DType::E5M2 => 0.0,
    }
}

/// Whether a stored value `got` (decoded, before its `scale`) is the oracle's `want` within
/// the rounding of `dt` (and of `src`, the rows' dtype): for FP8 half a unit in the last
/// place relative (2^-4 for e4m3fn's 3 mantissa bits, 2^-3 for e5m2's 2) plus half the
/// subnormal quantum, times the scale.
fn close(dt: DType, src: DType, got: f64, want: f64, scale: f64) -> bool {
    let err = (got * scale - want).abs();
    match dt {
        DType::E4M3Fn => err <= want.abs() * 0.0625 + scale * 2f64.powi(-10) + tol(src),
        DType::E5M2 => err <= want.abs() * 0.125 + scale * 2f64.powi(-17) + tol(src),
        _ => err <= tol(dt).max(tol(src)),
    }
}

/// Every dtype the ops take: the float dtypes and the FP8 ones.
fn all_dtypes() -> impl Iterator<Item = DType> {
    DType::ALL.into_iter().chain(DType::FP8)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    Split(KvLayout),
    /// K NHD with 8 spare elements per token; V HND with a page gap of 5.
    Padded,
    Combined(KvLayout),
}

struct Case {
    ps: usize,
    np: usize,
    hkv: usize,
    d: usize,
    batch: BatchBuilder,
    /// (request, position) of every appended row, in row order.
    targets: Vec<(usize, usize)>,
}

fn make_case(rng: &mut Rng) -> Case {
    let ps = [1, 3, 4, 16][rng.below(4)];
    let hkv = 1 + rng.below(3);
    let d = [16, 32, 64][rng.below(3)];
    let b = 1 + rng.below(4);
    let lens: Vec<(usize, usize)> = (0..b)
        .map(|_| {
            let kv = rng.below(40);
            let a = if kv == 0 {
                0
            } else {
                rng.below(kv.min(12) + 1)
            };
            (kv, a)
        })
        .collect();
    let needed: usize = lens.iter().map(|&(kv, _)| kv.div_ceil(ps)).sum();
    let np = needed + 1 + rng.below(3);
    let mut ids: Vec<i32> = (0..np as i32).collect();
    rng.shuffle(&mut ids);
    let mut batch = BatchBuilder::new(ps).unwrap();
    let (mut targets, mut next) = (Vec::new(), 0);
    for (r, &(kv, a)) in lens.iter().enumerate() {
        let n = kv.div_ceil(ps);
        batch.push(a, kv, &ids[next..next + n]).unwrap();
        next += n;
        targets.extend((kv - a..kv).map(|p| (r, p)));
    }
    Case {
        ps,
        np,
        hkv,
        d,
        batch,
        targets,
    }
}

/// (K strides, V strides, K base, V base, K elements, V elements (None: combined)).
fn geometry(c: &Case, s: Storage) -> (KvStrides, KvStrides, usize, usize, usize, Option<usize>) {
    let (ps, np, hk, d) = (c.ps, c.np, c.hkv, c.d);
    let page = ps * hk * d;
    match s {
        Storage::Split(l) => {
            let st = KvStrides::dense(l, ps, hk, d);
            (st, st, 0, 0, np * page, Some(np * page))
        }
        Storage::Padded => {
            let k = KvStrides {
                page: ps * (hk * d + 8),
                token: hk * d + 8,
                head: d,
            };
            let v = KvStrides {
                page: page + 5,
                token: d,
                head: ps * d,
            };
            (k, v, 0, 0, np * k.page, Some(np * v.page))
        }
        Storage::Combined(l) => {
            let st = KvCacheMut::combined_strides(l, ps, hk, d);
            (st, st, 0, page, np * 2 * page, None)
        }
    }
}

/// The elements of `t` from `off` on.
fn from(t: TensorRef<'_>, off: usize) -> TensorRef<'_> {
    match t {
        TensorRef::F32(v) => TensorRef::F32(&v[off..]),
        TensorRef::F16(v) => TensorRef::F16(&v[off..]),
        TensorRef::BF16(v) => TensorRef::BF16(&v[off..]),
        TensorRef::Fp8(f, v) => TensorRef::Fp8(f, &v[off..]),
    }
}

fn bytes_to(dtype: DType, b: &[u8]) -> Tensor {
    Tensor::from_le_bytes(dtype, b).unwrap()
}

/// The device arrays of a CSR append whose device copies are the host arrays themselves
/// (offset 0, the host lengths).
fn csr_arrays(csr: &AppendBatch<'_>) -> OpsArrays {
    let a = |v: &[i32]| (0u64, v.len());
    OpsArrays {
        append_indptr: a(csr.append_indptr),
        kv_indptr: a(csr.kv_indptr),
        kv_indices: a(csr.kv_indices),
        kv_last_page_len: a(csr.kv_last_page_len),
        ..Default::default()
    }
}

/// Element offset of (page, slot, head 0) in a buffer.
fn slot_off(s: KvStrides, base: usize, page: usize, slot: usize, h: usize) -> usize {
    base + page * s.page + slot * s.token + h * s.head
}

#[allow(clippy::too_many_arguments)]
fn check_append(
    emu: &OpsEmulator,
    c: &Case,
    storage: Storage,
    (src_dt, dst_dt): (DType, DType),
    rope: Option<Rope>,
    per_row: bool,
    rng: &mut Rng,
    label: &str,
) {
    let (ps, hk, d) = (c.ps, c.hkv, c.d);
    let nnz = c.targets.len();
    // Fused QKV-like source rows: K and V heads interleaved in one buffer, row stride
    // 2 * hk * d + 8.
    let row = 2 * hk * d + 8;
    let src = random(rng, src_dt, nnz.max(1) * row);
    let (ks, vs, kb, vb, kn, vn) = geometry(c, storage);
    let k0 = poison(dst_dt, kn);
    let v0 = vn.map(|n| poison(dst_dt, n));
    let positions: Vec<i32> = (0..nnz).map(|_| rng.below(100_000) as i32).collect();
    // An FP8 cache: scales per tensor or per KV head in [0.25, 1.25), or none (scale 1).
    let scales: Option<(Vec<f32>, Vec<f32>)> = (dst_dt.is_fp8() && rng.below(4) != 0).then(|| {
        let n = if rng.below(2) == 0 { 1 } else { hk };
        let mut draw = || -> Vec<f32> {
            (0..n)
                .map(|_| (0.75 + 0.5 * rng.uniform()) as f32)
                .collect()
        };
        (draw(), draw())
    });
    let (k_scale, v_scale) = match &scales {
        Some((k, v)) => (Some(&k[..]), Some(&v[..])),
        None => (None, None),
    };
    let head_scale = |s: Option<&[f32]>, h: usize| -> f64 {
        s.map_or(1.0, |s| if s.len() == 1 { s[0] } else { s[h] } as f64)
    };
    let batch_indices: Vec<i32> = c.targets.iter().map(|&(r, _)| r as i32).collect();
    let target_pos: Vec<i32> = c.targets.iter().map(|&(_, p)| p as i32).collect();
    let csr = AppendBatch::from_builder(&c.batch);
    let at = AppendAt {
        batch_indices: &batch_indices,
        positions: &target_pos,
        kv_indptr: c.batch.kv_indptr(),
        kv_indices: c.batch.kv_indices(),
        kv_last_page_len: c.batch.kv_last_page_len(),
    };
    // CSR mode rotates at explicit positions; per-row mode at the target positions.
    let rope_arg = rope.as_ref().map(|r| AppendRope {
        rope: r,
        positions: if per_row { None } else { Some(&positions) },
    });
    let targets = if per_row {
        AppendTargets::At(&at)
    } else {
        AppendTargets::Csr(&csr)
    };

    // The CPU op.
    let (mut kc, mut vc) = (k0.clone(), v0.clone());
    {
        let k_rows = Rows::strided(src.view(), nnz, hk, d, row, d).unwrap();
        let v_rows = Rows::strided(from(src.view(), hk * d), nnz, hk, d, row, d).unwrap();
        let mut cache = match vc.as_mut() {
            Some(v) => KvCacheMut::split_strided(kc.view_mut(), v.view_mut(), ks, vs, ps, c.np),
            None => KvCacheMut::shared(kc.view_mut(), kb, ks, vb, vs, ps, c.np),
        };
        if let (Some(k), Some(v)) = (k_scale, v_scale) {
            cache = cache.with_scales(k, v);
        }
        if per_row {
            append_kv_at(&at, k_rows, v_rows, cache, rope_arg).unwrap();
        } else {
            append_kv(&csr, k_rows, v_rows, cache, rope_arg).unwrap();
        }
    }

    // The emulated kernel on the backend's parameter block (addresses: buffer offsets).
    let es = src_dt.size();
    let rows_of = |off: usize| OpsRows {
        addr: (off * es) as u64,
        len: src.len() - off,
        dtype: src_dt,
        tokens: nnz,
        heads: hk,
        head_dim: d,
        row_stride: row,
        head_stride: d,
    };
    let cache = OpsCache {
        k_addr: 0,
        k_len: kn,
        v: vn.map(|n| (0, n)),
        dtype: dst_dt,
        k_base: kb,
        v_base: vb,
        k_strides: ks,
        v_strides: vs,
        page_size: ps,
        num_pages: c.np,
    };
    let a = |v: &[i32]| (0u64, v.len());
    let arrays = OpsArrays {
        append_indptr: if per_row {
            (0, 0)
        } else {
            a(csr.append_indptr)
        },
        kv_indptr: a(csr.kv_indptr),
        kv_indices: a(csr.kv_indices),
        kv_last_page_len: a(csr.kv_last_page_len),
        batch_indices: if per_row { a(&batch_indices) } else { (0, 0) },
        positions: match (per_row, rope.is_some()) {
            (true, _) => a(&target_pos),
            (false, true) => a(&positions),
            (false, false) => (0, 0),
        },
    };
    let p: OpsParams = append_params_scaled(
        targets,
        &rows_of(0),
        &rows_of(hk * d),
        &cache,
        (k_scale, v_scale),
        rope_arg.as_ref(),
        &arrays,
    )
    .unwrap();
    let src_b = src.to_le_bytes();
    let kb0 = k0.to_le_bytes();
    let vb0 = v0.as_ref().map(|v| v.to_le_bytes()).unwrap_or_default();
    let ib = |v: &[i32]| bytemuck::cast_slice::<i32, u8>(v).to_vec();
    let empty = Vec::new();
    let bufs = [
        src_b.clone(),
        src_b.clone(),
        kb0,
        vb0,
        if per_row {
            empty.clone()
        } else {
            ib(csr.append_indptr)
        },
        ib(csr.kv_indptr),
        ib(csr.kv_indices),
        ib(csr.kv_last_page_len),
        if per_row {
            ib(&batch_indices)
        } else {
            empty.clone()
        },
        match (per_row, rope.is_some()) {
            (true, _) => ib(&target_pos),
            (false, true) => ib(&positions),
            (false, false) => empty,
        },
    ];
    let refs: [&[u8]; 10] = std::array::from_fn(|i| &bufs[i][..]);
    let [s_out, _, k_out, v_out] = emu.run("append", &p, refs);
    assert_eq!(s_out, src_b, "{label}: the source rows were written");
    let ke = bytes_to(dst_dt, &k_out);
    assert_eq!(
        ke.to_le_bytes(),
        kc.to_le_bytes(),
        "{label}: emulated K cache differs from the CPU op"
    );
    if let Some(vc) = &vc {
        assert_eq!(v_out, vc.to_le_bytes(), "{label}: emulated V cache differs");
    }

    // Every target slot written (no poison left) and, for K, the oracle's rotation.
    let kf = ke.view().to_f64_vec();
    let vt = vc.as_ref().map(|_| bytes_to(dst_dt, &v_out));
    let vf = vt
        .as_ref()
        .map_or_else(|| kf.clone(), |v| v.view().to_f64_vec());
    let sf = src.view().to_f64_vec();
    let ids = c.batch.kv_indices();
    let indptr = c.batch.kv_indptr();
    for (t, &(r, pos)) in c.targets.iter().enumerate() {
        let page = ids[indptr[r] as usize + pos / ps] as usize;
        let slot = pos % ps;
        for h in 0..hk {
            let mut x: Vec<f64> = sf[t * row + h * d..t * row + h * d + d].to_vec();
            if let Some(r) = &rope {
                let at_pos = if per_row {
                    pos as f64
                } else {
                    positions[t] as f64
                };
                rope_reference::rotate(r, &mut x, at_pos);
            }
            let ko = slot_off(ks, kb, page, slot, h);
            let vo = slot_off(vs, vb, page, slot, h);
            let (sk, sv) = (head_scale(k_scale, h), head_scale(v_scale, h));
            for e in 0..d {
                let got = kf[ko + e];
                assert!(
                    close(dst_dt, src_dt, got, x[e], sk),
                    "{label}: K row {t} head {h} elem {e}: {got} (scale {sk}) vs oracle {}",
                    x[e]
                );
                let want_v = sf[t * row + hk * d + h * d + e];
                assert!(
                    close(dst_dt, DType::F32, vf[vo + e], want_v, sv),
                    "{label}: V row {t} head {h} elem {e}: {} (scale {sv}) vs {want_v}",
                    vf[vo + e]
                );
            }
        }
    }
}

#[test]
fn emulated_append_matches_cpu_op_and_oracle() {
    let emu = OpsEmulator::new("append").unwrap_or_else(|e| panic!("{e}"));
    let storages = [
        Storage::Split(KvLayout::Nhd),
        Storage::Split(KvLayout::Hnd),
        Storage::Padded,
        Storage::Combined(KvLayout::Nhd),
        Storage::Combined(KvLayout::Hnd),
    ];
    let ropes = ropes();
    let mut i = 0u64;
    for src_dt in all_dtypes() {
        for dst_dt in all_dtypes() {
            for per_row in [false, true] {
                let s = seed(i);
                let mut rng = Rng::new(s);
                let c = make_case(&mut rng);
                let storage = storages[i as usize % storages.len()];
                let rope = (!i.is_multiple_of(3)).then(|| ropes[i as usize % ropes.len()]);
                let label = format!(
                    "seed {s}: {} -> {}, {storage:?}, per_row {per_row}, rope {rope:?}, ps {} hkv {} d {} rows {}",
                    src_dt.name(),
                    dst_dt.name(),
                    c.ps,
                    c.hkv,
                    c.d,
                    c.targets.len()
                );
                check_append(
                    &emu,
                    &c,
                    storage,
                    (src_dt, dst_dt),
                    rope,
                    per_row,
                    &mut rng,
                    &label,
                );
                i += 1;
            }
        }
    }
    // Every rope variant once, bf16 rows into an f32 cache and f16 into bf16.
    for (j, r) in ropes.iter().enumerate() {
        let s = seed(100 + j as u64);
        let mut rng = Rng::new(s);
        let c = make_case(&mut rng);
        let dts = if j % 2 == 0 {
            (DType::BF16, DType::F32)
        } else {
            (DType::F16, DType::BF16)
        };
        let label = format!("seed {s}: rope {r:?}");
        check_append(
            &emu,
            &c,
            Storage::Split(KvLayout::Nhd),
            dts,
            Some(*r),
            j % 3 == 0,
            &mut rng,
            &label,
        );
    }
}

#[test]
fn emulated_rope_matches_cpu_op_and_oracle() {
    let emu = OpsEmulator::new("rope").unwrap_or_else(|e| panic!("{e}"));
    for (j, r) in ropes().iter().enumerate() {
        for (n, dt) in all_dtypes().enumerate() {
            let s = seed(j as u64 * 7 + n as u64);
            let mut rng = Rng::new(s);
            let tokens = 1 + rng.below(6);
            let heads = 1 + rng.below(4);
            let d = [16, 64, 128, 256][rng.below(4)];
            // q and k heads of a fused QKV row (plus v heads and padding left untouched).
            let row = (heads + 2) * d + 8;
            let x0 = random(&mut rng, dt, tokens * row);
            let positions: Vec<i32> = (0..tokens).map(|_| rng.below(200_000) as i32).collect();
            let mut cpu = x0.clone();
            apply_rope(
                r,
                RowsMut::strided(cpu.view_mut(), tokens, heads, d, row, d).unwrap(),
                &positions,
            )
            .unwrap();
            let rows = OpsRows {
                addr: 0,
                len: x0.len(),
                dtype: dt,
                tokens,
                heads,
                head_dim: d,
                row_stride: row,
                head_stride: d,
            };
            let p = rope_params(r, &rows, &positions, (0, positions.len())).unwrap();
            let xb = x0.to_le_bytes();
            let pb = bytemuck::cast_slice::<i32, u8>(&positions).to_vec();
            let e: &[u8] = &[];
            let [out, ..] = emu.run("rope", &p, [&xb, e, e, e, e, e, e, e, e, &pb]);
            let label = format!("seed {s}: {r:?} {} d {d} heads {heads}", dt.name());
            assert_eq!(
                out,
                cpu.to_le_bytes(),
                "{label}: emulated rope differs from the CPU op"
            );
            let (xf, of) = (
                x0.view().to_f64_vec(),
                bytes_to(dt, &out).view().to_f64_vec(),
            );
            for (t, &at_pos) in positions.iter().enumerate() {
                for h in 0..heads + 2 {
                    let o = t * row + h * d;
                    let mut want = xf[o..o + d].to_vec();
                    if h < heads {
                        rope_reference::rotate(r, &mut want, at_pos as f64);
                    }
                    for e in 0..d {
                        assert!(
                            close(dt, dt, of[o + e], want[e], 1.0),
                            "{label}: row {t} head {h} elem {e}: {} vs {}",
                            of[o + e],
                            want[e]
                        );
                    }
                }
                // The row padding is untouched.
                let pad = t * row + (heads + 2) * d;
                assert_eq!(
                    &of[pad..pad + 8],
                    &xf[pad..pad + 8],
                    "{label}: padding written"
                );
            }
        }
    }
}

/// The device parameter builders refuse what the host ops refuse, with the same typed
/// errors, plus the device arrays' lengths.
#[test]
fn device_parameters_refuse_what_the_host_op_refuses() {
    let mut rng = Rng::new(seed(999));
    let mut c = make_case(&mut rng);
    while c.targets.is_empty() {
        c = make_case(&mut rng);
    }
    let (ps, hk, d, nnz) = (c.ps, c.hkv, c.d, c.targets.len());
    let st = KvStrides::dense(KvLayout::Nhd, ps, hk, d);
    let n = c.np * ps * hk * d;
    let rows = OpsRows {
        addr: 0,
        len: nnz * hk * d,
        dtype: DType::BF16,
        tokens: nnz,
        heads: hk,
        head_dim: d,
        row_stride: hk * d,
        head_stride: d,
    };
    let cache = OpsCache {
        k_addr: 0,
        k_len: n,
        v: Some((0, n)),
        dtype: DType::F16,
        k_base: 0,
        v_base: 0,
        k_strides: st,
        v_strides: st,
        page_size: ps,
        num_pages: c.np,
    };
    let csr = AppendBatch::from_builder(&c.batch);
    let arrays = csr_arrays(&csr);
    let t = AppendTargets::Csr(&csr);
    append_params(t, &rows, &rows, &cache, None, &arrays).unwrap();
    // A page id out of range: the host op's error.
    let mut bad_ids = csr.kv_indices.to_vec();
    bad_ids[0] = c.np as i32;
    let bad = AppendBatch {
        kv_indices: &bad_ids,
        ..csr
    };
    let e = append_params(
        AppendTargets::Csr(&bad),
        &rows,
        &rows,
        &cache,
        None,
        &arrays,
    );
    assert!(matches!(e, Err(Error::PageIdOutOfRange { .. })), "{e:?}");
    // A cache too short.
    let short = OpsCache {
        k_len: n - 1,
        ..cache
    };
    let e = append_params(t, &rows, &rows, &short, None, &arrays);
    assert!(
        matches!(
            e,
            Err(Error::TensorShape {
                tensor: "k_cache",
                ..
            })
        ),
        "{e:?}"
    );
    // A device copy shorter than the host array.
    let mut arr = arrays;
    arr.kv_indices.1 -= 1;
    let e = append_params(t, &rows, &rows, &cache, None, &arr);
    assert!(
        matches!(
            e,
            Err(Error::ArrayLength {
                field: "kv_indices",
                ..
            })
        ),
        "{e:?}"
    );
    // RoPE on a head dim the kernel does not take, and an odd one (the host op's error).
    let wide = OpsRows {
        head_dim: 2 * 130,
        row_stride: 2 * 130,
        len: 2 * 130,
        tokens: 1,
        heads: 1,
        ..rows
    };
    let e = rope_params(&Rope::new(1e4), &wide, &[0], (0, 1));
    assert!(matches!(e, Err(Error::Unsupported { .. })), "{e:?}");
    let odd = OpsRows {
        head_dim: 15,
        row_stride: 15,
        len: 15,
        tokens: 1,
        heads: 1,
        ..rows
    };
    let e = rope_params(&Rope::new(1e4), &odd, &[0], (0, 1));
    assert!(
        matches!(
            e,
            Err(Error::InvalidOption {
                field: "head_dim",
                ..
            })
        ),
        "{e:?}"
    );
    let e = rope_params(&Rope::new(1e4), &wide, &[-1], (0, 1));
    assert!(e.is_err());
}

/// FP8 scales are checked by the device builder as the host op checks them (same typed
/// errors naming the field: scales with a float cache, a count that is neither 1 nor
/// num_kv_heads, a non-positive value), and more per-head values than the kernel's
/// parameter block holds is `Unsupported` naming the scale.
#[test]
fn fp8_scales_are_checked_as_the_host_op_checks_them() {
    let (ps, np, d) = (4, 2, 16);
    let geometry = |hk: usize| {
        let mut b = BatchBuilder::new(ps).unwrap();
        b.push(1, 1, &[1]).unwrap();
        (b, KvStrides::dense(KvLayout::Nhd, ps, hk, d))
    };
    let rows = |dtype, hk: usize| OpsRows {
        addr: 0,
        len: hk * d,
        dtype,
        tokens: 1,
        heads: hk,
        head_dim: d,
        row_stride: hk * d,
        head_stride: d,
    };
    let cache = |dtype, hk: usize, st| OpsCache {
        k_addr: 0,
        k_len: np * ps * hk * d,
        v: Some((0, np * ps * hk * d)),
        dtype,
        k_base: 0,
        v_base: 0,
        k_strides: st,
        v_strides: st,
        page_size: ps,
        num_pages: np,
    };
    let hk = 2;
    let (b, st) = geometry(hk);
    let csr = AppendBatch::from_builder(&b);
    let arrays = csr_arrays(&csr);
    let t = AppendTargets::Csr(&csr);
    let one = [0.5f32];
    let per_head = [0.5f32, 2.0];
    for (dt, k_scale, v_scale) in [
        (DType::BF16, &one[..], &one[..]),
        (DType::E4M3Fn, &[0.5, 1.0, 2.0][..], &one[..]),
        (DType::E5M2, &one[..], &[0.0][..]),
        (DType::E4M3Fn, &per_head[..], &[f32::NAN][..]),
    ] {
        let dev = append_params_scaled(
            t,
            &rows(DType::F32, hk),
            &rows(DType::F32, hk),
            &cache(dt, hk, st),
            (Some(k_scale), Some(v_scale)),
            None,
            &arrays,
        )
        .unwrap_err();
        let (kn, vn) = (vec![1.0f32; hk * d], vec![1.0f32; hk * d]);
        let mut kc = Tensor::from_f64(dt, &vec![0.0; np * ps * hk * d]);
        let mut vc = kc.clone();
        let host = flashpage::ops::append::check_append(
            &csr,
            &Rows::dense(TensorRef::F32(&kn), 1, hk, d).unwrap(),
            &Rows::dense(TensorRef::F32(&vn), 1, hk, d).unwrap(),
            &KvCacheMut::split_strided(kc.view_mut(), vc.view_mut(), st, st, ps, np)
                .with_scales(k_scale, v_scale),
            None,
        )
        .unwrap_err();
        assert_eq!(format!("{dev}"), format!("{host}"), "{}", dt.name());
    }
    // Per-tensor and per-head scales of an FP8 cache are accepted.
    for (ks, vs) in [(&one[..], &one[..]), (&per_head[..], &one[..])] {
        append_params_scaled(
            t,
            &rows(DType::BF16, hk),
            &rows(DType::BF16, hk),
            &cache(DType::E5M2, hk, st),
            (Some(ks), Some(vs)),
            None,
            &arrays,
        )
        .unwrap();
    }
    // 129 KV heads with per-head scales: more than the parameter block's 128 slots.
    let hk = 129;
    let (b, st) = geometry(hk);
    let csr = AppendBatch::from_builder(&b);
    let arrays = csr_arrays(&csr);
    let many = vec![1.0f32; hk];
    let e = append_params_scaled(
        AppendTargets::Csr(&csr),
        &rows(DType::F32, hk),
        &rows(DType::F32, hk),
        &cache(DType::E4M3Fn, hk, st),
        (Some(&many), Some(&one)),
        None,
        &arrays,
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { backend: "cuda", what } if what.contains("k_scale")),
        "{e:?}"
    );
}
