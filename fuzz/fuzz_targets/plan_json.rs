//! JSON bytes → the CLI's own batch parser (`flashpage plan --batch`) → validate → plan →
//! page-id check → render. Whatever the bytes, nothing panics and every plan is sound.
#![no_main]

use flashpage::KvIndex;
use flashpage::validate::{check_batch, check_page_ids};
use flashpage_cli::plan_cmd::{parse_batch_bytes, plan_batch};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = parse_batch_bytes("fuzz input", data) else {
        return;
    };
    // The command's whole path: an error or a report, never a panic.
    let explained = plan_batch(&file);
    let Ok(desc) = file.desc() else {
        assert!(explained.is_err());
        return;
    };
    common::check_plan(&desc, file.options(), file.config());
    let valid = check_batch(&desc, file.options()).is_ok();
    if let (true, KvIndex::Paged(pages)) = (valid, desc.kv)
        && check_page_ids(pages.indptr, file.kv_indices(), pages.num_pages).is_ok()
    {
        // Where the ids are read: either an error or every used id is in range.
        let used = *pages.indptr.last().unwrap() as usize;
        let n = pages.num_pages;
        assert!(file.kv_indices()[..used].iter().all(|&id| id >= 0 && (id as usize) < n));
    }
    if explained.is_ok() {
        assert!(valid, "the command planned a batch that does not validate");
    }
});
