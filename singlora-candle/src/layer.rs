//! SingLoraLinear: a candle `Module` over a frozen weight, with `A` a `Var`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use half::{bf16, f16};
use singlora::{kaiming_uniform, DropoutSchedule, Ramp};

use crate::checks::{check_float, refuse, wrap, Geometry};
use crate::merge::MergeOp;
use crate::op::singlora_linear_dropout;
use crate::optim::register_counter;

/// The adapter's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SingLoraConfig {
    /// 1..=256.
    pub rank: usize,
    /// `s = (alpha / rank)·u(t)`.
    pub alpha: f64,
    /// The ramp's length `T` in optimizer steps (0: no ramp, `u = 1`).
    pub warmup_steps: u64,
    /// Seed of `A`'s initialisation (Kaiming-uniform in `±1/√D`, never zero;
    /// the same values as singlora's own layer for the same seed).
    pub seed: u64,
}

impl Default for SingLoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            warmup_steps: 100,
            seed: 0,
        }
    }
}

/// A SingLoRA linear layer for candle:
/// `y = x·W0ᵀ + s·(x·A[:d_in])·A[:d_out]ᵀ [+ bias]` with
/// `s = (alpha/rank)·min(t/T, 1)`.
///
/// * `W0` (`d_out × d_in`, candle's / PyTorch's `Linear` orientation) and the
///   bias are frozen: no gradient flows to them.
/// * `A` (`D × rank`, `D = max(d_in, d_out)`) is a [`Var`] in `W0`'s dtype,
///   on `W0`'s device: give [`vars`](Self::vars) to an optimizer.
/// * `t` counts **optimizer steps**: [`crate::FusedAdamW`] advances it on
///   every step that updates this layer's `A`; with another optimizer call
///   [`step`](Self::step) once per optimizer step. Forwards never advance
///   it, so gradient accumulation keeps the ramp on schedule.
/// * [`merge`](Self::merge) folds the adapter into `W0` (in place) for
///   inference; the forward is then the plain `x·W0ᵀ`.
/// * Adapter dropout ([`with_dropout`](Self::with_dropout), PEFT's
///   `lora_dropout`): in training mode the adapter sees
///   `drop(x) = M ⊙ x / (1 − p)`, the frozen path `x`. candle has no global
///   training flag: [`forward_t`](Self::forward_t)`(x, train)` chooses per
///   call (candle_nn's `ModuleT` convention), and [`Module::forward`] uses
///   the layer's mode ([`DropoutSchedule::set_training`], training by
///   default). Every training-mode forward that runs the adapter draws a
///   fresh mask: it takes the layer's dropout offset and advances it by
///   one, and the graph node keeps that `(seed, offset)` pair for its
///   backward. Eval mode, and a merged layer, run without dropout and
///   consume no offset. `p = 0` (the default) is bitwise the undropped op.
pub struct SingLoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    a: Var,
    geo: Geometry,
    ramp: Ramp,
    steps: Arc<AtomicU64>,
    /// `Some(scale)` while the adapter is folded into `weight`.
    merged: Option<f32>,
    /// Adapter dropout: probability, seed, offset, training or eval mode.
    dropout: DropoutSchedule,
}

