//! Size limits on the GPU: tokens × d above 2³¹ elements (forward and
//! backward, bf16 and f32), a merge of a 16384 × 16384 weight (and of one
//! whose row stride puts its last rows past element 2³¹), and a backward
//! whose workspace exceeds 4 GiB (Q and S past element 2³¹, the dA partials
//! past byte 2³⁴) — each served and spot-checked, never wrapped; the
//! refusals of sizes that do not fit 64 bits (no GPU needed).
//!
//! Inputs are periodic in the row index with a period of 61 rows (odd and
//! prime, so no power-of-two wrap of a row or byte offset lands on a row
//! with the same data): one period is uploaded and doubled on the device,
//! and the f64 reference runs on that period alone. Checked rows: the
//! first, the last, both sides of every 32-bit boundary (element 2³¹, byte
//! 2³¹ and 2³²) and of a 64-row block, and a sample across the matrix;
//! every element of Y is checked finite on the device (an MSE of Y against
//! itself is NaN exactly when some element is not finite: they start NaN).
//! dA is checked whole: with periodic rows it is the reference of one
//! period with each row weighted by how often it occurs.
//!
//! The tests need up to ~30 GiB of device memory each and run one at a time
//! (a lock); a device with less free memory skips them with a message.

use std::sync::Mutex;

use crate::common::*;
use cudarc::driver::CudaSlice;
use half::bf16;
use singlora::ffi::{
    singlora_backward_workspace_size, SINGLORA_ERROR_INVALID_ARGUMENT, SINGLORA_OK,
};
use singlora::{
    backward_workspace_len, fill_bits, merge, mse, mse_loss, DType, Dims, Dropout, Error,
    MSE_PARTIALS,
};

/// Rows per period of the inputs.
const P: usize = 61;
const SCALE: f32 = 0.75;
const GIB: usize = 1 << 30;

/// One big test at a time: together they would not fit a 40 GiB budget.
static BIG: Mutex<()> = Mutex::new(());

/// Runs `f` alone (the lock) on a GPU with at least `need` bytes free, then
/// waits for the freed memory to return to the device.
fn big(what: &str, need: usize, f: impl FnOnce(&Gpu)) {
    let _alone = BIG.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu() else { return };
    gpu.ctx.synchronize().unwrap();
    let (free, total) = gpu.ctx.mem_get_info().unwrap();
    if free < need + 2 * GIB {
        println!(
            "{what}: skipped: needs {} GiB of device memory, {} of {} GiB free",
            need.div_ceil(GIB) + 2,
            free / GIB,
            total / GIB
        );
        return;
    }
    f(&gpu);
    gpu.ctx.synchronize().unwrap();
}

/// A `rows × ld` device matrix (`ld ≥ cols`, every element initialised)
/// whose row t is row `t % P` of `period` (`P × ld`): one period uploaded,
/// then doubled on the device.
fn periodic<T: DType>(gpu: &Gpu, period: &[f64], ld: usize, rows: usize) -> CudaSlice<T> {
    assert_eq!(period.len(), P * ld);
    let n = rows * ld;
    // SAFETY of the allocation: every element is written below.
    let mut buf = unsafe { gpu.stream.alloc::<T>(n) }.unwrap();
    let first = P.min(rows) * ld;
    let host: Vec<T> = period[..first].iter().map(|&v| T::from_f64(v)).collect();
    gpu.stream
        .memcpy_htod(&host, &mut buf.slice_mut(0..first))
        .unwrap();
    // `filled` stays a multiple of P rows until the last, partial copy.
    let mut filled = first;
    while filled < n {
        let len = filled.min(n - filled);
        let (src, mut dst) = buf.split_at_mut(filled);
        gpu.stream
            .memcpy_dtod(&src.slice(0..len), &mut dst.slice_mut(0..len))
            .unwrap();
        filled += len;
    }
    buf
}

