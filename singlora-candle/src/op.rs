//! The SingLoRA custom op: `y = [x·W0ᵀ +] s·(x·A_in)·A_outᵀ` as one candle
//! node, so candle's autograd differentiates it with our backward.
//!
//! * CPU: the forward runs candle's own storage ops in f32 (any layout;
//!   inputs are converted, which copies them) and saves `S = x·A_in`; the
//!   backward is the textbook formula with candle tensor ops.
//! * CUDA (feature `cuda`): see [`crate::cuda`] — singlora's fused launchers
//!   on candle's stream, strided rows in place, `S` saved by the forward.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

use singlora::Dropout;

use crate::checks::{check_call, check_scale, check_storages, refuse, wrap, Checked, Geometry};

/// `S = x·A_in` (`tokens × rank`, f32) as the forward left it.
pub(crate) enum Saved {
    Cpu(Tensor),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

/// One forward call of the adapter (a fresh op per call: it holds that
/// call's scale and saved `S`).
pub(crate) struct SingLoraOp {
    pub geo: Geometry,
    pub scale: f32,
    /// The adapter dropout of this call; the backward regenerates its mask
    /// ([`Dropout::NONE`]: none, bitwise the undropped path).
    pub dropout: Dropout,
    /// `(tokens, S)` from the forward; the backward uses it instead of
    /// recomputing `x·A_in`. Kept with the graph node (a second backward
    /// over the same graph uses it again).
    pub saved: Mutex<Option<(usize, Saved)>>,
}

/// What a backward works from: the forward's inputs, the output's
/// gradient, and which of the inputs need theirs.
#[derive(Clone, Copy)]
pub(crate) struct BackwardArgs<'t> {
    pub x: &'t Tensor,
    pub a: &'t Tensor,
    /// The frozen weight, if the op has one.
    pub w: Option<&'t Tensor>,
    pub g: &'t Tensor,
    pub need_dx: bool,
    pub need_da: bool,
}

impl SingLoraOp {
    pub fn new(geo: Geometry, scale: f32, dropout: Dropout) -> Self {
        Self {
            geo,
            scale,
            dropout,
            saved: Mutex::new(None),
        }
    }

    pub(crate) fn save(&self, tokens: usize, s: Saved) {
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((tokens, s));
    }

    /// The forward on the CPU, with candle's storage ops in f32.
    fn cpu_forward(
        &self,
        x: (&CpuStorage, &Layout),
        a: (&CpuStorage, &Layout),
        w: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let checked = check_storages(&self.geo, x, a, w)?;
        let Checked {
            dtype,
            tokens,
            out_shape,
        } = checked;
        let Geometry { d_in, d_out, rank } = self.geo;
        if tokens == 0 {
            return Ok((empty(dtype), out_shape));
        }
        self.dropout.check_tokens(tokens).map_err(wrap)?;
        let c = |r: usize, k: usize| Layout::contiguous((r, k));
        // Row-major (r × k) read transposed: a (k × r) view of it.
        let t = |r: usize, k: usize, ld: usize| Layout::new(Shape::from((k, r)), vec![1, ld], 0);
        let x32 = x.0.to_dtype(x.1, DType::F32)?; // tokens × d_in, contiguous
        let a32 = a.0.to_dtype(a.1, DType::F32)?; // D × rank

        // The adapter's input: drop(X) = M ⊙ X / (1 − p), X itself without
        // dropout (the frozen product below always reads X).
        let xd = if self.dropout.is_active() {
            let m = CpuStorage::F32(mask_values(&self.dropout, tokens, d_in));
            Some(x32.binary_impl::<candle_core::op::Mul>(&m, &c(tokens, d_in), &c(tokens, d_in))?)
        } else {
            None
        };
        let s = xd.as_ref().unwrap_or(&x32).matmul(
            &a32,
            (1, tokens, rank, d_in),
            &c(tokens, d_in),
            &c(d_in, rank),
        )?;
        let y = s.matmul(
            &a32,
            (1, tokens, d_out, rank),
            &c(tokens, rank),
            &t(d_out, rank, rank),
        )?;
        let mut y = y.affine(&c(tokens, d_out), self.scale as f64, 0.0)?;
        if let Some((w, wl)) = w {
            let w32 = w.to_dtype(wl, DType::F32)?; // d_out × d_in
            let base = x32.matmul(
                &w32,
                (1, tokens, d_out, d_in),
                &c(tokens, d_in),
                &t(d_out, d_in, d_in),
            )?;
            y =
                base.binary_impl::<candle_core::op::Add>(&y, &c(tokens, d_out), &c(tokens, d_out))?;
        }
        let y = y.to_dtype(&c(tokens, d_out), dtype)?;
        let s = Tensor::from_storage(Storage::Cpu(s), (tokens, rank), BackpropOp::none(), false);
        self.save(tokens, Saved::Cpu(s));
        Ok((y, out_shape))
    }

