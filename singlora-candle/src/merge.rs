//! Merge / unmerge: `W0 ← W0 ± s·A[:d_out]·A[:d_in]ᵀ` in place, as a candle
//! in-place op on the frozen weight's own storage (every tensor sharing it
//! sees the change).
//!
//! The product is formed in f32 the same way both times and added to (or
//! subtracted from) each element once, so unmerge undoes merge to within one
//! rounding per element, as singlora's kernel does.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Shape};
use half::{bf16, f16};

use crate::checks::{check_float, refuse, Geometry};

pub(crate) struct MergeOp {
    pub geo: Geometry,
    pub scale: f32,
    /// Unmerge: subtract.
    pub undo: bool,
}

impl MergeOp {
    fn check(&self, w: (&Layout, DType), a: (&Layout, DType)) -> Result<()> {
        check_float("w0", w.1)?;
        if a.1 != w.1 {
            return Err(refuse(
                "a",
                format!("w0's dtype {:?}", w.1),
                format!("{:?}", a.1),
            ));
        }
        if w.0.dims() != [self.geo.d_out, self.geo.d_in] {
            return Err(refuse(
                "w0",
                format!("shape [{}, {}]", self.geo.d_out, self.geo.d_in),
                format!("shape {:?}", w.0.dims()),
            ));
        }
        if a.0.dims() != [self.geo.d(), self.geo.rank] {
            return Err(refuse(
                "a",
                format!("shape [{}, {}]", self.geo.d(), self.geo.rank),
                format!("shape {:?}", a.0.dims()),
            ));
        }
        self.geo.dims(0)?;
        Ok(())
    }
}

/// `v ± d` rounded to the element type, for each element of `w` (under its
/// layout, any strides) and of the row-major `delta`.
fn fold<T: Copy>(
    w: &mut [T],
    wl: &Layout,
    delta: &[f32],
    undo: bool,
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) -> Result<()> {
    let (rows, cols) = (wl.dims()[0], wl.dims()[1]);
    let (s0, s1) = (wl.stride()[0], wl.stride()[1]);
    for i in 0..rows {
        for j in 0..cols {
            let k = wl.start_offset() + i * s0 + j * s1;
            let e = w
                .get_mut(k)
                .ok_or_else(|| refuse("w0", "a layout inside its buffer", format!("{wl:?}")))?;
            let d = delta[i * cols + j];
            *e = from(if undo { to(*e) - d } else { to(*e) + d });
        }
    }
    Ok(())
}

impl InplaceOp2 for MergeOp {
    fn name(&self) -> &'static str {
        if self.undo {
            "singlora-unmerge"
        } else {
            "singlora-merge"
        }
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, wl: &Layout, a: &CpuStorage, al: &Layout) -> Result<()> {
        self.check((wl, w.dtype()), (al, a.dtype()))?;
        let Geometry { d_in, d_out, rank } = self.geo;
        // ΔW = s·A_out·A_inᵀ (d_out × d_in), f32.
        let a32 = a.to_dtype(al, DType::F32)?;
        let a_in_t = Layout::new(Shape::from((rank, d_in)), vec![1, rank], 0);
        let p = a32.matmul(
            &a32,
            (1, d_out, d_in, rank),
            &Layout::contiguous((d_out, rank)),
            &a_in_t,
        )?;
        let p = p.affine(&Layout::contiguous((d_out, d_in)), self.scale as f64, 0.0)?;
        let CpuStorage::F32(delta) = p else {
            return Err(candle_core::Error::Msg(
                "merge: f32 product expected".into(),
            ));
        };
        match w {
            CpuStorage::F32(v) => fold(v, wl, &delta, self.undo, |x| x, |x| x),
            CpuStorage::F16(v) => fold(v, wl, &delta, self.undo, f16::to_f32, f16::from_f32),
            CpuStorage::BF16(v) => fold(v, wl, &delta, self.undo, bf16::to_f32, bf16::from_f32),
            other => Err(refuse(
                "w0",
                "an f32, f16 or bf16 tensor",
                format!("{:?}", other.dtype()),
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut CudaStorage,
        wl: &Layout,
        a: &CudaStorage,
        al: &Layout,
    ) -> Result<()> {
        self.check((wl, w.dtype()), (al, a.dtype()))?;
        crate::cuda::merge(&self.geo, self.scale, self.undo, (w, wl), (a, al))
    }
}
