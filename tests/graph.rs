//! A training step that CUDA graphs capture: the scale comes from the
//! layer's device step counter (through the ramp) and AdamW derives its bias
//! corrections from the same counter and advances it, so a graph captured at
//! one step replays the following steps correctly. Checked bitwise against
//! the same steps run eagerly: A, dA and the loss after every step, through
//! a ramp of T = 10 (the scale changes at every one of the first ten steps).
//!
//! Also, everywhere: the device formulas' host twins (the ramp and the bias
//! corrections) agree with the f64 reference bit for bit; and on the GPU the
//! kernels' device-derived scale and bias corrections equal the host's bits.

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use half::bf16;
use singlora::ops::adamw::{adamw_device_step, powi};
use singlora::ops::scale::Scale;
use singlora::{
    adamw, forward, mse, mse_loss, AdamW, AdamWState, DType, Dims, ForwardCtx, Ramp,
    SingLoraLinear, MSE_PARTIALS,
};

const WARMUP: u64 = 10;
const STEPS: usize = 50;

// ------------------------------------------------------------ CPU: formulas

#[test]
fn host_ramp_and_bias_corrections_match_the_f64_reference() {
    let ramp = Ramp {
        alpha: 12.0,
        rank: 8,
        warmup_steps: WARMUP,
    };
    for t in 0..40u64 {
        let u = (t as f64 / WARMUP as f64).min(1.0);
        assert_eq!(ramp.scale(t), (12.0 / 8.0 * u) as f32, "step {t}");
    }
    let cfg = AdamW::default();
    for t in [1u64, 2, 3, 7, 100, 1 << 20, u64::MAX] {
        let (b1, b2) = cfg.bias_corrections(t).unwrap();
        // Binary powering is exact where the powers are exact.
        assert_eq!(powi(0.5, t.min(60)), 0.5f64.powi(t.min(60) as i32));
        assert!(
            (b1 - (1.0 - (cfg.beta1 as f64).powf(t as f64))).abs() <= 1e-12,
            "t = {t}"
        );
        assert!(
            (b2 - (1.0 - (cfg.beta2 as f64).powf(t as f64))).abs() <= 1e-12,
            "t = {t}"
        );
    }
    assert_eq!(powi(3.0, 5), 243.0);
    assert_eq!(powi(1.5, 1), 1.5);
}

// ------------------------------------------------------------ GPU

/// The kernels' device-derived scale is the host's, bit for bit: a forward
/// with the scale read through the ramp from a device step equals the one
/// with the host's value, at every step of the ramp.
#[test]
fn device_ramp_scale_equals_the_host_scale_bitwise() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(70, 96, 80, 12).unwrap();
    let mut r = rng(3);
    let x = upload::<bf16>(&gpu, &randn(&mut r, 70 * 96, 1.0));
    let a = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.2));
    let y0 = randn(&mut r, 70 * 80, 1.0);
    let ramp = Ramp {
        alpha: 7.0,
        rank: 12,
        warmup_steps: 7,
    };
    // Y ← Y0 + the adapter's term at `scale`, read back.
    let forward_at = |scale: Scale<'_>| {
        let mut y = upload::<bf16>(&gpu, &y0);
        forward(
            &gpu.stream,
            &dims,
            &x,
            96,
            &a,
            &mut y,
            80,
            None,
            scale,
            1.0,
            singlora::Dropout::NONE,
        )
        .unwrap();
        download(&gpu, &y)
    };
    for t in [0u64, 1, 3, 6, 7, 12] {
        let step = gpu.stream.clone_htod(&[t]).unwrap();
        let d = forward_at(ramp.on_device(&step));
        let h = forward_at(ramp.scale(t).into());
        assert!(
            d.iter().zip(&h).all(|(p, q)| p.to_bits() == q.to_bits()),
            "step {t}: device-ramp forward differs from the host-scale forward"
        );
        // A device f32 scale too.
        let s = gpu.stream.clone_htod(&[ramp.scale(t)]).unwrap();
        let y_ptr = forward_at(Scale::Device(&s));
        assert_eq!(y_ptr, h, "step {t}: device f32 scale");
    }
}

