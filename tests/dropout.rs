//! Adapter dropout on the GPU (skipped without one) against the f64
//! reference, whose mask comes from the same Philox4x32-10 and the same
//! element-to-counter mapping (src/dropout.rs, kernels/common/philox.cuh):
//!
//! * mask probes, bit for bit, for f32, f16 and bf16: with A = I (rank =
//!   d), S = drop(X) and dX's adapter term = M ⊙ s·G/(1 − p) expose every
//!   element's mask (zero exactly where dropped, X/(1 − p) where kept);
//!   with A one-hot and G = [I | 0], the rows of dA past d_out are
//!   s·drop(X)ᵀ and expose the dA kernel's X mask (through the S the
//!   backward recomputes); strided X, odd d, tokens not a multiple of any
//!   tile, a decode-size call;
//! * outputs (Y, S, dX, dA) at the design page's bars on random inputs
//!   (never zero), NaN-poisoned outputs, both a saved and a recomputed S;
//! * the keep rate over 10⁷ elements within 4σ of 1 − p, and the GPU mask
//!   equal to the reference's there too;
//! * the same (seed, offset) twice: bitwise the same outputs; p = 0 with
//!   any seed: bitwise the call without dropout;
//! * SingLoraLinear: training-mode offsets advance once per forward, the
//!   pair reaches the backward, eval mode runs without dropout.
//!
//! The refusals (p outside [0, 1), NaN, too many tokens) need no GPU.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use singlora::{
    backward, forward, reference, BackwardKernel, BackwardOptions, BackwardShape, DType, Dims,
    Dropout, DxOut, ForwardShape, SingLoraLinear,
};

const SCALE: f32 = 0.75;

/// Random N(0, std²) values rounded to T, none of them zero.
fn nonzero<T: DType>(r: &mut rand::rngs::StdRng, n: usize, std: f64) -> Vec<f64> {
    quantize::<T>(&randn(r, n, std))
        .into_iter()
        .map(|v| if v == 0.0 { std } else { v })
        .collect()
}

/// `D × rank` with ones at (i, i) for i < min(D, rank).
fn one_hot(dims: &Dims) -> Vec<f64> {
    let (d, r) = (dims.d(), dims.rank());
    let mut a = vec![0.0; d * r];
    for i in 0..d.min(r) {
        a[i * r + i] = 1.0;
    }
    a
}

/// GPU forward: returns (Y, S). `x` is contiguous; it is placed at row
/// stride `ld_x` (gaps NaN). `y0` with beta 1, else Y is poisoned.
fn gpu_forward<T: DType>(
    gpu: &Gpu,
    dims: &Dims,
    x: &[f64],
    ld_x: usize,
    a: &[f64],
    y0: Option<&[f64]>,
    dropout: Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let (t, d_in, d_out) = (dims.tokens(), dims.d_in(), dims.d_out());
    let xd = upload::<T>(gpu, &restride(x, t, d_in, ld_x, f64::NAN));
    let ad = upload::<T>(gpu, a);
    let mut yd = match y0 {
        Some(y0) => upload::<T>(gpu, y0),
        None => poisoned::<T>(gpu, t * d_out),
    };
    let mut sd = poisoned::<f32>(gpu, dims.s_len());
    let beta = if y0.is_some() { 1.0 } else { 0.0 };
    forward(
        &gpu.stream,
        dims,
        &xd,
        ld_x,
        &ad,
        &mut yd,
        d_out,
        Some(&mut sd),
        SCALE,
        beta,
        dropout,
    )
    .unwrap();
    (download(gpu, &yd), download(gpu, &sd))
}

struct Grads {
    dx: Vec<f64>,
    da: Vec<f64>,
}

