//! The candle backend of the fine-tuning task (examples/finetune/task.rs of
//! the singlora crate: the same config, data and loop): a
//! [`SingLoraLinear`] over the frozen W0, an MSE loss written with candle
//! ops, candle's autograd for the backward, and [`FusedAdamW`].
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Optimizer;
use singlora::AdamW;
use singlora_candle::{singlora_linear, FusedAdamW, SingLoraConfig, SingLoraLinear};

use crate::task::{Backend, Config, Data};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The task on candle, on `device` in `dtype`.
pub struct Candle {
    name: String,
    layer: SingLoraLinear,
    opt: FusedAdamW,
    x: Vec<Tensor>,
    targets: Vec<Tensor>,
    /// The loss is multiplied by this before the backward (f16: so that
    /// ∂L/∂y is the plain difference and cannot underflow), and the
    /// optimizer divides the gradients by it again.
    loss_scale: f64,
    batches: usize,
}

fn tensor(v: &[f64], shape: (usize, usize), dev: &Device, dtype: DType) -> Result<Tensor, String> {
    let host: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(host, shape, dev)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(err)
}

impl Candle {
    pub fn new(cfg: &Config, device: Device, dtype: DType) -> Result<Self, String> {
        let data = Data::new(cfg);
        let (d, r) = (cfg.d, cfg.rank);
        let w0 = tensor(&data.w0, (d, d), &device, dtype)?;
        // The teacher: the same W0 and the hidden adapter at full scale,
        // through the same op (no gradient is asked of it).
        let a_t = tensor(&data.a_teacher, (d, r), &device, dtype)?;
        let s_t = Data::teacher_scale(cfg) as f32;
        let mut x = Vec::new();
        let mut targets = Vec::new();
        for xb in &data.x {
            let xt = tensor(xb, (cfg.tokens, d), &device, dtype)?;
            targets.push(singlora_linear(&xt, &a_t, &w0, s_t).map_err(err)?);
            x.push(xt);
        }
        let layer = SingLoraLinear::new(
            w0,
            None,
            SingLoraConfig {
                rank: r,
                alpha: cfg.alpha,
                warmup_steps: cfg.warmup,
                seed: cfg.seed ^ 0x5eed,
            },
        )
        .map_err(err)?;
        let mut opt = FusedAdamW::new(layer.vars(), cfg.adamw(0)).map_err(err)?;
        let loss_scale = if dtype == DType::F16 {
            (cfg.tokens * d) as f64 / 2.0
        } else {
            1.0
        };
        opt.set_grad_scale((1.0 / loss_scale) as f32).map_err(err)?;
        let where_ = match &device {
            Device::Cpu => "CPU".to_string(),
            other => format!("{:?}", other.location()),
        };
        Ok(Self {
            name: format!("candle on {where_} ({dtype:?}, candle autograd + singlora-candle)"),
            layer,
            opt,
            x,
            targets,
            loss_scale,
            batches: cfg.batches,
        })
    }

    /// MSE of the layer's output on batch `b` against the teacher, in f32.
    fn loss(&self, b: usize) -> candle_core::Result<Tensor> {
        let y = self.layer.forward(&self.x[b])?.to_dtype(DType::F32)?;
        let t = self.targets[b].to_dtype(DType::F32)?;
        (y - t)?.sqr()?.mean_all()
    }

    pub fn layer(&self) -> &SingLoraLinear {
        &self.layer
    }
}

impl Backend for Candle {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn train_step(&mut self, batch: usize, adamw: &AdamW) -> Result<f64, String> {
        self.opt.set_config(*adamw);
        let loss = self.loss(batch).map_err(err)?;
        let scaled = (&loss * self.loss_scale).map_err(err)?;
        // candle's autograd; the optimizer step also advances the ramp.
        self.opt.backward_step(&scaled).map_err(err)?;
        loss.to_scalar::<f32>().map(f64::from).map_err(err)
    }

    fn finish(&mut self) -> Result<(f64, f64), String> {
        let held = self.batches;
        let loss = self
            .loss(held)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(err)?;
        let x = &self.x[held];
        let flat = |t: Tensor| -> Result<Vec<f64>, String> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(err)
        };
        let adapter = flat(self.layer.forward(x).map_err(err)?)?;
        self.layer.merge().map_err(err)?;
        let merged = flat(self.layer.forward(x).map_err(err)?)?;
        Ok((
            loss as f64,
            singlora::reference::relative_l2(&merged, &adapter),
        ))
    }
}
