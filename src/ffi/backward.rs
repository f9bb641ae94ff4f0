//! The C ABI of the backward: `singlora_backward`.

use std::ffi::c_void;

use half::{bf16, f16};

use crate::ffi::args::{
    backward_kernel, device_ordinal, dims, dropout, dtype, non_negative, pointer, scale,
    with_dtype, Dt,
};
use crate::ffi::context::on_stream;
use crate::ffi::status::ffi_guard;
use crate::ffi::status::{Failure, SINGLORA_ERROR_INVALID_ARGUMENT};
use crate::ops::backward::{backward_raw, BackwardPtrs, BackwardShape};

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
/// rank` f32) or 0 to recompute it. `scale`, `scale_ptr`: the scale by value
/// (`scale_ptr` = 0) or a device `float` (see [`singlora_forward`](crate::ffi::singlora_forward)). `dx_beta` and `da_beta` are 0 or 1
/// (`ld_dx` and `dx_beta` are ignored when `dx` is 0). `workspace`: 16-byte
/// aligned, at least [`singlora_backward_workspace_size`](crate::ffi::singlora_backward_workspace_size) bytes (for the same
/// `saved_s` choice), `workspace_bytes` its size. `x`, `g`, `saved_s` may be
/// 0 when `tokens` is 0; `a`, `da` and `workspace` never. `dropout_p`,
/// `dropout_seed`, `dropout_offset`: the forward's dropout (X dropped in
/// `Xᵀ·Q` and in a recomputed S, dX's adapter term masked). `kernel`:
/// `SINGLORA_BACKWARD_SPLIT` or `SINGLORA_BACKWARD_FUSED`
/// ([`BackwardKernel`](crate::BackwardKernel)).
///
/// # Safety
/// As for [`singlora_forward`](crate::ffi::singlora_forward): every non-zero pointer addresses, on
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
    scale_value: f32,
    scale_ptr: u64,
    dx: u64,
    ld_dx: i64,
    dx_beta: f32,
    da: u64,
    da_beta: f32,
    workspace: u64,
    workspace_bytes: u64,
    dropout_p: f64,
    dropout_seed: u64,
    dropout_offset: u64,
    kernel: i32,
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
        let scale = scale(scale_value, scale_ptr);
        let shape = BackwardShape::new(&dims, ld_x, ld_g, dx_arg, saved_s != 0, scale, da_beta)?
            .with_dropout(dropout(dropout_p, dropout_seed, dropout_offset)?)?
            .with_kernel(backward_kernel(kernel)?);
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
