//! Backends execute a [`Plan`](crate::Plan): [`cpu`] (the default and the reference implementation of
//! the schedule) and, with the `cuda` feature, `cuda`.
//!
//! Backends trust their inputs: everything is validated before a kernel starts, by
//! [`check_run_args`] (tensors against the plan) and by [`crate::validate`] (the batch).
//! A backend returns errors only for what the caller cannot anticipate.
//!
//! Every backend implements [`Backend`]: prepare (compile kernels ahead of time), upload a
//! plan (a no-op on the CPU, one copy on CUDA) and run. Files import downward only:
//! `args` (host tensors and their checks) ← `cpu`, `cuda` ← `interface` (the trait and its
//! implementations).

mod args;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod interface;

pub use args::{ArgShapes, KvCache, RunArgs, check_run_args};
pub use interface::Backend;
#[cfg(feature = "cuda")]
pub use interface::DeviceArgs;
