//! The exported functions of the C ABI (declared in include/singlora.h).

use std::ffi::{c_char, c_void};

use half::{bf16, f16};

use crate::error::Error;
use crate::ffi::args::{
    device_ordinal, dims, dtype, invalid, non_negative, pointer, with_dtype, Dt,
};
use crate::ffi::context::{context, on_stream, RestoreCurrent};
use crate::ffi::status::{
    ffi_guard, Failure, LAST_ERROR, SINGLORA_ABI_VERSION, SINGLORA_ERROR_INVALID_ARGUMENT,
    STATUS_NAMES,
};
use crate::ops::backward::{backward_raw, backward_workspace_len, BackwardPtrs, BackwardShape};
use crate::ops::forward::{forward_raw, ForwardPtrs, ForwardShape};
use crate::ops::merge::{merge_raw, MergeShape};
use crate::ops::scale::RawScale;

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
    let call = ForwardCall {
        dtype_code,
        device,
        dims: [tokens, d_in, d_out, rank],
        x,
        ld_x,
        a,
        y,
        ld_y,
        s,
        beta,
    };
    // SAFETY: the caller's contract, forwarded.
    unsafe { call.run(RawScale::Value(scale), stream) }
}

/// [`singlora_forward`] with the scale read from the device when the
/// kernels run: `scale_ptr` is a 4-byte aligned device `float` of the same
/// context (ABI 2), so a captured CUDA graph follows the scale as it changes.
///
/// # Safety
/// As for [`singlora_forward`]; `scale_ptr` must address one `float`, valid
/// until the work completes.
#[no_mangle]
pub unsafe extern "C" fn singlora_forward_dscale(
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
    scale_ptr: u64,
    beta: f32,
    stream: *mut c_void,
) -> i32 {
    let call = ForwardCall {
        dtype_code,
        device,
        dims: [tokens, d_in, d_out, rank],
        x,
        ld_x,
        a,
        y,
        ld_y,
        s,
        beta,
    };
    // SAFETY: the caller's contract, forwarded.
    unsafe { call.run(RawScale::Device(scale_ptr), stream) }
}

/// The C arguments of a forward, but the scale and the stream.
struct ForwardCall {
    dtype_code: i32,
    device: i32,
    dims: [i64; 4],
    x: u64,
    ld_x: i64,
    a: u64,
    y: u64,
    ld_y: i64,
    s: u64,
    beta: f32,
}

impl ForwardCall {
    /// # Safety
    /// As for [`singlora_forward`].
    unsafe fn run(self, scale: RawScale, stream: *mut c_void) -> i32 {
        let ForwardCall {
            dtype_code,
            device,
            dims: [tokens, d_in, d_out, rank],
            x,
            ld_x,
            a,
            y,
            ld_y,
            s,
            beta,
        } = self;
        ffi_guard(|| {
            let dt = dtype(dtype_code)?;
            let dims = dims(tokens, d_in, d_out, rank)?;
            let ld_x = non_negative("ld_x", ld_x)?;
            let ld_y = non_negative("ld_y", ld_y)?;
            let shape = ForwardShape::new(&dims, ld_x, ld_y, scale, beta)?;
            let has_rows = dims.tokens() > 0;
            pointer("x", x, dt.size(), has_rows)?;
            pointer("a", a, dt.size(), true)?;
            pointer("y", y, dt.size(), has_rows)?;
            pointer("s", s, 4, false)?;
            let device = device_ordinal(device)?;
            let ptrs = ForwardPtrs { x, a, y, s };
            shape.check_ptrs(&ptrs, dt.size() as usize)?;
            // SAFETY: the caller's contract (see above) is forward_raw's: the
            // pointers address the matrices the checked shape describes, on
            // `device`'s primary context, until completion.
            unsafe {
                on_stream(
                    device,
                    stream,
                    |st| with_dtype!(dt, T => forward_raw::<T>(st, &shape, &ptrs)),
                )
            }
        })
    }
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
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        backward_call(
            dtype_code,
            device,
            tokens,
            d_in,
            d_out,
            rank,
            x,
            ld_x,
            g,
            ld_g,
            a,
            saved_s,
            RawScale::Value(scale),
            dx,
            ld_dx,
            dx_beta,
            da,
            da_beta,
            workspace,
            workspace_bytes,
            stream,
        )
    }
}

