//! The module loads and the smoke kernel (fill) runs; without a GPU the
//! device checks give typed errors, never a panic.

mod common;

use common::*;
use half::bf16;
use singlora::{fill_bits, kernel_names, open_device, Error, Kernels};

#[test]
fn fill_writes_every_element() {
    let Some(gpu) = gpu() else { return };
    for n in [1usize, 255, 256, 257, 100_003] {
        let mut d = gpu.stream.alloc_zeros::<f32>(n).unwrap();
        fill_bits(&gpu.stream, &mut d, 2.5f32.to_bits()).unwrap();
        assert!(download(&gpu, &d).iter().all(|&v| v == 2.5), "f32 n={n}");
        let mut h = gpu.stream.alloc_zeros::<bf16>(n).unwrap();
        fill_bits(&gpu.stream, &mut h, bf16::from_f32(-3.0).to_bits() as u32).unwrap();
        assert!(download(&gpu, &h).iter().all(|&v| v == -3.0), "bf16 n={n}");
    }
}

#[test]
fn module_is_cached_per_context_and_has_every_kernel() {
    let Some(gpu) = gpu() else { return };
    let a = Kernels::get(&gpu.ctx).unwrap();
    let b = Kernels::get(&gpu.ctx).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert!(a.sm_count() > 0);
    // fill, step_advance, the dA reduce; merge, adamw, mse per dtype; forward
    // and dA per dtype and rank bucket; the decode forward per dtype and its
    // two buckets.
    // The small configurations: the forward in one bucket, dA in two.
    assert_eq!(
        kernel_names().len(),
        3 + 3 * 3 + 2 * 3 * 4 + 3 * 2 + 3 * (1 + 2)
    );
    // The portable module has every kernel; the sm_90a module's exist on a
    // compute capability 9.0 device of a build with sm_90a, and nowhere else.
    let (major, minor) = gpu.ctx.compute_capability().unwrap();
    let sm90_built = env!("SINGLORA_BUILT_ARCHS")
        .split(',')
        .any(|a| a.trim() == "sm_90a");
    for name in kernel_names() {
        let want = !name.contains("_sm90_") || ((major, minor) == (9, 0) && sm90_built);
        assert_eq!(a.contains(&name), want, "{name} on {major}.{minor}");
    }
}

#[test]
fn open_device_reports_typed_errors() {
    match open_device(0) {
        Ok(ctx) => {
            // A device exists: an ordinal past the last one is NoDevice.
            let count = cudarc::driver::CudaContext::device_count().unwrap() as usize;
            let err = open_device(count).unwrap_err();
            assert!(
                matches!(err, Error::NoDevice { ordinal, count: c } if ordinal == count && c == count),
                "{err}"
            );
            drop(ctx);
        }
        Err(e) => assert!(
            matches!(
                e,
                Error::NoDriver | Error::NoDevice { .. } | Error::UnsupportedDevice { .. }
            ),
            "{e}"
        ),
    }
}