/// AdamW with the step on the device equals AdamW with the host's step, bit
/// for bit, over several steps; the device counter advances once per step.
#[test]
fn adamw_device_step_equals_the_host_step_bitwise() {
    let Some(gpu) = gpu() else { return };
    let n = 1000;
    let mut r = rng(5);
    let a0 = randn(&mut r, n, 0.1);
    let cfg = AdamW {
        lr: 1e-2,
        ..AdamW::default()
    };
    let mut a_host = upload::<f32>(&gpu, &a0);
    let mut a_dev = upload::<f32>(&gpu, &a0);
    let mut m = [
        gpu.stream.alloc_zeros::<f32>(n).unwrap(),
        gpu.stream.alloc_zeros::<f32>(n).unwrap(),
    ];
    let mut v = [
        gpu.stream.alloc_zeros::<f32>(n).unwrap(),
        gpu.stream.alloc_zeros::<f32>(n).unwrap(),
    ];
    let mut step = gpu.stream.alloc_zeros::<u64>(1).unwrap();
    for t in 1..=5u64 {
        let grad = upload_f32(&gpu, &randn(&mut r, n, 1.0));
        let [m_h, m_d] = &mut m;
        let [v_h, v_d] = &mut v;
        adamw(
            &gpu.stream,
            &cfg,
            t,
            &mut a_host,
            &grad,
            0.5,
            AdamWState {
                m: m_h,
                v: v_h,
                master: None,
            },
        )
        .unwrap();
        adamw_device_step(
            &gpu.stream,
            &cfg,
            &mut step,
            &mut a_dev,
            &grad,
            0.5,
            AdamWState {
                m: m_d,
                v: v_d,
                master: None,
            },
        )
        .unwrap();
        assert_eq!(
            download(&gpu, &a_dev),
            download(&gpu, &a_host),
            "A after step {t}"
        );
        assert_eq!(
            gpu.stream.clone_dtoh(&step).unwrap(),
            vec![t],
            "the device step"
        );
    }
}

/// One training step's buffers: input, target, prediction and its gradient.
struct Batch<T: DType> {
    x: CudaSlice<T>,
    target: CudaSlice<T>,
    y: CudaSlice<T>,
    g: CudaSlice<T>,
    partial: CudaSlice<f32>,
}

/// `layers` chained (d → d each), trained on one batch: the steps' losses,
/// and every layer's A and dA at the end.
struct Run {
    losses: Vec<u64>,
    a: Vec<Vec<u64>>,
    da: Vec<Vec<u64>>,
}

struct Model<T: DType> {
    layers: Vec<SingLoraLinear<T>>,
    ctxs: Vec<ForwardCtx>,
    /// Activations between layers (acts[i] is layer i's output, the input
    /// of layer i + 1) and their gradients.
    acts: Vec<CudaSlice<T>>,
    grads: Vec<CudaSlice<T>>,
}

const D: usize = 256;
const TOKENS: usize = 96;

fn model<T: DType>(gpu: &Gpu, n_layers: usize) -> Model<T>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let mut r = rng(17);
    let layers = (0..n_layers)
        .map(|i| {
            let w0 = upload::<T>(gpu, &randn(&mut r, D * D, 1.0 / (D as f64).sqrt()));
            SingLoraLinear::<T>::new(&gpu.stream, D, D, 8, 16.0, WARMUP, 100 + i as u64)
                .unwrap()
                .with_frozen(w0)
                .unwrap()
        })
        .collect();
    Model {
        layers,
        ctxs: (0..n_layers).map(|_| ForwardCtx::new()).collect(),
        acts: (0..n_layers.saturating_sub(1))
            .map(|_| gpu.stream.alloc_zeros::<T>(TOKENS * D).unwrap())
            .collect(),
        grads: (0..n_layers.saturating_sub(1))
            .map(|_| gpu.stream.alloc_zeros::<T>(TOKENS * D).unwrap())
            .collect(),
    }
}

fn batch<T: DType>(gpu: &Gpu) -> Batch<T> {
    let mut r = rng(23);
    Batch {
        x: upload::<T>(gpu, &randn(&mut r, TOKENS * D, 1.0)),
        target: upload::<T>(gpu, &randn(&mut r, TOKENS * D, 1.0)),
        y: gpu.stream.alloc_zeros::<T>(TOKENS * D).unwrap(),
        g: gpu.stream.alloc_zeros::<T>(TOKENS * D).unwrap(),
        partial: gpu.stream.alloc_zeros::<f32>(MSE_PARTIALS).unwrap(),
    }
}

/// Forward through every layer, the MSE and its gradient, backward through
/// every layer, AdamW on each: only enqueues (no allocation once warm, no
/// synchronisation, no host read).
fn step<T: DType>(stream: &Arc<CudaStream>, m: &mut Model<T>, b: &mut Batch<T>)
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let n = m.layers.len();
    for i in 0..n {
        let (input, output): (&CudaSlice<T>, &mut CudaSlice<T>) = match (i, i + 1 == n) {
            (0, true) => (&b.x, &mut b.y),
            (0, false) => (&b.x, &mut m.acts[0]),
            (_, true) => (&m.acts[i - 1], &mut b.y),
            _ => {
                let (lo, hi) = m.acts.split_at_mut(i);
                (&lo[i - 1], &mut hi[0])
            }
        };
        m.layers[i]
            .forward_into(&mut m.ctxs[i], TOKENS, input, output)
            .unwrap();
    }
    mse(
        stream,
        TOKENS,
        D,
        &b.y,
        D,
        &b.target,
        D,
        Some((&mut b.g, D)),
        1.0,
        &mut b.partial,
    )
    .unwrap();
    for i in (0..n).rev() {
        let input = if i == 0 { &b.x } else { &m.acts[i - 1] };
        let (g, dx) = match i {
            _ if i + 1 == n && i == 0 => (&b.g, None),
            _ if i + 1 == n => (&b.g, Some(&mut m.grads[i - 1])),
            0 => (&m.grads[0], None),
            _ => {
                let (lo, hi) = m.grads.split_at_mut(i);
                (&hi[0], Some(&mut lo[i - 1]))
            }
        };
        m.layers[i]
            .backward(&m.ctxs[i], input, g, dx, false)
            .unwrap();
        m.layers[i]
            .adamw_step(
                &AdamW {
                    lr: 1e-3,
                    ..AdamW::default()
                },
                1.0,
            )
            .unwrap();
    }
}

