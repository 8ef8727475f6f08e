//! Checks shared by the fuzz targets: whatever the input, planning either fails with an
//! error or yields a plan whose every invariant holds.

use flashpage::validate::check_batch;
use flashpage::{AttentionOptions, BatchDesc, DType, Plan, PlanConfig, WorkspaceLimits, workspace_size};

/// Plans `desc`; on success checks the schedule, the workspace bound and a replan.
pub fn check_plan(desc: &BatchDesc<'_>, opts: &AttentionOptions, config: &PlanConfig) {
    let Ok(plan) = Plan::new(desc, opts, config) else {
        return;
    };
    let vb = check_batch(desc, opts).expect("a planned batch validates");
    let req = plan.requirement();
    assert_eq!(plan.int_image().len() * 4, req.int.total());
    assert!(req.int.total() <= flashpage::plan::MAX_INT_IMAGE_BYTES);

    // The bound: limits taken from the batch itself must admit it, and the plan fits them.
    // Limits for this kind of plan: a prefill batch's limits read as a decode deployment's
    // (one row per request, every request split) may pass int32 where the batch does not.
    let limits = WorkspaceLimits::new(desc.heads, DType::F32, vb.batch_size(), vb.num_q_rows(), vb.max_kv_len(), 1).with_config(*config).with_kind(plan.kind());
    let bound = workspace_size(&limits).expect("limits of a planned batch are sized");
    assert!(req.fits_in(&bound), "{req:?} exceeds {bound:?}");
    {
        let within =
            Plan::new_within(desc, opts, &limits).expect("a planned batch fits its limits");
        assert_eq!(within.int_image(), plan.int_image());
    }

    // Work items: per request, row bands tile [0, qo_len·g) and each band's chunks tile
    // [0, kv_len) (one empty chunk when kv_len = 0).
    let g = desc.heads.group_size();
    let mut items: Vec<_> = plan.work_items().collect();
    items.sort_by_key(|w| (w.request, w.row_start, w.kv_start));
    let mut i = 0;
    for r in 0..vb.batch_size() {
        let q = vb.request(r);
        let packed = q.qo_len * g;
        let mut row = 0;
        while row < packed {
            let band = items[i];
            assert_eq!((band.request, band.row_start), (r, row));
            assert!(band.row_end > row && band.row_end <= packed);
            let mut kv = 0;
            loop {
                let w = items[i];
                assert_eq!((w.request, w.row_start, w.row_end), (r, row, band.row_end));
                assert_eq!(w.kv_start, kv);
                assert!(w.kv_end >= w.kv_start && w.kv_end <= q.kv_len);
                assert!(w.kv_end > w.kv_start || q.kv_len == 0);
                if let Some(p) = w.partial {
                    assert!(p + q.qo_len <= plan.num_partial_rows());
                }
                kv = w.kv_end;
                i += 1;
                if kv == q.kv_len {
                    break;
                }
            }
            row = band.row_end;
        }
    }
    assert_eq!(i, items.len(), "items beyond the batch");
    for m in plan.merge_rows() {
        assert!(m.count >= 2 && m.row < vb.num_q_rows());
        assert!(m.first + (m.count - 1) * m.stride < plan.num_partial_rows());
    }

    // Replanning the same batch in place reproduces the image.
    let image = plan.int_image().to_vec();
    let mut plan = plan;
    plan.replan(desc, opts).expect("replan of a planned batch");
    assert_eq!(plan.int_image(), &image[..]);
}
