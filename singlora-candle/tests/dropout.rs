//! Adapter dropout on candle's CPU backend: the op's forward and backward
//! against singlora's f64 reference with the same `Dropout` (the same mask,
//! bit for bit) and against finite differences of the op itself; p = 0
//! bitwise the undropped op; the layer's offset (once per training-mode
//! forward, never in eval or merged), its masks (fresh per forward, the
//! same for the same (seed, offset)), the pair kept for the backward; the
//! refusals of p.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::*;
use singlora::reference;
use singlora_candle::{
    singlora_adapter, singlora_adapter_dropout, singlora_linear, singlora_linear_dropout, Dropout,
    SingLoraConfig, SingLoraLinear,
};

impl Case {
    fn vars(&self, dtype: DType) -> R<(Var, Var, Tensor, Tensor)> {
        let x = Var::from_tensor(&tensor(&self.x, &self.shape(self.d_in), dtype)?)?;
        let d = self.d_in.max(self.d_out);
        let a = Var::from_tensor(&tensor(&self.a, &[d, self.rank], dtype)?)?;
        let w = tensor(&self.w, &[self.d_out, self.d_in], dtype)?;
        let g = tensor(&self.g, &self.shape(self.d_out), dtype)?;
        Ok((x, a, w, g))
    }

    /// The op through candle's autograd (`frozen`: singlora_linear_dropout,
    /// else the adapter alone): `(y, dX, dA)` for the loss `sum(y ⊙ G)`.
    fn ours(
        &self,
        dtype: DType,
        frozen: bool,
        dropout: Dropout,
    ) -> R<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let (x, a, w, g) = self.vars(dtype)?;
        let s = self.scale as f32;
        let y = if frozen {
            singlora_linear_dropout(x.as_tensor(), a.as_tensor(), &w, s, dropout)?
        } else {
            singlora_adapter_dropout(x.as_tensor(), a.as_tensor(), self.d_out, s, dropout)?
        };
        assert_eq!(y.dims(), self.shape(self.d_out).as_slice());
        let (dx, da) = grads(&y, &g, &x, &a)?;
        Ok((host(&y)?, dx, da))
    }
}