/// GPU backward with dX (dx_beta 1 onto `dx0` when given, else poisoned
/// with beta 0) and dA (beta 0, poisoned); `saved_s` None recomputes S.
#[allow(clippy::too_many_arguments)]
fn gpu_backward<T: DType>(
    gpu: &Gpu,
    dims: &Dims,
    x: &[f64],
    ld_x: usize,
    a: &[f64],
    g: &[f64],
    saved_s: Option<&[f64]>,
    dx0: Option<&[f64]>,
    options: impl Into<BackwardOptions>,
) -> Grads {
    let (t, d_in, d_out) = (dims.tokens(), dims.d_in(), dims.d_out());
    let xd = upload::<T>(gpu, &restride(x, t, d_in, ld_x, f64::NAN));
    let gd = upload::<T>(gpu, g);
    let ad = upload::<T>(gpu, a);
    let sd: Option<CudaSlice<f32>> = saved_s.map(|s| upload_f32(gpu, s));
    let mut dxd = match dx0 {
        Some(v) => upload::<T>(gpu, v),
        None => poisoned::<T>(gpu, t * d_in),
    };
    let mut dad = poisoned::<f32>(gpu, dims.a_len());
    let mut ws = poisoned_workspace(gpu, dims, saved_s.is_some());
    backward(
        &gpu.stream,
        dims,
        &xd,
        ld_x,
        &gd,
        d_out,
        &ad,
        sd.as_ref()
            .map(|s| s as &dyn cudarc::driver::DevicePtr<f32>),
        SCALE,
        Some(DxOut {
            dx: &mut dxd,
            ld_dx: d_in,
            beta: if dx0.is_some() { 1.0 } else { 0.0 },
        }),
        &mut dad,
        0.0,
        &mut ws,
        options,
    )
    .unwrap();
    Grads {
        dx: download(gpu, &dxd),
        da: download(gpu, &dad),
    }
}

/// The reference forward and backward of the same call.
#[allow(clippy::too_many_arguments)]
fn ref_all(
    dims: &Dims,
    x: &[f64],
    a: &[f64],
    g: &[f64],
    y0: Option<&[f64]>,
    dx0: Option<&[f64]>,
    dropout: Dropout,
) -> (Vec<f64>, Vec<f64>, Grads) {
    /// A given start is added onto (beta 1), else the output starts at zero.
    fn start<'a>(given: Option<&'a [f64]>, zeros: &'a [f64]) -> (&'a [f64], f64) {
        given.map_or((zeros, 0.0), |v| (v, 1.0))
    }
    let (t, d_in, d_out) = (dims.tokens(), dims.d_in(), dims.d_out());
    let (y_zeros, dx_zeros) = (vec![0.0; t * d_out], vec![0.0; t * d_in]);
    let da_zeros = vec![0.0; dims.a_len()];
    let scale = SCALE as f64;
    let (y, s) = reference_forward_onto(dims, [x, a], scale, start(y0, &y_zeros), dropout);
    let starts = [start(dx0, &dx_zeros), (&da_zeros, 0.0)];
    let (dx, da) = reference_backward_onto(dims, [x, g, a], scale, starts, dropout);
    (y, s, Grads { dx, da })
}

// ---------------------------------------------------------------- mask probes

/// Square d, A = I (rank = d): S = drop(X) exactly (f32(x)·f32(1/(1 − p))
/// where kept, 0 where dropped) and, with G nonzero, dX = M ⊙ s·G/(1 − p):
/// zero exactly where dropped.
fn probe_forward_and_dx<T: DType>(gpu: &Gpu, tokens: usize, d: usize, ld_pad: usize, seed: u64) {
    let dims = Dims::new(tokens, d, d, d).unwrap();
    let name = format!("{} tokens {tokens} d {d} ld +{ld_pad}", T::NAME);
    let mut r = rng(seed);
    let x = nonzero::<T>(&mut r, tokens * d, 1.0);
    let g = nonzero::<T>(&mut r, tokens * d, 1.0);
    let a = one_hot(&dims);
    let dropout = Dropout::new(0.3, 0xdead_beef_0000_0001 ^ seed, 41 + seed).unwrap();
    let ks = dropout.param().scale;
    let mask = dropout.mask(tokens, d);

    let (y, s) = gpu_forward::<T>(gpu, &dims, &x, d + ld_pad, &a, None, dropout);
    let mut dropped = 0;
    for (i, &keep) in mask.iter().enumerate() {
        let want = if keep { x[i] as f32 * ks } else { 0.0 };
        assert_eq!(
            s[i] as f32,
            want,
            "{name}: S[{}][{}] (kept {keep})",
            i / d,
            i % d
        );
        dropped += usize::from(!keep);
    }
    assert!(
        dropped > 0 && dropped < mask.len(),
        "{name}: {dropped} dropped"
    );

    let grads = gpu_backward::<T>(gpu, &dims, &x, d + ld_pad, &a, &g, Some(&s), None, dropout);
    for (i, &keep) in mask.iter().enumerate() {
        let v = grads.dx[i];
        assert!(v.is_finite(), "{name}: dX[{i}] = {v}");
        assert_eq!(
            v == 0.0,
            !keep,
            "{name}: dX[{}][{}] = {v}, kept {keep}",
            i / d,
            i % d
        );
    }
    let (y_ref, s_ref, gr) = ref_all(&dims, &x, &a, &g, None, None, dropout);
    assert_close::<T>("Y", &name, &y, &y_ref);
    assert_close::<f32>("S", &name, &s, &s_ref);
    assert_close::<T>("dX", &name, &grads.dx, &gr.dx);
    assert_close::<T>("dA", &name, &grads.da, &gr.da);
}

