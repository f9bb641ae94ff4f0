//! SingLoraLinear on the GPU against the f64 reference (with and without a
//! frozen W0), its ramp and step semantics, merge/unmerge through the layer,
//! refusals, and that dropped layers give their memory back.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use singlora::kaiming_uniform;
use singlora::{
    reference, AdamW, BackwardKernel, DType, Dims, Dropout, ForwardKernel, Ramp, SingLoraLinear,
};

const ALPHA: f64 = 12.0;
const WARMUP: u64 = 4;

/// Forward and backward of a layer at ramp step 3 (u = 3/4) against the
/// reference; `frozen`: the layer owns W0, else it adds onto the caller's
/// frozen output and input gradient.
fn run_case<T: DType>(
    gpu: &Gpu,
    (tokens, d_in, d_out, rank): (usize, usize, usize, usize),
    frozen: bool,
    seed: u64,
    (fwd_kernel, bwd_kernel): (ForwardKernel, BackwardKernel),
) where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let name = format!(
        "{} tokens={tokens} d_in={d_in} d_out={d_out} rank={rank} frozen={frozen} {fwd_kernel:?} {bwd_kernel:?}",
        T::NAME
    );
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    let mut r = rng(seed);
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 0.1));
    let x = quantize::<T>(&randn(&mut r, tokens * d_in, 1.0));
    let g = quantize::<T>(&randn(&mut r, tokens * d_out, 1.0));
    let w0 = quantize::<T>(&randn(&mut r, d_out * d_in, 1.0 / (d_in as f64).sqrt()));
    // The caller's frozen output and input gradient, for the layer without W0.
    let y0 = quantize::<T>(&randn(&mut r, tokens * d_out, 1.0));
    let dx0 = quantize::<T>(&randn(&mut r, tokens * d_in, 1.0));

    let mut layer = SingLoraLinear::<T>::new(&gpu.stream, d_in, d_out, rank, ALPHA, WARMUP, 1)
        .unwrap()
        .with_kernels(fwd_kernel, bwd_kernel);
    if frozen {
        layer = layer.with_frozen(upload::<T>(gpu, &w0)).unwrap();
    }
    let a_host: Vec<T> = a.iter().map(|&v| T::from_f64(v)).collect();
    layer.set_a(&a_host).unwrap();
    for _ in 0..3 {
        layer.step().unwrap();
    }
    let scale = ALPHA / rank as f64 * 0.75;
    assert_eq!(layer.scale().unwrap(), scale as f32, "{name}");

    let x_dev = upload::<T>(gpu, &x);
    let g_dev = upload::<T>(gpu, &g);
    let mut y_dev = if frozen {
        poisoned::<T>(gpu, tokens * d_out)
    } else {
        upload::<T>(gpu, &y0)
    };
    let ctx = layer.forward(tokens, &x_dev, &mut y_dev).unwrap();
    let y_start = if frozen {
        base(&x, &w0, tokens, d_in, d_out)
    } else {
        y0.clone()
    };
    let (y_ref, s_ref) =
        reference_forward_onto(&dims, [&x, &a], scale, (&y_start, 1.0), Dropout::NONE);
    assert_close::<T>("y", &name, &download(gpu, &y_dev), &y_ref);
    assert_close::<f32>("saved S", &name, &download(gpu, ctx.s().unwrap()), &s_ref);

    let mut dx_dev = if frozen {
        poisoned::<T>(gpu, tokens * d_in)
    } else {
        upload::<T>(gpu, &dx0)
    };
    layer
        .backward(&ctx, &x_dev, &g_dev, Some(&mut dx_dev), false)
        .unwrap();
    let dx_start = if frozen {
        base_dx(&g, &w0, tokens, d_in, d_out)
    } else {
        dx0.clone()
    };
    // dX adds onto the frozen part, dA is overwritten.
    let starts = [(&dx_start[..], 1.0), (&vec![0.0; dims.a_len()][..], 0.0)];
    let (dx_ref, da_ref) =
        reference_backward_onto(&dims, [&x, &g, &a], scale, starts, Dropout::NONE);
    assert_close::<T>("dx", &name, &download(gpu, &dx_dev), &dx_ref);
    assert_close::<T>("dA", &name, &download(gpu, layer.grad()), &da_ref);

    // Accumulation: a second backward adds the same dA again.
    layer.backward(&ctx, &x_dev, &g_dev, None, true).unwrap();
    let twice: Vec<f64> = da_ref.iter().map(|v| 2.0 * v).collect();
    assert_close::<T>(
        "dA accumulated twice",
        &name,
        &download(gpu, layer.grad()),
        &twice,
    );
}

