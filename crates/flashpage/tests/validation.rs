//! One failing input per invariant of docs/validation.md, each asserting the exact error variant, its
//! fields and that the message names the field and both values; the founding scenario; the
//! batch builder. (That rejected batches allocate nothing is proven in `tests/no_alloc.rs`.)

use flashpage::backend::cpu::CpuBackend;
use flashpage::backend::{ArgShapes, KvCache, RunArgs, check_run_args};
use flashpage::validate::{check_batch, check_page_ids};
use flashpage::workspace::HostWorkspace;
use flashpage::*;
use flashpage::{WorkspaceLimits, workspace_size};

fn heads() -> HeadConfig {
    HeadConfig::new(8, 2, 64).unwrap()
}

fn table<'a>(indptr: &'a [i32], last: &'a [i32], num_indices: usize) -> PageTable<'a> {
    PageTable {
        page_size: 16,
        num_pages: 64,
        indptr,
        last_page_len: last,
        num_indices,
    }
}

fn opts() -> AttentionOptions {
    AttentionOptions::default()
}

/// Asserts the error and that its message contains every fragment.
fn expect(result: Result<impl std::fmt::Debug>, expected: Error, fragments: &[&str]) {
    let err = result.expect_err("the input is invalid");
    assert_eq!(err, expected);
    let msg = err.to_string();
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} lacks {f:?}");
    }
    assert!(!msg.ends_with('.'), "message {msg:?} ends with a period");
    assert_eq!(
        msg.chars().next().map(|c| c.is_lowercase()),
        Some(true),
        "{msg:?}"
    );
    assert!(err.is_invalid_input());
}

// ---- heads ----------------------------------------------------------------------------

#[test]
fn heads_zero() {
    for (hq, hkv, d, field) in [
        (0, 8, 128, "num_qo_heads"),
        (32, 0, 128, "num_kv_heads"),
        (32, 8, 0, "head_dim"),
    ] {
        expect(
            HeadConfig::new(hq, hkv, d),
            Error::NotPositive { field, actual: 0 },
            &[field, "got 0"],
        );
    }
}

#[test]
fn heads_ratio() {
    expect(
        HeadConfig::new(32, 5, 128),
        Error::HeadRatio {
            num_qo_heads: 32,
            num_kv_heads: 5,
        },
        &["num_qo_heads (32)", "num_kv_heads (5)"],
    );
}

#[test]
fn heads_unsupported_dim() {
    for d in [100, 272, 8] {
        expect(
            HeadConfig::new(32, 8, d),
            Error::UnsupportedHeadDim {
                expected: flashpage::layout::HEAD_DIM_RULE,
                actual: d,
            },
            &[&format!("head_dim {d}"), "16..=256"],
        );
    }
    for d in [16, 64, 80, 128, 256] {
        assert!(HeadConfig::new(32, 8, d).is_ok(), "head_dim {d}");
    }
}

// ---- page size and indptr -------------------------------------------------------------

#[test]
fn page_size_out_of_range() {
    for ps in [0, 257] {
        let mut t = table(&[0, 1], &[1], 1);
        t.page_size = ps;
        expect(
            check_batch(&BatchDesc::decode(heads(), t), &opts()),
            Error::UnsupportedPageSize {
                expected: "1..=256",
                actual: ps,
            },
            &[&format!("page_size {ps}"), "1..=256"],
        );
    }
}

#[test]
fn indptr_length_mismatch() {
    let qo = [0, 1, 2];
    expect(
        check_batch(
            &BatchDesc::prefill_paged(heads(), &qo, table(&[0, 1], &[1], 1)),
            &opts(),
        ),
        Error::IndptrLengthMismatch {
            qo_indptr_len: 3,
            kv_indptr_len: 2,
        },
        &["kv_indptr has 2 entries", "qo_indptr has 3 entries"],
    );
    // Ragged K/V too.
    expect(
        check_batch(&BatchDesc::prefill_ragged(heads(), &qo, &[0, 4]), &opts()),
        Error::IndptrLengthMismatch {
            qo_indptr_len: 3,
            kv_indptr_len: 2,
        },
        &["kv_indptr has 2", "qo_indptr has 3"],
    );
}

#[test]
fn last_page_len_length_mismatch() {
    expect(
        check_batch(
            &BatchDesc::decode(heads(), table(&[0, 1, 2], &[1], 2)),
            &opts(),
        ),
        Error::ArrayLength {
            field: "kv_last_page_len",
            expected: 2,
            actual: 1,
            rule: "batch_size = kv_indptr.len() - 1",
        },
        &["kv_last_page_len has 1 entry", "expected 2"],
    );
}