/// d_in > d_out = rank ≥ tokens, A one-hot, G = [I | 0] so Q = [I | 0]: dA's
/// rows [d_out, d_in) hold only s·drop(X)ᵀ·Q, i.e. dA[c][t] = s·drop(X)[t][c]
/// — zero exactly where dropped. S is recomputed by the backward (with the
/// mask), which the rows below d_out check at the bar. The backward runs
/// `kernel`.
fn probe_da<T: DType>(
    gpu: &Gpu,
    tokens: usize,
    d_in: usize,
    rank: usize,
    ld_pad: usize,
    seed: u64,
    kernel: BackwardKernel,
) {
    let d_out = rank;
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    let name = format!(
        "{} dA probe tokens {tokens} d_in {d_in} rank {rank} {kernel:?}",
        T::NAME
    );
    let mut r = rng(seed);
    let x = nonzero::<T>(&mut r, tokens * d_in, 1.0);
    let mut g = vec![0.0; tokens * d_out];
    for t in 0..tokens {
        g[t * d_out + t] = 1.0;
    }
    let a = one_hot(&dims);
    let dropout = Dropout::new(0.5, 7 + seed, u64::MAX - seed).unwrap();
    let options = BackwardOptions { dropout, kernel };
    let grads = gpu_backward::<T>(gpu, &dims, &x, d_in + ld_pad, &a, &g, None, None, options);
    for c in d_out..d_in {
        for t in 0..tokens {
            let v = grads.da[c * rank + t];
            let keep = dropout.keeps(t as u64, c);
            assert!(v.is_finite(), "{name}: dA[{c}][{t}] = {v}");
            assert_eq!(v == 0.0, !keep, "{name}: dA[{c}][{t}] = {v}, kept {keep}");
        }
    }
    let (_, _, gr) = ref_all(&dims, &x, &a, &g, None, None, dropout);
    assert_close::<f32>("dA", &name, &grads.da, &gr.da);
    assert_close::<T>("dX", &name, &grads.dx, &gr.dx);
}

fn probes<T: DType>() {
    let Some(gpu) = gpu() else { return };
    // Odd d, strided X, tokens not a multiple of any tile (64, 32, 16).
    probe_forward_and_dx::<T>(&gpu, 200, 203, 5, 1);
    // Rank bucket 64, dense X.
    probe_forward_and_dx::<T>(&gpu, 131, 37, 0, 2);
    // Decode size (the sm_90a cluster kernel on Hopper, column splits elsewhere).
    probe_forward_and_dx::<T>(&gpu, 7, 64, 8, 3);
    probe_da::<T>(&gpu, 100, 331, 128, 3, 4, BackwardKernel::Split);
    probe_da::<T>(&gpu, 61, 1000, 64, 0, 5, BackwardKernel::Split);
}

// ---------------------------------------------------------------- accuracy

