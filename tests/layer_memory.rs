//! Layers sharing one stream give all their memory back when dropped. In
//! its own test binary (one test) so no other test allocates during the
//! measurement.

mod common;

use common::*;
use half::bf16;
use singlora::{AdamW, SingLoraLinear};

/// Eight stacked layers with frozen W0 on one stream: forward through the
/// stack, backward and an AdamW step for each, then everything is dropped.
fn round(gpu: &Gpu, seed: u64) {
    let (tokens, d, rank) = (128, 1024, 16);
    let mut r = rng(seed);
    let x = upload::<bf16>(gpu, &randn(&mut r, tokens * d, 1.0));
    let mut layers: Vec<_> = (0..8)
        .map(|i| {
            let w0 = upload::<bf16>(gpu, &randn(&mut r, d * d, 0.03));
            SingLoraLinear::<bf16>::new(&gpu.stream, d, d, rank, 16.0, 0, i)
                .unwrap()
                .with_frozen(w0)
                .unwrap()
        })
        .collect();
    // Each layer consumes the previous layer's output.
    let mut h = x;
    let mut saved = Vec::new();
    for layer in &layers {
        let mut y = poisoned::<bf16>(gpu, tokens * d);
        saved.push(layer.forward(tokens, &h, &mut y).unwrap());
        h = y;
    }
    assert!(download(gpu, &h).iter().all(|v| v.is_finite()));
    let g = upload::<bf16>(gpu, &randn(&mut r, tokens * d, 1.0));
    let x2 = upload::<bf16>(gpu, &randn(&mut r, tokens * d, 1.0));
    for (layer, ctx) in layers.iter_mut().zip(&saved) {
        layer.backward(ctx, &x2, &g, None, false).unwrap();
        layer.adamw_step(&AdamW::default(), 1.0).unwrap();
    }
    gpu.ctx.synchronize().unwrap();
}

fn free_bytes(gpu: &Gpu) -> usize {
    gpu.ctx.synchronize().unwrap();
    cudarc::driver::result::mem_get_info().unwrap().0
}

#[test]
fn layers_share_a_stream_and_free_their_memory() {
    let Some(gpu) = gpu() else { return };
    // The first round pays the one-time costs (cuBLAS's kernels, the
    // module); later rounds must return to the same level.
    round(&gpu, 1);
    let after_first = free_bytes(&gpu);
    round(&gpu, 2);
    round(&gpu, 3);
    let after_third = free_bytes(&gpu);
    assert!(
        after_third + (8 << 20) >= after_first,
        "leak: {} MiB free after one round, {} MiB after three",
        after_first >> 20,
        after_third >> 20
    );
}