#[test]
fn layer_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let k = (ForwardKernel::Portable, BackwardKernel::Split);
    for frozen in [false, true] {
        run_case::<f32>(&gpu, (37, 96, 160, 8), frozen, 1, k);
        run_case::<bf16>(&gpu, (77, 256, 128, 24), frozen, 2, k);
        run_case::<f16>(&gpu, (5, 72, 200, 100), frozen, 3, k);
        run_case::<bf16>(&gpu, (300, 512, 512, 16), frozen, 4, k);
    }
}

/// The same layer asking for the opt-in sm_90a kernels (the TMA forward,
/// the fused backward, which the layer runs with dx_beta = 1): against the
/// reference as above, on a compute capability 9.0 device.
#[test]
fn layer_with_the_sm90_kernels_matches_reference() {
    let Some(gpu) = gpu() else { return };
    if with_kernel(&gpu, "backward_fused_sm90_bf16_r16").is_none() {
        return;
    }
    let k = (ForwardKernel::Tma, BackwardKernel::Fused);
    for frozen in [false, true] {
        run_case::<bf16>(&gpu, (300, 512, 512, 16), frozen, 5, k);
        run_case::<bf16>(&gpu, (130, 1024, 256, 32), frozen, 6, k);
        run_case::<f16>(&gpu, (200, 256, 512, 64), frozen, 7, k);
    }
}

#[test]
fn ramp_counts_optimizer_steps_and_starts_as_the_frozen_layer() {
    let Some(gpu) = gpu() else { return };
    let (tokens, d) = (33, 128);
    let mut r = rng(5);
    let w0 = upload::<bf16>(&gpu, &randn(&mut r, d * d, 0.1));
    let mut layer = SingLoraLinear::<bf16>::new(&gpu.stream, d, d, 16, 16.0, 10, 3)
        .unwrap()
        .with_frozen(w0.clone())
        .unwrap();
    assert_eq!(
        (layer.step_count().unwrap(), layer.scale().unwrap()),
        (0, 0.0)
    );
    let x = upload::<bf16>(&gpu, &randn(&mut r, tokens * d, 1.0));
    let g = upload::<bf16>(&gpu, &randn(&mut r, tokens * d, 1.0));

    // u(0) = 0: the adapted layer's output is the frozen layer's, bit for bit.
    let mut y = poisoned::<bf16>(&gpu, tokens * d);
    let ctx = layer.forward(tokens, &x, &mut y).unwrap();
    let mut plain = SingLoraLinear::<bf16>::new(&gpu.stream, d, d, 16, 16.0, 10, 3)
        .unwrap()
        .with_frozen(w0)
        .unwrap();
    plain.merge().unwrap(); // scale 0: W0 unchanged; forward runs x·W0ᵀ alone
    let mut y_plain = poisoned::<bf16>(&gpu, tokens * d);
    plain.forward(tokens, &x, &mut y_plain).unwrap();
    let (y, y_plain) = (download(&gpu, &y), download(&gpu, &y_plain));
    assert!(y
        .iter()
        .zip(&y_plain)
        .all(|(p, q)| p.to_bits() == q.to_bits()));

    // Forwards and backwards (gradient accumulation) never move the ramp.
    for _ in 0..3 {
        let ctx = layer
            .forward(tokens, &x, &mut poisoned::<bf16>(&gpu, tokens * d))
            .unwrap();
        layer.backward(&ctx, &x, &g, None, true).unwrap();
    }
    layer.backward(&ctx, &x, &g, None, true).unwrap();
    assert_eq!(layer.step_count().unwrap(), 0);
    // Each optimizer step moves it once.
    let ramp = Ramp {
        alpha: 16.0,
        rank: 16,
        warmup_steps: 10,
    };
    layer.adamw_step(&AdamW::default(), 0.25).unwrap();
    assert_eq!(
        (layer.step_count().unwrap(), layer.scale().unwrap()),
        (1, ramp.scale(1))
    );
    layer.step().unwrap();
    assert_eq!(
        (layer.step_count().unwrap(), layer.scale().unwrap()),
        (2, ramp.scale(2))
    );
    for _ in 0..20 {
        layer.step().unwrap();
    }
    assert_eq!(layer.scale().unwrap(), 1.0);
}

