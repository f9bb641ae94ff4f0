//! backward on the GPU against reference::backward: relative L2 of dX, of
//! its adapter term dX − dx_beta·dX0, of Q, of dA and of the gradient
//! dA − da_beta·dA0, and every element within a bound derived from the
//! dtype's rounding (tests/common/bounds.rs), at strides and base offsets
//! that take the vector and the element-wise paths; dA's determinism, a
//! finite-difference round trip, a d = 65536 case. The bounds' self-check
//! against a simulated kernel, the argument checks and the workspace formula
//! run everywhere.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use singlora::{
    backward, backward_workspace_len, check_backward, forward, BackwardKernel, BackwardLens,
    BackwardOptions, DType, Dims, Dropout, DxOut, Error, Kernels,
};

/// Element offsets of X, G, A, dX, dA and the saved S from a 16-byte
/// aligned base.
#[derive(Clone, Copy, Debug)]
struct Off {
    x: usize,
    g: usize,
    a: usize,
    dx: usize,
    da: usize,
    s: usize,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    sh: Shape,
    /// Row stride of X, G and dX.
    ld: Ld,
    dx_beta: f32,
    da_beta: f32,
    saved_s: bool,
    with_dx: bool,
    off: Off,
    /// The kernels asked for (the fused one runs only where it applies).
    kernel: BackwardKernel,
}

/// Base offsets of (X, G, A, dX, dA, S).
const fn off(x: usize, g: usize, a: usize, dx: usize, da: usize, s: usize) -> Off {
    Off { x, g, a, dx, da, s }
}

const NO_OFF: Off = off(0, 0, 0, 0, 0, 0);

/// A case of (tokens, d_in, d_out, rank) with dX: the rows of X, G and dX
/// padded by `pad` elements, no base offsets.
const fn case(
    (tokens, d_in, d_out, rank): (usize, usize, usize, usize),
    pad: usize,
    dx_beta: f32,
    da_beta: f32,
    saved_s: bool,
) -> Case {
    Case {
        sh: Shape::new(tokens, d_in, d_out, rank),
        ld: if pad == 0 { Ld::Dense } else { Ld::Pad(pad) },
        dx_beta,
        da_beta,
        saved_s,
        with_dx: true,
        off: NO_OFF,
        kernel: BackwardKernel::Split,
    }
}

/// `case` with a layout: row stride and base offsets.
const fn layout(c: Case, ld: Ld, off: Off) -> Case {
    Case { ld, off, ..c }
}

/// `c` asking for the fused kernel.
const fn fused(c: Case) -> Case {
    Case {
        kernel: BackwardKernel::Fused,
        ..c
    }
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    case((77, 256, 256, 16), 0, 0.0, 0.0, true),
    case((77, 256, 256, 16), 0, 1.0, 1.0, false),
    case((7, 96, 160, 8), 0, 1.0, 0.0, true),
    case((7, 160, 96, 24), 0, 0.0, 1.0, false),
    case((1, 200, 72, 1), 0, 0.0, 0.0, true),
    case((77, 3424, 64, 64), 0, 1.0, 1.0, true),
    case((33, 64, 3424, 128), 0, 0.0, 0.0, false),
    case((4096, 512, 512, 64), 0, 1.0, 0.0, true),
    case((600, 300, 260, 256), 0, 0.0, 1.0, true),
    case((5, 40, 11, 7), 0, 1.0, 1.0, false),
    case((65, 1000, 1003, 33), 0, 0.0, 0.0, true),
    case((16, 4096, 4096, 16), 0, 1.0, 0.0, true),
    case((9, 11008, 128, 16), 0, 0.0, 1.0, true),
    case((50, 72, 88, 200), 5, 1.0, 0.0, false),
    Case {
        with_dx: false,
        ..case((70, 130, 90, 40), 8, 0.0, 1.0, true)
    },
];

