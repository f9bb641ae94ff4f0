//! forward on the GPU against reference::forward (relative L2 of Y, of the
//! adapter term Y − beta·Y0 and of S, and every element within a bound
//! derived from the dtype's rounding, tests/common/bounds.rs), at strides and
//! base offsets that take the vector and the element-wise paths; the bounds'
//! self-check against a simulated kernel and the argument checks run
//! everywhere.

mod common;

use common::*;
use cudarc::driver::DevicePtr;
use half::{bf16, f16};
use singlora::{
    check_forward, forward, reference, DType, Dims, Error, ForwardKernel, ForwardPtrs,
    ForwardShape, Kernels,
};

/// Element offsets of X, A, Y and S from a 16-byte aligned base.
#[derive(Clone, Copy, Debug)]
struct Off {
    x: usize,
    a: usize,
    y: usize,
    s: usize,
}

const NO_OFF: Off = off(0, 0, 0, 0);

/// One forward case: shapes, row strides, beta, base offsets.
#[derive(Clone, Copy, Debug)]
struct Case {
    sh: Shape,
    /// Row stride of X.
    x_ld: Ld,
    /// Row stride of Y (Y is a slice of a wider output).
    y_ld: Ld,
    beta: f32,
    off: Off,
    /// The kernel asked for (the TMA one runs only where it applies).
    kernel: ForwardKernel,
}

/// A case of (tokens, d_in, d_out, rank): dense X, Y's rows padded by
/// `y_pad` elements, no base offsets.
const fn case(
    (tokens, d_in, d_out, rank): (usize, usize, usize, usize),
    y_pad: usize,
    beta: f32,
) -> Case {
    Case {
        sh: Shape::new(tokens, d_in, d_out, rank),
        x_ld: Ld::Dense,
        y_ld: if y_pad == 0 {
            Ld::Dense
        } else {
            Ld::Pad(y_pad)
        },
        beta,
        off: NO_OFF,
        kernel: ForwardKernel::Portable,
    }
}

/// `case` with a layout: row strides of X and Y, and base offsets.
const fn layout(c: Case, x_ld: Ld, y_ld: Ld, off: Off) -> Case {
    Case {
        x_ld,
        y_ld,
        off,
        ..c
    }
}

/// Base offsets of (X, A, Y, S).
const fn off(x: usize, a: usize, y: usize, s: usize) -> Off {
    Off { x, a, y, s }
}

/// Square and non-square both ways, ranks 1..256 across every bucket, tokens
/// 1, 7, 77, 4096, odd and unaligned d (3424, 11008, 1003), strided X and Y.
#[rustfmt::skip]
const CASES: &[Case] = &[
    case((77, 256, 256, 16), 0, 0.0),
    case((77, 256, 256, 16), 0, 1.0),
    case((7, 96, 160, 8), 0, 1.0),
    case((7, 160, 96, 24), 0, 0.0),
    case((1, 200, 72, 1), 0, 1.0),
    case((77, 3424, 64, 64), 0, 1.0),
    case((33, 64, 3424, 128), 0, 0.0),
    case((4096, 512, 512, 64), 0, 1.0),
    case((130, 300, 260, 256), 16, 1.0),
    case((77, 128, 192, 24), 64, 1.0),
    case((5, 40, 11, 7), 0, 0.0),
    case((65, 1000, 1003, 33), 3, 1.0),
    case((16, 4096, 4096, 16), 0, 1.0),
    case((9, 11008, 128, 16), 0, 1.0),
    layout(case((50, 72, 88, 200), 0, 1.0), Ld::Pad(5), Ld::Pad(8), NO_OFF),
];