/// A device buffer of `n` NaNs, without the zeroing pass.
fn nans<T: DType>(gpu: &Gpu, n: usize) -> CudaSlice<T> {
    // SAFETY of the allocation: fill_bits writes every element.
    let mut d = unsafe { gpu.stream.alloc::<T>(n) }.unwrap();
    fill_bits(&gpu.stream, &mut d, T::NAN_BITS).unwrap();
    d
}

/// The backward of dense rows into NaN-poisoned dX and dA (betas 0), from
/// the saved `s` where given, with workspace `ws`: (dX, dA).
fn dense_backward<T: DType>(
    gpu: &Gpu,
    dims: &Dims,
    xga: [&CudaSlice<T>; 3],
    s: Option<&CudaSlice<f32>>,
    ws: &mut CudaSlice<f32>,
) -> (CudaSlice<T>, CudaSlice<f32>) {
    let mut dx = nans::<T>(gpu, dims.tokens() * dims.d_in());
    let mut da = nans::<f32>(gpu, dims.a_len());
    let outs = (&mut dx, &mut da, ws);
    backward_dense(&gpu.stream, dims, xga, s, SCALE, outs, Dropout::NONE).unwrap();
    (dx, da)
}

/// Row `t` (`cols` elements at `t·ld`) of a device matrix.
fn row<T: DType>(gpu: &Gpu, m: &CudaSlice<T>, t: usize, cols: usize, ld: usize) -> Vec<f64> {
    let host: Vec<T> = gpu
        .stream
        .clone_dtoh(&m.slice(t * ld..t * ld + cols))
        .unwrap();
    host.into_iter().map(|v| v.to_f64()).collect()
}

/// Row `p` of a row-major matrix of `cols` columns.
fn period_row(m: &[f64], p: usize, cols: usize) -> &[f64] {
    &m[p * cols..(p + 1) * cols]
}

/// The rows to check in a matrix of `rows` rows of `row_bytes` bytes and
/// `row_elems` elements: first and last ones, both sides of element 2³¹ and
/// of bytes 2³¹ and 2³², 64-row block edges, and a sample 9973 rows apart.
fn spot_rows(rows: usize, row_elems: usize, row_bytes: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 63, 64, 65, P - 1, P, P + 1];
    for boundary in [1usize << 31, 1 << 32] {
        for unit in [row_elems, row_bytes] {
            let b = boundary / unit;
            v.extend([b.saturating_sub(1), b, b + 1]);
        }
    }
    v.extend((0..rows).step_by(9973));
    v.extend([rows - 65, rows - 64, rows - 2, rows - 1]);
    v.retain(|&t| t < rows);
    v.sort_unstable();
    v.dedup();
    v
}

/// Asserts every element of a device matrix is finite: it computes the MSE
/// of the matrix against itself, which is 0 when every element is finite
/// and NaN otherwise.
fn assert_finite_everywhere<T: DType>(
    gpu: &Gpu,
    what: &str,
    m: &CudaSlice<T>,
    rows: usize,
    cols: usize,
) {
    let mut partial = gpu.stream.alloc_zeros::<f32>(MSE_PARTIALS).unwrap();
    mse(
        &gpu.stream,
        rows,
        cols,
        m,
        cols,
        m,
        cols,
        None,
        1.0,
        &mut partial,
    )
    .unwrap();
    let host = gpu.stream.clone_dtoh(&partial).unwrap();
    let loss = mse_loss(&host, rows, cols);
    assert!(
        loss == 0.0,
        "{what}: some element of the {rows} × {cols} matrix is not finite (self-MSE {loss})"
    );
}

/// A random period of `P` rows of `cols` (quantized to T), and A.
fn inputs<T: DType>(seed: u64, dims: &Dims) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut r = rng(seed);
    let x = quantize::<T>(&randn(&mut r, P * dims.d_in(), 1.0));
    let g = quantize::<T>(&randn(&mut r, P * dims.d_out(), 1.0));
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
    (x, g, a)
}

/// How many of `tokens` rows are copies of period row `p`.
fn copies(tokens: usize, p: usize) -> f64 {
    (tokens / P + usize::from(p < tokens % P)) as f64
}

