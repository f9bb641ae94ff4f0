//! CPU tests of the f64 reference (no GPU needed): the reference is checked
//! against the dense ΔW, against finite differences, against the square-case
//! identity, and for its argument checks. The kernels are then checked
//! against this reference, so it has to be right on its own.

use approx::{assert_abs_diff_eq, assert_relative_eq};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_distr::{Normal, StandardNormal};
use singlora::{reference, Dims, Dropout, Error, Ramp};

mod common;

use common::{reference_grads, transpose};

// ---------------------------------------------------------------- helpers

/// `n` standard-normal values (never all zero).
fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect()
}

/// A random `D × rank` matrix A with Kaiming-like scale 1/sqrt(D).
fn rand_a(rng: &mut StdRng, dims: &Dims) -> Vec<f64> {
    let normal = Normal::new(0.0, 1.0 / (dims.d() as f64).sqrt()).unwrap();
    (0..dims.a_len()).map(|_| rng.sample(normal)).collect()
}

/// Naive row-major `(m × k) · (k × n)`.
fn matmul(p: &[f64], q: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| p[i * k + l] * q[l * n + j]).sum();
        }
    }
    out
}

/// Random X (tokens × d_in, drawn first) and A for `dm`.
fn x_and_a(rng: &mut StdRng, dm: &Dims) -> (Vec<f64>, Vec<f64>) {
    let x = randn(rng, dm.tokens() * dm.d_in());
    (x, rand_a(rng, dm))
}

/// A generator seeded with `seed`, `dm`, and [`x_and_a`] from it.
fn seeded(seed: u64, dm: Dims) -> (StdRng, Dims, Vec<f64>, Vec<f64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (x, a) = x_and_a(&mut rng, &dm);
    (rng, dm, x, a)
}