/// Layouts (see tests/forward.rs): 16-byte aligned row strides (vector
/// paths with tails), and base addresses 1 or 3 elements off 16-byte
/// alignment (element-wise paths; 4 is off for 16-bit types only, 8 for
/// none), on the dX launch and on dA's reads of X, G and S. Tokens are not
/// multiples of 64 (300 splits dA's tokens at 150), some d not of 8.
#[rustfmt::skip]
const LAYOUT_CASES: &[Case] = &[
    layout(case((77, 201, 131, 24), 0, 1.0, 1.0, true), Ld::Aligned, NO_OFF),
    layout(case((70, 333, 96, 40), 0, 0.0, 1.0, false), Ld::Aligned, off(1, 3, 1, 1, 1, 0)),
    layout(case((300, 256, 200, 16), 0, 1.0, 0.0, true), Ld::Dense, off(3, 1, 3, 3, 3, 1)),
    layout(case((130, 136, 75, 64), 0, 0.0, 0.0, true), Ld::Aligned, off(8, 4, 8, 4, 4, 8)),
    layout(case((7, 1000, 72, 32), 0, 1.0, 1.0, false), Ld::Dense, off(3, 1, 1, 8, 1, 0)),
    layout(case((600, 90, 260, 200), 0, 1.0, 0.0, true), Ld::Aligned, off(1, 1, 0, 1, 0, 1)),
    Case {
        with_dx: false,
        ..layout(case((65, 104, 77, 16), 0, 0.0, 1.0, false), Ld::Aligned, off(1, 3, 4, 0, 3, 0))
    },
];

/// Shapes for the fused kernel (bf16, rank ≤ 32, d ≤ 4096) beyond the grids
/// above: d = 4096 and non-square both ways, bands that end inside a warp's
/// columns (d not a multiple of 8 or of 64), token ranges over several
/// clusters ending inside a step (16 clusters from 4096 tokens on), ranks
/// 1, 17 and 32 (both buckets, padded columns), misaligned bases and padded
/// strides (the element-wise copies and dX's unpaired stores).
#[rustfmt::skip]
const FUSED_CASES: &[Case] = &[
    case((1100, 4096, 4096, 32), 0, 0.0, 0.0, true),
    case((300, 4096, 1000, 16), 0, 1.0, 1.0, false),
    case((520, 1000, 4096, 24), 0, 0.0, 1.0, true),
    case((257, 333, 517, 8), 0, 1.0, 0.0, false),
    case((1, 64, 64, 1), 0, 0.0, 0.0, true),
    case((5000, 512, 384, 17), 0, 1.0, 1.0, true),
    case((4100, 72, 4096, 16), 0, 0.0, 0.0, false),
    Case { with_dx: false, ..case((600, 2048, 2048, 32), 0, 0.0, 1.0, true) },
    layout(case((333, 1001, 999, 16), 0, 1.0, 1.0, true), Ld::Aligned, off(1, 3, 1, 1, 1, 0)),
    layout(case((200, 4000, 4095, 8), 0, 0.0, 0.0, false), Ld::Pad(8), off(0, 0, 3, 0, 0, 0)),
    layout(case((77, 130, 90, 32), 0, 1.0, 0.0, true), Ld::Dense, off(3, 1, 3, 3, 3, 1)),
];

const SCALE: f32 = 0.625;

/// The inputs of one case and the f64 reference.
struct Data {
    x: Vec<f64>,
    a: Vec<f64>,
    g: Vec<f64>,
    dx0: Vec<f64>,
    da0: Vec<f64>,
    /// S = X·A_in and Q = G·A_out.
    s: Vec<f64>,
    q: Vec<f64>,
    /// The adapter term of dX, s·Q·A_inᵀ, and dX = dx_beta·dX0 + it.
    dx_term: Vec<f64>,
    dx: Vec<f64>,
    /// The gradient s·(GᵀS ⊕ XᵀQ), and dA = da_beta·dA0 + it.
    da_term: Vec<f64>,
    da: Vec<f64>,
}

/// Random inputs and the reference. X and G are drawn independently with
/// signs symmetric (the dA bound's Hoeffding part relies on it); dX0 and dA0
/// on the scale of their terms (see tests/forward.rs for Y0).
fn data<T: DType>(sh: Shape, dx_beta: f32, da_beta: f32, seed: u64) -> Data {
    let dims = &sh.dims();
    let mut r = rng(seed);
    let x = quantize::<T>(&randn(&mut r, sh.tokens * sh.d_in, 1.0));
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
    let g = quantize::<T>(&randn(&mut r, sh.tokens * sh.d_out, 1.0));
    let s = SCALE as f64;
    let xga = [&x[..], &g, &a];
    let (dx_term, da_term) = reference_grads(dims, xga, s, Dropout::NONE);
    let dx0 = quantize::<T>(&randn(&mut r, sh.tokens * sh.d_in, rms(&dx_term)));
    let da0 = quantize::<f32>(&randn(&mut r, dims.a_len(), rms(&da_term)));
    let starts = [(&dx0[..], dx_beta as f64), (&da0[..], da_beta as f64)];
    let (dx, da) = reference_backward_onto(dims, xga, s, starts, Dropout::NONE);
    let s_ref = reference_s(dims, &x, &a, Dropout::NONE);
    // Q = G·A[:d_out], from the reference's shrink (a forward with X := G).
    let q = reference_q(dims, &g, &a);
    Data {
        x,
        a,
        g,
        dx0,
        da0,
        s: s_ref,
        q,
        dx_term,
        dx,
        da_term,
        da,
    }
}

