//! The numeric contract (`docs/numerics.md`) as a property of arbitrary bytes: the bytes pick
//! a small batch, options and adversarial values (huge, tiny, subnormal, ±inf, NaN, in q, K
//! and V, at visible and masked positions); the CPU backend runs it at every SIMD level of
//! this machine and each result is checked against the f64 reference for what the contract
//! guarantees, and nothing more:
//!
//! - a row and head that sees no key gets `o = 0` and `lse = -inf`;
//! - every element is finite exactly where the reference's is (non-finite values in visible
//!   q, K, V propagate as IEEE arithmetic does in the reference; finite q and K never
//!   produce NaN; no row is spuriously empty);
//! - with moderate values and options, the error is within the dtype's tolerance
//!   ([`crate::reference::tolerance`]).
//!
//! The inputs include values that are non-finite or extreme at positions a row cannot see
//! (masked keys: beyond the causal diagonal or the window, the unused slots of a request's
//! last page, pages nobody reads); non-finite values in q and K (NaN logits, which must
//! make the row NaN as in the reference, not empty; `-inf` logits, keys of weight 0 whose V
//! must not matter); and extreme finite values and options (|x| up to 1e30, scales down to
//! the smallest normal f32), whose logits may pass the f32 range.

use std::sync::OnceLock;

use flashpage::backend::cpu::{CpuBackend, SimdLevel};
use flashpage::layout::{DType, HeadConfig, KvLayout};
use flashpage::options::{AttentionOptions, PosEncoding};
use flashpage::plan::PlanConfig;
use flashpage::tensor::Tensor;

use crate::case::{CaseData, CaseSpec, KvStorage};
use crate::reference::{self, ReferenceOutput};
use crate::runner::HostRunner;

/// Reads choices from fuzz bytes (zeros once they run out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn below(&mut self, n: usize) -> usize {
        (usize::from(self.u8()) << 8 | usize::from(self.u8())) % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |a, _| a << 8 | u64::from(self.u8()))
    }
}

/// Moderate special values (exact in every dtype or harmlessly rounded).
const MODERATE: &[f64] = &[0.0, -0.0, 1e-30, -1e-30, 1e-40, 1.0, -1.0, 4.0, -4.0, 0.5];
/// Non-finite values.
const NON_FINITE: &[f64] = &[f64::INFINITY, f64::NEG_INFINITY, f64::NAN];
/// Extreme finite values.
const EXTREME: &[f64] = &[1e20, -1e20, 1e30, -1e30, 3e4, -6e4, 1e10];

/// One generated case: the data, and whether its values and options are all moderate.
struct Generated {
    data: CaseData,
    moderate: bool,
}

