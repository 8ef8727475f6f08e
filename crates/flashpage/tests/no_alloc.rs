//! A rejected batch allocates nothing: the founding scenario and absurd configurations are
//! refused before the planner computes a size or touches the heap.
//!
//! The allocator counts every thread, so this binary holds a single test.

use std::alloc::System;

use flashpage::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn allocations_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let out = f();
    let stats = region.change();
    (out, stats.allocations + stats.reallocations)
}

#[test]
fn rejected_plans_allocate_nothing() {
    let opts = AttentionOptions::default();

    // The founding scenario: qo_indptr has B + 1 = 9 entries, kv_indptr has 1.
    let h = HeadConfig::new(32, 16, 128).unwrap();
    let qo_indptr = [0, 1, 2, 3, 4, 5, 6, 7, 8];
    let pages = PageTable {
        page_size: 16,
        num_pages: 64,
        indptr: &[0],
        last_page_len: &[],
        num_indices: 0,
    };
    let desc = BatchDesc::prefill_paged(h, &qo_indptr, pages);
    let mut cfg = PlanConfig::with_parallelism(132 * 2);
    cfg.graph_capacity = Some(8);
    let (res, n) = allocations_during(|| Plan::new(&desc, &opts, &cfg).map(|_| ()));
    assert_eq!(
        res,
        Err(Error::IndptrLengthMismatch {
            qo_indptr_len: 9,
            kv_indptr_len: 1
        })
    );
    assert_eq!(n, 0, "the founding scenario allocated {n} times");

    // A graph capacity whose schedule would need terabytes.
    let small = HeadConfig::new(8, 2, 64).unwrap();
    let table = PageTable {
        page_size: 16,
        num_pages: 4,
        indptr: &[0, 1],
        last_page_len: &[1],
        num_indices: 1,
    };
    let desc = BatchDesc::decode(small, table);
    let mut cfg = PlanConfig::with_parallelism(8);
    cfg.graph_capacity = Some(1 << 40);
    let (res, n) = allocations_during(|| Plan::new(&desc, &opts, &cfg).map(|_| ()));
    assert!(
        matches!(
            res,
            Err(Error::LimitExceeded { .. } | Error::SizeOverflow { .. })
        ),
        "{res:?}"
    );
    assert_eq!(n, 0, "an absurd graph capacity allocated {n} times");

    // 2^20 rows × 1024 heads in 64-row tiles: 2^24 work items, 384 MiB of schedule.
    let wide = HeadConfig::new(1024, 1, 16).unwrap();
    let qo = [0, 1 << 20];
    let cfg = PlanConfig::with_parallelism(8);
    let desc = BatchDesc::prefill_ragged(wide, &qo, &qo);
    let (res, n) = allocations_during(|| Plan::new(&desc, &opts, &cfg).map(|_| ()));
    assert!(matches!(res, Err(Error::LimitExceeded { .. })), "{res:?}");
    assert_eq!(n, 0, "an oversized schedule allocated {n} times");

    // A valid plan does allocate (the counter works).
    let (res, n) = allocations_during(|| {
        Plan::new(&desc_ok(), &opts, &PlanConfig::with_parallelism(2)).map(|_| ())
    });
    assert!(res.is_ok());
    assert!(n > 0, "the allocation counter saw nothing");
}

fn desc_ok() -> BatchDesc<'static> {
    BatchDesc::decode(
        HeadConfig::new(8, 2, 64).unwrap(),
        PageTable {
            page_size: 16,
            num_pages: 4,
            indptr: &[0, 1],
            last_page_len: &[1],
            num_indices: 1,
        },
    )
}
