//! The fine-tuning task of examples/finetune: recover a hidden teacher.
//!
//! A frozen random base layer `W0` (d × d) plus a hidden "teacher" SingLoRA
//! update `s_t·A_t·A_tᵀ` produce the targets; a fresh adapter (random A,
//! ramp from u(0) = 0) is trained with the fused forward/backward and AdamW
//! to reproduce the teacher's outputs, under an MSE loss. At the end the
//! trained adapter is merged into W0 and the merged layer's plain product is
//! compared with the adapter's outputs.
//!
//! Two backends run the same loop: the GPU (the crate's kernels and
//! [`SingLoraLinear`]) and the CPU (the f64 reference). tests/finetune.rs
//! includes this file to check that the loss falls on whichever exists.
#![allow(dead_code)]

use std::time::Instant;

use singlora::{reference, AdamW, Dims, Ramp};

/// What to train.
#[derive(Clone, Debug)]
pub struct Config {
    pub d: usize,
    pub rank: usize,
    /// Token rows per step.
    pub tokens: usize,
    pub steps: usize,
    /// Training batches cycled through (plus one held out for evaluation).
    pub batches: usize,
    pub alpha: f64,
    /// Ramp length T in optimizer steps.
    pub warmup: u64,
    /// Peak AdamW learning rate (cosine decay to 1 % of it).
    pub lr: f32,
    pub seed: u64,
}

impl Config {
    /// The CPU fallback's size: the same loop, small enough for the f64
    /// reference (about a second).
    pub fn small() -> Self {
        Self {
            d: 64,
            rank: 4,
            tokens: 256,
            steps: 400,
            batches: 4,
            alpha: 4.0,
            warmup: 10,
            lr: 2e-2,
            seed: 7,
        }
    }

    /// The GPU's realistic size (d = 4096, bf16 by default).
    pub fn large() -> Self {
        Self {
            d: 4096,
            rank: 16,
            tokens: 4096,
            steps: 400,
            batches: 4,
            alpha: 16.0,
            warmup: 10,
            lr: 5e-3,
            seed: 7,
        }
    }

    /// The learning rate at step `t` (0-based): cosine from `lr` to `lr/100`.
    pub fn lr_at(&self, t: usize) -> f32 {
        let p = t as f64 / self.steps.max(1) as f64;
        let lo = 0.01;
        (self.lr as f64 * (lo + (1.0 - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))) as f32
    }

    pub fn ramp(&self) -> Ramp {
        Ramp {
            alpha: self.alpha,
            rank: self.rank,
            warmup_steps: self.warmup,
        }
    }

    /// AdamW without weight decay: decay would pull A off the teacher.
    pub fn adamw(&self, t: usize) -> AdamW {
        AdamW {
            lr: self.lr_at(t),
            weight_decay: 0.0,
            ..AdamW::default()
        }
    }
}

/// The task's data, generated on the host from the seed.
pub struct Data {
    /// d × d, std 1/√d, so base outputs have unit scale.
    pub w0: Vec<f64>,
    /// The teacher's A (d × rank): its update moves outputs by about 0.5 RMS.
    pub a_teacher: Vec<f64>,
    /// `batches + 1` inputs of `tokens × d`, N(0, 1); the last is held out.
    pub x: Vec<Vec<f64>>,
}

/// A normal stream from the crate's SplitMix64 (the generator A is
/// initialised from) + Box–Muller: no dependency, same everywhere.
pub struct Normal(singlora::SplitMix64);

impl Normal {
    pub fn new(seed: u64) -> Self {
        Self(singlora::SplitMix64::new(seed))
    }
    fn uniform(&mut self) -> f64 {
        // The top 53 bits, shifted half a step off zero: (0, 1), so ln(u) is
        // finite.
        ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn sample(&mut self, std: f64) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn vec(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| self.sample(std)).collect()
    }
}

