//! flashpage's errors as Python exceptions, and the guard that keeps panics inside Rust.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    flashpage,
    Error,
    PyValueError,
    "A flashpage error: invalid arguments (a malformed batch, a tensor of the wrong shape or \
     dtype, an option out of range) or a backend that cannot run. The message is the \
     library's (argument, expected, actual); `kind` is the error's kind, e.g. \
     \"IndptrLengthMismatch\"."
);

/// Why a call failed: one of flashpage's typed errors, or a Python exception.
#[derive(Debug)]
pub enum Failure {
    /// A library error (raised as `flashpage.Error`).
    Lib(flashpage::Error),
    /// A Python exception (a `TypeError` for a non-tensor, or one raised by torch).
    Py(PyErr),
}

impl From<flashpage::Error> for Failure {
    fn from(e: flashpage::Error) -> Self {
        Failure::Lib(e)
    }
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Py(e)
    }
}

/// A `TypeError`.
pub fn type_error(msg: String) -> Failure {
    Failure::Py(PyTypeError::new_err(msg))
}

impl Failure {
    /// The Python exception: `flashpage.Error(message)` with `kind` set for library errors.
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Py(e) => e,
            Failure::Lib(e) => lib_error(py, e.kind().name(), e.to_string()),
        }
    }
}

/// A `flashpage.Error` with `kind` set.
pub fn lib_error(py: Python<'_>, kind: &str, message: String) -> PyErr {
    let err = Error::new_err(message);
    if let Err(e) = err.value(py).setattr("kind", kind) {
        return e;
    }
    err
}

/// Runs `f`, turning a library error into `flashpage.Error` and a panic (a bug in flashpage)
/// into a `RuntimeError`, so that nothing unwinds across the FFI boundary.
pub fn guard<T>(py: Python<'_>, f: impl FnOnce() -> Result<T, Failure>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into_pyerr(py)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "flashpage internal error (please report): {msg}"
            )))
        }
    }
}
