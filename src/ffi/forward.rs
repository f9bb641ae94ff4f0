//! The C ABI of the forward: `singlora_forward`.

use std::ffi::c_void;

use half::{bf16, f16};

use crate::ffi::args::{
    device_ordinal, dims, dropout, dtype, non_negative, pointer, scale, with_dtype, Dt,
};
use crate::ffi::context::on_stream;
use crate::ffi::status::ffi_guard;
use crate::ops::forward::{forward_raw, ForwardPtrs, ForwardShape};

/// The adapter forward on `stream`:
/// `S = X·A[:d_in]` (f32, stored when `s` is not 0) and
/// `Y = beta·Y + scale·S·A[:d_out]ᵀ`.
///
/// * `dtype`: `SINGLORA_DTYPE_{F32,F16,BF16}`, the type of X, A and Y.
/// * `device`: the CUDA device ordinal the pointers and the stream belong to.
/// * `x`: `tokens × d_in`, row stride `ld_x ≥ d_in` (elements); `a`:
///   `D × rank` contiguous, `D = max(d_in, d_out)`; `y`: `tokens × d_out`,
///   row stride `ld_y ≥ d_out`; `s`: `tokens × rank` f32 contiguous, or 0.
/// * `scale`, `scale_ptr`: the scale by value (`scale_ptr` = 0), or a device
///   `float` read when the kernels run (include/singlora.h, "The scale").
/// * `beta`: 0 (Y is overwritten, never read) or 1 (added onto).
/// * `dropout_p`, `dropout_seed`, `dropout_offset`: the adapter's dropout
///   (`S = drop(X)·A[:d_in]`; see [`crate::Dropout`]); `dropout_p` 0: none.
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
    scale_value: f32,
    scale_ptr: u64,
    beta: f32,
    dropout_p: f64,
    dropout_seed: u64,
    dropout_offset: u64,
    stream: *mut c_void,
) -> i32 {
    ffi_guard(|| {
        let dt = dtype(dtype_code)?;
        let dims = dims(tokens, d_in, d_out, rank)?;
        let ld_x = non_negative("ld_x", ld_x)?;
        let ld_y = non_negative("ld_y", ld_y)?;
        let shape = ForwardShape::new(&dims, ld_x, ld_y, scale(scale_value, scale_ptr), beta)?
            .with_dropout(dropout(dropout_p, dropout_seed, dropout_offset)?)?;
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
