//! The compute-sanitizer grid (scripts/gpu/run.sh runs memcheck, racecheck,
//! initcheck and synccheck over every `sanitizer_*` test): tiny shapes that
//! still launch every kernel of the list for every element type and rank
//! bucket, on every path the launchers choose —
//!
//! * forward (`forward_<t>_r<b>`): regular (70 tokens: two row blocks, the
//!   last partial), few tokens with the output columns split over blocks
//!   (9 tokens at ranks above the decode buckets), shrink only (S
//!   recomputed in a backward without a saved S);
//! * the sm_90 decode kernels (`forward_decode_sm90_<t>_r<b>`, ranks ≤ 64 at
//!   ≤ 64 tokens, forward and the backward's dX launch);
//! * `backward_da_partial_<t>_r<b>` and `backward_da_reduce`, overwriting
//!   and accumulating;
//! * the opt-in fused backward (`backward_fused_sm90_bf16_r<b>`, bf16, on
//!   sm_90 only) in both of its buckets over the same layouts;
//! * the opt-in TMA forward (`forward_tma_sm90_<t>_r<b>`, f16/bf16, sm_90
//!   only) in both of its buckets, where the layout allows it;
//! * each with 16-byte aligned row strides whose rows end in a tail (the
//!   vector paths), dense rows, and row strides and base addresses off
//!   16-byte alignment (the element-wise paths); the scale by value, from a
//!   device f32 and through a device step counter;
//! * `merge_<t>` and `merge_mma_<t>` (the opt-in tensor-core merge), merge
//!   and unmerge, with 16-byte, paired and scalar accesses to W, one and
//!   several rank chunks; `adamw_<t>` with and without f32 master
//!   weights and with a device step (then `step_advance`); `mse_<t>` with a
//!   strided gradient and without one; `fill` (the NaN poisoning of every
//!   output, 2- and 4-byte).
//!
//! The `_small` configurations (for devices with 99 KiB of shared memory
//! per block) are launched only under the registry's knob, read when a
//! context's module loads; tests/small_smem.rs sets it in a process of its
//! own and runs every bucket, and the GPU run's sanitizer step runs that
//! binary whole.
//!
//! Every output is checked against the f64 reference (at the element type's
//! bar) and every cell around it is checked untouched, so a run under a
//! sanitizer also proves the results. `grid_covers_every_kernel` (no GPU)
//! holds the grid to the kernel list: a kernel added to kernels/params.h
//! fails it until the grid launches it too.

use crate::common::*;
use half::{bf16, f16};
use singlora::{
    adamw, adamw_device_step, advance_step, backward, backward_workspace_len, kernel_names, merge,
    merge_with, mse, mse_loss, reference, unmerge, AdamW, AdamWState, BackwardKernel,
    BackwardOptions, DType, Dims, Dropout, DxOut, ForwardKernel, Kernels, MergeKernel, Scale,
    MSE_PARTIALS, RANK_BUCKETS,
};

/// One rank per bucket (32, 64, 128, 256).
const RANKS: [usize; 4] = [16, 48, 100, 200];
/// One rank per bucket of the fused backward (16, 32), bf16.
const FUSED_RANKS: [(usize, usize); 2] = [(16, 16), (24, 32)];
/// One rank per bucket of the TMA forward (32, 64; multiples of 8), f16 and
/// bf16, run on the layouts it takes (`tma_layout`).
const TMA_RANKS: [(usize, usize); 2] = [(16, 32), (48, 64)];

/// A layout the TMA forward takes: more tokens than the decode kernels,
/// 16-byte aligned strides and bases (the ranks of TMA_RANKS are multiples
/// of 8).
fn tma_layout(c: &Case) -> bool {
    c.tokens > DECODE_MAX_TOKENS
        && c.ld == Ld::Aligned
        && c.off.x == 0
        && c.off.y == 0
        && c.off.a == 0
}
/// Tokens at and above which the forward takes the regular path (the
/// forward's row block); at most this many take the decode kernels on
/// sm_90 when the rank fits a decode bucket.
const DECODE_MAX_TOKENS: usize = 64;
const DECODE_MAX_RANK: usize = 64;

/// Where a launch takes its scale from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ScaleFrom {
    Value,
    DeviceF32,
    DeviceRamp,
}

/// Element offsets from a 16-byte aligned base.
#[derive(Clone, Copy, Debug)]
struct Off {
    x: usize,
    g: usize,
    a: usize,
    y: usize,
    dx: usize,
    s: usize,
    da: usize,
}

