//! forward on the GPU against reference::forward, and its argument checks
//! (which run everywhere).

mod common;

use common::*;
use half::{bf16, f16};
use singlora::{check_forward, forward, reference, DType, Dims, Error};

/// One forward case: shapes, output row padding, beta.
#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    /// Extra columns per row of Y (Y is a slice of a wider output).
    y_pad: usize,
    /// Extra columns per row of X.
    x_pad: usize,
    beta: f32,
}

const fn case(
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    y_pad: usize,
    beta: f32,
) -> Case {
    Case {
        tokens,
        d_in,
        d_out,
        rank,
        y_pad,
        x_pad: 0,
        beta,
    }
}

/// Square and non-square both ways, ranks 1..256 across every bucket, tokens
/// 1, 7, 77, 4096, odd and unaligned d (3424, 11008, 1003), strided X and Y.
const CASES: &[Case] = &[
    case(77, 256, 256, 16, 0, 0.0),
    case(77, 256, 256, 16, 0, 1.0),
    case(7, 96, 160, 8, 0, 1.0),
    case(7, 160, 96, 24, 0, 0.0),
    case(1, 200, 72, 1, 0, 1.0),
    case(77, 3424, 64, 64, 0, 1.0),
    case(33, 64, 3424, 128, 0, 0.0),
    case(4096, 512, 512, 64, 0, 1.0),
    case(130, 300, 260, 256, 16, 1.0),
    case(77, 128, 192, 24, 64, 1.0),
    case(5, 40, 11, 7, 0, 0.0),
    case(65, 1000, 1003, 33, 3, 1.0),
    case(16, 4096, 4096, 16, 0, 1.0),
    case(9, 11008, 128, 16, 0, 1.0),
    Case {
        tokens: 50,
        d_in: 72,
        d_out: 88,
        rank: 200,
        y_pad: 8,
        x_pad: 5,
        beta: 1.0,
    },
];

const SCALE: f32 = 0.75;
const SENTINEL: f64 = 1234.5;

/// Runs one case on the GPU and checks Y, S, every element written, and the
/// gaps of strided Y untouched.
fn run_case<T: DType>(gpu: &Gpu, c: Case, seed: u64) {
    let dims = Dims::new(c.tokens, c.d_in, c.d_out, c.rank).unwrap();
    let (ld_x, ld_y) = (c.d_in + c.x_pad, c.d_out + c.y_pad);
    let name = format!("{c:?}");
    let mut r = rng(seed);
    let x = quantize::<T>(&randn(&mut r, c.tokens * c.d_in, 1.0));
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
    let y0 = quantize::<T>(&randn(&mut r, c.tokens * c.d_out, 1.0));

    let mut y_ref = y0.clone();
    let s_ref = reference::forward(&dims, &x, &a, SCALE as f64, c.beta as f64, &mut y_ref).unwrap();

    let xd = upload::<T>(gpu, &restride(&x, c.tokens, c.d_in, ld_x, 0.0));
    let ad = upload::<T>(gpu, &a);
    // beta = 0: Y is poisoned, so an unwritten element shows as NaN.
    let y_init = if c.beta == 0.0 {
        vec![f64::NAN; c.tokens * c.d_out]
    } else {
        y0.clone()
    };
    let mut yd = upload::<T>(gpu, &restride(&y_init, c.tokens, c.d_out, ld_y, SENTINEL));
    let mut sd = poisoned::<f32>(gpu, dims.s_len());
    forward(
        &gpu.stream,
        &dims,
        &xd,
        ld_x,
        &ad,
        &mut yd,
        ld_y,
        Some(&mut sd),
        SCALE,
        c.beta,
    )
    .unwrap();

    let y_all = download(gpu, &yd);
    assert_close::<T>(
        "Y",
        &name,
        &unstride(&y_all, c.tokens, c.d_out, ld_y),
        &y_ref,
    );
    assert_close::<T>("S", &name, &download(gpu, &sd)[..dims.s_len()], &s_ref);
    for row in 0..c.tokens.saturating_sub(1) {
        for col in c.d_out..ld_y {
            assert_eq!(
                y_all[row * ld_y + col],
                T::from_f64(SENTINEL).to_f64(),
                "{name}: gap ({row},{col}) written"
            );
        }
    }
}