/// (tokens, d_in, d_out, rank, ld_x padding).
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (300, 515, 260, 24, 5),  // odd d_in, strided X, d_in > d_out
    (197, 256, 1024, 64, 0), // d_in < d_out
    (9, 1000, 777, 16, 8),   // decode size
    (1100, 96, 300, 8, 0),   // several dA token splits
    (70, 3424, 128, 200, 0), // odd hidden size, rank bucket 256
];

/// `dropout`'s forward (Y onto `y0` where given, else poisoned) and backward
/// (dX onto `dx0` where given, else poisoned; with the forward's saved S and
/// with a recomputed one) on the GPU, X at row stride d_in + `pad`, against
/// the reference at T's bars.
fn check_pass<T: DType>(
    gpu: &Gpu,
    name: &str,
    dims: &Dims,
    [x, a, g]: [&[f64]; 3],
    pad: usize,
    (y0, dx0): (Option<&[f64]>, Option<&[f64]>),
    options: BackwardOptions,
) {
    let BackwardOptions { dropout, kernel } = options;
    let ld_x = dims.d_in() + pad;
    let (y_ref, s_ref, gr) = ref_all(dims, x, a, g, y0, dx0, dropout);
    let (y, s) = gpu_forward::<T>(gpu, dims, x, ld_x, a, y0, dropout);
    assert_close::<T>("Y", name, &y, &y_ref);
    assert_close::<f32>("S", name, &s, &s_ref);
    for saved in [true, false] {
        let saved_s = saved.then_some(&s[..]);
        let grads = gpu_backward::<T>(gpu, dims, x, ld_x, a, g, saved_s, dx0, options);
        let name = format!("{name} saved S {saved} {kernel:?}");
        assert_close::<T>("dX", &name, &grads.dx, &gr.dx);
        assert_close::<f32>("dA", &name, &grads.da, &gr.da);
    }
}

fn accuracy<T: DType>() {
    let Some(gpu) = gpu() else { return };
    accuracy_over::<T>(&gpu, SHAPES, 100, BackwardKernel::Split);
}

/// [`check_pass`] at p = 0.1 and 0.5 on random inputs of each of `shapes`
/// (seeds from `seed`), the backward by `kernel`.
fn accuracy_over<T: DType>(
    gpu: &Gpu,
    shapes: &[(usize, usize, usize, usize, usize)],
    seed: u64,
    kernel: BackwardKernel,
) {
    for (k, &(tokens, d_in, d_out, rank, pad)) in shapes.iter().enumerate() {
        let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
        let mut r = rng(seed + k as u64);
        let x = nonzero::<T>(&mut r, tokens * d_in, 1.0);
        let a = nonzero::<T>(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt());
        let g = nonzero::<T>(&mut r, tokens * d_out, 1.0);
        let y0 = nonzero::<T>(&mut r, tokens * d_out, 0.5);
        let dx0 = nonzero::<T>(&mut r, tokens * d_in, 0.5);
        for p in [0.1, 0.5] {
            let dropout = Dropout::new(p, 1234 + seed + k as u64, 99).unwrap();
            let name = format!("{} {tokens}x{d_in}->{d_out} r{rank} p {p}", T::NAME);
            let starts = (Some(&y0[..]), Some(&dx0[..]));
            let options = BackwardOptions { dropout, kernel };
            check_pass::<T>(gpu, &name, &dims, [&x, &a, &g], pad, starts, options);
        }
    }
}

/// The fused backward (sm_90a, bf16) with dropout: the dA probe (zero
/// exactly where dropped) and accuracy shapes it applies to, p = 0.1 and
/// 0.5, against the reference with the library's mask.
#[test]
fn fused_backward_with_dropout_bf16() {
    type T = half::bf16;
    let Some(gpu) = gpu() else { return };
    let Some(kernels) = with_kernel(&gpu, "backward_fused_sm90_bf16_r16") else {
        return;
    };
    probe_da::<T>(&gpu, 30, 331, 32, 3, 6, BackwardKernel::Fused);
    probe_da::<T>(&gpu, 16, 1000, 16, 0, 7, BackwardKernel::Fused);
    let shapes = [
        (300, 515, 260, 24, 5),
        (1100, 96, 300, 8, 0),
        (9, 1000, 777, 16, 8),
        (700, 4096, 2000, 32, 0),
    ];
    for &(tokens, d_in, d_out, rank, _) in &shapes {
        let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
        let runs = BackwardKernel::Fused.resolve::<T>(&kernels, &dims);
        assert_eq!(runs, BackwardKernel::Fused, "{dims:?}");
    }
    accuracy_over::<T>(&gpu, &shapes, 400, BackwardKernel::Fused);
}