const NO_OFF: Off = Off {
    x: 0,
    g: 0,
    a: 0,
    y: 0,
    dx: 0,
    s: 0,
    da: 0,
};

/// One forward + backward of the grid.
#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    d_in: usize,
    d_out: usize,
    /// Row stride of X, Y, G and dX.
    ld: Ld,
    off: Off,
    /// Y's beta, dX's and dA's.
    beta: f32,
    saved_s: bool,
    scale: ScaleFrom,
}

/// The four layouts every (element type, rank) runs.
const LAYOUTS: [Case; 4] = [
    // Regular, 16-byte aligned strides, rows with a tail (75 and 44 are not
    // multiples of the vector width of 16-bit types; 75 not of f32's).
    Case {
        tokens: 70,
        d_in: 75,
        d_out: 44,
        ld: Ld::Aligned,
        off: NO_OFF,
        beta: 1.0,
        saved_s: true,
        scale: ScaleFrom::Value,
    },
    // Few tokens, dense rows that are 16-byte multiples: the vector paths;
    // S recomputed (the shrink-only launch); scale from a device f32.
    Case {
        tokens: 9,
        d_in: 48,
        d_out: 80,
        ld: Ld::Dense,
        off: NO_OFF,
        beta: 0.0,
        saved_s: false,
        scale: ScaleFrom::DeviceF32,
    },
    // Regular, strides and bases off 16-byte alignment: element-wise paths;
    // the scale through a device step counter.
    Case {
        tokens: 70,
        d_in: 44,
        d_out: 75,
        ld: Ld::Pad(3),
        off: Off {
            x: 1,
            g: 3,
            a: 1,
            y: 3,
            dx: 1,
            s: 1,
            da: 3,
        },
        beta: 0.0,
        saved_s: false,
        scale: ScaleFrom::DeviceRamp,
    },
    // Few tokens, element-wise paths, accumulating.
    Case {
        tokens: 9,
        d_in: 75,
        d_out: 44,
        ld: Ld::Pad(5),
        off: Off {
            x: 3,
            g: 1,
            a: 3,
            y: 1,
            dx: 3,
            s: 0,
            da: 1,
        },
        beta: 1.0,
        saved_s: true,
        scale: ScaleFrom::Value,
    },
];

const ALPHA_OVER_RANK: f64 = 1.5;
const WARMUP: u64 = 4;
/// The device step counter's value: u = 3/4.
const STEP: u64 = 3;

/// The scale every case uses: `ALPHA_OVER_RANK · STEP / WARMUP`, exact in
/// f32, whichever way it is given.
fn scale_value() -> f32 {
    singlora::Ramp {
        alpha: ALPHA_OVER_RANK * 16.0,
        rank: 16,
        warmup_steps: WARMUP,
    }
    .scale(STEP)
}

