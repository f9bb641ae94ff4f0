//! The C ABI's queries and set-up (declared in include/singlora.h): the
//! versions, the last error, status names, device initialisation and the
//! workspace query. The launches are in forward.rs, backward.rs, merge.rs.

use std::ffi::c_char;

use crate::error::Error;
use crate::ffi::args::{device_ordinal, dims, dropout, invalid, non_negative};
use crate::ffi::context::{context, RestoreCurrent};
use crate::ffi::status::{ffi_guard, LAST_ERROR, SINGLORA_ABI_VERSION, STATUS_NAMES};
use crate::ops::backward::backward_workspace_len;

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

/// Writes to `*out_bytes` the size of the workspace [`singlora_backward`](crate::ffi::singlora_backward)
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

/// The dropout mask of a `tokens × cols` matrix on the host, the bits the
/// kernels use (include/singlora.h, "Dropout"): `keep[t·cols + c]` = 1
/// where element `(t, c)` is kept, 0 where dropped. No device is touched.
///
/// # Safety
/// `keep` must be a host pointer to `tokens · cols` writable bytes (it may
/// be NULL only when that is 0).
#[no_mangle]
pub unsafe extern "C" fn singlora_dropout_mask(
    dropout_p: f64,
    dropout_seed: u64,
    dropout_offset: u64,
    tokens: i64,
    cols: i64,
    keep: *mut u8,
) -> i32 {
    ffi_guard(|| {
        let d = dropout(dropout_p, dropout_seed, dropout_offset)?;
        let tokens = non_negative("tokens", tokens)?;
        let cols = non_negative("cols", cols)?;
        d.check_tokens(tokens)?;
        let Some(n) = tokens.checked_mul(cols) else {
            return Err(invalid(
                "cols",
                "tokens · cols within the address space",
                cols.to_string(),
            ));
        };
        if n == 0 {
            return Ok(());
        }
        if keep.is_null() {
            return Err(invalid("keep", "a non-null host pointer", "NULL".into()));
        }
        // SAFETY: the caller's contract: `keep` holds tokens · cols bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(keep, n) };
        for (o, k) in out.iter_mut().zip(d.mask(tokens, cols)) {
            *o = k as u8;
        }
        Ok(())
    })
}
