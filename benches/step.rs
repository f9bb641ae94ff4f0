//! A whole training step of one layer at decode-like size (64 tokens,
//! d = 4096, rank 16, bf16, frozen W0): forward, MSE, backward, AdamW —
//! launched eagerly, against the same step captured once into a CUDA graph
//! and replayed (the step and scale live on the device, so the replay is a
//! correct next step; tests/graph.rs proves it bitwise). At this size the
//! step is bound by launch overhead, which the graph removes. GB/s counts
//! W0 read twice (x·W0ᵀ and g·W0) and x, y, g once each.

mod common;

use common::*;
use criterion::Criterion;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::bf16;
use singlora::{mse, AdamW, ForwardCtx, SingLoraLinear, MSE_PARTIALS};

const TOKENS: usize = 64;
const D: usize = 4096;
const RANK: usize = 16;

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let copy_bw = copy_bandwidth(&gpu);
    let w0 = random_bf16(&gpu, D * D, 1);
    let mut layer = SingLoraLinear::<bf16>::new(&gpu.stream, D, D, RANK, 16.0, 100, 2)
        .unwrap()
        .with_frozen(w0)
        .unwrap();
    let x = random_bf16(&gpu, TOKENS * D, 3);
    let target = random_bf16(&gpu, TOKENS * D, 4);
    let mut y = gpu.stream.alloc_zeros::<bf16>(TOKENS * D).unwrap();
    let mut g = gpu.stream.alloc_zeros::<bf16>(TOKENS * D).unwrap();
    let mut dx = gpu.stream.alloc_zeros::<bf16>(TOKENS * D).unwrap();
    let mut partial = gpu.stream.alloc_zeros::<f32>(MSE_PARTIALS).unwrap();
    let mut ctx = ForwardCtx::new();
    let cfg = AdamW {
        lr: 1e-4,
        ..AdamW::default()
    };
    let mut step = || {
        layer.forward_into(&mut ctx, TOKENS, &x, &mut y).unwrap();
        mse(
            &gpu.stream,
            TOKENS,
            D,
            &y,
            D,
            &target,
            D,
            Some((&mut g, D)),
            1.0,
            &mut partial,
        )
        .unwrap();
        layer.backward(&ctx, &x, &g, Some(&mut dx), false).unwrap();
        layer.adamw_step(&cfg, 1.0).unwrap();
    };
    step(); // warm-up: S, the workspace and cuBLAS's state are allocated here
    let mut group = c.benchmark_group(format!("step/t={TOKENS} d={D} r={RANK}"));
    group.bench_function("eager", |b| {
        b.iter_custom(|iters| timed(&gpu.stream, iters, &mut step))
    });
    let eager = take_median();
    gpu.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    step();
    let graph = gpu
        .stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("the capture recorded a graph");
    group.bench_function("graph", |b| {
        b.iter_custom(|iters| timed(&gpu.stream, iters, || graph.launch().unwrap()))
    });
    let replay = take_median();
    group.finish();
    c.final_summary();
    let rows = [Row {
        op: "train step (graph replay)",
        shape: format!("t={TOKENS} d={D} r={RANK}"),
        ours_s: replay,
        bytes: (2 * D * D * 2 + 3 * TOKENS * D * 2) as f64,
        copy_bw,
        peer: "the same step, eager launches",
        peer_s: eager,
    }];
    print_table("training step (bf16, fwd + MSE + bwd + AdamW)", &rows);
}