fn run_case<T: DType>(
    gpu: &Gpu,
    c: Case,
    rank: usize,
    seed: u64,
    (fwd_kernel, kernel): (ForwardKernel, BackwardKernel),
) {
    let dims = Dims::new(c.tokens, c.d_in, c.d_out, rank).unwrap();
    let (ld_x, ld_y) = (c.ld.of::<T>(c.d_in), c.ld.of::<T>(c.d_out));
    let name = format!("{} rank {rank} {c:?} {fwd_kernel:?} {kernel:?}", T::NAME);
    let s = scale_value();
    assert_eq!(s, 1.125);
    let mut r = rng(seed);
    let x = quantize::<T>(&randn(&mut r, c.tokens * c.d_in, 1.0));
    let a = quantize::<T>(&randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt()));
    let g = quantize::<T>(&randn(&mut r, c.tokens * c.d_out, 1.0));
    let y0 = quantize::<T>(&randn(&mut r, c.tokens * c.d_out, 1.0));
    let dx0 = quantize::<T>(&randn(&mut r, c.tokens * c.d_in, 1.0));
    let da0 = quantize::<f32>(&randn(&mut r, dims.a_len(), 1.0));
    let b = c.beta as f64;
    let (y_ref, s_ref) = reference_forward_onto(&dims, [&x, &a], s as f64, (&y0, b), Dropout::NONE);
    let starts = [(&dx0[..], b), (&da0[..], b)];
    let (dx_ref, da_ref) =
        reference_backward_onto(&dims, [&x, &g, &a], s as f64, starts, Dropout::NONE);

    let scale_f32 = upload_f32(gpu, &[s as f64]);
    let step = gpu.stream.clone_htod(&[STEP]).unwrap();
    let scale = |from: ScaleFrom| -> Scale<'_> {
        match from {
            ScaleFrom::Value => Scale::Value(s),
            ScaleFrom::DeviceF32 => Scale::Device(&scale_f32),
            ScaleFrom::DeviceRamp => Scale::Ramp {
                step: &step,
                alpha_over_rank: ALPHA_OVER_RANK,
                warmup_steps: WARMUP,
            },
        }
    };

    // Inputs with NaN gaps and guards; outputs with sentinel gaps and
    // guards; outputs that beta 0 never reads start NaN.
    let xd = Placed::<T>::strided(gpu, &x, (c.tokens, c.d_in, ld_x), c.off.x, f64::NAN);
    let gd = Placed::<T>::strided(gpu, &g, (c.tokens, c.d_out, ld_y), c.off.g, f64::NAN);
    let ad = Placed::<T>::input(gpu, &a, c.off.a);
    let start = |v: &[f64]| initial(v, c.beta);
    let (y_at, dx_at) = ((c.tokens, c.d_out, ld_y), (c.tokens, c.d_in, ld_x));
    let mut yd = Placed::<T>::strided(gpu, &start(&y0), y_at, c.off.y, SENTINEL);
    let mut sd = Placed::<f32>::new(gpu, &vec![f64::NAN; dims.s_len()], c.off.s, f64::NAN);
    let s_out = c.saved_s.then_some(&mut sd);
    let (x_in, y_out) = ((&xd, ld_x), (&mut yd, ld_y));
    let fwd = (scale(c.scale), c.beta);
    forward_placed(gpu, &dims, x_in, &ad, y_out, s_out, fwd, fwd_kernel);
    let y = yd.read_strided(gpu, &format!("Y ({name})"), y_at);
    assert_close::<T>("Y", &name, &y, &y_ref);

    let mut dxd = Placed::<T>::strided(gpu, &start(&dx0), dx_at, c.off.dx, SENTINEL);
    let mut dad = Placed::<f32>::output(gpu, &start(&da0), c.off.da);
    let mut ws = poisoned::<f32>(gpu, backward_workspace_len(&dims, c.saved_s).unwrap());
    {
        let s_view = sd.view();
        let mut dx_view = dxd.view_mut();
        backward(
            &gpu.stream,
            &dims,
            &xd.view(),
            ld_x,
            &gd.view(),
            ld_y,
            &ad.view(),
            if c.saved_s { Some(&s_view) } else { None },
            scale(c.scale),
            Some(DxOut {
                dx: &mut dx_view,
                ld_dx: ld_x,
                beta: c.beta,
            }),
            &mut dad.view_mut(),
            c.beta,
            &mut ws,
            BackwardOptions {
                dropout: Dropout::NONE,
                kernel,
            },
        )
        .unwrap();
    }
    if c.saved_s {
        assert_close::<T>("S", &name, &sd.read(gpu, &format!("S ({name})")), &s_ref);
    }
    let dx = dxd.read_strided(gpu, &format!("dX ({name})"), dx_at);
    assert_close::<T>("dX", &name, &dx, &dx_ref);
    assert_close::<T>(
        "dA",
        &name,
        &dad.read(gpu, &format!("dA ({name})")),
        &da_ref,
    );
}

fn forward_backward_grid<T: DType>(seed: u64) {
    let Some(gpu) = gpu() else { return };
    for (i, &rank) in RANKS.iter().enumerate() {
        for (j, &c) in LAYOUTS.iter().enumerate() {
            let kernels = (ForwardKernel::Portable, BackwardKernel::Split);
            run_case::<T>(&gpu, c, rank, seed + 10 * i as u64 + j as u64, kernels);
        }
    }
    if T::NAME == "bf16" {
        for (i, &(rank, _)) in FUSED_RANKS.iter().enumerate() {
            for (j, &c) in LAYOUTS.iter().enumerate() {
                let seed = seed + 50 + 10 * i as u64 + j as u64;
                let kernels = (ForwardKernel::Portable, BackwardKernel::Fused);
                run_case::<T>(&gpu, c, rank, seed, kernels);
            }
        }
    }
    if T::NAME != "f32" {
        for (i, &(rank, _)) in TMA_RANKS.iter().enumerate() {
            // (The other layouts would run the portable kernel again.)
            for (j, &c) in LAYOUTS.iter().enumerate().filter(|(_, c)| tma_layout(c)) {
                let seed = seed + 80 + 10 * i as u64 + j as u64;
                let kernels = (ForwardKernel::Tma, BackwardKernel::Split);
                run_case::<T>(&gpu, c, rank, seed, kernels);
            }
        }
    }
}

