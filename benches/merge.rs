//! merge benchmark: folding the adapter into a bf16 weight in place,
//! W += s·A[:d_out]·A[:d_in]ᵀ, against cuBLAS doing the same update as one
//! GEMM with beta = 1, with the device copy bandwidth measured in the same
//! run. GB/s counts W read and written once (A is a few hundred KiB). Both
//! product kernels are swept (the FMA default and the opt-in tensor-core
//! one): the table's shape column names the kernel.

mod common;

use common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use singlora::{merge_with, Dims, MergeKernel};

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut bench = Bench::new(&gpu, "merge", "cuBLAS GEMM (beta = 1)");
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let shapes = [
        (4096, 4096, 16),
        (4096, 4096, 64),
        (4096, 4096, 128),
        (4096, 4096, 256),
        (4096, 11008, 16),
    ];
    for ((d_in, d_out, rank), kernel) in shapes
        .into_iter()
        .flat_map(|s| [MergeKernel::Fma, MergeKernel::TensorCore].map(|k| (s, k)))
    {
        let dims = Dims::new(0, d_in, d_out, rank).unwrap();
        let a = random_bf16(&gpu, dims.a_len(), 1);
        let mut w = random_bf16(&gpu, d_out * d_in, 2);
        let shape = format!("d_in={d_in} d_out={d_out} r={rank} {kernel:?}");
        let bytes = (2 * d_out * d_in * 2) as f64;
        // Merge and unmerge alternate, so W stays where it started.
        let mut undo = false;
        bench.compare((shape, bytes), |side| match side {
            Side::Ours => {
                merge_with(&gpu.stream, &dims, &mut w, d_in, &a, SCALE, undo, kernel).unwrap();
                undo = !undo;
            }
            Side::Peer => unsafe {
                // Row-major W (d_out × d_in) is column-major Wᵀ (d_in ×
                // d_out) += s · A_in · A_outᵀ, and row-major A (D × r) is
                // column-major Aᵀ (r × D): op T on the left, N on the right.
                let cfg = gemm_cfg(true, false, d_in, d_out, rank, SCALE, rank, rank, 1.0, d_in);
                blas.gemm(cfg, &a, &a, &mut w).unwrap();
            },
        });
    }
    bench.finish("merge (bf16, in place)");
}
