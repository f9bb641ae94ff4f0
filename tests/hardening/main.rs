//! Hardening tests on the GPU, in one binary (every test binary carries the
//! kernels, ~3 MB stripped, and the GPU bundle has a size limit):
//!
//! * concurrency.rs: threads with their own streams give bitwise the
//!   single-threaded results (eight threads on different shapes, two layers
//!   on two streams, the C ABI from four threads); first calls racing on a
//!   fresh context load its module once.
//! * limits.rs: tokens × d above 2³¹ elements (forward and backward), a
//!   16384 × 16384 merge, a backward workspace over 4 GiB — served and
//!   spot-checked, never wrapped; sizes past 64 bits refused (no GPU).
//! * nonfinite.rs: a NaN or Inf in one row of X or G reaches exactly the
//!   outputs the math says; f16 inputs near 65504 do not overflow S or Q.
//! * sanitizer_grid.rs: every kernel × element type × rank bucket × path at
//!   tiny sizes, for compute-sanitizer (scripts/gpu/run.sh runs memcheck,
//!   racecheck, initcheck and synccheck over the tests whose path contains
//!   `sanitizer_`, which is every test of that module).
//!
//! Two need a process of their own: the soak (tests/soak.rs) measures
//! device memory, as tests/layer_memory.rs does, and the primary context's
//! first-call race (tests/first_call_race.rs) needs a module not loaded yet.

#[path = "../common/mod.rs"]
mod common;
mod concurrency;
mod limits;
mod nonfinite;
mod sanitizer_grid;
