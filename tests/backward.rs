//! backward on the GPU against reference::backward (dX, Q, dA), dA's
//! determinism, a finite-difference round trip, a d = 65536 case; and the
//! argument checks and workspace formula, which run everywhere.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use singlora::{
    backward, backward_workspace_len, check_backward, forward, reference, BackwardLens, DType,
    Dims, DxOut, Error,
};

#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    /// Extra columns per row of X, G and dX.
    pad: usize,
    dx_beta: f32,
    da_beta: f32,
    saved_s: bool,
    with_dx: bool,
}

const fn case(
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    dx_beta: f32,
    da_beta: f32,
    saved_s: bool,
) -> Case {
    Case {
        tokens,
        d_in,
        d_out,
        rank,
        pad: 0,
        dx_beta,
        da_beta,
        saved_s,
        with_dx: true,
    }
}

const CASES: &[Case] = &[
    case(77, 256, 256, 16, 0.0, 0.0, true),
    case(77, 256, 256, 16, 1.0, 1.0, false),
    case(7, 96, 160, 8, 1.0, 0.0, true),
    case(7, 160, 96, 24, 0.0, 1.0, false),
    case(1, 200, 72, 1, 0.0, 0.0, true),
    case(77, 3424, 64, 64, 1.0, 1.0, true),
    case(33, 64, 3424, 128, 0.0, 0.0, false),
    case(4096, 512, 512, 64, 1.0, 0.0, true),
    case(600, 300, 260, 256, 0.0, 1.0, true),
    case(5, 40, 11, 7, 1.0, 1.0, false),
    case(65, 1000, 1003, 33, 0.0, 0.0, true),
    case(16, 4096, 4096, 16, 1.0, 0.0, true),
    case(9, 11008, 128, 16, 0.0, 1.0, true),
    Case {
        tokens: 50,
        d_in: 72,
        d_out: 88,
        rank: 200,
        pad: 5,
        dx_beta: 1.0,
        da_beta: 0.0,
        saved_s: false,
        with_dx: true,
    },
    Case {
        tokens: 70,
        d_in: 130,
        d_out: 90,
        rank: 40,
        pad: 8,
        dx_beta: 0.0,
        da_beta: 1.0,
        saved_s: true,
        with_dx: false,
    },
];

const SCALE: f32 = 0.625;

struct Inputs {
    x: Vec<f64>,
    a: Vec<f64>,
    g: Vec<f64>,
    dx0: Vec<f64>,
    da0: Vec<f64>,
}

fn inputs<T: DType>(dims: &Dims, seed: u64) -> Inputs {
    let mut r = rng(seed);
    Inputs {
        x: quantize::<T>(&randn(&mut r, dims.tokens * dims.d_in, 1.0)),
        a: quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt())),
        g: quantize::<T>(&randn(&mut r, dims.tokens * dims.d_out, 1.0)),
        dx0: quantize::<T>(&randn(&mut r, dims.tokens * dims.d_in, 1.0)),
        da0: quantize::<f32>(&randn(&mut r, dims.a_len(), 1.0)),
    }
}

/// Outputs of one GPU backward, downloaded.
struct Outputs {
    dx: Option<Vec<f64>>,
    q: Vec<f64>,
    da: Vec<f64>,
}

fn run_gpu<T: DType>(gpu: &Gpu, c: &Case, dims: &Dims, inp: &Inputs) -> Outputs {
    let ld = |d: usize| d + c.pad;
    let xd = upload::<T>(gpu, &restride(&inp.x, c.tokens, c.d_in, ld(c.d_in), 0.0));
    let gd = upload::<T>(gpu, &restride(&inp.g, c.tokens, c.d_out, ld(c.d_out), 0.0));
    let ad = upload::<T>(gpu, &inp.a);
    let sd: Option<CudaSlice<f32>> = c.saved_s.then(|| {
        // S from the GPU forward, as a training step would save it.
        let mut s = poisoned::<f32>(gpu, dims.s_len());
        let mut y = poisoned::<T>(gpu, dims.tokens * dims.d_out);
        forward(
            &gpu.stream,
            dims,
            &xd,
            ld(c.d_in),
            &ad,
            &mut y,
            c.d_out,
            Some(&mut s),
            SCALE,
            0.0,
        )
        .unwrap();
        s
    });
    let dx_init = if c.dx_beta == 0.0 {
        vec![f64::NAN; inp.dx0.len()]
    } else {
        inp.dx0.clone()
    };
    let mut dxd = upload::<T>(gpu, &restride(&dx_init, c.tokens, c.d_in, ld(c.d_in), 0.0));
    let da_init = if c.da_beta == 0.0 {
        vec![f64::NAN; inp.da0.len()]
    } else {
        inp.da0.clone()
    };
    let mut dad = upload_f32(gpu, &da_init);
    let ws_len = backward_workspace_len(dims, c.saved_s).unwrap();
    let mut ws = poisoned::<f32>(gpu, ws_len);
    let dx = c.with_dx.then(|| DxOut {
        dx: &mut dxd,
        ld_dx: ld(c.d_in),
        beta: c.dx_beta,
    });
    backward(
        &gpu.stream,
        dims,
        &xd,
        ld(c.d_in),
        &gd,
        ld(c.d_out),
        &ad,
        sd.as_ref().map(|s| s as _),
        SCALE,
        dx,
        &mut dad,
        c.da_beta,
        &mut ws,
    )
    .unwrap();
    let q = download(gpu, &ws)[..dims.s_len()].to_vec();
    Outputs {
        dx: c
            .with_dx
            .then(|| unstride(&download(gpu, &dxd), c.tokens, c.d_in, ld(c.d_in))),
        q,
        da: download(gpu, &dad),
    }
}