impl SingLoraLinear {
    /// A layer over the frozen `weight` (`d_out × d_in`, f32/f16/bf16) and
    /// optional `bias` (`d_out`), with a fresh `A` from `cfg.seed`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: SingLoraConfig) -> Result<Self> {
        let (d_out, d_in) = weight_dims(&weight)?;
        let geo = Geometry {
            d_in,
            d_out,
            rank: cfg.rank,
        };
        geo.dims(0)?;
        let d = geo.d();
        let dev = weight.device();
        let a = match weight.dtype() {
            DType::F32 => init::<f32>(d, cfg.rank, cfg.seed, dev)?,
            DType::F16 => init::<f16>(d, cfg.rank, cfg.seed, dev)?,
            DType::BF16 => init::<bf16>(d, cfg.rank, cfg.seed, dev)?,
            other => {
                return Err(refuse(
                    "weight",
                    "an f32, f16 or bf16 tensor",
                    format!("{other:?}"),
                ))
            }
        };
        let mut layer = Self::with_a(
            weight,
            bias,
            Var::from_tensor(&a)?,
            cfg.alpha,
            cfg.warmup_steps,
        )?;
        layer.dropout.set_seed(cfg.seed, 0);
        Ok(layer)
    }

    /// [`new`](Self::new) over a candle [`candle_nn::Linear`]'s weight and
    /// bias (shared: merging changes that layer's weight too).
    pub fn from_linear(linear: &candle_nn::Linear, cfg: SingLoraConfig) -> Result<Self> {
        Self::new(linear.weight().clone(), linear.bias().cloned(), cfg)
    }

    /// A layer with a given `A` (`D × rank`, `weight`'s dtype and device),
    /// e.g. one loaded from a checkpoint. Its dropout seed is 0 (see
    /// [`DropoutSchedule::set_seed`]).
    pub fn with_a(
        weight: Tensor,
        bias: Option<Tensor>,
        a: Var,
        alpha: f64,
        warmup_steps: u64,
    ) -> Result<Self> {
        let (d_out, d_in) = weight_dims(&weight)?;
        check_float("weight", weight.dtype())?;
        let rank = match a.dims() {
            [_, rank] => *rank,
            other => {
                return Err(refuse(
                    "a",
                    "a 2-D tensor (D, rank)",
                    format!("shape {other:?}"),
                ))
            }
        };
        let geo = Geometry { d_in, d_out, rank };
        geo.dims(0)?;
        if a.dims() != [geo.d(), rank] {
            return Err(refuse(
                "a",
                format!("shape [{}, {rank}] (D = max(d_in, d_out), rank)", geo.d()),
                format!("shape {:?}", a.dims()),
            ));
        }
        if a.dtype() != weight.dtype() {
            return Err(refuse(
                "a",
                format!("weight's dtype {:?}", weight.dtype()),
                format!("{:?}", a.dtype()),
            ));
        }
        if !a.device().same_device(weight.device()) {
            return Err(refuse(
                "a",
                "a tensor on weight's device",
                format!("{:?}", a.device().location()),
            ));
        }
        if let Some(b) = &bias {
            if b.dims() != [d_out] {
                return Err(refuse(
                    "bias",
                    format!("shape [{d_out}]"),
                    format!("shape {:?}", b.dims()),
                ));
            }
        }
        if !alpha.is_finite() {
            return Err(refuse("alpha", "a finite number", alpha));
        }
        let ramp = Ramp {
            alpha,
            rank,
            warmup_steps,
        };
        let steps = Arc::new(AtomicU64::new(0));
        register_counter(a.as_tensor(), &steps);
        Ok(Self {
            // Frozen: detached, so no gradient is tracked through it.
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            a,
            geo,
            ramp,
            steps,
            merged: None,
            dropout: DropoutSchedule::new(0),
        })
    }

    /// Adapter dropout with probability `p` in `[0, 1)` (0: none) in
    /// training mode. The mask's seed is the layer's `cfg.seed` (0 for
    /// [`with_a`](Self::with_a)) until
    /// [`DropoutSchedule::set_seed`].
    ///
    /// # Errors
    /// A refusal naming `p` when it is outside `[0, 1)` or not finite.
    pub fn with_dropout(mut self, p: f64) -> Result<Self> {
        self.dropout.set_p(p).map_err(wrap)?;
        Ok(self)
    }

    /// The layer's dropout: its probability, seed, offset and mode (the
    /// mode [`Module::forward`] uses).
    pub fn dropout(&self) -> &DropoutSchedule {
        &self.dropout
    }

    /// The layer's dropout, to change: [`DropoutSchedule::set_p`] (refused,
    /// naming `p`, outside `[0, 1)`), [`set_seed`](DropoutSchedule::set_seed),
    /// [`set_training`](DropoutSchedule::set_training).
    pub fn dropout_mut(&mut self) -> &mut DropoutSchedule {
        &mut self.dropout
    }

    /// The forward in training (`train`: with dropout, a fresh mask) or
    /// eval mode, whatever [`DropoutSchedule::set_training`] says (the
    /// convention of candle_nn's `ModuleT`; the `ModuleT` that candle
    /// derives from [`Module`] ignores `train`, so call this one).
    /// `x` is `(…, d_in)` in the layer's dtype; the result `(…, d_out)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            return Err(refuse(
                "x",
                format!("the layer's dtype {:?}", self.weight.dtype()),
                format!("{:?}", x.dtype()),
            ));
        }
        let y = if self.merged.is_some() {
            // The adapter is inside W0: candle's plain linear (no dropout,
            // no offset consumed).
            candle_nn::Linear::new(self.weight.clone(), None).forward(x)?
        } else {
            let (a, w, scale) = (self.a.as_tensor(), &self.weight, self.scale());
            let dropout = self.dropout.next(train).map_err(wrap)?;
            singlora_linear_dropout(x, a, w, scale, dropout).inspect_err(|_| {
                // A refused training forward consumes no offset (an eval
                // forward took none).
                if train {
                    self.dropout.give_back(dropout)
                }
            })?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The trained parameter `A` (`D × rank`).
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// The variables to optimise: `[A]`.
    pub fn vars(&self) -> Vec<Var> {
        vec![self.a.clone()]
    }

    /// The frozen weight `W0` (holding the adapter while merged).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(d_in, d_out, rank)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.geo.d_in, self.geo.d_out, self.geo.rank)
    }

    pub fn ramp(&self) -> Ramp {
        self.ramp
    }

    /// Optimizer steps taken (`t` of the ramp).
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Advances the ramp by one optimizer step (for optimizers other than
    /// [`crate::FusedAdamW`], which does it itself).
    pub fn step(&self) {
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the step count (resuming from a checkpoint).
    pub fn set_steps(&self, t: u64) {
        self.steps.store(t, Ordering::Relaxed);
    }

    /// The current scale `s = (alpha/rank)·u(t)`.
    pub fn scale(&self) -> f32 {
        self.ramp.scale(self.steps())
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Folds the adapter into the frozen weight in place with the current
    /// scale (`W0 += s·A_out·A_inᵀ`); the forward is then `x·W0ᵀ` alone.
    /// Refused if already merged.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged.is_some() {
            return Err(refuse("self", "an unmerged layer", "merged"));
        }
        let scale = self.scale();
        self.fold(scale, false)?;
        self.merged = Some(scale);
        Ok(())
    }

    /// Takes the adapter back out with the scale it was merged with (to
    /// within one rounding per element). Refused if not merged.
    pub fn unmerge(&mut self) -> Result<()> {
        let Some(scale) = self.merged else {
            return Err(refuse("self", "a merged layer", "unmerged"));
        };
        self.fold(scale, true)?;
        self.merged = None;
        Ok(())
    }

    fn fold(&self, scale: f32, undo: bool) -> Result<()> {
        let op = MergeOp {
            geo: self.geo,
            scale,
            undo,
        };
        self.weight.inplace_op2(self.a.as_tensor(), &op)
    }
}

impl Module for SingLoraLinear {
    /// [`forward_t`](SingLoraLinear::forward_t) in the layer's mode
    /// ([`DropoutSchedule::is_training`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, self.dropout.is_training())
    }
}

/// `(d_out, d_in)` of a 2-D weight.
fn weight_dims(w: &Tensor) -> Result<(usize, usize)> {
    match w.dims() {
        [d_out, d_in] => Ok((*d_out, *d_in)),
        other => Err(refuse(
            "weight",
            "a 2-D tensor (d_out, d_in)",
            format!("shape {other:?}"),
        )),
    }
}

/// singlora's Kaiming-uniform `A` as a tensor on `dev`.
fn init<T>(d: usize, rank: usize, seed: u64, dev: &Device) -> Result<Tensor>
where
    T: singlora::DType + candle_core::WithDType,
{
    let host = kaiming_uniform::<T>(d, rank, seed);
    Tensor::from_vec(host, (d, rank), dev)
}

#[cfg(test)]
#[test]
fn layer_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<SingLoraLinear>();
}