#[test]
fn empty_indptr() {
    expect(
        check_batch(&BatchDesc::decode(heads(), table(&[], &[], 0)), &opts()),
        Error::EmptyIndptr { field: "kv_indptr" },
        &["kv_indptr is empty"],
    );
    expect(
        check_batch(
            &BatchDesc::prefill_paged(heads(), &[], table(&[], &[], 0)),
            &opts(),
        ),
        Error::EmptyIndptr { field: "kv_indptr" },
        &["kv_indptr is empty"],
    );
}

#[test]
fn indptr_not_starting_at_zero() {
    expect(
        check_batch(
            &BatchDesc::prefill_paged(heads(), &[1, 2], table(&[0, 1], &[1], 1)),
            &opts(),
        ),
        Error::IndptrStart {
            field: "qo_indptr",
            actual: 1,
        },
        &["qo_indptr[0] must be 0, got 1"],
    );
    expect(
        check_batch(
            &BatchDesc::decode(heads(), table(&[2, 3], &[1], 3)),
            &opts(),
        ),
        Error::IndptrStart {
            field: "kv_indptr",
            actual: 2,
        },
        &["kv_indptr[0] must be 0, got 2"],
    );
}

#[test]
fn indptr_decreasing_names_first_index() {
    expect(
        check_batch(
            &BatchDesc::decode(heads(), table(&[0, 3, 1, 0], &[1, 1, 1], 3)),
            &opts(),
        ),
        Error::IndptrDecreasing {
            field: "kv_indptr",
            index: 2,
            previous: 3,
            actual: 1,
        },
        &["kv_indptr[2] = 1", "kv_indptr[1] = 3"],
    );
    expect(
        check_batch(
            &BatchDesc::prefill_ragged(heads(), &[0, 2, 2, 1], &[0, 5, 6, 7]),
            &opts(),
        ),
        Error::IndptrDecreasing {
            field: "qo_indptr",
            index: 3,
            previous: 2,
            actual: 1,
        },
        &["qo_indptr[3] = 1", "qo_indptr[2] = 2"],
    );
    // Negative values decrease too.
    assert!(matches!(
        check_batch(
            &BatchDesc::decode(heads(), table(&[0, -1], &[1], 3)),
            &opts()
        ),
        Err(Error::IndptrDecreasing { index: 1, .. })
    ));
}

#[test]
fn indices_too_short() {
    expect(
        check_batch(
            &BatchDesc::decode(heads(), table(&[0, 2, 5], &[1, 1], 4)),
            &opts(),
        ),
        Error::IndicesTooShort {
            batch_size: 2,
            needed: 5,
            actual: 4,
        },
        &["kv_indptr[2] = 5", "kv_indices has only 4 entries"],
    );
}

#[test]
fn page_ids_out_of_range() {
    expect(
        check_page_ids(&[0, 1, 3], &[0, 3, 4, 99], 4),
        Error::PageIdOutOfRange {
            index: 2,
            page_id: 4,
            num_pages: 4,
        },
        &["kv_indices[2] = 4", "num_pages = 4"],
    );
    expect(
        check_page_ids(&[0, 2], &[1, -1], 4),
        Error::PageIdOutOfRange {
            index: 1,
            page_id: -1,
            num_pages: 4,
        },
        &["kv_indices[1] = -1"],
    );
    // Found by fuzzing (plan_arrays): with more than 2^31 pages a negative id, read as an
    // unsigned number, fell inside the range and was accepted.
    expect(
        check_page_ids(&[0, 1], &[-1_459_617_793], 4_261_412_864),
        Error::PageIdOutOfRange {
            index: 0,
            page_id: -1_459_617_793,
            num_pages: 4_261_412_864,
        },
        &["kv_indices[0] = -1459617793"],
    );
    expect(
        check_page_ids(&[0, 2], &[7, i32::MIN], usize::MAX),
        Error::PageIdOutOfRange {
            index: 1,
            page_id: i32::MIN as i64,
            num_pages: usize::MAX,
        },
        &["kv_indices[1] = -2147483648"],
    );
    assert_eq!(check_page_ids(&[0, 1], &[i32::MAX], usize::MAX), Ok(()));
    // Ids past kv_indptr[B] are not used, hence not checked.
    assert_eq!(check_page_ids(&[0, 2], &[3, 0, -7, 1000], 4), Ok(()));
    expect(
        check_page_ids(&[0, 5], &[0, 1], 4),
        Error::IndicesTooShort {
            batch_size: 1,
            needed: 5,
            actual: 2,
        },
        &["kv_indptr[1] = 5"],
    );
}