fn all_cases<T: DType>() {
    let Some(gpu) = gpu() else { return };
    for (i, &c) in CASES.iter().enumerate() {
        run_case::<T>(&gpu, c, 100 + i as u64);
    }
}

#[test]
fn forward_matches_reference_f32() {
    all_cases::<f32>();
}

#[test]
fn forward_matches_reference_f16() {
    all_cases::<f16>();
}

#[test]
fn forward_matches_reference_bf16() {
    all_cases::<bf16>();
}

/// Small cases for compute-sanitizer (memcheck, racecheck, initcheck): every
/// bucket, both betas, a strided and an unaligned shape.
#[test]
fn sanitizer_forward_small() {
    let Some(gpu) = gpu() else { return };
    let cases = [
        case(37, 72, 40, 24, 8, 1.0),
        case(37, 40, 72, 64, 0, 0.0),
        case(20, 33, 17, 100, 0, 1.0),
        case(9, 64, 48, 256, 0, 0.0),
    ];
    for (i, &c) in cases.iter().enumerate() {
        run_case::<bf16>(&gpu, c, 7 + i as u64);
        run_case::<f16>(&gpu, c, 17 + i as u64);
        run_case::<f32>(&gpu, c, 27 + i as u64);
    }
}

/// Large f16 values: S far outside f16's range still gives a finite, exact Y
/// (S is kept scaled by powers of two on chip).
#[test]
fn forward_f16_large_s() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(64, 512, 256, 16).unwrap();
    let mut r = rng(5);
    let x = quantize::<f16>(&randn(&mut r, 64 * 512, 300.0));
    let a = quantize::<f16>(&randn(&mut r, dims.a_len(), 30.0));
    let mut y_ref = vec![0.0; 64 * 256];
    let s_ref = reference::forward(&dims, &x, &a, 1e-4, 0.0, &mut y_ref).unwrap();
    assert!(
        s_ref.iter().any(|v| v.abs() > 65504.0),
        "the case must overflow f16 in S"
    );
    let xd = upload::<f16>(&gpu, &x);
    let ad = upload::<f16>(&gpu, &a);
    let mut yd = poisoned::<f16>(&gpu, 64 * 256);
    forward(
        &gpu.stream,
        &dims,
        &xd,
        512,
        &ad,
        &mut yd,
        256,
        None,
        1e-4,
        0.0,
    )
    .unwrap();
    assert_close::<f16>("Y", "large S", &download(&gpu, &yd), &y_ref);
}

/// Tokens = 0 is a no-op that touches nothing.
#[test]
fn forward_zero_tokens_is_noop() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(0, 64, 64, 8).unwrap();
    let xd = upload::<bf16>(&gpu, &[1.0]);
    let ad = upload::<bf16>(&gpu, &vec![1.0; dims.a_len()]);
    let mut yd = upload::<bf16>(&gpu, &[3.0]);
    forward(
        &gpu.stream,
        &dims,
        &xd,
        64,
        &ad,
        &mut yd,
        64,
        None,
        1.0,
        0.0,
    )
    .unwrap();
    assert_eq!(download(&gpu, &yd), vec![3.0]);
}

/// A refused launch names the argument and leaves the outputs untouched.
#[test]
fn forward_refused_on_gpu_touches_nothing() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(8, 64, 32, 8).unwrap();
    let xd = upload::<bf16>(&gpu, &vec![1.0; 8 * 64]);
    let ad = upload::<bf16>(&gpu, &vec![1.0; dims.a_len()]);
    let mut yd = upload::<bf16>(&gpu, &vec![2.0; 8 * 32 - 1]);
    let mut sd = upload_f32(&gpu, &vec![5.0; 64]);
    let err = forward(
        &gpu.stream,
        &dims,
        &xd,
        64,
        &ad,
        &mut yd,
        32,
        Some(&mut sd),
        1.0,
        0.0,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferTooSmall {
                name: "y",
                required: 256,
                actual: 255
            }
        ),
        "{err}"
    );
    assert!(download(&gpu, &yd).iter().all(|&v| v == 2.0));
    assert!(download(&gpu, &sd).iter().all(|&v| v == 5.0));
}

// ---- argument checks: no GPU needed ------------------------------------------

fn dims() -> Dims {
    Dims::new(10, 48, 32, 8).unwrap()
}

