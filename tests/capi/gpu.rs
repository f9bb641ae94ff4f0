//! On a GPU: the C ABI gives bitwise the results of the Rust API, restores
//! the caller's context, and refuses a stream of another context.

use std::ffi::c_void;

use singlora::ffi::*;
use singlora::Dims;

use crate::common::*;
use crate::*;
use cudarc::driver::{result as cu, CudaContext, CudaSlice, DevicePtr};
use half::{bf16, f16};
use singlora::{backward, forward, merge, unmerge, DType, DxOut};

const SCALE: f32 = 0.75;

fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    let (p, _sync) = s.device_ptr(&gpu.stream);
    p
}

fn stream(gpu: &Gpu) -> *mut c_void {
    gpu.stream.cu_stream() as *mut c_void
}

fn bits<T: DType>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<u64> {
    download(gpu, s).into_iter().map(f64::to_bits).collect()
}

/// Forward and backward through the C ABI equal the Rust API's, bit
/// for bit (same kernels, same order), with strides and both betas.
fn forward_backward<T: DType>(code: i32) {
    let Some(gpu) = gpu() else { return };
    let (tokens, d_in, d_out, rank, pad) = (77usize, 96usize, 160usize, 24usize, 5usize);
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    let (ld_x, ld_y) = (d_in + pad, d_out + pad);
    let mut r = rng(11);
    let x = upload::<T>(&gpu, &randn(&mut r, (tokens - 1) * ld_x + d_in, 1.0));
    let a = upload::<T>(&gpu, &randn(&mut r, dims.a_len(), 0.1));
    let y0 = randn(&mut r, (tokens - 1) * ld_y + d_out, 1.0);
    let g = upload::<T>(&gpu, &randn(&mut r, (tokens - 1) * ld_y + d_out, 1.0));

    // Rust API.
    let mut y_r = upload::<T>(&gpu, &y0);
    let mut s_r = poisoned::<f32>(&gpu, dims.s_len());
    forward(
        &gpu.stream,
        &dims,
        &x,
        ld_x,
        &a,
        &mut y_r,
        ld_y,
        Some(&mut s_r),
        SCALE,
        1.0,
        singlora::Dropout::NONE,
    )
    .unwrap();
    let mut dx_r = poisoned::<T>(&gpu, (tokens - 1) * ld_x + d_in);
    let mut da_r = poisoned::<f32>(&gpu, dims.a_len());
    let mut ws_r = poisoned::<f32>(&gpu, backward_workspace_len(&dims, true).unwrap());
    backward(
        &gpu.stream,
        &dims,
        &x,
        ld_x,
        &g,
        ld_y,
        &a,
        Some(&s_r),
        SCALE,
        Some(DxOut {
            dx: &mut dx_r,
            ld_dx: ld_x,
            beta: 0.0,
        }),
        &mut da_r,
        0.0,
        &mut ws_r,
        singlora::Dropout::NONE,
    )
    .unwrap();

    // C ABI on the same stream.
    let y_c = upload::<T>(&gpu, &y0);
    let s_c = poisoned::<f32>(&gpu, dims.s_len());
    let dx_c = poisoned::<T>(&gpu, (tokens - 1) * ld_x + d_in);
    let da_c = poisoned::<f32>(&gpu, dims.a_len());
    let ws_len = backward_workspace_len(&dims, true).unwrap();
    let ws_c = poisoned::<f32>(&gpu, ws_len);
    let fwd = Fwd {
        ld_x: ld_x as i64,
        ld_y: ld_y as i64,
        ..Fwd::dense(
            code,
            &dims,
            [
                ptr(&gpu, &x),
                ptr(&gpu, &a),
                ptr(&gpu, &y_c),
                ptr(&gpu, &s_c),
            ],
            (SCALE, 1.0),
            stream(&gpu),
        )
    };
    let bwd = Bwd::after(
        &fwd,
        [
            ptr(&gpu, &g),
            ptr(&gpu, &dx_c),
            ptr(&gpu, &da_c),
            ptr(&gpu, &ws_c),
        ],
    );
    // SAFETY: every pointer addresses a live buffer of the size the
    // arguments describe, on device 0's primary context; `stream` is the
    // harness's stream of that context; the buffers outlive the
    // downloads below, which synchronise.
    unsafe {
        assert_eq!(fwd.launch(), SINGLORA_OK, "{}", last_error());
        assert_eq!(bwd.launch(), SINGLORA_OK, "{}", last_error());
    }
    assert!(bits(&gpu, &y_c) == bits(&gpu, &y_r), "{} y", T::NAME);
    assert!(bits(&gpu, &s_c) == bits(&gpu, &s_r), "{} S", T::NAME);
    let strip = |v: Vec<f64>| unstride(&v, tokens, d_in, ld_x);
    assert!(
        strip(download(&gpu, &dx_c))
            .iter()
            .zip(strip(download(&gpu, &dx_r)))
            .all(|(p, q)| p.to_bits() == q.to_bits()),
        "{} dX",
        T::NAME
    );
    assert!(bits(&gpu, &da_c) == bits(&gpu, &da_r), "{} dA", T::NAME);
    assert!(!download(&gpu, &da_c).iter().any(|v| v.is_nan()));
    let q = |ws: &CudaSlice<f32>| download(&gpu, ws)[..dims.s_len()].to_vec();
    assert!(q(&ws_c) == q(&ws_r), "{} Q", T::NAME);

    // The NULL (legacy default) stream works too.
    let y_n = upload::<T>(&gpu, &y0);
    gpu.stream.synchronize().unwrap();
    let null_stream = Fwd {
        y: ptr(&gpu, &y_n),
        s: 0,
        stream: std::ptr::null_mut(),
        ..fwd
    };
    // SAFETY: as above; the legacy stream is synchronised before reading.
    let st = unsafe { null_stream.launch() };
    assert_eq!(st, SINGLORA_OK, "{}", last_error());
    gpu.ctx.synchronize().unwrap();
    assert!(
        bits(&gpu, &y_n) == bits(&gpu, &y_r),
        "{} y (NULL stream)",
        T::NAME
    );
}

