//! merge / unmerge on the GPU against reference::merge, the round trip, the
//! merged layer's plain product against the unmerged forward, and the
//! argument checks (which run everywhere).

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use singlora::{
    check_merge, merge, merge_with, reference, unmerge, DType, Dims, Error, MergeKernel,
};

/// (d_in, d_out, rank, extra columns per row of W)
const CASES: &[(usize, usize, usize, usize)] = &[
    (256, 256, 16, 0),
    (96, 160, 8, 0),
    (160, 96, 24, 0),
    (200, 72, 1, 3),
    (1000, 1003, 33, 5),
    (130, 300, 256, 0),
    (40, 11, 7, 1),
    (3424, 64, 64, 0),
    // 16-byte rows with a d_in that is not a multiple of 8: vector accesses
    // up to column 96, pairs for the tail.
    (100, 50, 24, 4),
];
const SCALE: f32 = 0.375;
const SENTINEL: f64 = 1234.5;

/// Merges, checks every element against the exact result (one rounding to T
/// plus the f32 accumulation bound), the gaps of a strided W untouched, then
/// unmerges and checks the round trip and the merged product.
fn run_case<T: DType>(gpu: &Gpu, case: (usize, usize, usize, usize), seed: u64) {
    for kernel in [MergeKernel::Fma, MergeKernel::TensorCore] {
        run_case_with::<T>(gpu, case, seed, kernel);
    }
}

/// One case with the product formed by `kernel`. The accumulation bound per
/// element: f32 FMAs, one rounding per rank term; tensor cores, the model of
/// tests/common/bounds.rs (2^-18 per 16-deep mma step, which allows the
/// hardware's truncating alignment with margin), plus the final roundings.
fn run_case_with<T: DType>(
    gpu: &Gpu,
    (d_in, d_out, rank, pad): (usize, usize, usize, usize),
    seed: u64,
    kernel: MergeKernel,
) {
    let dims = Dims::new(0, d_in, d_out, rank).unwrap();
    let ld_w = d_in + pad;
    let name = format!(
        "{} d_in={d_in} d_out={d_out} rank={rank} ld_w={ld_w} {kernel:?}",
        T::NAME
    );
    let mut r = rng(seed);
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
    let w0 = quantize::<T>(&randn(&mut r, d_out * d_in, 0.05));
    // The gaps hold a sentinel exactly representable in T.
    let sentinel = T::from_f64(SENTINEL).to_f64();
    let w0_strided = restride(&w0, d_out, d_in, ld_w, sentinel);

    let a_dev = upload::<T>(gpu, &a);
    let mut w_dev = upload::<T>(gpu, &w0_strided);
    // Merges (or, with `undo`, unmerges) A into W in place.
    let fold = |w: &mut CudaSlice<T>, undo: bool| {
        merge_with(&gpu.stream, &dims, w, ld_w, &a_dev, SCALE, undo, kernel).unwrap()
    };
    fold(&mut w_dev, false);
    let w1_strided = download(gpu, &w_dev);
    for rr in 0..d_out {
        for c in d_in..ld_w.min(w1_strided.len() - rr * ld_w) {
            assert_eq!(
                w1_strided[rr * ld_w + c],
                sentinel,
                "{name}: gap ({rr}, {c}) written"
            );
        }
    }
    let w1 = unstride(&w1_strided, d_out, d_in, ld_w);

    // Exact merged weight, and Σ|a_out·a_in| for the accumulation bound.
    let mut exact = w0.clone();
    reference::merge(&dims, &mut exact, d_in, &a, SCALE as f64).unwrap();
    let mut magnitude = vec![0.0; d_out * d_in];
    let abs_a: Vec<f64> = a.iter().map(|v| v.abs()).collect();
    reference::merge(&dims, &mut magnitude, d_in, &abs_a, SCALE as f64).unwrap();
    let acc_eps = match kernel {
        MergeKernel::Fma => (rank as f64 + 2.0) * 2f64.powi(-24),
        MergeKernel::TensorCore => (rank.div_ceil(16) as f64 + 2.0) * 2f64.powi(-18),
    };
    assert_each_within(&format!("merged W ({name})"), &w1, &exact, |i| {
        ulp::<T>(exact[i]) + acc_eps * magnitude[i] + 1e-40
    });

    fold(&mut w_dev, true);
    let w2 = unstride(&download(gpu, &w_dev), d_out, d_in, ld_w);
    // W1 = round(W0 + d), W2 = round(W1 − d) with the same f32 d: each
    // rounding is at most half a unit of the larger magnitude.
    assert_each_within(&format!("merge then unmerge ({name})"), &w2, &w0, |i| {
        ulp::<T>(w0[i].abs().max(w1[i].abs()))
    });

    // The merged layer's plain product equals the unmerged forward.
    let tokens = 9;
    let x = quantize::<T>(&randn(&mut r, tokens * d_in, 1.0));
    let matmul = |w: &[f64]| -> Vec<f64> {
        let mut y = vec![0.0; tokens * d_out];
        for t in 0..tokens {
            for o in 0..d_out {
                y[t * d_out + o] = (0..d_in).map(|i| x[t * d_in + i] * w[o * d_in + i]).sum();
            }
        }
        y
    };
    let mut unmerged = matmul(&w0);
    let fdims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    reference::forward(
        &fdims,
        &x,
        &a,
        SCALE as f64,
        1.0,
        &mut unmerged,
        singlora::Dropout::NONE,
    )
    .unwrap();
    assert_close::<T>(
        "x·W_mergedᵀ vs unmerged forward",
        &name,
        &matmul(&w1),
        &unmerged,
    );
}

