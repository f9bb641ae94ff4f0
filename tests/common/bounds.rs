//! Per-element error bounds of the kernels' outputs, derived from how each
//! element type rounds, and a CPU simulation of correctly rounded kernels
//! that the self-checks (CPU-only tests in tests/forward.rs and
//! tests/backward.rs) hold the bounds against.
//!
//! # The model (kernels/forward, kernels/backward)
//!
//! X, G, A, Y0 and dX0 are T values and the f64 reference sees exactly them.
//! Rounding to nearest gives |fl(v) − v| ≤ u·|v| + η (u the unit roundoff, η
//! half the smallest subnormal), for T and for f32 (u = 2⁻²⁴).
//!
//! * Accumulation. A dot product Σ p_j of exact products (a product of two
//!   T values is exact in f32; an FMA rounds once) is accumulated in f32 in
//!   *steps*: one FMA per product (f32 kernels), one mma.sync per 16 products
//!   (f16/bf16). A step turns the accumulator c into c + Σ_step p with an
//!   error ≤ κ·(|c| + Σ_step |p|): κ = 2⁻²⁴ for an FMA; a tensor-core step
//!   aligns c and its 16 products to the largest and truncates each (each
//!   loses < 2⁻²³ of the largest), then normalises by truncation: ≤ 18·2⁻²³,
//!   taken as κ = 2⁻¹⁸ = 32·2⁻²³ (a margin for hardware keeping a bit less).
//! * Order. The products are summed in contiguous chunks of at least 16 (k
//!   tiles, a decode cluster's share of d, dA's token splits), each chunk
//!   from zero in steps 16 apart, and the chunk sums are added in f32 in
//!   order. The accumulator at a step is then a range sum P_b − P_a of the
//!   prefix sums, at most R(b) = max_{a≤b} |P_b − P_a|; in any window of 16
//!   consecutive positions at most one step with a nonzero accumulator starts
//!   and at most one chunk sum is added (whose error is ≤ 2⁻²⁴·R(b)). With W
//!   the sum over the m windows of each window's largest R, and ε_p a bound
//!   on Σ|p̂ − p| when the products carry input errors,
//!
//!   |err| ≤ [(κ + 2⁻²⁴)·(W + 2m·ε_p) + κ·(Σ|p| + ε_p) + 2m·2⁻¹⁴⁹] / (1 − (κ + 2⁻²⁴)·2m)
//!
//!   (the denominator absorbs the computed accumulator's own error; 2⁻¹⁴⁹
//!   covers f32 underflow per operation). No order beyond these rules is
//!   assumed: the normal and the cluster-split decode kernels both satisfy it.
//!   R and W come from the data: the classic worst case, ~n·κ·Σ|p| (every
//!   partial sum as large as Σ|p|), is tens of times looser at d = 11008.
//! * On-chip rounding (f16/bf16). S and Q are rounded to T before the expand
//!   and before dA's tensor cores: |Ŝ − S̃| ≤ u_T·|S̃| + η_T/σ, with σ the
//!   power of two f16 rows (expand) or columns (dA) are scaled by into
//!   [2¹³, 2¹⁴), so 1/σ ≤ max(2⁻¹³·max|S̃|, 2⁻¹²⁶); bf16 is not scaled.
//!   These errors reach an output as Σ_k w_k·d_k (w = A, or G/X for dA),
//!   with |d_k| ≤ e_k + u_T·(|S_k| + e_k) + η_T/σ, e_k the bound on S̃ − S.
//!   The expand takes Σ|w_k|·|d_k|. For dA, whose sums run over tokens, the
//!   test data make each part a Rademacher sum: G's signs are independent
//!   fair coins, independent of S (a function of X and A only), and X's of Q
//!   (of G and A); so each part is also bounded by λ·sqrt(Σ(w_t·d_t)²), λ =
//!   10 (Hoeffding: broken with probability ≤ 2·exp(−λ²/2) ≈ 4e-22 per part),
//!   and the smaller is taken: it is only for parts over more than ~250
//!   tokens (the worst case grows as √tokens against the result). The
//!   accumulation parts are always taken at their worst case.
//! * Epilogue. Y/dX: v = acc·(s/σ) in f32 (one rounding; s/σ is exact),
//!   v + Y0 in f32 (beta = 1), then the store rounds to T (16-bit types).
//!   dA: s·Σ in f32, + dA0 in f32 (da_beta = 1). A fused multiply-add only
//!   removes roundings.
//! * The f64 reference's own error (< (n + r)·2⁻⁵³ of the magnitudes, below
//!   1e-4 of any bound here) is covered by a final factor 1.001.

