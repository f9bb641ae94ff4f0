//! singlora-candle on candle's CPU backend: the op's forward and backward
//! against singlora's f64 reference and against candle's own autograd of
//! the textbook formula; strided and batched inputs; the layer's ramp and
//! merge; the optimizer; refusals.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::Optimizer;
use common::*;
use rand::{rngs::StdRng, SeedableRng};
use singlora::{reference, AdamW, Dims, Dropout};
use singlora_candle::{
    singlora_adapter, singlora_linear, FusedAdamW, SingLoraConfig, SingLoraLinear,
};

impl Case {
    /// Our op through candle's autograd: `(y, dX, dA)` for the loss
    /// `sum(y ⊙ G)` (so ∂L/∂y = G).
    fn ours(&self, dtype: DType, x: &Var) -> R<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let a = Var::from_tensor(&tensor(
            &self.a,
            &[self.d_in.max(self.d_out), self.rank],
            dtype,
        )?)?;
        let w = tensor(&self.w, &[self.d_out, self.d_in], dtype)?;
        let g = tensor(&self.g, &self.shape(self.d_out), dtype)?;
        let y = singlora_linear(x.as_tensor(), a.as_tensor(), &w, self.scale as f32)?;
        assert_eq!(y.dims(), self.shape(self.d_out).as_slice());
        assert_eq!(y.dtype(), dtype);
        let loss = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?;
        let grads = loss.backward()?;
        let dx = grads.get(x.as_tensor()).expect("dX");
        let da = grads.get(a.as_tensor()).expect("dA");
        assert_eq!(dx.dtype(), dtype, "dX in x's dtype");
        assert_eq!(da.dtype(), dtype, "dA in A's dtype");
        assert_eq!(dx.dims(), x.dims());
        Ok((host(&y)?, host(dx)?, host(da)?))
    }
}

#[test]
fn forward_and_backward_match_the_f64_reference() -> R {
    // d_in > d_out, d_in < d_out, square; odd sizes; batch dims.
    for (i, &(d_in, d_out, rank)) in [(24, 16, 4), (16, 40, 3), (33, 33, 8)].iter().enumerate() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let c = Case::new(&[2, 5], d_in, d_out, rank, 10 + i as u64);
            let x = Var::from_tensor(&tensor(&c.x, &c.shape(d_in), dtype)?)?;
            let (y, dx, da) = c.ours(dtype, &x)?;
            let (ry, rdx, rda) = c.reference(dtype, true, Dropout::NONE)?;
            let what = format!("{d_in}x{d_out} rank {rank} {dtype:?}");
            assert_close(&format!("y {what}"), &y, &ry, tol(dtype));
            assert_close(&format!("dX {what}"), &dx, &rdx, tol(dtype));
            assert_close(&format!("dA {what}"), &da, &rda, tol(dtype));
        }
    }
    Ok(())
}

#[test]
fn gradients_match_candle_autograd_of_the_textbook_formula() -> R {
    let c = Case::new(&[3, 7], 20, 12, 5, 3);
    let (d, s) = (c.d_in.max(c.d_out), c.scale);
    let x = Var::from_tensor(&tensor(&c.x, &c.shape(c.d_in), DType::F32)?)?;
    let a = Var::from_tensor(&tensor(&c.a, &[d, c.rank], DType::F32)?)?;
    let w = tensor(&c.w, &[c.d_out, c.d_in], DType::F32)?;
    let g = tensor(&c.g, &c.shape(c.d_out), DType::F32)?;

    let ours = singlora_linear(x.as_tensor(), a.as_tensor(), &w, s as f32)?;
    let grads = (&ours * &g)?.sum_all()?.backward()?;

    // y = x·W0ᵀ + s·(x·A[:d_in])·A[:d_out]ᵀ with candle's own ops.
    let a_in = a.as_tensor().narrow(0, 0, c.d_in)?;
    let a_out = a.as_tensor().narrow(0, 0, c.d_out)?;
    let textbook = (x.broadcast_matmul(&w.t()?)?
        + (x.broadcast_matmul(&a_in)?.broadcast_matmul(&a_out.t()?)? * s)?)?;
    let tgrads = (&textbook * &g)?.sum_all()?.backward()?;

    assert_close("y", &host(&ours)?, &host(&textbook)?, 1e-6);
    for (name, v) in [("dX", &x), ("dA", &a)] {
        let got = host(grads.get(v.as_tensor()).unwrap())?;
        let want = host(tgrads.get(v.as_tensor()).unwrap())?;
        assert_close(name, &got, &want, 1e-6);
    }
    Ok(())
}

