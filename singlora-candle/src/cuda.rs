//! The CUDA path: singlora's launchers on candle's stream.
//!
//! candle 0.11 and singlora share one cudarc 0.19, so candle's buffers
//! (`CudaSlice`) and stream go to the launchers as they are. Rows with a
//! stride (see [`crate::rows`]) are used in place; any other layout is
//! copied to a contiguous buffer first.
//!
//! * forward: `y = x·W0ᵀ` (cuBLAS, on candle's stream and handle) into a
//!   fresh buffer, then singlora's fused forward adds the adapter onto it in
//!   place (beta = 1) and saves `S = x·A_in` (f32) with the op.
//! * backward: `dX = G·W0` (cuBLAS) then singlora's fused backward adds the
//!   adapter's `dX` onto it and writes a deterministic f32 `dA` (using the
//!   saved `S`); `dA` is returned in `A`'s dtype.
//! * merge / unmerge and AdamW: singlora's launchers on the tensors'
//!   buffers in place.

use std::fmt::Display;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, CudaView, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};
use singlora::runtime::blas::gemm_config;
use singlora::{backward_workspace_len, AdamWState, DxOut};

use crate::checks::{check_storages, refuse, wrap, Checked, Geometry};
use crate::op::{BackwardArgs, Saved, SingLoraOp};
use crate::optim::AdamWOp;
use crate::rows::{rows, Rows};

/// A cudarc or cuBLAS error as a candle error.
fn cu<T, E: Display + Send + Sync + 'static>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(candle_core::Error::wrap)
}

/// Calls `$f::<T>` for the dtype of the call (checked to be a float one).
macro_rules! dispatch {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => Err(refuse("x", "an f32, f16 or bf16 tensor", format!("{other:?}"))),
        }
    };
}

/// One argument as the kernels read it: candle's buffer in place, or a
/// contiguous copy of it.
struct Input<'a> {
    storage: Buf<'a>,
    rows: Rows,
}

enum Buf<'a> {
    Borrowed(&'a CudaStorage),
    Owned(CudaStorage),
}

impl Input<'_> {
    fn view<T: CudaDType + DeviceRepr>(&self, name: &'static str) -> Result<CudaView<'_, T>> {
        let storage = match &self.storage {
            Buf::Borrowed(s) => s,
            Buf::Owned(s) => s,
        };
        let slice = storage.as_cuda_slice::<T>()?;
        let r = self.rows;
        slice
            .try_slice(r.offset..r.offset + r.extent())
            .ok_or_else(|| refuse(name, "a layout inside its buffer", format!("{r:?}")))
    }

    fn ld(&self) -> usize {
        self.rows.ld
    }
}

/// `storage` under `layout` as rows (`contiguous`: with `ld == cols`), or a
/// contiguous copy.
fn input<'a>(storage: &'a CudaStorage, layout: &Layout, contiguous: bool) -> Result<Input<'a>> {
    if let Some(r) = rows(layout) {
        if !contiguous || r.ld == r.cols || r.rows <= 1 {
            return Ok(Input {
                storage: Buf::Borrowed(storage),
                rows: Rows {
                    ld: r.ld.max(r.cols),
                    ..r
                },
            });
        }
    }
    let dims = layout.dims();
    let cols = dims.last().copied().unwrap_or(1);
    let n = layout.shape().elem_count();
    let dev = &storage.device;
    let mut dst = alloc_like(storage.dtype(), n, dev)?;
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(Input {
        storage: Buf::Owned(dst),
        rows: Rows::contiguous(n / cols.max(1), cols),
    })
}

/// An uninitialised storage of `n` elements of `dtype` (fully written by
/// the copy that follows).
fn alloc_like(dtype: DType, n: usize, dev: &CudaDevice) -> Result<CudaStorage> {
    // SAFETY: every element is written by copy_strided_src before any read.
    unsafe {
        Ok(match dtype {
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<f16>(n)?, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<bf16>(n)?, dev.clone()),
            _ => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
        })
    }
}