// The typed tests: mask probes, accuracy and reproducibility per element
// type (the keep rate and the layer below run bf16 only).
typed_tests! {
    mask_probes_f32, mask_probes_f16, mask_probes_bf16 => probes::<T>();
    accuracy_f32, accuracy_f16, accuracy_bf16 => accuracy::<T>();
    reproducible_f32, reproducible_f16, reproducible_bf16 => reproducible::<T>();
}

// ---------------------------------------------------------------- keep rate

/// 40000 × 250 = 10⁷ elements through the S probe (A = I): the kept count
/// is within 4σ of (1 − p)·n, and every element's mask is the reference's.
#[test]
fn keep_rate_over_ten_million_elements() {
    let Some(gpu) = gpu() else { return };
    type T = half::bf16;
    let (tokens, d) = (40_000, 250);
    let dims = Dims::new(tokens, d, d, d).unwrap();
    let mut r = rng(7);
    let x = nonzero::<T>(&mut r, tokens * d, 1.0);
    let a = one_hot(&dims);
    for (p, seed, offset) in [(0.1, 5, 0), (0.5, u64::MAX, 1 << 33)] {
        let dropout = Dropout::new(p, seed, offset).unwrap();
        let (_, s) = gpu_forward::<T>(&gpu, &dims, &x, d, &a, None, dropout);
        let mask = dropout.mask(tokens, d);
        let n = s.len() as f64;
        let kept = s.iter().filter(|&&v| v != 0.0).count() as f64;
        let sigma = (n * p * (1.0 - p)).sqrt();
        assert!(
            (kept - n * (1.0 - p)).abs() <= 4.0 * sigma,
            "p {p}: kept {kept} of {n}, expected {} ± {}",
            n * (1.0 - p),
            4.0 * sigma
        );
        let wrong = s
            .iter()
            .zip(&mask)
            .filter(|(&v, &keep)| (v != 0.0) != keep)
            .count();
        assert_eq!(
            wrong, 0,
            "p {p}: elements whose GPU mask differs from the reference's"
        );
    }
}

// ---------------------------------------------------------------- reproducibility