#[test]
fn check_forward_accepts_exact_and_strided_buffers() {
    let d = dims();
    check_forward(&d, 480, 48, d.a_len(), 320, 32, Some(80), 0.5, 1.0).unwrap();
    // Strided Y: (tokens-1)·ld + d_out elements suffice.
    check_forward(&d, 480, 48, d.a_len(), 9 * 100 + 32, 100, None, 0.5, 0.0).unwrap();
}

#[test]
fn check_forward_names_every_bad_argument() {
    let d = dims();
    let a = d.a_len();
    let cases: Vec<(Error, &str)> = vec![
        (
            check_forward(&d, 479, 48, a, 320, 32, None, 0.5, 1.0).unwrap_err(),
            "x",
        ),
        (
            check_forward(&d, 480, 47, a, 320, 32, None, 0.5, 1.0).unwrap_err(),
            "ld_x",
        ),
        (
            check_forward(&d, 480, 48, a - 1, 320, 32, None, 0.5, 1.0).unwrap_err(),
            "a",
        ),
        (
            check_forward(&d, 480, 48, a, 319, 32, None, 0.5, 1.0).unwrap_err(),
            "y",
        ),
        (
            check_forward(&d, 480, 48, a, 320, 31, None, 0.5, 1.0).unwrap_err(),
            "ld_y",
        ),
        (
            check_forward(&d, 480, 48, a, 320, 32, Some(79), 0.5, 1.0).unwrap_err(),
            "s",
        ),
        (
            check_forward(&d, 480, 48, a, 320, 32, None, f32::NAN, 1.0).unwrap_err(),
            "scale",
        ),
        (
            check_forward(&d, 480, 48, a, 320, 32, None, f32::INFINITY, 1.0).unwrap_err(),
            "scale",
        ),
        (
            check_forward(&d, 480, 48, a, 320, 32, None, 0.5, 0.5).unwrap_err(),
            "beta",
        ),
    ];
    for (err, want) in cases {
        assert_eq!(argument_named(&err), want, "{err}");
    }
    let e = check_forward(&d, 479, 48, a, 320, 32, None, 0.5, 1.0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BufferTooSmall {
                required: 480,
                actual: 479,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn check_forward_refuses_invalid_dims_and_overflow() {
    let bad = Dims {
        tokens: 4,
        d_in: 8,
        d_out: 8,
        rank: 0,
    };
    assert!(matches!(
        check_forward(&bad, 32, 8, 0, 32, 8, None, 1.0, 0.0),
        Err(Error::InvalidDim { name: "rank", .. })
    ));
    let bad = Dims {
        tokens: 4,
        d_in: 8,
        d_out: 8,
        rank: 257,
    };
    assert!(matches!(
        check_forward(&bad, 32, 8, 0, 32, 8, None, 1.0, 0.0),
        Err(Error::InvalidDim { name: "rank", .. })
    ));
    // A stride whose row offsets overflow.
    let d = Dims::new(1 << 20, 8, 8, 4).unwrap();
    let e = check_forward(
        &d,
        usize::MAX,
        usize::MAX / 4,
        32,
        usize::MAX,
        8,
        None,
        1.0,
        0.0,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidStride { name: "ld_x", .. } | Error::Overflow { .. }
        ),
        "{e}"
    );
}

/// Not a check: a fixed workload for `ncu` in the GPU run (SINGLORA_NCU=1):
/// bf16 forward at decode size (16 tokens) and at 16384 tokens, rank 16.
#[test]
#[ignore = "profiling workload, run by scripts/gpu/run.sh under ncu"]
fn profile_forward_bf16() {
    let Some(gpu) = gpu() else { return };
    for tokens in [16usize, 16384] {
        let dims = Dims::new(tokens, 4096, 4096, 16).unwrap();
        let mut r = rng(1);
        let xd = upload::<bf16>(&gpu, &randn(&mut r, tokens * 4096, 1.0));
        let ad = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.02));
        let mut yd = upload::<bf16>(&gpu, &randn(&mut r, tokens * 4096, 1.0));
        for _ in 0..3 {
            forward(
                &gpu.stream,
                &dims,
                &xd,
                4096,
                &ad,
                &mut yd,
                4096,
                None,
                0.5,
                1.0,
            )
            .unwrap();
        }
        gpu.stream.synchronize().unwrap();
    }
}