/// The reference of one period: Y (beta 0), S, Q, dX (beta 0), and dA over
/// all `tokens` rows (period rows weighted by their copies).
fn period_reference(dims: &Dims, x: &[f64], g: &[f64], a: &[f64]) -> Pass {
    let (d_in, d_out, rank) = (dims.d_in(), dims.d_out(), dims.rank());
    let pd = Dims::new(P, d_in, d_out, rank).unwrap();
    let (y, s) = reference_forward(&pd, [x, a], SCALE as f64, Dropout::NONE);
    // The swapped shape's forward of G: its shrink is Q, its output dX.
    let (dx, q) = reference_forward(&swapped(&pd), [g, a], SCALE as f64, Dropout::NONE);
    let mut da = vec![0.0; dims.a_len()];
    for p in 0..P {
        let n = copies(dims.tokens(), p) * SCALE as f64;
        let (sp, qp) = (period_row(&s, p, rank), period_row(&q, p, rank));
        for (j, &gv) in period_row(g, p, d_out).iter().enumerate() {
            for k in 0..rank {
                da[j * rank + k] += n * gv * sp[k];
            }
        }
        for (i, &xv) in period_row(x, p, d_in).iter().enumerate() {
            for k in 0..rank {
                da[i * rank + k] += n * xv * qp[k];
            }
        }
    }
    Pass { y, s, q, dx, da }
}

/// Spot rows of a device output against the period reference, each at T's
/// bar (relative L2 of the row; NaN never passes).
#[allow(clippy::too_many_arguments)]
fn check_rows<T: DType, U: DType>(
    gpu: &Gpu,
    what: &str,
    m: &CudaSlice<U>,
    rows: usize,
    cols: usize,
    want: &[f64],
    bytes_per_row: usize,
) {
    for t in spot_rows(rows, cols, bytes_per_row) {
        let got = row(gpu, m, t, cols, cols);
        assert_close::<T>(
            what,
            &format!("row {t} of {rows} (copy of period row {})", t % P),
            &got,
            period_row(want, t % P, cols),
        );
    }
}

/// Forward and backward over `tokens` rows of periodic inputs, every output
/// spot-checked, Y checked finite everywhere, dA whole.
fn forward_backward<T: DType>(gpu: &Gpu, dims: &Dims, seed: u64, with_backward: bool) {
    let (tokens, d_in, d_out, rank) = (dims.tokens(), dims.d_in(), dims.d_out(), dims.rank());
    let elem = std::mem::size_of::<T>();
    assert!(tokens * d_in > 1 << 31 && tokens * d_out > 1 << 31);
    let (xp, gp, ap) = inputs::<T>(seed, dims);
    let want = period_reference(dims, &xp, &gp, &ap);
    let x = periodic::<T>(gpu, &xp, d_in, tokens);
    let a = upload::<T>(gpu, &ap);
    let mut s = nans::<f32>(gpu, dims.s_len());
    {
        let mut y = nans::<T>(gpu, tokens * d_out);
        forward_dense(
            &gpu.stream,
            dims,
            [&x, &a],
            &mut y,
            Some(&mut s),
            (SCALE, 0.0),
            Dropout::NONE,
        )
        .unwrap();
        assert_finite_everywhere(gpu, "Y", &y, tokens, d_out);
        check_rows::<T, T>(gpu, "Y", &y, tokens, d_out, &want.y, d_out * elem);
    }
    check_rows::<T, f32>(gpu, "S", &s, tokens, rank, &want.s, d_in * elem);
    if !with_backward {
        return;
    }
    let g = periodic::<T>(gpu, &gp, d_out, tokens);
    let mut ws = nans::<f32>(gpu, backward_workspace_len(dims, true).unwrap());
    let (dx, da) = dense_backward(gpu, dims, [&x, &g, &a], Some(&s), &mut ws);
    assert_finite_everywhere(gpu, "dX", &dx, tokens, d_in);
    check_rows::<T, T>(gpu, "dX", &dx, tokens, d_in, &want.dx, d_in * elem);
    let q = ws.slice(0..dims.s_len());
    for t in spot_rows(tokens, rank, d_out * elem) {
        let got: Vec<f64> = gpu
            .stream
            .clone_dtoh(&q.slice(t * rank..(t + 1) * rank))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        assert_close::<T>(
            "Q",
            &format!("row {t}"),
            &got,
            period_row(&want.q, t % P, rank),
        );
    }
    assert_close::<T>(
        "dA",
        &format!("{tokens} tokens"),
        &download(gpu, &da),
        &want.da,
    );
}