impl Data {
    pub fn new(cfg: &Config) -> Self {
        let mut n = Normal::new(cfg.seed);
        let d = cfg.d;
        let w0 = n.vec(d * d, 1.0 / (d as f64).sqrt());
        // Δy has variance ≈ s_t²·d·rank·σ⁴ for unit inputs; s_t = alpha/rank.
        let s_t = cfg.alpha / cfg.rank as f64;
        let sigma = (0.5 / (s_t * ((d * cfg.rank) as f64).sqrt())).sqrt();
        let a_teacher = n.vec(d * cfg.rank, sigma);
        let x = (0..=cfg.batches)
            .map(|_| n.vec(cfg.tokens * d, 1.0))
            .collect();
        Self { w0, a_teacher, x }
    }

    /// The teacher's scale: alpha / rank, no ramp.
    pub fn teacher_scale(cfg: &Config) -> f64 {
        cfg.alpha / cfg.rank as f64
    }
}

/// One training backend.
pub trait Backend {
    /// "GPU (NVIDIA H200, bf16)" or "CPU reference (f64)".
    fn describe(&self) -> String;
    /// One optimizer step on training batch `batch`: forward, loss,
    /// backward, AdamW (which advances the ramp). Returns the step's loss.
    fn train_step(&mut self, batch: usize, adamw: &AdamW) -> Result<f64, String>;
    /// Loss on the held-out batch; then merges the adapter into W0 and
    /// returns `(held-out loss, relative L2 error of the merged layer's
    /// outputs against the adapter's)`.
    fn finish(&mut self) -> Result<(f64, f64), String>;
}

/// What a run reports.
#[derive(Clone, Debug)]
pub struct Report {
    pub losses: Vec<f64>,
    pub held_out_loss: f64,
    pub merged_error: f64,
    pub tokens_per_s: f64,
    pub seconds: f64,
}

impl Report {
    pub fn first_loss(&self) -> f64 {
        self.losses.first().copied().unwrap_or(f64::NAN)
    }

    /// The best of the last tenth of the steps (the loss of one batch is
    /// noisy at the end).
    pub fn final_loss(&self) -> f64 {
        let n = self.losses.len();
        self.losses[n - (n / 10).max(1)..]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    /// first / final: how many times the loss fell.
    pub fn fall(&self) -> f64 {
        self.first_loss() / self.final_loss()
    }
}

/// Runs the loop; `on_step(step, loss, tokens_per_s)` after every step.
pub fn train(
    backend: &mut dyn Backend,
    cfg: &Config,
    mut on_step: impl FnMut(usize, f64, f64),
) -> Result<Report, String> {
    let start = Instant::now();
    let mut losses = Vec::with_capacity(cfg.steps);
    for t in 0..cfg.steps {
        let loss = backend.train_step(t % cfg.batches, &cfg.adamw(t))?;
        if !loss.is_finite() {
            return Err(format!("step {t}: the loss is {loss}"));
        }
        losses.push(loss);
        let tps = ((t + 1) * cfg.tokens) as f64 / start.elapsed().as_secs_f64();
        on_step(t, loss, tps);
    }
    let seconds = start.elapsed().as_secs_f64();
    let (held_out_loss, merged_error) = backend.finish()?;
    Ok(Report {
        losses,
        held_out_loss,
        merged_error,
        tokens_per_s: (cfg.steps * cfg.tokens) as f64 / seconds,
        seconds,
    })
}

/// `x · W0ᵀ` for row-major `x` (tokens × d) and `W0` (d × d).
fn base_product(x: &[f64], w0: &[f64], tokens: usize, d: usize) -> Vec<f64> {
    let mut y = vec![0.0; tokens * d];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        for (o, wr) in yr.iter_mut().zip(w0.chunks_exact(d)) {
            *o = xr.iter().zip(wr).map(|(p, q)| p * q).sum();
        }
    }
    y
}

/// The CPU backend: the same loop on the f64 reference.
pub struct Cpu {
    cfg: Config,
    dims: Dims,
    data: Data,
    targets: Vec<Vec<f64>>,
    a: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    ramp: Ramp,
    step: u64,
}