fn reproducible<T: DType>() {
    let Some(gpu) = gpu() else { return };
    let (tokens, d_in, d_out, rank) = (333, 515, 260, 24);
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    let mut r = rng(11);
    let x = nonzero::<T>(&mut r, tokens * d_in, 1.0);
    let a = nonzero::<T>(&mut r, dims.a_len(), 0.05);
    let g = nonzero::<T>(&mut r, tokens * d_out, 1.0);
    // Y, S, then dX and dA with the saved S and with a recomputed one, as bits.
    let run = |d: Dropout| -> Vec<Vec<u64>> {
        let (y, s) = gpu_forward::<T>(&gpu, &dims, &x, d_in, &a, None, d);
        let saved = gpu_backward::<T>(&gpu, &dims, &x, d_in, &a, &g, Some(&s), None, d);
        let recomputed = gpu_backward::<T>(&gpu, &dims, &x, d_in, &a, &g, None, None, d);
        [y, s, saved.dx, saved.da, recomputed.dx, recomputed.da]
            .iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let d = Dropout::new(0.2, 77, 5).unwrap();
    let first = run(d);
    assert!(
        first == run(d),
        "{}: same (seed, offset), different bits",
        T::NAME
    );
    let other = run(d.at_offset(6));
    assert_ne!(
        first[1],
        other[1],
        "{}: another offset, the same S",
        T::NAME
    );
    // p = 0 (any seed and offset) is bitwise the call without dropout.
    let none = run(Dropout::NONE);
    assert!(
        none == run(Dropout::new(0.0, 123, 456).unwrap()),
        "{}: p = 0",
        T::NAME
    );
}

// ---------------------------------------------------------------- the layer

#[test]
fn layer_dropout_offsets_and_eval_mode() {
    let Some(gpu) = gpu() else { return };
    type T = half::bf16;
    let (tokens, d_in, d_out, rank) = (96, 200, 130, 16);
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    assert_eq!(
        SingLoraLinear::<T>::new(&gpu.stream, d_in, d_out, rank, 16.0, 0, 3)
            .unwrap()
            .with_dropout(1.0)
            .err()
            .and_then(|e| e.argument()),
        Some("p")
    );
    let mut layer = SingLoraLinear::<T>::new(&gpu.stream, d_in, d_out, rank, 16.0, 0, 3)
        .unwrap()
        .with_dropout(0.25)
        .unwrap();
    layer.dropout_mut().set_seed(999, 10);
    let mut r = rng(21);
    let x = nonzero::<T>(&mut r, tokens * d_in, 1.0);
    let g = nonzero::<T>(&mut r, tokens * d_out, 1.0);
    let y0 = nonzero::<T>(&mut r, tokens * d_out, 0.5);
    let a: Vec<f64> = download(&gpu, layer.a());
    let scale = layer.scale().unwrap() as f64;
    let xd = upload::<T>(&gpu, &x);
    let gd = upload::<T>(&gpu, &g);

    for want_offset in [10, 11] {
        let mut yd = upload::<T>(&gpu, &y0);
        let ctx = layer.forward(tokens, &xd, &mut yd).unwrap();
        let d = ctx.dropout();
        assert_eq!((d.p(), d.seed(), d.offset()), (0.25, 999, want_offset));
        let (y_ref, _) = reference_forward_onto(&dims, [&x, &a], scale, (&y0, 1.0), d);
        assert_close::<T>("layer Y", "training", &download(&gpu, &yd), &y_ref);

        let mut dxd = upload::<T>(&gpu, &vec![0.0; tokens * d_in]);
        layer
            .backward(&ctx, &xd, &gd, Some(&mut dxd), false)
            .unwrap();
        // The layer adds dX onto the zeros uploaded above and overwrites dA.
        let zeros = (vec![0.0; tokens * d_in], vec![0.0; dims.a_len()]);
        let starts = [(&zeros.0[..], 1.0), (&zeros.1[..], 0.0)];
        let (dx_ref, da_ref) = reference_backward_onto(&dims, [&x, &g, &a], scale, starts, d);
        assert_close::<T>("layer dX", "training", &download(&gpu, &dxd), &dx_ref);
        assert_close::<f32>(
            "layer dA",
            "training",
            &download(&gpu, layer.grad()),
            &da_ref,
        );
    }
    assert_eq!(layer.dropout().offset(), 12);

    layer.dropout_mut().set_training(false);
    let mut yd = upload::<T>(&gpu, &y0);
    let ctx = layer.forward(tokens, &xd, &mut yd).unwrap();
    assert_eq!(ctx.dropout(), Dropout::NONE);
    assert_eq!(layer.dropout().offset(), 12, "eval mode consumes no offset");
    let (y_ref, _) = reference_forward_onto(&dims, [&x, &a], scale, (&y0, 1.0), Dropout::NONE);
    assert_close::<T>("layer Y", "eval", &download(&gpu, &yd), &y_ref);
}

// ---------------------------------------------------------------- refusals (no GPU)

#[test]
fn refusals_name_the_argument() {
    for p in [1.0, 2.0, -0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = Dropout::new(p, 0, 0).unwrap_err();
        assert_eq!(argument_named(&e), "p", "p = {p}: {e}");
    }
    // More tokens than the mask's counter addresses: refused when active,
    // accepted without dropout.
    let big = Dims::new((1usize << 32) + 1, 8, 8, 4).unwrap();
    let d = Dropout::new(0.1, 1, 2).unwrap();
    let f = ForwardShape::new(&big, 8, 8, 1.0f32, 0.0).unwrap();
    assert_eq!(argument_named(&f.with_dropout(d).unwrap_err()), "tokens");
    assert!(f.with_dropout(Dropout::NONE).is_ok());
    let b = BackwardShape::new(&big, 8, 8, Some((8, 0.0)), true, 1.0f32, 0.0).unwrap();
    assert_eq!(argument_named(&b.with_dropout(d).unwrap_err()), "tokens");
    assert!(b.with_dropout(Dropout::NONE).is_ok());
    let ok = Dims::new(1 << 32, 8, 8, 4).unwrap();
    assert!(ForwardShape::new(&ok, 8, 8, 1.0f32, 0.0)
        .unwrap()
        .with_dropout(d)
        .is_ok());
    // The reference refuses too, before writing anything.
    let tiny = Dims::new(2, 3, 3, 1).unwrap();
    let mut y = vec![f64::NAN; 6];
    let e = reference::forward(&tiny, &[1.0; 5], &[1.0; 3], 1.0, 0.0, &mut y, d).unwrap_err();
    assert_eq!(argument_named(&e), "x");
    assert!(y.iter().all(|v| v.is_nan()), "nothing written");
}

/// A refused GPU call writes nothing: too many tokens for the mask is
/// refused before any launch (the buffers stay poisoned).
#[test]
fn refused_gpu_calls_write_nothing() {
    let Some(gpu) = gpu() else { return };
    type T = f32;
    let dims = Dims::new(4, 8, 8, 4).unwrap();
    let x = upload::<T>(&gpu, &[1.0; 32]);
    let a = upload::<T>(&gpu, &[1.0; 32]);
    let mut y = poisoned::<T>(&gpu, 32);
    let mut s = poisoned::<f32>(&gpu, 16);
    // A short x with dropout: refused, y and s untouched.
    let short = upload::<T>(&gpu, &[1.0; 31]);
    let d = Dropout::new(0.5, 1, 1).unwrap();
    let run = |x: &CudaSlice<T>, y: &mut CudaSlice<T>, s: &mut CudaSlice<f32>| {
        forward_dense(&gpu.stream, &dims, [x, &a], y, Some(s), (1.0, 0.0), d)
    };
    let e = run(&short, &mut y, &mut s).unwrap_err();
    assert_eq!(argument_named(&e), "x");
    assert!(download(&gpu, &y).iter().all(|v| v.is_nan()));
    assert!(download(&gpu, &s).iter().all(|v| v.is_nan()));
    run(&x, &mut y, &mut s).unwrap();
    assert!(download(&gpu, &y).iter().all(|v| v.is_finite()));
}

// ---------------------------------------------------------------- compute-sanitizer

/// Small dropout calls for scripts/gpu/run.sh's compute-sanitizer pass
/// (memcheck, racecheck, initcheck, synccheck run every `sanitizer_*`
/// test): forward, and backward with a saved and a recomputed S, per
/// element type, at a regular and a decode size, strided X and odd d.
#[test]
fn sanitizer_dropout_forward_backward() {
    let Some(gpu) = gpu() else { return };
    fn run<T: DType>(gpu: &Gpu) {
        for (k, &(tokens, d_in, d_out, rank)) in
            [(70, 131, 72, 24), (5, 96, 200, 8)].iter().enumerate()
        {
            let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
            let mut r = rng(300 + k as u64);
            let x = nonzero::<T>(&mut r, tokens * d_in, 1.0);
            let a = nonzero::<T>(&mut r, dims.a_len(), 0.1);
            let g = nonzero::<T>(&mut r, tokens * d_out, 1.0);
            let dropout = Dropout::new(0.3, 5, k as u64).unwrap();
            let name = format!("{} sanitizer case {k}", T::NAME);
            check_pass::<T>(
                gpu,
                &name,
                &dims,
                [&x, &a, &g],
                3,
                (None, None),
                dropout.into(),
            );
        }
    }
    run::<f32>(&gpu);
    run::<half::f16>(&gpu);
    run::<half::bf16>(&gpu);
}
