//! First calls racing for the primary context's module, in a process of its
//! own (one test, and not the harness's `gpu()`, which loads the module) so
//! that nothing has loaded it yet: eight threads start together; four open
//! device 0 themselves and look its registry up, four make their first call
//! through the C ABI (`singlora_forward` on a driver stream of the primary
//! context, which also opens the C ABI's per-device context table). The
//! module is loaded once: every Rust thread gets the same registry
//! (`Arc::ptr_eq`), the one later lookups return; and every thread's
//! forward, Rust or C, gives the same bits, at the reference's bar.
//! (tests/hardening/concurrency.rs races a fresh non-primary context.)

mod common;

use std::ffi::{c_void, CStr};
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use singlora::ffi::{singlora_forward, singlora_last_error, SINGLORA_OK};
use singlora::{open_device, DType, Dims, Dropout, Error, Kernels};

const THREADS: usize = 8;
const SCALE: f32 = 0.75;

#[test]
fn first_calls_race_for_the_primary_contexts_module() {
    let require = std::env::var("SINGLORA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    // Opening the device loads nothing.
    let ctx = match open_device(0) {
        Ok(ctx) => ctx,
        Err(e @ (Error::NoDriver | Error::NoDevice { .. } | Error::UnsupportedDevice { .. })) => {
            assert!(!require, "SINGLORA_REQUIRE_GPU=1 but no usable GPU: {e}");
            println!("skipped: no CUDA device ({e})");
            return;
        }
        Err(e) => panic!("opening the GPU failed: {e}"),
    };
    let (tokens, d_in, d_out, rank) = (77usize, 256usize, 200usize, 24usize);
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    let mut r = rng(3);
    let x = quantize::<bf16>(&randn(&mut r, tokens * d_in, 1.0));
    let a = quantize::<bf16>(&randn(&mut r, dims.a_len(), 1.0 / (d_in as f64).sqrt()));
    let (y_ref, _) = reference_forward(&dims, [&x, &a], SCALE as f64, Dropout::NONE);
    let host = |v: &[f64]| -> Vec<bf16> { v.iter().map(|&e| bf16::from_f64(e)).collect() };
    let (x_host, a_host) = (host(&x), host(&a));

    let start = Barrier::new(THREADS);
    let got: Vec<(Option<Arc<Kernels>>, Vec<u64>)> = thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (ctx, start, x_host, a_host) = (&ctx, &start, &x_host, &a_host);
                sc.spawn(move || {
                    // Streams and buffers: no module needed yet (beta = 0
                    // never reads y, so zeros will do).
                    let stream = ctx.new_stream().unwrap();
                    let xd = stream.clone_htod(x_host).unwrap();
                    let ad = stream.clone_htod(a_host).unwrap();
                    let mut yd: CudaSlice<bf16> = stream.alloc_zeros(tokens * d_out).unwrap();
                    stream.synchronize().unwrap();
                    start.wait();
                    let registry = if i % 2 == 0 {
                        // A context object of this thread's own (the same
                        // primary context), its registry, then a launch.
                        let own = open_device(0).unwrap();
                        let k = Kernels::get(&own).unwrap();
                        forward_dense(
                            &stream,
                            &dims,
                            [&xd, &ad],
                            &mut yd,
                            None,
                            (SCALE, 0.0),
                            Dropout::NONE,
                        )
                        .unwrap();
                        Some(k)
                    } else {
                        let ptr = |s: &CudaSlice<bf16>| s.device_ptr(&stream).0;
                        // SAFETY: x, a and y are live buffers of the
                        // described shapes on device 0's primary context,
                        // `stream` is a stream of that context; the
                        // download below synchronises it.
                        let st = unsafe {
                            singlora_forward(
                                <bf16 as DType>::CODE as i32,
                                0,
                                tokens as i64,
                                d_in as i64,
                                d_out as i64,
                                rank as i64,
                                ptr(&xd),
                                d_in as i64,
                                ptr(&ad),
                                ptr(&yd),
                                d_out as i64,
                                0,
                                SCALE,
                                0, // scale_ptr: the scale by value
                                0.0,
                                0.0, // no dropout
                                0,
                                0,
                                stream.cu_stream() as *mut c_void,
                            )
                        };
                        // SAFETY: never NULL; copied at once.
                        let msg = unsafe { CStr::from_ptr(singlora_last_error()) };
                        assert_eq!(st, SINGLORA_OK, "thread {i}: {msg:?}");
                        None
                    };
                    let y: Vec<bf16> = stream.clone_dtoh(&yd).unwrap();
                    (
                        registry,
                        y.into_iter().map(|v| v.to_f64().to_bits()).collect(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let later = Kernels::get(&ctx).unwrap();
    for (i, (k, _)) in got.iter().enumerate() {
        if let Some(k) = k {
            assert!(Arc::ptr_eq(k, &later), "thread {i} got another registry");
        }
    }
    assert!(Arc::ptr_eq(
        &later,
        &Kernels::get(&open_device(0).unwrap()).unwrap()
    ));
    let y0: Vec<f64> = got[0].1.iter().map(|&b| f64::from_bits(b)).collect();
    assert_close::<bf16>("y", "first calls", &y0, &y_ref);
    for (i, (_, y)) in got.iter().enumerate() {
        assert!(
            *y == got[0].1,
            "thread {i} ({}) gave other bits than thread 0",
            if i % 2 == 0 { "Rust" } else { "C ABI" }
        );
    }
}