#[test]
fn strided_transposed_and_batched_inputs_give_the_same_results() -> R {
    let c = Case::new(&[4, 3], 16, 24, 4, 5);
    let (d, s) = (c.d_in.max(c.d_out), c.scale as f32);
    let a = tensor(&c.a, &[d, c.rank], DType::F32)?;
    let w = tensor(&c.w, &[c.d_out, c.d_in], DType::F32)?;
    let x = tensor(&c.x, &c.shape(c.d_in), DType::F32)?;
    let want = host(&singlora_linear(&x, &a, &w, s)?)?;

    // A column slice of a wider tensor (rows with a stride).
    let wide = Tensor::cat(&[&x.zeros_like()?, &x, &x.ones_like()?], D::Minus1)?;
    let slice = wide.narrow(D::Minus1, c.d_in, c.d_in)?;
    assert!(!slice.is_contiguous());
    assert_close(
        "column slice",
        &host(&singlora_linear(&slice, &a, &w, s)?)?,
        &want,
        1e-6,
    );

    // A transposed (column-major) input.
    let xt2 = x.reshape((12, c.d_in))?.t()?.contiguous()?.t()?;
    assert!(!xt2.is_contiguous());
    let flat = host(&singlora_linear(&xt2, &a, &w, s)?)?;
    assert_close("transposed 2-D", &flat, &want, 1e-6);

    // 1-D (one token), 2-D and 4-D inputs.
    let one = x.reshape((12, c.d_in))?.get(5)?;
    let y1 = singlora_linear(&one, &a, &w, s)?;
    assert_eq!(y1.dims(), [c.d_out]);
    assert_close(
        "one token",
        &host(&y1)?,
        &want[5 * c.d_out..6 * c.d_out],
        1e-6,
    );
    let y4 = singlora_linear(&x.reshape((2, 2, 3, c.d_in))?, &a, &w, s)?;
    assert_eq!(y4.dims(), [2, 2, 3, c.d_out]);
    assert_close("4-D", &host(&y4)?, &want, 1e-6);

    // Gradients through a strided input land in the wide tensor's slice.
    let wide_var = Var::from_tensor(&wide)?;
    let sl = wide_var.as_tensor().narrow(D::Minus1, c.d_in, c.d_in)?;
    let g = tensor(&c.g, &c.shape(c.d_out), DType::F32)?;
    let grads = (singlora_linear(&sl, &a, &w, s)? * &g)?
        .sum_all()?
        .backward()?;
    let dwide = grads.get(wide_var.as_tensor()).unwrap();
    let (_, rdx, _) = c.reference(DType::F32, true, Dropout::NONE)?;
    let dx = host(&dwide.narrow(D::Minus1, c.d_in, c.d_in)?.contiguous()?)?;
    assert_close("dX of a slice", &dx, &rdx, 1e-5);
    assert_eq!(
        host(&dwide.narrow(D::Minus1, 0, c.d_in)?.abs()?.sum_all()?)?[0],
        0.0
    );
    Ok(())
}

#[test]
fn the_adapter_alone_plus_the_frozen_product_is_the_linear_op() -> R {
    let c = Case::new(&[6], 10, 14, 2, 8);
    let d = c.d_in.max(c.d_out);
    let s = c.scale as f32;
    let x = Var::from_tensor(&tensor(&c.x, &c.shape(c.d_in), DType::F32)?)?;
    let a = Var::from_tensor(&tensor(&c.a, &[d, c.rank], DType::F32)?)?;
    let w = tensor(&c.w, &[c.d_out, c.d_in], DType::F32)?;
    let y = (x.matmul(&w.t()?)? + singlora_adapter(x.as_tensor(), a.as_tensor(), c.d_out, s)?)?;
    let (ry, rdx, rda) = c.reference(DType::F32, true, Dropout::NONE)?;
    assert_close("y", &host(&y)?, &ry, 1e-5);
    let g = tensor(&c.g, &c.shape(c.d_out), DType::F32)?;
    let grads = (&y * &g)?.sum_all()?.backward()?;
    assert_close("dX", &host(grads.get(x.as_tensor()).unwrap())?, &rdx, 1e-5);
    assert_close("dA", &host(grads.get(a.as_tensor()).unwrap())?, &rda, 1e-5);
    Ok(())
}