/// bf16, 600001 tokens × 4096 (2.46·10⁹ elements per matrix, 4.9 GB):
/// forward and backward; X, Y, G and dX rows past element 2³¹.
#[test]
fn forward_backward_past_2_31_elements_bf16() {
    let dims = Dims::new(600_001, 4096, 4096, 16).unwrap();
    big("bf16 600001 × 4096", 4 * 600_001 * 4096 * 2, |gpu| {
        forward_backward::<bf16>(gpu, &dims, 1, true)
    });
}

/// f32, 2098153 tokens × 1024 (2.15·10⁹ elements, 8.6 GB per matrix):
/// forward, rows past element 2³¹ and byte 2³³.
#[test]
fn forward_past_2_31_elements_f32() {
    let dims = Dims::new((1 << 31) / 1024 + 1001, 1024, 1024, 16).unwrap();
    let need = 2 * dims.tokens() * 1024 * 4;
    big("f32 2098153 × 1024", need, |gpu| {
        forward_backward::<f32>(gpu, &dims, 2, false)
    });
}

/// A backward whose workspace is 17 GB (> 4 GiB): 2²³ + 37 tokens,
/// d = 256, rank 256, S recomputed, so Q and S each hold 2.1·10⁹ f32 (rows
/// past element 2³¹) and the dA partials start past byte 2³⁴. Served; Q,
/// dX and dA checked. The reported size is the formula's, not wrapped.
#[test]
fn backward_with_a_workspace_over_4_gib() {
    let tokens = (1usize << 23) + 37;
    let dims = Dims::new(tokens, 256, 256, 256).unwrap();
    let ws_len = backward_workspace_len(&dims, false).unwrap();
    let tr = (tokens * 256) as u128;
    assert!(
        ws_len as u128 >= 2 * tr && ws_len as u128 <= 2 * tr + 128 + 2 * 256 * 256 * 256,
        "workspace {ws_len} f32 for Q and S of {tr} each"
    );
    assert!(ws_len * 4 > 4 * GIB);
    let need = ws_len * 4 + 3 * tokens * 256 * 2;
    big("backward, 17 GB workspace", need, |gpu| {
        let (xp, gp, ap) = inputs::<bf16>(3, &dims);
        let want = period_reference(&dims, &xp, &gp, &ap);
        let x = periodic::<bf16>(gpu, &xp, 256, tokens);
        let g = periodic::<bf16>(gpu, &gp, 256, tokens);
        let a = upload::<bf16>(gpu, &ap);
        let mut ws = nans::<f32>(gpu, ws_len);
        let (dx, da) = dense_backward(gpu, &dims, [&x, &g, &a], None, &mut ws);
        assert_finite_everywhere(gpu, "dX", &dx, tokens, 256);
        check_rows::<bf16, bf16>(gpu, "dX", &dx, tokens, 256, &want.dx, 512);
        // Q: rows of 1 KiB; element 2³¹ at row 2²³, byte 2³² at row 2²².
        check_rows::<bf16, f32>(gpu, "Q", &ws, tokens, 256, &want.q, 1024);
        assert_close::<bf16>("dA", "17 GB workspace", &download(gpu, &da), &want.da);
    });
}