/// Layouts: row strides that keep every row 16-byte aligned (`Ld::Aligned`:
/// the vector paths, with a tail chunk where d is not a multiple of the
/// vector width), and base addresses 1 or 3 elements off 16-byte alignment
/// (the element-wise paths; 4 is off for 16-bit types only, 8 for none),
/// through views into larger buffers. Tokens are not multiples of 64 and
/// some d not of 8; few-token cases take the decode kernel on sm_90.
#[rustfmt::skip]
const LAYOUT_CASES: &[Case] = &[
    layout(case((77, 200, 131, 24), 0, 1.0), Ld::Aligned, Ld::Aligned, NO_OFF),
    layout(case((70, 333, 96, 40), 0, 0.0), Ld::Aligned, Ld::Dense, NO_OFF),
    layout(case((65, 256, 200, 16), 0, 1.0), Ld::Dense, Ld::Dense, off(1, 1, 3, 1)),
    layout(case((130, 136, 75, 64), 0, 0.0), Ld::Aligned, Ld::Aligned, off(3, 0, 1, 3)),
    layout(case((33, 96, 160, 8), 0, 1.0), Ld::Aligned, Ld::Dense, off(8, 8, 8, 4)),
    layout(case((7, 1000, 72, 32), 0, 1.0), Ld::Dense, Ld::Aligned, off(3, 1, 8, 0)),
    layout(case((5, 4100, 4096, 16), 0, 0.0), Ld::Aligned, Ld::Dense, off(0, 3, 1, 1)),
    layout(case((100, 90, 260, 200), 0, 1.0), Ld::Aligned, Ld::Aligned, off(1, 4, 4, 0)),
];

const SCALE: f32 = 0.75;

/// The inputs of one case and the f64 reference.
struct Data {
    x: Vec<f64>,
    a: Vec<f64>,
    y0: Vec<f64>,
    /// S = X·A_in.
    s: Vec<f64>,
    /// The adapter term s·S·A_outᵀ.
    term: Vec<f64>,
    /// Y = beta·Y0 + term.
    y: Vec<f64>,
}

/// Random inputs (X, A of any sign, or all positive: a coherent
/// accumulation for the bounds' self-check) and the reference.
fn data<T: DType>(sh: Shape, beta: f32, seed: u64, positive: bool) -> Data {
    let dims = sh.dims();
    let mut r = rng(seed);
    let sign = |v: Vec<f64>| -> Vec<f64> {
        if positive {
            v.into_iter().map(f64::abs).collect()
        } else {
            v
        }
    };
    let x = quantize::<T>(&sign(randn(&mut r, sh.tokens * sh.d_in, 1.0)));
    let a = quantize::<T>(&sign(randn(
        &mut r,
        dims.a_len(),
        1.0 / (dims.d() as f64).sqrt(),
    )));
    let mut term = vec![0.0; sh.tokens * sh.d_out];
    let s = reference::forward(
        &dims,
        &x,
        &a,
        SCALE as f64,
        0.0,
        &mut term,
        singlora::Dropout::NONE,
    )
    .unwrap();
    // Y0 on the term's scale: a much larger Y0 would hide the term in Y's
    // relative error, and the rounding of Y0 + term to T would swamp the
    // term's own.
    let y0 = quantize::<T>(&randn(&mut r, sh.tokens * sh.d_out, rms(&term)));
    let mut y = y0.clone();
    reference::forward(
        &dims,
        &x,
        &a,
        SCALE as f64,
        beta as f64,
        &mut y,
        singlora::Dropout::NONE,
    )
    .unwrap();
    Data {
        x,
        a,
        y0,
        s,
        term,
        y,
    }
}

fn bounds<T: DType>(sh: Shape, d: &Data, beta: f32) -> ShrinkExpandBounds {
    shrink_expand_bounds::<T>(
        &d.x,
        sh.tokens,
        sh.d_in,
        &d.a,
        sh.rank,
        sh.d_out,
        SCALE as f64,
        beta as f64,
        &d.s,
        &d.term,
        &d.y,
    )
}

/// Every check of a forward's Y and S (downloaded, unstrided): relative L2
/// of Y, of the adapter term and of S at T's bar, and every element within
/// its bound.
#[allow(clippy::too_many_arguments)]
fn check_outputs<T: DType>(
    name: &str,
    sh: Shape,
    beta: f32,
    d: &Data,
    b: &ShrinkExpandBounds,
    y: &[f64],
    s: &[f64],
) {
    assert_close::<T>("Y", name, y, &d.y);
    assert_close::<T>(
        "Y − beta·Y0 (the adapter term)",
        name,
        &adapter_term(y, &d.y0, beta),
        &d.term,
    );
    assert_close::<T>("S", name, s, &d.s);
    assert_within_bounds("Y", name, y, &d.y, &b.out, sh.d_out);
    assert_within_bounds("S", name, s, &d.s, &b.narrow, sh.rank);
}

