//! adamw on the GPU against reference::adamw (f64), over several steps, with
//! and without f32 master weights, and its argument checks.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use singlora::{adamw, reference, AdamW, AdamWState, DType};

const CFG: AdamW = AdamW {
    lr: 3e-3,
    beta1: 0.9,
    beta2: 0.99,
    eps: 1e-8,
    weight_decay: 0.05,
};

/// Three steps over n elements with fresh random gradients each step;
/// checks A, the master copy and both moments element by element.
fn run_case<T: DType>(gpu: &Gpu, n: usize, with_master: bool, seed: u64) {
    let name = format!("{} n={n} master={with_master}", T::NAME);
    let mut r = rng(seed);
    let a0 = quantize::<T>(&randn(&mut r, n, 0.05));
    let mut a_dev = upload::<T>(gpu, &a0);
    let mut master_dev: Option<CudaSlice<f32>> = with_master.then(|| upload_f32(gpu, &a0));
    let mut m_dev = gpu.stream.alloc_zeros::<f32>(n).unwrap();
    let mut v_dev = gpu.stream.alloc_zeros::<f32>(n).unwrap();
    // The reference's parameter is the master (f32) or A itself (in T).
    let (mut p, mut m, mut v) = (a0.clone(), vec![0.0; n], vec![0.0; n]);
    let grad_scale = 0.5;
    for step in 1..=3u64 {
        // Gradients of very different sizes, zeros included.
        let mut g = randn(&mut r, n, 1.0);
        for (i, x) in g.iter_mut().enumerate() {
            *x *= [1e-3, 1.0, 30.0, 0.0][i % 4];
        }
        let g = quantize::<f32>(&g);
        let g_dev = upload_f32(gpu, &g);
        adamw(
            &gpu.stream,
            &CFG,
            step,
            &mut a_dev,
            &g_dev,
            grad_scale as f32,
            AdamWState {
                m: &mut m_dev,
                v: &mut v_dev,
                master: master_dev.as_mut().map(|d| d as _),
            },
        )
        .unwrap();
        reference::adamw(&CFG, step, &mut p, &g, grad_scale, &mut m, &mut v).unwrap();
        let f32_eps = 2f64.powi(-24);
        let got_m = download(gpu, &m_dev);
        let got_v = download(gpu, &v_dev);
        assert_each_within(&format!("m step {step} ({name})"), &got_m, &m, |i| {
            8.0 * f32_eps * (m[i].abs() + g[i].abs())
        });
        assert_each_within(&format!("v step {step} ({name})"), &got_v, &v, |i| {
            8.0 * f32_eps * (v[i].abs() + g[i] * g[i])
        });
        // The update lr·m̂/(√v̂ + ε) is formed in f32: a few roundings of lr.
        let update_tol = |i: usize| 16.0 * f32_eps * (p[i].abs() + CFG.lr as f64);
        let got_a = download(gpu, &a_dev);
        match &master_dev {
            Some(master) => {
                let got_master = download(gpu, master);
                assert_each_within(
                    &format!("master step {step} ({name})"),
                    &got_master,
                    &p,
                    update_tol,
                );
                // A is the master rounded to T, exactly.
                let rounded: Vec<f64> = got_master
                    .iter()
                    .map(|&x| round_f32_to::<T>(x as f32))
                    .collect();
                assert_each_within(
                    &format!("A = round(master) step {step} ({name})"),
                    &got_a,
                    &rounded,
                    |_| 0.0,
                );
            }
            None => {
                assert_each_within(&format!("A step {step} ({name})"), &got_a, &p, |i| {
                    update_tol(i) + ulp::<T>(p[i])
                });
                // The reference continues from what A holds, as the kernel does.
                p = got_a;
            }
        }
    }
}

#[test]
fn adamw_matches_reference() {
    let Some(gpu) = gpu() else { return };
    run_case::<f32>(&gpu, 7001, false, 1);
    run_case::<bf16>(&gpu, 4096 * 16 + 3, true, 2);
    run_case::<f16>(&gpu, 999, true, 3);
    run_case::<bf16>(&gpu, 1000, false, 4);
}

