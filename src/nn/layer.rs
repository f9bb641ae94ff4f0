//! SingLoraLinear: the layer frameworks link, built on the launchers.
//!
//! It owns the adapter `A` (`D × rank`, `T`), its f32 gradient and AdamW
//! state, the ramp and the optimizer-step counter, and optionally the frozen
//! base weight `W0` (`d_out × d_in`, `T`, PyTorch `nn.Linear` orientation).
//! Every buffer is a `CudaSlice` freed with the layer. All work is enqueued
//! on the layer's stream; several layers may share one stream.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::dims::{check_len, Dims};
use crate::dropout::{Dropout, DropoutSchedule};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::nn::frozen::{Frozen, Product};
use crate::nn::init::kaiming_uniform;
use crate::nn::ramp::Ramp;
use crate::ops::adamw::{adamw_device_step, advance_step, AdamW, AdamWState};
use crate::ops::backward::{
    backward, backward_kernels, backward_workspace_len, BackwardKernel, BackwardOptions, DxOut,
};
use crate::ops::forward::{forward, forward_kernels, ForwardKernel, ForwardOptions};
use crate::ops::merge::{merge, unmerge};
use crate::ops::scale::Scale;
use crate::runtime::registry::Kernels;

/// What [`SingLoraLinear::forward`] saves for [`SingLoraLinear::backward`]:
/// the token count and `S`. Reused through
/// [`forward_into`](SingLoraLinear::forward_into), its S buffer is
/// allocated once (on the first call, or when a call has more tokens) and
/// then only overwritten, so a warmed-up training step allocates nothing.
#[derive(Default)]
pub struct ForwardCtx {
    tokens: usize,
    /// `S = X·A_in` (`tokens × rank`, f32); `None` when the adapter was
    /// merged into `W0` (the forward ran no adapter).
    s: Option<CudaSlice<f32>>,
    /// The forward ran the adapter (S holds this forward's rows).
    ran: bool,
    /// The adapter dropout the forward ran with (its seed and offset), which
    /// the matching backward regenerates the mask from.
    dropout: Dropout,
}

impl ForwardCtx {
    /// An empty context, for [`SingLoraLinear::forward_into`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Token rows of the forward.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The saved `S`, if the adapter ran.
    pub fn s(&self) -> Option<&CudaSlice<f32>> {
        self.s.as_ref().filter(|_| self.ran)
    }

    /// The adapter dropout of the forward ([`Dropout::NONE`] in eval mode
    /// or without dropout).
    pub fn dropout(&self) -> Dropout {
        self.dropout
    }
}

/// A SingLoRA linear layer: `y = x·W0ᵀ + s·(x·A[:d_in])·A[:d_out]ᵀ` with
/// `s = (alpha / rank)·u(step)`.
///
/// Adapter dropout ([`with_dropout`](Self::with_dropout)): in training mode
/// (the default; [`DropoutSchedule::set_training`] through [`dropout_mut`](Self::dropout_mut)) the adapter sees
/// `drop(x)` (`y = x·W0ᵀ + s·(drop(x)·A_in)·A_outᵀ`, PEFT's
/// `lora_dropout`), with a fresh mask per forward: the layer's dropout
/// offset advances once per training-mode forward that runs the adapter,
/// and the [`ForwardCtx`] keeps the (seed, offset) pair for the matching
/// backward. Eval mode runs without dropout.
///
/// ```no_run
/// # fn main() -> singlora::Result<()> {
/// use half::bf16;
/// use singlora::{open_device, AdamW, SingLoraLinear};
///
/// let ctx = open_device(0)?;
/// let stream = ctx.default_stream();
/// let (tokens, d_in, d_out) = (16, 4096, 4096);
/// let w0 = stream.alloc_zeros::<bf16>(d_out * d_in)?; // the frozen weight
/// let mut layer = SingLoraLinear::<bf16>::new(&stream, d_in, d_out, 16, 16.0, 100, 42)?
///     .with_frozen(w0)?;
/// let x = stream.alloc_zeros::<bf16>(tokens * d_in)?;
/// let mut y = stream.alloc_zeros::<bf16>(tokens * d_out)?;
/// let saved = layer.forward(tokens, &x, &mut y)?;         // y = x·W0ᵀ + adapter
/// let g = stream.alloc_zeros::<bf16>(tokens * d_out)?;     // ∂L/∂y
/// layer.backward(&saved, &x, &g, None, false)?;           // dA into layer.grad()
/// layer.adamw_step(&AdamW::default(), 1.0)?;              // A updated, step += 1
/// # Ok(()) }
/// ```
pub struct SingLoraLinear<T: DType> {
    stream: Arc<CudaStream>,
    dims: Dims,
    ramp: Ramp,
    /// Optimizer steps taken (one u64 on the device): the kernels derive the
    /// scale and AdamW its bias corrections from it, and AdamW advances it,
    /// so no host read is needed and a captured step replays correctly.
    step: CudaSlice<u64>,
    a: CudaSlice<T>,
    /// f32 master weights for 16-bit `T` (AdamW updates these and rounds).
    master: Option<CudaSlice<f32>>,
    grad: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    workspace: Option<CudaSlice<f32>>,
    frozen: Option<Frozen<T>>,
    /// Adapter dropout: probability, seed, offset, training or eval mode.
    dropout: DropoutSchedule,
    /// The kernels its forward and backward ask for.
    forward_kernel: ForwardKernel,
    backward_kernel: BackwardKernel,
}