#[test]
fn merge_matches_reference_and_round_trips() {
    run_typed!(CASES, run_case: f32 => 100, f16 => 200, bf16 => 300);
}

#[test]
fn sanitizer_merge() {
    let Some(gpu) = gpu() else { return };
    run_case::<bf16>(&gpu, (100, 72, 24, 3), 7);
    run_case::<bf16>(&gpu, (100, 72, 24, 4), 9);
    run_case::<f32>(&gpu, (72, 100, 40, 0), 8);
}

#[test]
fn merge_is_bitwise_reproducible() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(0, 1000, 700, 48).unwrap();
    let mut r = rng(5);
    let a = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.03));
    let w0 = randn(&mut r, 700 * 1000, 0.05);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut w = upload::<bf16>(&gpu, &w0);
        merge(&gpu.stream, &dims, &mut w, 1000, &a, 2.0).unwrap();
        runs.push(download(&gpu, &w));
    }
    assert!(runs[0]
        .iter()
        .zip(&runs[1])
        .all(|(p, q)| p.to_bits() == q.to_bits()));
}

#[test]
fn refused_merge_leaves_w_untouched() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(0, 64, 32, 8).unwrap();
    let mut r = rng(9);
    let w0 = quantize::<f32>(&randn(&mut r, 32 * 64, 1.0));
    let mut w = upload::<f32>(&gpu, &w0);
    let short_a = upload::<f32>(&gpu, &randn(&mut r, dims.a_len() - 1, 1.0));
    let err = merge(&gpu.stream, &dims, &mut w, 64, &short_a, 1.0).unwrap_err();
    assert_eq!(argument_named(&err), "a");
    let a = upload::<f32>(&gpu, &randn(&mut r, dims.a_len(), 1.0));
    let err = unmerge(&gpu.stream, &dims, &mut w, 64, &a, f32::INFINITY).unwrap_err();
    assert_eq!(argument_named(&err), "scale");
    assert_eq!(download(&gpu, &w), w0);
}

