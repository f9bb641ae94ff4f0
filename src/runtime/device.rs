//! Opening a device: the checks that run before any driver call can fail in
//! an untyped way.

use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

/// Opens device `ordinal` (its primary context) after checking, in this
/// order, that a driver exists, that the device exists, and that it is
/// compute capability 8.0 or newer. Never panics on a machine without CUDA.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        // cuInit reports a machine without a usable GPU as an error.
        Err(_) => 0,
    };
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal)?;
    check_capability(&ctx)?;
    Ok(ctx)
}

/// The names the NVIDIA driver library goes by; cudarc looks for each of
/// them too (among others), so when one loads, cudarc's own lookup succeeds.
#[cfg(windows)]
const DRIVER_LIBRARIES: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// Whether the NVIDIA driver library (libcuda) can be loaded on this machine.
///
/// Our own check rather than cudarc's `is_culib_present`, which exists only
/// under cudarc's `dynamic-loading`: a dependent that links CUDA itself
/// (candle turns on cudarc's `dynamic-linking`) gets cudarc without it, and
/// singlora must build either way. The answer is computed once per process.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        DRIVER_LIBRARIES.iter().any(|name| {
            // SAFETY: loading libcuda runs only its initialisers (it is the
            // same library cudarc loads or links); nothing is called
            // through the handle, which is closed at once.
            unsafe { libloading::Library::new(*name) }.is_ok()
        })
    })
}

/// The kernels use bf16 mma.sync and cp.async: compute capability 8.0 or newer.
pub(crate) fn check_capability(ctx: &CudaContext) -> Result<()> {
    let (major, minor) = capability(ctx)?;
    if major < 8 {
        return Err(Error::UnsupportedDevice {
            ordinal: ctx.ordinal(),
            major,
            minor,
        });
    }
    Ok(())
}

/// The device's compute capability (major, minor).
pub(crate) fn capability(ctx: &CudaContext) -> Result<(i32, i32)> {
    let major = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok((major, minor))
}