#[test]
fn sanitizer_adamw() {
    let Some(gpu) = gpu() else { return };
    run_case::<bf16>(&gpu, 1029, true, 5);
}

#[test]
fn refused_adamw_leaves_everything_untouched() {
    let Some(gpu) = gpu() else { return };
    let n = 300;
    let mut r = rng(6);
    let a0 = quantize::<f32>(&randn(&mut r, n, 0.1));
    let mut a = upload::<f32>(&gpu, &a0);
    let g = upload_f32(&gpu, &randn(&mut r, n, 1.0));
    let short = upload_f32(&gpu, &randn(&mut r, n - 1, 1.0));
    let mut m = gpu.stream.alloc_zeros::<f32>(n).unwrap();
    let mut v = gpu.stream.alloc_zeros::<f32>(n).unwrap();
    let mut short_v = gpu.stream.alloc_zeros::<f32>(n - 1).unwrap();
    let mut call = |cfg: AdamW, step: u64, grad: &CudaSlice<f32>, short_state: bool, gs: f32| {
        let state = AdamWState {
            m: &mut m,
            v: if short_state { &mut short_v } else { &mut v },
            master: None,
        };
        argument_named(&adamw(&gpu.stream, &cfg, step, &mut a, grad, gs, state).unwrap_err())
    };
    let ok = AdamW::default();
    assert_eq!(call(ok, 0, &g, false, 1.0), "step");
    assert_eq!(call(AdamW { lr: f32::NAN, ..ok }, 1, &g, false, 1.0), "lr");
    assert_eq!(call(AdamW { beta1: 1.0, ..ok }, 1, &g, false, 1.0), "beta1");
    assert_eq!(
        call(AdamW { beta2: -0.1, ..ok }, 1, &g, false, 1.0),
        "beta2"
    );
    assert_eq!(call(AdamW { eps: 0.0, ..ok }, 1, &g, false, 1.0), "eps");
    assert_eq!(
        call(
            AdamW {
                weight_decay: -1.0,
                ..ok
            },
            1,
            &g,
            false,
            1.0
        ),
        "weight_decay"
    );
    assert_eq!(call(ok, 1, &g, false, f32::INFINITY), "grad_scale");
    assert_eq!(call(ok, 1, &short, false, 1.0), "grad");
    assert_eq!(call(ok, 1, &g, true, 1.0), "v");
    assert_eq!(download(&gpu, &a), a0);
    assert!(download(&gpu, &m).iter().all(|&x| x == 0.0));
}

#[test]
fn bias_corrections_and_reference_checks() {
    let cfg = AdamW::default();
    let (b1, b2) = cfg.bias_corrections(1).unwrap();
    assert!((b1 - (1.0 - 0.9f32 as f64)).abs() < 1e-15);
    assert!((b2 - (1.0 - 0.999f32 as f64)).abs() < 1e-15);
    let (b1, b2) = cfg.bias_corrections(u64::MAX).unwrap();
    assert_eq!((b1, b2), (1.0, 1.0));
    assert_eq!(
        argument_named(&cfg.bias_corrections(0).unwrap_err()),
        "step"
    );

    // One reference step by hand: p=1, g=2, lr=0.1, wd=0.5, betas 0.5/0.75.
    let cfg = AdamW {
        lr: 0.1,
        beta1: 0.5,
        beta2: 0.75,
        eps: 0.0625,
        weight_decay: 0.5,
    };
    let (mut p, mut m, mut v) = (vec![1.0], vec![0.0], vec![0.0]);
    reference::adamw(&cfg, 1, &mut p, &[2.0], 1.0, &mut m, &mut v).unwrap();
    // decay: 0.95; m = 1, v = 1; m̂ = 2, v̂ = 4; update 0.1·2/(2 + 0.0625).
    let lr = 0.1f32 as f64;
    let want = (1.0 - lr * 0.5) - lr * 2.0 / (2.0 + 0.0625);
    assert!((p[0] - want).abs() < 1e-9, "{} vs {want}", p[0]);
    assert_eq!((m[0], v[0]), (1.0, 1.0));
    let err = reference::adamw(&cfg, 1, &mut p, &[], 1.0, &mut m, &mut v).unwrap_err();
    assert_eq!(argument_named(&err), "grad");
}