/// A weight row of i32::MAX columns: the last 16-byte access of the row
/// must stop at the row's end. With 32-bit column indices `col + 8` wrapped
/// and passed the bounds test, so the last vector access also wrote the
/// element one past the row (here the guard element of W's padded row).
/// 4 GiB for W and 4 GiB for A; the values come from the fill kernel (the
/// test is about where the kernel writes, not what).
#[test]
fn merge_of_a_row_of_i32_max_columns_stays_inside_the_row() {
    let Some(gpu) = gpu() else { return };
    let d_in = i32::MAX as usize;
    let ld_w = 1usize << 31; // 16-byte rows, so the vector path runs
    let dims = Dims::new(0, d_in, 1, 1).unwrap();
    let alloc = |n: usize, bits: u32| {
        let mut b = gpu
            .stream
            .alloc_zeros::<bf16>(n)
            .expect("8 GiB of device memory");
        singlora::fill_bits(&gpu.stream, &mut b, bits).unwrap();
        b
    };
    let mut w = alloc(ld_w, 0x3f80); // 1.0
    let a = alloc(dims.a_len(), 0x3f00); // 0.5
                                         // The guard: the one element of the row's padding.
    {
        let mut guard = w.slice_mut(d_in..);
        singlora::fill_bits(&gpu.stream, &mut guard, 0x4040).unwrap(); // 3.0
    }
    merge(&gpu.stream, &dims, &mut w, ld_w, &a, 1.0).unwrap();
    let tail: Vec<bf16> = gpu.stream.clone_dtoh(&w.slice(d_in - 15..)).unwrap();
    let tail: Vec<f64> = tail.into_iter().map(|v| v.to_f64()).collect();
    // 1 + 1·0.5·0.5 in every column of the row, the guard untouched.
    assert!(tail[..15].iter().all(|&v| v == 1.25), "row tail {tail:?}");
    assert_eq!(tail[15], 3.0, "the element past the row was written");
}

#[test]
fn check_merge_names_the_argument() {
    let dims = Dims::new(0, 64, 32, 8).unwrap();
    let w = 32 * 64;
    let a = dims.a_len();
    assert!(check_merge(&dims, w, 64, a, 1.0).is_ok());
    let named = |r: singlora::Result<()>| argument_named(&r.unwrap_err());
    assert_eq!(named(check_merge(&dims, w - 1, 64, a, 1.0)), "w");
    assert_eq!(named(check_merge(&dims, w, 63, a, 1.0)), "ld_w");
    assert_eq!(named(check_merge(&dims, w, 65, a, 1.0)), "w");
    assert_eq!(named(check_merge(&dims, w, 64, a - 1, 1.0)), "a");
    assert_eq!(named(check_merge(&dims, w, 64, a, f32::NAN)), "scale");
    // Invalid dims cannot reach a launcher: Dims exists only once checked.
    assert_eq!(named(Dims::new(0, 64, 32, 257).map(|_| ())), "rank");
    assert_eq!(named(Dims::new(0, 0, 32, 8).map(|_| ())), "d_in");
    // tokens plays no part in a merge.
    let any_tokens = dims.with_tokens(1 << 40).unwrap();
    assert!(check_merge(&any_tokens, w, 64, a, 1.0).is_ok());
    assert!(matches!(
        check_merge(&dims, usize::MAX, usize::MAX, a, 1.0),
        Err(Error::Overflow { .. }) | Err(Error::InvalidStride { .. })
    ));
}

#[test]
fn reference_merge_adds_delta_w_and_unmerge_removes_it() {
    let dims = Dims::new(0, 13, 9, 3).unwrap();
    let mut r = rng(11);
    let a = randn(&mut r, dims.a_len(), 1.0);
    let w0 = randn(&mut r, 9 * 16, 1.0); // row stride 16
    let mut w = w0.clone();
    reference::merge(&dims, &mut w, 16, &a, 0.5).unwrap();
    let dw = reference::delta_w(&dims, &a, 0.5);
    for o in 0..9 {
        for i in 0..16 {
            let want = if i < 13 {
                w0[o * 16 + i] + dw[o * 13 + i]
            } else {
                w0[o * 16 + i]
            };
            assert!((w[o * 16 + i] - want).abs() <= 1e-12, "({o}, {i})");
        }
    }
    reference::merge(&dims, &mut w, 16, &a, -0.5).unwrap();
    assert!(w.iter().zip(&w0).all(|(p, q)| (p - q).abs() <= 1e-12));
    let mut short = vec![0.0; 9 * 16 - 4];
    let err = reference::merge(&dims, &mut short, 16, &a, 1.0).unwrap_err();
    assert_eq!(argument_named(&err), "w");
}
