//! Devices and streams for the C ABI: one primary context per ordinal,
//! kept for the process; the caller's stream borrowed for one call; the
//! caller's current context put back afterwards.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cu, sys, CudaContext, CudaStream};

use crate::error::Error;
use crate::ffi::args::invalid;
use crate::ffi::status::{Failure, Outcome};
use crate::runtime::{open_device, Kernels};

/// One context per device ordinal, opened on first use and kept.
fn contexts() -> &'static Mutex<HashMap<usize, Arc<CudaContext>>> {
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// cuInit has succeeded in this process (so cuCtxGetCurrent works).
static DRIVER_READY: AtomicBool = AtomicBool::new(false);

/// Device `ordinal`'s primary context, with the singlora module loaded.
pub(crate) fn context(ordinal: usize) -> Result<Arc<CudaContext>, Failure> {
    let mut map = contexts().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = map.get(&ordinal) {
        return Ok(ctx.clone());
    }
    let ctx = open_device(ordinal)?;
    DRIVER_READY.store(true, Ordering::Release);
    // SAFETY: event tracking only concerns CudaSlices allocated in this
    // context object after the call. The C ABI allocates none: every buffer
    // is the caller's (raw pointers) and every stream is borrowed, so stream
    // ordering is the caller's job, as the header documents, and no event is
    // ever recorded on the caller's stream (which would also disturb a CUDA
    // graph capture).
    unsafe { ctx.disable_event_tracking() };
    Kernels::get(&ctx)?;
    map.insert(ordinal, ctx.clone());
    Ok(ctx)
}

/// Puts back the calling thread's current CUDA context when dropped, so a
/// call on device 1 does not move a PyTorch thread whose current device is 0
/// (cudarc binds the context it launches in). `None`: nothing to restore.
pub(crate) struct RestoreCurrent(Option<sys::CUcontext>);

impl RestoreCurrent {
    pub(crate) fn capture() -> Self {
        if !DRIVER_READY.load(Ordering::Acquire) {
            // cuInit is called only once libcuda is known to load.
            if !crate::runtime::device::driver_present() || cu::init().is_err() {
                // context() will report the missing driver or device.
                return Self(None);
            }
            DRIVER_READY.store(true, Ordering::Release);
        }
        // A thread with no current context keeps ours (the primary context)
        // afterwards, as the CUDA runtime would make it on first use:
        // restoring "none" made PyTorch's autograd thread warn that cuBLAS
        // found no current context right after our backward.
        Self(cu::ctx::get_current().ok().flatten())
    }
}

impl Drop for RestoreCurrent {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            let now = cu::ctx::get_current()
                .ok()
                .flatten()
                .unwrap_or(std::ptr::null_mut());
            if now != prev {
                // SAFETY: `prev` was current on this thread when the call
                // began, so it is a live context; a failure here
                // leaves our context current, which is still a valid state.
                let _ = unsafe { cu::ctx::set_current(prev) };
            }
        }
    }
}

/// The special stream handles of the driver API.
const CU_STREAM_LEGACY: usize = 0x1;
const CU_STREAM_PER_THREAD: usize = 0x2;

/// Wraps the caller's stream (see the module docs for what is accepted).
///
/// # Safety
/// A non-special `stream` must be a live stream handle; the caller keeps it
/// alive for the call.
unsafe fn borrow_stream(
    ctx: &Arc<CudaContext>,
    stream: *mut c_void,
) -> Result<Arc<CudaStream>, Failure> {
    let raw = stream as sys::CUstream;
    if !matches!(stream as usize, 0 | CU_STREAM_LEGACY | CU_STREAM_PER_THREAD) {
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller guarantees a live stream handle; cuStreamGetCtx
        // only writes the handle's context into `owner`.
        unsafe { sys::cuStreamGetCtx(raw, &mut owner) }
            .result()
            .map_err(Error::from)?;
        if owner != ctx.cu_ctx() {
            return Err(invalid(
                "stream",
                "a stream of the device's primary context (the device argument's)",
                format!("{stream:p}, a stream of another context"),
            ));
        }
    }
    // SAFETY: the stream belongs to `ctx` (checked above; the special handles
    // name ctx's own default streams), the caller keeps it alive while the
    // call runs, and the wrapper is dropped before the call returns. Ordering
    // with the caller's other work is the caller's, by the stream's meaning.
    Ok(unsafe { ctx.wrap_borrowed_stream(raw) })
}

/// Opens the device and wraps the stream, restoring the thread's context
/// after `launch`.
///
/// # Safety
/// As for [`borrow_stream`]; `launch` must uphold its launchers' contracts.
pub(crate) unsafe fn on_stream(
    device: usize,
    stream: *mut c_void,
    launch: impl FnOnce(&Arc<CudaStream>) -> crate::Result<()>,
) -> Outcome {
    let _restore = RestoreCurrent::capture();
    let ctx = context(device)?;
    // SAFETY: forwarded from the caller.
    let stream = unsafe { borrow_stream(&ctx, stream)? };
    ctx.bind_to_thread().map_err(Error::from)?;
    launch(&stream)?;
    Ok(())
}