#[test]
fn adamw_step_moves_a_from_the_gradient() {
    let Some(gpu) = gpu() else { return };
    let (tokens, d_in, d_out, rank) = (64, 96, 80, 8);
    let mut r = rng(6);
    let mut layer = SingLoraLinear::<f32>::new(&gpu.stream, d_in, d_out, rank, 8.0, 0, 9).unwrap();
    let a0 = download(&gpu, layer.a());
    let x = upload::<f32>(&gpu, &randn(&mut r, tokens * d_in, 1.0));
    let g = upload::<f32>(&gpu, &randn(&mut r, tokens * d_out, 1.0));
    let mut y = upload::<f32>(&gpu, &randn(&mut r, tokens * d_out, 1.0));
    let ctx = layer.forward(tokens, &x, &mut y).unwrap();
    layer.backward(&ctx, &x, &g, None, false).unwrap();
    let grad = download(&gpu, layer.grad());
    let cfg = AdamW::default();
    layer.adamw_step(&cfg, 1.0).unwrap();
    let mut want = a0.clone();
    let n = want.len();
    reference::adamw(
        &cfg,
        1,
        &mut want,
        &grad,
        1.0,
        &mut vec![0.0; n],
        &mut vec![0.0; n],
    )
    .unwrap();
    let got = download(&gpu, layer.a());
    assert_each_within("A after one step", &got, &want, |i| {
        1e-6 * (want[i].abs() + 1e-3)
    });
    assert!(got.iter().zip(&a0).filter(|(p, q)| p != q).count() > n / 2);
}

#[test]
fn layer_merge_matches_unmerged_and_unmerge_restores() {
    let Some(gpu) = gpu() else { return };
    for (d_in, d_out) in [(300, 200), (200, 300)] {
        let tokens = 40;
        let mut r = rng(7);
        let w0_host = quantize::<bf16>(&randn(&mut r, d_out * d_in, 0.05));
        let mut layer = SingLoraLinear::<bf16>::new(&gpu.stream, d_in, d_out, 32, 32.0, 0, 11)
            .unwrap()
            .with_frozen(upload::<bf16>(&gpu, &w0_host))
            .unwrap();
        let x = upload::<bf16>(&gpu, &randn(&mut r, tokens * d_in, 1.0));
        let mut y = poisoned::<bf16>(&gpu, tokens * d_out);
        layer.forward(tokens, &x, &mut y).unwrap();
        let unmerged = download(&gpu, &y);
        layer.merge().unwrap();
        assert!(layer.is_merged());
        let mut y = poisoned::<bf16>(&gpu, tokens * d_out);
        let ctx = layer.forward(tokens, &x, &mut y).unwrap();
        assert!(ctx.s().is_none());
        assert_close::<bf16>(
            "merged vs unmerged",
            &format!("{d_in}x{d_out}"),
            &download(&gpu, &y),
            &unmerged,
        );

        // Training is refused while merged; so is a second merge.
        let g = upload::<bf16>(&gpu, &randn(&mut r, tokens * d_out, 1.0));
        assert_eq!(
            argument_named(&layer.backward(&ctx, &x, &g, None, false).unwrap_err()),
            "ctx"
        );
        assert_eq!(argument_named(&layer.merge().unwrap_err()), "self");
        assert_eq!(
            argument_named(&layer.adamw_step(&AdamW::default(), 1.0).unwrap_err()),
            "self"
        );
        // Replacing A while merged would make unmerge subtract another
        // product: refused, A untouched.
        let a_before = download(&gpu, layer.a());
        let other: Vec<bf16> = a_before.iter().map(|&v| bf16::from_f64(-v)).collect();
        assert_eq!(argument_named(&layer.set_a(&other).unwrap_err()), "self");
        assert_eq!(download(&gpu, layer.a()), a_before);

        layer.unmerge().unwrap();
        assert_eq!(argument_named(&layer.unmerge().unwrap_err()), "self");
        let w = download(&gpu, layer.frozen().unwrap());
        let bf16_ulp = |v: f64| ulp::<bf16>(v);
        let mut merged_w = w0_host.clone();
        let a = download(&gpu, layer.a());
        let dims = Dims::new(0, d_in, d_out, 32).unwrap();
        reference::merge(&dims, &mut merged_w, d_in, &a, 1.0).unwrap();
        assert_each_within("W0 after merge and unmerge", &w, &w0_host, |i| {
            bf16_ulp(w0_host[i].abs().max(merged_w[i].abs()))
        });
    }
}