use singlora::{DType, Dims};

/// The sizes of one call (what [`Dims`] validates; plain fields here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

impl Shape {
    pub const fn new(tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Self {
        Self {
            tokens,
            d_in,
            d_out,
            rank,
        }
    }

    /// (tokens, d_in, d_out, rank).
    pub fn parts(&self) -> (usize, usize, usize, usize) {
        (self.tokens, self.d_in, self.d_out, self.rank)
    }

    /// D = max(d_in, d_out).
    pub fn d(&self) -> usize {
        self.dims().d()
    }

    pub fn a_len(&self) -> usize {
        self.dims().a_len()
    }

    pub fn s_len(&self) -> usize {
        self.dims().s_len()
    }

    pub fn dims(&self) -> Dims {
        Dims::new(self.tokens, self.d_in, self.d_out, self.rank).unwrap()
    }
}

/// Unit roundoff of f32.
pub const U32: f64 = 1.0 / 16_777_216.0;
/// Per f32 operation: covers underflow (half the smallest subnormal, 2⁻¹⁵⁰, twice).
const F32_FLOOR: f64 = 1.401_298_464_324_817e-45;
/// Per-step error of a tensor-core step (see the module comment).
const TC_KAPPA: f64 = 1.0 / 262_144.0;
/// Hoeffding's λ for dA's sums of the S and Q errors over tokens.
pub const LAMBDA: f64 = 10.0;
/// Covers the f64 reference's own rounding.
const SLACK: f64 = 1.001;

/// How the kernels round and accumulate for one element type.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    /// Unit roundoff of T.
    pub u: f64,
    /// Half the smallest subnormal of T.
    pub eta: f64,
    /// 16-bit T: S and Q are rounded to T on chip, and the outputs are
    /// rounded to T from f32.
    pub sixteen_bit: bool,
    /// f16: the on-chip rounding happens after a power-of-two scaling.
    pub scaled: bool,
    /// Products per accumulation step: 16 (mma.sync k16) or 1 (FMA).
    pub step: usize,
    /// Relative error of one accumulation step.
    pub kappa: f64,
}

pub fn model<T: DType>() -> Model {
    let (u, eta, sixteen_bit, scaled, step, kappa) = match T::NAME {
        "f32" => (U32, 2f64.powi(-150), false, false, 1, U32),
        "f16" => (2f64.powi(-11), 2f64.powi(-25), true, true, 16, TC_KAPPA),
        "bf16" => (2f64.powi(-8), 2f64.powi(-134), true, false, 16, TC_KAPPA),
        other => panic!("no rounding model for {other}"),
    };
    Model {
        u,
        eta,
        sixteen_bit,
        scaled,
        step,
        kappa,
    }
}

/// The running statistics of one dot product fed in order: prefix sum, its
/// running minimum and maximum (from P_0 = 0), the widest range sum ending
/// at each position (maximised per window of `step` positions, summed over
/// windows) and Σ|p|.
#[derive(Clone, Copy, Debug)]
struct Chain {
    step: usize,
    p: f64,
    lo: f64,
    hi: f64,
    window: f64,
    sum_r: f64,
    abs: f64,
    count: usize,
    windows: usize,
}

