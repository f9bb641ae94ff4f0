//! The fused backward's persistent grid taking more token ranges than it
//! holds clusters: the registry's test knob (`SINGLORA_MAX_ACTIVE_CLUSTERS`,
//! read when a context's module loads, hence a binary of its own) caps the
//! resident clusters at 3, so each cluster walks several ranges
//! (blockIdx.y, blockIdx.y + 3, ...), each ending in its own dA partial.
//! Against the f64 reference at the bf16 bars, outputs poisoned first, and
//! dA bitwise equal over runs. sm_90a only (the fused kernel is sm_90a code).

mod common;

use common::*;
use half::bf16;
use singlora::runtime::registry::MAX_CLUSTERS_ENV;
use singlora::{BackwardKernel, BackwardOptions, Dims, Dropout, Kernels};

const CAP: u32 = 3;

fn gpu_with_cap() -> Option<(Gpu, std::sync::Arc<Kernels>)> {
    std::env::set_var(MAX_CLUSTERS_ENV, CAP.to_string());
    let gpu = gpu()?;
    let kernels = with_kernel(&gpu, "backward_fused_sm90_bf16_r16")?;
    Some((gpu, kernels))
}

fn case(
    gpu: &Gpu,
    kernels: &Kernels,
    (tokens, d_in, d_out, rank): (usize, usize, usize, usize),
    p: f64,
) {
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    assert_eq!(
        BackwardKernel::Fused.resolve::<bf16>(kernels, &dims),
        BackwardKernel::Fused
    );
    let name = format!("fused, {CAP} resident clusters, {tokens}x{d_in}->{d_out} r{rank} p {p}");
    let mut r = rng(tokens as u64 + rank as u64);
    let x = quantize::<bf16>(&randn(&mut r, tokens * d_in, 1.0));
    let a = quantize::<bf16>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
    let g = quantize::<bf16>(&randn(&mut r, tokens * d_out, 1.0));
    let dropout = if p == 0.0 {
        Dropout::NONE
    } else {
        Dropout::new(p, 77, 5).unwrap()
    };
    let scale = 0.75;
    let run = |kernel| {
        let options = BackwardOptions { dropout, kernel };
        gpu_pass::<bf16>(
            &gpu.stream,
            &dims,
            [&x, &g, &a],
            (f64::NAN, true),
            scale,
            options,
        )
    };
    let got = run(BackwardKernel::Fused);
    let y0 = vec![0.0; tokens * d_out];
    let want = reference_pass(&dims, [&x, &g, &a], scale as f64, (&y0, 0.0), dropout);
    assert_close::<bf16>("Q", &name, &got.q, &want.q);
    assert_close::<bf16>("dX", &name, &got.dx, &want.dx);
    assert_close::<bf16>("dA", &name, &got.da, &want.da);
    let bits = |v: &[f64]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&got.da),
        bits(&run(BackwardKernel::Fused).da),
        "{name}: dA differs between runs"
    );
    // The reduce-scatter exchange: the same sums, the same bits.
    let scattered = run(BackwardKernel::FusedScatter);
    assert_eq!(
        bits(&got.da),
        bits(&scattered.da),
        "{name}: dA differs with the reduce-scatter exchange"
    );
    assert_eq!(
        bits(&got.dx),
        bits(&scattered.dx),
        "{name}: dX differs with the reduce-scatter exchange"
    );
}

/// 16 ranges (4096+ tokens) over 3 clusters, both buckets, non-square both
/// ways; and a short last range.
#[test]
fn fused_backward_walks_more_ranges_than_resident_clusters() {
    let Some((gpu, kernels)) = gpu_with_cap() else {
        return;
    };
    assert_eq!(
        kernels.max_active_clusters("backward_fused_sm90_bf16_r16"),
        Some(CAP)
    );
    case(&gpu, &kernels, (4100, 512, 384, 16), 0.0);
    case(&gpu, &kernels, (5000, 300, 1000, 32), 0.0);
    case(&gpu, &kernels, (1100, 1024, 1024, 8), 0.3);
}

/// The same for compute-sanitizer (scripts/gpu/run.sh runs this binary's
/// sanitizer_* tests): a few ranges over the 3 clusters.
#[test]
fn sanitizer_fused_backward_ranges_over_few_clusters() {
    let Some((gpu, kernels)) = gpu_with_cap() else {
        return;
    };
    case(&gpu, &kernels, (1300, 200, 136, 24), 0.0);
    case(&gpu, &kernels, (1100, 72, 64, 16), 0.5);
}