#[test]
fn capi_forward_backward_equal_the_rust_api_f32() {
    forward_backward::<f32>(F32);
}

#[test]
fn capi_forward_backward_equal_the_rust_api_f16() {
    forward_backward::<f16>(F16);
}

#[test]
fn capi_forward_backward_equal_the_rust_api_bf16() {
    forward_backward::<bf16>(BF16);
}

#[test]
fn capi_merge_unmerge_equal_the_rust_api() {
    let Some(gpu) = gpu() else { return };
    let (d_in, d_out, rank, ld_w) = (200usize, 130usize, 16usize, 208usize);
    let dims = Dims::new(0, d_in, d_out, rank).unwrap();
    let mut r = rng(5);
    let w0 = randn(&mut r, (d_out - 1) * ld_w + d_in, 1.0);
    let a = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.1));
    let mut w_r = upload::<bf16>(&gpu, &w0);
    let w_c = upload::<bf16>(&gpu, &w0);
    merge(&gpu.stream, &dims, &mut w_r, ld_w, &a, SCALE).unwrap();
    let m = Merge {
        dtype: BF16,
        device: 0,
        d_in: d_in as i64,
        d_out: d_out as i64,
        rank: rank as i64,
        w: ptr(&gpu, &w_c),
        ld_w: ld_w as i64,
        a: ptr(&gpu, &a),
        scale: SCALE,
        scale_ptr: 0,
        stream: stream(&gpu),
    };
    // SAFETY: w_c and a are live buffers of the described shapes on device
    // 0's primary context, on the harness's stream.
    let st = unsafe { m.launch() };
    assert_eq!(st, SINGLORA_OK, "{}", last_error());
    assert!(bits(&gpu, &w_c) == bits(&gpu, &w_r), "merge");
    unmerge(&gpu.stream, &dims, &mut w_r, ld_w, &a, SCALE).unwrap();
    // SAFETY: as above.
    let st = unsafe { m.launch_with(singlora_unmerge) };
    assert_eq!(st, SINGLORA_OK, "{}", last_error());
    assert!(bits(&gpu, &w_c) == bits(&gpu, &w_r), "unmerge");
    // The scale from a device float (the by-value one is then unused).
    let scale_dev = upload::<f32>(&gpu, &[SCALE as f64]);
    let m_dev = Merge {
        scale: f32::NAN,
        scale_ptr: ptr(&gpu, &scale_dev),
        ..m
    };
    merge(&gpu.stream, &dims, &mut w_r, ld_w, &a, SCALE).unwrap();
    // SAFETY: as above; scale_dev is a live device float of that context.
    let st = unsafe { m_dev.launch() };
    assert_eq!(st, SINGLORA_OK, "{}", last_error());
    assert!(bits(&gpu, &w_c) == bits(&gpu, &w_r), "merge, device scale");
}

#[test]
fn capi_restores_the_callers_current_context() {
    let Some(_gpu) = gpu() else { return };
    // SAFETY: unbinding the thread's context is always valid.
    unsafe { cu::ctx::set_current(std::ptr::null_mut()) }.unwrap();
    assert_eq!(singlora_init(0), SINGLORA_OK, "{}", last_error());
    assert_eq!(cu::ctx::get_current().unwrap(), None);
}

#[test]
fn capi_refuses_a_stream_of_another_context() {
    let Some(gpu) = gpu() else { return };
    let other = CudaContext::new_non_primary(0, 0).unwrap();
    let foreign = other.new_stream().unwrap();
    let dims = Dims::new(4, 32, 32, 8).unwrap();
    let x = upload::<bf16>(&gpu, &vec![1.0; 4 * 32]);
    let a = upload::<bf16>(&gpu, &vec![1.0; dims.a_len()]);
    let y = upload::<bf16>(&gpu, &vec![1.0; 4 * 32]);
    let f = Fwd {
        dtype: BF16,
        device: 0,
        tokens: 4,
        d_in: 32,
        d_out: 32,
        rank: 8,
        x: ptr(&gpu, &x),
        ld_x: 32,
        a: ptr(&gpu, &a),
        y: ptr(&gpu, &y),
        ld_y: 32,
        s: 0,
        scale: 1.0,
        scale_ptr: 0,
        beta: 0.0,
        dropout_p: 0.0,
        dropout_seed: 0,
        dropout_offset: 0,
        stream: foreign.cu_stream() as *mut c_void,
    };
    // SAFETY: the buffers are live on device 0's primary context; the
    // call is refused before any launch.
    let st = unsafe { f.launch() };
    assert_refused(st, SINGLORA_ERROR_INVALID_ARGUMENT, "stream");
    assert!(
        download(&gpu, &y).iter().all(|&v| v == 1.0),
        "a refused call wrote y"
    );
}
