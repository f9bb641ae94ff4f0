//! The CUDA path (feature `cuda`, a GPU): singlora's kernels on candle's
//! stream against singlora's f64 reference and against the CPU path of the
//! same op. Without a device every test prints
//! `skipped: no CUDA device (<reason>)` and passes; with
//! `SINGLORA_REQUIRE_GPU=1` a skip is a failure.
#![cfg(feature = "cuda")]

#[path = "../examples/finetune/backend.rs"]
mod backend;
mod common;
#[path = "../../examples/finetune/task.rs"]
mod task;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::Optimizer;
use common::*;
use rand::{rngs::StdRng, SeedableRng};
use singlora::{reference, AdamW, Dims};
use singlora_candle::{
    singlora_adapter, singlora_linear, singlora_linear_dropout, Dropout, FusedAdamW,
    SingLoraConfig, SingLoraLinear,
};

fn gpu() -> Option<Device> {
    let why = match singlora::open_device(0) {
        Ok(_) => match Device::new_cuda(0) {
            Ok(dev) => return Some(dev),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    if std::env::var("SINGLORA_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("SINGLORA_REQUIRE_GPU=1 but: {why}");
    }
    println!("skipped: no CUDA device ({why})");
    None
}

/// `(y, dX, dA)` of `sum(singlora_linear(x, a, w, s) ⊙ g)` on `dev`, with
/// `x` passed as `view(x)` (a layout to test).
#[allow(clippy::too_many_arguments)]
fn run(
    dev: &Device,
    dtype: DType,
    shape: (&[usize], usize, usize, usize),
    data: (&[f64], &[f64], &[f64], &[f64]),
    scale: f32,
    view: impl Fn(&Tensor) -> R<Tensor>,
) -> R<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    run_dropout(dev, dtype, shape, data, scale, view, Dropout::NONE)
}

/// [`run`] through `singlora_linear_dropout` with `dropout`.
#[allow(clippy::too_many_arguments)]
fn run_dropout(
    dev: &Device,
    dtype: DType,
    (lead, d_in, d_out, rank): (&[usize], usize, usize, usize),
    (x, a, w, g): (&[f64], &[f64], &[f64], &[f64]),
    scale: f32,
    view: impl Fn(&Tensor) -> R<Tensor>,
    dropout: Dropout,
) -> R<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let shape = |last: usize| {
        let mut s = lead.to_vec();
        s.push(last);
        s
    };
    let xv = Var::from_tensor(&tensor_on(x, &shape(d_in), dtype, dev)?)?;
    let av = Var::from_tensor(&tensor_on(a, &[d_in.max(d_out), rank], dtype, dev)?)?;
    let wt = tensor_on(w, &[d_out, d_in], dtype, dev)?;
    let gt = tensor_on(g, &shape(d_out), dtype, dev)?;
    let y = singlora_linear_dropout(&view(xv.as_tensor())?, av.as_tensor(), &wt, scale, dropout)?;
    let loss = (y.to_dtype(DType::F32)? * gt.to_dtype(DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    let dx = grads.get(xv.as_tensor()).expect("dX");
    let da = grads.get(av.as_tensor()).expect("dA");
    assert_eq!((dx.dtype(), da.dtype()), (dtype, dtype));
    Ok((host(&y)?, host(dx)?, host(da)?))
}

#[test]
fn forward_and_backward_match_the_f64_reference_and_the_cpu_path() -> R {
    let Some(dev) = gpu() else { return Ok(()) };
    let shapes: [(&[usize], usize, usize, usize); 4] = [
        (&[2, 5], 24, 16, 4),
        (&[3, 7], 16, 40, 3),
        (&[1, 300], 256, 256, 64),
        (&[64], 4096, 4096, 16),
    ];
    for (i, &(lead, d_in, d_out, rank)) in shapes.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(i as u64);
        let tokens: usize = lead.iter().product();
        let d = d_in.max(d_out);
        let x = randn(&mut rng, tokens * d_in, 1.0);
        let a = randn(&mut rng, d * rank, 1.0 / (d as f64).sqrt());
        let w = randn(&mut rng, d_out * d_in, 1.0 / (d_in as f64).sqrt());
        let g = randn(&mut rng, tokens * d_out, 1.0);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let what = format!("{d_in}x{d_out} rank {rank} {dtype:?}");
            let args = (lead, d_in, d_out, rank);
            let data = (&x[..], &a[..], &w[..], &g[..]);
            let (y, dx, da) = run(&dev, dtype, args, data, 0.5, |t| Ok(t.clone()))?;
            // The reference on the inputs as the dtype rounds them.
            let r = |v: &[f64]| rounded(v, dtype);
            let (xr, ar, wr, gr) = (r(&x)?, r(&a)?, r(&w)?, r(&g)?);
            let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
            let mut ry = vec![0.0; tokens * d_out];
            let mut rdx = vec![0.0; tokens * d_in];
            for t in 0..tokens {
                for o in 0..d_out {
                    ry[t * d_out + o] =
                        (0..d_in).map(|k| xr[t * d_in + k] * wr[o * d_in + k]).sum();
                }
                for k in 0..d_in {
                    rdx[t * d_in + k] = (0..d_out)
                        .map(|o| gr[t * d_out + o] * wr[o * d_in + k])
                        .sum();
                }
            }
            reference::forward(&dims, &xr, &ar, 0.5, 1.0, &mut ry, singlora::Dropout::NONE)
                .unwrap();
            let mut rda = vec![0.0; dims.a_len()];
            reference::backward(
                &dims,
                &xr,
                &ar,
                &gr,
                0.5,
                1.0,
                &mut rdx,
                0.0,
                &mut rda,
                singlora::Dropout::NONE,
            )
            .unwrap();
            assert_close(&format!("y {what}"), &y, &ry, tol(dtype));
            assert_close(&format!("dX {what}"), &dx, &rdx, tol(dtype));
            assert_close(&format!("dA {what}"), &da, &rda, tol(dtype));
            if d <= 256 {
                let cpu = run(&Device::Cpu, dtype, args, data, 0.5, |t| Ok(t.clone()))?;
                assert_close(&format!("y vs CPU {what}"), &y, &cpu.0, tol(dtype));
                assert_close(&format!("dA vs CPU {what}"), &da, &cpu.2, tol(dtype));
            }
        }
    }
    Ok(())
}

