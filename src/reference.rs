//! The f64 CPU reference every kernel is checked against.
//!
//! These functions compute exactly the operations of the design (§2), in f64,
//! on contiguous row-major buffers, written for clarity rather than speed.
//! The loops still run in a cache-friendly order (the innermost loop walks a
//! contiguous row of `A`, of which there are `rank` elements), because tests
//! call them with `d` up to 11008 and `tokens` up to ~100.
//!
//! Notation (see [`Dims`]): `X` is `tokens × d_in`, `Y` and `G` are
//! `tokens × d_out`, `A` is `D × rank` with `D = max(d_in, d_out)`,
//! `A_in = A[:d_in]` and `A_out = A[:d_out]` (the first rows of `A`, which
//! are contiguous prefixes of the buffer). The update `ΔW = s · A_out A_inᵀ`
//! (`d_out × d_in`) is never formed except by [`delta_w`], for tests.
//!
//! Every function checks the length of every slice
//! (a slice may be longer than needed; only its prefix is used) before it
//! touches any output, so a refused call has written nothing. Where a `beta`
//! is 0 the old contents of that output are never read, so an output
//! poisoned with NaN is overwritten cleanly.

use crate::dims::{check_len, Dims};
use crate::dropout::Dropout;
use crate::error::Result;

/// `beta · old + new`, without reading `old` when `beta` is 0.
#[inline]
fn combine(beta: f64, old: f64, new: f64) -> f64 {
    if beta == 0.0 {
        new
    } else {
        beta * old + new
    }
}

/// `M · A[:cols]` for a row-major `rows × cols` matrix `M`: the narrow
/// `rows × rank` intermediate (S = X·A_in, or Q = G·A_out).
fn shrink(m: &[f64], rows: usize, cols: usize, a: &[f64], rank: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * rank];
    for (m_row, out_row) in m[..rows * cols]
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(rank))
    {
        for (&mv, a_row) in m_row.iter().zip(a[..cols * rank].chunks_exact(rank)) {
            for (o, &av) in out_row.iter_mut().zip(a_row) {
                *o += mv * av;
            }
        }
    }
    out
}

/// `out = beta · out + scale · N · A[:cols]ᵀ` for the row-major
/// `rows × rank` intermediate `N`; `out` is `rows × cols`.
#[allow(clippy::too_many_arguments)]
fn expand(
    n: &[f64],
    rows: usize,
    cols: usize,
    a: &[f64],
    rank: usize,
    scale: f64,
    beta: f64,
    out: &mut [f64],
) {
    for (n_row, out_row) in n[..rows * rank]
        .chunks_exact(rank)
        .zip(out[..rows * cols].chunks_exact_mut(cols))
    {
        for (o, a_row) in out_row.iter_mut().zip(a[..cols * rank].chunks_exact(rank)) {
            let dot: f64 = n_row.iter().zip(a_row).map(|(&p, &q)| p * q).sum();
            *o = combine(beta, *o, scale * dot);
        }
    }
}

/// `drop(X) = M ⊙ X / (1 − p)` for a row-major `rows × cols` `X`, with the
/// kernels' mask (see [`Dropout`]); `X` itself (copied) when inactive.
pub fn dropped(dropout: &Dropout, x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let x = &x[..rows * cols];
    if !dropout.is_active() {
        return x.to_vec();
    }
    let ks = dropout.keep_scale();
    x.iter()
        .zip(dropout.mask(rows, cols))
        .map(|(&v, keep)| if keep { v * ks } else { 0.0 })
        .collect()
}

/// Forward: `Y = beta · Y + scale · (drop(X) · A_in) · A_outᵀ`
/// (`drop(X) = X` for [`Dropout::NONE`]).
///
/// Returns `S = drop(X) · A_in` (`tokens × rank`, row-major), the
/// intermediate the kernels save for backward. `x` needs `tokens·d_in` elements, `a` needs
/// `D·rank`, `y` needs `tokens·d_out`; longer slices are accepted and only
/// their prefix is used. With `beta == 0` the old `y` is never read.
///
/// # Errors
/// [`Error::BufferTooSmall`](crate::Error::BufferTooSmall) naming `"x"`,
/// `"a"` or `"y"`; [`Error::InvalidDim`](crate::Error::InvalidDim) naming
/// `"tokens"` when an active dropout cannot address them. Nothing is
/// written on error.
pub fn forward(
    dims: &Dims,
    x: &[f64],
    a: &[f64],
    scale: f64,
    beta: f64,
    y: &mut [f64],
    dropout: Dropout,
) -> Result<Vec<f64>> {
    let (tokens, d_in, d_out, rank) = (dims.tokens(), dims.d_in(), dims.d_out(), dims.rank());
    check_len("x", x.len(), tokens * d_in)?;
    check_len("a", a.len(), dims.a_len())?;
    check_len("y", y.len(), tokens * d_out)?;
    dropout.check_tokens(tokens)?;

    let s = if dropout.is_active() {
        shrink(&dropped(&dropout, x, tokens, d_in), tokens, d_in, a, rank)
    } else {
        shrink(x, tokens, d_in, a, rank)
    };
    expand(&s, tokens, d_out, a, rank, scale, beta, y);
    Ok(s)
}

