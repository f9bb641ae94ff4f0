//! # singlora
//!
//! Fused CUDA kernels for SingLoRA (Bensaïd et al., 2025): a frozen weight
//! `W0` (d_out × d_in) adapted by `ΔW = s · A[:d_out] · A[:d_in]ᵀ` with one
//! learned matrix `A` (D × rank, D = max(d_in, d_out)).
//!
//! * [`forward()`]: `S = X·A_in` (f32, saved) and `Y = beta·Y + s·S·A_outᵀ`
//!   in one launch.
//! * [`backward()`]: `dX = beta·dX + s·(G·A_out)·A_inᵀ` and a deterministic
//!   `dA = da_beta·dA + s·(Gᵀ·S + Xᵀ·Q)`, never forming a d × d matrix.
//! * [`merge()`] / [`unmerge()`]: fold the adapter into `W0` in place (and back).
//! * [`adamw()`]: one fused AdamW step over A; [`mse()`]: an MSE loss and its
//!   gradient on the device.
//! * [`Dropout`]: adapter dropout (PEFT's `lora_dropout`), fused into the
//!   forward and backward kernels; the mask is regenerated, never stored.
//! * [`SingLoraLinear`]: the layer, built on the launchers.
//! * [`mod@reference`]: the f64 CPU reference every kernel is checked against.
//!
//! Launchers validate every argument before touching the GPU, return typed
//! [`Error`]s, and only enqueue work on the caller's stream.
//!
//! Modules: [`ops`] (one per operation), [`runtime`] (devices, the typed
//! kernel registry, launch helpers), [`nn`] (the layer, its ramp and
//! initialisation), [`ffi`] (the C ABI of include/singlora.h).

pub mod dims;
pub mod dropout;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod nn;
pub mod ops;
pub mod params;
pub mod reference;
pub mod runtime;

pub use dims::{Dims, Matrix, MAX_RANK};
pub use dropout::{Dropout, DropoutSchedule};
pub use dtype::DType;
pub use error::{Error, Result};
pub use nn::{kaiming_uniform, ForwardCtx, Ramp, SingLoraLinear, SplitMix64};
pub use ops::adamw::{adamw, adamw_device_step, advance_step, AdamW, AdamWState};
pub use ops::backward::{
    backward, backward_raw, backward_workspace_len, check_backward, BackwardKernel, BackwardLens,
    BackwardOptions, BackwardPtrs, BackwardShape, DxOut,
};
pub use ops::fill::fill_bits;
pub use ops::forward::{
    check_forward, forward, forward_raw, ForwardKernel, ForwardOptions, ForwardPtrs, ForwardShape,
};
pub use ops::merge::{check_merge, merge, merge_raw, merge_with, unmerge, MergeKernel, MergeShape};
pub use ops::mse::{mse, mse_loss, MSE_PARTIALS};
pub use ops::scale::{RawScale, Scale};
pub use runtime::device::driver_present;
pub use runtime::{kernel_names, open_device, Family, KernelId, Kernels, RANK_BUCKETS};
