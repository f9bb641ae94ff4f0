//! forward benchmark: the fused kernel against the unfused cuBLAS composition
//! of the same math (S = X·A_in, then Y = s·S·A_outᵀ + Y), bf16, beta = 1,
//! with the device copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: X read, Y read and Y written.

mod common;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use half::bf16;
use singlora::{forward, Dims, Dropout};

/// A dense bf16 forward at tokens × D, rank `rank`: its inputs (random),
/// Y (random, added onto) and S (saved).
struct Fwd {
    dims: Dims,
    x: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    s: CudaSlice<f32>,
}

impl Fwd {
    fn new(gpu: &Gpu, tokens: usize, rank: usize) -> Self {
        let dims = Dims::new(tokens, D, D, rank).unwrap();
        Self {
            x: random_bf16(gpu, tokens * D, 1),
            a: random_bf16(gpu, dims.a_len(), 2),
            y: random_bf16(gpu, tokens * D, 3),
            s: zeros::<f32>(gpu, dims.s_len()),
            dims,
        }
    }

    /// Our launch: Y += s·X·A[:D]·A[:D]ᵀ, S saved.
    fn run(&mut self, gpu: &Gpu, dropout: Dropout) {
        forward(
            &gpu.stream,
            &self.dims,
            &self.x,
            D,
            &self.a,
            &mut self.y,
            D,
            Some(&mut self.s),
            SCALE,
            1.0,
            dropout,
        )
        .unwrap();
    }
}

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut bench = Bench::new(&gpu, "forward", "cuBLAS 2×GEMM");
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let shapes: Vec<(usize, usize)> = [8, 16, 32, 64]
        .iter()
        .map(|&r| (16384, r))
        .chain([1, 16, 64].iter().map(|&t| (t, 16)))
        .collect();
    for (tokens, rank) in shapes {
        let mut f = Fwd::new(&gpu, tokens, rank);
        let mut s_bf = zeros::<bf16>(&gpu, f.dims.s_len());
        bench.compare(token_shape(tokens, rank), |side| match side {
            Side::Ours => f.run(&gpu, Dropout::NONE),
            Side::Peer => unsafe {
                // Row-major via column-major: Sᵀ (r×t) = A_inᵀ (r×d) · Xᵀ (d×t).
                let shrink = gemm_cfg(false, false, rank, tokens, D, 1.0, rank, D, 0.0, rank);
                blas.gemm(shrink, &f.a, &f.x, &mut s_bf).unwrap();
                // Yᵀ (d×t) = s · A_out (d×r) · Sᵀ (r×t) + Yᵀ.
                let expand = gemm_cfg(true, false, D, tokens, rank, SCALE, rank, rank, 1.0, D);
                blas.gemm(expand, &f.a, &s_bf, &mut f.y).unwrap();
            },
        });
    }
    bench.finish("forward (bf16, beta = 1)");

    // Adapter dropout: p = 0.1 against p = 0 (issue 16: within 5 %).
    let mut bench = Bench::new(&gpu, "forward-dropout", "p = 0");
    for rank in [8, 64] {
        let tokens = 16384;
        let mut f = Fwd::new(&gpu, tokens, rank);
        let p = Dropout::new(0.1, 42, 0).unwrap();
        bench.compare_dropout(token_shape(tokens, rank), p, |d| f.run(&gpu, d));
    }
    bench.finish("forward with dropout p = 0.1 (bf16, beta = 1) against p = 0");
}
