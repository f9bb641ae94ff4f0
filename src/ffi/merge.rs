//! The C ABI of merge and unmerge.

use std::ffi::c_void;

use half::{bf16, f16};

use crate::ffi::args::{device_ordinal, dims, dtype, non_negative, pointer, scale, with_dtype, Dt};
use crate::ffi::context::on_stream;
use crate::ffi::status::ffi_guard;
use crate::ops::merge::{merge_raw, MergeShape};
use crate::ops::scale::RawScale;

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
/// contiguous, both of `dtype`; `scale`, `scale_ptr` as for
/// [`singlora_forward`](crate::ffi::singlora_forward). The only operation that touches a
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
    scale_value: f32,
    scale_ptr: u64,
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
            scale(scale_value, scale_ptr),
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
    scale_value: f32,
    scale_ptr: u64,
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
            scale(scale_value, scale_ptr),
            stream,
            true,
        )
    }
}