    /// The backward: `(dX, dA)` in the arguments' dtypes, each `None` when
    /// its argument does not need a gradient.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        w: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let args = BackwardArgs {
            x,
            a,
            w,
            g,
            need_dx: x.track_op(),
            need_da: a.track_op(),
        };
        if !args.need_dx && !args.need_da {
            return Ok((None, None));
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::cuda::backward(self, args);
        }
        self.generic_backward(args)
    }

    /// The backward with candle tensor ops (CPU, and any device without a
    /// fused path), in f32:
    /// `Q = G·A_out`, `dX = s·Q·A_inᵀ [+ G·W0]`,
    /// `dA = s·(Gᵀ·S into rows :d_out + Xᵀ·Q into rows :d_in)`.
    fn generic_backward(&self, args: BackwardArgs) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, a, w, g) = (args.x, args.a, args.w, args.g);
        let (need_dx, need_da) = (args.need_dx, args.need_da);
        let Geometry { d_in, d_out, rank } = self.geo;
        let d = self.geo.d();
        let tokens = x.elem_count() / d_in.max(1);
        if tokens == 0 {
            let dx = need_dx.then(|| x.zeros_like()).transpose()?;
            let da = need_da.then(|| a.zeros_like()).transpose()?;
            return Ok((dx, da));
        }
        let scale = self.scale as f64;
        let g2 = g.detach().reshape((tokens, d_out))?.to_dtype(DType::F32)?;
        let a32 = a.detach().to_dtype(DType::F32)?;
        let a_in = a32.narrow(0, 0, d_in)?;
        let a_out = a32.narrow(0, 0, d_out)?;
        let q = g2.matmul(&a_out)?;
        // M / (1 − p) (the same mask as the forward's: regenerated from its
        // seed and offset), None without dropout.
        let m = if self.dropout.is_active() {
            self.dropout.check_tokens(tokens).map_err(wrap)?;
            let v = mask_values(&self.dropout, tokens, d_in);
            Some(Tensor::from_vec(v, (tokens, d_in), x.device())?)
        } else {
            None
        };
        let dx = if need_dx {
            let mut dx = (q.matmul(&a_in.t()?)? * scale)?;
            if let Some(m) = &m {
                dx = (dx * m)?;
            }
            if let Some(w) = w {
                dx = (dx + g2.matmul(&w.detach().to_dtype(DType::F32)?)?)?;
            }
            Some(dx.to_dtype(x.dtype())?.reshape(x.shape())?)
        } else {
            None
        };
        let da = if need_da {
            // X in f32 only here: dX does not read it.
            let x2 = x.detach().reshape((tokens, d_in))?.to_dtype(DType::F32)?;
            let x2 = match &m {
                Some(m) => (x2 * m)?, // drop(X)
                None => x2,
            };
            let s = match self.saved_cpu(tokens) {
                Some(s) => s,
                None => x2.matmul(&a_in)?,
            };
            let from_g = g2.t()?.matmul(&s)?.pad_with_zeros(0, 0, d - d_out)?;
            let from_x = x2.t()?.matmul(&q)?.pad_with_zeros(0, 0, d - d_in)?;
            let da = ((from_g + from_x)? * scale)?;
            debug_assert_eq!(da.dims(), [d, rank]);
            Some(da.to_dtype(a.dtype())?)
        } else {
            None
        };
        Ok((dx, da))
    }

    /// The CPU forward's saved `S`, if it is this many rows.
    fn saved_cpu(&self, tokens: usize) -> Option<Tensor> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        match saved.as_ref() {
            Some((n, Saved::Cpu(s))) if *n == tokens => Some(s.clone()),
            _ => None,
        }
    }
}

/// `M / (1 − p)` of a `rows × cols` input, row-major f32: `1/(1 − p)` where
/// [`Dropout::mask`] keeps (the kernels' and the reference's mask, bit for
/// bit), 0 where it drops.
fn mask_values(dropout: &Dropout, rows: usize, cols: usize) -> Vec<f32> {
    let ks = dropout.keep_scale() as f32;
    dropout
        .mask(rows, cols)
        .into_iter()
        .map(|keep| if keep { ks } else { 0.0 })
        .collect()
}

/// An empty storage of `dtype` (a forward of zero rows).
fn empty(dtype: DType) -> CpuStorage {
    match dtype {
        DType::F16 => CpuStorage::F16(Vec::new()),
        DType::BF16 => CpuStorage::BF16(Vec::new()),
        _ => CpuStorage::F32(Vec::new()),
    }
}

impl CustomOp3 for SingLoraOp {
    fn name(&self) -> &'static str {
        "singlora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((x, xl), (a, al), Some((w, wl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda::forward(self, (x, xl), (a, al), Some((w, wl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da) = self.backward(x, a, Some(w), g)?;
        // W0 is frozen: no gradient.
        Ok((dx, da, None))
    }
}

impl CustomOp2 for SingLoraOp {
    fn name(&self) -> &'static str {
        "singlora-adapter"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((x, xl), (a, al), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda::forward(self, (x, xl), (a, al), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, a, None, g)
    }
}