fn run_case<T: DType>(gpu: &Gpu, c: Case, seed: u64) {
    let dims = Dims::new(c.tokens, c.d_in, c.d_out, c.rank).unwrap();
    let name = format!("{c:?}");
    let inp = inputs::<T>(&dims, seed);
    let mut dx_ref = inp.dx0.clone();
    let mut da_ref = inp.da0.clone();
    let s = SCALE as f64;
    reference::backward(
        &dims,
        &inp.x,
        &inp.a,
        &inp.g,
        s,
        c.dx_beta as f64,
        &mut dx_ref,
        c.da_beta as f64,
        &mut da_ref,
    )
    .unwrap();
    // Q = G·A[:d_out], from the reference's shrink (a forward with X := G).
    let swapped = Dims::new(c.tokens, c.d_out, c.d_in, c.rank).unwrap();
    let mut scratch = vec![0.0; c.tokens * c.d_in];
    let q_ref = reference::forward(&swapped, &inp.g, &inp.a, 0.0, 0.0, &mut scratch).unwrap();

    let out = run_gpu::<T>(gpu, &c, &dims, &inp);
    if let Some(dx) = &out.dx {
        assert_close::<T>("dX", &name, dx, &dx_ref);
    }
    assert_close::<T>("Q", &name, &out.q, &q_ref);
    assert_close::<T>("dA", &name, &out.da, &da_ref);
}

fn all_cases<T: DType>() {
    let Some(gpu) = gpu() else { return };
    for (i, &c) in CASES.iter().enumerate() {
        run_case::<T>(&gpu, c, 200 + i as u64);
    }
}

#[test]
fn backward_matches_reference_f32() {
    all_cases::<f32>();
}

#[test]
fn backward_matches_reference_f16() {
    all_cases::<f16>();
}

#[test]
fn backward_matches_reference_bf16() {
    all_cases::<bf16>();
}

/// Small cases for compute-sanitizer.
#[test]
fn sanitizer_backward_small() {
    let Some(gpu) = gpu() else { return };
    let cases = [
        case(37, 72, 40, 24, 1.0, 1.0, true),
        case(300, 40, 72, 64, 0.0, 0.0, false),
        case(20, 33, 17, 100, 1.0, 0.0, true),
        case(9, 64, 48, 256, 0.0, 1.0, false),
    ];
    for (i, &c) in cases.iter().enumerate() {
        run_case::<bf16>(&gpu, c, 7 + i as u64);
        run_case::<f16>(&gpu, c, 17 + i as u64);
        run_case::<f32>(&gpu, c, 27 + i as u64);
    }
}

