//! The C ABI: `extern "C"` functions over raw device pointers, declared for C
//! in `include/singlora.h` (hand-written; `tests/capi.rs` compiles a C
//! program against it and checks it agrees with this file).
//!
//! Conventions, the same for every function:
//!
//! * Each returns a status code (`SINGLORA_OK` = 0, else one of the
//!   `SINGLORA_ERROR_*` codes below) and, on failure, leaves a message in a
//!   thread-local buffer read with [`singlora_last_error`]. Every call except
//!   the getters clears that message first.
//! * Every argument is validated before anything is enqueued: negative
//!   dimensions or strides, null required pointers, misaligned pointers,
//!   unknown dtype codes, non-finite scales, betas other than 0 and 1 are
//!   refused with `SINGLORA_ERROR_INVALID_ARGUMENT` (or
//!   `SINGLORA_ERROR_UNKNOWN_DTYPE`) and a message naming the argument. A
//!   refused call touches no output and needs no GPU.
//! * No panic crosses the boundary: every body runs under `catch_unwind`,
//!   and a panic becomes `SINGLORA_ERROR_PANIC` with its message.
//! * Devices are opened through their **primary context** (the one the CUDA
//!   runtime, hence PyTorch, uses), once per ordinal and kept for the life of
//!   the process. A call puts back the calling thread's current context if
//!   it had one; a thread that had none keeps the primary context current.
//! * `stream` is a `CUstream` of that primary context (a `cudaStream_t` of
//!   the runtime is the same thing). `NULL` means the legacy default stream,
//!   as in the driver API (PyTorch's default stream reports 0);
//!   `CU_STREAM_LEGACY` (0x1) and `CU_STREAM_PER_THREAD` (0x2) are accepted.
//!   A stream of another context is refused. The launch functions only
//!   enqueue (no allocation, no synchronisation) — except the first call on a
//!   device, which loads the kernels and synchronises once; call
//!   [`singlora_init`] first when the calls will be captured in a CUDA graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cu, sys, CudaContext, CudaStream};
use half::{bf16, f16};

use crate::backward::{backward_raw, backward_workspace_len, check_backward, BackwardLens};
use crate::device::{open_device, Kernels};
use crate::dims::Dims;
use crate::error::Error;
use crate::forward::{check_forward, forward_raw};
use crate::merge::{check_merge, merge_raw, unmerge_raw};
use crate::params::singlora_dtype;

/// The version of this C ABI (`SINGLORA_ABI_VERSION` in the header): bumped
/// whenever a signature or a code changes meaning.
pub const SINGLORA_ABI_VERSION: i32 = 1;

/// Success.
pub const SINGLORA_OK: i32 = 0;
/// An argument is out of range: a dimension, a stride, a scalar, a null or
/// misaligned pointer, a too-small workspace. The message names it.
pub const SINGLORA_ERROR_INVALID_ARGUMENT: i32 = 1;
/// The dtype code is not one of `SINGLORA_DTYPE_{F32,F16,BF16}`.
pub const SINGLORA_ERROR_UNKNOWN_DTYPE: i32 = 2;
/// libcuda could not be loaded: no NVIDIA driver.
pub const SINGLORA_ERROR_NO_DRIVER: i32 = 3;
/// The driver is present but the device ordinal does not exist.
pub const SINGLORA_ERROR_NO_DEVICE: i32 = 4;
/// The device is older than compute capability 8.0.
pub const SINGLORA_ERROR_UNSUPPORTED_DEVICE: i32 = 5;
/// The kernel for this dtype and rank needs more shared memory per block than
/// the device grants (sm_86/sm_89 run ranks up to 64).
pub const SINGLORA_ERROR_SHARED_MEMORY: i32 = 6;
/// A CUDA driver (or library) call failed.
pub const SINGLORA_ERROR_CUDA: i32 = 7;
/// This build embeds no kernels (built under DOCS_RS).
pub const SINGLORA_ERROR_NO_KERNELS: i32 = 8;
/// A panic inside singlora was caught at the boundary (a bug; please report).
pub const SINGLORA_ERROR_PANIC: i32 = 9;

