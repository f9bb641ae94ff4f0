//! NaN and Inf: a non-finite element in one row of X (or of G) reaches
//! exactly the outputs the math says, and every other output is finite and
//! matches the reference; f16 inputs near 65504 do not overflow S or Q.
//!
//! What the math says, for one bad element X[t0, i0] (NaN, +Inf or −Inf;
//! A has no zero entries, and NaN·0 and ±Inf·0 are NaN anyway):
//!
//! * S[t0, k] = Σ_i X[t0, i]·A[i, k] is non-finite for every k, and so is
//!   Y[t0, j] = s·Σ_k S[t0, k]·A[j, k] for every j. Every other row of S and
//!   Y is computed from its own row of X only (the mma's rows are
//!   independent; f16's power-of-two scaling is per row), so it is clean.
//! * dX = s·Q·A_inᵀ with Q = G·A_out does not involve X: all clean.
//! * dA[:d_out] += Gᵀ·S: dA[j, k] = Σ_t G[t, j]·S[t, k] holds S[t0, k] for
//!   every j, so rows 0..d_out are non-finite, all of them.
//!   dA[:d_in] += Xᵀ·Q: dA[i, k] = Σ_t X[t, i]·Q[t, k] holds X[t0, i0] only
//!   for i = i0, so row i0 is non-finite and rows d_out..d_in other than i0
//!   are clean (the cases put i0 there, d_in > d_out, so the pattern shows).
//!
//! For one bad element G[t0, j0] it is the mirror image (d_out > d_in):
//! Q row t0 and dX row t0 are non-finite; dA rows 0..d_in (Xᵀ·Q) and row j0
//! (Gᵀ·S) are non-finite, rows d_in..d_out other than j0 are clean; Y and S
//! are not involved.
//!
//! The f16 per-column scaling of S and Q in the dA kernel takes its maximum
//! over a token range that holds the bad row; whatever scale a non-finite
//! maximum gives (1), only dA entries that are non-finite anyway are
//! computed from such a column's non-finite entry, and its finite entries
//! stay finite. Every output starts as a finite sentinel (betas 0), so an
//! element the kernel failed to propagate a NaN into, or failed to write,
//! is caught either way; the workspace starts as NaN.

use crate::common::*;
use half::f16;
use rand::rngs::StdRng;
use singlora::{DType, Dims, Dropout};

const SCALE: f32 = 0.5;
/// What every output holds before a launch: finite, exact in every type.
const START: f64 = 7.0;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    Nan,
    PosInf,
    NegInf,
}

impl Bad {
    fn value(self) -> f64 {
        match self {
            Bad::Nan => f64::NAN,
            Bad::PosInf => f64::INFINITY,
            Bad::NegInf => f64::NEG_INFINITY,
        }
    }
}

/// Which input holds the bad element.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Where {
    X,
    G,
}

/// One case: the shape, the bad element's row and column, its value.
#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    at: Where,
    t0: usize,
    col: usize,
    bad: Bad,
}

impl Case {
    fn dims(&self) -> Dims {
        Dims::new(self.tokens, self.d_in, self.d_out, self.rank).unwrap()
    }

    /// Rows of Y and S that must be non-finite: the bad X row.
    fn x_row_bad(&self, t: usize) -> bool {
        self.at == Where::X && t == self.t0
    }

    /// Rows of Q and dX that must be non-finite: the bad G row.
    fn g_row_bad(&self, t: usize) -> bool {
        self.at == Where::G && t == self.t0
    }

    /// Rows of dA that must be non-finite: a bad X poisons Gᵀ·S (rows
    /// :d_out) and row i0 of Xᵀ·Q; a bad G poisons Xᵀ·Q (rows :d_in) and
    /// row j0 of Gᵀ·S.
    fn da_row_bad(&self, row: usize) -> bool {
        match self.at {
            Where::X => row < self.d_out || row == self.col,
            Where::G => row < self.d_in || row == self.col,
        }
    }