#[test]
fn strided_rows_in_place_and_other_layouts_copied() -> R {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut rng = StdRng::seed_from_u64(11);
    let (lead, d_in, d_out, rank): (&[usize], usize, usize, usize) = (&[4, 8], 64, 48, 8);
    let tokens = 32;
    let x = randn(&mut rng, tokens * d_in, 1.0);
    let a = randn(&mut rng, d_in * rank, 0.1);
    let w = randn(&mut rng, d_out * d_in, 0.1);
    let g = randn(&mut rng, tokens * d_out, 1.0);
    let args = (lead, d_in, d_out, rank);
    let data = (&x[..], &a[..], &w[..], &g[..]);
    let plain = run(&dev, DType::BF16, args, data, 1.0, |t| Ok(t.clone()))?;
    // A column slice of a wider tensor: its rows are used in place.
    let slice = run(&dev, DType::BF16, args, data, 1.0, |t| {
        let wide = Tensor::cat(&[&t.zeros_like()?, t, &t.zeros_like()?], D::Minus1)?;
        wide.narrow(D::Minus1, d_in, d_in)
    })?;
    // A transposed copy (column-major): copied to rows first.
    let transposed = run(&dev, DType::BF16, args, data, 1.0, |t| {
        t.reshape((tokens, d_in))?
            .t()?
            .contiguous()?
            .t()?
            .reshape((4, 8, d_in))
    })?;
    for (name, other) in [("column slice", &slice), ("transposed", &transposed)] {
        assert_close(&format!("{name}: y"), &other.0, &plain.0, 1e-2);
        assert_close(&format!("{name}: dX"), &other.1, &plain.1, 1e-2);
        assert_close(&format!("{name}: dA"), &other.2, &plain.2, 1e-2);
    }
    // The adapter alone (beta = 0) plus candle's own product.
    let xt = tensor_on(&x, &[tokens, d_in], DType::F32, &dev)?;
    let at = tensor_on(&a, &[d_in, rank], DType::F32, &dev)?;
    let wt = tensor_on(&w, &[d_out, d_in], DType::F32, &dev)?;
    let sum = (xt.matmul(&wt.t()?)? + singlora_adapter(&xt, &at, d_out, 1.0)?)?;
    assert_close(
        "adapter + x·W0ᵀ",
        &host(&sum)?,
        &host(&singlora_linear(&xt, &at, &wt, 1.0)?)?,
        1e-5,
    );
    Ok(())
}

/// `(d_in, d_out)` of the layers the GPU and CPU paths run side by side.
const LAYER: (usize, usize) = (96, 64);

/// Such a layer's weight, `tokens` rows of input, and its config (rank 8,
/// alpha 8, seed 9, a warm-up of `warmup_steps`), drawn from `seed`.
fn layer_case(seed: u64, tokens: usize, warmup_steps: u64) -> (Vec<f64>, Vec<f64>, SingLoraConfig) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (d_in, d_out) = LAYER;
    let w = randn(&mut rng, d_out * d_in, 0.1);
    let x = randn(&mut rng, tokens * d_in, 1.0);
    let cfg = SingLoraConfig {
        rank: 8,
        alpha: 8.0,
        warmup_steps,
        seed: 9,
    };
    (w, x, cfg)
}