/// dA is bitwise identical across runs (fixed-order reduction, no atomics).
#[test]
fn backward_da_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    let c = case(4096, 1024, 768, 32, 0.0, 0.0, true);
    let dims = Dims::new(c.tokens, c.d_in, c.d_out, c.rank).unwrap();
    let inp = inputs::<bf16>(&dims, 99);
    let runs: Vec<Vec<u64>> = (0..3)
        .map(|_| {
            run_gpu::<bf16>(&gpu, &c, &dims, &inp)
                .da
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
}

/// Forward + backward round trip in f32: dA from the kernels agrees with
/// central finite differences of L = ½‖Y‖² computed through the GPU forward.
#[test]
fn backward_round_trip_finite_differences_f32() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(16, 24, 40, 4).unwrap();
    let mut r = rng(3);
    let x = randn(&mut r, 16 * 24, 1.0);
    let a = randn(&mut r, dims.a_len(), 0.5);
    let scale = 0.8f32;
    let xd = upload::<f32>(&gpu, &x);
    let loss = |a: &[f64]| -> (f64, CudaSlice<f32>, CudaSlice<f32>) {
        let ad = upload::<f32>(&gpu, a);
        let mut yd = poisoned::<f32>(&gpu, 16 * 40);
        let mut sd = poisoned::<f32>(&gpu, dims.s_len());
        forward(
            &gpu.stream,
            &dims,
            &xd,
            24,
            &ad,
            &mut yd,
            40,
            Some(&mut sd),
            scale,
            0.0,
        )
        .unwrap();
        let y = download(&gpu, &yd);
        (0.5 * y.iter().map(|v| v * v).sum::<f64>(), yd, sd)
    };
    // G = ∂L/∂Y = Y.
    let (_, yd, sd) = loss(&a);
    let ad = upload::<f32>(&gpu, &a);
    let mut dad = poisoned::<f32>(&gpu, dims.a_len());
    let mut ws = poisoned::<f32>(&gpu, backward_workspace_len(&dims, true).unwrap());
    backward(
        &gpu.stream,
        &dims,
        &xd,
        24,
        &yd,
        40,
        &ad,
        Some(&sd),
        scale,
        None,
        &mut dad,
        0.0,
        &mut ws,
    )
    .unwrap();
    let da = download(&gpu, &dad);
    let h = 1e-2;
    let mut fd = Vec::new();
    let mut got = Vec::new();
    for i in (0..dims.a_len()).step_by(7) {
        let mut ap = a.clone();
        ap[i] += h;
        let mut am = a.clone();
        am[i] -= h;
        fd.push((loss(&ap).0 - loss(&am).0) / (2.0 * h));
        got.push(da[i]);
    }
    let err = rel_l2(&got, &fd);
    assert!(
        err <= 1e-3,
        "dA vs finite differences: relative error {err:e}"
    );
}

/// d = 65536, rank 16: a bf16 d×d update would take 8 GiB; the kernels run in
/// the workspace the query reports (a few MiB) and match the reference.
#[test]
fn backward_large_d_without_d_squared_memory() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(64, 65536, 65536, 16).unwrap();
    let ws_len = backward_workspace_len(&dims, false).unwrap();
    assert!(
        ws_len * 4 < 64 << 20,
        "workspace {ws_len} f32 is not O(tokens·r + splits·D·r)"
    );
    let c = Case {
        tokens: 64,
        d_in: 65536,
        d_out: 65536,
        rank: 16,
        pad: 0,
        dx_beta: 0.0,
        da_beta: 0.0,
        saved_s: false,
        with_dx: true,
    };
    run_case::<bf16>(&gpu, c, 65536);
}

// ---- argument checks and workspace: no GPU needed ------------------------------

fn lens(dims: &Dims, saved_s: bool) -> BackwardLens {
    BackwardLens {
        x: dims.tokens * dims.d_in,
        ld_x: dims.d_in,
        g: dims.tokens * dims.d_out,
        ld_g: dims.d_out,
        a: dims.a_len(),
        saved_s: saved_s.then_some(dims.s_len()),
        dx: Some((dims.tokens * dims.d_in, dims.d_in, 1.0)),
        da: dims.a_len(),
        workspace: backward_workspace_len(dims, saved_s).unwrap(),
    }
}