/// Merge into a `d_out × d_in` bf16 weight with row stride `ld_w` whose
/// rows are periodic; spot rows against the reference (each element within
/// one bf16 ulp plus the f32 product's rounding), the gaps untouched.
fn merge_case(gpu: &Gpu, d: usize, ld_w: usize, seed: u64) {
    let dims = Dims::new(0, d, d, 16).unwrap();
    let mut r = rng(seed);
    let wp = quantize::<bf16>(&randn(&mut r, P * ld_w, 0.05));
    let ap = quantize::<bf16>(&randn(&mut r, dims.a_len(), 0.03));
    let mut w = periodic::<bf16>(gpu, &wp, ld_w, d);
    let a = upload::<bf16>(gpu, &ap);
    let scale = 2.0f32;
    merge(&gpu.stream, &dims, &mut w, ld_w, &a, scale).unwrap();
    let rank = 16;
    for o in spot_rows(d, ld_w, ld_w * 2) {
        let cols = ld_w.min(d + 64);
        let got = row(gpu, &w, o, cols, ld_w);
        let w0 = &period_row(&wp, o % P, ld_w)[..cols];
        let ao = &ap[o * rank..(o + 1) * rank];
        let want: Vec<f64> = (0..d)
            .map(|i| {
                let dot: f64 = (0..rank).map(|k| ao[k] * ap[i * rank + k]).sum();
                w0[i] + scale as f64 * dot
            })
            .collect();
        let mag: Vec<f64> = (0..d)
            .map(|i| {
                w0[i].abs()
                    + scale as f64
                        * (0..rank)
                            .map(|k| (ao[k] * ap[i * rank + k]).abs())
                            .sum::<f64>()
            })
            .collect();
        assert_each_within(
            &format!("W row {o} of {d} (ld {ld_w})"),
            &got[..d],
            &want,
            |i| ulp::<bf16>(want[i].abs()) + mag[i] * 1e-6,
        );
        assert!(
            got[d..]
                .iter()
                .zip(&w0[d..])
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "W row {o}: the gap after the row was written"
        );
    }
}

/// A 16384 × 16384 bf16 weight (2²⁸ elements, 512 MiB), dense.
#[test]
fn merge_16384_squared() {
    big("merge 16384²", 16384 * 16384 * 2, |gpu| {
        merge_case(gpu, 16384, 16384, 4)
    });
}

/// 16384 × 16384 in rows of 131200: the last 16 rows start past element
/// 2³¹ (4.3 GB of W).
#[test]
fn merge_16384_squared_strided_past_2_31() {
    let ld_w = 131_200;
    assert!(16383 * ld_w + 16384 > 1 << 31 && 16367 * ld_w < 1 << 31);
    big("merge 16384² strided", 16384 * ld_w * 2, |gpu| {
        merge_case(gpu, 16384, ld_w, 5)
    });
}

// ---- refusals: no GPU needed -------------------------------------------------

/// Sizes past 64 bits are refused with typed errors, never wrapped: the
/// workspace of 3·2⁶² tokens × rank elements (×2 without a saved S), its
/// byte count through the C ABI, and dims whose products overflow.
#[test]
fn sizes_past_64_bits_are_refused() {
    let tokens = 1usize << 62;
    let dims = Dims::new(tokens, 1, 1, 3).unwrap();
    let e = backward_workspace_len(&dims, false).unwrap_err();
    assert!(matches!(e, Error::Overflow { .. }), "{e}");
    // With a saved S the element count fits, its bytes do not.
    let len = backward_workspace_len(&dims, true).unwrap();
    assert!(len as u128 >= 3 * (tokens as u128));
    let mut bytes = 0u64;
    // SAFETY: `bytes` is a writable u64.
    let st = unsafe { singlora_backward_workspace_size(tokens as i64, 1, 1, 3, 1, &mut bytes) };
    assert_eq!(st, SINGLORA_ERROR_INVALID_ARGUMENT);
    assert_eq!(bytes, 0, "a refused query writes nothing");
    // Just under: 2⁶¹ tokens of rank 1 with a saved S: 2⁶¹ + partials, ×4 fits.
    let st = unsafe { singlora_backward_workspace_size(1 << 61, 1, 1, 1, 1, &mut bytes) };
    assert_eq!(st, SINGLORA_OK);
    assert!(bytes as u128 >= 4 * (1u128 << 61));
    for (t, d, r) in [(1usize << 62, 4usize, 1usize), (1 << 60, 1, 256)] {
        assert!(
            matches!(Dims::new(t, d, d, r), Err(Error::Overflow { .. })),
            "{t} × {d}, rank {r}"
        );
    }
}