#[test]
fn layer_refusals_name_the_argument() {
    let Some(gpu) = gpu() else { return };
    let s = &gpu.stream;
    let err =
        |r: singlora::Result<SingLoraLinear<f32>>| argument_named(&r.err().unwrap()).to_string();
    assert_eq!(
        err(SingLoraLinear::<f32>::new(s, 64, 64, 0, 1.0, 0, 0)),
        "rank"
    );
    assert_eq!(
        err(SingLoraLinear::<f32>::new(s, 0, 64, 4, 1.0, 0, 0)),
        "d_in"
    );
    assert_eq!(
        err(SingLoraLinear::<f32>::new(s, 64, 64, 4, f64::NAN, 0, 0)),
        "alpha"
    );
    let short_w0 = s.alloc_zeros::<f32>(64 * 32 - 1).unwrap();
    let layer = SingLoraLinear::<f32>::new(s, 64, 32, 4, 1.0, 0, 0).unwrap();
    assert_eq!(err(layer.with_frozen(short_w0)), "w0");

    let mut layer = SingLoraLinear::<f32>::new(s, 64, 32, 4, 1.0, 0, 0).unwrap();
    assert_eq!(argument_named(&layer.set_a(&[0.0; 10]).unwrap_err()), "a");
    assert_eq!(argument_named(&layer.merge().unwrap_err()), "self");
    let x = s.alloc_zeros::<f32>(10 * 64).unwrap();
    let mut y = poisoned::<f32>(&gpu, 10 * 32);
    assert_eq!(
        argument_named(&layer.forward(11, &x, &mut y).err().unwrap()),
        "x"
    );
    let mut short_y = poisoned::<f32>(&gpu, 10 * 32 - 1);
    assert_eq!(
        argument_named(&layer.forward(10, &x, &mut short_y).err().unwrap()),
        "y"
    );
    assert!(download(&gpu, &y).iter().all(|v| v.is_nan()));
    let ctx = layer.forward(10, &x, &mut y).unwrap();
    let g = s.alloc_zeros::<f32>(10 * 32).unwrap();
    let mut short_dx: CudaSlice<f32> = s.alloc_zeros(10 * 64 - 1).unwrap();
    assert_eq!(
        argument_named(
            &layer
                .backward(&ctx, &x, &g, Some(&mut short_dx), false)
                .unwrap_err()
        ),
        "dx"
    );
    let short_g = s.alloc_zeros::<f32>(10).unwrap();
    assert_eq!(
        argument_named(&layer.backward(&ctx, &x, &short_g, None, false).unwrap_err()),
        "g"
    );
    let empty = layer.forward(0, &x, &mut y).unwrap();
    assert_eq!(
        argument_named(&layer.backward(&empty, &x, &g, None, false).unwrap_err()),
        "ctx"
    );
}

#[test]
fn kaiming_uniform_is_seeded_bounded_and_nonzero() {
    let (d, rank) = (512, 8);
    let a = kaiming_uniform::<f32>(d, rank, 42);
    let b = kaiming_uniform::<f32>(d, rank, 42);
    let c = kaiming_uniform::<f32>(d, rank, 43);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let bound = 1.0 / (d as f32).sqrt();
    assert!(a.iter().all(|&v| v.abs() <= bound && v != 0.0));
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
    // Uniform(±b): mean 0, variance b²/3.
    let b2 = (bound as f64).powi(2);
    assert!(mean.abs() < 0.05 * bound as f64, "mean {mean}");
    assert!((var - b2 / 3.0).abs() < 0.1 * b2 / 3.0, "variance {var}");
    let bf = kaiming_uniform::<bf16>(d, rank, 42);
    // The same draws, rounded to bf16.
    assert!(bf
        .iter()
        .zip(&a)
        .all(|(p, q)| (p.to_f32() - q).abs() <= q.abs() / 256.0));
}