fn generate(b: &mut Bytes<'_>) -> Option<Generated> {
    let hkv = 1 + b.below(2);
    let hq = hkv * b.pick(&[1usize, 2, 4]);
    let d = b.pick(&[16usize, 32, 64]);
    let heads = HeadConfig::new(hq, hkv, d).ok()?;
    let dtype = b.pick(&[DType::F32, DType::F16, DType::BF16]);
    let page_size = 1 + b.below(8);
    let decode = b.below(3) == 0;
    let ragged = !decode && b.below(4) == 0;
    let mut spec = CaseSpec::decode("numerics", heads, page_size, 1, 1, dtype);
    spec.decode = decode;
    spec.storage = if ragged {
        KvStorage::Ragged
    } else {
        KvStorage::Separate
    };
    spec.layout = b.pick(&[KvLayout::Nhd, KvLayout::Hnd]);
    let mut o = AttentionOptions::new();
    o.causal = !decode && b.below(2) == 0;
    if b.below(3) == 0 {
        o.window_left = Some(b.below(12) as u32);
    }
    let mut moderate = true;
    let extreme = b.below(3) == 0;
    if b.below(3) == 0 {
        o.sm_scale = Some(if extreme {
            moderate = false;
            b.pick(&[f32::MIN_POSITIVE, 1e-30, 1e-10, 1e10, 1e30])
        } else {
            b.pick(&[0.01f32, 0.1, 0.5, 1.0, 2.0])
        });
    }
    if b.below(4) == 0 {
        o.logits_soft_cap = Some(if extreme {
            moderate = false;
            b.pick(&[f32::MIN_POSITIVE, 1e-20, 1e20, f32::MAX])
        } else {
            b.pick(&[1.0f32, 5.0, 30.0, 50.0])
        });
    }
    o.pos_encoding = match b.below(4) {
        0 => PosEncoding::Alibi,
        1 if extreme => {
            moderate = false;
            PosEncoding::Rope {
                theta: b.pick(&[1.0001f32, 1e30, f32::MAX]),
                scale: b.pick(&[f32::MIN_POSITIVE, 1e-20, 1e20]),
            }
        }
        1 => PosEncoding::Rope {
            theta: b.pick(&[1e4f32, 5e5]),
            scale: b.pick(&[1.0f32, 2.0, 8.0]),
        },
        _ => PosEncoding::None,
    };
    o.validate().ok()?;
    spec.options = o;
    let n = 1 + b.below(3);
    spec.requests = (0..n)
        .map(|_| {
            let kv = b.below(41);
            let qo = if decode { 1 } else { b.below(5) };
            (if o.causal { qo.min(kv) } else { qo }, kv)
        })
        .collect();
    spec.input_scale = 1.0;
    let mut data = spec.materialise(b.u64()).ok()?;
    // Centre the uniform [0, 1) inputs so logits have both signs.
    for t in [&mut data.q, &mut data.k, &mut data.v] {
        let v: Vec<f64> = t
            .view()
            .to_f64_vec()
            .iter()
            .map(|x| 2.0 * x - 1.0)
            .collect();
        *t = Tensor::from_f64(dtype, &v);
    }
    let specials = b.below(9);
    for _ in 0..specials {
        let which = b.below(3);
        let class = b.below(3);
        let value = match class {
            1 => b.pick(NON_FINITE),
            2 => {
                moderate = false;
                b.pick(EXTREME)
            }
            _ => b.pick(MODERATE),
        };
        let finite = value.is_finite();
        if which == 0 {
            // q: a row only affects itself.
            let len = data.q.len();
            if len > 0 {
                let i = b.below(len);
                set(&mut data.q, i, value);
                moderate &= finite;
            }
            continue;
        }
        // K or V: anywhere in the cache, where a row sees it or where none does (masked
        // keys, unused page slots, pages no request lists).
        let len = if which == 1 {
            data.k.len()
        } else {
            data.v.len()
        };
        let pos = (len > 0).then(|| b.below(len));
        if let Some(i) = pos {
            let t = if which == 1 { &mut data.k } else { &mut data.v };
            set(t, i, value);
            moderate &= finite;
        }
    }
    Some(Generated { data, moderate })
}

fn set(t: &mut Tensor, i: usize, x: f64) {
    use half::{bf16, f16};
    match t {
        Tensor::F32(v) => v[i] = x as f32,
        Tensor::F16(v) => v[i] = f16::from_f64(x),
        Tensor::BF16(v) => v[i] = bf16::from_f64(x),
        // An FP8 cache: the code of `x` with scale 1 (the generator's cases are float).
        Tensor::Fp8(f, v) => v[i] = f.encode(x as f32),
    }
}

/// Element offset of token `t`, head `h` of request `r` in K/V.
#[cfg(test)]
fn offset(data: &CaseData, r: usize, t: usize, h: usize) -> Option<usize> {
    let s = data.strides;
    if data.spec.storage == KvStorage::Ragged {
        let start = *data.ragged_indptr.get(r)? as usize;
        return Some((start + t) * s.page + h * s.head);
    }
    let ps = data.spec.page_size;
    let first = *data.batch.kv_indptr().get(r)? as usize;
    let page = *data.batch.kv_indices().get(first + t / ps)? as usize;
    Some(page * s.page + (t % ps) * s.token + h * s.head)
}

