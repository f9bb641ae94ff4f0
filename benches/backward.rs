//! backward benchmark: the fused dX + deterministic dA against the unfused
//! cuBLAS composition (Q = G·A_out; dX = s·Q·A_inᵀ; dA = s·Gᵀ·S; dA += s·Xᵀ·Q),
//! bf16, with the copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: G read, X read, dX written (dx_beta = 0).

mod common;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use half::bf16;
use singlora::{backward, backward_workspace_len, Dims, Dropout, DxOut};

/// A dense bf16 backward at tokens × D, rank `rank` from a saved S: its
/// inputs (random), dX and dA (overwritten) and its workspace.
struct Bwd {
    dims: Dims,
    x: CudaSlice<bf16>,
    g: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    s: CudaSlice<f32>,
    dx: CudaSlice<bf16>,
    da: CudaSlice<f32>,
    ws: CudaSlice<f32>,
}

impl Bwd {
    fn new(gpu: &Gpu, tokens: usize, rank: usize) -> Self {
        let dims = Dims::new(tokens, D, D, rank).unwrap();
        Self {
            x: random_bf16(gpu, tokens * D, 1),
            g: random_bf16(gpu, tokens * D, 2),
            a: random_bf16(gpu, dims.a_len(), 3),
            s: random_f32(gpu, dims.s_len(), 4),
            dx: zeros::<bf16>(gpu, tokens * D),
            da: zeros::<f32>(gpu, dims.a_len()),
            ws: zeros::<f32>(gpu, backward_workspace_len(&dims, true).unwrap()),
            dims,
        }
    }

    /// Our launch: dX and dA (betas 0) from the saved S.
    fn run(&mut self, gpu: &Gpu, dropout: Dropout) {
        let dx = DxOut {
            dx: &mut self.dx,
            ld_dx: D,
            beta: 0.0,
        };
        backward(
            &gpu.stream,
            &self.dims,
            &self.x,
            D,
            &self.g,
            D,
            &self.a,
            Some(&self.s),
            SCALE,
            Some(dx),
            &mut self.da,
            0.0,
            &mut self.ws,
            dropout,
        )
        .unwrap();
    }
}

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut bench = Bench::new(&gpu, "backward", "cuBLAS 4×GEMM");
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let tokens = 16384;
    for rank in [8, 16, 32, 64] {
        let mut b = Bwd::new(&gpu, tokens, rank);
        let s_bf = random_bf16(&gpu, b.dims.s_len(), 4);
        let mut q_bf = zeros::<bf16>(&gpu, b.dims.s_len());
        let mut da_bf = zeros::<bf16>(&gpu, b.dims.a_len());
        bench.compare(token_shape(tokens, rank), |side| match side {
            Side::Ours => b.run(&gpu, Dropout::NONE),
            Side::Peer => unsafe {
                let r = rank;
                // Qᵀ (r×t) = A_outᵀ (r×d) · Gᵀ (d×t)
                let cfg = gemm_cfg(false, false, r, tokens, D, 1.0, r, D, 0.0, r);
                blas.gemm(cfg, &b.a, &b.g, &mut q_bf).unwrap();
                // dXᵀ (d×t) = s · A_in (d×r) · Qᵀ (r×t)
                let cfg = gemm_cfg(true, false, D, tokens, r, SCALE, r, r, 0.0, D);
                blas.gemm(cfg, &b.a, &q_bf, &mut b.dx).unwrap();
                // dAᵀ (r×d) = s · Sᵀ (r×t) · G (t×d), then += s · Qᵀ · X
                let cfg = gemm_cfg(false, true, r, D, tokens, SCALE, r, D, 0.0, r);
                blas.gemm(cfg, &s_bf, &b.g, &mut da_bf).unwrap();
                let cfg = gemm_cfg(false, true, r, D, tokens, SCALE, r, D, 1.0, r);
                blas.gemm(cfg, &q_bf, &b.x, &mut da_bf).unwrap();
            },
        });
    }
    bench.finish("backward (bf16, dX and dA)");

    // Adapter dropout: p = 0.1 against p = 0 (issue 16: within 5 %).
    let mut bench = Bench::new(&gpu, "backward-dropout", "p = 0");
    for rank in [8, 64] {
        let mut b = Bwd::new(&gpu, tokens, rank);
        let p = Dropout::new(0.1, 42, 0).unwrap();
        bench.compare_dropout(token_shape(tokens, rank), p, |d| b.run(&gpu, d));
    }
    bench.finish("backward with dropout p = 0.1 (bf16, dX and dA) against p = 0");
}