/// The workspace sizes around the 32-bit boundaries are the formula's,
/// computed without wrapping (in u128 here): Q and S of tokens × rank, the
/// partials of 2 × splits × D × rank_pad.
#[test]
fn workspace_sizes_around_32_bit_boundaries_do_not_wrap() {
    for (tokens, d, rank) in [
        ((1usize << 23) + 37, 256usize, 256usize),
        ((1 << 24) + 1, 128, 128),
        ((1 << 26) + 3, 4096, 64),
        ((1 << 31) + 5, 64, 16),
        ((1 << 33) + 7, 16, 1),
    ] {
        let dims = Dims::new(tokens, d, d, rank).unwrap();
        let tr = ((tokens * rank) as u128).next_multiple_of(64);
        let rank_pad = rank.next_multiple_of(16) as u128;
        for saved_s in [true, false] {
            let len = backward_workspace_len(&dims, saved_s).unwrap() as u128;
            let parts = if saved_s { 1 } else { 2 };
            let partials = len - parts * tr;
            assert!(
                len >= parts * tr && partials % (2 * d as u128 * rank_pad) == 0,
                "{tokens} × {d}, rank {rank}, saved_s {saved_s}: {len}"
            );
            let splits = partials / (2 * d as u128 * rank_pad);
            assert!(
                (1..=256).contains(&splits),
                "{tokens} × {d}, rank {rank}: {splits} splits"
            );
        }
    }
}

/// The periodic bookkeeping (no GPU): the reference of one period, rows
/// weighted by their copies, is the reference of the whole periodic matrix
/// (200 tokens: three periods and 17 rows); the spot rows are in range,
/// sorted, and hold both ends and both sides of each 32-bit boundary.
#[test]
fn period_reference_is_the_whole_matrix_reference() {
    let dims = Dims::new(200, 40, 56, 8).unwrap();
    let (tokens, d_in, d_out, rank) = (200, 40, 56, 8);
    let (xp, gp, ap) = inputs::<f32>(9, &dims);
    let want = period_reference(&dims, &xp, &gp, &ap);
    let whole = |m: &[f64], cols: usize| -> Vec<f64> {
        (0..tokens)
            .flat_map(|t| period_row(m, t % P, cols).to_vec())
            .collect()
    };
    let (x, g) = (whole(&xp, d_in), whole(&gp, d_out));
    let zeros = vec![0.0; tokens * d_out];
    let whole_ref = reference_pass(
        &dims,
        [&x, &g, &ap],
        SCALE as f64,
        (&zeros, 0.0),
        Dropout::NONE,
    );
    let same = |what: &str, got: &[f64], want: &[f64]| {
        let err = rel_l2(got, want);
        assert!(err < 1e-12, "{what}: {err:e}");
    };
    same("Y", &whole_ref.y, &whole(&want.y, d_out));
    same("S", &whole_ref.s, &whole(&want.s, rank));
    same("dX", &whole_ref.dx, &whole(&want.dx, d_in));
    same("dA", &whole_ref.da, &want.da);
    same("Q", &whole_ref.q, &whole(&want.q, rank));

    let rows = (1usize << 23) + 37;
    let v = spot_rows(rows, 256, 1024);
    assert!(v.windows(2).all(|w| w[0] < w[1]) && *v.last().unwrap() == rows - 1 && v[0] == 0);
    for b in [1usize << 21, 1 << 22, 1 << 23] {
        assert!(
            v.contains(&(b - 1)) && v.contains(&b) && v.contains(&(b + 1)),
            "{b}"
        );
    }
}