/// Every status code and its name, as the header spells them.
pub const STATUS_NAMES: [(i32, &CStr); 10] = [
    (SINGLORA_OK, c"SINGLORA_OK"),
    (
        SINGLORA_ERROR_INVALID_ARGUMENT,
        c"SINGLORA_ERROR_INVALID_ARGUMENT",
    ),
    (
        SINGLORA_ERROR_UNKNOWN_DTYPE,
        c"SINGLORA_ERROR_UNKNOWN_DTYPE",
    ),
    (SINGLORA_ERROR_NO_DRIVER, c"SINGLORA_ERROR_NO_DRIVER"),
    (SINGLORA_ERROR_NO_DEVICE, c"SINGLORA_ERROR_NO_DEVICE"),
    (
        SINGLORA_ERROR_UNSUPPORTED_DEVICE,
        c"SINGLORA_ERROR_UNSUPPORTED_DEVICE",
    ),
    (
        SINGLORA_ERROR_SHARED_MEMORY,
        c"SINGLORA_ERROR_SHARED_MEMORY",
    ),
    (SINGLORA_ERROR_CUDA, c"SINGLORA_ERROR_CUDA"),
    (SINGLORA_ERROR_NO_KERNELS, c"SINGLORA_ERROR_NO_KERNELS"),
    (SINGLORA_ERROR_PANIC, c"SINGLORA_ERROR_PANIC"),
];

// ------------------------------------------------------------ errors

/// A refusal or failure on its way to the caller: a status code and the
/// message [`singlora_last_error`] returns.
#[derive(Debug)]
struct Failure {
    status: i32,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidDim { .. }
            | Error::InvalidStride { .. }
            | Error::BufferTooSmall { .. }
            | Error::Overflow { .. }
            | Error::InvalidArgument { .. } => SINGLORA_ERROR_INVALID_ARGUMENT,
            Error::NoDriver => SINGLORA_ERROR_NO_DRIVER,
            Error::NoDevice { .. } => SINGLORA_ERROR_NO_DEVICE,
            Error::UnsupportedDevice { .. } => SINGLORA_ERROR_UNSUPPORTED_DEVICE,
            Error::SharedMemoryTooSmall { .. } => SINGLORA_ERROR_SHARED_MEMORY,
            Error::NoKernels => SINGLORA_ERROR_NO_KERNELS,
            // Driver errors, and any library call the launchers may add.
            _ => SINGLORA_ERROR_CUDA,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

type Outcome = std::result::Result<(), Failure>;

thread_local! {
    /// The message of the last failed call on this thread ("" when the last
    /// call succeeded).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message with an interior NUL would be cut there by C; replace it.
    let c = CString::new(message.replace('\0', "\u{FFFD}")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `body` as one C ABI call: clears this thread's message, catches any
/// panic, and turns the outcome into a status code (and message).
///
/// Every exported launch and query function is `ffi_guard(|| ...)`;
/// [`ffi_guard_test`] drives it from `tests/capi.rs` with a body that panics
/// (the shipped functions contain no deliberate panic to test with).
fn ffi_guard(body: impl FnOnce() -> Outcome) -> i32 {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SINGLORA_OK,
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_string());
            set_last_error(&format!(
                "internal error: singlora panicked ({what}); this is a bug, please report it"
            ));
            SINGLORA_ERROR_PANIC
        }
    }
}

/// The guard every exported function runs its body under, for the test suite:
/// a body that panics with `panic_with` (`Some`), or succeeds (`None`).
/// Clears and sets [`singlora_last_error`]'s message like any call.
#[doc(hidden)]
pub fn ffi_guard_test(panic_with: Option<&str>) -> i32 {
    ffi_guard(|| match panic_with {
        Some(m) => panic!("{m}"),
        None => Ok(()),
    })
}

// ------------------------------------------------------- argument checks

fn invalid(name: &'static str, expected: &'static str, actual: String) -> Failure {
    Error::InvalidArgument {
        name,
        expected,
        actual,
    }
    .into()
}

/// A non-negative `int64_t` dimension or stride as `usize`.
fn non_negative(name: &'static str, v: i64) -> Result<usize, Failure> {
    usize::try_from(v).map_err(|_| invalid(name, "a non-negative integer", v.to_string()))
}