#[test]
fn last_page_len_invalid() {
    // 0 on a non-empty request, > page_size, != 0 on an empty one.
    for (last, request, num_pages, frag) in [
        ([1, 0], 1, 2, "expected 1..=16"),
        ([17, 1], 0, 1, "expected 1..=16"),
        ([-3, 1], 0, 1, "expected 1..=16"),
    ] {
        let indptr = [0, 1, 3];
        expect(
            check_batch(
                &BatchDesc::decode(heads(), table(&indptr, &last, 3)),
                &opts(),
            ),
            Error::LastPageLen {
                request,
                actual: last[request] as i64,
                num_pages,
                page_size: 16,
            },
            &[
                &format!("kv_last_page_len[{request}] = {}", last[request]),
                frag,
            ],
        );
    }
    expect(
        check_batch(
            &BatchDesc::decode(heads(), table(&[0, 1, 1], &[5, 3], 1)),
            &opts(),
        ),
        Error::LastPageLen {
            request: 1,
            actual: 3,
            num_pages: 0,
            page_size: 16,
        },
        &["kv_last_page_len[1] = 3", "0 pages", "0 (an empty request)"],
    );
}

#[test]
fn causal_query_longer_than_kv() {
    let causal = opts().with_causal(true);
    // Request 1: 3 rows, 2 keys.
    let desc = BatchDesc::prefill_paged(heads(), &[0, 1, 4], table(&[0, 1, 2], &[16, 2], 2));
    expect(
        check_batch(&desc, &causal),
        Error::CausalQueryLongerThanKv {
            request: 1,
            qo_len: 3,
            kv_len: 2,
        },
        &["request 1", "qo_len 3 > kv_len 2"],
    );
    assert!(check_batch(&desc, &opts()).is_ok(), "fine without causal");
    // Decode is exempt (one row may see an empty cache).
    assert!(
        check_batch(
            &BatchDesc::decode(heads(), table(&[0, 0], &[0], 0)),
            &causal
        )
        .is_ok()
    );
}

#[test]
fn options_invalid() {
    let desc = BatchDesc::decode(heads(), table(&[0, 1], &[1], 1));
    let cases: Vec<(AttentionOptions, &str, &str)> = vec![
        (opts().with_sm_scale(0.0), "sm_scale", "0"),
        (opts().with_sm_scale(-2.0), "sm_scale", "-2"),
        (opts().with_sm_scale(f32::NAN), "sm_scale", "NaN"),
        (
            opts().with_logits_soft_cap(f32::INFINITY),
            "logits_soft_cap",
            "inf",
        ),
        (opts().with_logits_soft_cap(0.0), "logits_soft_cap", "0"),
        (
            opts().with_pos_encoding(PosEncoding::Rope {
                theta: f32::NAN,
                scale: 1.0,
            }),
            "rope_theta",
            "NaN",
        ),
        (
            opts().with_pos_encoding(PosEncoding::Rope {
                theta: 1e4,
                scale: 0.0,
            }),
            "rope_scale",
            "0",
        ),
    ];
    for (o, field, value) in cases {
        let err = check_batch(&desc, &o).unwrap_err();
        match &err {
            Error::InvalidOption {
                field: f, actual, ..
            } => {
                assert_eq!(*f, field);
                assert_eq!(actual, value);
            }
            other => panic!("{o:?}: expected InvalidOption, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{field} = {value} is invalid")),
            "{msg}"
        );
    }
}

// ---- planner configuration ------------------------------------------------------------

#[test]
fn graph_capacity_exceeded() {
    let mut b = BatchBuilder::new(16).unwrap();
    for i in 0..3 {
        b.push(1, 10, &[i]).unwrap();
    }
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.graph_capacity = Some(2);
    expect(
        Plan::new(&b.decode(heads(), 4), &opts(), &cfg),
        Error::LimitExceeded {
            field: "batch_size",
            limit: 2,
            actual: 3,
            rule: "graph_capacity",
        },
        &["batch_size = 3", "limit 2", "graph_capacity"],
    );
    // Replan past the capacity leaves the plan unchanged.
    cfg.graph_capacity = Some(4);
    let mut plan = Plan::new(&b.decode(heads(), 4), &opts(), &cfg).unwrap();
    let before = plan.int_image().to_vec();
    b.pad_to(4).unwrap();
    b.push(1, 1, &[3]).unwrap();
    assert!(matches!(
        plan.replan(&b.decode(heads(), 4), &opts()),
        Err(Error::LimitExceeded { actual: 5, .. })
    ));
    assert_eq!(plan.int_image(), &before[..]);
    assert_eq!(plan.batch_size(), 3);
}

