//! A device that grants less shared memory per block than even a kernel's
//! small configuration needs refuses that kernel with a typed error before
//! any output is touched — the layer's cuBLAS output included, since the
//! layer looks its kernels up before its frozen GEMM. Forced on any GPU by
//! the registry's test knob (`SINGLORA_MAX_SMEM_PER_BLOCK`, read when a
//! context's module loads, hence a binary of its own) at 64 KiB.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::bf16;
use singlora::runtime::registry::SMEM_LIMIT_ENV;
use singlora::{Error, Kernels, SingLoraLinear};

// At 64 KiB the rank-32 bucket's forward fits (62720 bytes) and its dA partial
// does not (68864): both refusal paths, forward and backward, run.
const LIMIT: u32 = 64 * 1024;

fn bucket(rank: usize) -> usize {
    singlora::RANK_BUCKETS
        .into_iter()
        .find(|&b| rank <= b)
        .unwrap()
}

/// A refusal for shared memory, and the output still poisoned (`what`
/// says which was written otherwise).
fn assert_refused_untouched(gpu: &Gpu, e: &Error, out: &CudaSlice<bf16>, what: &str) {
    assert!(matches!(e, Error::SharedMemoryTooSmall { .. }), "{e}");
    assert!(
        download(gpu, out).iter().all(|v| v.is_nan()),
        "{what} (cuBLAS ran first?)"
    );
}

#[test]
fn kernels_over_the_limit_are_refused_and_touch_no_output() {
    std::env::set_var(SMEM_LIMIT_ENV, LIMIT.to_string());
    let Some(gpu) = gpu() else { return };
    let kernels = Kernels::get(&gpu.ctx).unwrap();
    // The smallest configuration of a family for a bucket.
    let needs = |family: &str, rank: usize| {
        let b = bucket(rank);
        [
            format!("{family}_bf16_r{b}"),
            format!("{family}_small_bf16_r{b}"),
        ]
        .iter()
        .filter_map(|n| kernels.shared_memory(n))
        .min()
        .unwrap()
    };
    let (tokens, d) = (80, 256);
    let mut refusals = 0;
    for rank in [16, 64, 128, 256] {
        let fwd_fits = needs("forward", rank) <= LIMIT;
        let bwd_fits = fwd_fits && needs("backward_da_partial", rank) <= LIMIT;
        let mut r = rng(rank as u64);
        let w0 = upload::<bf16>(&gpu, &randn(&mut r, d * d, 0.05));
        let mut layer = SingLoraLinear::<bf16>::new(&gpu.stream, d, d, rank, 8.0, 0, 3)
            .unwrap()
            .with_frozen(w0)
            .unwrap();
        let x = upload::<bf16>(&gpu, &randn(&mut r, tokens * d, 1.0));
        let mut y = poisoned::<bf16>(&gpu, tokens * d);
        let case = format!("rank {rank}");
        match layer.forward(tokens, &x, &mut y) {
            Ok(ctx) => {
                assert!(fwd_fits, "{case}: the forward ran past the limit");
                assert!(
                    download(&gpu, &y).iter().all(|v| v.is_finite()),
                    "{case}: y"
                );
                let g = upload::<bf16>(&gpu, &randn(&mut r, tokens * d, 1.0));
                let mut dx = poisoned::<bf16>(&gpu, tokens * d);
                let grad_before = gpu.stream.clone_dtoh(layer.grad()).unwrap();
                match layer.backward(&ctx, &x, &g, Some(&mut dx), false) {
                    Ok(()) => assert!(bwd_fits, "{case}: the backward ran past the limit"),
                    Err(e) => {
                        assert!(!bwd_fits, "{case}: backward refused: {e}");
                        let what = format!("{case}: a refused backward wrote dx");
                        assert_refused_untouched(&gpu, &e, &dx, &what);
                        let grad_after = gpu.stream.clone_dtoh(layer.grad()).unwrap();
                        assert_eq!(grad_before, grad_after, "{case}: dA written");
                        refusals += 1;
                    }
                }
            }
            Err(e) => {
                assert!(!fwd_fits, "{case}: forward refused: {e}");
                let what = format!("{case}: a refused forward wrote y");
                assert_refused_untouched(&gpu, &e, &y, &what);
                refusals += 1;
            }
        }
    }
    assert!(
        refusals > 0,
        "no kernel exceeded {LIMIT} bytes: nothing was tested"
    );
}