#[test]
fn no_gradient_is_computed_for_inputs_that_need_none() -> R {
    let c = Case::new(&[5], 8, 8, 2, 9);
    let a = Var::from_tensor(&tensor(&c.a, &[8, 2], DType::F32)?)?;
    let w = tensor(&c.w, &[8, 8], DType::F32)?;
    let x = tensor(&c.x, &[5, 8], DType::F32)?; // data: no gradient
    let grads = singlora_linear(&x, a.as_tensor(), &w, 1.0)?
        .sum_all()?
        .backward()?;
    assert!(grads.get(&x).is_none());
    assert!(grads.get(&w).is_none(), "W0 is frozen");
    assert!(grads.get(a.as_tensor()).is_some());
    Ok(())
}

#[test]
fn zero_tokens_is_a_no_op() -> R {
    let a = Var::from_tensor(&Tensor::ones((8, 2), DType::F32, &Device::Cpu)?)?;
    let w = Tensor::ones((6, 8), DType::F32, &Device::Cpu)?;
    let x = Var::from_tensor(&Tensor::zeros((0, 8), DType::F32, &Device::Cpu)?)?;
    let y = singlora_linear(x.as_tensor(), a.as_tensor(), &w, 1.0)?;
    assert_eq!(y.dims(), [0, 6]);
    let grads = y.sum_all()?.backward()?;
    if let Some(da) = grads.get(a.as_tensor()) {
        assert_eq!(host(&da.abs()?.sum_all()?)?[0], 0.0);
    }
    Ok(())
}

fn layer(d_in: usize, d_out: usize, dtype: DType, warmup: u64) -> R<(SingLoraLinear, Tensor)> {
    let mut rng = StdRng::seed_from_u64(1);
    let w = tensor(&randn(&mut rng, d_out * d_in, 0.2), &[d_out, d_in], dtype)?;
    let b = tensor(&randn(&mut rng, d_out, 1.0), &[d_out], dtype)?;
    let cfg = SingLoraConfig {
        rank: 4,
        alpha: 8.0,
        warmup_steps: warmup,
        seed: 42,
    };
    Ok((
        SingLoraLinear::new(w, Some(b), cfg)?,
        tensor(&randn(&mut rng, 3 * 7 * d_in, 1.0), &[3, 7, d_in], dtype)?,
    ))
}

#[test]
fn the_layer_is_a_module_with_singloras_init_and_a_ramp_in_optimizer_steps() -> R {
    let (layer, x) = layer(12, 20, DType::F32, 4)?;
    // A is singlora's Kaiming-uniform init for the seed, never zero.
    let want: Vec<f64> = singlora::kaiming_uniform::<f32>(20, 4, 42)
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert_eq!(host(layer.a().as_tensor())?, want);
    // u(0) = 0: the layer starts equal to the frozen one.
    assert_eq!(layer.scale(), 0.0);
    let frozen = candle_nn::Linear::new(layer.weight().clone(), layer.bias().cloned());
    assert_close(
        "t = 0",
        &host(&layer.forward(&x)?)?,
        &host(&frozen.forward(&x)?)?,
        1e-7,
    );

    let mut opt = FusedAdamW::new(layer.vars(), AdamW::default())?;
    for t in 1..=6u64 {
        // Two forwards per step (gradient accumulation) do not move the ramp.
        let l1 = layer.forward(&x)?.sqr()?.mean_all()?;
        let l2 = layer.forward(&x)?.sqr()?.mean_all()?;
        assert_eq!(layer.steps(), t - 1);
        opt.backward_step(&(l1 + l2)?)?;
        assert_eq!(layer.steps(), t, "the optimizer step advances the ramp");
        assert_eq!(layer.scale(), layer.ramp().scale(t));
    }
    assert_eq!(layer.scale(), 2.0, "alpha / rank once the ramp is over");
    // Another optimizer: the caller steps the ramp.
    layer.step();
    assert_eq!(layer.steps(), 7);
    Ok(())
}

#[test]
fn merge_folds_the_adapter_into_the_weight_and_unmerge_takes_it_out() -> R {
    for dtype in [DType::F32, DType::BF16] {
        let (mut layer, x) = layer(24, 16, dtype, 0)?;
        let w_before = host(layer.weight())?;
        let y = host(&layer.forward(&x)?)?;
        layer.merge()?;
        assert!(layer.is_merged());
        let merged = host(&layer.forward(&x)?)?;
        assert_close(&format!("merged {dtype:?}"), &merged, &y, tol(dtype));
        // The weight holds W0 + s·A_out·A_inᵀ.
        let a = host(layer.a().as_tensor())?;
        let dims = Dims::new(0, 24, 16, 4).unwrap();
        let mut want = w_before.clone();
        reference::merge(&dims, &mut want, 24, &a, layer.scale() as f64).unwrap();
        assert_close(
            &format!("W0 + ΔW {dtype:?}"),
            &host(layer.weight())?,
            &want,
            tol(dtype),
        );
        // Refusals name the layer.
        let e = layer.merge().unwrap_err().to_string();
        assert!(e.contains("`self`"), "{e}");
        layer.unmerge()?;
        let back = host(layer.weight())?;
        let bar = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        assert_close(&format!("unmerged {dtype:?}"), &back, &w_before, bar);
        assert!(layer.unmerge().unwrap_err().to_string().contains("`self`"));
    }
    Ok(())
}