impl Chain {
    fn new(step: usize) -> Self {
        Self {
            step,
            p: 0.0,
            lo: 0.0,
            hi: 0.0,
            window: 0.0,
            sum_r: 0.0,
            abs: 0.0,
            count: 0,
            windows: 0,
        }
    }

    #[inline]
    fn range_here(&self) -> f64 {
        (self.p - self.lo).max(self.hi - self.p)
    }

    #[inline]
    fn add(&mut self, v: f64) {
        // R at this position: a step (or a chunk sum) may start here.
        self.window = self.window.max(self.range_here());
        self.p += v;
        self.lo = self.lo.min(self.p);
        self.hi = self.hi.max(self.p);
        self.abs += v.abs();
        self.count += 1;
        if self.count % self.step == 0 {
            self.sum_r += self.window;
            self.window = 0.0;
            self.windows += 1;
        }
    }

    /// Closes the last window, including the end position (where the last
    /// chunk sum is added).
    fn finish(&mut self) {
        self.window = self.window.max(self.range_here());
        self.sum_r += self.window;
        self.window = 0.0;
        self.windows += 1;
    }

    /// The accumulation error bound of the module comment. `ep`: Σ|p̂ − p|
    /// of the products' input errors; `floor_scale`: what the f32 underflow
    /// allowance is multiplied by (1/σ for a scaled f16 accumulation).
    fn error(&self, md: &Model, ep: f64, floor_scale: f64) -> f64 {
        let k = md.kappa + U32;
        let m2 = 2.0 * self.windows as f64;
        let den = 1.0 - k * m2;
        assert!(den > 0.5, "dot product too long for the accumulation bound");
        (k * (self.sum_r + m2 * ep) + md.kappa * (self.abs + ep) + m2 * F32_FLOOR * floor_scale)
            / den
    }
}

/// 1/σ for f16's power-of-two scaling of a row or column whose largest
/// magnitude is at most `max_abs` (σ·max ∈ [2¹³, 2¹⁴), σ ≤ 2¹²⁶).
fn inv_scale_bound(max_abs: f64) -> f64 {
    (max_abs * 2f64.powi(-13)).max(2f64.powi(-126))
}

/// The f32 epilogue of an output `beta·out0 + scale·Σ` whose sum Σ is within
/// `e_sum`: (e1, the error of `scale·Σ` rounded to f32; e2, of adding
/// `out0` in f32 when beta ≠ 0). `term` = scale·Σ and `out_ref` are the
/// reference's.
fn epilogue(scale: f64, e_sum: f64, term: f64, beta: f64, out_ref: f64) -> (f64, f64) {
    let e_term = scale.abs() * e_sum;
    let e1 = e_term + U32 * (term.abs() + e_term) + F32_FLOOR;
    let e2 = if beta != 0.0 {
        U32 * (out_ref.abs() + e1) + F32_FLOOR
    } else {
        0.0
    };
    (e1, e2)
}

/// Bounds of one shrink-expand: the narrow f32 intermediate and the output.
pub struct ShrinkExpandBounds {
    pub narrow: Vec<f64>,
    pub out: Vec<f64>,
}

/// Per-element bounds of S = M·A[:k_dim] as the kernels accumulate it (f32):
/// `m` is `rows × k_dim`, `a` is `≥ k_dim × rank`, both exact T values.
pub fn shrink_bound<T: DType>(
    m: &[f64],
    rows: usize,
    k_dim: usize,
    a: &[f64],
    rank: usize,
) -> Vec<f64> {
    let md = model::<T>();
    let mut err = vec![0.0; rows * rank];
    let mut chains = vec![Chain::new(md.step); rank];
    for (m_row, e_row) in m[..rows * k_dim]
        .chunks_exact(k_dim)
        .zip(err.chunks_exact_mut(rank))
    {
        chains.iter_mut().for_each(|c| *c = Chain::new(md.step));
        for (&mv, a_row) in m_row.iter().zip(a[..k_dim * rank].chunks_exact(rank)) {
            for (c, &av) in chains.iter_mut().zip(a_row) {
                c.add(mv * av);
            }
        }
        for (e, c) in e_row.iter_mut().zip(chains.iter_mut()) {
            c.finish();
            *e = c.error(&md, 0.0, 1.0) * SLACK;
        }
    }
    err
}