fn record<T: DType>(gpu: &Gpu, b: &Batch<T>, losses: &mut Vec<u64>) {
    let partial = gpu.stream.clone_dtoh(&b.partial).unwrap();
    losses.push(mse_loss(&partial, TOKENS, D).to_bits());
}

fn finish<T: DType>(gpu: &Gpu, m: &Model<T>, losses: Vec<u64>) -> Run
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
    Run {
        losses,
        a: m.layers
            .iter()
            .map(|l| bits(download(gpu, l.a())))
            .collect(),
        da: m
            .layers
            .iter()
            .map(|l| bits(download_f32(gpu, l.grad())))
            .collect(),
    }
}

fn download_f32(gpu: &Gpu, d: &CudaSlice<f32>) -> Vec<f64> {
    download::<f32>(gpu, d)
}

/// One training step captured into a graph (recorded, not run).
fn capture<T: DType>(gpu: &Gpu, m: &mut Model<T>, b: &mut Batch<T>) -> CudaGraph
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    gpu.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    step(&gpu.stream, m, b);
    gpu.stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("the capture recorded a graph")
}

/// `STEPS` steps eagerly, or: one eager step (the warm-up that allocates
/// S, the workspace and cuBLAS's state), then one capture, replayed for
/// the rest.
fn train<T: DType>(gpu: &Gpu, n_layers: usize, graph: bool) -> Run
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let mut m = model::<T>(gpu, n_layers);
    let mut b = batch::<T>(gpu);
    let mut losses = Vec::new();
    step(&gpu.stream, &mut m, &mut b);
    record(gpu, &b, &mut losses);
    if graph {
        let g = capture(gpu, &mut m, &mut b);
        for _ in 1..STEPS {
            g.launch().unwrap();
            record(gpu, &b, &mut losses);
        }
    } else {
        for _ in 1..STEPS {
            step(&gpu.stream, &mut m, &mut b);
            record(gpu, &b, &mut losses);
        }
    }
    assert_eq!(
        m.layers[0].step_count().unwrap(),
        STEPS as u64,
        "optimizer steps"
    );
    finish(gpu, &m, losses)
}

fn graph_equals_eager<T: DType>(n_layers: usize)
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let Some(gpu) = gpu() else { return };
    // cudarc's per-buffer events would be recorded into the capture; this
    // test's buffers live on one stream, so ordering needs none.
    // SAFETY: every buffer below is used on gpu.stream alone.
    unsafe { gpu.ctx.disable_event_tracking() };
    let eager = train::<T>(&gpu, n_layers, false);
    let replayed = train::<T>(&gpu, n_layers, true);
    let case = format!("{} × {n_layers} layer(s)", T::NAME);
    assert_eq!(eager.losses.len(), STEPS);
    for (i, (e, g)) in eager.losses.iter().zip(&replayed.losses).enumerate() {
        assert_eq!(
            e,
            g,
            "{case}: loss of step {i}: eager {} vs graph {}",
            f64::from_bits(*e),
            f64::from_bits(*g)
        );
    }
    assert_eq!(eager.a, replayed.a, "{case}: A after {STEPS} steps");
    assert_eq!(eager.da, replayed.da, "{case}: dA of the last step");
    // The ramp did move the scale (and the loss) during the run.
    assert_ne!(
        eager.losses[1],
        eager.losses[STEPS - 1],
        "{case}: training had no effect"
    );
}

#[test]
fn captured_step_replays_bitwise_like_eager_steps_bf16() {
    graph_equals_eager::<bf16>(1);
}

#[test]
fn captured_step_replays_bitwise_like_eager_steps_f32() {
    graph_equals_eager::<f32>(1);
}

#[test]
fn captured_step_of_two_layers_on_one_stream_replays_bitwise() {
    graph_equals_eager::<bf16>(2);
}

/// The capture under compute-sanitizer (the bundle's sanitizer step runs
/// every `sanitizer_*` test): a short replay of one small layer.
#[test]
fn sanitizer_graph_step() {
    let Some(gpu) = gpu() else { return };
    // SAFETY: as in graph_equals_eager.
    unsafe { gpu.ctx.disable_event_tracking() };
    let mut m = model::<bf16>(&gpu, 1);
    let mut b = batch::<bf16>(&gpu);
    step(&gpu.stream, &mut m, &mut b);
    let g = capture(&gpu, &mut m, &mut b);
    for _ in 0..3 {
        g.launch().unwrap();
    }
    gpu.stream.synchronize().unwrap();
    assert_eq!(m.layers[0].step_count().unwrap(), 4);
}
