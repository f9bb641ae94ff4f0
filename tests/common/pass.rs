//! One forward + backward on dense rows, the way the hardening tests run it
//! as a whole: the device buffers of its outputs, the launches, and its f64
//! reference. Forward: Y ← y_beta·Y + s·X·A·A[:d_out]ᵀ, S saved; backward:
//! dX and dA overwritten (betas 0), from the saved S or recomputing it.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use singlora::{
    backward, backward_workspace_len, forward, BackwardOptions, DType, Dims, Dropout, DxOut, Error,
};

use super::{
    download_on, poisoned_on, reference_forward_onto, reference_grads, reference_q, upload_on,
};

/// The forward on dense rows (row strides d_in and d_out): Y ← y_beta·Y +
/// scale·X·A[:d_in]·A[:d_out]ᵀ, S into `s` where given.
pub fn forward_dense<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    [x, a]: [&CudaSlice<T>; 2],
    y: &mut CudaSlice<T>,
    s: Option<&mut CudaSlice<f32>>,
    (scale, y_beta): (f32, f32),
    dropout: Dropout,
) -> Result<(), Error> {
    let (d_in, d_out) = (dims.d_in(), dims.d_out());
    let s = s.map(|s| s as &mut dyn DevicePtrMut<f32>);
    forward(
        stream, dims, x, d_in, a, y, d_out, s, scale, y_beta, dropout,
    )
}

/// The backward on dense rows into dX and dA (betas 0), from the saved `s`
/// where given, else recomputing S, with workspace `ws`.
pub fn backward_dense<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    [x, g, a]: [&CudaSlice<T>; 3],
    s: Option<&CudaSlice<f32>>,
    scale: f32,
    (dx, da, ws): (&mut CudaSlice<T>, &mut CudaSlice<f32>, &mut CudaSlice<f32>),
    options: impl Into<BackwardOptions>,
) -> Result<(), Error> {
    let (d_in, d_out) = (dims.d_in(), dims.d_out());
    backward(
        stream,
        dims,
        x,
        d_in,
        g,
        d_out,
        a,
        s.map(|s| s as &dyn DevicePtr<f32>),
        scale,
        Some(DxOut {
            dx,
            ld_dx: d_in,
            beta: 0.0,
        }),
        da,
        0.0,
        ws,
        options,
    )
}

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
    /// recomputing it where `saved_s` is false), both with `options`'
    /// dropout, the backward by its kernels; reads nothing back.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        dims: &Dims,
        [x, g, a]: [&CudaSlice<T>; 3],
        scale: f32,
        y_beta: f32,
        saved_s: bool,
        options: impl Into<BackwardOptions>,
    ) {
        let options = options.into();
        let (y, s) = (&mut self.y, Some(&mut self.s));
        forward_dense(stream, dims, [x, a], y, s, (scale, y_beta), options.dropout).unwrap();
        let s = saved_s.then_some(&self.s);
        let outs = (&mut self.dx, &mut self.da, &mut self.ws);
        backward_dense(stream, dims, [x, g, a], s, scale, outs, options).unwrap();
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

/// One pass on host inputs: X, G and A uploaded as T, [`PassBufs::run`] (a
/// [`Dropout`] or full [`BackwardOptions`])
/// with Y's beta 0 on outputs that start as `start` (NaN: poisoned), read
/// back.
pub fn gpu_pass<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    [x, g, a]: [&[f64]; 3],
    (start, saved_s): (f64, bool),
    scale: f32,
    options: impl Into<BackwardOptions>,
) -> Pass {
    let [xd, gd, ad] = [x, g, a].map(|v| upload_on::<T>(stream, v));
    let mut out = PassBufs::<T>::new(stream, dims, start, saved_s);
    out.run(stream, dims, [&xd, &gd, &ad], scale, 0.0, saved_s, options);
    out.read(stream, dims)
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