/// Runs one case on the GPU and checks Y and S, every element written, and
/// the gaps of strided Y and the cells around every output untouched.
fn run_case<T: DType>(gpu: &Gpu, c: Case, seed: u64) {
    run_case_on::<T>(gpu, c, seed);
}

/// [`run_case`], returning the kernel that ran.
fn run_case_on<T: DType>(gpu: &Gpu, c: Case, seed: u64) -> ForwardKernel {
    let (sh, dims) = (c.sh, c.sh.dims());
    let (tokens, d_in, d_out, _) = sh.parts();
    let (ld_x, ld_y) = (c.x_ld.of::<T>(d_in), c.y_ld.of::<T>(d_out));
    let name = format!("{c:?}");
    let d = data::<T>(sh, c.beta, seed, false);
    let b = bounds::<T>(sh, &d, c.beta);

    // X's gaps and the cells around X and A hold NaN: the kernel must read
    // none of them.
    let xd = Placed::<T>::strided(gpu, &d.x, (tokens, d_in, ld_x), c.off.x, f64::NAN);
    let ad = Placed::<T>::input(gpu, &d.a, c.off.a);
    // beta = 0: Y is poisoned, so an unwritten element shows as NaN.
    let y_init = initial(&d.y0, c.beta);
    let mut yd = Placed::<T>::strided(gpu, &y_init, (tokens, d_out, ld_y), c.off.y, SENTINEL);
    let mut sd = Placed::<f32>::output(gpu, &vec![f64::NAN; dims.s_len()], c.off.s);
    let ran = {
        let shape = ForwardShape::new(&dims, ld_x, ld_y, SCALE, c.beta)
            .unwrap()
            .with_kernel(c.kernel);
        let ptr = |v: &cudarc::driver::CudaView<'_, T>| v.device_ptr(&gpu.stream).0;
        let ptrs = ForwardPtrs {
            x: ptr(&xd.view()),
            a: ptr(&ad.view()),
            y: ptr(&yd.view()),
            s: sd.view().device_ptr(&gpu.stream).0,
        };
        shape.kernel_for::<T>(&Kernels::for_stream(&gpu.stream).unwrap(), &ptrs)
    };
    let (x_in, y_out) = ((&xd, ld_x), (&mut yd, ld_y));
    forward_placed(
        gpu,
        &dims,
        x_in,
        &ad,
        y_out,
        Some(&mut sd),
        (SCALE, c.beta),
        c.kernel,
    );

    let y = yd.read_strided(gpu, &format!("Y ({name})"), (tokens, d_out, ld_y));
    let s = sd.read(gpu, &format!("S ({name})"));
    check_outputs::<T>(&name, sh, c.beta, &d, &b, &y, &s);
    ran
}

/// Shapes for the TMA forward beyond the grids above (where it applies:
/// f16/bf16, rank ≤ 64 and a multiple of 8, more than 64 tokens, X, A and Y
/// 16-byte aligned with pitches of 16-byte multiples): d = 4096 both
/// buckets, d not a multiple of 64 (boxes past the matrix' edge: zeros in,
/// nothing out), tokens ending inside a row block, column splits (few row
/// blocks, 11008 wide), a strided Y (a column slice of a wider output),
/// both betas.
#[rustfmt::skip]
const TMA_CASES: &[Case] = &[
    case((4096, 4096, 4096, 64), 0, 1.0),
    case((1100, 1000, 520, 32), 0, 1.0),
    case((300, 72, 4096, 8), 0, 0.0),
    case((130, 4096, 11008, 16), 0, 1.0),
    case((65, 128, 192, 24), 64, 1.0),
    case((777, 2000, 2000, 56), 8, 0.0),
    layout(case((200, 200, 136, 40), 0, 1.0), Ld::Aligned, Ld::Aligned, NO_OFF),
    layout(case((99, 333, 96, 48), 0, 0.0), Ld::Aligned, Ld::Dense, NO_OFF),
];