/// Per-element bounds of `out = beta·out0 + scale·N·A[:cols]ᵀ` where the
/// kernel's f32 N̂ = N (`n`, rows × rank, exact) within `n_err`, is rounded
/// to T on chip (16-bit; f16 rows scaled), and accumulated on tensor cores
/// or FMAs. `term` = scale·N·A[:cols]ᵀ and `out_ref` = beta·out0 + term are
/// the reference's.
#[allow(clippy::too_many_arguments)]
pub fn expand_bound<T: DType>(
    n: &[f64],
    n_err: &[f64],
    rows: usize,
    rank: usize,
    a: &[f64],
    cols: usize,
    scale: f64,
    beta: f64,
    term: &[f64],
    out_ref: &[f64],
) -> Vec<f64> {
    let md = model::<T>();
    let mut out = vec![0.0; rows * cols];
    // Per element of the row of N: |N̂| bound, its rounding bound u·|N̂|.
    let mut mag = vec![0.0; rank];
    let mut rnd = vec![0.0; rank];
    for t in 0..rows {
        let n_row = &n[t * rank..(t + 1) * rank];
        let e_row = &n_err[t * rank..(t + 1) * rank];
        for k in 0..rank {
            mag[k] = n_row[k].abs() + e_row[k];
            rnd[k] = if md.sixteen_bit { md.u * mag[k] } else { 0.0 };
        }
        let inv = if md.scaled {
            inv_scale_bound(mag.iter().fold(0.0, |m: f64, &v| m.max(v)))
        } else {
            1.0
        };
        let eta = if md.sixteen_bit { md.eta * inv } else { 0.0 };
        for c in 0..cols {
            let a_row = &a[c * rank..(c + 1) * rank];
            let mut chain = Chain::new(md.step);
            // Σ_k |A_ck|·|d_k|: the S errors' worst case.
            let mut ep = 0.0;
            for k in 0..rank {
                ep += a_row[k].abs() * (e_row[k] + rnd[k] + eta);
                chain.add(n_row[k] * a_row[k]);
            }
            chain.finish();
            let value = ep;
            let acc = chain.error(&md, ep, inv.max(1.0));
            let i = t * cols + c;
            let (e1, e2) = epilogue(scale, value + acc, term[i], beta, out_ref[i]);
            let e3 = if md.sixteen_bit {
                md.u * (out_ref[i].abs() + e1 + e2) + md.eta
            } else {
                0.0
            };
            out[i] = (e1 + e2 + e3) * SLACK;
        }
    }
    out
}

/// Bounds of a shrink-expand (forward; dX with G in X's place): `m` is
/// `rows × k_dim`, `narrow` = m·A[:k_dim], `term` = scale·narrow·A[:n_dim]ᵀ,
/// `out_ref` = beta·out0 + term, all from the reference.
#[allow(clippy::too_many_arguments)]
pub fn shrink_expand_bounds<T: DType>(
    m: &[f64],
    rows: usize,
    k_dim: usize,
    a: &[f64],
    rank: usize,
    n_dim: usize,
    scale: f64,
    beta: f64,
    narrow: &[f64],
    term: &[f64],
    out_ref: &[f64],
) -> ShrinkExpandBounds {
    let narrow_err = shrink_bound::<T>(m, rows, k_dim, a, rank);
    let out = expand_bound::<T>(
        narrow,
        &narrow_err,
        rows,
        rank,
        a,
        n_dim,
        scale,
        beta,
        term,
        out_ref,
    );
    ShrinkExpandBounds {
        narrow: narrow_err,
        out,
    }
}