/// Per-element bounds of one backward's outputs.
struct Bounds {
    s: Vec<f64>,
    q: Vec<f64>,
    /// None without dX.
    dx: Option<Vec<f64>>,
    da: Vec<f64>,
}

fn bounds<T: DType>(c: &Case, d: &Data) -> Bounds {
    let (tokens, d_in, d_out, rank) = c.sh.parts();
    let s = shrink_bound::<T>(&d.x, tokens, d_in, &d.a, rank);
    let q = shrink_bound::<T>(&d.g, tokens, d_out, &d.a, rank);
    let dx = c.with_dx.then(|| {
        expand_bound::<T>(
            &d.q,
            &q,
            tokens,
            rank,
            &d.a,
            d_in,
            SCALE as f64,
            c.dx_beta as f64,
            &d.dx_term,
            &d.dx,
        )
    });
    let da = da_bound::<T>(
        c.sh,
        &d.x,
        &d.g,
        &d.s,
        &s,
        &d.q,
        &q,
        SCALE as f64,
        c.da_beta as f64,
        &d.da_term,
        &d.da,
    );
    Bounds { s, q, dx, da }
}

/// Outputs of one GPU backward, downloaded.
struct Outputs {
    dx: Option<Vec<f64>>,
    q: Vec<f64>,
    da: Vec<f64>,
    /// The forward's S that the backward was given (saved_s cases).
    saved_s: Option<Vec<f64>>,
}

fn run_gpu<T: DType>(gpu: &Gpu, c: &Case, dims: &Dims, d: &Data) -> Outputs {
    let (tokens, d_in, d_out, _) = c.sh.parts();
    let (ld_x, ld_g) = (c.ld.of::<T>(d_in), c.ld.of::<T>(d_out));
    let name = format!("{c:?}");
    // Gaps and the cells around inputs hold NaN: no kernel may read them.
    let xd = Placed::<T>::strided(gpu, &d.x, (tokens, d_in, ld_x), c.off.x, f64::NAN);
    let gd = Placed::<T>::strided(gpu, &d.g, (tokens, d_out, ld_g), c.off.g, f64::NAN);
    let ad = Placed::<T>::input(gpu, &d.a, c.off.a);
    let sd: Option<Placed<f32>> = c.saved_s.then(|| {
        // S from the GPU forward, as a training step would save it.
        // NaN guard cells: S is an input of the backward (a read outside it
        // poisons dA), and the forward must not write them either.
        let mut s = Placed::<f32>::new(gpu, &vec![f64::NAN; dims.s_len()], c.off.s, f64::NAN);
        let mut y = poisoned::<T>(gpu, tokens * d_out);
        forward(
            &gpu.stream,
            dims,
            &xd.view(),
            ld_x,
            &ad.view(),
            &mut y,
            d_out,
            Some(&mut s.view_mut()),
            SCALE,
            0.0,
            Dropout::NONE,
        )
        .unwrap();
        s
    });
    let dx_init = initial(&d.dx0, c.dx_beta);
    let mut dxd = Placed::<T>::strided(gpu, &dx_init, (tokens, d_in, ld_x), c.off.dx, SENTINEL);
    let da_init = initial(&d.da0, c.da_beta);
    let mut dad = Placed::<f32>::output(gpu, &da_init, c.off.da);
    let mut ws = poisoned_workspace(gpu, dims, c.saved_s);
    {
        let mut dx_view = dxd.view_mut();
        let s_view = sd.as_ref().map(|s| s.view());
        let dx = c.with_dx.then_some(DxOut {
            dx: &mut dx_view,
            ld_dx: ld_x,
            beta: c.dx_beta,
        });
        backward(
            &gpu.stream,
            dims,
            &xd.view(),
            ld_x,
            &gd.view(),
            ld_g,
            &ad.view(),
            s_view.as_ref().map(|s| s as _),
            SCALE,
            dx,
            &mut dad.view_mut(),
            c.da_beta,
            &mut ws,
            BackwardOptions {
                dropout: Dropout::NONE,
                kernel: c.kernel,
            },
        )
        .unwrap();
    }
    let q = download(gpu, &ws)[..dims.s_len()].to_vec();
    let dx_all = dxd.read(gpu, &format!("dX ({name})"));
    let dx = if c.with_dx {
        assert_gaps_untouched::<T>(&format!("dX ({name})"), &dx_all, tokens, d_in, ld_x);
        Some(unstride(&dx_all, tokens, d_in, ld_x))
    } else {
        None
    };
    Outputs {
        dx,
        q,
        da: dad.read(gpu, &format!("dA ({name})")),
        saved_s: sd.map(|s| s.read(gpu, &format!("saved S ({name})"))),
    }
}