impl<T: DType> SingLoraLinear<T>
where
    CudaBlas: Gemm<T>,
{
    /// A layer for `d_in → d_out` with adapter `rank`, `alpha` and a ramp of
    /// `warmup_steps` optimizer steps (0: no ramp), on `stream`.
    ///
    /// `A` is initialised like `torch.nn.init.kaiming_uniform_(a=√5)` with
    /// fan-in `D` — uniform in `±1/√D` — from `seed` (never zero: the ramp's
    /// `u(0) = 0` is what makes the adapted layer start equal to the frozen
    /// one). `D = max(d_in, d_out)`. `seed` is also the dropout mask's
    /// seed until [`DropoutSchedule::set_seed`].
    pub fn new(
        stream: &Arc<CudaStream>,
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        warmup_steps: u64,
        seed: u64,
    ) -> Result<Self> {
        let dims = Dims::new(0, d_in, d_out, rank)?;
        if !alpha.is_finite() {
            return Err(Error::invalid("alpha", "a finite number", alpha));
        }
        let init = kaiming_uniform::<T>(dims.d(), rank, seed);
        let a = stream.clone_htod(&init)?;
        let master = if std::mem::size_of::<T>() < 4 {
            let m: Vec<f32> = init.iter().map(|v| v.to_f64() as f32).collect();
            Some(stream.clone_htod(&m)?)
        } else {
            None
        };
        let n = dims.a_len();
        Ok(Self {
            stream: stream.clone(),
            dims,
            ramp: Ramp {
                alpha,
                rank,
                warmup_steps,
            },
            step: stream.alloc_zeros(1)?,
            a,
            master,
            grad: stream.alloc_zeros(n)?,
            m: stream.alloc_zeros(n)?,
            v: stream.alloc_zeros(n)?,
            workspace: None,
            frozen: None,
            dropout: DropoutSchedule::new(seed),
            forward_kernel: ForwardKernel::default(),
            backward_kernel: BackwardKernel::default(),
        })
    }

    /// The kernels the layer's forward and backward ask for (the defaults:
    /// [`ForwardKernel::Portable`], [`BackwardKernel::Split`]); the opt-in
    /// sm_90a ones run where they apply, the defaults elsewhere.
    pub fn with_kernels(mut self, forward: ForwardKernel, backward: BackwardKernel) -> Self {
        self.forward_kernel = forward;
        self.backward_kernel = backward;
        self
    }

    /// The kernels asked for, forward and backward.
    pub fn kernels(&self) -> (ForwardKernel, BackwardKernel) {
        (self.forward_kernel, self.backward_kernel)
    }

    /// Adapter dropout with probability `p` in `[0, 1)` (0: none) in
    /// training mode.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `p` outside `[0, 1)` or not finite.
    pub fn with_dropout(mut self, p: f64) -> Result<Self> {
        self.dropout.set_p(p)?;
        Ok(self)
    }

    /// The layer's dropout: its probability, seed, offset and mode.
    pub fn dropout(&self) -> &DropoutSchedule {
        &self.dropout
    }

    /// The layer's dropout, to change: [`DropoutSchedule::set_p`],
    /// [`set_seed`](DropoutSchedule::set_seed) (resuming a run),
    /// [`set_training`](DropoutSchedule::set_training) (eval mode: none).
    pub fn dropout_mut(&mut self) -> &mut DropoutSchedule {
        &mut self.dropout
    }

    /// Gives the layer its frozen base weight `W0` (`d_out × d_in`,
    /// row-major, on the layer's stream's context): forward then computes
    /// `x·W0ᵀ` with cuBLAS before adding the adapter, backward adds `g·W0`
    /// to `dX`, and [`merge`](Self::merge) becomes available.
    pub fn with_frozen(mut self, w0: CudaSlice<T>) -> Result<Self> {
        check_len("w0", w0.len(), self.dims.d_out() * self.dims.d_in())?;
        let blas = CudaBlas::new(self.stream.clone())?;
        self.frozen = Some(Frozen {
            w0,
            blas,
            merged: None,
        });
        Ok(self)
    }

    /// Replaces `A` (and the master copy) with `a` (`D × rank`, row-major),
    /// e.g. to load a checkpoint. Refused while merged: `unmerge` must
    /// subtract the product that was added.
    pub fn set_a(&mut self, a: &[T]) -> Result<()> {
        if self.is_merged() {
            return Err(merged_refusal(
                "an unmerged layer (call unmerge before replacing A)",
            ));
        }
        check_len("a", a.len(), self.dims.a_len())?;
        let a = &a[..self.dims.a_len()];
        self.stream.memcpy_htod(a, &mut self.a)?;
        if let Some(master) = &mut self.master {
            let m: Vec<f32> = a.iter().map(|v| v.to_f64() as f32).collect();
            self.stream.memcpy_htod(&m, master)?;
        }
        Ok(())
    }

    /// `s = (alpha / rank)·u(step)` at the current optimizer step (reads the
    /// device step: synchronises the layer's stream).
    pub fn scale(&self) -> Result<f32> {
        Ok(self.ramp.scale(self.step_count()?))
    }

    /// The scale as the kernels read it: from the device step, through the
    /// ramp (bitwise [`scale`](Self::scale)).
    pub fn device_scale(&self) -> Scale<'_> {
        self.ramp.on_device(&self.step)
    }

    /// Advances the ramp by one **optimizer step**. Call it once per
    /// optimizer update, never per forward: with gradient accumulation
    /// several forwards share a step. [`adamw_step`](Self::adamw_step) calls
    /// it for you.
    pub fn step(&mut self) -> Result<()> {
        advance_step(&self.stream, &mut self.step)
    }

    /// Optimizer steps taken so far (reads the device counter:
    /// synchronises the layer's stream; the kernels never need this).
    pub fn step_count(&self) -> Result<u64> {
        Ok(self.stream.clone_dtoh(&self.step)?[0])
    }

    /// The device step counter (one u64), for a caller's own kernels or a
    /// [`Scale::Ramp`] of its own.
    pub fn step_counter(&self) -> &CudaSlice<u64> {
        &self.step
    }

    /// The ramp (alpha, rank, warm-up).
    pub fn ramp(&self) -> Ramp {
        self.ramp
    }

    /// The layer's dimensions (`tokens` is 0).
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// The adapter `A` (`D × rank`).
    pub fn a(&self) -> &CudaSlice<T> {
        &self.a
    }

    /// The f32 gradient `dA` of the last [`backward`](Self::backward) calls.
    pub fn grad(&self) -> &CudaSlice<f32> {
        &self.grad
    }

    /// The frozen weight, if the layer has one.
    pub fn frozen(&self) -> Option<&CudaSlice<T>> {
        self.frozen.as_ref().map(|f| &f.w0)
    }

    /// The adapter is currently folded into `W0`.
    pub fn is_merged(&self) -> bool {
        self.frozen.as_ref().is_some_and(|f| f.merged.is_some())
    }

    /// The stream the layer enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Forward over `tokens` contiguous rows: with a frozen `W0`,
    /// `y = x·W0ᵀ` (cuBLAS) then `y += s·S·A_outᵀ`; without one, the adapter
    /// is added onto `y`, which must hold the caller's frozen layer output.
    /// When merged, `y = x·W0ᵀ` alone (the adapter is inside `W0`).
    ///
    /// Returns the context [`backward`](Self::backward) needs (`S` and the
    /// dropout's seed and offset); the scale is read from the device step
    /// when the kernels run.
    pub fn forward(
        &self,
        tokens: usize,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<ForwardCtx> {
        let mut ctx = ForwardCtx::new();
        self.forward_into(&mut ctx, tokens, x, y)?;
        Ok(ctx)
    }

    /// [`forward`](Self::forward) into a context kept from an earlier call:
    /// its S buffer is reused when it is large enough, so once warmed up the
    /// call allocates nothing, synchronises nothing and reads nothing back
    /// (it can be captured in a CUDA graph; with dropout the captured
    /// launch keeps the offset it was captured with, so every replay draws
    /// the same mask).
    pub fn forward_into(
        &self,
        ctx: &mut ForwardCtx,
        tokens: usize,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let dims = self.dims.with_tokens(tokens)?;
        check_len("x", x.len(), tokens * dims.d_in())?;
        check_len("y", y.len(), tokens * dims.d_out())?;
        ctx.tokens = tokens;
        ctx.ran = false;
        ctx.dropout = Dropout::NONE;
        if tokens == 0 {
            return Ok(());
        }
        let merged = self.is_merged();
        if !merged {
            // Look the kernels up before cuBLAS writes y: a device that
            // cannot run them refuses the call with y untouched.
            forward_kernels::<T>(&*Kernels::for_stream(&self.stream)?, dims.rank())?;
        }
        // Drawn (and checked) before cuBLAS writes y; a merged forward runs
        // no adapter and consumes no offset.
        let dropout = if merged {
            Dropout::NONE
        } else {
            self.dropout.next(self.dropout.is_training())?
        };
        dropout.check_tokens(tokens)?;
        if let Some(f) = &self.frozen {
            f.apply(Product::Forward, &dims, x, y)?;
            if merged {
                return Ok(());
            }
        }
        if ctx.s.as_ref().map_or(true, |s| s.len() < dims.s_len()) {
            // SAFETY of the allocation: the forward writes every element of
            // S that the backward reads (the first tokens × rank).
            ctx.s = Some(unsafe { self.stream.alloc::<f32>(dims.s_len())? });
        }
        let s = ctx.s.as_mut().expect("allocated above");
        forward(
            &self.stream,
            &dims,
            x,
            dims.d_in(),
            &self.a,
            y,
            dims.d_out(),
            Some(s),
            self.device_scale(),
            1.0,
            ForwardOptions {
                dropout,
                kernel: self.forward_kernel,
            },
        )?;
        ctx.ran = true;
        ctx.dropout = dropout;
        Ok(())
    }

    /// Backward of the [`forward`](Self::forward) that returned `ctx`, for
    /// the upstream gradient `g` (`tokens × d_out`) and the same `x`.
    ///
    /// * [`grad()`](Self::grad) (f32 `dA`) ← `s·(Gᵀ·S + Xᵀ·Q)`, added to
    ///   what it holds when `accumulate` (micro-batches of one step).
    /// * `dx` (`tokens × d_in`), if given: with a frozen `W0` it is set to
    ///   `g·W0 + s·Q·A_inᵀ`; without one the adapter term is added onto
    ///   `dx`, which must hold the caller's frozen-path gradient.
    ///
    /// The forward's dropout (kept in `ctx`) applies: dA's `Xᵀ·Q` term uses
    /// `drop(x)` and dX's adapter term is masked the same way.
    ///
    /// Refused (nothing written) while merged: unmerge before training.
    pub fn backward(
        &mut self,
        ctx: &ForwardCtx,
        x: &impl DevicePtr<T>,
        g: &impl DevicePtr<T>,
        dx: Option<&mut CudaSlice<T>>,
        accumulate: bool,
    ) -> Result<()> {
        let dims = self.dims.with_tokens(ctx.tokens)?;
        let Some(s) = ctx.s() else {
            return Err(Error::invalid(
                "ctx",
                "the context of an unmerged forward with tokens > 0",
                if ctx.tokens == 0 {
                    "a forward of 0 tokens"
                } else {
                    "a forward that ran merged"
                },
            ));
        };
        if self.is_merged() {
            return Err(merged_refusal(
                "an unmerged layer (call unmerge before training)",
            ));
        }
        check_len("x", x.len(), dims.tokens() * dims.d_in())?;
        check_len("g", g.len(), dims.tokens() * dims.d_out())?;
        if let Some(dx) = &dx {
            check_len("dx", dx.len(), dims.tokens() * dims.d_in())?;
        }
        // Before cuBLAS writes dx: a refused call touches no output.
        backward_kernels::<T>(&*Kernels::for_stream(&self.stream)?, dims.rank())?;
        let ws_len = backward_workspace_len(&dims, true)?;
        if self.workspace.as_ref().map_or(true, |w| w.len() < ws_len) {
            // SAFETY of the allocation: the backward writes every workspace
            // element it reads.
            self.workspace = Some(unsafe { self.stream.alloc::<f32>(ws_len)? });
        }
        let workspace = self.workspace.as_mut().expect("allocated above");
        let mut dx = dx;
        if let (Some(f), Some(dx)) = (&self.frozen, dx.as_deref_mut()) {
            f.apply(Product::BackwardDx, &dims, g, dx)?;
        }
        // The adapter term is added onto dx: the frozen path's gradient is
        // already there (from the GEMM above, or from the caller).
        let dx_out = dx.map(|dx| DxOut {
            dx,
            ld_dx: dims.d_in(),
            beta: 1.0,
        });
        backward(
            &self.stream,
            &dims,
            x,
            dims.d_in(),
            g,
            dims.d_out(),
            &self.a,
            Some(s),
            self.ramp.on_device(&self.step),
            dx_out,
            &mut self.grad,
            if accumulate { 1.0 } else { 0.0 },
            workspace,
            BackwardOptions {
                dropout: ctx.dropout,
                kernel: self.backward_kernel,
            },
        )
    }

    /// One AdamW update of `A` from [`grad()`](Self::grad) scaled by
    /// `grad_scale` (e.g. 1 / micro-batches), then [`step`](Self::step).
    /// The AdamW bias correction uses the 1-based step `step_count() + 1`.
    pub fn adamw_step(&mut self, cfg: &AdamW, grad_scale: f32) -> Result<()> {
        if self.is_merged() {
            return Err(merged_refusal(
                "an unmerged layer (call unmerge before training)",
            ));
        }
        adamw_device_step(
            &self.stream,
            cfg,
            &mut self.step,
            &mut self.a,
            &self.grad,
            grad_scale,
            AdamWState::from_slices(&mut self.m, &mut self.v, self.master.as_mut()),
        )
    }

    /// Folds the adapter into `W0` in place with the current scale
    /// (`W0 += s·A_out·A_inᵀ`), for inference: forward then runs `x·W0ᵀ`
    /// alone. Needs a frozen `W0`; refused if already merged.
    pub fn merge(&mut self) -> Result<()> {
        let scale = self.scale()?;
        let dims = self.dims;
        let f = self.frozen.as_mut().ok_or_else(|| no_frozen("merge"))?;
        if f.merged.is_some() {
            return Err(merged_refusal("an unmerged layer"));
        }
        merge(&self.stream, &dims, &mut f.w0, dims.d_in(), &self.a, scale)?;
        f.merged = Some(scale);
        Ok(())
    }

    /// Takes the adapter back out of `W0` with the scale it was merged with
    /// (to within one rounding per element). Refused if not merged.
    pub fn unmerge(&mut self) -> Result<()> {
        let dims = self.dims;
        let f = self.frozen.as_mut().ok_or_else(|| no_frozen("unmerge"))?;
        let Some(scale) = f.merged else {
            return Err(Error::invalid("self", "a merged layer", "unmerged"));
        };
        unmerge(&self.stream, &dims, &mut f.w0, dims.d_in(), &self.a, scale)?;
        f.merged = None;
        Ok(())
    }
}

/// The refusal of an operation that needs the adapter out of `W0`.
fn merged_refusal(expected: &'static str) -> Error {
    Error::invalid("self", expected, "merged")
}

fn no_frozen(op: &'static str) -> Error {
    Error::invalid(
        "self",
        "a layer with a frozen W0 (with_frozen)",
        format!("no W0 to {op} into"),
    )
}
