//! A soak: 10,000 training steps of a d = 1024 bf16 layer (frozen W0,
//! rank 16, 256 tokens per step: cuBLAS, the fused forward, the device MSE,
//! the fused backward and AdamW, as examples/finetune does it) — device
//! memory in use constant after warm-up, no NaN or Inf anywhere, and the
//! final loss within 10 % of the same schedule run in f32.
//!
//! The task has a loss floor that does not depend on the element type: the
//! targets are a hidden teacher layer's outputs (same W0, a rank-16 adapter
//! the student can represent) plus fixed N(0, 0.1²) noise, so both runs end
//! near 0.01 and bf16's own rounding (~1e-6 of the loss) cannot decide the
//! comparison. The final loss is the mean over the last 100 steps.
//!
//! Memory: free device memory is read (after a device synchronisation) at
//! step 200, every 1000 steps and at the end, and may move by at most
//! 4 MiB: the layer allocates S on every forward from the stream-ordered
//! pool (16 KiB, freed with the step), whose chunks are 2 MiB and are handed
//! back at a synchronisation, so one chunk of slack is allowed; a leak of
//! 430 bytes per step would exceed it. In its own test binary (one test) so
//! that nothing else allocates while it measures.

mod common;

use std::time::Instant;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use half::bf16;
use singlora::{mse, mse_loss, AdamW, DType, SingLoraLinear, MSE_PARTIALS};

const D: usize = 1024;
const RANK: usize = 16;
const TOKENS: usize = 256;
const STEPS: usize = 10_000;
const BATCHES: usize = 4;
const ALPHA: f64 = 16.0;
const WARMUP_STEPS: u64 = 100;
const LR: f32 = 2e-3;
const NOISE: f64 = 0.1;
/// Steps whose loss is read back: every CHECK-th, and the last LAST.
const CHECK: usize = 100;
const LAST: usize = 100;
/// Memory readings: after MEM_WARMUP steps, then every MEM_EVERY.
const MEM_WARMUP: usize = 200;
const MEM_EVERY: usize = 1000;
const MEM_SLACK: usize = 4 << 20;

/// The task, on the host: W0, the inputs, the targets.
struct Task {
    w0: Vec<f64>,
    x: Vec<Vec<f64>>,
    targets: Vec<Vec<f64>>,
}

/// W0 with std 1/√d (unit-scale outputs); a teacher adapter moving outputs
/// by about 0.5 RMS (as examples/finetune/task.rs); the teacher's outputs,
/// computed in f32 on the GPU, plus the noise.
fn task(gpu: &Gpu) -> Task {
    let mut r = rng(2024);
    let w0 = quantize::<bf16>(&randn(&mut r, D * D, 1.0 / (D as f64).sqrt()));
    let s_t = ALPHA / RANK as f64;
    let sigma = (0.5 / (s_t * ((D * RANK) as f64).sqrt())).sqrt();
    let a_t: Vec<f32> = randn(&mut r, D * RANK, sigma)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let x: Vec<Vec<f64>> = (0..BATCHES)
        .map(|_| quantize::<bf16>(&randn(&mut r, TOKENS * D, 1.0)))
        .collect();
    let mut teacher = SingLoraLinear::<f32>::new(&gpu.stream, D, D, RANK, ALPHA, 0, 0)
        .unwrap()
        .with_frozen(upload::<f32>(gpu, &w0))
        .unwrap();
    teacher.set_a(&a_t).unwrap();
    let targets = x
        .iter()
        .map(|xb| {
            let xd = upload::<f32>(gpu, xb);
            let mut y = poisoned::<f32>(gpu, TOKENS * D);
            teacher.forward(TOKENS, &xd, &mut y).unwrap();
            let noise = randn(&mut r, TOKENS * D, NOISE);
            let t: Vec<f64> = download(gpu, &y)
                .iter()
                .zip(&noise)
                .map(|(y, n)| y + n)
                .collect();
            quantize::<bf16>(&t)
        })
        .collect();
    Task { w0, x, targets }
}

struct Report {
    /// (step, loss) of the steps read back.
    losses: Vec<(usize, f64)>,
    /// (step, free device bytes).
    free: Vec<(usize, usize)>,
    seconds: f64,
}

impl Report {
    fn final_loss(&self) -> f64 {
        let last: Vec<f64> = self
            .losses
            .iter()
            .filter(|(t, _)| *t >= STEPS - LAST)
            .map(|&(_, l)| l)
            .collect();
        assert_eq!(last.len(), LAST);
        last.iter().sum::<f64>() / LAST as f64
    }
}

fn free_bytes(gpu: &Gpu) -> usize {
    gpu.ctx.synchronize().unwrap();
    gpu.ctx.mem_get_info().unwrap().0
}

fn assert_finite<T: DType>(gpu: &Gpu, what: &str, step: usize, d: &CudaSlice<T>) {
    let v = download(gpu, d);
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{} run, step {step}: {what}[{i}] is {}", T::NAME, v[i]);
    }
}