#[test]
fn merge_unmerge_and_fused_adamw_match_the_cpu_path() -> R {
    let Some(dev) = gpu() else { return Ok(()) };
    for dtype in [DType::F32, DType::BF16] {
        let (d_in, d_out) = LAYER;
        let (w, x, cfg) = layer_case(3, 5, 3);
        let mut layers = Vec::new();
        for d in [&dev, &Device::Cpu] {
            let layer = SingLoraLinear::new(tensor_on(&w, &[d_out, d_in], dtype, d)?, None, cfg)?;
            let mut opt = FusedAdamW::new(
                layer.vars(),
                AdamW {
                    lr: 1e-2,
                    ..AdamW::default()
                },
            )?;
            let xt = tensor_on(&x, &[5, d_in], dtype, d)?;
            for _ in 0..5 {
                let loss = layer
                    .forward(&xt)?
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .mean_all()?;
                opt.backward_step(&loss)?;
            }
            assert_eq!(layer.steps(), 5);
            layers.push((layer, xt));
        }
        // Rounding differs between the paths; AdamW's first steps are
        // nearly sign(g), so a few near-zero gradients may step apart.
        let bar = if dtype == DType::F32 { 1e-3 } else { 5e-2 };
        let (ga, ca) = (
            host(layers[0].0.a().as_tensor())?,
            host(layers[1].0.a().as_tensor())?,
        );
        assert_close(&format!("A after 5 AdamW steps {dtype:?}"), &ga, &ca, bar);
        for (layer, xt) in layers.iter_mut() {
            let before = host(layer.weight())?;
            let y = host(&layer.forward(xt)?)?;
            layer.merge()?;
            assert_close(
                &format!("merged {dtype:?}"),
                &host(&layer.forward(xt)?)?,
                &y,
                tol(dtype),
            );
            layer.unmerge()?;
            assert_close(
                &format!("unmerged {dtype:?}"),
                &host(layer.weight())?,
                &before,
                tol(dtype),
            );
        }
    }
    Ok(())
}