/// `rows × cols` → `cols × rows`.
pub fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// Per-element bounds of dA = da_beta·dA0 + scale·(Gᵀ·S into rows :d_out +
/// Xᵀ·Q into rows :d_in), with the kernels' f32 S and Q within `s_err` and
/// `q_err` of the reference's `s`, `q`; rounded to T on chip (16-bit; f16
/// columns scaled per token split, bounded here by the column over all
/// tokens). `grad_term` = scale·(GᵀS ⊕ XᵀQ) and `da_ref` = da_beta·dA0 +
/// grad_term are the reference's.
#[allow(clippy::too_many_arguments)]
pub fn da_bound<T: DType>(
    sh: Shape,
    x: &[f64],
    g: &[f64],
    s: &[f64],
    s_err: &[f64],
    q: &[f64],
    q_err: &[f64],
    scale: f64,
    da_beta: f64,
    grad_term: &[f64],
    da_ref: &[f64],
) -> Vec<f64> {
    let (tokens, d_in, d_out, rank) = sh.parts();
    let md = model::<T>();
    // Token-contiguous copies: every inner loop below walks one row.
    let (gt, xt) = (transpose(g, tokens, d_out), transpose(x, tokens, d_in));
    let (st, set) = (transpose(s, tokens, rank), transpose(s_err, tokens, rank));
    let (qt, qet) = (transpose(q, tokens, rank), transpose(q_err, tokens, rank));
    // Per column of S or Q (token-contiguous): |Ŝ| bounds, rounding bounds,
    // and the η part of the rounding.
    let narrow = |vt: &[f64], et: &[f64], k: usize| {
        let v = &vt[k * tokens..(k + 1) * tokens];
        let e = &et[k * tokens..(k + 1) * tokens];
        let mag: Vec<f64> = v.iter().zip(e).map(|(v, e)| v.abs() + e).collect();
        let rnd: Vec<f64> = mag
            .iter()
            .map(|m| if md.sixteen_bit { md.u * m } else { 0.0 })
            .collect();
        let inv = if md.scaled {
            inv_scale_bound(mag.iter().fold(0.0, |m: f64, &v| m.max(v)))
        } else {
            1.0
        };
        let eta = if md.sixteen_bit { md.eta * inv } else { 0.0 };
        (rnd, eta, inv)
    };
    let mut out = vec![0.0; sh.a_len()];
    for k in 0..rank {
        let (s_rnd, s_eta, s_inv) = narrow(&st, &set, k);
        let (q_rnd, q_eta, q_inv) = narrow(&qt, &qet, k);
        let (s_col, se_col) = (&st[k * tokens..][..tokens], &set[k * tokens..][..tokens]);
        let (q_col, qe_col) = (&qt[k * tokens..][..tokens], &qet[k * tokens..][..tokens]);
        for i in 0..sh.d() {
            // Part 0 (Gᵀ·S) then part 1 (Xᵀ·Q): one sequence of chunks. Per
            // part: Σ_t |w_t|·|d_t| and λ·sqrt(Σ_t (w_t·d_t)²).
            let mut chain = Chain::new(md.step);
            let mut ep = 0.0;
            let mut value = 0.0;
            let mut part = |w_row: &[f64], v: &[f64], e: &[f64], rnd: &[f64], eta: f64| {
                let (mut det, mut sq) = (0.0, 0.0);
                for t in 0..tokens {
                    let wd = w_row[t].abs() * (e[t] + rnd[t] + eta);
                    det += wd;
                    sq += wd * wd;
                    chain.add(w_row[t] * v[t]);
                }
                ep += det;
                value += det.min(LAMBDA * sq.sqrt());
            };
            if i < d_out {
                part(&gt[i * tokens..][..tokens], s_col, se_col, &s_rnd, s_eta);
            }
            if i < d_in {
                part(&xt[i * tokens..][..tokens], q_col, qe_col, &q_rnd, q_eta);
            }
            chain.finish();
            let acc = chain.error(&md, ep, s_inv.max(q_inv).max(1.0));
            let idx = i * rank + k;
            let (e1, e2) = epilogue(scale, value + acc, grad_term[idx], da_beta, da_ref[idx]);
            out[idx] = (e1 + e2) * SLACK;
        }
    }
    out
}

