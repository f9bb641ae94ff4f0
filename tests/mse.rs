//! mse on the GPU against reference::mse, and its argument checks.

mod common;

use common::*;
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
    mse(
        &gpu.stream,
        rows,
        cols,
        &pred_dev,
        lp,
        &target_dev,
        lt,
        Some((&mut grad_dev, lg)),
        1.0,
        &mut partial,
    )
    .unwrap();
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
    let got = unstride(&got_grad, rows, cols, lg);
    assert_each_within(&format!("grad ({name})"), &got, &grad, |i| {
        ulp::<T>(grad[i]) + 4.0 * f32_eps * grad[i].abs()
    });

    // A loss scale of 2^k scales the gradient exactly (powers of two).
    let mut scaled = poisoned::<T>(gpu, (rows - 1) * lg + cols);
    mse(
        &gpu.stream,
        rows,
        cols,
        &pred_dev,
        lp,
        &target_dev,
        lt,
        Some((&mut scaled, lg)),
        1024.0,
        &mut partial,
    )
    .unwrap();
    let scaled_ref: Vec<f64> = grad.iter().map(|g| g * 1024.0).collect();
    let got = unstride(&download(gpu, &scaled), rows, cols, lg);
    assert_each_within(
        &format!("grad, loss scale 1024 ({name})"),
        &got,
        &scaled_ref,
        |i| ulp::<T>(scaled_ref[i]) + 4.0 * f32_eps * scaled_ref[i].abs(),
    );

    // Without a gradient buffer, the same partials, bit for bit.
    let mut again = poisoned::<f32>(gpu, MSE_PARTIALS);
    mse(
        &gpu.stream,
        rows,
        cols,
        &pred_dev,
        lp,
        &target_dev,
        lt,
        None,
        1.0,
        &mut again,
    )
    .unwrap();
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
    let Some(gpu) = gpu() else { return };
    for (i, &c) in CASES.iter().enumerate() {
        run_case::<f32>(&gpu, c, 10 + i as u64);
        run_case::<f16>(&gpu, c, 20 + i as u64);
        run_case::<bf16>(&gpu, c, 30 + i as u64);
    }
}

#[test]
fn sanitizer_mse() {
    let Some(gpu) = gpu() else { return };
    run_case::<bf16>(&gpu, (600, 33, [1, 2, 3]), 40);
}

#[test]
fn mse_refuses_bad_arguments() {
    let Some(gpu) = gpu() else { return };
    let p = upload::<f32>(&gpu, &[1.0; 12]);
    let t = upload::<f32>(&gpu, &[2.0; 12]);
    let mut g = poisoned::<f32>(&gpu, 12);
    let mut part = poisoned::<f32>(&gpu, MSE_PARTIALS);
    let mut short_part = poisoned::<f32>(&gpu, MSE_PARTIALS - 1);
    let s = &gpu.stream;
    let named = |e: singlora::Error| argument_named(&e);
    assert_eq!(
        named(mse(s, 0, 4, &p, 4, &t, 4, None, 1.0, &mut part).unwrap_err()),
        "rows"
    );
    assert_eq!(
        named(mse(s, 3, 0, &p, 4, &t, 4, None, 1.0, &mut part).unwrap_err()),
        "cols"
    );
    assert_eq!(
        named(mse(s, 3, 4, &p, 3, &t, 4, None, 1.0, &mut part).unwrap_err()),
        "ld_pred"
    );
    assert_eq!(
        named(mse(s, 4, 4, &p, 4, &t, 4, None, 1.0, &mut part).unwrap_err()),
        "pred"
    );
    assert_eq!(
        named(mse(s, 3, 4, &p, 4, &t, 5, None, 1.0, &mut part).unwrap_err()),
        "target"
    );
    assert_eq!(
        named(mse(s, 3, 4, &p, 4, &t, 4, Some((&mut g, 5)), 1.0, &mut part).unwrap_err()),
        "grad"
    );
    assert_eq!(
        named(mse(s, 3, 4, &p, 4, &t, 4, None, 1.0, &mut short_part).unwrap_err()),
        "partial"
    );
    assert_eq!(
        named(mse(s, 3, 4, &p, 4, &t, 4, None, 0.0, &mut part).unwrap_err()),
        "loss_scale"
    );
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