/// The TMA forward (sm_90a) against the reference on the grids and
/// TMA_CASES, f16 and bf16; where the documented rule says it applies it is
/// the kernel that runs (ForwardShape::kernel_for on the call's pointers),
/// elsewhere the portable one.
fn tma_cases<T: DType>() {
    let Some(gpu) = gpu() else { return };
    if with_kernel(&gpu, &format!("forward_tma_sm90_{}_r32", T::NAME)).is_none() {
        return;
    }
    let mut ran = 0;
    for (i, c) in CASES
        .iter()
        .chain(LAYOUT_CASES)
        .chain(TMA_CASES)
        .enumerate()
    {
        let c = Case {
            kernel: ForwardKernel::Tma,
            ..*c
        };
        let (tokens, d_in, d_out, rank) = c.sh.parts();
        let aligned = |off: usize, ld: usize| (off * 2) % 16 == 0 && (ld * 2) % 16 == 0;
        let applies = tokens > 64
            && rank % 8 == 0
            && rank <= 64
            && aligned(c.off.x, c.x_ld.of::<T>(d_in))
            && aligned(c.off.y, c.y_ld.of::<T>(d_out))
            && aligned(c.off.a, rank);
        let kernel = run_case_on::<T>(&gpu, c, 900 + i as u64);
        assert_eq!(kernel == ForwardKernel::Tma, applies, "{c:?}");
        ran += usize::from(applies);
    }
    assert!(ran >= 10, "only {ran} cases ran the TMA forward");
}

#[test]
fn forward_tma_matches_reference_f16() {
    tma_cases::<half::f16>();
}

#[test]
fn forward_tma_matches_reference_bf16() {
    tma_cases::<half::bf16>();
}

/// Small TMA cases for compute-sanitizer (f16, bf16): both buckets, both
/// betas, a partial row block and a partial box of columns.
#[test]
fn sanitizer_forward_tma_small() {
    #[rustfmt::skip]
    let cases = [
        Case { kernel: ForwardKernel::Tma, ..case((70, 72, 40, 24), 8, 1.0) },
        Case { kernel: ForwardKernel::Tma, ..case((130, 200, 96, 64), 0, 0.0) },
        Case { kernel: ForwardKernel::Tma, ..case((65, 64, 136, 16), 0, 1.0) },
    ];
    run_typed!(&cases, run_case: bf16 => 47, f16 => 57);
}

typed_tests! {
    forward_matches_reference_f32, forward_matches_reference_f16, forward_matches_reference_bf16
        => run_typed!(CASES, run_case: T => 100);
    forward_layouts_f32, forward_layouts_f16, forward_layouts_bf16
        => run_typed!(LAYOUT_CASES, run_case: T => 300);
}

/// The layout cases take both the 16-byte and the element-wise paths of X,
/// Y and A for every type, and the 16-byte path with a tail (d not a
/// multiple of the vector width), by the launcher's rule: base address and
/// row stride both multiples of 16 bytes.
#[test]
fn layout_cases_take_vector_and_elementwise_paths() {
    fn check<T: DType>() {
        assert_takes_both_paths::<T, _, 2>(LAYOUT_CASES, ["X", "Y"], |c| {
            let x = (c.off.x, c.x_ld.of::<T>(c.sh.d_in), c.sh.d_in);
            (
                [x, (c.off.y, c.y_ld.of::<T>(c.sh.d_out), c.sh.d_out)],
                (c.off.a, c.sh.rank),
            )
        });
    }
    each_dtype!(check);
}

/// The bounds' self-check (CPU, always runs): for f32, f16 and bf16, a
/// simulated kernel (f32 FMAs, or tensor-core steps that truncate; S rounded
/// to T on chip with f16's row scaling; chunked sums as the decode kernel
/// splits d; the f32 epilogue) passes every check a GPU case runs, and one
/// element of Y (or S) moved by a few percent of the term's RMS does not.
#[test]
fn forward_bounds_admit_a_simulated_kernel_and_reject_one_wrong_element() {
    each_dtype!(self_check);
}