/// Backward of [`forward`] (with the same `dropout`) for the upstream
/// gradient `G = ∂L/∂Y`.
///
/// With `Q = G · A_out`, `S = drop(X) · A_in` and the mask `M`:
///
/// * `dX = dx_beta · dX + M ⊙ (scale · Q · A_inᵀ) / (1 − p)`
/// * `dA = da_beta · dA + scale · (Gᵀ S placed in rows :d_out + drop(X)ᵀ Q
///   placed in rows :d_in)`; rows covered by both ranges get both terms.
///
/// `x` and `dx` need `tokens·d_in` elements, `g` needs `tokens·d_out`, `a`
/// and `da` need `D·rank`; longer slices are accepted and only their prefix
/// is used. With a beta of 0 the old contents of that output are never read.
///
/// # Errors
/// [`Error::BufferTooSmall`](crate::Error::BufferTooSmall) naming `"x"`,
/// `"a"`, `"g"`, `"dx"` or `"da"`; [`Error::InvalidDim`](crate::Error::InvalidDim)
/// naming `"tokens"` when an active dropout cannot address them. Nothing is
/// written on error.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dims: &Dims,
    x: &[f64],
    a: &[f64],
    g: &[f64],
    scale: f64,
    dx_beta: f64,
    dx: &mut [f64],
    da_beta: f64,
    da: &mut [f64],
    dropout: Dropout,
) -> Result<()> {
    let (tokens, d_in, d_out, rank) = (dims.tokens(), dims.d_in(), dims.d_out(), dims.rank());
    check_len("x", x.len(), tokens * d_in)?;
    check_len("a", a.len(), dims.a_len())?;
    check_len("g", g.len(), tokens * d_out)?;
    check_len("dx", dx.len(), tokens * d_in)?;
    check_len("da", da.len(), dims.a_len())?;
    dropout.check_tokens(tokens)?;

    // The adapter's input: drop(X) (X itself without dropout).
    let xd;
    let x = if dropout.is_active() {
        xd = dropped(&dropout, x, tokens, d_in);
        &xd[..]
    } else {
        x
    };
    let s = shrink(x, tokens, d_in, a, rank);
    let q = shrink(g, tokens, d_out, a, rank);

    // dX: the forward's shrink-expand with G in X's place and the roles of
    // A_in and A_out swapped; with dropout, ∂drop(X)/∂X = M / (1 − p).
    if dropout.is_active() {
        let mut term = vec![0.0; tokens * d_in];
        expand(&q, tokens, d_in, a, rank, scale, 0.0, &mut term);
        let ks = dropout.keep_scale();
        for ((o, t), keep) in dx[..tokens * d_in]
            .iter_mut()
            .zip(term)
            .zip(dropout.mask(tokens, d_in))
        {
            *o = combine(dx_beta, *o, if keep { t * ks } else { 0.0 });
        }
    } else {
        expand(&q, tokens, d_in, a, rank, scale, dx_beta, dx);
    }

    // dA = Gᵀ S (rows :d_out) + Xᵀ Q (rows :d_in), a sum of rank-1 updates,
    // one per token, so every inner loop walks contiguous rows.
    let mut acc = vec![0.0; dims.a_len()];
    for t in 0..tokens {
        let s_row = &s[t * rank..(t + 1) * rank];
        let q_row = &q[t * rank..(t + 1) * rank];
        let g_row = &g[t * d_out..(t + 1) * d_out];
        let x_row = &x[t * d_in..(t + 1) * d_in];
        for (&gv, acc_row) in g_row.iter().zip(acc.chunks_exact_mut(rank)) {
            for (o, &sv) in acc_row.iter_mut().zip(s_row) {
                *o += gv * sv;
            }
        }
        for (&xv, acc_row) in x_row.iter().zip(acc.chunks_exact_mut(rank)) {
            for (o, &qv) in acc_row.iter_mut().zip(q_row) {
                *o += xv * qv;
            }
        }
    }
    for (o, &v) in da[..dims.a_len()].iter_mut().zip(&acc) {
        *o = combine(da_beta, *o, scale * v);
    }
    Ok(())
}