    /// The inputs, rounded to T: X and G (one of them holding the bad
    /// element) and A (no zero entries: |a| ≥ 1/(4√D), random signs).
    fn inputs<T: DType>(&self, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let dims = self.dims();
        let d = dims.d() as f64;
        let mut r = rng(seed);
        let mut x = quantize::<T>(&randn(&mut r, self.tokens * self.d_in, 1.0));
        let a: Vec<f64> = randn(&mut r, dims.a_len(), 1.0 / d.sqrt())
            .into_iter()
            .map(|v| v.signum() * v.abs().max(0.25 / d.sqrt()))
            .collect();
        let a = quantize::<T>(&a);
        let mut g = quantize::<T>(&randn(&mut r, self.tokens * self.d_out, 1.0));
        match self.at {
            Where::X => x[self.t0 * self.d_in + self.col] = self.bad.value(),
            Where::G => g[self.t0 * self.d_out + self.col] = self.bad.value(),
        }
        (x, g, a)
    }
}

/// Every output's pattern: non-finite exactly where the case says.
fn assert_patterns(name: &str, c: &Case, out: [&[f64]; 5]) {
    let [y, s, q, dx, da] = out;
    assert_pattern("Y", name, y, c.d_out, |t, _| c.x_row_bad(t));
    assert_pattern("S", name, s, c.rank, |t, _| c.x_row_bad(t));
    assert_pattern("Q", name, q, c.rank, |t, _| c.g_row_bad(t));
    assert_pattern("dX", name, dx, c.d_in, |t, _| c.g_row_bad(t));
    assert_pattern("dA", name, da, c.rank, |row, _| c.da_row_bad(row));
}

/// X cases (d_in > d_out, i0 in d_out..d_in) and G cases (d_out > d_in, j0
/// in d_in..d_out): the bad row inside a 64-row block, first and last of
/// one, decode sizes (≤ 64 tokens, rank ≤ 64: the sm_90 cluster path) and
/// regular ones, every rank bucket, dA over several token splits (600).
const CASES: &[Case] = &[
    case(Where::X, 150, 200, 72, 24, 100, 150, Bad::Nan),
    case(Where::X, 20, 136, 40, 16, 7, 100, Bad::PosInf),
    case(Where::X, 70, 300, 96, 200, 69, 299, Bad::NegInf),
    case(Where::X, 600, 160, 100, 100, 256, 120, Bad::Nan),
    case(Where::X, 64, 90, 33, 48, 0, 33, Bad::PosInf),
    case(Where::G, 150, 72, 200, 24, 100, 150, Bad::Nan),
    case(Where::G, 20, 40, 136, 16, 7, 100, Bad::NegInf),
    case(Where::G, 130, 96, 300, 200, 127, 299, Bad::PosInf),
    case(Where::G, 600, 100, 160, 100, 300, 100, Bad::Nan),
];

#[allow(clippy::too_many_arguments)]
const fn case(
    at: Where,
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    t0: usize,
    col: usize,
    bad: Bad,
) -> Case {
    Case {
        tokens,
        d_in,
        d_out,
        rank,
        at,
        t0,
        col,
        bad,
    }
}

/// Asserts, for every element of a `rows × cols` output, that it is
/// non-finite exactly where `bad(row, col)` says, naming the first that is
/// not.
fn assert_pattern(
    what: &str,
    name: &str,
    got: &[f64],
    cols: usize,
    bad: impl Fn(usize, usize) -> bool,
) {
    for (i, &v) in got.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        let want_bad = bad(r, c);
        assert!(
            want_bad != v.is_finite(),
            "{what} ({name}): element ({r}, {c}) is {v:e}, expected {}",
            if want_bad { "non-finite" } else { "finite" }
        );
    }
}

/// The elements of `v` (rows of `cols`) whose row `keep` accepts.
fn rows_where(v: &[f64], cols: usize, keep: impl Fn(usize) -> bool) -> Vec<f64> {
    v.chunks_exact(cols)
        .enumerate()
        .filter(|(r, _)| keep(*r))
        .flat_map(|(_, row)| row.iter().copied())
        .collect()
}