/// `C (m × n, ldc = m) = op(W0) · B` in column-major terms (see
/// [`gemm_config`]) with cuBLAS on candle's stream and handle: `w` the
/// frozen weight, `b` the rows of `B` and their view.
fn w0_gemm<T>(
    dev: &CudaDevice,
    transa: cublasOperation_t,
    (m, n, k): (usize, usize, usize),
    w: (&CudaStorage, &Layout),
    (b, bv): (&Input, &CudaView<'_, T>),
    c: &mut CudaSlice<T>,
) -> Result<()>
where
    T: singlora::DType + CudaDType,
    CudaBlas: Gemm<T>,
{
    let wi = input(w.0, w.1, false)?;
    let wv = wi.view::<T>("w0")?;
    let cfg = gemm_config::<T>(transa, (m, n, k), (wi.ld(), b.ld(), m)).map_err(wrap)?;
    let blas = dev.cublas_handle();
    // SAFETY: wv and bv hold W0's and B's rows at their strides and c
    // holds m·n elements: the extents the config reads and writes (its
    // shapes are the caller's, checked against the tensors); cuBLAS runs on
    // candle's stream.
    cu(unsafe { blas.gemm(cfg, &wv, bv, c) })
}

/// The forward (see the module docs).
pub(crate) fn forward(
    op: &SingLoraOp,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    w: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let checked = check_storages(&op.geo, x, a, w)?;
    dispatch!(checked.dtype, forward_t(op, &checked, x, a, w))
}

fn forward_t<T>(
    op: &SingLoraOp,
    checked: &Checked,
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    w: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)>
where
    T: singlora::DType + CudaDType,
    CudaBlas: Gemm<T>,
{
    let Geometry { d_in, d_out, rank } = op.geo;
    let tokens = checked.tokens;
    let dev = x.0.device.clone();
    let stream = dev.cuda_stream();
    let dims = op.geo.dims(tokens)?;
    let n_out = tokens * d_out;
    if tokens == 0 {
        let y = cu(stream.alloc_zeros::<T>(0))?;
        return Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            checked.out_shape.clone(),
        ));
    }
    let xi = input(x.0, x.1, false)?;
    let ai = input(a.0, a.1, true)?;
    let xv = xi.view::<T>("x")?;
    let av = ai.view::<T>("a")?;
    // SAFETY of the allocations: y is written in full (by cuBLAS with
    // beta = 0, or by the forward with beta = 0), S by the forward.
    let mut y = unsafe { dev.alloc::<T>(n_out)? };
    let mut s = unsafe { dev.alloc::<f32>(tokens * rank)? };
    let beta = match w {
        Some((ws, wl)) => {
            // Row-major y (tokens × d_out) is column-major yᵀ = W0 · xᵀ;
            // row-major W0 (ld_w) is column-major W0ᵀ: op T.
            let op_t = cublasOperation_t::CUBLAS_OP_T;
            w0_gemm(
                &dev,
                op_t,
                (d_out, tokens, d_in),
                (ws, wl),
                (&xi, &xv),
                &mut y,
            )?;
            1.0
        }
        None => 0.0,
    };
    singlora::forward(
        &stream,
        &dims,
        &xv,
        xi.ld(),
        &av,
        &mut y,
        d_out,
        Some(&mut s as &mut dyn DevicePtrMut<f32>),
        op.scale,
        beta,
        op.dropout,
    )
    .map_err(wrap)?;
    op.save(tokens, Saved::Cuda(s));
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev),
        checked.out_shape.clone(),
    ))
}

/// The storage of a CUDA tensor.
fn cuda_of<'a>(name: &'static str, st: &'a candle_core::StorageRef<'a>) -> Result<&'a CudaStorage> {
    match &**st {
        Storage::Cuda(c) => Ok(c),
        _ => Err(refuse(
            name,
            "a tensor on the CUDA device",
            "another device",
        )),
    }
}

/// The backward (see the module docs).
pub(crate) fn backward(
    op: &SingLoraOp,
    args: BackwardArgs,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    dispatch!(args.x.dtype(), backward_t(op, args))
}