#[test]
fn merge_into_a_strided_weight_touches_only_its_elements() -> R {
    // W0 as a row slice of a wider matrix (a fused QKV weight, say).
    let mut rng = StdRng::seed_from_u64(4);
    let full = tensor(&randn(&mut rng, 3 * 8 * 12, 1.0), &[3 * 8, 12], DType::F32)?;
    let before = host(&full)?;
    let w = full.narrow(0, 8, 8)?; // rows 8..16, contiguous rows
    let cfg = SingLoraConfig {
        rank: 2,
        alpha: 2.0,
        warmup_steps: 0,
        seed: 3,
    };
    let mut layer = SingLoraLinear::new(w, None, cfg)?;
    layer.merge()?;
    let after = host(&full)?;
    assert_eq!(&after[..8 * 12], &before[..8 * 12]);
    assert_eq!(&after[16 * 12..], &before[16 * 12..]);
    assert_ne!(&after[8 * 12..16 * 12], &before[8 * 12..16 * 12]);
    Ok(())
}

#[test]
fn fused_adamw_matches_the_f64_reference_and_candles_adamw() -> R {
    let mut rng = StdRng::seed_from_u64(6);
    let n = 37;
    let p0 = randn(&mut rng, n, 1.0);
    let grads: Vec<Vec<f64>> = (0..5).map(|_| randn(&mut rng, n, 0.3)).collect();
    let cfg = AdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamW::default()
    };

    let ours = Var::from_tensor(&tensor(&p0, &[n], DType::F32)?)?;
    let theirs = Var::from_tensor(&tensor(&p0, &[n], DType::F32)?)?;
    let mut opt = FusedAdamW::new(vec![ours.clone()], cfg)?;
    let mut candle_opt = candle_nn::AdamW::new(
        vec![theirs.clone()],
        candle_nn::ParamsAdamW {
            lr: cfg.lr as f64,
            beta1: cfg.beta1 as f64,
            beta2: cfg.beta2 as f64,
            eps: cfg.eps as f64,
            weight_decay: cfg.weight_decay as f64,
        },
    )?;
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    for (t, g) in grads.iter().enumerate() {
        let gt = tensor(g, &[n], DType::F32)?;
        // loss = sum(p ⊙ g): ∂loss/∂p = g.
        opt.backward_step(&(ours.as_tensor() * &gt)?.sum_all()?)?;
        candle_opt.backward_step(&(theirs.as_tensor() * &gt)?.sum_all()?)?;
        reference::adamw(&cfg, t as u64 + 1, &mut p, g, 1.0, &mut m, &mut v).unwrap();
    }
    assert_close("vs f64 reference", &host(ours.as_tensor())?, &p, 1e-6);
    assert_close(
        "vs candle_nn::AdamW",
        &host(ours.as_tensor())?,
        &host(theirs.as_tensor())?,
        1e-6,
    );
    Ok(())
}