fn dims(tokens: i64, d_in: i64, d_out: i64, rank: i64) -> Result<Dims, Failure> {
    Ok(Dims::new(
        non_negative("tokens", tokens)?,
        non_negative("d_in", d_in)?,
        non_negative("d_out", d_out)?,
        non_negative("rank", rank)?,
    )?)
}

/// A device pointer: non-null when `required`, and aligned to `align` bytes
/// (the element size, or 16 for the workspace) when non-null.
fn pointer(name: &'static str, p: u64, align: u64, required: bool) -> Outcome {
    if p == 0 {
        if required {
            return Err(invalid(name, "a non-null device pointer", "NULL".into()));
        }
        return Ok(());
    }
    if p % align != 0 {
        let expected = match align {
            2 => "a 2-byte aligned device pointer (the element size)",
            4 => "a 4-byte aligned device pointer (the element size)",
            _ => "a 16-byte aligned device pointer",
        };
        return Err(invalid(name, expected, format!("{p:#x}")));
    }
    Ok(())
}

fn device_ordinal(device: i32) -> Result<usize, Failure> {
    usize::try_from(device).map_err(|_| {
        invalid(
            "device",
            "a non-negative CUDA device ordinal",
            device.to_string(),
        )
    })
}

/// The element types, by their C code.
#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    F16,
    Bf16,
}

fn dtype(code: i32) -> Result<Dt, Failure> {
    const F32: i32 = singlora_dtype::SINGLORA_DTYPE_F32 as i32;
    const F16: i32 = singlora_dtype::SINGLORA_DTYPE_F16 as i32;
    const BF16: i32 = singlora_dtype::SINGLORA_DTYPE_BF16 as i32;
    match code {
        F32 => Ok(Dt::F32),
        F16 => Ok(Dt::F16),
        BF16 => Ok(Dt::Bf16),
        _ => Err(Failure {
            status: SINGLORA_ERROR_UNKNOWN_DTYPE,
            message: format!(
                "invalid argument `dtype`: expected SINGLORA_DTYPE_F32 ({F32}), \
                 SINGLORA_DTYPE_F16 ({F16}) or SINGLORA_DTYPE_BF16 ({BF16}), got {code}"
            ),
        }),
    }
}

impl Dt {
    fn size(self) -> u64 {
        match self {
            Dt::F32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
        }
    }
}

/// Runs `$body` with `$T` bound to the element type of `$dt`.
macro_rules! with_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            Dt::F32 => {
                type $T = f32;
                $body
            }
            Dt::F16 => {
                type $T = f16;
                $body
            }
            Dt::Bf16 => {
                type $T = bf16;
                $body
            }
        }
    };
}

// ------------------------------------------------------- devices, streams

/// One context per device ordinal, opened on first use and kept.
fn contexts() -> &'static Mutex<HashMap<usize, Arc<CudaContext>>> {
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// cuInit has succeeded in this process (so cuCtxGetCurrent works).
static DRIVER_READY: AtomicBool = AtomicBool::new(false);

