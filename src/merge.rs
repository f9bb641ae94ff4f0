//! merge: the launcher of kernels/merge.cu.
//!
//! Folds the adapter into the frozen weight in place for inference,
//! `W0 ← W0 + s·A[:d_out]·A[:d_in]ᵀ` ([`merge`]), and takes it back out
//! ([`unmerge`]). The product is formed in f32 in a fixed order and rounded
//! to f32 once, identically both ways, so merge then unmerge returns each
//! element of an f32 `W0` to within one rounding of the add (and of the
//! subtract); a 16-bit `W0` is rounded to its type after each.
//!
//! This is the only operation of the crate that touches a `d_out × d_in`
//! matrix, because it is the weight: each element is read and written once.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::device::{launch, typed_kernel_name, Kernels};
use crate::dims::{check_len, check_matrix, check_scale, Dims};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::forward::vec_ok;
use crate::params::{singlora_merge_params, SINGLORA_MERGE_BM, SINGLORA_MERGE_BN};

/// `w` (`d_out × d_in`, row stride `ld_w`) ← `w + scale · A[:d_out] · A[:d_in]ᵀ`.
/// `dims.tokens` is not used.
///
/// Every argument is checked before anything is enqueued; a refused call
/// leaves `w` untouched. The call only enqueues work.
pub fn merge<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: &mut impl DevicePtrMut<T>,
    ld_w: usize,
    a: &impl DevicePtr<T>,
    scale: f32,
) -> Result<()> {
    fold(stream, dims, w, ld_w, a, scale)
}

/// `w` ← `w − scale · A[:d_out] · A[:d_in]ᵀ`: undoes [`merge`] with the same
/// `a` and `scale` (to within one rounding per element).
pub fn unmerge<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: &mut impl DevicePtrMut<T>,
    ld_w: usize,
    a: &impl DevicePtr<T>,
    scale: f32,
) -> Result<()> {
    check_scale(scale)?;
    fold(stream, dims, w, ld_w, a, -scale)
}

fn fold<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: &mut impl DevicePtrMut<T>,
    ld_w: usize,
    a: &impl DevicePtr<T>,
    scale: f32,
) -> Result<()> {
    check_merge(dims, w.len(), ld_w, a.len(), scale)?;
    let (a_ptr, _a_rec) = a.device_ptr(stream);
    let (w_ptr, _w_rec) = w.device_ptr_mut(stream);
    // SAFETY: the lengths checked above cover every element the kernel
    // touches; the borrows (and cudarc's event records) live until the
    // launch is enqueued, and `w` is borrowed mutably, apart from `a`.
    unsafe { merge_raw::<T>(stream, dims, w_ptr, ld_w, a_ptr, scale) }
}

/// [`merge`] on raw device pointers.
///
/// # Safety
/// `w` must address a `d_out × d_in` matrix of `T` with row stride `ld_w`
/// and `a` a contiguous `D × rank` matrix, on `stream`'s context, valid until
/// the kernel completes; `w` must not overlap `a`.
pub unsafe fn merge_raw<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: u64,
    ld_w: usize,
    a: u64,
    scale: f32,
) -> Result<()> {
    check_merge_args(dims, ld_w, scale)?;
    let kernels = Kernels::for_stream(stream)?;
    let kernel = kernels.kernel(&typed_kernel_name::<T>("merge"))?;
    let grid_x = dims.d_in.div_ceil(SINGLORA_MERGE_BN as usize);
    let grid_y = dims.d_out.div_ceil(SINGLORA_MERGE_BM as usize);
    // The CUDA grid's y extent is limited to 65535 blocks.
    if grid_y > 65535 {
        return Err(Error::InvalidDim {
            name: "d_out",
            expected: format!("1..={} for merge", 65535 * SINGLORA_MERGE_BM as usize),
            actual: dims.d_out as u64,
        });
    }
    let elem = std::mem::size_of::<T>();
    let params = singlora_merge_params {
        w,
        a,
        ld_w: ld_w as i64,
        d_in: dims.d_in as i32,
        d_out: dims.d_out as i32,
        rank: dims.rank as i32,
        scale,
        w_pair: (w % (2 * elem as u64) == 0 && ld_w % 2 == 0) as i32,
        w_vec: vec_ok::<T>(w, ld_w),
    };
    launch(stream, kernel, (grid_x as u32, grid_y as u32, 1), &params)
}

/// [`unmerge`] on raw device pointers.
///
/// # Safety
/// As for [`merge_raw`].
pub unsafe fn unmerge_raw<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: u64,
    ld_w: usize,
    a: u64,
    scale: f32,
) -> Result<()> {
    check_scale(scale)?;
    merge_raw::<T>(stream, dims, w, ld_w, a, -scale)
}

/// Every check [`merge`] and [`unmerge`] run before they enqueue anything,
/// given the buffers' lengths in elements. Needs no GPU.
pub fn check_merge(dims: &Dims, w_len: usize, ld_w: usize, a_len: usize, scale: f32) -> Result<()> {
    check_merge_args(dims, ld_w, scale)?;
    check_matrix("w", "ld_w", w_len, dims.d_out, dims.d_in, ld_w)?;
    check_len("a", a_len, dims.a_len())
}

fn check_merge_args(dims: &Dims, ld_w: usize, scale: f32) -> Result<()> {
    // tokens plays no part; validate the weight's shape as if one token.
    Dims { tokens: 0, ..*dims }.validate()?;
    check_matrix("w", "ld_w", usize::MAX, dims.d_out, dims.d_in, ld_w)?;
    check_scale(scale)
}
