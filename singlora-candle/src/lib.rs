//! # singlora-candle
//!
//! [SingLoRA](https://arxiv.org/abs/2507.05566) for [candle](https://github.com/huggingface/candle): a frozen weight
//! `W0` (`d_out × d_in`) adapted by one learned matrix `A` (`D × rank`,
//! `D = max(d_in, d_out)`),
//!
//! ```text
//! y = x·W0ᵀ + s·(x·A[:d_in])·A[:d_out]ᵀ,    s = (alpha / rank)·min(t / T, 1)
//! ```
//!
//! with `t` counted in optimizer steps.
//!
//! * [`SingLoraLinear`] implements [`candle_core::Module`] over a frozen
//!   candle weight, with `A` a [`candle_core::Var`].
//! * The layer runs through one candle custom op ([`singlora_linear`], and
//!   [`singlora_adapter`] for the adapter term alone), so candle's autograd
//!   differentiates it. On a CUDA device (feature `cuda`) the forward calls
//!   singlora's fused launchers on candle's stream (cuBLAS for `x·W0ᵀ`, then
//!   the adapter added in place), `S = x·A_in` is saved for the backward,
//!   and the backward is singlora's fused one (`dX` and a deterministic
//!   `dA`); on the CPU both run with candle's own ops, in f32.
//! * [`FusedAdamW`] is singlora's fused AdamW (f32 moments, f32 master
//!   weights for 16-bit parameters) as a [`candle_nn::Optimizer`]; its
//!   `step` also advances the ramp of every layer whose `A` it updates.
//! * [`SingLoraLinear::merge`] / [`SingLoraLinear::unmerge`] fold the adapter
//!   into the frozen weight in place, for inference, and take it back out.
//!
//! Inputs may have any leading batch dimensions; rows with a stride (a
//! column slice of a wider tensor) are used in place on the GPU, other
//! layouts are copied first. Element types f32, f16 and bf16; `x`, `A` and
//! `W0` share one. Every refusal is a candle error that names the argument,
//! never a panic.
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::Optimizer;
//! use singlora_candle::{AdamW, FusedAdamW, SingLoraConfig, SingLoraLinear};
//!
//! let dev = Device::cuda_if_available(0)?;
//! let w0 = Tensor::randn(0f32, 0.02, (4096, 4096), &dev)?.to_dtype(DType::BF16)?;
//! let layer = SingLoraLinear::new(w0, None, SingLoraConfig { rank: 16, alpha: 16.0, warmup_steps: 100, seed: 0 })?;
//! let mut opt = FusedAdamW::new(layer.vars(), AdamW { lr: 1e-3, ..AdamW::default() })?;
//! let x = Tensor::randn(0f32, 1.0, (8, 512, 4096), &dev)?.to_dtype(DType::BF16)?;
//! let loss = layer.forward(&x)?.to_dtype(DType::F32)?.sqr()?.mean_all()?;
//! opt.backward_step(&loss)?; // A updated, the ramp advanced by one step
//! # Ok(()) }
//! ```

mod checks;
#[cfg(feature = "cuda")]
mod cuda;
mod layer;
mod merge;
mod op;
mod optim;
mod rows;

pub use checks::ArgError;
pub use layer::{SingLoraConfig, SingLoraLinear};
pub use op::{
    singlora_adapter, singlora_adapter_dropout, singlora_linear, singlora_linear_dropout,
};
pub use optim::FusedAdamW;
pub use singlora::{AdamW, Dropout, Ramp};