/// Device `ordinal`'s primary context, with the singlora module loaded.
fn context(ordinal: usize) -> Result<Arc<CudaContext>, Failure> {
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
struct RestoreCurrent(Option<sys::CUcontext>);

impl RestoreCurrent {
    fn capture() -> Self {
        if !DRIVER_READY.load(Ordering::Acquire) {
            // SAFETY: only tries to dlopen libcuda; nothing is called through
            // it unless it is present.
            if !unsafe { sys::is_culib_present() } || cu::init().is_err() {
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
unsafe fn on_stream(
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

// ------------------------------------------------------------- the ABI

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The crate version, e.g. `"0.1.0"`: a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn singlora_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// [`SINGLORA_ABI_VERSION`]: a binding compares it with the header's.
#[no_mangle]
pub extern "C" fn singlora_abi_version() -> i32 {
    SINGLORA_ABI_VERSION
}

/// The message of the last failed call on the calling thread, or `""` when
/// that call succeeded (or none was made). Never NULL. The string lives in
/// thread-local storage: it stays valid until the next `singlora_*` call on
/// the same thread (other than this one and the other getters); copy it to
/// keep it.
#[no_mangle]
pub extern "C" fn singlora_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of a status code (`"SINGLORA_ERROR_NO_DRIVER"`), or
/// `"SINGLORA_UNKNOWN_STATUS"`: a static string, never NULL.
#[no_mangle]
pub extern "C" fn singlora_status_name(status: i32) -> *const c_char {
    STATUS_NAMES
        .iter()
        .find(|(code, _)| *code == status)
        .map_or(c"SINGLORA_UNKNOWN_STATUS", |(_, name)| name)
        .as_ptr()
}

/// Opens device `device` (its primary context) and loads the kernels into it,
/// which synchronises the device once. Optional: the first launch does the
/// same; call it first when launches will be captured in a CUDA graph.
/// Returns `SINGLORA_ERROR_NO_DRIVER`, `_NO_DEVICE` or `_UNSUPPORTED_DEVICE`
/// where the machine cannot run the kernels.
#[no_mangle]
pub extern "C" fn singlora_init(device: i32) -> i32 {
    ffi_guard(|| {
        let ordinal = device_ordinal(device)?;
        let _restore = RestoreCurrent::capture();
        context(ordinal)?;
        Ok(())
    })
}

/// Writes to `*out_bytes` the size of the workspace [`singlora_backward`]
/// needs for these dimensions, in bytes (`saved_s` nonzero: a saved S will be
/// passed; zero: S is recomputed and needs room). Needs no GPU.
///
/// # Safety
/// `out_bytes` must be NULL (refused) or point to writable memory for one
/// `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn singlora_backward_workspace_size(
    tokens: i64,
    d_in: i64,
    d_out: i64,
    rank: i64,
    saved_s: i32,
    out_bytes: *mut u64,
) -> i32 {
    ffi_guard(|| {
        if out_bytes.is_null() {
            return Err(invalid(
                "out_bytes",
                "a non-null pointer",
                "NULL".to_string(),
            ));
        }
        let dims = dims(tokens, d_in, d_out, rank)?;
        let len = backward_workspace_len(&dims, saved_s != 0)?;
        let bytes = len
            .checked_mul(4)
            .ok_or(Error::Overflow { what: "workspace" })?;
        // SAFETY: non-null (checked) and writable for one u64 (the caller's
        // contract).
        unsafe { out_bytes.write_unaligned(bytes as u64) };
        Ok(())
    })
}

/// The adapter forward on `stream`:
/// `S = X·A[:d_in]` (f32, stored when `s` is not 0) and
/// `Y = beta·Y + scale·S·A[:d_out]ᵀ`.
///
/// * `dtype`: `SINGLORA_DTYPE_{F32,F16,BF16}`, the type of X, A and Y.
/// * `device`: the CUDA device ordinal the pointers and the stream belong to.
/// * `x`: `tokens × d_in`, row stride `ld_x ≥ d_in` (elements); `a`:
///   `D × rank` contiguous, `D = max(d_in, d_out)`; `y`: `tokens × d_out`,
///   row stride `ld_y ≥ d_out`; `s`: `tokens × rank` f32 contiguous, or 0.
/// * `beta`: 0 (Y is overwritten, never read) or 1 (added onto).
/// * `x`, `y` may be 0 when `tokens` is 0; `a` never.
///
/// # Safety
/// Every non-zero pointer must be a device address of `device`'s primary
/// context (or unified memory it can access) holding the matrix described,
/// valid until the work completes on `stream`; `y` and `s` must not overlap
/// each other or the inputs. `stream` must be NULL, a special handle, or a
/// live stream of that context.
#[no_mangle]
pub unsafe extern "C" fn singlora_forward(
    dtype_code: i32,
    device: i32,
    tokens: i64,
    d_in: i64,
    d_out: i64,
    rank: i64,
    x: u64,
    ld_x: i64,
    a: u64,
    y: u64,
    ld_y: i64,
    s: u64,
    scale: f32,
    beta: f32,
    stream: *mut c_void,
) -> i32 {
    ffi_guard(|| {
        let dt = dtype(dtype_code)?;
        let dims = dims(tokens, d_in, d_out, rank)?;
        let ld_x = non_negative("ld_x", ld_x)?;
        let ld_y = non_negative("ld_y", ld_y)?;
        let any = usize::MAX;
        check_forward(
            &dims,
            any,
            ld_x,
            any,
            any,
            ld_y,
            (s != 0).then_some(any),
            scale,
            beta,
        )?;
        let has_rows = dims.tokens > 0;
        pointer("x", x, dt.size(), has_rows)?;
        pointer("a", a, dt.size(), true)?;
        pointer("y", y, dt.size(), has_rows)?;
        pointer("s", s, 4, false)?;
        let device = device_ordinal(device)?;
        // SAFETY: the caller's contract (see above) is forward_raw's: the
        // pointers address the matrices the validated dims and strides
        // describe, on `device`'s primary context, until completion.
        unsafe {
            on_stream(
                device,
                stream,
                |st| with_dtype!(dt, T => forward_raw::<T>(st, &dims, x, ld_x, a, y, ld_y, s, scale, beta)),
            )
        }
    })
}

/// The adapter backward on `stream`:
///
/// * `Q = G·A[:d_out]` (f32, in the workspace's first `tokens × rank` f32
///   once the work completes);
/// * `dX = dx_beta·dX + scale·Q·A[:d_in]ᵀ` when `dx` is not 0;
/// * `dA = da_beta·dA + scale·(Gᵀ·S into rows :d_out + Xᵀ·Q into rows :d_in)`
///   (`D × rank` f32, bitwise reproducible).
///
/// `g` = ∂L/∂Y (`tokens × d_out`, row stride `ld_g`), `x` the forward's
/// input (`ld_x`), `a` (`D × rank`), `saved_s` the forward's S (`tokens ×
/// rank` f32) or 0 to recompute it. `dx_beta` and `da_beta` are 0 or 1
/// (`ld_dx` and `dx_beta` are ignored when `dx` is 0). `workspace`: 16-byte
/// aligned, at least [`singlora_backward_workspace_size`] bytes (for the same
/// `saved_s` choice), `workspace_bytes` its size. `x`, `g`, `saved_s` may be
/// 0 when `tokens` is 0; `a`, `da` and `workspace` never.
///
/// # Safety
/// As for [`singlora_forward`]: every non-zero pointer addresses, on
/// `device`'s primary context and until the work completes on `stream`, the
/// matrix described; the outputs (`dx`, `da`, `workspace`) overlap nothing
/// else, and `workspace` really holds `workspace_bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn singlora_backward(
    dtype_code: i32,
    device: i32,
    tokens: i64,
    d_in: i64,
    d_out: i64,
    rank: i64,
    x: u64,
    ld_x: i64,
    g: u64,
    ld_g: i64,
    a: u64,
    saved_s: u64,
    scale: f32,
    dx: u64,
    ld_dx: i64,
    dx_beta: f32,
    da: u64,
    da_beta: f32,
    workspace: u64,
    workspace_bytes: u64,
    stream: *mut c_void,
) -> i32 {
    ffi_guard(|| {
        let dt = dtype(dtype_code)?;
        let dims = dims(tokens, d_in, d_out, rank)?;
        let ld_x = non_negative("ld_x", ld_x)?;
        let ld_g = non_negative("ld_g", ld_g)?;
        let ld_dx = if dx != 0 {
            non_negative("ld_dx", ld_dx)?
        } else {
            0
        };
        let any = usize::MAX;
        let lens = BackwardLens {
            x: any,
            ld_x,
            g: any,
            ld_g,
            a: any,
            saved_s: (saved_s != 0).then_some(any),
            dx: (dx != 0).then_some((any, ld_dx, dx_beta)),
            da: any,
            workspace: any,
        };
        check_backward(&dims, &lens, scale, da_beta)?;
        let has_rows = dims.tokens > 0;
        pointer("x", x, dt.size(), has_rows)?;
        pointer("g", g, dt.size(), has_rows)?;
        pointer("a", a, dt.size(), true)?;
        pointer("saved_s", saved_s, 4, false)?;
        pointer("dx", dx, dt.size(), false)?;
        pointer("da", da, 4, true)?;
        pointer("workspace", workspace, 16, true)?;
        let needed = (backward_workspace_len(&dims, saved_s != 0)? as u64).saturating_mul(4);
        if workspace_bytes < needed {
            return Err(Failure {
                status: SINGLORA_ERROR_INVALID_ARGUMENT,
                message: format!(
                    "buffer `workspace` too small: needs {needed} bytes \
                     (singlora_backward_workspace_size with saved_s = {}), \
                     workspace_bytes is {workspace_bytes}",
                    (saved_s != 0) as i32
                ),
            });
        }
        let device = device_ordinal(device)?;
        let raw = crate::backward::RawBackward {
            x,
            ld_x,
            g,
            ld_g,
            a,
            saved_s,
            scale,
            dx,
            ld_dx,
            dx_beta: if dx != 0 { dx_beta } else { 0.0 },
            da,
            da_beta,
            workspace,
        };
        // SAFETY: the caller's contract (see above) is backward_raw's, and the
        // workspace holds at least the layout's bytes (checked above).
        unsafe {
            on_stream(
                device,
                stream,
                |st| with_dtype!(dt, T => backward_raw::<T>(st, &dims, &raw)),
            )
        }
    })
}

/// Shared body of merge and unmerge.
///
/// # Safety
/// As for [`singlora_merge`].
#[allow(clippy::too_many_arguments)]
unsafe fn fold(
    dtype_code: i32,
    device: i32,
    d_in: i64,
    d_out: i64,
    rank: i64,
    w: u64,
    ld_w: i64,
    a: u64,
    scale: f32,
    stream: *mut c_void,
    undo: bool,
) -> i32 {
    ffi_guard(|| {
        let dt = dtype(dtype_code)?;
        let dims = dims(0, d_in, d_out, rank)?;
        let ld_w = non_negative("ld_w", ld_w)?;
        check_merge(&dims, usize::MAX, ld_w, usize::MAX, scale)?;
        pointer("w", w, dt.size(), true)?;
        pointer("a", a, dt.size(), true)?;
        let device = device_ordinal(device)?;
        // SAFETY: the caller's contract is merge_raw's: `w` and `a` address
        // the matrices described, on `device`'s context, until completion.
        unsafe {
            on_stream(device, stream, |st| {
                with_dtype!(dt, T => if undo {
                    unmerge_raw::<T>(st, &dims, w, ld_w, a, scale)
                } else {
                    merge_raw::<T>(st, &dims, w, ld_w, a, scale)
                })
            })
        }
    })
}

/// Folds the adapter into the frozen weight in place:
/// `W = W + scale·A[:d_out]·A[:d_in]ᵀ`, `W` being `d_out × d_in` with row
/// stride `ld_w ≥ d_in` (the `nn.Linear` weight), `a` `D × rank`
/// contiguous, both of `dtype`. The only operation that touches a
/// `d_out × d_in` matrix, because it is the weight.
///
/// # Safety
/// `w` and `a` must be device addresses of `device`'s primary context
/// holding the matrices described, valid until the work completes on
/// `stream`, and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn singlora_merge(
    dtype_code: i32,
    device: i32,
    d_in: i64,
    d_out: i64,
    rank: i64,
    w: u64,
    ld_w: i64,
    a: u64,
    scale: f32,
    stream: *mut c_void,
) -> i32 {
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        fold(
            dtype_code, device, d_in, d_out, rank, w, ld_w, a, scale, stream, false,
        )
    }
}

/// Takes a merged adapter back out: `W = W − scale·A[:d_out]·A[:d_in]ᵀ`, with
/// the same arguments as the [`singlora_merge`] it undoes (the result is
/// within one rounding per element of the weight before the merge).
///
/// # Safety
/// As for [`singlora_merge`].
#[no_mangle]
pub unsafe extern "C" fn singlora_unmerge(
    dtype_code: i32,
    device: i32,
    d_in: i64,
    d_out: i64,
    rank: i64,
    w: u64,
    ld_w: i64,
    a: u64,
    scale: f32,
    stream: *mut c_void,
) -> i32 {
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        fold(
            dtype_code, device, d_in, d_out, rank, w, ld_w, a, scale, stream, true,
        )
    }
}