/// The lr at step t: a cosine from LR to LR/100 over the run.
fn lr_at(t: usize) -> f32 {
    let p = t as f64 / STEPS as f64;
    (LR as f64 * (0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))) as f32
}

fn train<T: DType>(gpu: &Gpu, task: &Task) -> Report
where
    CudaBlas: Gemm<T>,
{
    let start = Instant::now();
    let mut layer = SingLoraLinear::<T>::new(&gpu.stream, D, D, RANK, ALPHA, WARMUP_STEPS, 7)
        .unwrap()
        .with_frozen(upload::<T>(gpu, &task.w0))
        .unwrap();
    let x: Vec<CudaSlice<T>> = task.x.iter().map(|v| upload::<T>(gpu, v)).collect();
    let targets: Vec<CudaSlice<T>> = task.targets.iter().map(|v| upload::<T>(gpu, v)).collect();
    let mut y = poisoned::<T>(gpu, TOKENS * D);
    let mut g = poisoned::<T>(gpu, TOKENS * D);
    let mut partial = poisoned::<f32>(gpu, MSE_PARTIALS);
    // The MSE gradient scaled by tokens·d/2 is the plain difference (no f16
    // or bf16 underflow); AdamW scales it back.
    let loss_scale = (TOKENS * D) as f32 / 2.0;
    let mut report = Report {
        losses: Vec::new(),
        free: Vec::new(),
        seconds: 0.0,
    };
    for t in 0..STEPS {
        let b = t % BATCHES;
        let ctx = layer.forward(TOKENS, &x[b], &mut y).unwrap();
        mse(
            &gpu.stream,
            TOKENS,
            D,
            &y,
            D,
            &targets[b],
            D,
            Some((&mut g as _, D)),
            loss_scale,
            &mut partial,
        )
        .unwrap();
        layer.backward(&ctx, &x[b], &g, None, false).unwrap();
        drop(ctx);
        let cfg = AdamW {
            lr: lr_at(t),
            weight_decay: 0.0,
            ..AdamW::default()
        };
        layer.adamw_step(&cfg, 1.0 / loss_scale).unwrap();
        if t % CHECK == 0 || t >= STEPS - LAST {
            // The loss covers every element of y (a NaN or Inf anywhere in
            // y or the target makes it non-finite).
            let loss = mse_loss(&gpu.stream.clone_dtoh(&partial).unwrap(), TOKENS, D);
            assert!(loss.is_finite(), "{} run, step {t}: loss {loss}", T::NAME);
            report.losses.push((t, loss));
        }
        if t % CHECK == 0 || t == STEPS - 1 {
            assert_finite(gpu, "A", t, layer.a());
            assert_finite(gpu, "dA", t, layer.grad());
            assert_finite(gpu, "G", t, &g);
        }
        if t + 1 == MEM_WARMUP || ((t + 1) % MEM_EVERY == 0 && t + 1 > MEM_WARMUP) {
            report.free.push((t + 1, free_bytes(gpu)));
        }
    }
    assert_finite(gpu, "Y", STEPS, &y);
    report.seconds = start.elapsed().as_secs_f64();
    report
}

fn check_memory(name: &str, r: &Report) {
    let (_, base) = r.free[0];
    for &(t, free) in &r.free[1..] {
        let moved = base.abs_diff(free);
        assert!(
            moved <= MEM_SLACK,
            "{name}: free device memory {} MiB at step {MEM_WARMUP}, {} MiB at step {t} \
             (moved {} KiB, slack {} KiB)",
            base >> 20,
            free >> 20,
            moved >> 10,
            MEM_SLACK >> 10
        );
    }
}

#[test]
fn soak_10000_steps_bf16_against_f32() {
    let Some(gpu) = gpu() else { return };
    let task = task(&gpu);
    let bf = train::<bf16>(&gpu, &task);
    let fp = train::<f32>(&gpu, &task);
    for (name, r) in [("bf16", &bf), ("f32", &fp)] {
        println!(
            "soak {name}: {STEPS} steps in {:.1} s; loss {:.4e} at step 0, {:.4e} at the end; \
             free memory {:?} MiB",
            r.seconds,
            r.losses[0].1,
            r.final_loss(),
            r.free
                .iter()
                .map(|&(t, f)| (t, f >> 20))
                .collect::<Vec<_>>()
        );
        check_memory(name, r);
        assert_eq!(r.free.len(), 1 + STEPS / MEM_EVERY);
        // It trained: the loss fell to near the noise floor.
        assert!(
            r.final_loss() < r.losses[0].1 / 5.0 && r.final_loss() < 3.0 * NOISE * NOISE,
            "{name}: the loss went from {:e} to {:e} (noise floor {:e})",
            r.losses[0].1,
            r.final_loss(),
            NOISE * NOISE
        );
    }
    let (b, f) = (bf.final_loss(), fp.final_loss());
    assert!(
        (b - f).abs() <= 0.1 * f,
        "final loss: bf16 {b:e}, f32 {f:e} (more than 10 % apart)"
    );
}