fn run_case<T: DType>(gpu: &Gpu, c: Case, seed: u64, saved_s: bool) {
    let name = format!("{} {c:?} saved_s={saved_s}", T::NAME);
    let dims = c.dims();
    let (tokens, d_in, d_out, rank) = (c.tokens, c.d_in, c.d_out, c.rank);
    let d = dims.d();
    let (x_bad, g_bad, a) = c.inputs::<T>(seed);
    // The reference of the clean entries: the bad element replaced by 0
    // changes none of them (see the module comment).
    let (mut x_ref, mut g_ref) = (x_bad.clone(), g_bad.clone());
    match c.at {
        Where::X => x_ref[c.t0 * d_in + c.col] = 0.0,
        Where::G => g_ref[c.t0 * d_out + c.col] = 0.0,
    }
    let want = reference_pass(
        &dims,
        [&x_ref, &g_ref, &a],
        SCALE as f64,
        (&vec![0.0; tokens * d_out], 0.0),
        Dropout::NONE,
    );

    // Every output starts finite (beta = 0 never reads Y); the backward
    // from the forward's S, or recomputing it.
    let xga = [&x_bad[..], &g_bad, &a];
    let got = gpu_pass::<T>(
        &gpu.stream,
        &dims,
        xga,
        (START, saved_s),
        SCALE,
        Dropout::NONE,
    );
    assert_patterns(&name, &c, got.all());

    let x_row_bad = |t: usize| c.x_row_bad(t);
    let g_row_bad = |t: usize| c.g_row_bad(t);
    let da_row_bad = |row: usize| c.da_row_bad(row);
    let clean_da_rows = (0..d).filter(|&row| !da_row_bad(row)).count();
    assert!(
        clean_da_rows >= 8,
        "{name}: the case must leave clean dA rows to check"
    );
    let n = &name;
    assert_clean_rows::<T>("Y, clean rows", n, (&got.y, &want.y), d_out, x_row_bad);
    assert_clean_rows::<T>("S, clean rows", n, (&got.s, &want.s), rank, x_row_bad);
    assert_clean_rows::<T>("Q, clean rows", n, (&got.q, &want.q), rank, g_row_bad);
    assert_clean_rows::<T>("dX, clean rows", n, (&got.dx, &want.dx), d_in, g_row_bad);
    assert_clean_rows::<T>("dA, clean rows", n, (&got.da, &want.da), rank, da_row_bad);
}

/// Asserts T's bar for the rows (of `cols`) of an output that `bad` does not
/// mark, against the same rows of the reference.
fn assert_clean_rows<T: DType>(
    what: &str,
    name: &str,
    (got, want): (&[f64], &[f64]),
    cols: usize,
    bad: impl Fn(usize) -> bool,
) {
    assert_close::<T>(
        what,
        name,
        &rows_where(got, cols, |r| !bad(r)),
        &rows_where(want, cols, |r| !bad(r)),
    );
}

fn all_cases<T: DType>(seed: u64) {
    let Some(gpu) = gpu() else { return };
    for (i, &c) in CASES.iter().enumerate() {
        run_case::<T>(&gpu, c, seed + i as u64, true);
        if c.at == Where::X {
            // S recomputed inside the backward from the bad X.
            run_case::<T>(&gpu, c, seed + 100 + i as u64, false);
        }
    }
}

typed_tests! {
    nonfinite_reaches_only_what_the_math_says_f32 = 10,
    nonfinite_reaches_only_what_the_math_says_f16 = 20,
    nonfinite_reaches_only_what_the_math_says_bf16 = 30 => all_cases::<T>(SEED);
}

/// The cases put the bad column where the dA pattern is visible: X's in
/// d_out..d_in, G's in d_in..d_out, rows inside, first and last of a 64-row
/// block, decode and regular sizes, every rank bucket. Needs no GPU.
#[test]
fn nonfinite_cases_cover_what_they_claim() {
    for c in CASES {
        assert!(c.t0 < c.tokens, "{c:?}");
        match c.at {
            Where::X => assert!(
                c.d_in > c.d_out && (c.d_out..c.d_in).contains(&c.col),
                "{c:?}"
            ),
            Where::G => assert!(
                c.d_out > c.d_in && (c.d_in..c.d_out).contains(&c.col),
                "{c:?}"
            ),
        }
    }
    let pos: Vec<usize> = CASES.iter().map(|c| c.t0 % 64).collect();
    assert!(pos.contains(&0) && pos.contains(&63) && pos.iter().any(|p| (1..63).contains(p)));
    assert!(CASES.iter().any(|c| c.tokens <= 64 && c.rank <= 64));
    assert!(CASES.iter().any(|c| c.tokens > 64));
    for bucket in singlora::RANK_BUCKETS {
        assert!(
            CASES
                .iter()
                .any(|c| singlora::RANK_BUCKETS.into_iter().find(|&b| c.rank <= b) == Some(bucket)),
            "bucket {bucket}"
        );
    }
    for bad in [Bad::Nan, Bad::PosInf, Bad::NegInf] {
        assert!(CASES.iter().any(|c| c.bad == bad));
    }
}