#[test]
fn deterministic_chunk_not_a_page_multiple() {
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.deterministic_chunk = Some(24);
    let desc = BatchDesc::decode(heads(), table(&[0, 1], &[1], 1));
    let err = Plan::new(&desc, &opts(), &cfg).unwrap_err();
    assert_eq!(
        err,
        Error::InvalidOption {
            field: "deterministic_chunk",
            expected: "a multiple of page_size",
            actual: "24 (page_size 16)".into(),
        }
    );
    assert!(err.to_string().contains("deterministic_chunk = 24"));
    cfg.deterministic_chunk = Some(32);
    assert!(Plan::new(&desc, &opts(), &cfg).is_ok());
}

#[test]
fn zero_parallelism_and_tile() {
    let desc = BatchDesc::decode(heads(), table(&[0, 1], &[1], 1));
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.parallelism = 0;
    expect(
        Plan::new(&desc, &opts(), &cfg),
        Error::NotPositive {
            field: "parallelism",
            actual: 0,
        },
        &["parallelism must be greater than 0"],
    );
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.q_tile = 0;
    assert!(matches!(
        Plan::new(&desc, &opts(), &cfg),
        Err(Error::NotPositive {
            field: "q_tile",
            ..
        })
    ));
}

#[test]
fn absurd_configuration_is_refused_before_allocating() {
    // A graph capacity whose schedule would need terabytes: an error, not an allocation.
    let desc = BatchDesc::decode(heads(), table(&[0, 1], &[1], 1));
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.graph_capacity = Some(1 << 40);
    let err = Plan::new(&desc, &opts(), &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded { .. } | Error::SizeOverflow { .. }
        ),
        "{err:?}"
    );
    // Parallelism past MAX_PARALLELISM is refused by name.
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.parallelism = usize::MAX;
    let err = Plan::new(&desc, &opts(), &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidOption {
                field: "parallelism",
                ..
            }
        ),
        "{err:?}"
    );
    // The most parallelism, the smallest tile and chunk, 2^31 query rows and keys: the
    // schedule would exceed MAX_INT_IMAGE_BYTES, refused before it is allocated.
    let mut cfg = PlanConfig::with_parallelism(flashpage::plan::MAX_PARALLELISM);
    cfg.min_kv_chunk = 1;
    cfg.q_tile = 1;
    let huge = HeadConfig::new(1 << 16, 1, 16).unwrap();
    let qo = [0, i32::MAX];
    let err = Plan::new(&BatchDesc::prefill_ragged(huge, &qo, &qo), &opts(), &cfg).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
    // Found by fuzzing (plan_arrays): 2^22 rows × 1024 heads is 2^32 packed rows, which the
    // int32 work items cannot name; they wrapped around.
    let wide = HeadConfig::new(1024, 1, 16).unwrap();
    let qo = [0, 1 << 22];
    let cfg = PlanConfig::with_parallelism(8);
    expect(
        Plan::new(&BatchDesc::prefill_ragged(wide, &qo, &qo), &opts(), &cfg),
        Error::LimitExceeded {
            field: "packed rows",
            limit: i32::MAX as usize,
            actual: 1 << 32,
            rule: "plan arrays are int32",
        },
        &["packed rows = 4294967296"],
    );
    // 2^20 rows × 1024 heads / 64-row tiles = 2^24 work items: 384 MiB of schedule.
    let qo = [0, 1 << 20];
    let cfg = PlanConfig::with_parallelism(8);
    let err = Plan::new(&BatchDesc::prefill_ragged(wide, &qo, &qo), &opts(), &cfg).unwrap_err();
    assert_eq!(
        err,
        Error::LimitExceeded {
            field: "int workspace bytes",
            limit: flashpage::plan::MAX_INT_IMAGE_BYTES,
            actual: match err {
                Error::LimitExceeded { actual, .. } => actual,
                _ => 0,
            },
            rule: "largest plan schedule",
        }
    );
}

// ---- workspace ------------------------------------------------------------------------

fn split_case() -> (BatchBuilder, Plan) {
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(1, 1000, &(0..63).collect::<Vec<_>>()).unwrap();
    let plan = Plan::new(
        &b.decode(heads(), 64),
        &opts(),
        &PlanConfig::with_parallelism(16),
    )
    .unwrap();
    assert!(plan.split_kv());
    (b, plan)
}