/// `(dX, dA)` of `sum(y ⊙ g)`.
fn grads(y: &Tensor, g: &Tensor, x: &Var, a: &Var) -> R<(Vec<f64>, Vec<f64>)> {
    let loss = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    let dx = grads.get(x.as_tensor()).expect("dX");
    let da = grads.get(a.as_tensor()).expect("dA");
    assert_eq!((dx.dtype(), da.dtype()), (x.dtype(), a.dtype()));
    Ok((host(dx)?, host(da)?))
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn forward_and_backward_match_the_f64_reference_with_the_same_dropout() -> R {
    let shapes: [(&[usize], usize, usize, usize); 3] = [
        (&[2, 5], 24, 16, 4),
        (&[3, 7], 16, 40, 3),
        (&[13], 33, 33, 8),
    ];
    for (i, &(lead, d_in, d_out, rank)) in shapes.iter().enumerate() {
        for (j, p) in [0.1, 0.5].into_iter().enumerate() {
            let dropout = Dropout::new(p, 0x5eed + i as u64, 3 + j as u64).unwrap();
            let c = Case::new(lead, d_in, d_out, rank, 40 + i as u64);
            for dtype in [DType::F32, DType::BF16] {
                for frozen in [true, false] {
                    let what =
                        format!("{d_in}x{d_out} rank {rank} p {p} {dtype:?} frozen {frozen}");
                    let (y, dx, da) = c.ours(dtype, frozen, dropout)?;
                    let (ry, rdx, rda) = c.reference(dtype, frozen, dropout)?;
                    assert_close(&format!("y {what}"), &y, &ry, tol(dtype));
                    assert_close(&format!("dX {what}"), &dx, &rdx, tol(dtype));
                    assert_close(&format!("dA {what}"), &da, &rda, tol(dtype));
                    // The adapter alone is far off its undropped
                    // reference: the mask is applied.
                    if !frozen {
                        let (ny, _, _) = c.reference(dtype, frozen, Dropout::NONE)?;
                        let off = reference::relative_l2(&y, &ny);
                        assert!(off > 10.0 * tol(dtype), "{what}: {off:.2e}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// dX of the adapter alone is exactly zero where the mask drops (the
/// adapter never saw that element), and dX alone / dA alone (the other
/// input frozen) give the same values as both together.
#[test]
fn dropped_elements_get_no_adapter_gradient_and_partial_gradients_agree() -> R {
    let c = Case::new(&[6], 20, 12, 4, 7);
    let dropout = Dropout::new(0.5, 11, 2).unwrap();
    let (_, dx, da) = c.ours(DType::F32, false, dropout)?;
    let mask = dropout.mask(c.tokens(), c.d_in);
    assert!(mask.iter().any(|&k| !k) && mask.iter().any(|&k| k));
    for (v, keep) in dx.iter().zip(&mask) {
        assert_eq!(*v == 0.0, !keep, "dX {v} where keep = {keep}");
    }
    let (x, a, w, g) = c.vars(DType::F32)?;
    let s = c.scale as f32;
    // dX alone (A frozen).
    let y = singlora_linear_dropout(x.as_tensor(), &a.as_tensor().detach(), &w, s, dropout)?;
    let loss = (y * &g)?.sum_all()?;
    let dx_only = host(loss.backward()?.get(x.as_tensor()).expect("dX"))?;
    let (_, dx_both, da_both) = c.ours(DType::F32, true, dropout)?;
    assert_eq!(bits(&dx_only), bits(&dx_both));
    // dA alone (x frozen).
    let y = singlora_linear_dropout(&x.as_tensor().detach(), a.as_tensor(), &w, s, dropout)?;
    let loss = (y * &g)?.sum_all()?;
    let da_only = host(loss.backward()?.get(a.as_tensor()).expect("dA"))?;
    assert_eq!(bits(&da_only), bits(&da_both));
    assert_eq!(da.len(), da_both.len());
    Ok(())
}

/// Central differences of the CPU op itself (f32) along a few coordinates
/// of x (kept and dropped ones) and of A, with the mask fixed by the
/// Dropout, against the op's backward.
#[test]
fn backward_matches_finite_differences_of_the_op() -> R {
    let c = Case::new(&[2, 3], 10, 8, 3, 99);
    let dropout = Dropout::new(0.3, 5, 1).unwrap();
    let (_, dx, da) = c.ours(DType::F32, true, dropout)?;
    let (x0, a0, w, g) = c.vars(DType::F32)?;
    let loss = |x: &Tensor, a: &Tensor| -> R<f64> {
        let y = singlora_linear_dropout(x, a, &w, c.scale as f32, dropout)?;
        let l = (y.to_dtype(DType::F64)? * g.to_dtype(DType::F64)?)?.sum_all()?;
        l.to_scalar::<f64>()
    };
    let h = 0.05;
    let fd = |t: &Tensor, i: usize, which_x: bool| -> R<f64> {
        let mut v = host(t)?;
        let bump = |v: &[f64]| tensor(v, t.dims(), DType::F32);
        v[i] += h;
        let plus = bump(&v)?;
        v[i] -= 2.0 * h;
        let minus = bump(&v)?;
        Ok(if which_x {
            (loss(&plus, a0.as_tensor())? - loss(&minus, a0.as_tensor())?) / (2.0 * h)
        } else {
            (loss(x0.as_tensor(), &plus)? - loss(x0.as_tensor(), &minus)?) / (2.0 * h)
        })
    };
    let mask = dropout.mask(c.tokens(), c.d_in);
    let kept = mask.iter().position(|&k| k).unwrap();
    let dropped = mask.iter().position(|&k| !k).unwrap();
    for i in [0, kept, dropped, dx.len() - 1] {
        let want = fd(x0.as_tensor(), i, true)?;
        assert!(
            (dx[i] - want).abs() <= 2e-3 * (1.0 + want.abs()),
            "dX[{i}] = {} vs finite difference {want}",
            dx[i]
        );
    }
    for i in [0, 7, da.len() / 2, da.len() - 1] {
        let want = fd(a0.as_tensor(), i, false)?;
        assert!(
            (da[i] - want).abs() <= 2e-3 * (1.0 + want.abs()),
            "dA[{i}] = {} vs finite difference {want}",
            da[i]
        );
    }
    Ok(())
}

#[test]
fn p_zero_is_bitwise_the_undropped_op() -> R {
    let c = Case::new(&[3, 4], 24, 16, 4, 3);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (x, a, w, g) = c.vars(dtype)?;
        let s = c.scale as f32;
        let y0 = singlora_linear(x.as_tensor(), a.as_tensor(), &w, s)?;
        let (dx0, da0) = grads(&y0, &g, &x, &a)?;
        let zero = Dropout::new(0.0, 1234, 56).unwrap();
        let y1 = singlora_linear_dropout(x.as_tensor(), a.as_tensor(), &w, s, zero)?;
        let (dx1, da1) = grads(&y1, &g, &x, &a)?;
        assert_eq!(bits(&host(&y0)?), bits(&host(&y1)?), "{dtype:?}");
        assert_eq!(bits(&dx0), bits(&dx1));
        assert_eq!(bits(&da0), bits(&da1));
        let y2 = singlora_adapter(x.as_tensor(), a.as_tensor(), c.d_out, s)?;
        let y3 = singlora_adapter_dropout(x.as_tensor(), a.as_tensor(), c.d_out, s, zero)?;
        assert_eq!(bits(&host(&y2)?), bits(&host(&y3)?));
    }
    Ok(())
}

fn layer(c: &Case, p: f64) -> R<SingLoraLinear> {
    let w = tensor(&c.w, &[c.d_out, c.d_in], DType::F32)?;
    let cfg = SingLoraConfig {
        rank: c.rank,
        alpha: 2.0,
        warmup_steps: 0,
        seed: 17,
    };
    SingLoraLinear::new(w, None, cfg)?.with_dropout(p)
}

#[test]
fn the_layer_draws_a_fresh_mask_per_training_forward_and_none_in_eval() -> R {
    let c = Case::new(&[4, 3], 16, 24, 4, 5);
    let x = tensor(&c.x, &c.shape(c.d_in), DType::F32)?;
    let mut l = layer(&c, 0.1)?;
    assert_eq!(
        (l.dropout().p(), l.dropout().seed(), l.dropout().offset()),
        (0.1, 17, 0)
    );
    assert!(l.dropout().is_training());
    // Eval: no dropout, no offset; bitwise the p = 0 layer.
    let undropped = layer(&c, 0.0)?.forward_t(&x, false)?;
    let e1 = l.forward_t(&x, false)?;
    l.dropout_mut().set_training(false);
    let e2 = l.forward(&x)?;
    assert_eq!(l.dropout().offset(), 0);
    assert_eq!(bits(&host(&e1)?), bits(&host(&undropped)?));
    assert_eq!(bits(&host(&e2)?), bits(&host(&undropped)?));
    // p = 0 in training mode: bitwise eval (the offset still advances).
    let mut z = layer(&c, 0.0)?;
    assert_eq!(bits(&host(&z.forward(&x)?)?), bits(&host(&undropped)?));
    assert_eq!(z.dropout().offset(), 1);
    z.dropout_mut().set_training(false);
    // Training: one offset per forward, a fresh mask each time.
    l.dropout_mut().set_training(true);
    let t0 = host(&l.forward(&x)?)?;
    assert_eq!(l.dropout().offset(), 1);
    let t1 = host(&l.forward_t(&x, true)?)?;
    assert_eq!(l.dropout().offset(), 2);
    assert_ne!(bits(&t0), bits(&t1), "two forwards, two masks");
    assert_ne!(bits(&t0), bits(&host(&undropped)?));
    // Each is the op with (seed, offset) = (17, 0) and (17, 1).
    let (_, _, w, _) = c.vars(DType::F32)?;
    let a = l.a().as_tensor();
    for (off, t) in [(0, &t0), (1, &t1)] {
        let d = Dropout::new(0.1, 17, off).unwrap();
        let y = singlora_linear_dropout(&x, a, &w, l.scale(), d)?;
        assert_eq!(bits(&host(&y)?), bits(t), "offset {off}");
    }
    // The same (seed, offset) again: bitwise the same result.
    l.dropout_mut().set_seed(17, 0);
    assert_eq!(bits(&host(&l.forward(&x)?)?), bits(&t0));
    assert_eq!(l.dropout().offset(), 1);
    // Another seed: another mask.
    l.dropout_mut().set_seed(18, 0);
    assert_ne!(bits(&host(&l.forward(&x)?)?), bits(&t0));
    // Merged: the plain product, no dropout, no offset.
    l.dropout_mut().set_seed(17, 5);
    l.merge()?;
    let m = host(&l.forward(&x)?)?;
    assert_eq!(l.dropout().offset(), 5);
    assert_close("merged", &m, &host(&undropped)?, 1e-5);
    Ok(())
}

/// The backward of a forward uses that forward's (seed, offset), even after
/// later forwards advanced the layer's offset.
#[test]
fn the_backward_keeps_the_pair_of_its_forward() -> R {
    let c = Case::new(&[5, 2], 12, 20, 3, 8);
    let l = layer(&c, 0.5)?;
    let x = Var::from_tensor(&tensor(&c.x, &c.shape(c.d_in), DType::F32)?)?;
    let g = tensor(&c.g, &c.shape(c.d_out), DType::F32)?;
    let y0 = l.forward(x.as_tensor())?;
    let y1 = l.forward(x.as_tensor())?; // offset 1, not differentiated
    assert_eq!(l.dropout().offset(), 2);
    let (dx, da) = grads(&y0, &g, &x, l.a())?;
    let (dx1, _) = grads(&y1, &g, &x, l.a())?;
    assert_ne!(bits(&dx), bits(&dx1));
    // The reference with the layer's A and the first forward's dropout.
    let a_host = host(l.a().as_tensor())?;
    let ref_case = Case {
        a: a_host,
        scale: f64::from(l.scale()),
        ..Case::new(&[5, 2], 12, 20, 3, 8)
    };
    let (ry, rdx, rda) = ref_case.reference(DType::F32, true, Dropout::new(0.5, 17, 0).unwrap())?;
    assert_close("y", &host(&y0)?, &ry, 1e-5);
    assert_close("dX", &dx, &rdx, 1e-5);
    assert_close("dA", &da, &rda, 1e-5);
    Ok(())
}

#[test]
fn refusals_of_p_name_it_and_change_nothing() -> R {
    let c = Case::new(&[2], 8, 6, 2, 1);
    let x = tensor(&c.x, &c.shape(c.d_in), DType::F32)?;
    let mut l = layer(&c, 0.25)?;
    l.forward(&x)?;
    for p in [1.0, -0.1, f64::NAN, f64::INFINITY, 1.5] {
        let e = l.dropout_mut().set_p(p).unwrap_err().to_string();
        assert!(e.contains("`p`"), "p = {p}: {e}");
        assert_eq!(l.dropout().p(), 0.25);
        assert_eq!(l.dropout().offset(), 1);
        let e = layer(&c, 0.0)
            .and_then(|l| l.with_dropout(p))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`p`"), "p = {p}: {e}");
        assert_eq!(Dropout::new(p, 0, 0).unwrap_err().argument(), Some("p"));
    }
    // A refused forward (x of the wrong width) consumes no offset.
    let bad = Tensor::zeros((2, 7), DType::F32, &Device::Cpu)?;
    assert!(l.forward(&bad).is_err());
    assert_eq!(l.dropout().offset(), 1);
    // Nor does a refused eval forward give back an offset it never took.
    assert!(l.forward_t(&bad, false).is_err());
    assert_eq!(l.dropout().offset(), 1);
    Ok(())
}