/// Adapter dropout on the GPU: the kernels' mask is bitwise the
/// reference's, so y, dX and dA match the f64 reference with the same
/// Dropout and the CPU path of the op, for every dtype, odd d_in, tokens not
/// a multiple of the tile and a column-slice x; dX alone (A frozen) is the
/// masked one; the same Dropout twice is bitwise the same; p = 0 is
/// bitwise the undropped op; the layer on the GPU draws the CPU layer's
/// masks.
#[test]
fn dropout_matches_the_f64_reference_and_the_cpu_path() -> R {
    let Some(dev) = gpu() else { return Ok(()) };
    let shapes: [(&[usize], usize, usize, usize); 3] = [
        (&[3, 7], 33, 20, 4),
        (&[1, 300], 256, 200, 16),
        (&[2, 129], 128, 512, 64),
    ];
    for (i, &(lead, d_in, d_out, rank)) in shapes.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        let tokens: usize = lead.iter().product();
        let d = d_in.max(d_out);
        let x = randn(&mut rng, tokens * d_in, 1.0);
        let a = randn(&mut rng, d * rank, 1.0 / (d as f64).sqrt());
        let w = randn(&mut rng, d_out * d_in, 1.0 / (d_in as f64).sqrt());
        let g = randn(&mut rng, tokens * d_out, 1.0);
        let args = (lead, d_in, d_out, rank);
        let data = (&x[..], &a[..], &w[..], &g[..]);
        for p in [0.1, 0.5] {
            let dropout = Dropout::new(p, 0xfeed_0000 + i as u64, 1 << 33).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let what = format!("{d_in}x{d_out} rank {rank} p {p} {dtype:?}");
                let same = |t: &Tensor| Ok(t.clone());
                let gpu = run_dropout(&dev, dtype, args, data, 0.5, same, dropout)?;
                let r = |v: &[f64]| rounded(v, dtype);
                let (xr, ar, wr, gr) = (r(&x)?, r(&a)?, r(&w)?, r(&g)?);
                let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
                let mut ry = base(&xr, &wr, tokens, d_in, d_out);
                let mut rdx = base_dx(&gr, &wr, tokens, d_in, d_out);
                reference::forward(&dims, &xr, &ar, 0.5, 1.0, &mut ry, dropout).unwrap();
                let mut rda = vec![0.0; dims.a_len()];
                reference::backward(
                    &dims, &xr, &ar, &gr, 0.5, 1.0, &mut rdx, 0.0, &mut rda, dropout,
                )
                .unwrap();
                assert_close(&format!("y {what}"), &gpu.0, &ry, tol(dtype));
                assert_close(&format!("dX {what}"), &gpu.1, &rdx, tol(dtype));
                assert_close(&format!("dA {what}"), &gpu.2, &rda, tol(dtype));
                let cpu = run_dropout(&Device::Cpu, dtype, args, data, 0.5, same, dropout)?;
                assert_close(&format!("y vs CPU {what}"), &gpu.0, &cpu.0, tol(dtype));
                assert_close(&format!("dX vs CPU {what}"), &gpu.1, &cpu.1, tol(dtype));
                assert_close(&format!("dA vs CPU {what}"), &gpu.2, &cpu.2, tol(dtype));
                let again = run_dropout(&dev, dtype, args, data, 0.5, same, dropout)?;
                assert_eq!(gpu, again, "same (seed, offset), bitwise: {what}");
                // A column slice of a wider x, used in place.
                let slice = run_dropout(
                    &dev,
                    dtype,
                    args,
                    data,
                    0.5,
                    |t| {
                        let wide =
                            Tensor::cat(&[&t.zeros_like()?, t, &t.zeros_like()?], D::Minus1)?;
                        wide.narrow(D::Minus1, d_in, d_in)
                    },
                    dropout,
                )?;
                assert_close(&format!("slice y {what}"), &slice.0, &gpu.0, tol(dtype));
                assert_close(&format!("slice dX {what}"), &slice.1, &gpu.1, tol(dtype));
                assert_close(&format!("slice dA {what}"), &slice.2, &gpu.2, tol(dtype));
            }
            // dX alone (A frozen) takes the masked path too.
            let xv = Var::from_tensor(&tensor_on(&x, &[tokens, d_in], DType::F32, &dev)?)?;
            let at = tensor_on(&a, &[d, rank], DType::F32, &dev)?;
            let wt = tensor_on(&w, &[d_out, d_in], DType::F32, &dev)?;
            let gt = tensor_on(&g, &[tokens, d_out], DType::F32, &dev)?;
            let y = singlora_linear_dropout(xv.as_tensor(), &at, &wt, 0.5, dropout)?;
            let dx_only = host(
                (y * &gt)?
                    .sum_all()?
                    .backward()?
                    .get(xv.as_tensor())
                    .unwrap(),
            )?;
            let both = run_dropout(
                &dev,
                DType::F32,
                args,
                data,
                0.5,
                |t| Ok(t.clone()),
                dropout,
            )?;
            assert_close(&format!("dX alone p {p}"), &dx_only, &both.1, 1e-5);
        }
        // p = 0 is bitwise the undropped op.
        let zero = Dropout::new(0.0, 7, 7).unwrap();
        let plain = run(&dev, DType::BF16, args, data, 0.5, |t| Ok(t.clone()))?;
        let z = run_dropout(&dev, DType::BF16, args, data, 0.5, |t| Ok(t.clone()), zero)?;
        assert_eq!(plain, z, "p = 0");
    }
    // The layer: the GPU's masks are the CPU's (same seed, same offsets).
    let (d_in, d_out) = LAYER;
    let (w, x, cfg) = layer_case(5, 7, 0);
    let mut outs = Vec::new();
    for d in [&dev, &Device::Cpu] {
        let layer = SingLoraLinear::new(tensor_on(&w, &[d_out, d_in], DType::F32, d)?, None, cfg)?
            .with_dropout(0.25)?;
        let xt = tensor_on(&x, &[7, d_in], DType::F32, d)?;
        let ys = [
            layer.forward(&xt)?,
            layer.forward(&xt)?,
            layer.forward_t(&xt, false)?,
        ];
        assert_eq!(layer.dropout().offset(), 2);
        outs.push(ys.iter().map(host).collect::<R<Vec<_>>>()?);
    }
    for (k, (g, c)) in outs[0].iter().zip(&outs[1]).enumerate() {
        assert_close(&format!("layer forward {k}"), g, c, 1e-5);
    }
    Ok(())
}

#[test]
fn the_example_loop_trains_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let cfg = task::Config {
        d: 512,
        tokens: 1024,
        steps: 200,
        ..task::Config::large()
    };
    let mut b = backend::Candle::new(&cfg, dev, DType::BF16).unwrap();
    let report = task::train(&mut b, &cfg, |_, _, _| {}).unwrap();
    println!(
        "loss {:.3e} -> {:.3e} ({:.1e}x), merged error {:.2e}, {:.0} tokens/s",
        report.first_loss(),
        report.final_loss(),
        report.fall(),
        report.merged_error,
        report.tokens_per_s
    );
    assert!(report.fall() >= 100.0, "fell {:.1}x", report.fall());
    assert!(
        report.merged_error < 1e-2,
        "merged error {:.2e}",
        report.merged_error
    );
}