/// The first element of `got` outside `bound` of `want` (NaN is outside),
/// and how many are.
pub fn outside(got: &[f64], want: &[f64], bound: &[f64]) -> Option<(usize, usize)> {
    assert_eq!(got.len(), want.len());
    assert_eq!(got.len(), bound.len());
    let mut first = None;
    let mut count = 0;
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        assert!(
            b.is_finite() && w.is_finite(),
            "reference or bound {i} not finite"
        );
        let within = (g - w).abs() <= b; // false for NaN
        if !within {
            first.get_or_insert(i);
            count += 1;
        }
    }
    first.map(|f| (f, count))
}

/// Asserts every element of the row-major `got` (rows of `cols`) is within
/// its bound of `want`, naming the first that is not by (row, column).
pub fn assert_within_bounds(
    what: &str,
    case: &str,
    got: &[f64],
    want: &[f64],
    bound: &[f64],
    cols: usize,
) {
    if let Some((i, count)) = outside(got, want, bound) {
        panic!(
            "{what} ({case}): {count} of {} elements outside their bounds; first ({}, {}): \
             {:e}, expected {:e} within {:e} (off by {:e})",
            got.len(),
            i / cols,
            i % cols,
            got[i],
            want[i],
            bound[i],
            (got[i] - want[i]).abs()
        );
    }
}

/// Root mean square.
pub fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// `out − beta·base`, elementwise: the adapter's term of an output that
/// was added onto `base` (exact in f64 for T values of similar magnitude).
pub fn adapter_term(out: &[f64], base: &[f64], beta: f32) -> Vec<f64> {
    if beta == 0.0 {
        return out.to_vec();
    }
    out.iter()
        .zip(base)
        .map(|(o, b)| o - beta as f64 * b)
        .collect()
}

/// A CPU simulation of the kernels' arithmetic: f32 accumulation in the
/// kernels' steps (FMAs, or a pessimistic tensor-core model that truncates),
/// chunked sums, on-chip rounding of S/Q to T with f16's power-of-two
/// scaling, and the f32 epilogues. For the self-checks of the bounds.
pub mod sim {
    use super::*;
    use crate::common::round_f32_to;

    fn rn32(x: f64) -> f64 {
        x as f32 as f64
    }

    /// floor(log2 |x|) of a normal, nonzero f64.
    fn exponent(x: f64) -> i32 {
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023
    }

    /// x truncated toward zero to a multiple of 2^e.
    fn trunc_to(x: f64, e: i32) -> f64 {
        let q = 2f64.powi(e);
        (x / q).trunc() * q
    }

    /// x truncated toward zero to 24 significant bits.
    fn rz32(x: f64) -> f64 {
        if x == 0.0 {
            0.0
        } else {
            trunc_to(x, exponent(x.abs()) - 23)
        }
    }

    /// One tensor-core step, pessimistically: c and the products aligned to
    /// the largest exponent and truncated to 24 bits there, summed exactly,
    /// the sum truncated to 24 significant bits.
    fn tc_step(c: f64, ps: &[f64]) -> f64 {
        let mx = ps.iter().fold(c.abs(), |m, p| m.max(p.abs()));
        if mx == 0.0 {
            return 0.0;
        }
        let q = exponent(mx) - 23;
        rz32(trunc_to(c, q) + ps.iter().map(|&p| trunc_to(p, q)).sum::<f64>())
    }