#[test]
fn check_backward_names_every_bad_argument() {
    let d = Dims::new(10, 48, 32, 8).unwrap();
    let ok = lens(&d, true);
    check_backward(&d, &ok, 0.5, 1.0).unwrap();
    check_backward(&d, &lens(&d, false), 0.5, 0.0).unwrap();
    let bad: Vec<(BackwardLens, f32, f32, &str)> = vec![
        (BackwardLens { x: ok.x - 1, ..ok }, 0.5, 1.0, "x"),
        (BackwardLens { ld_x: 47, ..ok }, 0.5, 1.0, "ld_x"),
        (BackwardLens { g: ok.g - 1, ..ok }, 0.5, 1.0, "g"),
        (BackwardLens { ld_g: 31, ..ok }, 0.5, 1.0, "ld_g"),
        (BackwardLens { a: ok.a - 1, ..ok }, 0.5, 1.0, "a"),
        (
            BackwardLens {
                saved_s: Some(79),
                ..ok
            },
            0.5,
            1.0,
            "saved_s",
        ),
        (
            BackwardLens {
                dx: Some((479, 48, 1.0)),
                ..ok
            },
            0.5,
            1.0,
            "dx",
        ),
        (
            BackwardLens {
                dx: Some((480, 40, 1.0)),
                ..ok
            },
            0.5,
            1.0,
            "ld_dx",
        ),
        (
            BackwardLens {
                dx: Some((480, 48, 2.0)),
                ..ok
            },
            0.5,
            1.0,
            "dx_beta",
        ),
        (
            BackwardLens {
                da: ok.da - 1,
                ..ok
            },
            0.5,
            1.0,
            "da",
        ),
        (
            BackwardLens {
                workspace: ok.workspace - 1,
                ..ok
            },
            0.5,
            1.0,
            "workspace",
        ),
        (ok, f32::NAN, 1.0, "scale"),
        (ok, 0.5, -1.0, "da_beta"),
    ];
    for (l, scale, da_beta, want) in bad {
        let err = check_backward(&d, &l, scale, da_beta).unwrap_err();
        assert_eq!(argument_named(&err), want, "{err}");
    }
    // Without a saved S the workspace must also hold S.
    let e = check_backward(
        &d,
        &BackwardLens {
            saved_s: None,
            ..ok
        },
        0.5,
        1.0,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BufferTooSmall {
                name: "workspace",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn workspace_is_linear_in_tokens_and_d() {
    // Q (and S) are tokens × rank, rounded up to 64 elements; the partials are
    // 2 × splits × D × rank_pad with splits from dims alone.
    let d = Dims::new(16384, 4096, 4096, 64).unwrap();
    let tr = 16384 * 64;
    let bands = 4096 / 128;
    let splits = 256 / bands;
    assert_eq!(
        backward_workspace_len(&d, true).unwrap(),
        tr + 2 * splits * 4096 * 64
    );
    assert_eq!(
        backward_workspace_len(&d, false).unwrap(),
        2 * tr + 2 * splits * 4096 * 64
    );
    // Few tokens: one split, padding of rank 7 to 16, odd tokens·rank to 64.
    let d = Dims::new(5, 300, 200, 7).unwrap();
    assert_eq!(backward_workspace_len(&d, true).unwrap(), 64 + 2 * 300 * 16);
    // d = 65536: a d×d matrix would be 2^32 elements; the workspace is tiny.
    let d = Dims::new(64, 65536, 65536, 16).unwrap();
    assert_eq!(
        backward_workspace_len(&d, false).unwrap(),
        2 * 1024 + 2 * 65536 * 16
    );
    // Never O(d²), whatever the token count.
    for tokens in [1usize, 1000, 1 << 20] {
        let d = Dims::new(tokens, 8192, 8192, 256).unwrap();
        let len = backward_workspace_len(&d, false).unwrap();
        assert!(
            len <= 2 * tokens * 256 + 128 + 2 * 256 * 8192 * 256,
            "{tokens}: {len}"
        );
    }
}

/// Not a check: a fixed workload for `ncu` in the GPU run (SINGLORA_NCU=1):
/// bf16 backward at 16384 tokens, d = 4096, rank 16, with a saved S.
#[test]
#[ignore = "profiling workload, run by scripts/gpu/run.sh under ncu"]
fn profile_backward_bf16() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(16384, 4096, 4096, 16).unwrap();
    let mut r = rng(1);
    let xd = upload::<bf16>(&gpu, &randn(&mut r, 16384 * 4096, 1.0));
    let gd = upload::<bf16>(&gpu, &randn(&mut r, 16384 * 4096, 1.0));
    let ad = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.02));
    let sd = upload_f32(&gpu, &randn(&mut r, dims.s_len(), 1.0));
    let mut dxd = poisoned::<bf16>(&gpu, 16384 * 4096);
    let mut dad = poisoned::<f32>(&gpu, dims.a_len());
    let mut ws = poisoned::<f32>(&gpu, backward_workspace_len(&dims, true).unwrap());
    for _ in 0..2 {
        let dx = DxOut {
            dx: &mut dxd,
            ld_dx: 4096,
            beta: 0.0,
        };
        backward(
            &gpu.stream,
            &dims,
            &xd,
            4096,
            &gd,
            4096,
            &ad,
            Some(&sd),
            0.5,
            Some(dx),
            &mut dad,
            0.0,
            &mut ws,
        )
        .unwrap();
    }
    gpu.stream.synchronize().unwrap();
}
