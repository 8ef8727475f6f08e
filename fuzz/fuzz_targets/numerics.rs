//! Bytes → a small batch with adversarial values (huge, tiny, subnormal, ±inf, NaN in q, K
//! and V, at visible and masked positions) and extreme-but-valid options → the CPU backend
//! at every SIMD level of this machine → the numeric contract of docs/numerics.md against
//! the f64 reference (`flashpage_testkit::numerics`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = flashpage_testkit::numerics::check_bytes(data) {
        panic!("numeric contract violated: {e}");
    }
});
