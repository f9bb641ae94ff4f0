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
//! * [`SingLoraLinear`]: the layer, built on the launchers.
//! * [`reference`]: the f64 CPU reference every kernel is checked against.
//!
//! Launchers validate every argument before touching the GPU, return typed
//! [`Error`]s, and only enqueue work on the caller's stream.

pub mod adamw;
pub mod backward;
pub mod capi;
pub mod device;
pub mod dims;
pub mod dtype;
pub mod error;
pub mod fill;
pub mod forward;
pub mod layer;
pub mod merge;
pub mod mse;
pub mod params;
pub mod ramp;
pub mod reference;

pub use adamw::{adamw, AdamW, AdamWState};
pub use backward::{
    backward, backward_raw, backward_workspace_len, check_backward, BackwardLens, DxOut,
    RawBackward,
};
pub use device::{open_device, Kernels};
pub use dims::Dims;
pub use dtype::DType;
pub use error::{Error, Result};
pub use fill::fill_bits;
pub use forward::{check_forward, forward, forward_raw};
pub use layer::{ForwardCtx, SingLoraLinear};
pub use merge::{check_merge, merge, merge_raw, unmerge, unmerge_raw};
pub use mse::{mse, mse_loss, MSE_PARTIALS};
pub use ramp::Ramp;
