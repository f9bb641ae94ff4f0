//! forward benchmark: the fused kernel against the unfused cuBLAS composition
//! of the same math (S = X·A_in, then Y = s·S·A_outᵀ + Y), bf16, beta = 1,
//! with the device copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: X read, Y read and Y written.

mod common;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use half::bf16;
use singlora::{forward, Dims, Dropout};

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
        let dims = Dims::new(tokens, D, D, rank).unwrap();
        let x = random_bf16(&gpu, tokens * D, 1);
        let a = random_bf16(&gpu, dims.a_len(), 2);
        let mut y = random_bf16(&gpu, tokens * D, 3);
        let mut s = zeros::<f32>(&gpu, dims.s_len());
        let mut s_bf = zeros::<bf16>(&gpu, dims.s_len());
        bench.compare(token_shape(tokens, rank), |side| match side {
            Side::Ours => forward(
                &gpu.stream,
                &dims,
                &x,
                D,
                &a,
                &mut y,
                D,
                Some(&mut s),
                SCALE,
                1.0,
                singlora::Dropout::NONE,
            )
            .unwrap(),
            Side::Peer => unsafe {
                // Row-major via column-major: Sᵀ (r×t) = A_inᵀ (r×d) · Xᵀ (d×t).
                let shrink = gemm_cfg(false, false, rank, tokens, D, 1.0, rank, D, 0.0, rank);
                blas.gemm(shrink, &a, &x, &mut s_bf).unwrap();
                // Yᵀ (d×t) = s · A_out (d×r) · Sᵀ (r×t) + Yᵀ.
                let expand = gemm_cfg(true, false, D, tokens, rank, SCALE, rank, rank, 1.0, D);
                blas.gemm(expand, &a, &s_bf, &mut y).unwrap();
            },
        });
    }
    bench.finish("forward (bf16, beta = 1)");

    // Adapter dropout: p = 0.1 against p = 0 (issue 16: within 5 %).
    let mut bench = Bench::new(&gpu, "forward-dropout", "p = 0");
    for rank in [8, 64] {
        let tokens = 16384;
        let dims = Dims::new(tokens, D, D, rank).unwrap();
        let x = random_bf16(&gpu, tokens * D, 1);
        let a = random_bf16(&gpu, dims.a_len(), 2);
        let mut y = random_bf16(&gpu, tokens * D, 3);
        let mut s = zeros::<f32>(&gpu, dims.s_len());
        let p = Dropout::new(0.1, 42, 0).unwrap();
        bench.compare(token_shape(tokens, rank), |side| {
            let d = match side {
                Side::Ours => p,
                Side::Peer => Dropout::NONE,
            };
            forward(
                &gpu.stream,
                &dims,
                &x,
                D,
                &a,
                &mut y,
                D,
                Some(&mut s),
                SCALE,
                1.0,
                d,
            )
            .unwrap()
        });
    }
    bench.finish("forward with dropout p = 0.1 (bf16, beta = 1) against p = 0");
}
