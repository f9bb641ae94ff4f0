//! cuBLAS helpers shared by the layer's frozen-weight GEMMs and the
//! bindings' (singlora-candle's W0 products).

use cudarc::cublas::{sys::cublasOperation_t, GemmConfig};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A cuBLAS config for column-major `C (m × n) = op(A) · B` with `alpha = 1`,
/// `beta = 0` (C is never read); `B` is never transposed. `mnk` and `lds` =
/// (lda, ldb, ldc). A size past cuBLAS's `int` is [`Error::Overflow`] naming
/// it.
pub fn gemm_config<T: DType>(
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
