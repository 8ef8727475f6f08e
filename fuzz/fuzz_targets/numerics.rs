//! Bytes → a small batch with adversarial values (huge, tiny, subnormal, ±inf, NaN in q, K
//! and V) and extreme-but-valid options → the CPU backend at every SIMD level of this
//! machine → the numeric contract of docs/numerics.md against the f64 reference
//! (`flashpage_testkit::numerics`).
//!
//! `FLASHPAGE_NUMERICS_STRICT=1` adds the input classes that check the kernel fixes of
//! issue 8: non-finite or extreme values at masked positions, and extreme finite values and
//! options (see docs/numerics.md, "Fuzzing").
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var("FLASHPAGE_NUMERICS_STRICT").is_ok_and(|v| v == "1"))
}

fuzz_target!(|data: &[u8]| {
    if let Err(e) = flashpage_testkit::numerics::check_bytes(data, strict()) {
        panic!("numeric contract violated: {e}");
    }
});