typed_tests! {
    sanitizer_grid_forward_backward_f32 = 100,
    sanitizer_grid_forward_backward_f16 = 200,
    sanitizer_grid_forward_backward_bf16 = 300 => forward_backward_grid::<T>(SEED);
}

/// Merge then unmerge: (d_in, d_out, rank, ld_w, offset of W): 16-byte
/// accesses (aligned base and stride), paired ones (an even stride and an
/// even offset off 16 bytes), scalar ones (an odd stride); one rank chunk
/// of 32 and several.
const MERGES: [(usize, usize, usize, usize, usize); 3] = [
    (80, 44, 200, 88, 0),
    (80, 44, 48, 82, 2),
    (75, 44, 16, 75, 1),
];

fn merge_grid<T: DType>(gpu: &Gpu, seed: u64) {
    for (i, &(d_in, d_out, rank, ld_w, off)) in MERGES.iter().enumerate() {
        for kernel in [MergeKernel::Fma, MergeKernel::TensorCore] {
            let name = format!("{} merge {kernel:?} {:?}", T::NAME, MERGES[i]);
            let dims = Dims::new(0, d_in, d_out, rank).unwrap();
            let mut r = rng(seed + i as u64);
            let w0 = quantize::<T>(&restride(
                &randn(&mut r, d_out * d_in, 0.3),
                d_out,
                d_in,
                ld_w,
                SENTINEL,
            ));
            let a = quantize::<T>(&randn(&mut r, dims.a_len(), 0.1));
            let mut want = w0.clone();
            reference::merge(&dims, &mut want, ld_w, &a, 1.5).unwrap();
            let mut wd = Placed::<T>::output(gpu, &w0, off);
            let ad = Placed::<T>::input(gpu, &a, 0);
            let fold = |wd: &mut Placed<T>, undo: bool| {
                let mut w = wd.view_mut();
                match (kernel, undo) {
                    // The defaults through the plain entry points.
                    (MergeKernel::Fma, false) => {
                        merge(&gpu.stream, &dims, &mut w, ld_w, &ad.view(), 1.5f32)
                    }
                    (MergeKernel::Fma, true) => {
                        unmerge(&gpu.stream, &dims, &mut w, ld_w, &ad.view(), 1.5f32)
                    }
                    (k, undo) => merge_with(
                        &gpu.stream,
                        &dims,
                        &mut w,
                        ld_w,
                        &ad.view(),
                        1.5f32,
                        undo,
                        k,
                    ),
                }
                .unwrap()
            };
            fold(&mut wd, false);
            let got = wd.read_strided(gpu, &name, (d_out, d_in, ld_w));
            assert_close::<T>("merged W", &name, &got, &unstride(&want, d_out, d_in, ld_w));
            fold(&mut wd, true);
            let back = wd.read(gpu, &name);
            assert_close::<T>(
                "unmerged W",
                &name,
                &unstride(&back, d_out, d_in, ld_w),
                &unstride(&w0, d_out, d_in, ld_w),
            );
        }
    }
}