fn dims(tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Dims {
    Dims::new(tokens, d_in, d_out, rank).unwrap()
}

/// (tokens, d_in, d_out, rank) covering both non-square orientations, the
/// square case, rank 1 and a single token.
const SMALL_SHAPES: &[(usize, usize, usize, usize)] = &[
    (4, 6, 13, 3),  // d_in < d_out
    (4, 13, 6, 3),  // d_in > d_out
    (4, 9, 9, 4),   // square
    (3, 7, 10, 1),  // rank 1
    (1, 8, 5, 3),   // one token
    (2, 37, 11, 5), // odd sizes
    (2, 11, 37, 5),
];

// ---------------------------------------------------------------- forward

#[test]
fn forward_matches_dense_delta_w() {
    let mut shapes = SMALL_SHAPES.to_vec();
    shapes.extend_from_slice(&[
        (3, 3424, 40, 8), // odd hidden size on the input side
        (3, 40, 3424, 8), // and on the output side
        (3, 1, 7, 2),     // d_in = 1
    ]);
    let mut rng = StdRng::seed_from_u64(1);
    for &(t, d_in, d_out, r) in &shapes {
        let dm = dims(t, d_in, d_out, r);
        let (x, a) = x_and_a(&mut rng, &dm);
        let scale = 0.75;

        let dw = reference::delta_w(&dm, &a, scale);
        assert_eq!(dw.len(), d_out * d_in);
        // Y = X ΔWᵀ
        let want = matmul(&x, &transpose(&dw, d_out, d_in), t, d_in, d_out);

        // beta = 0 overwrites a NaN-poisoned output.
        let mut y = vec![f64::NAN; t * d_out];
        let s = reference::forward(&dm, &x, &a, scale, 0.0, &mut y, Dropout::NONE).unwrap();
        let err = reference::relative_l2(&y, &want);
        assert!(err <= 1e-12, "{dm:?} beta=0: rel err {err}");

        // S = X A[:d_in]
        let s_want = matmul(&x, &a[..d_in * r], t, d_in, r);
        assert_eq!(s.len(), dm.s_len());
        let err = reference::relative_l2(&s, &s_want);
        assert!(err <= 1e-12, "{dm:?} S: rel err {err}");

        // beta = 1 adds onto the frozen layer's output.
        let y_old = randn(&mut rng, t * d_out);
        let mut y = y_old.clone();
        reference::forward(&dm, &x, &a, scale, 1.0, &mut y, Dropout::NONE).unwrap();
        let want1: Vec<f64> = want.iter().zip(&y_old).map(|(w, o)| w + o).collect();
        let err = reference::relative_l2(&y, &want1);
        assert!(err <= 1e-12, "{dm:?} beta=1: rel err {err}");
    }
}

#[test]
fn forward_zero_tokens_is_a_no_op() {
    let dm = dims(0, 5, 7, 2);
    let mut rng = StdRng::seed_from_u64(2);
    let a = rand_a(&mut rng, &dm);
    let mut y: Vec<f64> = vec![];
    let s = reference::forward(&dm, &[], &a, 1.0, 1.0, &mut y, Dropout::NONE).unwrap();
    assert!(s.is_empty());
}

#[test]
fn longer_slices_use_only_their_prefix() {
    let (_, dm, x, a) = seeded(3, dims(3, 5, 8, 2));
    let mut y = vec![0.0; 3 * 8];
    reference::forward(&dm, &x, &a, 1.5, 0.0, &mut y, Dropout::NONE).unwrap();

    let mut x_long = x.clone();
    x_long.extend_from_slice(&[7.0; 4]);
    let mut a_long = a.clone();
    a_long.extend_from_slice(&[9.0; 3]);
    let mut y_long = vec![0.0; 3 * 8 + 5];
    y_long[3 * 8..].fill(-1.0);
    reference::forward(&dm, &x_long, &a_long, 1.5, 0.0, &mut y_long, Dropout::NONE).unwrap();
    assert_eq!(&y_long[..3 * 8], &y[..]);
    assert!(
        y_long[3 * 8..].iter().all(|&v| v == -1.0),
        "tail was written"
    );
}

// ---------------------------------------------------------------- backward

/// L = Σ Y ⊙ R with Y = forward(X, A) (beta = 0), so ∂L/∂Y = R. With
/// dropout the mask is fixed by (seed, offset): it does not depend on X.
fn loss(dm: &Dims, x: &[f64], a: &[f64], r: &[f64], scale: f64, dropout: Dropout) -> f64 {
    let mut y = vec![0.0; dm.tokens() * dm.d_out()];
    reference::forward(dm, x, a, scale, 0.0, &mut y, dropout).unwrap();
    y.iter().zip(r).map(|(p, q)| p * q).sum()
}

#[allow(clippy::too_many_arguments)]
/// Central difference of `loss` w.r.t. element `i` of `x` (`wrt_a = false`)
/// or of `a` (`wrt_a = true`).
fn central_diff(
    dm: &Dims,
    x: &[f64],
    a: &[f64],
    r: &[f64],
    scale: f64,
    wrt_a: bool,
    i: usize,
    dropout: Dropout,
) -> f64 {
    const H: f64 = 1e-5;
    let (mut x, mut a) = (x.to_vec(), a.to_vec());
    let v = if wrt_a { &mut a } else { &mut x };
    let orig = v[i];
    v[i] = orig + H;
    let plus = loss(dm, &x, &a, r, scale, dropout);
    let v = if wrt_a { &mut a } else { &mut x };
    v[i] = orig - H;
    let minus = loss(dm, &x, &a, r, scale, dropout);
    (plus - minus) / (2.0 * H)
}

/// Checks backward's dX and dA (both betas 0, outputs NaN-poisoned) against
/// central differences on `n_check` random entries of each (all entries when
/// `n_check` is at least their count).
///
/// The loss is linear in X and a quadratic form in A (Y is bilinear in
/// A_in and A_out, both slices of A), so the third derivatives vanish and a
/// central difference is exact up to rounding: the truncation error
/// h²/6·f''' is zero and only ~eps·|L|/h ≈ 1e-11·|L| of cancellation
/// remains, far below the 1e-6 relative tolerance.
fn check_backward_fd(dm: &Dims, n_check: usize, seed: u64) {
    check_backward_fd_dropout(dm, n_check, seed, Dropout::NONE);
}

/// [`check_backward_fd`] for a forward and backward with `dropout` (the
/// mask fixed by its seed and offset).
fn check_backward_fd_dropout(dm: &Dims, n_check: usize, seed: u64, dropout: Dropout) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (t, d_in, d_out) = (dm.tokens(), dm.d_in(), dm.d_out());
    let (x, a) = x_and_a(&mut rng, dm);
    let r = randn(&mut rng, t * d_out);
    let scale = 1.25;

    let mut dx = vec![f64::NAN; t * d_in];
    let mut da = vec![f64::NAN; dm.a_len()];
    reference::backward(dm, &x, &a, &r, scale, 0.0, &mut dx, 0.0, &mut da, dropout).unwrap();

    for (wrt_a, grad) in [(false, &dx), (true, &da)] {
        let n = grad.len();
        let idx: Vec<usize> = if n_check >= n {
            (0..n).collect()
        } else {
            sample(&mut rng, n, n_check).into_vec()
        };
        let fd: Vec<f64> = idx
            .iter()
            .map(|&i| central_diff(dm, &x, &a, &r, scale, wrt_a, i, dropout))
            .collect();
        let an: Vec<f64> = idx.iter().map(|&i| grad[i]).collect();
        let name = if wrt_a { "dA" } else { "dX" };
        let err = reference::relative_l2(&an, &fd);
        assert!(err <= 1e-6, "{dm:?} {name}: rel err {err}");
        let max = fd.iter().fold(1.0_f64, |m, v| m.max(v.abs()));
        for (k, &i) in idx.iter().enumerate() {
            assert_abs_diff_eq!(an[k], fd[k], epsilon = 1e-6 * max);
            assert!(an[k].is_finite(), "{dm:?} {name}[{i}] not finite");
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    for (k, &(t, d_in, d_out, r)) in SMALL_SHAPES.iter().enumerate() {
        check_backward_fd(&dims(t, d_in, d_out, r), usize::MAX, 10 + k as u64);
    }
}

#[test]
fn backward_matches_finite_differences_large_odd() {
    // Too many entries for a full check: ~50 random entries of dA and dX.
    check_backward_fd(&dims(2, 5, 3424, 2), 50, 20);
    check_backward_fd(&dims(2, 3424, 5, 2), 50, 21);
}

// ---------------------------------------------------------------- dropout

/// The backward with dropout is the gradient of the forward with the same
/// dropout (the mask fixed by seed and offset), for every small shape and
/// several probabilities, and on odd sizes.
#[test]
fn backward_with_dropout_matches_finite_differences() {
    for (k, &(t, d_in, d_out, r)) in SMALL_SHAPES.iter().enumerate() {
        for (j, p) in [0.1, 0.5, 0.9].into_iter().enumerate() {
            let dropout = Dropout::new(p, 1000 + k as u64, 7 * j as u64).unwrap();
            check_backward_fd_dropout(&dims(t, d_in, d_out, r), usize::MAX, 40 + k as u64, dropout);
        }
    }
    let dropout = Dropout::new(0.25, u64::MAX, u64::MAX).unwrap();
    check_backward_fd_dropout(&dims(2, 5, 3424, 2), 50, 60, dropout);
    check_backward_fd_dropout(&dims(2, 3424, 5, 2), 50, 61, dropout);
}

/// The forward with dropout is the undropped forward of drop(X), whose
/// elements are exactly 0 or X/(1 − p) as the mask says; the backward's dX
/// is exactly zero where the mask drops (beta 0); inactive dropout (p = 0,
/// any seed) is bitwise the undropped path.
#[test]
fn dropout_forward_is_the_forward_of_dropped_x() {
    let dm = dims(5, 37, 11, 5);
    let (mut rng, dm, x, a) = seeded(70, dm);
    let d = Dropout::new(0.4, 12345, 678).unwrap();
    let xd = reference::dropped(&d, &x, dm.tokens(), dm.d_in());
    let mask = d.mask(dm.tokens(), dm.d_in());
    let mut dropped = 0;
    for (i, (&v, &keep)) in x.iter().zip(&mask).enumerate() {
        let (t, c) = (i / dm.d_in(), i % dm.d_in());
        assert_eq!(keep, d.keeps(t as u64, c));
        if keep {
            assert_eq!(xd[i], v * (1.0 / 0.6));
        } else {
            assert_eq!(xd[i], 0.0);
            dropped += 1;
        }
    }
    assert!(
        dropped > 0 && dropped < x.len(),
        "{dropped} of {} dropped",
        x.len()
    );

    let mut y = vec![f64::NAN; dm.tokens() * dm.d_out()];
    let s = reference::forward(&dm, &x, &a, 0.75, 0.0, &mut y, d).unwrap();
    let mut y2 = vec![f64::NAN; y.len()];
    let s2 = reference::forward(&dm, &xd, &a, 0.75, 0.0, &mut y2, Dropout::NONE).unwrap();
    assert_eq!(s, s2);
    assert_eq!(y, y2);

    let g = randn(&mut rng, dm.tokens() * dm.d_out());
    let mut dx = vec![f64::NAN; x.len()];
    let mut da = vec![f64::NAN; dm.a_len()];
    reference::backward(&dm, &x, &a, &g, 0.75, 0.0, &mut dx, 0.0, &mut da, d).unwrap();
    for (i, &keep) in mask.iter().enumerate() {
        assert!(dx[i].is_finite());
        if !keep {
            assert_eq!(dx[i], 0.0, "dX[{i}] of a dropped element");
        }
    }

    let off = Dropout::new(0.0, 99, 98).unwrap();
    assert!(!off.is_active());
    let mut y3 = vec![f64::NAN; y.len()];
    let mut y4 = vec![f64::NAN; y.len()];
    reference::forward(&dm, &x, &a, 0.75, 0.0, &mut y3, off).unwrap();
    reference::forward(&dm, &x, &a, 0.75, 0.0, &mut y4, Dropout::NONE).unwrap();
    assert_eq!(y3, y4);
}

#[test]
fn backward_accumulates_and_overwrites_poison() {
    let mut rng = StdRng::seed_from_u64(30);
    for &(t, d_in, d_out, r) in SMALL_SHAPES {
        let dm = dims(t, d_in, d_out, r);
        let (x, a) = x_and_a(&mut rng, &dm);
        let g = randn(&mut rng, t * d_out);
        let scale = 0.5;

        // One backward onto (dX, dA) with their betas.
        let backward = |dx: &mut [f64], dx_beta: f64, da: &mut [f64], da_beta: f64| {
            reference::backward(
                &dm,
                &x,
                &a,
                &g,
                scale,
                dx_beta,
                dx,
                da_beta,
                da,
                Dropout::NONE,
            )
            .unwrap();
        };

        // beta = 0 on clean (zero) outputs ...
        let mut dx0 = vec![0.0; t * d_in];
        let mut da0 = vec![0.0; dm.a_len()];
        backward(&mut dx0, 0.0, &mut da0, 0.0);

        // ... equals beta = 0 on NaN-poisoned outputs, bit for bit.
        let mut dx = vec![f64::NAN; t * d_in];
        let mut da = vec![f64::NAN; dm.a_len()];
        backward(&mut dx, 0.0, &mut da, 0.0);
        assert!(dx.iter().chain(&da).all(|v| v.is_finite()));
        assert_eq!(dx, dx0);
        assert_eq!(da, da0);

        // beta = 1 adds onto existing contents exactly (1·old + new).
        let dx_old = randn(&mut rng, t * d_in);
        let da_old = randn(&mut rng, dm.a_len());
        let (mut dx, mut da) = (dx_old.clone(), da_old.clone());
        backward(&mut dx, 1.0, &mut da, 1.0);
        let dx_want: Vec<f64> = dx0.iter().zip(&dx_old).map(|(n, o)| o + n).collect();
        let da_want: Vec<f64> = da0.iter().zip(&da_old).map(|(n, o)| o + n).collect();
        assert_eq!(dx, dx_want);
        assert_eq!(da, da_want);

        // The two betas are independent.
        let (mut dx, mut da) = (dx_old.clone(), vec![f64::NAN; dm.a_len()]);
        backward(&mut dx, 1.0, &mut da, 0.0);
        assert_eq!(dx, dx_want);
        assert_eq!(da, da0);
    }
}

#[test]
fn forward_beta_zero_overwrites_poison_exactly() {
    let (mut rng, dm, x, a) = seeded(31, dims(3, 7, 12, 3));
    let mut y0 = vec![0.0; 3 * 12];
    reference::forward(&dm, &x, &a, 2.0, 0.0, &mut y0, Dropout::NONE).unwrap();
    let mut y = vec![f64::NAN; 3 * 12];
    reference::forward(&dm, &x, &a, 2.0, 0.0, &mut y, Dropout::NONE).unwrap();
    assert_eq!(y, y0);
    let y_old = randn(&mut rng, 3 * 12);
    let mut y = y_old.clone();
    reference::forward(&dm, &x, &a, 2.0, 1.0, &mut y, Dropout::NONE).unwrap();
    let want: Vec<f64> = y0.iter().zip(&y_old).map(|(n, o)| o + n).collect();
    assert_eq!(y, want);
}

#[test]
fn backward_square_identity() {
    // Square case: dA = s (GᵀX + XᵀG) A, with the d × d matrices formed.
    let mut rng = StdRng::seed_from_u64(40);
    for &(t, d, r) in &[(5, 6, 3), (1, 4, 1), (7, 9, 9)] {
        let dm = dims(t, d, d, r);
        let (x, a) = x_and_a(&mut rng, &dm);
        let g = randn(&mut rng, t * d);
        let scale = 0.3;

        let gtx = matmul(&transpose(&g, t, d), &x, d, t, d);
        let xtg = matmul(&transpose(&x, t, d), &g, d, t, d);
        let m: Vec<f64> = gtx.iter().zip(&xtg).map(|(p, q)| p + q).collect();
        let want: Vec<f64> = matmul(&m, &a, d, d, r).iter().map(|v| scale * v).collect();

        let (_, da) = reference_grads(&dm, [&x, &g, &a], scale, Dropout::NONE);
        let err = reference::relative_l2(&da, &want);
        assert!(err <= 1e-12, "{dm:?}: rel err {err}");
    }
}

#[test]
fn delta_w_square_is_symmetric() {
    let mut rng = StdRng::seed_from_u64(41);
    let dm = dims(1, 8, 8, 3);
    let a = rand_a(&mut rng, &dm);
    let w = reference::delta_w(&dm, &a, 1.7);
    for i in 0..8 {
        for j in 0..8 {
            assert_relative_eq!(w[i * 8 + j], w[j * 8 + i], max_relative = 1e-15);
        }
        assert!(w[i * 8 + i] >= 0.0, "diagonal of a PSD matrix");
    }
}

// ---------------------------------------------------------------- ramp

#[test]
fn ramp_scale_schedule() {
    let ramp = Ramp {
        alpha: 3.0,
        rank: 7,
        warmup_steps: 100,
    };
    let base = 3.0 / 7.0;
    for (step, u) in [(0, 0.0), (50, 0.5), (100, 1.0), (200, 1.0)] {
        assert_relative_eq!(ramp.ramp(step), u);
        assert_relative_eq!(ramp.scale_f64(step), base * u, max_relative = 1e-15);
        assert_eq!(ramp.scale(step), (base * u) as f32);
    }
    assert_eq!(ramp.scale(0), 0.0);
    assert_eq!(ramp.scale_f64(0), 0.0);

    // T = 0: no ramp, full scale from the first step.
    let flat = Ramp {
        alpha: 3.0,
        rank: 7,
        warmup_steps: 0,
    };
    assert_relative_eq!(flat.scale_f64(0), base, max_relative = 1e-15);
    assert_eq!(flat.scale(0), base as f32);
    assert_relative_eq!(flat.scale_f64(1000), base, max_relative = 1e-15);
}

// ---------------------------------------------------------------- validation

fn assert_invalid_dim(r: Result<Dims, Error>, want: &str) {
    match r {
        Err(Error::InvalidDim { name, .. }) => assert_eq!(name, want),
        other => panic!("expected InvalidDim {{ name: {want:?} }}, got {other:?}"),
    }
}

#[test]
fn dims_validation_errors() {
    assert_invalid_dim(Dims::new(4, 8, 8, 0), "rank");
    assert_invalid_dim(Dims::new(4, 8, 8, 257), "rank");
    assert_invalid_dim(Dims::new(4, 0, 8, 4), "d_in");
    assert_invalid_dim(Dims::new(4, 8, 0, 4), "d_out");
    assert_invalid_dim(Dims::new(4, i32::MAX as usize + 1, 8, 4), "d_in");
    assert_invalid_dim(Dims::new(4, 8, i32::MAX as usize + 1, 4), "d_out");
    assert!(Dims::new(4, 8, 8, 256).is_ok());
    assert!(Dims::new(4, 8, 8, 1).is_ok());
    match Dims::new(usize::MAX / 2, 4, 4, 4) {
        Err(Error::Overflow { what }) => assert!(what.contains("tokens"), "{what}"),
        other => panic!("expected Overflow, got {other:?}"),
    }
}

fn assert_too_small<T: std::fmt::Debug>(r: Result<T, Error>, want: &str, required: usize) {
    match r {
        Err(Error::BufferTooSmall {
            name,
            required: req,
            actual,
        }) => {
            assert_eq!(name, want);
            assert_eq!(req, required as u64, "{want}: required");
            assert_eq!(actual, required as u64 - 1, "{want}: actual");
        }
        other => panic!("expected BufferTooSmall {{ name: {want:?} }}, got {other:?}"),
    }
}

#[test]
fn forward_rejects_short_slices_without_writing() {
    let (mut rng, dm, x, a) = seeded(50, dims(3, 5, 9, 2));
    let y0 = randn(&mut rng, 3 * 9);

    let forward = |x: &[f64], a: &[f64], y: &mut [f64]| {
        reference::forward(&dm, x, a, 1.0, 0.0, y, Dropout::NONE)
    };

    let mut y = y0.clone();
    assert_too_small(forward(&x[..x.len() - 1], &a, &mut y), "x", x.len());
    assert_eq!(y, y0);
    assert_too_small(forward(&x, &a[..a.len() - 1], &mut y), "a", a.len());
    assert_eq!(y, y0);
    assert_too_small(forward(&x, &a, &mut y[..3 * 9 - 1]), "y", 3 * 9);
    assert_eq!(y, y0);

    // Invalid dims cannot be built, so they never reach the reference.
    let r = Dims::new(dm.tokens(), dm.d_in(), dm.d_out(), 0);
    assert!(
        matches!(r, Err(Error::InvalidDim { name: "rank", .. })),
        "{r:?}"
    );
}

#[test]
fn backward_rejects_short_slices_without_writing() {
    let (mut rng, dm, x, a) = seeded(51, dims(3, 9, 5, 2));
    let g = randn(&mut rng, 3 * 5);
    let dx0 = randn(&mut rng, 3 * 9);
    let da0 = randn(&mut rng, dm.a_len());
    let (mut dx, mut da) = (dx0.clone(), da0.clone());
    let (nx, na, ng) = (x.len(), a.len(), g.len());
    let (ndx, nda) = (dx.len(), da.len());

    let backward = |x: &[f64], a: &[f64], g: &[f64], dx: &mut [f64], da: &mut [f64]| {
        reference::backward(&dm, x, a, g, 1.0, 0.0, dx, 0.0, da, Dropout::NONE)
    };

    let r = backward(&x[..nx - 1], &a, &g, &mut dx, &mut da);
    assert_too_small(r, "x", nx);
    let r = backward(&x, &a[..na - 1], &g, &mut dx, &mut da);
    assert_too_small(r, "a", na);
    let r = backward(&x, &a, &g[..ng - 1], &mut dx, &mut da);
    assert_too_small(r, "g", ng);
    let r = backward(&x, &a, &g, &mut dx[..ndx - 1], &mut da);
    assert_too_small(r, "dx", ndx);
    assert_eq!(da, da0, "da written although dx was refused");
    let r = backward(&x, &a, &g, &mut dx, &mut da[..nda - 1]);
    assert_too_small(r, "da", nda);
    assert_eq!(dx, dx0, "dx written although da was refused");
    assert_eq!(da, da0);

    let r = Dims::new(dm.tokens(), dm.d_in(), 0, dm.rank());
    assert!(
        matches!(r, Err(Error::InvalidDim { name: "d_out", .. })),
        "{r:?}"
    );
}

#[test]
#[should_panic]
fn delta_w_panics_on_short_a() {
    let dm = dims(1, 4, 6, 2);
    let _ = reference::delta_w(&dm, &[1.0; 11], 1.0);
}

// ---------------------------------------------------------------- relative_l2

#[test]
fn relative_l2_never_passes_nan() {
    let r = [3.0, 4.0];
    assert_eq!(reference::relative_l2(&r, &r), 0.0);
    assert_eq!(reference::relative_l2(&[0.0; 3], &[0.0; 3]), 0.0);
    assert_eq!(reference::relative_l2(&[], &[]), 0.0);
    assert_relative_eq!(
        reference::relative_l2(&[3.0, 4.5], &r),
        0.1,
        max_relative = 1e-15
    );

    let nan = reference::relative_l2(&[3.0, f64::NAN], &r);
    assert_eq!(nan, f64::INFINITY);
    let passes = nan <= 1e-2;
    assert!(!passes, "NaN must fail any tolerance");
    assert_eq!(
        reference::relative_l2(&[f64::NAN, f64::NAN], &[0.0, 0.0]),
        f64::INFINITY
    );
    assert_eq!(
        reference::relative_l2(&[f64::INFINITY, 4.0], &r),
        f64::INFINITY
    );
    assert_eq!(
        reference::relative_l2(&[f64::NEG_INFINITY, 4.0], &r),
        f64::INFINITY
    );
    assert_eq!(
        reference::relative_l2(&[3.0], &r),
        f64::INFINITY,
        "length mismatch"
    );
    assert_eq!(
        reference::relative_l2(&[1e-3, 0.0], &[0.0, 0.0]),
        f64::INFINITY
    );
}