#[test]
fn fused_adamw_keeps_f32_master_weights_for_bf16_and_scales_gradients() -> R {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 64;
    let p0 = rounded(&randn(&mut rng, n, 1.0), DType::BF16)?;
    let cfg = AdamW {
        lr: 1e-4, // updates far below bf16's resolution: only a master copy keeps them
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let var = Var::from_tensor(&tensor(&p0, &[n], DType::BF16)?)?;
    let mut opt = FusedAdamW::new(vec![var.clone()], cfg)?;
    opt.set_grad_scale(0.5)?;
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    let g = randn(&mut rng, n, 1.0);
    let g_bf16 = rounded(&g, DType::BF16)?;
    for t in 1..=200u64 {
        // loss = 2·sum(p ⊙ g): the gradient 2g, scaled back to g.
        let gt = tensor(&g, &[n], DType::BF16)?;
        opt.backward_step(&((var.as_tensor() * &gt)?.sum_all()? * 2.0)?)?;
        reference::adamw(&cfg, t, &mut p, &g_bf16, 1.0, &mut m, &mut v).unwrap();
    }
    // 200 steps of ≈1e-4 moved every element by ≈2e-2 — many bf16 ulps
    // near 1 are 8e-3 — so the rounded parameter follows the f64 reference.
    let got = host(var.as_tensor())?;
    assert_close(
        "bf16 with master weights",
        &got,
        &rounded(&p, DType::BF16)?,
        1e-2,
    );
    let moved = reference::relative_l2(&got, &p0);
    assert!(moved > 1e-3, "the parameter moved ({moved:.2e})");
    Ok(())
}

#[test]
fn refusals_name_the_argument() -> R {
    let cpu = &Device::Cpu;
    let x = Tensor::zeros((3, 8), DType::F32, cpu)?;
    let a = Tensor::zeros((8, 2), DType::F32, cpu)?;
    let w = Tensor::zeros((6, 8), DType::F32, cpu)?;
    let check = |r: R<Tensor>, name: &str| {
        let e = r.expect_err(name).to_string();
        assert!(
            e.contains(&format!("`{name}`")),
            "should name `{name}`: {e}"
        );
    };
    check(
        singlora_linear(&Tensor::zeros((3, 7), DType::F32, cpu)?, &a, &w, 1.0),
        "x",
    );
    check(
        singlora_linear(
            &x.to_dtype(DType::F64)?,
            &a.to_dtype(DType::F64)?,
            &w.to_dtype(DType::F64)?,
            1.0,
        ),
        "x",
    );
    check(singlora_linear(&x.to_dtype(DType::U32)?, &a, &w, 1.0), "x");
    check(singlora_linear(&Tensor::new(1f32, cpu)?, &a, &w, 1.0), "x");
    check(singlora_linear(&x, &a.to_dtype(DType::BF16)?, &w, 1.0), "a");
    check(
        singlora_linear(&x, &Tensor::zeros((6, 2), DType::F32, cpu)?, &w, 1.0),
        "a",
    );
    check(
        singlora_linear(&x, &Tensor::zeros(8, DType::F32, cpu)?, &w, 1.0),
        "a",
    );
    check(singlora_linear(&x, &a, &w.to_dtype(DType::F16)?, 1.0), "w0");
    check(
        singlora_linear(&x, &a, &Tensor::zeros((6, 8, 1), DType::F32, cpu)?, 1.0),
        "w0",
    );
    check(singlora_linear(&x, &a, &w, f32::NAN), "scale");
    check(singlora_adapter(&x, &a, 9, 1.0), "a"); // D = max(8, 9) = 9 rows
    let big = Tensor::zeros((8, 300), DType::F32, cpu)?;
    check(singlora_linear(&x, &big, &w, 1.0), "rank");

    let cfg = SingLoraConfig::default();
    let e = SingLoraLinear::new(Tensor::zeros(8, DType::F32, cpu)?, None, cfg)
        .err()
        .unwrap();
    assert!(e.to_string().contains("`weight`"), "{e}");
    let e = SingLoraLinear::new(w.to_dtype(DType::U8)?, None, cfg)
        .err()
        .unwrap();
    assert!(e.to_string().contains("`weight`"), "{e}");
    let e = SingLoraLinear::new(w.clone(), Some(Tensor::zeros(5, DType::F32, cpu)?), cfg)
        .err()
        .unwrap();
    assert!(e.to_string().contains("`bias`"), "{e}");
    let e = SingLoraLinear::new(w.clone(), None, SingLoraConfig { rank: 0, ..cfg })
        .err()
        .unwrap();
    assert!(e.to_string().contains("rank"), "{e}");
    let layer = SingLoraLinear::new(w.clone(), None, SingLoraConfig { rank: 2, ..cfg })?;
    check(layer.forward(&Tensor::zeros((3, 6), DType::F32, cpu)?), "x");
    check(layer.forward(&x.to_dtype(DType::BF16)?), "x"); // the layer is f32

    let f64_var = Var::zeros(4, DType::F64, cpu)?;
    let e = FusedAdamW::new(vec![f64_var], AdamW::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("`var`"), "{e}");
    let e = FusedAdamW::new(
        vec![],
        AdamW {
            lr: -1.0,
            ..AdamW::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("`lr`"), "{e}");
    let mut opt = FusedAdamW::new(vec![], AdamW::default())?;
    let e = opt.set_grad_scale(f32::INFINITY).unwrap_err();
    assert!(e.to_string().contains("`grad_scale`"), "{e}");
    Ok(())
}