fn backward_t<T>(op: &SingLoraOp, args: BackwardArgs) -> Result<(Option<Tensor>, Option<Tensor>)>
where
    T: singlora::DType + CudaDType,
    CudaBlas: Gemm<T>,
{
    let (x, a, w, g) = (args.x, args.a, args.w, args.g);
    let (need_dx, need_da) = (args.need_dx, args.need_da);
    let Geometry { d_in, d_out, rank } = op.geo;
    let d = op.geo.d();
    let tokens = x.elem_count() / d_in.max(1);
    let dims = op.geo.dims(tokens)?;
    if g.dtype() != x.dtype() {
        return Err(refuse(
            "grad",
            format!("x's dtype {:?}", x.dtype()),
            format!("{:?}", g.dtype()),
        ));
    }
    if g.dims().last() != Some(&d_out) || g.elem_count() != tokens * d_out {
        return Err(refuse(
            "grad",
            format!("the output's shape (…, {d_out}) with {tokens} rows"),
            format!("shape {:?}", g.dims()),
        ));
    }
    if tokens == 0 {
        let dx = need_dx.then(|| x.zeros_like()).transpose()?;
        let da = need_da.then(|| a.zeros_like()).transpose()?;
        return Ok((dx, da));
    }
    let (xst, xl) = x.storage_and_layout();
    let (ast, al) = a.storage_and_layout();
    let (gst, gl) = g.storage_and_layout();
    let xc = cuda_of("x", &xst)?;
    let ac = cuda_of("a", &ast)?;
    let gc = cuda_of("grad", &gst)?;
    let dev = xc.device.clone();
    let stream = dev.cuda_stream();
    let xi = input(xc, xl, false)?;
    let ai = input(ac, al, true)?;
    let gi = input(gc, gl, false)?;
    let xv = xi.view::<T>("x")?;
    let av = ai.view::<T>("a")?;
    let gv = gi.view::<T>("grad")?;

    // dX: the frozen path's G·W0 first (cuBLAS), the adapter's term added
    // onto it by the fused backward (dx_beta = 1).
    let mut dx = if need_dx {
        // SAFETY: written in full by cuBLAS (beta = 0) or by the backward
        // with dx_beta = 0.
        Some(unsafe { dev.alloc::<T>(tokens * d_in)? })
    } else {
        None
    };
    let mut dx_beta = 0.0;
    if let (Some(dx), Some(w)) = (dx.as_mut(), w) {
        let (wst, wl) = w.storage_and_layout();
        let wc = cuda_of("w0", &wst)?;
        // Row-major dX (tokens × d_in) is column-major dXᵀ = W0ᵀ · Gᵀ, with
        // row-major W0 read as column-major W0ᵀ (op N).
        let op_n = cublasOperation_t::CUBLAS_OP_N;
        w0_gemm(&dev, op_n, (d_in, tokens, d_out), (wc, wl), (&gi, &gv), dx)?;
        dx_beta = 1.0;
    }

    // With dropout, dX's adapter term is masked: only the fused backward
    // computes it (its dA is then dropped when not needed).
    let da = if need_da || op.dropout.is_active() {
        let saved = op.saved.lock().unwrap_or_else(|e| e.into_inner());
        let s: Option<&CudaSlice<f32>> = match saved.as_ref() {
            Some((n, Saved::Cuda(s))) if *n == tokens => Some(s),
            _ => None,
        };
        let ws_len = backward_workspace_len(&dims, s.is_some()).map_err(wrap)?;
        // SAFETY: the backward writes every workspace element it reads, and
        // all of dA (da_beta = 0).
        let mut ws = unsafe { dev.alloc::<f32>(ws_len)? };
        let mut da = unsafe { dev.alloc::<f32>(d * rank)? };
        singlora::backward(
            &stream,
            &dims,
            &xv,
            xi.ld(),
            &gv,
            gi.ld(),
            &av,
            s.map(|s| s as &dyn cudarc::driver::DevicePtr<f32>),
            op.scale,
            dx.as_mut().map(|dx| DxOut {
                dx: dx as &mut dyn DevicePtrMut<T>,
                ld_dx: d_in,
                beta: dx_beta,
            }),
            &mut da,
            0.0,
            &mut ws,
            op.dropout,
        )
        .map_err(wrap)?;
        need_da.then_some(da)
    } else {
        // dX alone without dropout: the forward kernel with G in X's place,
        // dX = s·(G·A[:d_out])·A[:d_in]ᵀ — dims with d_in and d_out swapped.
        let dx = dx.as_mut().expect("need_dx when !need_da");
        let swapped = singlora::Dims::new(tokens, d_out, d_in, rank).map_err(wrap)?;
        singlora::forward(
            &stream,
            &swapped,
            &gv,
            gi.ld(),
            &av,
            dx,
            d_in,
            None,
            op.scale,
            dx_beta,
            singlora::Dropout::NONE, // not the forward's mask: this is dX
        )
        .map_err(wrap)?;
        None
    };
    let dx = dx.map(|dx| {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(dx, dev.clone())),
            x.shape().clone(),
            BackpropOp::none(),
            false,
        )
    });
    let da = match da {
        Some(da) => {
            let t = Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(da, dev.clone())),
                (d, rank),
                BackpropOp::none(),
                false,
            );
            Some(if a.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(a.dtype())?
            })
        }
        None => None,
    };
    Ok((dx, da))
}

