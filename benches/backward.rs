//! backward benchmark: the deterministic dX + dA against the unfused
//! cuBLAS composition (Q = G·A_out; dX = s·Q·A_inᵀ; dA = s·Gᵀ·S; dA += s·Xᵀ·Q),
//! bf16, with the copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: G read, X read, dX written (dx_beta = 0). The kernels are
//! swept ([`BackwardKernel::Split`], the default, and the opt-in
//! [`BackwardKernel::Fused`] with either exchange); the shape column names
//! the kernel that ran (a fused request outside the fused kernel's reach
//! runs the split one, and is not timed twice).

mod common;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use half::bf16;
use singlora::{
    backward, backward_workspace_len, BackwardKernel, BackwardOptions, Dims, Dropout, DxOut,
    Kernels,
};

/// A dense bf16 backward at tokens × (d_in → d_out), rank `rank` from a
/// saved S: its inputs (random), dX and dA (overwritten) and its workspace.
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
    fn new(gpu: &Gpu, tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Self {
        let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
        Self {
            x: random_bf16(gpu, tokens * d_in, 1),
            g: random_bf16(gpu, tokens * d_out, 2),
            a: random_bf16(gpu, dims.a_len(), 3),
            s: random_f32(gpu, dims.s_len(), 4),
            dx: zeros::<bf16>(gpu, tokens * d_in),
            da: zeros::<f32>(gpu, dims.a_len()),
            ws: zeros::<f32>(gpu, backward_workspace_len(&dims, true).unwrap()),
            dims,
        }
    }

    /// The label (with the kernel that runs) and the minimal bytes.
    fn shape(&self, gpu: &Gpu, kernel: BackwardKernel) -> (String, f64) {
        let kernels = Kernels::for_stream(&gpu.stream).unwrap();
        let ran = kernel.resolve::<bf16>(&kernels, &self.dims);
        let d = &self.dims;
        let bytes = (d.tokens() * (2 * d.d_in() + d.d_out()) * 2) as f64;
        (dims_label(d, ran), bytes)
    }

    /// Our launch: dX and dA (betas 0) from the saved S.
    fn run(&mut self, gpu: &Gpu, options: BackwardOptions) {
        let (d_in, d_out) = (self.dims.d_in(), self.dims.d_out());
        let dx = DxOut {
            dx: &mut self.dx,
            ld_dx: d_in,
            beta: 0.0,
        };
        backward(
            &gpu.stream,
            &self.dims,
            &self.x,
            d_in,
            &self.g,
            d_out,
            &self.a,
            Some(&self.s),
            SCALE,
            Some(dx),
            &mut self.da,
            0.0,
            &mut self.ws,
            options,
        )
        .unwrap();
    }
}

/// The cuBLAS chain for `b`'s shape, into bf16 Q, dX and dA.
fn cublas_chain(
    blas: &CudaBlas,
    b: &mut Bwd,
    s_bf: &CudaSlice<bf16>,
    q_bf: &mut CudaSlice<bf16>,
    da_bf: &mut CudaSlice<bf16>,
) {
    let (t, d_in, d_out, r) = (
        b.dims.tokens(),
        b.dims.d_in(),
        b.dims.d_out(),
        b.dims.rank(),
    );
    // SAFETY: every buffer holds the matrix its GEMM reads or writes.
    unsafe {
        // Qᵀ (r×t) = A_outᵀ (r×d_out) · Gᵀ (d_out×t)
        let cfg = gemm_cfg(false, false, r, t, d_out, 1.0, r, d_out, 0.0, r);
        blas.gemm(cfg, &b.a, &b.g, q_bf).unwrap();
        // dXᵀ (d_in×t) = s · A_in (d_in×r) · Qᵀ (r×t)
        let cfg = gemm_cfg(true, false, d_in, t, r, SCALE, r, r, 0.0, d_in);
        blas.gemm(cfg, &b.a, &*q_bf, &mut b.dx).unwrap();
        // dAᵀ (r×d_out) = s · Sᵀ (r×t) · G (t×d_out), then += s · Qᵀ · X
        let cfg = gemm_cfg(false, true, r, d_out, t, SCALE, r, d_out, 0.0, r);
        blas.gemm(cfg, s_bf, &b.g, da_bf).unwrap();
        let cfg = gemm_cfg(false, true, r, d_in, t, SCALE, r, d_in, 1.0, r);
        blas.gemm(cfg, &*q_bf, &b.x, da_bf).unwrap();
    }
}

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut bench = Bench::new(&gpu, "backward", "cuBLAS 4×GEMM");
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let tokens = 16384;
    let mut shapes: Vec<(usize, usize, usize)> = [8, 16, 32, 64, 128, 256]
        .iter()
        .map(|&r| (D, D, r))
        .collect();
    shapes.extend([(D, 11008, 16), (11008, D, 16)]);
    for (d_in, d_out, rank) in shapes {
        let mut b = Bwd::new(&gpu, tokens, d_in, d_out, rank);
        let s_bf = random_bf16(&gpu, b.dims.s_len(), 4);
        let mut q_bf = zeros::<bf16>(&gpu, b.dims.s_len());
        let mut da_bf = zeros::<bf16>(&gpu, b.dims.a_len());
        for kernel in [
            BackwardKernel::Split,
            BackwardKernel::Fused,
            BackwardKernel::FusedScatter,
        ] {
            let shape = b.shape(&gpu, kernel);
            if kernel != BackwardKernel::Split && shape.0.ends_with("Split") {
                continue; // the split row above already timed this
            }
            let options = BackwardOptions {
                dropout: Dropout::NONE,
                kernel,
            };
            bench.compare(shape, |side| match side {
                Side::Ours => b.run(&gpu, options),
                Side::Peer => cublas_chain(&blas, &mut b, &s_bf, &mut q_bf, &mut da_bf),
            });
        }
    }
    // The fused kernels' residency on this device (how many clusters take
    // the token ranges at once).
    let kernels = Kernels::for_stream(&gpu.stream).unwrap();
    let residency = |name: &str| {
        kernels
            .max_active_clusters(name)
            .map_or("unknown".to_string(), |n| n.to_string())
    };
    bench.finish(&format!(
        "backward (bf16, dX and dA; fused kernel: {} / {} clusters resident at rank bucket 16 / 32)",
        residency("backward_fused_sm90_bf16_r16"),
        residency("backward_fused_sm90_bf16_r32")
    ));

    // Adapter dropout: p = 0.1 against p = 0 (issue 16: within 5 %), both
    // kernels where the fused one applies.
    let mut bench = Bench::new(&gpu, "backward-dropout", "p = 0");
    for (rank, kernel) in [
        (8, BackwardKernel::Split),
        (8, BackwardKernel::Fused),
        (64, BackwardKernel::Split),
    ] {
        let mut b = Bwd::new(&gpu, tokens, D, D, rank);
        let shape = b.shape(&gpu, kernel);
        let p = Dropout::new(0.1, 42, 0).unwrap();
        bench.compare_dropout(shape, p, |dropout| {
            b.run(&gpu, BackwardOptions { dropout, kernel })
        });
    }
    bench.finish("backward with dropout p = 0.1 (bf16, dX and dA) against p = 0");
}
