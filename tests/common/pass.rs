//! One forward + backward on dense rows, the way the hardening tests run it
//! as a whole: the device buffers of its outputs, the launches, and its f64
//! reference. Forward: Y ← y_beta·Y + s·X·A·A[:d_out]ᵀ, S saved; backward:
//! dX and dA overwritten (betas 0), from the saved S or recomputing it.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use singlora::{backward, backward_workspace_len, forward, DType, Dims, Dropout, DxOut};

use super::{
    download_on, poisoned_on, reference_forward_onto, reference_grads, reference_q, upload_on,
};

/// A pass's five outputs on the host: Y, S, Q (G·A[:d_out], the first
/// `s_len` elements of the backward's workspace), dX, dA.
#[derive(Clone, Debug)]
pub struct Pass {
    pub y: Vec<f64>,
    pub s: Vec<f64>,
    pub q: Vec<f64>,
    pub dx: Vec<f64>,
    pub da: Vec<f64>,
}

impl Pass {
    /// The outputs in the order Y, S, Q, dX, dA.
    pub fn all(&self) -> [&[f64]; 5] {
        [&self.y, &self.s, &self.q, &self.dx, &self.da]
    }
}

/// The device outputs of a pass, and its workspace.
pub struct PassBufs<T> {
    pub y: CudaSlice<T>,
    pub s: CudaSlice<f32>,
    pub dx: CudaSlice<T>,
    pub da: CudaSlice<f32>,
    pub ws: CudaSlice<f32>,
}

impl<T: DType> PassBufs<T> {
    /// Outputs for `dims` whose every element holds `start` (NaN: poisoned
    /// by the fill kernel), and a poisoned workspace for a backward with or
    /// without a saved S.
    pub fn new(stream: &Arc<CudaStream>, dims: &Dims, start: f64, saved_s: bool) -> Self {
        fn out<U: DType>(stream: &Arc<CudaStream>, n: usize, start: f64) -> CudaSlice<U> {
            if start.is_nan() {
                poisoned_on(stream, n)
            } else {
                upload_on(stream, &vec![start; n.max(1)])
            }
        }
        Self {
            y: out(stream, dims.tokens() * dims.d_out(), start),
            s: out(stream, dims.s_len(), start),
            dx: out(stream, dims.tokens() * dims.d_in(), start),
            da: out(stream, dims.a_len(), start),
            ws: poisoned_on(stream, backward_workspace_len(dims, saved_s).unwrap()),
        }
    }

    /// Enqueues the forward, then the backward (from the forward's S, or
    /// recomputing it where `saved_s` is false), both with `dropout`; reads
    /// nothing back.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        dims: &Dims,
        [x, g, a]: [&CudaSlice<T>; 3],
        scale: f32,
        y_beta: f32,
        saved_s: bool,
        dropout: Dropout,
    ) {
        let (d_in, d_out) = (dims.d_in(), dims.d_out());
        forward(
            stream,
            dims,
            x,
            d_in,
            a,
            &mut self.y,
            d_out,
            Some(&mut self.s),
            scale,
            y_beta,
            dropout,
        )
        .unwrap();
        backward(
            stream,
            dims,
            x,
            d_in,
            g,
            d_out,
            a,
            if saved_s { Some(&self.s) } else { None },
            scale,
            Some(DxOut {
                dx: &mut self.dx,
                ld_dx: d_in,
                beta: 0.0,
            }),
            &mut self.da,
            0.0,
            &mut self.ws,
            dropout,
        )
        .unwrap();
    }

    /// The outputs, read back (synchronises).
    pub fn read(&self, stream: &Arc<CudaStream>, dims: &Dims) -> Pass {
        Pass {
            y: download_on(stream, &self.y),
            s: download_on(stream, &self.s),
            q: download_on(stream, &self.ws)[..dims.s_len()].to_vec(),
            dx: download_on(stream, &self.dx),
            da: download_on(stream, &self.da),
        }
    }
}

/// The f64 reference of a pass over `x`, `g` and `a`: Y from `y0` (Y's
/// start, used where `y_beta` ≠ 0), S, Q, and dX and dA overwritten, with
/// `dropout` (Q = G·A[:d_out] has none).
pub fn reference_pass(
    dims: &Dims,
    [x, g, a]: [&[f64]; 3],
    scale: f64,
    (y0, y_beta): (&[f64], f64),
    dropout: Dropout,
) -> Pass {
    let (y, s) = reference_forward_onto(dims, [x, a], scale, (y0, y_beta), dropout);
    let (dx, da) = reference_grads(dims, [x, g, a], scale, dropout);
    let q = reference_q(dims, g, a);
    Pass { y, s, q, dx, da }
}