/// Every check of a backward's outputs: relative L2 of dX, of its adapter
/// term, of Q, of dA and of the gradient at T's bar, and every element (of
/// the saved S too) within its bound.
fn check_outputs<T: DType>(name: &str, c: &Case, d: &Data, b: &Bounds, out: &Outputs) {
    if let Some(dx) = &out.dx {
        assert_close::<T>("dX", name, dx, &d.dx);
        assert_close::<T>(
            "dX − dx_beta·dX0 (the adapter term)",
            name,
            &adapter_term(dx, &d.dx0, c.dx_beta),
            &d.dx_term,
        );
        let bound = b.dx.as_ref().expect("dX bounds");
        assert_within_bounds("dX", name, dx, &d.dx, bound, c.sh.d_in);
    }
    assert_close::<T>("Q", name, &out.q, &d.q);
    assert_within_bounds("Q", name, &out.q, &d.q, &b.q, c.sh.rank);
    assert_close::<T>("dA", name, &out.da, &d.da);
    assert_close::<T>(
        "dA − da_beta·dA0 (the gradient)",
        name,
        &adapter_term(&out.da, &d.da0, c.da_beta),
        &d.da_term,
    );
    assert_within_bounds("dA", name, &out.da, &d.da, &b.da, c.sh.rank);
    if let Some(s) = &out.saved_s {
        assert_within_bounds("saved S", name, s, &d.s, &b.s, c.sh.rank);
    }
}

fn run_case<T: DType>(gpu: &Gpu, c: Case, seed: u64) {
    let dims = c.sh.dims();
    let name = format!("{c:?}");
    let d = data::<T>(c.sh, c.dx_beta, c.da_beta, seed);
    let b = bounds::<T>(&c, &d);
    let out = run_gpu::<T>(gpu, &c, &dims, &d);
    check_outputs::<T>(&name, &c, &d, &b, &out);
}

/// The layout cases take both the 16-byte and the element-wise paths of X,
/// G, dX and A for every type, and the 16-byte path with a tail (d not a
/// multiple of the vector width), by the launchers' rule: base address and
/// row stride both multiples of 16 bytes.
#[test]
fn layout_cases_take_vector_and_elementwise_paths() {
    fn check<T: DType>() {
        assert_takes_both_paths::<T, _, 3>(LAYOUT_CASES, ["X", "G", "dX"], |c| {
            let (ld_x, ld_g) = (c.ld.of::<T>(c.sh.d_in), c.ld.of::<T>(c.sh.d_out));
            let x = (c.off.x, ld_x, c.sh.d_in);
            let g = (c.off.g, ld_g, c.sh.d_out);
            ([x, g, (c.off.dx, ld_x, c.sh.d_in)], (c.off.a, c.sh.rank))
        });
    }
    each_dtype!(check);
}

typed_tests! {
    backward_matches_reference_f32, backward_matches_reference_f16, backward_matches_reference_bf16
        => run_typed!(CASES, run_case: T => 200);
    backward_layouts_f32, backward_layouts_f16, backward_layouts_bf16
        => run_typed!(LAYOUT_CASES, run_case: T => 400);
}

