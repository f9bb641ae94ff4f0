//! The frozen base weight of a [`crate::SingLoraLinear`] and the cuBLAS
//! products that apply it (`x·W0ᵀ` forward, `g·W0` for dX), on the layer's
//! stream.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::dims::Dims;
use crate::dtype::DType;
use crate::error::Result;
use crate::runtime::blas::gemm_config;

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
    /// The frozen product `p` over `dims.tokens()` contiguous rows: `input`
    /// and `output` hold the row-major matrices `p` names (the caller checked
    /// their lengths).
    pub(crate) fn apply(
        &self,
        p: Product,
        dims: &Dims,
        input: &impl DevicePtr<T>,
        output: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let (tokens, d_in, d_out) = (dims.tokens(), dims.d_in(), dims.d_out());
        // cuBLAS is column-major: a row-major matrix is its transpose, and
        // row-major W0 (d_out × d_in) is column-major W0ᵀ (d_in × d_out).
        let cfg = match p {
            // yᵀ (d_out × tokens) = W0 · xᵀ: op T on the stored W0ᵀ.
            Product::Forward => gemm_config::<T>(
                cublasOperation_t::CUBLAS_OP_T,
                (d_out, tokens, d_in),
                (d_in, d_in, d_out),
            )?,
            // dxᵀ (d_in × tokens) = W0ᵀ · gᵀ: the stored W0ᵀ as it is (op N).
            Product::BackwardDx => gemm_config::<T>(
                cublasOperation_t::CUBLAS_OP_N,
                (d_in, tokens, d_out),
                (d_in, d_out, d_in),
            )?,
        };
        // SAFETY: W0 holds d_out·d_in elements (checked by with_frozen),
        // input and output the extents the config describes (checked by the
        // caller); cuBLAS runs on the layer's stream.
        unsafe { self.blas.gemm(cfg, &self.w0, input, output)? };
        Ok(())
    }
}

/// The two products of the frozen weight.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Product {
    /// `y = x·W0ᵀ` (`tokens × d_in` in, `tokens × d_out` out).
    Forward,
    /// `dx = g·W0` (`tokens × d_out` in, `tokens × d_in` out).
    BackwardDx,
}