impl Cpu {
    pub fn new(cfg: &Config) -> Result<Self, String> {
        let data = Data::new(cfg);
        let dims = Dims::new(cfg.tokens, cfg.d, cfg.d, cfg.rank).map_err(|e| e.to_string())?;
        let s_t = Data::teacher_scale(cfg);
        let targets = data
            .x
            .iter()
            .map(|x| {
                let mut y = base_product(x, &data.w0, cfg.tokens, cfg.d);
                reference::forward(
                    &dims,
                    x,
                    &data.a_teacher,
                    s_t,
                    1.0,
                    &mut y,
                    singlora::Dropout::NONE,
                )
                .map(|_| y)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let a = singlora::kaiming_uniform::<f32>(cfg.d, cfg.rank, cfg.seed ^ 0x5eed)
            .into_iter()
            .map(|v| v as f64)
            .collect();
        let n = dims.a_len();
        Ok(Self {
            cfg: cfg.clone(),
            dims,
            data,
            targets,
            a,
            m: vec![0.0; n],
            v: vec![0.0; n],
            ramp: cfg.ramp(),
            step: 0,
        })
    }

    fn predict(&self, batch: usize) -> Result<(Vec<f64>, f64), String> {
        let x = &self.data.x[batch];
        let scale = self.ramp.scale_f64(self.step);
        let mut y = base_product(x, &self.data.w0, self.cfg.tokens, self.cfg.d);
        reference::forward(
            &self.dims,
            x,
            &self.a,
            scale,
            1.0,
            &mut y,
            singlora::Dropout::NONE,
        )
        .map_err(|e| e.to_string())?;
        Ok((y, scale))
    }
}

impl Backend for Cpu {
    fn describe(&self) -> String {
        "CPU reference (f64)".into()
    }

    fn train_step(&mut self, batch: usize, adamw: &AdamW) -> Result<f64, String> {
        let (y, scale) = self.predict(batch)?;
        let (loss, g) = reference::mse(&y, &self.targets[batch]).map_err(|e| e.to_string())?;
        let mut dx = vec![0.0; self.cfg.tokens * self.cfg.d];
        let mut da = vec![0.0; self.dims.a_len()];
        let x = &self.data.x[batch];
        reference::backward(
            &self.dims,
            x,
            &self.a,
            &g,
            scale,
            0.0,
            &mut dx,
            0.0,
            &mut da,
            singlora::Dropout::NONE,
        )
        .map_err(|e| e.to_string())?;
        self.step += 1;
        reference::adamw(
            adamw,
            self.step,
            &mut self.a,
            &da,
            1.0,
            &mut self.m,
            &mut self.v,
        )
        .map_err(|e| e.to_string())?;
        Ok(loss)
    }

    fn finish(&mut self) -> Result<(f64, f64), String> {
        let held = self.cfg.batches;
        let (y, scale) = self.predict(held)?;
        let (loss, _) = reference::mse(&y, &self.targets[held]).map_err(|e| e.to_string())?;
        let mut merged = self.data.w0.clone();
        reference::merge(&self.dims, &mut merged, self.cfg.d, &self.a, scale)
            .map_err(|e| e.to_string())?;
        let y_merged = base_product(&self.data.x[held], &merged, self.cfg.tokens, self.cfg.d);
        Ok((loss, reference::relative_l2(&y_merged, &y)))
    }
}

/// The GPU backend: [`SingLoraLinear`] with a frozen W0, the fused kernels,
/// the device-side MSE and AdamW. Only the 512 loss partials cross to the
/// host per step.
pub mod gpu {
    use std::sync::Arc;

    use cudarc::cublas::{CudaBlas, Gemm};
    use cudarc::driver::{CudaSlice, CudaStream};
    use singlora::{mse, mse_loss, AdamW, DType, SingLoraLinear, MSE_PARTIALS};

    use super::{Backend, Config, Data};

    pub struct Gpu<T: DType> {
        cfg: Config,
        stream: Arc<CudaStream>,
        name: String,
        layer: SingLoraLinear<T>,
        x: Vec<CudaSlice<T>>,
        targets: Vec<CudaSlice<T>>,
        y: CudaSlice<T>,
        g: CudaSlice<T>,
        partial: CudaSlice<f32>,
        /// mse's gradient is scaled by this (exactly: tokens·d/2, so G is
        /// the plain difference and cannot underflow f16); AdamW undoes it.
        loss_scale: f32,
    }

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    fn upload<T: DType>(stream: &Arc<CudaStream>, v: &[f64]) -> Result<CudaSlice<T>, String> {
        let host: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
        stream.clone_htod(&host).map_err(err)
    }

    impl<T: DType> Gpu<T>
    where
        CudaBlas: Gemm<T>,
    {
        pub fn new(
            stream: &Arc<CudaStream>,
            cfg: &Config,
            device_name: &str,
        ) -> Result<Self, String> {
            let data = Data::new(cfg);
            let (d, r) = (cfg.d, cfg.rank);
            let w0 = upload::<T>(stream, &data.w0)?;
            // The teacher: the same frozen W0 and a hidden adapter at full
            // scale (no ramp), run once per batch to make the targets.
            let mut teacher = SingLoraLinear::<T>::new(stream, d, d, r, cfg.alpha, 0, 0)
                .map_err(err)?
                .with_frozen(w0.clone())
                .map_err(err)?;
            let a_t: Vec<T> = data.a_teacher.iter().map(|&v| T::from_f64(v)).collect();
            teacher.set_a(&a_t).map_err(err)?;
            let mut x = Vec::new();
            let mut targets = Vec::new();
            for xb in &data.x {
                let xd = upload::<T>(stream, xb)?;
                let mut y = stream.alloc_zeros::<T>(cfg.tokens * d).map_err(err)?;
                teacher.forward(cfg.tokens, &xd, &mut y).map_err(err)?;
                x.push(xd);
                targets.push(y);
            }
            let layer =
                SingLoraLinear::<T>::new(stream, d, d, r, cfg.alpha, cfg.warmup, cfg.seed ^ 0x5eed)
                    .map_err(err)?
                    .with_frozen(w0)
                    .map_err(err)?;
            Ok(Self {
                cfg: cfg.clone(),
                stream: stream.clone(),
                name: format!("GPU ({device_name}, {})", T::NAME),
                layer,
                x,
                targets,
                y: stream.alloc_zeros(cfg.tokens * d).map_err(err)?,
                g: stream.alloc_zeros(cfg.tokens * d).map_err(err)?,
                partial: stream.alloc_zeros(MSE_PARTIALS).map_err(err)?,
                loss_scale: (cfg.tokens * d) as f32 / 2.0,
            })
        }

        fn loss(&mut self, batch: usize, with_grad: bool) -> Result<f64, String> {
            let (n, d) = (self.cfg.tokens, self.cfg.d);
            let grad = with_grad.then_some((&mut self.g as _, d));
            mse(
                &self.stream,
                n,
                d,
                &self.y,
                d,
                &self.targets[batch],
                d,
                grad,
                self.loss_scale,
                &mut self.partial,
            )
            .map_err(err)?;
            let partials = self.stream.clone_dtoh(&self.partial).map_err(err)?;
            Ok(mse_loss(&partials, n, d))
        }
    }

    impl<T: DType> Backend for Gpu<T>
    where
        CudaBlas: Gemm<T>,
    {
        fn describe(&self) -> String {
            self.name.clone()
        }

        fn train_step(&mut self, batch: usize, adamw: &AdamW) -> Result<f64, String> {
            let n = self.cfg.tokens;
            let ctx = self
                .layer
                .forward(n, &self.x[batch], &mut self.y)
                .map_err(err)?;
            let loss = self.loss(batch, true)?;
            self.layer
                .backward(&ctx, &self.x[batch], &self.g, None, false)
                .map_err(err)?;
            self.layer
                .adamw_step(adamw, 1.0 / self.loss_scale)
                .map_err(err)?;
            Ok(loss)
        }

        fn finish(&mut self) -> Result<(f64, f64), String> {
            let held = self.cfg.batches;
            let n = self.cfg.tokens;
            self.layer
                .forward(n, &self.x[held], &mut self.y)
                .map_err(err)?;
            let loss = self.loss(held, false)?;
            let adapter: Vec<T> = self.stream.clone_dtoh(&self.y).map_err(err)?;
            self.layer.merge().map_err(err)?;
            self.layer
                .forward(n, &self.x[held], &mut self.y)
                .map_err(err)?;
            let merged: Vec<T> = self.stream.clone_dtoh(&self.y).map_err(err)?;
            let f = |v: Vec<T>| v.into_iter().map(|x| x.to_f64()).collect::<Vec<_>>();
            Ok((
                loss,
                singlora::reference::relative_l2(&f(merged), &f(adapter)),
            ))
        }
    }
}