/// [`singlora_backward`] with the scale read from the device when the
/// kernels run (`scale_ptr`: a 4-byte aligned device `float`; ABI 2).
///
/// # Safety
/// As for [`singlora_backward`]; `scale_ptr` must address one `float`.
#[no_mangle]
pub unsafe extern "C" fn singlora_backward_dscale(
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
    scale_ptr: u64,
    dx: u64,
    ld_dx: i64,
    dx_beta: f32,
    da: u64,
    da_beta: f32,
    workspace: u64,
    workspace_bytes: u64,
    stream: *mut c_void,
) -> i32 {
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        backward_call(
            dtype_code,
            device,
            tokens,
            d_in,
            d_out,
            rank,
            x,
            ld_x,
            g,
            ld_g,
            a,
            saved_s,
            RawScale::Device(scale_ptr),
            dx,
            ld_dx,
            dx_beta,
            da,
            da_beta,
            workspace,
            workspace_bytes,
            stream,
        )
    }
}

/// The body of [`singlora_backward`] and its `_dscale` form.
///
/// # Safety
/// As for [`singlora_backward`].
#[allow(clippy::too_many_arguments)]
unsafe fn backward_call(
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
    scale: RawScale,
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
        let dx_arg = if dx != 0 {
            Some((non_negative("ld_dx", ld_dx)?, dx_beta))
        } else {
            None
        };
        let shape = BackwardShape::new(&dims, ld_x, ld_g, dx_arg, saved_s != 0, scale, da_beta)?;
        let has_rows = dims.tokens() > 0;
        pointer("x", x, dt.size(), has_rows)?;
        pointer("g", g, dt.size(), has_rows)?;
        pointer("a", a, dt.size(), true)?;
        pointer("saved_s", saved_s, 4, false)?;
        pointer("dx", dx, dt.size(), false)?;
        pointer("da", da, 4, true)?;
        pointer("workspace", workspace, 16, true)?;
        let needed = (shape.workspace_len() as u64).saturating_mul(4);
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
        let ptrs = BackwardPtrs {
            x,
            g,
            a,
            saved_s,
            dx,
            da,
            workspace,
        };
        shape.check_ptrs(&ptrs, dt.size() as usize)?;
        // SAFETY: the caller's contract (see above) is backward_raw's, and the
        // workspace holds at least the layout's bytes (checked above).
        unsafe {
            on_stream(
                device,
                stream,
                |st| with_dtype!(dt, T => backward_raw::<T>(st, &shape, &ptrs)),
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
    scale: RawScale,
    stream: *mut c_void,
    undo: bool,
) -> i32 {
    ffi_guard(|| {
        let dt = dtype(dtype_code)?;
        let dims = dims(0, d_in, d_out, rank)?;
        let ld_w = non_negative("ld_w", ld_w)?;
        let shape = MergeShape::new(&dims, ld_w, scale)?;
        let shape = if undo { shape.undo() } else { shape };
        pointer("w", w, dt.size(), true)?;
        pointer("a", a, dt.size(), true)?;
        shape.check_ptrs(w, a, dt.size() as usize)?;
        let device = device_ordinal(device)?;
        // SAFETY: the caller's contract is merge_raw's: `w` and `a` address
        // the matrices described, on `device`'s context, until completion.
        unsafe {
            on_stream(
                device,
                stream,
                |st| with_dtype!(dt, T => merge_raw::<T>(st, &shape, w, a)),
            )
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
            dtype_code,
            device,
            d_in,
            d_out,
            rank,
            w,
            ld_w,
            a,
            RawScale::Value(scale),
            stream,
            false,
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
            dtype_code,
            device,
            d_in,
            d_out,
            rank,
            w,
            ld_w,
            a,
            RawScale::Value(scale),
            stream,
            true,
        )
    }
}

/// [`singlora_merge`] with the scale read from the device (`scale_ptr`: a
/// 4-byte aligned device `float`; ABI 2).
///
/// # Safety
/// As for [`singlora_merge`]; `scale_ptr` must address one `float`.
#[no_mangle]
pub unsafe extern "C" fn singlora_merge_dscale(
    dtype_code: i32,
    device: i32,
    d_in: i64,
    d_out: i64,
    rank: i64,
    w: u64,
    ld_w: i64,
    a: u64,
    scale_ptr: u64,
    stream: *mut c_void,
) -> i32 {
    let scale = RawScale::Device(scale_ptr);
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        fold(
            dtype_code, device, d_in, d_out, rank, w, ld_w, a, scale, stream, false,
        )
    }
}

/// [`singlora_unmerge`] with the scale read from the device (ABI 2).
///
/// # Safety
/// As for [`singlora_merge_dscale`].
#[no_mangle]
pub unsafe extern "C" fn singlora_unmerge_dscale(
    dtype_code: i32,
    device: i32,
    d_in: i64,
    d_out: i64,
    rank: i64,
    w: u64,
    ld_w: i64,
    a: u64,
    scale_ptr: u64,
    stream: *mut c_void,
) -> i32 {
    let scale = RawScale::Device(scale_ptr);
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        fold(
            dtype_code, device, d_in, d_out, rank, w, ld_w, a, scale, stream, true,
        )
    }
}