/// `w ← w ± scale·A[:d_out]·A[:d_in]ᵀ` in place (see [`crate::merge`]).
pub(crate) fn merge(
    geo: &Geometry,
    scale: f32,
    undo: bool,
    w: (&mut CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
) -> Result<()> {
    dispatch!(w.0.dtype(), merge_t(geo, scale, undo, w, a))
}

fn merge_t<T>(
    geo: &Geometry,
    scale: f32,
    undo: bool,
    w: (&mut CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
) -> Result<()>
where
    T: singlora::DType + CudaDType,
{
    let dims = geo.dims(0)?;
    let wr = rows(w.1).ok_or_else(|| {
        refuse(
            "w0",
            "a weight whose rows have unit stride (merged in place)",
            format!("strides {:?}", w.1.stride()),
        )
    })?;
    let ai = input(a.0, a.1, true)?;
    let av = ai.view::<T>("a")?;
    let stream = a.0.device.cuda_stream();
    let ws = w.0.as_cuda_slice_mut::<T>()?;
    let mut wv = ws
        .try_slice_mut(wr.offset..wr.offset + wr.extent())
        .ok_or_else(|| refuse("w0", "a layout inside its buffer", format!("{wr:?}")))?;
    if undo {
        singlora::unmerge(&stream, &dims, &mut wv, wr.ld, &av, scale).map_err(wrap)
    } else {
        singlora::merge(&stream, &dims, &mut wv, wr.ld, &av, scale).map_err(wrap)
    }
}

/// The GPU state of one parameter under [`crate::FusedAdamW`].
pub(crate) struct AdamWBuffers {
    pub m: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
    /// f32 master weights of a 16-bit parameter.
    pub master: Option<CudaSlice<f32>>,
}

impl AdamWBuffers {
    /// Zero moments, and the master copy of a 16-bit parameter.
    pub fn new(var: &Tensor) -> Result<Self> {
        let n = var.elem_count();
        let candle_core::Device::Cuda(dev) = var.device() else {
            return Err(refuse(
                "var",
                "a tensor on the CUDA device",
                "another device",
            ));
        };
        let m = dev.alloc_zeros::<f32>(n)?;
        let v = dev.alloc_zeros::<f32>(n)?;
        let master = if var.dtype() == DType::F32 {
            None
        } else {
            let t = var
                .detach()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .contiguous()?;
            let (st, l) = t.storage_and_layout();
            let c = cuda_of("var", &st)?;
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| refuse("var", "a contiguous tensor", "a strided one"))?;
            let src = c
                .as_cuda_slice::<f32>()?
                .try_slice(start..end)
                .ok_or_else(|| refuse("var", "a layout inside its buffer", format!("{l:?}")))?;
            Some(cu(dev.cuda_stream().clone_dtod(&src))?)
        };
        Ok(Self { m, v, master })
    }
}

/// One fused AdamW step (`op`'s config, step and gradient scale) of the
/// parameter in `p` (in place) from the f32 gradient `g`.
pub(crate) fn adamw(
    op: &AdamWOp,
    state: &mut AdamWBuffers,
    p: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<()> {
    dispatch!(p.0.dtype(), adamw_t(op, state, p, g))
}

fn adamw_t<T>(
    op: &AdamWOp,
    state: &mut AdamWBuffers,
    p: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<()>
where
    T: singlora::DType + CudaDType,
{
    let (pstart, pend) =
        p.1.contiguous_offsets()
            .ok_or_else(|| refuse("var", "a contiguous parameter", "a strided one"))?;
    let (gstart, gend) =
        g.1.contiguous_offsets()
            .ok_or_else(|| refuse("grad", "a contiguous gradient", "a strided one"))?;
    let stream = g.0.device.cuda_stream();
    let gv =
        g.0.as_cuda_slice::<f32>()?
            .try_slice(gstart..gend)
            .ok_or_else(|| refuse("grad", "a layout inside its buffer", format!("{:?}", g.1)))?;
    let ps = p.0.as_cuda_slice_mut::<T>()?;
    let mut pv = ps
        .try_slice_mut(pstart..pend)
        .ok_or_else(|| refuse("var", "a layout inside its buffer", format!("{:?}", p.1)))?;
    singlora::adamw(
        &stream,
        op.cfg,
        op.step,
        &mut pv,
        &gv,
        op.grad_scale,
        AdamWState::from_slices(&mut state.m, &mut state.v, state.master.as_mut()),
    )
    .map_err(wrap)
}