/// The patterns the GPU cases assert are the f64 reference's for the same
/// inputs (the math, independently of the kernels). Needs no GPU.
#[test]
fn nonfinite_patterns_are_the_references() {
    for (i, c) in CASES.iter().enumerate() {
        let name = format!("reference {c:?}");
        let dims = c.dims();
        let (x, g, a) = c.inputs::<f32>(700 + i as u64);
        let y0 = vec![0.0; c.tokens * c.d_out];
        let want = reference_pass(&dims, [&x, &g, &a], SCALE as f64, (&y0, 0.0), Dropout::NONE);
        assert_patterns(&name, c, want.all());
    }
}

/// f16 X and G with every entry in ±[60000, 65504]: S and Q reach several
/// times f16's largest value (they are f32, and the kernels scale them by
/// powers of two before rounding to f16 on chip), and Y, S, Q, dX and dA
/// are finite and meet the f16 bar — at decode and regular sizes, and with
/// dA over several token splits.
#[test]
fn f16_inputs_near_65504_do_not_overflow_s_or_q() {
    let Some(gpu) = gpu() else { return };
    let scale = 1e-3f32;
    for (i, &(tokens, d_in, d_out, rank)) in [
        (150usize, 256usize, 256usize, 16usize),
        (20, 256, 192, 48),
        (600, 128, 160, 100),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("tokens={tokens} d_in={d_in} d_out={d_out} rank={rank}");
        let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
        let mut r = rng(500 + i as u64);
        // 60000 plus up to 5504, random signs, rounded to f16.
        let near_max = |r: &mut StdRng, n: usize| -> Vec<f64> {
            let spread = randn(r, n, 1700.0);
            let sign = randn(r, n, 1.0);
            let v: Vec<f64> = spread
                .iter()
                .zip(&sign)
                .map(|(z, s)| s.signum() * (60000.0 + z.abs().min(5504.0)))
                .collect();
            quantize::<f16>(&v)
        };
        let x = near_max(&mut r, tokens * d_in);
        let g = near_max(&mut r, tokens * d_out);
        assert!(x
            .iter()
            .chain(&g)
            .all(|v| v.abs() >= 59999.0 && v.abs() <= 65504.0));
        let a = quantize::<f16>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
        let y0 = vec![0.0; tokens * d_out];
        let want = reference_pass(&dims, [&x, &g, &a], scale as f64, (&y0, 0.0), Dropout::NONE);
        let (s_ref, q_ref) = (&want.s, &want.q);
        let over = |v: &[f64]| v.iter().filter(|s| s.abs() > 65504.0).count();
        assert!(
            over(s_ref) > 0 && over(q_ref) > 0,
            "{name}: S and Q must leave f16's range ({} and {} elements do)",
            over(s_ref),
            over(q_ref)
        );
        assert!(
            want.y.iter().chain(&want.dx).all(|v| v.abs() < 30000.0),
            "{name}: Y and dX must fit f16"
        );

        let xga = [&x[..], &g, &a];
        let got = gpu_pass::<f16>(
            &gpu.stream,
            &dims,
            xga,
            (f64::NAN, true),
            scale,
            Dropout::NONE,
        );
        // relative_l2 is infinite when any element is non-finite.
        let names = ["Y", "S", "Q", "dX", "dA"];
        for ((what, got), want) in names.into_iter().zip(got.all()).zip(want.all()) {
            assert_close::<f16>(what, &name, got, want);
        }
    }
}