fn self_check<T: DType>() {
    let none = usize::MAX;
    // (case, dA token splits, products per chunk of the shrinks)
    let shapes = [
        (case((70, 72, 40, 16), 0, 1.0, 1.0, true), 1, none),
        (case((300, 40, 72, 24), 0, 0.0, 1.0, true), 2, 64),
        (case((600, 33, 17, 64), 0, 1.0, 0.0, true), 3, none),
        (case((2000, 24, 40, 8), 0, 0.0, 0.0, true), 5, none),
        (case((9, 2000, 48, 16), 0, 1.0, 1.0, true), 1, 512),
    ];
    // By how much (of its RMS) one wrong element of dX, of Q, of dA is
    // caught.
    let (p_dx, p_q, p_da) = match T::NAME {
        "f32" => (5e-3, 5e-3, 5e-3),
        "f16" => (1.5e-2, 5e-3, 2.5e-2),
        _ => (6e-2, 5e-3, 1.2e-1),
    };
    for (i, &(c, splits, chunk)) in shapes.iter().enumerate() {
        let d = data::<T>(c.sh, c.dx_beta, c.da_beta, 950 + i as u64);
        let b = bounds::<T>(&c, &d);
        let (tokens, d_in, d_out, rank) = c.sh.parts();
        let s = sim::shrink::<T>(&d.x, tokens, d_in, &d.a, rank, chunk);
        let q = sim::shrink::<T>(&d.g, tokens, d_out, &d.a, rank, chunk);
        let dx = sim::expand::<T>(&q, tokens, rank, &d.a, d_in, SCALE, c.dx_beta, &d.dx0);
        let da = sim::da::<T>(c.sh, &d.x, &d.g, &s, &q, SCALE, c.da_beta, &d.da0, splits);
        let out = Outputs {
            dx: Some(dx),
            q,
            da,
            saved_s: Some(s),
        };
        let name = format!(
            "simulated {} {:?}",
            T::NAME,
            (tokens, d_in, d_out, rank, splits)
        );
        check_outputs::<T>(&name, &c, &d, &b, &out);

        let dx = out.dx.as_ref().unwrap();
        let bdx = b.dx.as_ref().unwrap();
        println!(
            "{name}: {}; {}; {}",
            check_bound_tightness(&name, "dX", dx, &d.dx, bdx, rms(&d.dx_term), p_dx),
            check_bound_tightness(&name, "Q", &out.q, &d.q, &b.q, rms(&d.q), p_q),
            check_bound_tightness(&name, "dA", &out.da, &d.da, &b.da, rms(&d.da_term), p_da),
        );
    }
}

/// The bounds' self-check (CPU, always runs): for f32, f16 and bf16, a
/// simulated kernel (see tests/common/bounds.rs: Q and S accumulated in
/// f32 steps, chunked as the decode kernel splits d; Q rounded to T for dX;
/// dA from S and Q rounded to T per column and token split, f16 scaled,
/// the split partials summed in f32) passes every check a GPU case runs,
/// and one element of dX, Q or dA moved by a few percent of its RMS does not.
#[test]
fn backward_bounds_admit_a_simulated_kernel_and_reject_one_wrong_element() {
    each_dtype!(self_check);
}

/// Small cases for compute-sanitizer, aligned strides and misaligned base
/// addresses among them.
#[test]
fn sanitizer_backward_small() {
    #[rustfmt::skip]
    let cases = [
        case((37, 72, 40, 24), 0, 1.0, 1.0, true),
        case((300, 40, 72, 64), 0, 0.0, 0.0, false),
        case((20, 33, 17, 100), 0, 1.0, 0.0, true),
        case((9, 64, 48, 256), 0, 0.0, 1.0, false),
        layout(case((37, 45, 72, 24), 0, 1.0, 1.0, true), Ld::Aligned, off(1, 3, 3, 1, 1, 1)),
        layout(case((70, 72, 33, 40), 0, 0.0, 0.0, false), Ld::Aligned, NO_OFF),
    ];
    run_typed!(&cases, run_case: bf16 => 7, f16 => 17, f32 => 27);
}

/// The registry where the device runs the fused kernel (the sm_90a module
/// is loaded: compute capability 9.0).
fn fused_available(gpu: &Gpu) -> Option<std::sync::Arc<Kernels>> {
    with_kernel(gpu, "backward_fused_sm90_bf16_r16")
}