#[test]
fn workspace_too_small_names_the_buffer() {
    let (_, plan) = split_case();
    let float = plan.requirement().float;
    let total = float.total();
    let po = float.buffer("partial_o").unwrap();
    let pl = float.buffer("partial_lse").unwrap();
    assert_eq!(po.bytes, plan.num_partial_rows() * 8 * 64 * 4);
    assert_eq!(pl.bytes, plan.num_partial_rows() * 8 * 4);
    // Too small for partial_lse only.
    expect(
        float.check_fits(total - 1),
        Error::WorkspaceTooSmall {
            buffer: "partial_lse",
            requested: pl.bytes,
            offset: pl.offset,
            available: total - 1 - pl.offset,
            capacity: total - 1,
            required_total: total,
        },
        &[
            "buffer 'partial_lse'",
            &format!("requested {} bytes", pl.bytes),
            &format!("needs {total} bytes"),
        ],
    );
    // Too small for partial_o already.
    assert!(matches!(
        float.check_fits(100),
        Err(Error::WorkspaceTooSmall {
            buffer: "partial_o",
            capacity: 100,
            available: 100,
            ..
        })
    ));
    assert_eq!(float.check_fits(total), Ok(()));
}

#[test]
fn run_with_small_workspace_is_refused() {
    let (b, plan) = split_case();
    let h = heads();
    let elems = 64 * 16 * 2 * 64;
    let kv: Vec<f32> = (0..elems).map(|i| (i as f32 * 0.37).sin()).collect();
    let q: Vec<f32> = (0..8 * 64).map(|i| (i as f32 * 0.05).cos()).collect();
    let mut o = vec![f32::NAN; 8 * 64];
    let total = plan.requirement().float.total();
    let mut ws = HostWorkspace::new(total - 256).unwrap();
    let err = CpuBackend::new(1)
        .unwrap()
        .run(
            &plan,
            RunArgs {
                q: TensorRef::F32(&q),
                kv: KvCache::paged(
                    TensorRef::F32(&kv),
                    TensorRef::F32(&kv),
                    KvStrides::dense(KvLayout::Nhd, 16, h.num_kv_heads(), 64),
                    64,
                    b.kv_indices(),
                ),
                o: TensorMut::F32(&mut o),
                lse: None,
                sinks: None,
                custom_mask: None,
            },
            ws.as_bytes_mut(),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::WorkspaceTooSmall { required_total, .. } if required_total == total),
        "{err:?}"
    );
    assert!(o.iter().all(|x| x.is_nan()), "nothing written on error");
}

#[test]
fn new_within_refuses_batches_beyond_limits() {
    let (b, _) = split_case();
    let limits = WorkspaceLimits::new(heads(), DType::F16, 4, 64, 512, 16);
    expect(
        Plan::new_within(&b.decode(heads(), 64), &opts(), &limits),
        Error::LimitExceeded {
            field: "kv_len",
            limit: 512,
            actual: 1000,
            rule: "max_kv_len",
        },
        &["kv_len = 1000", "limit 512"],
    );
    let limits = WorkspaceLimits::new(heads(), DType::F16, 4, 64, 1000, 16);
    let plan = Plan::new_within(&b.decode(heads(), 64), &opts(), &limits).unwrap();
    assert!(
        plan.requirement()
            .fits_in(&workspace_size(&limits).unwrap())
    );
    let other = HeadConfig::new(8, 8, 64).unwrap();
    assert!(matches!(
        Plan::new_within(&b.decode(other, 64), &opts(), &limits),
        Err(Error::PlanMismatch { .. })
    ));
}

// ---- tensors (check_run_args) ---------------------------------------------------------