/// The dense update `ΔW = scale · A_out · A_inᵀ` (`d_out × d_in`,
/// row-major). For tests only: it is O(d_out·d_in) and the kernels never
/// form it.
///
/// # Panics
/// If `a` has fewer than `D·rank` elements.
pub fn delta_w(dims: &Dims, a: &[f64], scale: f64) -> Vec<f64> {
    let (d_in, d_out, rank) = (dims.d_in(), dims.d_out(), dims.rank());
    assert!(
        a.len() >= dims.a_len(),
        "reference::delta_w: `a` has {} elements, needs {}",
        a.len(),
        dims.a_len()
    );
    let a_in = &a[..d_in * rank];
    let a_out = &a[..d_out * rank];
    let mut w = vec![0.0; d_out * d_in];
    for (w_row, ao_row) in w.chunks_exact_mut(d_in).zip(a_out.chunks_exact(rank)) {
        for (o, ai_row) in w_row.iter_mut().zip(a_in.chunks_exact(rank)) {
            let dot: f64 = ao_row.iter().zip(ai_row).map(|(&p, &q)| p * q).sum();
            *o = scale * dot;
        }
    }
    w
}

/// Merge: `W = W + scale · A_out · A_inᵀ` in place, for a row-major
/// `d_out × d_in` weight with row stride `ld_w` (unmerge is `-scale`).
/// `dims.tokens` is not used.
///
/// # Errors
/// [`Error::InvalidStride`](crate::Error::InvalidStride) naming `"ld_w"`, or
/// [`Error::BufferTooSmall`](crate::Error::BufferTooSmall) naming `"w"` or
/// `"a"`. Nothing is written on error.
pub fn merge(dims: &Dims, w: &mut [f64], ld_w: usize, a: &[f64], scale: f64) -> Result<()> {
    crate::ops::merge::check_merge(dims, w.len(), ld_w, a.len(), 0.0)?;
    let (d_in, d_out, rank) = (dims.d_in(), dims.d_out(), dims.rank());
    for (r, ao_row) in a[..d_out * rank].chunks_exact(rank).enumerate() {
        let w_row = &mut w[r * ld_w..r * ld_w + d_in];
        for (o, ai_row) in w_row.iter_mut().zip(a[..d_in * rank].chunks_exact(rank)) {
            let dot: f64 = ao_row.iter().zip(ai_row).map(|(&p, &q)| p * q).sum();
            *o += scale * dot;
        }
    }
    Ok(())
}

/// One AdamW step (1-based `step`) in f64 over `p` with gradient
/// `grad_scale · grad`, in the order of [`crate::AdamW`]'s kernel (PyTorch's
/// `torch.optim.AdamW`): decay, moments, bias-corrected update.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a bad
/// hyper-parameter or `step == 0`;
/// [`Error::BufferTooSmall`](crate::Error::BufferTooSmall) naming `"grad"`,
/// `"m"` or `"v"` when shorter than `p`. Nothing is written on error.
pub fn adamw(
    cfg: &crate::AdamW,
    step: u64,
    p: &mut [f64],
    grad: &[f64],
    grad_scale: f64,
    m: &mut [f64],
    v: &mut [f64],
) -> Result<()> {
    let (bias1, bias2) = cfg.bias_corrections(step)?;
    check_len("grad", grad.len(), p.len())?;
    check_len("m", m.len(), p.len())?;
    check_len("v", v.len(), p.len())?;
    let (lr, b1, b2) = (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64);
    let (eps, wd) = (cfg.eps as f64, cfg.weight_decay as f64);
    for i in 0..p.len() {
        let g = grad_scale * grad[i];
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        p[i] -= lr * (m[i] / bias1) / ((v[i] / bias2).sqrt() + eps);
    }
    Ok(())
}

/// Mean squared error of `pred` against `target` (equal lengths) and its
/// gradient `2/n · (pred − target)`.
///
/// # Errors
/// [`Error::BufferTooSmall`](crate::Error::BufferTooSmall) naming `"target"`
/// when it is shorter than `pred`.
pub fn mse(pred: &[f64], target: &[f64]) -> Result<(f64, Vec<f64>)> {
    check_len("target", target.len(), pred.len())?;
    let n = pred.len().max(1) as f64;
    let mut loss = 0.0;
    let grad = pred
        .iter()
        .zip(target)
        .map(|(&p, &t)| {
            loss += (p - t) * (p - t);
            2.0 / n * (p - t)
        })
        .collect();
    Ok((loss / n, grad))
}

/// The relative L2 error `‖out − reference‖₂ / ‖reference‖₂`, the measure of
/// every accuracy bar (design §3).
///
/// Built so that a broken output can never pass a tolerance check: it
/// returns `f64::INFINITY` if the lengths differ, if any element of `out` (or
/// of `reference`) is NaN or infinite, or if `reference` is all zero while
/// `out` is not. It returns 0 when both are all zero (including both empty).
pub fn relative_l2(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let mut diff2 = 0.0;
    let mut ref2 = 0.0;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        diff2 += (o - r) * (o - r);
        ref2 += r * r;
    }
    if diff2 == 0.0 {
        0.0
    } else if ref2 == 0.0 {
        f64::INFINITY
    } else {
        let e = (diff2 / ref2).sqrt();
        // Squares of huge finite values may overflow to infinity; never
        // report that as a pass.
        if e.is_nan() {
            f64::INFINITY
        } else {
            e
        }
    }
}