/// Checks one run's outputs against the reference; `Err` describes the first violation.
fn check_outputs(
    label: &str,
    data: &CaseData,
    moderate: bool,
    o: &Tensor,
    lse: &[f32],
    r: &ReferenceOutput,
) -> Result<(), String> {
    let h = data.spec.heads;
    let d = h.head_dim();
    let ov = o.view().to_f64_vec();
    let tol = reference::tolerance(data.spec.dtype);
    for (i, (&l, &rl)) in lse.iter().zip(&r.lse).enumerate() {
        let row = &ov[i * d..(i + 1) * d];
        let rrow = &r.o[i * d..(i + 1) * d];
        let at = format!(
            "{label}: row {} head {}",
            i / h.num_qo_heads(),
            i % h.num_qo_heads()
        );
        if rl == f64::NEG_INFINITY {
            // No key seen: exactly o = 0, lse = -inf.
            if l != f32::NEG_INFINITY || row.iter().any(|&x| x != 0.0) {
                return Err(format!(
                    "{at}: sees no key, expected o = 0 and lse = -inf, got lse {l}, o {row:?}"
                ));
            }
            continue;
        }
        if l == f32::NEG_INFINITY {
            return Err(format!("{at}: spurious empty row (reference lse {rl})"));
        }
        // The kernels' LSE is f32: a reference LSE above the f32 range is `+inf`. Below it,
        // `-inf` would say "no key" (guarantee 4 forbids that when keys are visible): every
        // visible logit is then below `-f32::MAX`, each maps to `-f32::MAX`
        // (docs/numerics.md), and so does the LSE, up to the `ln` of the key count.
        if rl < -(f32::MAX as f64) {
            if !l.is_finite() || l > -f32::MAX / 2.0 {
                return Err(format!(
                    "{at}: lse {l}, reference {rl} (below the f32 range: want -f32::MAX)"
                ));
            }
        } else if l.is_finite() != (rl as f32).is_finite() {
            return Err(format!("{at}: lse {l}, reference {rl}"));
        }
        for (c, (&x, &y)) in row.iter().zip(rrow).enumerate() {
            if x.is_finite() != y.is_finite() {
                return Err(format!("{at}: o[{c}] = {x}, reference {y}"));
            }
        }
    }
    if moderate {
        let keep = |a: &[f64], b: &[f64]| -> (Vec<f64>, Vec<f64>) {
            a.iter()
                .zip(b)
                .filter(|(_, y)| y.is_finite())
                .map(|(&x, &y)| (x, y))
                .unzip()
        };
        let (a, b) = keep(&ov, &r.o);
        let e = reference::rel_error(&a, &b);
        let lv: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
        let (la, lb) = keep(&lv, &r.lse);
        let le = reference::rel_error(&la, &lb);
        if e > tol || le > tol {
            return Err(format!(
                "{label}: o error {e:.3e}, lse error {le:.3e} above the {tol:.0e} tolerance"
            ));
        }
    }
    Ok(())
}

/// The CPU backend with `threads` threads (1 to 3) at `level`, started once per process: a
/// fuzz run checks thousands of inputs, and thread pools started and stopped per input cost
/// time and leave thread-exit bookkeeping that leak checkers report.
fn backend(threads: usize, level: SimdLevel) -> Result<&'static CpuBackend, String> {
    static BACKENDS: OnceLock<Vec<(usize, SimdLevel, CpuBackend)>> = OnceLock::new();
    let all = BACKENDS.get_or_init(|| {
        let mut v = Vec::new();
        for t in 1..=3 {
            for l in SimdLevel::available() {
                if let Ok(b) = CpuBackend::with_simd(t, l) {
                    v.push((t, l, b));
                }
            }
        }
        v
    });
    all.iter()
        .find(|(t, l, _)| *t == threads && *l == level)
        .map(|(_, _, b)| b)
        .ok_or_else(|| format!("no cpu backend with {threads} threads at {}", level.name()))
}