fn shapes_ok(plan: &Plan, ids: &'static [i32]) -> ArgShapes<'static> {
    let h = plan.heads();
    let (hq, hkv, d) = (h.num_qo_heads(), h.num_kv_heads(), h.head_dim());
    let rows = plan.num_q_rows();
    let kv = 4 * 16 * hkv * d;
    ArgShapes {
        q: (DType::BF16, rows * hq * d),
        k: (DType::BF16, kv),
        v: (DType::BF16, kv),
        o: (DType::BF16, rows * hq * d),
        lse: Some(rows * hq),
        strides: KvStrides::dense(KvLayout::Nhd, 16, hkv, d),
        v_strides: KvStrides::dense(KvLayout::Nhd, 16, hkv, d),
        qo: None,
        num_pages: 4,
        kv_indices: Some(ids),
        num_indices: ids.len(),
        paged: Some(true),
        sinks: None,
        custom_mask: None,
        k_scale: None,
        v_scale: None,
    }
}

#[test]
fn run_args_checked_against_plan() {
    static IDS: [i32; 3] = [3, 1, 0];
    let indptr = [0, 2, 3];
    let last = [5, 16];
    let o = opts().with_return_lse(true);
    let plan = Plan::new(
        &BatchDesc::decode(heads(), table(&indptr, &last, 3)),
        &o,
        &PlanConfig::with_parallelism(4),
    )
    .unwrap();
    let ok = shapes_ok(&plan, &IDS);
    assert_eq!(check_run_args(&plan, &ok), Ok(()));

    // q rows do not match the batch (2 rows, 8 heads, 64).
    let mut a = ok;
    a.q.1 = 3 * 8 * 64;
    expect(
        check_run_args(&plan, &a),
        Error::TensorShape {
            tensor: "q",
            expected: "[2, 8, 64]".into(),
            actual: "1536 elements".into(),
        },
        &["q has shape 1536 elements", "expected [2, 8, 64]"],
    );
    let mut a = ok;
    a.o.1 -= 1;
    assert!(matches!(
        check_run_args(&plan, &a),
        Err(Error::TensorShape { tensor: "o", .. })
    ));
    let mut a = ok;
    a.v.0 = DType::F16;
    expect(
        check_run_args(&plan, &a),
        Error::DTypeMismatch {
            tensor: "v",
            expected: "bf16",
            actual: "f16",
        },
        &["v has dtype f16, expected bf16"],
    );
    // Attention sinks: one per query head (8), or none.
    let mut a = ok;
    a.sinks = Some(8);
    assert_eq!(check_run_args(&plan, &a), Ok(()));
    a.sinks = Some(2);
    expect(
        check_run_args(&plan, &a),
        Error::TensorShape {
            tensor: "sinks",
            expected: "[8]".into(),
            actual: "2 elements".into(),
        },
        &["sinks has shape 2 elements", "expected [8]"],
    );
    // Custom mask: the plan's requests are decode rows of 21 and 16 keys: 3 and 2 bytes.
    static MASK_OK: [i32; 3] = [0, 3, 5];
    let mut a = ok;
    a.custom_mask = Some((&MASK_OK, 5));
    assert_eq!(check_run_args(&plan, &a), Ok(()));
    a.custom_mask = Some((&MASK_OK, 9));
    assert_eq!(
        check_run_args(&plan, &a),
        Ok(()),
        "a longer bits buffer is fine"
    );
    static MASK_SHORT: [i32; 2] = [0, 3];
    a.custom_mask = Some((&MASK_SHORT, 5));
    expect(
        check_run_args(&plan, &a),
        Error::ArrayLength {
            field: "mask_indptr",
            expected: 3,
            actual: 2,
            rule: "batch_size + 1",
        },
        &["mask_indptr has 2 entries, expected 3"],
    );
    static MASK_START: [i32; 3] = [1, 4, 6];
    a.custom_mask = Some((&MASK_START, 6));
    expect(
        check_run_args(&plan, &a),
        Error::IndptrStart {
            field: "mask_indptr",
            actual: 1,
        },
        &["mask_indptr[0] must be 0, got 1"],
    );
    static MASK_DOWN: [i32; 3] = [0, 3, 2];
    a.custom_mask = Some((&MASK_DOWN, 5));
    expect(
        check_run_args(&plan, &a),
        Error::IndptrDecreasing {
            field: "mask_indptr",
            index: 2,
            previous: 3,
            actual: 2,
        },
        &["mask_indptr must be non-decreasing"],
    );
    static MASK_BYTES: [i32; 3] = [0, 3, 6];
    a.custom_mask = Some((&MASK_BYTES, 7));
    expect(
        check_run_args(&plan, &a),
        Error::CustomMaskLength {
            request: 1,
            qo_len: 1,
            kv_len: 16,
            expected: 2,
            actual: 3,
        },
        &["request 1 3 mask bytes", "ceil(1 x 16 / 8) = 2"],
    );
    a.custom_mask = Some((&MASK_OK, 4));
    expect(
        check_run_args(&plan, &a),
        Error::TensorShape {
            tensor: "custom_mask",
            expected: "at least 5 bytes (mask_indptr[2] = 5)".into(),
            actual: "4 bytes".into(),
        },
        &["custom_mask", "at least 5 bytes"],
    );
    let mut a = ok;
    a.lse = Some(15);
    assert!(matches!(
        check_run_args(&plan, &a),
        Err(Error::TensorShape { tensor: "lse", .. })
    ));
    let mut a = ok;
    a.lse = None;
    assert!(matches!(
        check_run_args(&plan, &a),
        Err(Error::TensorShape { tensor: "lse", .. })
    ));
    let mut a = ok;
    a.k.1 -= 1;
    assert!(matches!(
        check_run_args(&plan, &a),
        Err(Error::TensorShape {
            tensor: "k_cache",
            ..
        })
    ));
    let mut a = ok;
    a.strides.head = 8;
    assert!(matches!(
        check_run_args(&plan, &a),
        Err(Error::TensorShape {
            tensor: "k_cache",
            ..
        })
    ));
    static BAD: [i32; 3] = [3, 4, 0];
    let a = shapes_ok(&plan, &BAD);
    expect(
        check_run_args(&plan, &a),
        Error::PageIdOutOfRange {
            index: 1,
            page_id: 4,
            num_pages: 4,
        },
        &["kv_indices[1] = 4"],
    );
    static SHORT: [i32; 2] = [3, 1];
    let a = shapes_ok(&plan, &SHORT);
    assert!(matches!(
        check_run_args(&plan, &a),
        Err(Error::IndicesTooShort {
            needed: 3,
            actual: 2,
            ..
        })
    ));
}

// ---- the founding scenario ------------------------------------------------------------

#[test]
fn founding_scenario() {
    let h = HeadConfig::new(32, 16, 128).unwrap();
    let qo_indptr = [0, 1, 2, 3, 4, 5, 6, 7, 8];
    let kv_indptr = [0];
    let pages = PageTable {
        page_size: 16,
        num_pages: 64,
        indptr: &kv_indptr,
        last_page_len: &[],
        num_indices: 0,
    };
    let desc = BatchDesc::prefill_paged(h, &qo_indptr, pages);
    let mut cfg = PlanConfig::with_parallelism(132 * 2);
    cfg.graph_capacity = Some(8);

    // The error comes before any size is computed or anything is allocated.
    let err = Plan::new(&desc, &opts(), &cfg).unwrap_err();
    assert_eq!(
        err,
        Error::IndptrLengthMismatch {
            qo_indptr_len: 9,
            kv_indptr_len: 1,
        }
    );
    assert_eq!(
        err.to_string(),
        "kv_indptr has 1 entry, qo_indptr has 9 entries: both must have batch_size + 1 = 9 entries"
    );
    let limits = WorkspaceLimits::new(h, DType::BF16, 8, 8, 4096, 1).with_config(cfg);
    assert_eq!(Plan::new_within(&desc, &opts(), &limits).unwrap_err(), err);

    // The same warm-up batch written correctly: 8 empty requests padded to the capacity.
    let mut b = BatchBuilder::new(16).unwrap();
    b.pad_to(8).unwrap();
    assert_eq!(b.kv_indptr(), &[0; 9]);
    let warm = b.prefill(h, 64);
    let plan = Plan::new(&warm, &opts(), &PlanConfig::with_parallelism(264)).unwrap();
    assert_eq!(plan.batch_size(), 8);
    assert_eq!((plan.num_work_items(), plan.num_partial_rows()), (0, 0));
    assert_eq!(
        plan.requirement().float.total(),
        0,
        "no float workspace at all"
    );
    // In graph mode it plans too, writes no partial state, and its layout is the graph's.
    let graph = Plan::new(&warm, &opts(), &cfg).unwrap();
    assert_eq!(graph.padded_batch_size(), 8);
    assert_eq!(graph.num_partial_rows(), 0);
    assert!(
        graph
            .requirement()
            .fits_in(&workspace_size(&limits).unwrap())
    );
    // Decode warm-up: every padded row is one empty-KV item, written directly.
    let plan = Plan::new(&b.decode(h, 64), &opts(), &cfg).unwrap();
    assert_eq!(plan.num_work_items(), 8);
    assert!(
        plan.work_items()
            .all(|w| w.kv_start == w.kv_end && w.partial.is_none())
    );
    assert_eq!(plan.num_partial_rows(), 0);

    // The decode form of the bug (kv_indptr = [0], 8 query rows) is a plan of 0 rows, and
    // running it with 8 rows of q is refused naming q.
    let plan = Plan::new(&BatchDesc::decode(h, pages), &opts(), &cfg).unwrap();
    assert_eq!(plan.num_q_rows(), 0);
    let q = vec![0.5f32; 8 * 32 * 128];
    let mut o = vec![0f32; 8 * 32 * 128];
    let kv = vec![0.25f32; 64 * 16 * 16 * 128];
    let err = CpuBackend::new(1)
        .unwrap()
        .run(
            &plan,
            RunArgs {
                q: TensorRef::F32(&q),
                kv: KvCache::paged(
                    TensorRef::F32(&kv),
                    TensorRef::F32(&kv),
                    KvStrides::dense(KvLayout::Nhd, 16, 16, 128),
                    64,
                    &[],
                ),
                o: TensorMut::F32(&mut o),
                lse: None,
                sinks: None,
                custom_mask: None,
            },
            HostWorkspace::new(plan.requirement().float.total())
                .unwrap()
                .as_bytes_mut(),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::TensorShape { tensor: "q", .. }),
        "{err:?}"
    );
}