    /// Σ ps as a kernel of type T accumulates it: chunks of `chunk` products
    /// (each from zero: tensor-core steps of 16 or FMAs), chunk sums added
    /// in f32.
    pub fn dot<T: DType>(ps: &[f64], chunk: usize) -> f64 {
        let tc = model::<T>().step == 16;
        let mut total = 0.0;
        for part in ps.chunks(chunk.max(1)) {
            let mut acc = 0.0;
            if tc {
                for st in part.chunks(16) {
                    acc = tc_step(acc, st);
                }
            } else {
                for &p in part {
                    acc = rn32(acc + p); // an FMA (the f64 sum may round first)
                }
            }
            total = rn32(total + acc);
        }
        total
    }

    /// The kernels' pow2_scale_for: σ with σ·max ∈ [2¹³, 2¹⁴), at most 2¹²⁶.
    pub fn pow2_scale_for(max_abs: f64) -> f64 {
        if max_abs.is_nan() || max_abs <= 0.0 || max_abs.is_infinite() {
            return 1.0;
        }
        2f64.powi((13 - exponent(max_abs)).min(126))
    }

    /// Rounds f32 values to T as the kernels do on chip, scaled by `sigma`
    /// (returns the scaled T values).
    fn on_chip<T: DType>(v: f64, sigma: f64) -> f64 {
        if model::<T>().sixteen_bit {
            round_f32_to::<T>((v * sigma) as f32)
        } else {
            v
        }
    }

    /// The shrink: N̂ = M·A[:k_dim] in f32 (`chunk` products per chunk).
    pub fn shrink<T: DType>(
        m: &[f64],
        rows: usize,
        k_dim: usize,
        a: &[f64],
        rank: usize,
        chunk: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0; rows * rank];
        let mut ps = vec![0.0; k_dim];
        for t in 0..rows {
            for k in 0..rank {
                for (j, p) in ps.iter_mut().enumerate() {
                    *p = m[t * k_dim + j] * a[j * rank + k];
                }
                out[t * rank + k] = dot::<T>(&ps, chunk);
            }
        }
        out
    }

    /// The expand of the shrink's f32 output `n`: out = beta·out0 +
    /// scale·N̂·A[:cols]ᵀ, rounded to T.
    #[allow(clippy::too_many_arguments)]
    pub fn expand<T: DType>(
        n: &[f64],
        rows: usize,
        rank: usize,
        a: &[f64],
        cols: usize,
        scale: f32,
        beta: f32,
        out0: &[f64],
    ) -> Vec<f64> {
        let md = model::<T>();
        let mut out = vec![0.0; rows * cols];
        let mut ps = vec![0.0; rank];
        for t in 0..rows {
            let row = &n[t * rank..(t + 1) * rank];
            let sigma = if md.scaled {
                pow2_scale_for(row.iter().fold(0.0, |m: f64, v| m.max(v.abs())))
            } else {
                1.0
            };
            let nh: Vec<f64> = row.iter().map(|&v| on_chip::<T>(v, sigma)).collect();
            let rs = rn32(scale as f64 / sigma);
            for c in 0..cols {
                for (k, p) in ps.iter_mut().enumerate() {
                    *p = nh[k] * a[c * rank + k];
                }
                let mut v = rn32(dot::<T>(&ps, usize::MAX) * rs);
                if beta != 0.0 {
                    v = rn32(v + out0[t * cols + c]);
                }
                out[t * cols + c] = if md.sixteen_bit {
                    round_f32_to::<T>(v as f32)
                } else {
                    v
                };
            }
        }
        out
    }

    /// dA as the kernels compute it from the f32 S and Q (`s`, `q`): per
    /// token split (`splits` of them) and part, per column scaled (f16) and
    /// rounded to T, accumulated, the partials summed in f32 in order (part
    /// 0's splits, then part 1's), then scale·Σ + da_beta·dA0 in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn da<T: DType>(
        sh: Shape,
        x: &[f64],
        g: &[f64],
        s: &[f64],
        q: &[f64],
        scale: f32,
        da_beta: f32,
        da0: &[f64],
        splits: usize,
    ) -> Vec<f64> {
        let (tokens, d_in, d_out, rank) = sh.parts();
        let md = model::<T>();
        let per = tokens.div_ceil(splits).max(1);
        let mut out = vec![0.0; sh.a_len()];
        for k in 0..rank {
            // Per split: the scaled, rounded column of S and of Q, and 1/σ.
            let col = |v: &[f64], t0: usize, t1: usize| {
                let sigma = if md.scaled {
                    pow2_scale_for((t0..t1).fold(0.0, |m: f64, t| m.max(v[t * rank + k].abs())))
                } else {
                    1.0
                };
                let c: Vec<f64> = (t0..t1)
                    .map(|t| on_chip::<T>(v[t * rank + k], sigma))
                    .collect();
                (c, 1.0 / sigma)
            };
            let ranges: Vec<(usize, usize)> = (0..tokens)
                .step_by(per)
                .map(|t0| (t0, (t0 + per).min(tokens)))
                .collect();
            let s_cols: Vec<_> = ranges.iter().map(|&(a, b)| col(s, a, b)).collect();
            let q_cols: Vec<_> = ranges.iter().map(|&(a, b)| col(q, a, b)).collect();
            for i in 0..sh.d() {
                let mut sum = 0.0;
                let mut part = |w: &[f64], ld: usize, cols: &[(Vec<f64>, f64)]| {
                    for (&(t0, t1), (c, inv)) in ranges.iter().zip(cols) {
                        let ps: Vec<f64> = (t0..t1).map(|t| w[t * ld + i] * c[t - t0]).collect();
                        sum = rn32(sum + dot::<T>(&ps, usize::MAX) * inv);
                    }
                };
                if i < d_out {
                    part(g, d_out, &s_cols);
                }
                if i < d_in {
                    part(x, d_in, &q_cols);
                }
                let prev = if da_beta != 0.0 {
                    da_beta as f64 * da0[i * rank + k]
                } else {
                    0.0
                };
                out[i * rank + k] = rn32(rn32(scale as f64 * sum) + prev);
            }
        }
        out
    }
}

