//! merge benchmark: folding the adapter into a bf16 weight in place,
//! W += s·A[:d_out]·A[:d_in]ᵀ, against cuBLAS doing the same update as one
//! GEMM with beta = 1, with the device copy bandwidth measured in the same
//! run. GB/s counts W read and written once (A is a few hundred KiB).

mod common;

use common::*;
use criterion::Criterion;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use half::bf16;
use singlora::{merge, unmerge, Dims};

const SCALE: f32 = 0.5;

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let copy_bw = copy_bandwidth(&gpu);
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let shapes = [
        (4096, 4096, 16),
        (4096, 4096, 64),
        (4096, 4096, 256),
        (4096, 11008, 16),
    ];
    let mut rows = Vec::new();
    for (d_in, d_out, rank) in shapes {
        let dims = Dims::new(0, d_in, d_out, rank).unwrap();
        let a = random_bf16(&gpu, dims.a_len(), 1);
        let mut w = random_bf16(&gpu, d_out * d_in, 2);
        let shape = format!("d_in={d_in} d_out={d_out} r={rank}");
        let mut group = c.benchmark_group(format!("merge/{shape}"));
        // Merge and unmerge alternate, so W stays where it started.
        let mut undo = false;
        group.bench_function("singlora", |b| {
            b.iter_custom(|iters| {
                timed(&gpu.stream, iters, || {
                    if undo {
                        unmerge(&gpu.stream, &dims, &mut w, d_in, &a, SCALE).unwrap();
                    } else {
                        merge(&gpu.stream, &dims, &mut w, d_in, &a, SCALE).unwrap();
                    }
                    undo = !undo;
                })
            })
        });
        let ours = take_median();
        group.bench_function("cublas", |b| {
            b.iter_custom(|iters| {
                timed(&gpu.stream, iters, || unsafe {
                    // Row-major W (d_out × d_in) is column-major Wᵀ (d_in ×
                    // d_out) += s · A_in · A_outᵀ, and row-major A (D × r) is
                    // column-major Aᵀ (r × D): op T on the left, N on the right.
                    let cfg = GemmConfig {
                        transa: cublasOperation_t::CUBLAS_OP_T,
                        transb: cublasOperation_t::CUBLAS_OP_N,
                        m: d_in as i32,
                        n: d_out as i32,
                        k: rank as i32,
                        alpha: bf16::from_f32(SCALE),
                        lda: rank as i32,
                        ldb: rank as i32,
                        beta: bf16::ONE,
                        ldc: d_in as i32,
                    };
                    blas.gemm(cfg, &a, &a, &mut w).unwrap();
                })
            })
        });
        let peer = take_median();
        group.finish();
        rows.push(Row {
            op: "merge",
            shape,
            ours_s: ours,
            bytes: (2 * d_out * d_in * 2) as f64,
            copy_bw,
            peer: "cuBLAS GEMM (beta = 1)",
            peer_s: peer,
        });
    }
    c.final_summary();
    print_table("merge (bf16, in place)", &rows);
}