// ---- the builder ----------------------------------------------------------------------

#[test]
fn builder_padded_batch() {
    let mut b = BatchBuilder::new(16).unwrap();
    b.push(3, 40, &[7, 2, 5]).unwrap();
    b.push(0, 0, &[]).unwrap();
    b.push(2, 16, &[3]).unwrap();
    b.pad_to(6).unwrap();
    assert_eq!(b.len(), 6);
    assert_eq!(b.qo_indptr(), &[0, 3, 3, 5, 5, 5, 5]);
    assert_eq!(b.kv_indptr(), &[0, 3, 3, 4, 4, 4, 4]);
    assert_eq!(b.kv_indices(), &[7, 2, 5, 3]);
    assert_eq!(b.kv_last_page_len(), &[8, 0, 16, 0, 0, 0]);
    // pad_to is idempotent at the capacity and refuses to shrink.
    b.pad_to(6).unwrap();
    assert_eq!(b.len(), 6);
    expect(
        b.pad_to(5),
        Error::LimitExceeded {
            field: "batch_size",
            limit: 5,
            actual: 6,
            rule: "graph_capacity",
        },
        &["batch_size = 6", "limit 5"],
    );
    b.clear();
    assert!(b.is_empty());
    assert_eq!(b.kv_indptr(), &[0]);
    expect(
        b.push(1, 33, &[1, 2]),
        Error::ArrayLength {
            field: "pages",
            expected: 3,
            actual: 2,
            rule: "ceil(kv_len / page_size)",
        },
        &["pages has 2 entries, expected 3"],
    );
    assert!(b.is_empty());
    for ps in [0, 257] {
        assert!(matches!(
            BatchBuilder::new(ps),
            Err(Error::UnsupportedPageSize { actual, .. }) if actual == ps
        ));
    }
}

