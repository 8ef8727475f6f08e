//! `flashpage._flashpage`: the native half of the `flashpage` Python package.
//!
//! The Python package (`python/flashpage/`) exposes FlashInfer's wrapper API; this module
//! does the work: plans through the library ([`attention::plan`]), runs on the CPU backend
//! over torch CPU tensors borrowed without copies ([`ffi`]), merges attention states
//! ([`merge`]) and appends to a paged cache ([`append`]). Library errors become
//! `flashpage.Error` (a `ValueError` with a `kind`), and no panic crosses into Python
//! ([`errors::guard`]).
#![deny(missing_docs)]

pub mod append;
pub mod attention;
pub mod errors;
pub mod ffi;
pub mod merge;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _flashpage(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<errors::Error>())?;
    m.add_class::<attention::AttentionPlan>()?;
    m.add_function(wrap_pyfunction!(attention::plan, m)?)?;
    m.add_function(wrap_pyfunction!(attention::plan_cascade, m)?)?;
    m.add_function(wrap_pyfunction!(merge::py_merge_state, m)?)?;
    m.add_function(wrap_pyfunction!(merge::py_merge_state_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(merge::py_merge_states, m)?)?;
    m.add_function(wrap_pyfunction!(append::append_paged_kv_cache, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// Threads of the CPU backend (all cores, or `FLASHPAGE_NUM_THREADS` read at first use).
#[pyfunction]
fn num_threads(py: Python<'_>) -> PyResult<usize> {
    errors::guard(py, || Ok(attention::backend()?.threads()))
}