/// The fused kernel against the reference on every case of the grids and
/// on FUSED_CASES, bf16, where it applies (rank ≤ 32, d_in and d_out
/// ≤ 4096, tokens > 0: the documented rule, restated here); it is the one
/// that runs there, and the split path runs elsewhere.
#[test]
fn backward_fused_matches_reference_bf16() {
    let Some(gpu) = gpu() else { return };
    let Some(kernels) = fused_available(&gpu) else {
        return;
    };
    let mut ran = 0;
    for (i, c) in CASES
        .iter()
        .chain(LAYOUT_CASES)
        .chain(FUSED_CASES)
        .enumerate()
    {
        let c = fused(*c);
        let dims = c.sh.dims();
        let applies =
            dims.tokens() > 0 && dims.d_in() <= 4096 && dims.d_out() <= 4096 && dims.rank() <= 32;
        let runs = BackwardKernel::Fused.resolve::<bf16>(&kernels, &dims);
        assert_eq!(runs == BackwardKernel::Fused, applies, "{c:?}");
        if applies {
            // (The others ran the split path in backward_matches_reference_bf16.)
            ran += 1;
            run_case::<bf16>(&gpu, c, 700 + i as u64);
        }
    }
    assert!(ran >= 20, "only {ran} cases ran the fused kernel");
    // The reduce-scatter exchange on the fused cases.
    for (i, c) in FUSED_CASES.iter().enumerate() {
        let c = Case {
            kernel: BackwardKernel::FusedScatter,
            ..*c
        };
        let runs = BackwardKernel::FusedScatter.resolve::<bf16>(&kernels, &c.sh.dims());
        assert_eq!(runs, BackwardKernel::FusedScatter, "{c:?}");
        run_case::<bf16>(&gpu, c, 800 + i as u64);
    }
    // Other element types always take the split path.
    let dims = Dims::new(64, 256, 256, 16).unwrap();
    assert_eq!(
        BackwardKernel::Fused.resolve::<f16>(&kernels, &dims),
        BackwardKernel::Split
    );
}

/// The fused kernel's dA is bitwise identical over three runs, when its
/// launches share the GPU with another stream's work (the cluster count,
/// hence the summation order, follows from Dims alone), and with the
/// reduce-scatter exchange.
#[test]
fn backward_fused_da_is_deterministic_beside_other_work() {
    let Some(gpu) = gpu() else { return };
    if fused_available(&gpu).is_none() {
        return;
    }
    let c = fused(case((4096, 2048, 1536, 16), 0, 0.0, 0.0, true));
    let dims = c.sh.dims();
    let inp = data::<bf16>(c.sh, c.dx_beta, c.da_beta, 98);
    let bits = |out: Outputs| -> Vec<u64> { out.da.iter().map(|v| v.to_bits()).collect() };
    let solo: Vec<Vec<u64>> = (0..3)
        .map(|_| bits(run_gpu::<bf16>(&gpu, &c, &dims, &inp)))
        .collect();
    assert_eq!(solo[0], solo[1]);
    assert_eq!(solo[0], solo[2]);
    // Another stream keeps the SMs busy with forwards while the case runs.
    let other = gpu.stream.context().new_stream().unwrap();
    let big = Dims::new(16384, 4096, 4096, 64).unwrap();
    let xo = other.alloc_zeros::<bf16>(16384 * 4096).unwrap();
    let ao = other.alloc_zeros::<bf16>(big.a_len()).unwrap();
    let mut yo = other.alloc_zeros::<bf16>(16384 * 4096).unwrap();
    for _ in 0..20 {
        forward(
            &other,
            &big,
            &xo,
            4096,
            &ao,
            &mut yo,
            4096,
            None,
            SCALE,
            1.0,
            Dropout::NONE,
        )
        .unwrap();
    }
    let busy = bits(run_gpu::<bf16>(&gpu, &c, &dims, &inp));
    other.synchronize().unwrap();
    assert_eq!(solo[0], busy, "dA changed with other work on the GPU");
    // The reduce-scatter exchange sums the same partials in the same order.
    let scatter = Case {
        kernel: BackwardKernel::FusedScatter,
        ..c
    };
    let scattered = run_gpu::<bf16>(&gpu, &scatter, &dims, &inp);
    assert_eq!(
        solo[0],
        bits(scattered),
        "dA differs between the two exchanges"
    );
}

