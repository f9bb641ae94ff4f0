//! forward benchmark: the fused kernel against the unfused cuBLAS composition
//! of the same math (S = X·A_in, then Y = s·S·A_outᵀ + Y), bf16, beta = 1,
//! with the device copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: X read, Y read and Y written.

mod common;

use common::*;
use criterion::Criterion;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use half::bf16;
use singlora::{forward, Dims};

const D: usize = 4096;
const SCALE: f32 = 0.5;

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let copy_bw = copy_bandwidth(&gpu);
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let shapes: Vec<(usize, usize)> = [8, 16, 32, 64]
        .iter()
        .map(|&r| (16384, r))
        .chain([1, 16, 64].iter().map(|&t| (t, 16)))
        .collect();
    let mut rows = Vec::new();
    for (tokens, rank) in shapes {
        let dims = Dims::new(tokens, D, D, rank).unwrap();
        let x = random_bf16(&gpu, tokens * D, 1);
        let a = random_bf16(&gpu, dims.a_len(), 2);
        let mut y = random_bf16(&gpu, tokens * D, 3);
        let mut s = gpu.stream.alloc_zeros::<f32>(dims.s_len()).unwrap();
        let mut s_bf = gpu.stream.alloc_zeros::<bf16>(dims.s_len()).unwrap();
        let shape = format!("t={tokens} d={D} r={rank}");
        let mut group = c.benchmark_group(format!("forward/{shape}"));
        group.bench_function("singlora", |b| {
            b.iter_custom(|iters| {
                timed(&gpu.stream, iters, || {
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
                    )
                    .unwrap()
                })
            })
        });
        let ours = take_median();
        group.bench_function("cublas", |b| {
            b.iter_custom(|iters| {
                timed(&gpu.stream, iters, || unsafe {
                    // Row-major via column-major: Sᵀ (r×t) = A_inᵀ (r×d) · Xᵀ (d×t).
                    let shrink = GemmConfig {
                        transa: cublasOperation_t::CUBLAS_OP_N,
                        transb: cublasOperation_t::CUBLAS_OP_N,
                        m: rank as i32,
                        n: tokens as i32,
                        k: D as i32,
                        alpha: bf16::ONE,
                        lda: rank as i32,
                        ldb: D as i32,
                        beta: bf16::ZERO,
                        ldc: rank as i32,
                    };
                    blas.gemm(shrink, &a, &x, &mut s_bf).unwrap();
                    // Yᵀ (d×t) = s · A_out (d×r) · Sᵀ (r×t) + Yᵀ.
                    let expand = GemmConfig {
                        transa: cublasOperation_t::CUBLAS_OP_T,
                        transb: cublasOperation_t::CUBLAS_OP_N,
                        m: D as i32,
                        n: tokens as i32,
                        k: rank as i32,
                        alpha: bf16::from_f32(SCALE),
                        lda: rank as i32,
                        ldb: rank as i32,
                        beta: bf16::ONE,
                        ldc: D as i32,
                    };
                    blas.gemm(expand, &a, &s_bf, &mut y).unwrap();
                })
            })
        });
        let peer = take_median();
        group.finish();
        rows.push(Row {
            op: "forward",
            shape,
            ours_s: ours,
            bytes: (3 * tokens * D * 2) as f64,
            copy_bw,
            peer: "cuBLAS 2×GEMM",
            peer_s: peer,
        });
    }
    c.final_summary();
    print_table("forward (bf16, beta = 1)", &rows);
}