fn self_check<T: DType>() {
    // (tokens, d_in, d_out, rank, beta, products per chunk of the shrink,
    // positive data). Chunks: none, or the decode kernel's split of d over a
    // cluster of 8 (64 · ⌈k tiles / 8⌉ products).
    let none = usize::MAX;
    let shapes = [
        (70, 300, 200, 24, 1.0, none, false),
        (33, 130, 90, 64, 0.0, 64, false),
        (9, 4000, 48, 16, 1.0, 512, false),
        (20, 72, 40, 256, 1.0, none, false),
        (3, 16384, 24, 8, 1.0, 2048, true),
    ];
    // By how much (of its RMS) one wrong element of Y, of S, is caught.
    let (p_y, p_s) = match T::NAME {
        "f32" => (5e-3, 5e-3),
        "f16" => (1.5e-2, 5e-3),
        _ => (6e-2, 5e-3),
    };
    for (i, &(tokens, d_in, d_out, rank, beta, chunk, positive)) in shapes.iter().enumerate() {
        let sh = Shape {
            tokens,
            d_in,
            d_out,
            rank,
        };
        let d = data::<T>(sh, beta, 900 + i as u64, positive);
        let b = bounds::<T>(sh, &d, beta);
        let s = sim::shrink::<T>(&d.x, tokens, d_in, &d.a, rank, chunk);
        let y = sim::expand::<T>(&s, tokens, rank, &d.a, d_out, SCALE, beta, &d.y0);
        let name = format!(
            "simulated {} {:?}",
            T::NAME,
            (tokens, d_in, d_out, rank, beta, positive)
        );
        check_outputs::<T>(&name, sh, beta, &d, &b, &y, &s);

        if positive {
            // All-positive data: a coherent accumulation, for the bounds'
            // admission only (a few percent of a large S is no test of
            // tightness).
            continue;
        }
        println!(
            "{name}: {}; {}",
            check_bound_tightness(&name, "Y", &y, &d.y, &b.out, rms(&d.term), p_y),
            check_bound_tightness(&name, "S", &s, &d.s, &b.narrow, rms(&d.s), p_s),
        );
    }
}

/// Small cases for compute-sanitizer (memcheck, racecheck, initcheck): every
/// bucket, both betas, a strided and an unaligned shape, aligned strides and
/// misaligned base addresses.
#[test]
fn sanitizer_forward_small() {
    #[rustfmt::skip]
    let cases = [
        case((37, 72, 40, 24), 8, 1.0),
        case((37, 40, 72, 64), 0, 0.0),
        case((20, 33, 17, 100), 0, 1.0),
        case((9, 64, 48, 256), 0, 0.0),
        layout(case((37, 45, 72, 24), 0, 1.0), Ld::Aligned, Ld::Aligned, off(1, 3, 1, 1)),
        layout(case((70, 72, 33, 40), 0, 0.0), Ld::Aligned, Ld::Aligned, NO_OFF),
    ];
    run_typed!(&cases, run_case: bf16 => 7, f16 => 17, f32 => 27);
}

/// Large f16 values: S far outside f16's range still gives a finite, exact Y
/// (S is kept scaled by powers of two on chip).
#[test]
fn forward_f16_large_s() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(5);
    let dims = Dims::new(64, 512, 256, 16).unwrap();
    let x = quantize::<f16>(&randn(&mut r, 64 * 512, 300.0));
    let a = quantize::<f16>(&randn(&mut r, dims.a_len(), 30.0));
    let mut y_ref = vec![0.0; 64 * 256];
    let s_ref = reference::forward(
        &dims,
        &x,
        &a,
        1e-4,
        0.0,
        &mut y_ref,
        singlora::Dropout::NONE,
    )
    .unwrap();
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
        singlora::Dropout::NONE,
    )
    .unwrap();
    assert_close::<f16>("Y", "large S", &download(&gpu, &yd), &y_ref);
}

/// Tokens = 0 is a no-op that touches nothing.
#[test]
fn forward_zero_tokens_is_noop() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(0, 64, 64, 8).unwrap();
    let x = upload::<bf16>(&gpu, &[1.0]);
    let a = upload::<bf16>(&gpu, &vec![1.0; dims.a_len()]);
    let mut y = upload::<bf16>(&gpu, &[3.0]);
    forward(
        &gpu.stream,
        &dims,
        &x,
        64,
        &a,
        &mut y,
        64,
        None,
        1.0,
        0.0,
        singlora::Dropout::NONE,
    )
    .unwrap();
    assert_eq!(download(&gpu, &y), vec![3.0]);
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
        singlora::Dropout::NONE,
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
    // Invalid dims cannot reach a launcher: Dims exists only once checked.
    for rank in [0, 257] {
        assert!(matches!(
            Dims::new(4, 8, 8, rank),
            Err(Error::InvalidDim { name: "rank", .. })
        ));
    }
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
                singlora::Dropout::NONE,
            )
            .unwrap();
        }
        gpu.stream.synchronize().unwrap();
    }
}
