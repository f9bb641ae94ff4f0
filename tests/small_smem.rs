//! The configurations for devices that grant 99 KiB of shared memory per
//! block (sm_86, sm_89: RTX 3090/4090, L40), run on any GPU by the
//! registry's test knob (`SINGLORA_MAX_SMEM_PER_BLOCK`, read when a context's
//! module loads, hence a binary of its own): every rank bucket, every
//! element type, forward and backward, against the f64 reference at the
//! design page's bars, with outputs poisoned first. Where the regular kernel
//! needs more than the limit, the call can only have run the small
//! configuration (the regular one is refused there: tests/tiny_smem.rs).

mod common;

use common::*;
use half::{bf16, f16};
use singlora::runtime::registry::SMEM_LIMIT_ENV;
use singlora::{DType, Dims, Dropout, Kernels};

/// What sm_86 and sm_89 grant per block.
const LIMIT: u32 = singlora::params::SINGLORA_SMALL_SMEM_BYTES;

fn gpu_with_limit() -> Option<Gpu> {
    std::env::set_var(SMEM_LIMIT_ENV, LIMIT.to_string());
    gpu()
}

fn bucket(rank: usize) -> usize {
    singlora::RANK_BUCKETS
        .into_iter()
        .find(|&b| rank <= b)
        .unwrap()
}

fn case<T: DType>(gpu: &Gpu, rank: usize, seed: u64, dropout: Dropout) -> bool {
    let (tokens, d_in, d_out) = (150, 200, 136);
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    let name = format!("{} rank {rank} dropout {}", T::NAME, dropout.p());
    let mut r = rng(seed);
    let x = quantize::<T>(&randn(&mut r, tokens * d_in, 1.0));
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (rank as f64).sqrt()));
    let g = quantize::<T>(&randn(&mut r, tokens * d_out, 1.0));
    let scale = 0.75;
    // Forward with beta = 0 (Y is the adapter term itself), backward with
    // dx_beta = da_beta = 0 (dX and dA are the gradient terms), outputs
    // poisoned first.
    let xga = [&x[..], &g, &a];
    let got = gpu_pass::<T>(&gpu.stream, &dims, xga, (f64::NAN, true), scale, dropout);
    let y0 = vec![0.0; tokens * d_out];
    let want = reference_pass(&dims, [&x, &g, &a], scale as f64, (&y0, 0.0), dropout);
    assert_close::<T>("y", &name, &got.y, &want.y);
    assert_close::<T>("S", &name, &got.s, &want.s);
    assert_close::<T>("dX", &name, &got.dx, &want.dx);
    assert_close::<T>("dA", &name, &got.da, &want.da);

    // Did this rank need a small configuration?
    let k = Kernels::get(&gpu.ctx).unwrap();
    let needs = |f: &str| {
        k.shared_memory(&format!("{f}_{}_r{}", T::NAME, bucket(rank)))
            .unwrap()
    };
    needs("forward") > LIMIT || needs("backward_da_partial") > LIMIT
}

#[test]
fn every_rank_runs_within_99_kib_and_matches_the_reference() {
    let Some(gpu) = gpu_with_limit() else { return };
    let mut small = 0;
    for (i, rank) in [16, 48, 100, 200].into_iter().enumerate() {
        small += case::<f32>(&gpu, rank, 10 + i as u64, Dropout::NONE) as usize;
        small += case::<f16>(&gpu, rank, 20 + i as u64, Dropout::NONE) as usize;
        small += case::<bf16>(&gpu, rank, 30 + i as u64, Dropout::NONE) as usize;
    }
    // Ranks 100 and 200 (buckets 128 and 256) need the small dA kernel in
    // every element type: the small configurations really ran.
    assert!(
        small >= 6,
        "only {small} cases needed a small configuration"
    );
}

/// The small configurations honour adapter dropout (the buckets that need
/// them: ranks 100 and 200).
#[test]
fn small_configurations_honour_dropout() {
    let Some(gpu) = gpu_with_limit() else { return };
    for (i, rank) in [100, 200].into_iter().enumerate() {
        let d = singlora::Dropout::new(0.2, 17, i as u64).unwrap();
        assert!(case::<f32>(&gpu, rank, 40 + i as u64, d));
        assert!(case::<f16>(&gpu, rank, 50 + i as u64, d));
        assert!(case::<bf16>(&gpu, rank, 60 + i as u64, d));
    }
}