/// The q-quantile of v (q in [0, 1]).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// The self-check of one output's bounds against a simulated kernel's
/// `got` (which must already lie within them): a wrong element `p·typical`
/// off is caught in at least 99 % of the positions (all but a few of those
/// whose bound is largest), and one such element, planted, fails the check.
/// Returns a line of statistics: the largest error/bound, and the median and
/// largest bound over `typical`.
pub fn check_bound_tightness(
    name: &str,
    what: &str,
    got: &[f64],
    want: &[f64],
    bound: &[f64],
    typical: f64,
    p: f64,
) -> String {
    let off = p * typical;
    let n = got.len();
    let worst = (0..n)
        .map(|i| (got[i] - want[i]).abs() / bound[i])
        .fold(0.0, f64::max);
    let catches = |i: usize| (got[i] - want[i]).abs() + bound[i] < off;
    let caught = (0..n).filter(|&i| catches(i)).count() as f64 / n as f64;
    assert!(
        caught >= 0.99,
        "{name}: a wrong {what} element {p:e}·RMS off would be caught in only {caught} of them"
    );
    let j = (0..n)
        .map(|k| (k + n / 2) % n)
        .find(|&j| catches(j))
        .unwrap();
    let mut bad = got.to_vec();
    bad[j] += off;
    assert_eq!(
        outside(&bad, want, bound),
        Some((j, 1)),
        "{name}: {what} element {j} moved by {off:e} passes"
    );
    format!(
        "{what}: error/bound max {worst:.3}; bound/RMS median {:.1e} max {:.1e}; \
         {p:e}·RMS off caught in {:.2} %",
        quantile(bound, 0.5) / typical,
        quantile(bound, 1.0) / typical,
        100.0 * caught
    )
}
