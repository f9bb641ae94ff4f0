//! The f64 reference's forward and backward as the tests call them: from
//! zeros or from a given start, returning what they compute instead of
//! filling buffers the caller lays out, and the backward's two shrinks S and
//! Q on their own.

use singlora::{reference, Dims, Dropout};

/// The reference forward onto `y0` with `beta` (`y0` unread where `beta`
/// is 0): (Y, S).
pub fn reference_forward_onto(
    dims: &Dims,
    [x, a]: [&[f64]; 2],
    scale: f64,
    (y0, beta): (&[f64], f64),
    dropout: Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = y0.to_vec();
    let s = reference::forward(dims, x, a, scale, beta, &mut y, dropout).unwrap();
    (y, s)
}

/// The reference forward from a zero Y (beta 0): (Y, S).
pub fn reference_forward(
    dims: &Dims,
    [x, a]: [&[f64]; 2],
    scale: f64,
    dropout: Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let zeros = vec![0.0; dims.tokens() * dims.d_out()];
    reference_forward_onto(dims, [x, a], scale, (&zeros, 0.0), dropout)
}

/// S = drop(X)·A[:d_in], the forward's shrink.
pub fn reference_s(dims: &Dims, x: &[f64], a: &[f64], dropout: Dropout) -> Vec<f64> {
    reference_forward(dims, [x, a], 0.0, dropout).1
}

/// `dims` with d_in and d_out swapped: its forward with X := G is the
/// backward's dX half without dropout (S becomes Q = G·A[:d_out], Y becomes
/// scale·Q·A[:d_in]ᵀ = dX).
pub fn swapped(dims: &Dims) -> Dims {
    Dims::new(dims.tokens(), dims.d_out(), dims.d_in(), dims.rank()).unwrap()
}

/// Q = G·A[:d_out], the backward's shrink of G (dropout never touches it).
pub fn reference_q(dims: &Dims, g: &[f64], a: &[f64]) -> Vec<f64> {
    reference_s(&swapped(dims), g, a, Dropout::NONE)
}

/// The reference backward onto starts: dX ← dx_beta·dX0 + its gradient, dA
/// ← da_beta·dA0 + its gradient (a start is unread where its beta is 0):
/// (dX, dA).
pub fn reference_backward_onto(
    dims: &Dims,
    [x, g, a]: [&[f64]; 3],
    scale: f64,
    [(dx0, dx_beta), (da0, da_beta)]: [(&[f64], f64); 2],
    dropout: Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let (mut dx, mut da) = (dx0.to_vec(), da0.to_vec());
    reference::backward(
        dims, x, a, g, scale, dx_beta, &mut dx, da_beta, &mut da, dropout,
    )
    .unwrap();
    (dx, da)
}

/// The reference backward overwriting (betas 0): (dX, dA).
pub fn reference_grads(
    dims: &Dims,
    xga: [&[f64]; 3],
    scale: f64,
    dropout: Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let dx0 = vec![0.0; dims.tokens() * dims.d_in()];
    let da0 = vec![0.0; dims.a_len()];
    reference_backward_onto(dims, xga, scale, [(&dx0, 0.0), (&da0, 0.0)], dropout)
}