/// Decodes `bytes` into a case and checks the numeric contract on every SIMD level of this
/// machine (every input class of the module docs). `Ok` for bytes that decode to no valid
/// case.
pub fn check_bytes(bytes: &[u8]) -> Result<(), String> {
    let mut b = Bytes(bytes);
    let Some(g) = generate(&mut b) else {
        return Ok(());
    };
    let r = g.data.reference().map_err(|e| format!("reference: {e}"))?;
    let threads = 1 + b.below(3);
    let parallelism = 1 + b.below(64);
    let cfg = PlanConfig::with_parallelism(parallelism);
    for level in SimdLevel::available() {
        let cpu = backend(threads, level)?;
        let (o, lse) = g
            .data
            .run_on(cpu as &dyn HostRunner, &cfg)
            .map_err(|e| format!("{}: {e}", level.name()))?;
        let label = format!(
            "{} ({:?}, {:?}, {} threads, parallelism {parallelism})",
            level.name(),
            g.data.spec.dtype,
            g.data.spec.options,
            threads
        );
        check_outputs(&label, &g.data, g.moderate, &o, &lse, &r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Rng;

    #[test]
    fn the_contract_holds_on_random_bytes() {
        let mut rng = Rng::new(8);
        for i in 0..2000 {
            let bytes: Vec<u8> = (0..160).map(|_| rng.next_u64() as u8).collect();
            if let Err(e) = check_bytes(&bytes) {
                panic!("case {i} ({bytes:?}): {e}");
            }
        }
    }

    #[test]
    fn non_finite_visible_values_propagate_like_the_reference() {
        // Decode, one request of 5 keys, V[key 2] = +inf: every row sees key 2, so o is
        // non-finite where the reference's is, and finite elsewhere.
        let heads = HeadConfig::new(2, 1, 16).unwrap();
        let mut spec = CaseSpec::decode("inf-v", heads, 4, 1, 5, DType::F32);
        spec.requests = vec![(1, 5)];
        let mut data = spec.materialise(3).unwrap();
        let off = offset(&data, 0, 2, 0).unwrap();
        set(&mut data.v, off + 3, f64::INFINITY);
        let r = data.reference().unwrap();
        assert!(r.o[3].is_infinite() && r.o[4].is_finite());
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(1, level).unwrap();
            let (o, lse) = data.run_on(&cpu, &PlanConfig::with_parallelism(1)).unwrap();
            check_outputs(level.name(), &data, false, &o, &lse, &r).unwrap();
        }
    }

    #[test]
    fn rope_with_angles_beyond_the_f64_reduction_follows_the_reference() {
        // Fuzz finding: RoPE with the smallest accepted rope_scale (angles near 1e38 rad),
        // sm_scale 1e10 and extreme q/K values. The CPU reduced the angle mod 2π in f64
        // (meaningless at that size) and disagreed with the reference: lse 2.96e11 against
        // 4.2e38 (past the f32 range).
        let mut bytes = vec![
            0x4a, 0x9e, 0x20, 0x35, 0x01, 0x1d, 0x2e, 0x01, 0xac, 0x00, 0xff, 0xff, 0xcf, 0x21,
            0xff, 0x3a,
        ];
        bytes.extend([0x81; 23]);
        bytes.extend([
            0x1f, 0x00, 0x1e, 0xed, 0xfe, 0x33, 0x01, 0xde, 0xfe, 0x20, 0x00, 0x00, 0x10, 0x10,
        ]);
        check_bytes(&bytes).unwrap();
    }

    #[test]
    fn logits_below_the_f32_range_give_the_lowest_finite_lse_not_an_empty_row() {
        // q > 0, every K element -1e10, scale 1e30: every logit is near -1e40, below the f32
        // range. The reference's LSE is a finite f64 below -f32::MAX; the kernels map each
        // logit to -f32::MAX, so the row is not empty and its LSE is -f32::MAX.
        let heads = HeadConfig::new(2, 1, 16).unwrap();
        let mut spec = CaseSpec::decode("low-logits", heads, 4, 1, 5, DType::F32);
        spec.requests = vec![(1, 5)];
        spec.options.sm_scale = Some(1e30);
        spec.options.pos_encoding = PosEncoding::Alibi;
        let mut data = spec.materialise(5).unwrap();
        let q: Vec<f64> = data.q.view().to_f64_vec().iter().map(|x| x + 0.5).collect();
        data.q = Tensor::from_f64(DType::F32, &q);
        let k = vec![-1e10; data.k.len()];
        data.k = Tensor::from_f64(DType::F32, &k);
        let r = data.reference().unwrap();
        assert!(
            r.lse
                .iter()
                .all(|&l| l.is_finite() && l < -(f32::MAX as f64))
        );
        for level in SimdLevel::available() {
            let cpu = CpuBackend::with_simd(1, level).unwrap();
            let (o, lse) = data.run_on(&cpu, &PlanConfig::with_parallelism(1)).unwrap();
            assert!(
                lse.iter().all(|&l| l == -f32::MAX),
                "{}: {lse:?}",
                level.name()
            );
            check_outputs(level.name(), &data, false, &o, &lse, &r).unwrap();
        }
    }
}
