//! mse on the GPU against reference::mse, and its argument checks.

mod common;

use common::*;
use cudarc::driver::{CudaSlice, DevicePtrMut};
use half::{bf16, f16};
use singlora::{mse, mse_loss, reference, DType, MSE_PARTIALS};

/// (rows, cols, extra columns of pred, target, grad)
const CASES: &[(usize, usize, [usize; 3])] = &[
    (1, 1, [0, 0, 0]),
    (77, 300, [0, 0, 0]),
    (1029, 33, [3, 0, 5]),
    (4096, 512, [0, 8, 0]),
];

fn run_case<T: DType>(gpu: &Gpu, (rows, cols, pads): (usize, usize, [usize; 3]), seed: u64) {
    let name = format!("{} rows={rows} cols={cols} pads={pads:?}", T::NAME);
    let [lp, lt, lg] = pads.map(|p| cols + p);
    let mut r = rng(seed);
    let pred = quantize::<T>(&randn(&mut r, rows * cols, 1.0));
    let target = quantize::<T>(&randn(&mut r, rows * cols, 1.0));
    let pred_dev = upload::<T>(gpu, &restride(&pred, rows, cols, lp, 0.0));
    let target_dev = upload::<T>(gpu, &restride(&target, rows, cols, lt, 0.0));
    let mut grad_dev = poisoned::<T>(gpu, (rows - 1) * lg + cols);
    let mut partial = poisoned::<f32>(gpu, MSE_PARTIALS);
    let run = |grad: Option<(&mut dyn DevicePtrMut<T>, usize)>,
               scale: f32,
               partial: &mut CudaSlice<f32>| {
        let (p, t) = (&pred_dev, &target_dev);
        mse(&gpu.stream, rows, cols, p, lp, t, lt, grad, scale, partial).unwrap();
    };
    run(Some((&mut grad_dev, lg)), 1.0, &mut partial);
    let (loss, grad) = reference::mse(&pred, &target).unwrap();
    let partials: Vec<f32> = gpu.stream.clone_dtoh(&partial).unwrap();
    let got = mse_loss(&partials, rows, cols);
    assert!(
        (got - loss).abs() <= 1e-5 * loss,
        "loss ({name}): {got} vs {loss}"
    );
    let got_grad = download(gpu, &grad_dev);
    // The gaps of a strided grad stay poisoned: never written.
    for rr in 0..rows.saturating_sub(1) {
        for c in cols..lg {
            assert!(
                got_grad[rr * lg + c].is_nan(),
                "grad gap ({rr}, {c}) written ({name})"
            );
        }
    }
    // Per element: one rounding to T (f16's subnormal spacing included:
    // 2/count is below f16's normal range for large outputs) after a few
    // f32 roundings.
    let f32_eps = 2f64.powi(-24);
    let assert_grad = |what: &str, got: &[f64], want: &[f64]| {
        assert_each_within(&format!("{what} ({name})"), got, want, |i| {
            ulp::<T>(want[i]) + 4.0 * f32_eps * want[i].abs()
        });
    };
    assert_grad("grad", &unstride(&got_grad, rows, cols, lg), &grad);

    // A loss scale of 2^k scales the gradient exactly (powers of two).
    let mut scaled = poisoned::<T>(gpu, (rows - 1) * lg + cols);
    run(Some((&mut scaled, lg)), 1024.0, &mut partial);
    let scaled_ref: Vec<f64> = grad.iter().map(|g| g * 1024.0).collect();
    let got = unstride(&download(gpu, &scaled), rows, cols, lg);
    assert_grad("grad, loss scale 1024", &got, &scaled_ref);

    // Without a gradient buffer, the same partials, bit for bit.
    let mut again = poisoned::<f32>(gpu, MSE_PARTIALS);
    run(None, 1.0, &mut again);
    let again: Vec<f32> = gpu.stream.clone_dtoh(&again).unwrap();
    assert!(
        partials
            .iter()
            .zip(&again)
            .all(|(p, q)| p.to_bits() == q.to_bits()),
        "{name}"
    );
}

#[test]
fn mse_matches_reference() {
    run_typed!(CASES, run_case: f32 => 10, f16 => 20, bf16 => 30);
}

#[test]
fn sanitizer_mse() {
    run_typed!(&[(600, 33, [1, 2, 3])], run_case: bf16 => 40);
}

/// A refused mse: (rows, cols, ld_pred, ld_target, the ld of a grad buffer,
/// loss scale, a short partial buffer, the argument named).
type Refusal = (
    usize,
    usize,
    usize,
    usize,
    Option<usize>,
    f32,
    bool,
    &'static str,
);

#[test]
fn mse_refuses_bad_arguments() {
    let Some(gpu) = gpu() else { return };
    let p = upload::<f32>(&gpu, &[1.0; 12]);
    let t = upload::<f32>(&gpu, &[2.0; 12]);
    let mut g = poisoned::<f32>(&gpu, 12);
    let mut part = poisoned::<f32>(&gpu, MSE_PARTIALS);
    let mut short_part = poisoned::<f32>(&gpu, MSE_PARTIALS - 1);
    let s = &gpu.stream;
    let cases: [Refusal; 8] = [
        (0, 4, 4, 4, None, 1.0, false, "rows"),
        (3, 0, 4, 4, None, 1.0, false, "cols"),
        (3, 4, 3, 4, None, 1.0, false, "ld_pred"),
        (4, 4, 4, 4, None, 1.0, false, "pred"),
        (3, 4, 4, 5, None, 1.0, false, "target"),
        (3, 4, 4, 4, Some(5), 1.0, false, "grad"),
        (3, 4, 4, 4, None, 1.0, true, "partial"),
        (3, 4, 4, 4, None, 0.0, false, "loss_scale"),
    ];
    for (rows, cols, lp, lt, lg, loss_scale, short, want) in cases {
        let partial = if short { &mut short_part } else { &mut part };
        let grad: Option<(&mut dyn DevicePtrMut<f32>, usize)> = match lg {
            Some(ld) => Some((&mut g, ld)),
            None => None,
        };
        let err = mse(s, rows, cols, &p, lp, &t, lt, grad, loss_scale, partial).unwrap_err();
        assert_eq!(argument_named(&err), want);
    }
    assert!(download(&gpu, &g).iter().all(|v| v.is_nan()));
    assert!(download(&gpu, &part).iter().all(|v| v.is_nan()));
}

#[test]
fn reference_mse_by_hand() {
    let (loss, grad) = reference::mse(&[1.0, 2.0, 4.0], &[1.0, 0.0, 1.0]).unwrap();
    assert_eq!(loss, (0.0 + 4.0 + 9.0) / 3.0);
    assert_eq!(grad, vec![0.0, 4.0 / 3.0, 2.0]);
    assert_eq!(
        argument_named(&reference::mse(&[1.0], &[]).unwrap_err()),
        "target"
    );
    assert!((mse_loss(&[1.0, 2.0, 3.0], 2, 3) - 1.0).abs() < 1e-15);
}
