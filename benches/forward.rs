//! forward benchmark: the fused kernel against the unfused cuBLAS composition
//! of the same math (S = X·A_in, then Y = s·S·A_outᵀ + Y), bf16, beta = 1,
//! with the device copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: X read, Y read and Y written. Both kernels are swept
//! ([`ForwardKernel::Portable`], the default, and the opt-in
//! [`ForwardKernel::Tma`] on sm_90a); the shape column names the kernel that
//! ran (a TMA request outside its reach runs the portable kernel, and that
//! row is not repeated).

mod common;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use singlora::{
    forward, Dims, Dropout, ForwardKernel, ForwardOptions, ForwardPtrs, ForwardShape, Kernels,
};

/// A dense bf16 forward at tokens × (d_in → d_out), rank `rank`: its inputs
/// (random), Y (random, added onto) and S (saved).
struct Fwd {
    dims: Dims,
    x: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    s: CudaSlice<f32>,
}

impl Fwd {
    fn new(gpu: &Gpu, tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Self {
        let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
        Self {
            x: random_bf16(gpu, tokens * d_in, 1),
            a: random_bf16(gpu, dims.a_len(), 2),
            y: random_bf16(gpu, tokens * d_out, 3),
            s: zeros::<f32>(gpu, dims.s_len()),
            dims,
        }
    }

    /// The label (with the kernel that runs) and the minimal bytes.
    fn shape(&self, gpu: &Gpu, kernel: ForwardKernel) -> (String, f64) {
        let d = &self.dims;
        let shape = ForwardShape::new(d, d.d_in(), d.d_out(), SCALE, 1.0)
            .unwrap()
            .with_kernel(kernel);
        let ptrs = ForwardPtrs {
            x: self.x.device_ptr(&gpu.stream).0,
            a: self.a.device_ptr(&gpu.stream).0,
            y: self.y.device_ptr(&gpu.stream).0,
            s: self.s.device_ptr(&gpu.stream).0,
        };
        let ran = shape.kernel_for::<bf16>(&Kernels::for_stream(&gpu.stream).unwrap(), &ptrs);
        let bytes = (d.tokens() * (d.d_in() + 2 * d.d_out()) * 2) as f64;
        (dims_label(d, ran), bytes)
    }

    /// Our launch: Y += s·X·A[:d_in]·A[:d_out]ᵀ, S saved.
    fn run(&mut self, gpu: &Gpu, options: impl Into<ForwardOptions>) {
        let (d_in, d_out) = (self.dims.d_in(), self.dims.d_out());
        forward(
            &gpu.stream,
            &self.dims,
            &self.x,
            d_in,
            &self.a,
            &mut self.y,
            d_out,
            Some(&mut self.s),
            SCALE,
            1.0,
            options,
        )
        .unwrap();
    }
}

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut bench = Bench::new(&gpu, "forward", "cuBLAS 2×GEMM");
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let shapes: Vec<(usize, usize, usize, usize)> = [8, 16, 32, 64, 128, 256]
        .iter()
        .map(|&r| (16384, D, D, r))
        .chain([(16384, D, 11008, 16), (16384, 11008, D, 16)])
        .chain([1, 16, 64].iter().map(|&t| (t, D, D, 16)))
        .collect();
    for (tokens, d_in, d_out, rank) in shapes {
        let mut f = Fwd::new(&gpu, tokens, d_in, d_out, rank);
        let mut s_bf = zeros::<bf16>(&gpu, f.dims.s_len());
        for kernel in [ForwardKernel::Portable, ForwardKernel::Tma] {
            let shape = f.shape(&gpu, kernel);
            if kernel == ForwardKernel::Tma && !shape.0.ends_with("Tma") {
                continue; // the portable row above already timed this
            }
            bench.compare(shape, |side| match side {
                Side::Ours => f.run(&gpu, kernel),
                Side::Peer => unsafe {
                    // Row-major via column-major: Sᵀ (r×t) = A_inᵀ (r×d_in) · Xᵀ (d_in×t).
                    let shrink =
                        gemm_cfg(false, false, rank, tokens, d_in, 1.0, rank, d_in, 0.0, rank);
                    blas.gemm(shrink, &f.a, &f.x, &mut s_bf).unwrap();
                    // Yᵀ (d_out×t) = s · A_out (d_out×r) · Sᵀ (r×t) + Yᵀ.
                    let expand = gemm_cfg(
                        true, false, d_out, tokens, rank, SCALE, rank, rank, 1.0, d_out,
                    );
                    blas.gemm(expand, &f.a, &s_bf, &mut f.y).unwrap();
                },
            });
        }
    }
    bench.finish("forward (bf16, beta = 1)");

    // Adapter dropout: p = 0.1 against p = 0 (issue 16: within 5 %).
    let mut bench = Bench::new(&gpu, "forward-dropout", "p = 0");
    for rank in [8, 64] {
        let tokens = 16384;
        let mut f = Fwd::new(&gpu, tokens, D, D, rank);
        let p = Dropout::new(0.1, 42, 0).unwrap();
        bench.compare_dropout(token_shape(tokens, rank), p, |d| f.run(&gpu, d));
    }
    bench.finish("forward with dropout p = 0.1 (bf16, beta = 1) against p = 0");
}
