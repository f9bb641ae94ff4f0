//! backward benchmark: the fused dX + deterministic dA against the unfused
//! cuBLAS composition (Q = G·A_out; dX = s·Q·A_inᵀ; dA = s·Gᵀ·S; dA += s·Xᵀ·Q),
//! bf16, with the copy bandwidth measured in the same run. GB/s counts the
//! minimal bytes: G read, X read, dX written (dx_beta = 0).

mod common;

use common::*;
use criterion::Criterion;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use half::bf16;
use singlora::{backward, backward_workspace_len, Dims, DxOut};

const D: usize = 4096;
const SCALE: f32 = 0.5;

#[allow(clippy::too_many_arguments)]
fn cfg(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    lda: usize,
    ldb: usize,
    beta: f32,
    ldc: usize,
) -> GemmConfig<bf16> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    GemmConfig {
        transa: op(transa),
        transb: op(transb),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: bf16::from_f32(alpha),
        lda: lda as i32,
        ldb: ldb as i32,
        beta: bf16::from_f32(beta),
        ldc: ldc as i32,
    }
}

fn main() {
    let Some(gpu) = gpu() else { return };
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let copy_bw = copy_bandwidth(&gpu);
    let blas = CudaBlas::new(gpu.stream.clone()).unwrap();
    let tokens = 16384;
    let mut rows = Vec::new();
    for rank in [8, 16, 32, 64] {
        let dims = Dims::new(tokens, D, D, rank).unwrap();
        let x = random_bf16(&gpu, tokens * D, 1);
        let g = random_bf16(&gpu, tokens * D, 2);
        let a = random_bf16(&gpu, dims.a_len(), 3);
        let s = random_f32(&gpu, dims.s_len(), 4);
        let mut dx = gpu.stream.alloc_zeros::<bf16>(tokens * D).unwrap();
        let mut da = gpu.stream.alloc_zeros::<f32>(dims.a_len()).unwrap();
        let mut ws = gpu
            .stream
            .alloc_zeros::<f32>(backward_workspace_len(&dims, true).unwrap())
            .unwrap();
        let s_bf = random_bf16(&gpu, dims.s_len(), 4);
        let mut q_bf = gpu.stream.alloc_zeros::<bf16>(dims.s_len()).unwrap();
        let mut da_bf = gpu.stream.alloc_zeros::<bf16>(dims.a_len()).unwrap();
        let shape = format!("t={tokens} d={D} r={rank}");
        let mut group = c.benchmark_group(format!("backward/{shape}"));
        group.bench_function("singlora", |b| {
            b.iter_custom(|iters| {
                timed(&gpu.stream, iters, || {
                    let dxo = DxOut {
                        dx: &mut dx,
                        ld_dx: D,
                        beta: 0.0,
                    };
                    backward(
                        &gpu.stream,
                        &dims,
                        &x,
                        D,
                        &g,
                        D,
                        &a,
                        Some(&s),
                        SCALE,
                        Some(dxo),
                        &mut da,
                        0.0,
                        &mut ws,
                    )
                    .unwrap()
                })
            })
        });
        let ours = take_median();
        group.bench_function("cublas", |b| {
            b.iter_custom(|iters| {
                timed(&gpu.stream, iters, || unsafe {
                    let r = rank;
                    // Qᵀ (r×t) = A_outᵀ (r×d) · Gᵀ (d×t)
                    blas.gemm(
                        cfg(false, false, r, tokens, D, 1.0, r, D, 0.0, r),
                        &a,
                        &g,
                        &mut q_bf,
                    )
                    .unwrap();
                    // dXᵀ (d×t) = s · A_in (d×r) · Qᵀ (r×t)
                    blas.gemm(
                        cfg(true, false, D, tokens, r, SCALE, r, r, 0.0, D),
                        &a,
                        &q_bf,
                        &mut dx,
                    )
                    .unwrap();
                    // dAᵀ (r×d) = s · Sᵀ (r×t) · G (t×d), then += s · Qᵀ · X
                    blas.gemm(
                        cfg(false, true, r, D, tokens, SCALE, r, D, 0.0, r),
                        &s_bf,
                        &g,
                        &mut da_bf,
                    )
                    .unwrap();
                    blas.gemm(
                        cfg(false, true, r, D, tokens, SCALE, r, D, 1.0, r),
                        &q_bf,
                        &x,
                        &mut da_bf,
                    )
                    .unwrap();
                })
            })
        });
        let peer = take_median();
        group.finish();
        rows.push(Row {
            op: "backward",
            shape,
            ours_s: ours,
            bytes: (3 * tokens * D * 2) as f64,
            copy_bw,
            peer: "cuBLAS 4×GEMM",
            peer_s: peer,
        });
    }
    c.final_summary();
    print_table("backward (bf16, dX and dA)", &rows);
}
