//! flashpage's test kit: what the tests, the `flashpage check`/`bench` commands and the
//! timing harnesses share, kept out of the library's public API.
//!
//! - [`reference`](mod@reference): the f64 oracle, written straight from the semantics in
//!   `docs/semantics.md`;
//! - [`rope_reference`]: the f64 oracle of the standalone RoPE;
//! - [`case`]: a case specification, materialised into fresh random inputs (a seeded PRNG,
//!   shuffled pages, poisoned outputs) and compared with the reference;
//! - [`suite`]: the declarative TOML suite (`data/*.toml`) and its runner, on any
//!   [`HostRunner`] (every backend through host tensors);
//! - [`mask`]: custom masks packed in FlashInfer's layout, drawn at random or built from
//!   boolean matrices;
//! - [`numerics`]: the numeric contract (`docs/numerics.md`) as a property of arbitrary
//!   bytes, shared by the `numerics` fuzz target and the tests;
//! - [`ceiling`]: this machine's read bandwidth and FMA peak, measured in the same run as a
//!   benchmark.
#![deny(missing_docs)]

pub mod case;
pub mod ceiling;
#[cfg(feature = "cuda")]
pub mod emulate;
#[cfg(feature = "cuda")]
pub mod emulate_ops;
pub mod mask;
pub mod numerics;
pub mod reference;
pub mod rope_reference;
pub mod runner;
pub mod strided;
pub mod suite;

pub use case::{CaseData, CaseSpec, Comparison, KvStorage, Rng, poisoned};
pub use runner::HostRunner;