/// The adapter's rank from `a`'s shape (2-D, `D × rank`).
fn rank_of(a: &Tensor) -> Result<usize> {
    match a.dims() {
        [_, rank] => Ok(*rank),
        other => Err(refuse(
            "a",
            "a 2-D tensor (D, rank)",
            format!("shape {other:?}"),
        )),
    }
}

/// `x` and the other arguments on one device.
fn check_device(name: &'static str, x: &Tensor, t: &Tensor) -> Result<()> {
    if x.device().same_device(t.device()) {
        Ok(())
    } else {
        Err(refuse(
            name,
            format!("a tensor on x's device ({:?})", x.device().location()),
            format!("{:?}", t.device().location()),
        ))
    }
}

/// The SingLoRA linear layer as one differentiable candle op:
/// `y = x·W0ᵀ + scale·(x·A[:d_in])·A[:d_out]ᵀ`.
///
/// `x` is `(…, d_in)` (any leading dimensions), `w0` the frozen
/// `(d_out, d_in)` weight (no gradient flows to it), `a` is `(D, rank)` with
/// `D = max(d_in, d_out)`; one dtype (f32, f16 or bf16) for all three, on one
/// device. The result is `(…, d_out)`. Gradients flow to `x` and `a`.
pub fn singlora_linear(x: &Tensor, a: &Tensor, w0: &Tensor, scale: f32) -> Result<Tensor> {
    singlora_linear_dropout(x, a, w0, scale, Dropout::NONE)
}

/// [`singlora_linear`] with adapter dropout (PEFT's `lora_dropout`):
/// `y = x·W0ᵀ + scale·(drop(x)·A[:d_in])·A[:d_out]ᵀ`, `drop(x) = M ⊙ x /
/// (1 − p)` with the mask `M` of `dropout` (Philox4x32-10 keyed by its seed
/// and offset and each element's row and column, see [`Dropout`]); the
/// frozen path sees `x` itself. The backward regenerates the same mask
/// (`dA`'s `x` term uses `drop(x)`, `dX`'s adapter term is masked), on the
/// CPU and on the GPU alike: both draw bitwise singlora's reference mask.
/// Rows are counted over the flattened leading dimensions. A fresh mask
/// per training step needs a fresh offset (see
/// [`crate::SingLoraLinear::with_dropout`]); [`Dropout::NONE`] is bitwise
/// [`singlora_linear`].
pub fn singlora_linear_dropout(
    x: &Tensor,
    a: &Tensor,
    w0: &Tensor,
    scale: f32,
    dropout: Dropout,
) -> Result<Tensor> {
    let (d_out, d_in) = match w0.dims() {
        [d_out, d_in] => (*d_out, *d_in),
        other => {
            return Err(refuse(
                "w0",
                "a 2-D tensor (d_out, d_in)",
                format!("shape {other:?}"),
            ))
        }
    };
    let geo = Geometry {
        d_in,
        d_out,
        rank: rank_of(a)?,
    };
    check_scale(scale)?;
    check_call(
        &geo,
        (x.shape(), x.dtype()),
        (a.shape(), a.dtype()),
        Some((w0.shape(), w0.dtype())),
    )?;
    check_device("a", x, a)?;
    check_device("w0", x, w0)?;
    let op: Arc<Box<dyn CustomOp3 + Send + Sync>> =
        Arc::new(Box::new(SingLoraOp::new(geo, scale, dropout)));
    x.apply_op3_arc(a, w0, op)
}

/// The adapter term alone, `scale·(x·A[:d_in])·A[:d_out]ᵀ`, for a caller
/// that computes its frozen product itself (a quantised base layer, say):
/// add it to that output. `x` is `(…, d_in)`, `a` is `(max(d_in, d_out),
/// rank)`; the result is `(…, d_out)`.
pub fn singlora_adapter(x: &Tensor, a: &Tensor, d_out: usize, scale: f32) -> Result<Tensor> {
    singlora_adapter_dropout(x, a, d_out, scale, Dropout::NONE)
}

/// [`singlora_adapter`] with adapter dropout:
/// `scale·(drop(x)·A[:d_in])·A[:d_out]ᵀ` (see [`singlora_linear_dropout`]).
pub fn singlora_adapter_dropout(
    x: &Tensor,
    a: &Tensor,
    d_out: usize,
    scale: f32,
    dropout: Dropout,
) -> Result<Tensor> {
    let d_in = x.dims().last().copied().unwrap_or(0);
    let geo = Geometry {
        d_in,
        d_out,
        rank: rank_of(a)?,
    };
    check_scale(scale)?;
    check_call(&geo, (x.shape(), x.dtype()), (a.shape(), a.dtype()), None)?;
    check_device("a", x, a)?;
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> =
        Arc::new(Box::new(SingLoraOp::new(geo, scale, dropout)));
    x.apply_op2_arc(a, op)
}