/// AdamW over 1029 elements (a tail of every vector width): with f32
/// master weights, without, and with a device step (which `step_advance`
/// then moves on).
fn adamw_grid<T: DType>(gpu: &Gpu, seed: u64) {
    let n = 1029;
    let cfg = AdamW {
        lr: 1e-2,
        ..AdamW::default()
    };
    for (i, mode) in ["master", "no master", "device step"].iter().enumerate() {
        let name = format!("{} adamw {mode}", T::NAME);
        let mut r = rng(seed + i as u64);
        let p0 = quantize::<T>(&randn(&mut r, n, 0.1));
        let grad = quantize::<f32>(&randn(&mut r, n, 1.0));
        // Step 2 of a run: moments from a first step.
        let m0 = quantize::<f32>(&randn(&mut r, n, 0.1));
        let v0: Vec<f64> = quantize::<f32>(&randn(&mut r, n, 0.1))
            .iter()
            .map(|v| v * v)
            .collect();
        let mut a = upload::<T>(gpu, &p0);
        let gd = upload_f32(gpu, &grad);
        let mut m = upload_f32(gpu, &m0);
        let mut v = upload_f32(gpu, &v0);
        let mut master = upload_f32(gpu, &p0);
        let state = AdamWState {
            m: &mut m,
            v: &mut v,
            master: (*mode == "master").then_some(&mut master as _),
        };
        if *mode == "device step" {
            let mut step = gpu.stream.clone_htod(&[1u64]).unwrap();
            adamw_device_step(&gpu.stream, &cfg, &mut step, &mut a, &gd, 0.5, state).unwrap();
            advance_step(&gpu.stream, &mut step).unwrap();
            assert_eq!(gpu.stream.clone_dtoh(&step).unwrap(), vec![3u64], "{name}");
        } else {
            adamw(&gpu.stream, &cfg, 2, &mut a, &gd, 0.5, state).unwrap();
        }
        let (mut want, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        reference::adamw(&cfg, 2, &mut want, &grad, 0.5, &mut wm, &mut wv).unwrap();
        assert_close::<T>("A", &name, &download(gpu, &a), &want);
        assert_close::<f32>("m", &name, &download(gpu, &m), &wm);
        assert_close::<f32>("v", &name, &download(gpu, &v), &wv);
    }
}

/// MSE of a strided prediction against a dense target, with a strided
/// gradient and without one.
fn mse_grid<T: DType>(gpu: &Gpu, seed: u64) {
    let (rows, cols, ld_p, ld_g) = (37usize, 75usize, 80usize, 77usize);
    let name = format!("{} mse", T::NAME);
    let mut r = rng(seed);
    let pred = quantize::<T>(&randn(&mut r, rows * cols, 1.0));
    let target = quantize::<T>(&randn(&mut r, rows * cols, 1.0));
    let (loss_ref, grad_ref) = reference::mse(&pred, &target).unwrap();
    let pd = Placed::<T>::input(gpu, &restride(&pred, rows, cols, ld_p, f64::NAN), 1);
    let td = Placed::<T>::input(gpu, &target, 0);
    let mut gd = Placed::<T>::output(gpu, &vec![SENTINEL; (rows - 1) * ld_g + cols], 3);
    for with_grad in [true, false] {
        let mut partial = poisoned::<f32>(gpu, MSE_PARTIALS);
        {
            let mut g_view = gd.view_mut();
            let grad = with_grad.then_some((&mut g_view as _, ld_g));
            mse(
                &gpu.stream,
                rows,
                cols,
                &pd.view(),
                ld_p,
                &td.view(),
                cols,
                grad,
                1.0,
                &mut partial,
            )
            .unwrap();
        }
        let loss = mse_loss(&gpu.stream.clone_dtoh(&partial).unwrap(), rows, cols);
        assert!(
            (loss - loss_ref).abs() <= 1e-5 * loss_ref,
            "{name}: loss {loss}, expected {loss_ref}"
        );
    }
    let grad = gd.read_strided(gpu, &name, (rows, cols, ld_g));
    assert_close::<T>("grad", &name, &grad, &grad_ref);
}

#[test]
fn sanitizer_grid_merge_adamw_mse() {
    let Some(gpu) = gpu() else { return };
    merge_grid::<f32>(&gpu, 1);
    merge_grid::<f16>(&gpu, 2);
    merge_grid::<bf16>(&gpu, 3);
    adamw_grid::<f32>(&gpu, 4);
    adamw_grid::<f16>(&gpu, 5);
    adamw_grid::<bf16>(&gpu, 6);
    mse_grid::<f32>(&gpu, 7);
    mse_grid::<f16>(&gpu, 8);
    mse_grid::<bf16>(&gpu, 9);
    // The fill kernel poisoned every output above (2- and 4-byte); the
    // decode kernels exist here exactly on sm_90.
    let kernels = Kernels::get(&gpu.ctx).unwrap();
    let (major, minor) = gpu.ctx.compute_capability().unwrap();
    assert_eq!(
        kernels.contains("forward_decode_sm90_bf16_r32"),
        (major, minor) == (9, 0),
        "decode kernels on compute capability {major}.{minor}"
    );
}

/// The kernel names a forward or backward of `rank` at `tokens` launches,
/// by the launchers' rules (src/ops/forward.rs, src/ops/backward.rs):
/// decode at ≤ 64 tokens with rank ≤ 64 when the decode kernels exist, the
/// regular kernel otherwise and for shrink-only launches.
fn launched(dtype: &str, rank: usize, c: &Case, decode_exists: bool) -> Vec<String> {
    let bucket = RANK_BUCKETS.into_iter().find(|&b| rank <= b).unwrap();
    let decode = decode_exists && c.tokens <= DECODE_MAX_TOKENS && rank <= DECODE_MAX_RANK;
    let dec_bucket = if rank <= 32 { 32 } else { 64 };
    let expand = if decode {
        format!("forward_decode_sm90_{dtype}_r{dec_bucket}")
    } else {
        format!("forward_{dtype}_r{bucket}")
    };
    let mut v = vec![
        expand,
        format!("backward_da_partial_{dtype}_r{bucket}"),
        "backward_da_reduce".to_string(),
        "fill".to_string(),
    ];
    if !c.saved_s {
        // The backward recomputes S with a shrink-only launch.
        v.push(format!("forward_{dtype}_r{bucket}"));
    }
    if !decode {
        v.push(format!("forward_{dtype}_r{bucket}"));
    }
    v
}

/// The grid launches every kernel of the list (both modules, so on an
/// sm_90 device with its decode kernels), every (element type, bucket)
/// with both the vector and the element-wise paths of X, and both
/// regular and few-token sizes. Needs no GPU.
#[test]
fn grid_covers_every_kernel() {
    let mut hit: Vec<String> = Vec::new();
    for dtype in ["f32", "f16", "bf16"] {
        for &rank in &RANKS {
            for c in &LAYOUTS {
                hit.extend(launched(dtype, rank, c, true));
            }
        }
        hit.extend([
            format!("merge_{dtype}"),
            format!("merge_mma_{dtype}"),
            format!("adamw_{dtype}"),
            format!("mse_{dtype}"),
            "step_advance".to_string(),
        ]);
    }
    hit.extend(FUSED_RANKS.map(|(_, b)| format!("backward_fused_sm90_bf16_r{b}")));
    for dtype in ["f16", "bf16"] {
        hit.extend(TMA_RANKS.map(|(_, b)| format!("forward_tma_sm90_{dtype}_r{b}")));
    }
    // The TMA forward needs a layout a tensor map describes.
    assert!(LAYOUTS.iter().any(tma_layout));
    for name in kernel_names() {
        if name.contains("_small_") {
            // The configurations for 99 KiB devices run only in a context
            // loaded under the registry's shared-memory knob, which needs a
            // process of its own: scripts/gpu/run.sh runs the sanitizers
            // over all of bin/test-small_smem, which launches each of them.
            continue;
        }
        assert!(hit.contains(&name), "the grid never launches {name}");
    }
    // Buckets: one rank each.
    let buckets: Vec<usize> = RANKS
        .iter()
        .map(|&r| RANK_BUCKETS.into_iter().find(|&b| r <= b).unwrap())
        .collect();
    assert_eq!(buckets, RANK_BUCKETS.to_vec());
    // Paths per (element type): 16-byte (base and stride multiples of 16
    // bytes) and element-wise for X; regular and few-token sizes; saved and
    // recomputed S; both betas; every scale source.
    fn paths<T: DType>() {
        let v = 16 / std::mem::size_of::<T>();
        let vec_ok = |c: &Case| c.off.x % v == 0 && c.ld.of::<T>(c.d_in) % v == 0;
        assert!(LAYOUTS.iter().any(vec_ok), "{}: a vector case", T::NAME);
        assert!(
            LAYOUTS.iter().any(|c| !vec_ok(c)),
            "{}: an element-wise case",
            T::NAME
        );
        assert!(
            LAYOUTS.iter().any(|c| vec_ok(c) && c.d_in % v != 0),
            "{}: a vector case with a tail",
            T::NAME
        );
    }
    paths::<f32>();
    paths::<f16>();
    paths::<bf16>();
    for pred in [
        |c: &Case| c.tokens > DECODE_MAX_TOKENS,
        |c: &Case| c.tokens <= DECODE_MAX_TOKENS,
        |c: &Case| c.saved_s,
        |c: &Case| !c.saved_s,
        |c: &Case| c.beta == 0.0,
        |c: &Case| c.beta == 1.0,
        |c: &Case| c.scale == ScaleFrom::Value,
        |c: &Case| c.scale == ScaleFrom::DeviceF32,
        |c: &Case| c.scale == ScaleFrom::DeviceRamp,
    ] {
        assert!(LAYOUTS.iter().any(pred));
    }
}
