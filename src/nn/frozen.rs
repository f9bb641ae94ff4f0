//! The frozen base weight of a [`crate::SingLoraLinear`] and the cuBLAS
//! products that apply it (`x·W0ᵀ` forward, `g·W0` for dX), on the layer's
//! stream.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::dims::Dims;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The frozen base weight (`d_out × d_in`, row-major) and the cuBLAS handle
/// that applies it.
pub(crate) struct Frozen<T> {
    pub(crate) w0: CudaSlice<T>,
    pub(crate) blas: CudaBlas,
    /// `Some(scale)` while the adapter is folded into `w0` with that scale.
    pub(crate) merged: Option<f32>,
}

impl<T: DType> Frozen<T>
where
    CudaBlas: Gemm<T>,
{
    /// `y = x·W0ᵀ` over `dims.tokens()` contiguous rows; the caller checked
    /// that x and y hold `tokens × d_in` and `tokens × d_out` elements.
    pub(crate) fn forward(
        &self,
        dims: &Dims,
        x: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        // Row-major y (tokens × d_out) is column-major yᵀ = W0 · xᵀ, and
        // row-major W0 is column-major W0ᵀ (d_in × d_out): op T.
        let cfg = gemm_config::<T>(
            cublasOperation_t::CUBLAS_OP_T,
            (dims.d_out(), dims.tokens(), dims.d_in()),
            (dims.d_in(), dims.d_in(), dims.d_out()),
        )?;
        // SAFETY: W0 holds d_out·d_in elements (checked by with_frozen), x
        // and y the extents the config describes (checked by the caller);
        // cuBLAS runs on the layer's stream.
        unsafe { self.blas.gemm(cfg, &self.w0, x, y)? };
        Ok(())
    }

    /// `dx = g·W0`; the caller checked that g and dx hold `tokens × d_out`
    /// and `tokens × d_in` elements.
    pub(crate) fn backward_dx(
        &self,
        dims: &Dims,
        g: &impl DevicePtr<T>,
        dx: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        // Row-major dx (tokens × d_in) is column-major dxᵀ = W0ᵀ · gᵀ, with
        // row-major W0 read as column-major W0ᵀ (op N).
        let cfg = gemm_config::<T>(
            cublasOperation_t::CUBLAS_OP_N,
            (dims.d_in(), dims.tokens(), dims.d_out()),
            (dims.d_in(), dims.d_out(), dims.d_in()),
        )?;
        // SAFETY: as in forward.
        unsafe { self.blas.gemm(cfg, &self.w0, g, dx)? };
        Ok(())
    }
}

/// A cuBLAS config for column-major `C (m × n) = op(A) · B` with `alpha = 1`,
/// `beta = 0`; `B` is never transposed. `mnk` and `lds` = (lda, ldb, ldc).
fn gemm_config<T: DType>(
    transa: cublasOperation_t,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
) -> Result<GemmConfig<T>> {
    let int = |v: usize, what: &'static str| -> Result<i32> {
        i32::try_from(v).map_err(|_| Error::Overflow { what })
    };
    Ok(GemmConfig {
        transa,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int(m, "cuBLAS m")?,
        n: int(n, "cuBLAS n")?,
        k: int(k, "cuBLAS k")?,
        alpha: T::from_f64(1.0),
        lda: int(lda, "cuBLAS lda")?,
        ldb: int(ldb, "cuBLAS ldb")?,
        beta: T::from_f64(0.0),
        ldc: int(ldc, "cuBLAS ldc")?,
    })
}