#[test]
fn builder_round_trip() {
    let mut rng = flashpage_testkit::case::Rng::new(11);
    for ps in [1, 7, 16, 256] {
        let mut b = BatchBuilder::new(ps).unwrap();
        let mut want = Vec::new();
        let mut next = 0i32;
        for _ in 0..1 + rng.below(20) {
            let kv = if rng.below(4) == 0 { 0 } else { rng.below(600) };
            let qo = rng.below(kv + 1);
            let pages: Vec<i32> = (next..next + kv.div_ceil(ps) as i32).collect();
            next += pages.len() as i32;
            b.push(qo, kv, &pages).unwrap();
            want.push((qo, kv));
        }
        b.pad_to(want.len() + rng.below(4)).unwrap();
        let h = heads();
        let causal = opts().with_causal(true);
        let desc = b.prefill(h, next as usize);
        let vb = check_batch(&desc, &causal).unwrap();
        assert_eq!(vb.batch_size(), b.len());
        for r in 0..b.len() {
            let req = vb.request(r);
            let (qo, kv) = want.get(r).copied().unwrap_or((0, 0));
            assert_eq!(
                (req.qo_len, req.kv_len),
                (qo, kv),
                "page size {ps}, request {r}"
            );
        }
        check_page_ids(b.kv_indptr(), b.kv_indices(), next as usize).unwrap();
        let plan = Plan::new(&desc, &causal, &PlanConfig::with_parallelism(64)).unwrap();
        assert_eq!(plan.batch_size(), b.len());
        let rows: usize = want.iter().map(|w| w.0).sum();
        assert_eq!(plan.num_q_rows(), rows);
        let plan = Plan::new(
            &b.decode(h, next as usize),
            &opts(),
            &PlanConfig::with_parallelism(2),
        )
        .unwrap();
        assert_eq!(plan.num_q_rows(), b.len());
    }
}
