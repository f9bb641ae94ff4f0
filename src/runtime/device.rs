//! Opening a device: the checks that run before any driver call can fail in
//! an untyped way.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

/// Opens device `ordinal` (its primary context) after checking, in this
/// order, that a driver exists, that the device exists, and that it is
/// compute capability 8.0 or newer. Never panics on a machine without CUDA.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    // SAFETY: only tries to dlopen libcuda; nothing is called through it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
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