/// Small fused cases for compute-sanitizer (bf16): several clusters, steps
/// that end inside a tile, misaligned bases, dx_beta 1.
#[test]
fn sanitizer_backward_fused_small() {
    let Some(gpu) = gpu() else { return };
    if fused_available(&gpu).is_none() {
        return;
    }
    #[rustfmt::skip]
    let cases = [
        fused(case((37, 72, 40, 24), 0, 1.0, 1.0, true)),
        fused(case((600, 520, 200, 16), 0, 0.0, 0.0, false)),
        fused(case((5, 1000, 64, 32), 0, 1.0, 0.0, true)),
        fused(layout(case((70, 45, 72, 8), 0, 1.0, 1.0, true), Ld::Aligned, off(1, 3, 3, 1, 1, 1))),
        fused(Case { with_dx: false, ..case((300, 64, 96, 16), 0, 0.0, 1.0, false) }),
        Case { kernel: BackwardKernel::FusedScatter, ..case((600, 200, 136, 32), 0, 1.0, 0.0, true) },
        Case { kernel: BackwardKernel::FusedScatter, ..case((70, 72, 40, 16), 0, 0.0, 1.0, false) },
    ];
    run_typed!(&cases, run_case: bf16 => 37);
}

/// dA is bitwise identical across runs (fixed-order reduction, no atomics).
#[test]
fn backward_da_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    let c = case((4096, 1024, 768, 32), 0, 0.0, 0.0, true);
    let dims = c.sh.dims();
    let inp = data::<bf16>(c.sh, c.dx_beta, c.da_beta, 99);
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
            Dropout::NONE,
        )
        .unwrap();
        let y = download(&gpu, &yd);
        (0.5 * y.iter().map(|v| v * v).sum::<f64>(), yd, sd)
    };
    // G = ∂L/∂Y = Y.
    let (_, yd, sd) = loss(&a);
    let ad = upload::<f32>(&gpu, &a);
    let mut dad = poisoned::<f32>(&gpu, dims.a_len());
    let mut ws = poisoned_workspace(&gpu, &dims, true);
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
        Dropout::NONE,
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
    let c = case((64, 65536, 65536, 16), 0, 0.0, 0.0, false);
    run_case::<bf16>(&gpu, c, 65536);
}

// ---- argument checks and workspace: no GPU needed ------------------------------

fn lens(dims: &Dims, saved_s: bool) -> BackwardLens {
    BackwardLens {
        x: dims.tokens() * dims.d_in(),
        ld_x: dims.d_in(),
        g: dims.tokens() * dims.d_out(),
        ld_g: dims.d_out(),
        a: dims.a_len(),
        saved_s: saved_s.then_some(dims.s_len()),
        dx: Some((dims.tokens() * dims.d_in(), dims.d_in(), 1.0)),
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
    // Where the fused kernel could run (d ≤ 4096, rank ≤ 32), at least its
    // ⌈tokens / 256⌉ ≤ 16 token ranges: 16 here against the split path's 8.
    let d = Dims::new(16384, 4096, 4096, 16).unwrap();
    assert_eq!(
        backward_workspace_len(&d, true).unwrap(),
        16384 * 16 + 2 * 16 * 4096 * 16
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

/// Not a check: a fixed workload for `ncu` in the GPU run (SINGLORA_NCU=1,
/// and the DRAM-bytes step): bf16 backward at 16384 tokens, d = 4096, rank
/// 16, with a saved S, by the split kernels (three launches per backward).
#[test]
#[ignore = "profiling workload, run by scripts/gpu/run.sh under ncu"]
fn profile_backward_bf16() {
    profile_backward(BackwardKernel::Split);
}

/// [`profile_backward_bf16`] by the fused kernel (two launches per
/// backward: the fused pass and the dA reduction).
#[test]
#[ignore = "profiling workload, run by scripts/gpu/run.sh under ncu"]
fn profile_backward_fused_bf16() {
    profile_backward(BackwardKernel::Fused);
}

fn profile_backward(kernel: BackwardKernel) {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(16384, 4096, 4096, 16).unwrap();
    let mut r = rng(1);
    let xd = upload::<bf16>(&gpu, &randn(&mut r, 16384 * 4096, 1.0));
    let gd = upload::<bf16>(&gpu, &randn(&mut r, 16384 * 4096, 1.0));
    let ad = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.02));
    let sd = upload_f32(&gpu, &randn(&mut r, dims.s_len(), 1.0));
    let mut dxd = poisoned::<bf16>(&gpu, 16384 * 4096);
    let mut dad = poisoned::<f32>(&gpu, dims.a_len());
    let mut ws = poisoned_workspace(&gpu, &dims, true);
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
            kernel,
        )
        .unwrap();
    }
    gpu.stream.synchronize().unwrap();
}
