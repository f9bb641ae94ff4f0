//! forward: the launcher of kernels/forward.cu.
//!
//! `S = X·A[:d_in]` (f32, optional) and `Y = beta·Y + s·S·A[:d_out]ᵀ` in one
//! launch. The same kernel runs the backward's `dX` with G in X's place, so
//! the launch logic ([`ShrinkExpand`]) is shared with [`crate::backward`].

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::device::{kernel_name, launch, Kernels};
use crate::dims::{check_beta, check_len, check_matrix, check_scale, Dims};
use crate::dtype::DType;
use crate::error::Result;
use crate::params::{singlora_forward_params, SINGLORA_DECODE_CLUSTER, SINGLORA_DECODE_MAX_RANK};

/// Runs the adapter forward on `stream`:
///
/// * `s` (if given, `tokens × rank` f32, contiguous) ← `X · A[:d_in]`
/// * `y` (`tokens × d_out`, row stride `ld_y`) ← `beta·y + scale · S · A[:d_out]ᵀ`
///
/// `x` is `tokens × d_in` with row stride `ld_x`; `a` is `D × rank`,
/// contiguous. `beta` is 0 (overwrite; `y` is never read) or 1 (add onto the
/// frozen layer's output). A row stride larger than the row lets `y` be a
/// column slice of a wider output (fused QKV): elements outside the slice are
/// never touched.
///
/// Every argument is checked before anything is enqueued; a refused call
/// leaves `y` and `s` untouched. The call only enqueues work (no allocation,
/// no synchronisation), so it can be captured in a CUDA graph.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    x: &impl DevicePtr<T>,
    ld_x: usize,
    a: &impl DevicePtr<T>,
    y: &mut impl DevicePtrMut<T>,
    ld_y: usize,
    s: Option<&mut dyn DevicePtrMut<f32>>,
    scale: f32,
    beta: f32,
) -> Result<()> {
    check_forward(
        dims,
        x.len(),
        ld_x,
        a.len(),
        y.len(),
        ld_y,
        s.as_ref().map(|s| s.len()),
        scale,
        beta,
    )?;
    let (x_ptr, _x_rec) = x.device_ptr(stream);
    let (a_ptr, _a_rec) = a.device_ptr(stream);
    let (y_ptr, _y_rec) = y.device_ptr_mut(stream);
    let (s_ptr, _s_rec) = match s {
        Some(s) => {
            let (p, rec) = s.device_ptr_mut(stream);
            (p, Some(rec))
        }
        None => (0, None),
    };
    // SAFETY: the lengths checked above cover every element the kernel
    // touches for these dims and strides; the pointers come from borrows that
    // live (with cudarc's event records) until the launch is enqueued, and
    // the borrow rules keep y and s apart from x and a.
    unsafe {
        forward_raw::<T>(
            stream, dims, x_ptr, ld_x, a_ptr, y_ptr, ld_y, s_ptr, scale, beta,
        )
    }
}

/// The same forward on raw device pointers, for frameworks that own their
/// memory (`0` for `s` stores no S).
///
/// # Safety
/// `x`, `a`, `y` and `s` must be device pointers of `stream`'s context
/// addressing at least the matrices `dims`, `ld_x` and `ld_y` describe (see
/// [`forward`]), valid until the kernel completes; `y` and `s` must not
/// overlap any other argument.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward_raw<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    x: u64,
    ld_x: usize,
    a: u64,
    y: u64,
    ld_y: usize,
    s: u64,
    scale: f32,
    beta: f32,
) -> Result<()> {
    check_forward_args(dims, ld_x, ld_y, scale, beta)?;
    let kernels = Kernels::for_stream(stream)?;
    if dims.tokens == 0 {
        return Ok(());
    }
    let op = ShrinkExpand {
        input: x,
        ld_in: ld_x,
        k_dim: dims.d_in,
        a,
        out: y,
        ld_out: ld_y,
        n_dim: dims.d_out,
        s_out: s,
        tokens: dims.tokens,
        rank: dims.rank,
        scale,
        beta,
    };
    op.launch::<T>(stream, &kernels)
}

/// Every check [`forward`] runs before it enqueues anything, given the
/// buffers' lengths in elements (`s_len`: `None` when no S is stored). Needs
/// no GPU.
#[allow(clippy::too_many_arguments)]
pub fn check_forward(
    dims: &Dims,
    x_len: usize,
    ld_x: usize,
    a_len: usize,
    y_len: usize,
    ld_y: usize,
    s_len: Option<usize>,
    scale: f32,
    beta: f32,
) -> Result<()> {
    check_forward_args(dims, ld_x, ld_y, scale, beta)?;
    check_matrix("x", "ld_x", x_len, dims.tokens, dims.d_in, ld_x)?;
    check_len("a", a_len, dims.a_len())?;
    check_matrix("y", "ld_y", y_len, dims.tokens, dims.d_out, ld_y)?;
    if let Some(n) = s_len {
        check_len("s", n, dims.s_len())?;
    }
    Ok(())
}

/// The checks that need no buffer lengths.
fn check_forward_args(dims: &Dims, ld_x: usize, ld_y: usize, scale: f32, beta: f32) -> Result<()> {
    dims.validate()?;
    check_matrix("x", "ld_x", usize::MAX, dims.tokens, dims.d_in, ld_x)?;
    check_matrix("y", "ld_y", usize::MAX, dims.tokens, dims.d_out, ld_y)?;
    check_scale(scale)?;
    check_beta("beta", beta)
}

/// One launch of the shrink-expand kernel: `s_out = input · A[:k_dim]`,
/// `out = beta·out + scale · s_out · A[:n_dim]ᵀ` (`out == 0`: shrink only).
pub(crate) struct ShrinkExpand {
    pub input: u64,
    pub ld_in: usize,
    pub k_dim: usize,
    pub a: u64,
    pub out: u64,
    pub ld_out: usize,
    pub n_dim: usize,
    pub s_out: u64,
    pub tokens: usize,
    pub rank: usize,
    pub scale: f32,
    pub beta: f32,
}

/// A pointer and a row stride allow 16-byte accesses.
pub(crate) fn vec_ok<T>(ptr: u64, ld: usize) -> i32 {
    let bytes = std::mem::size_of::<T>();
    (ptr % 16 == 0 && (ld * bytes) % 16 == 0) as i32
}

impl ShrinkExpand {
    /// # Safety
    /// The pointers must address the matrices the fields describe (validated
    /// dims, strides ≥ rows), on `stream`'s context, until completion.
    pub(crate) unsafe fn launch<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
    ) -> Result<()> {
        let sm = kernels.sm_count() as usize;
        let normal = kernels.kernel(&kernel_name::<T>("forward", self.rank))?;
        let bm = normal.info.block_rows as usize;
        let bn = normal.info.block_cols as usize;
        let col_chunks = self.n_dim.div_ceil(bn);
        let cl = SINGLORA_DECODE_CLUSTER as usize;
        // Decode sizes on sm_90: one row block, its S reduction split over a
        // cluster, column groups of `cl` blocks (about two blocks per SM).
        let decode = self.out != 0
            && self.tokens <= bm
            && self.rank <= SINGLORA_DECODE_MAX_RANK as usize
            && kernels.has_clusters();
        let (kernel, grid, cols_per_block) = if decode {
            let kernel = kernels.kernel(&kernel_name::<T>("forward_decode", self.rank))?;
            let groups = col_chunks.div_ceil(cl).min((2 * sm).div_ceil(cl)).max(1);
            let cols_per_block = col_chunks.div_ceil(groups * cl) * bn;
            let groups = self.n_dim.div_ceil(cols_per_block * cl);
            (kernel, (cl as u32, groups as u32, 1), cols_per_block)
        } else {
            let row_blocks = self.tokens.div_ceil(bm);
            // Few token rows cannot fill the GPU: split the output columns over
            // blocks that each recompute their rows' S (a re-read of few rows).
            let splits = if self.out == 0 || row_blocks >= sm {
                1
            } else {
                col_chunks.min(sm.div_ceil(row_blocks))
            };
            let cols_per_block = col_chunks.div_ceil(splits) * bn;
            let splits = self.n_dim.div_ceil(cols_per_block);
            let grid_x = u32::try_from(row_blocks).map_err(|_| crate::Error::Overflow {
                what: "forward grid (tokens / 64)",
            })?;
            (normal, (grid_x, splits as u32, 1), cols_per_block)
        };
        let params = singlora_forward_params {
            in_: self.input,
            a: self.a,
            out: self.out,
            s_out: self.s_out,
            tokens: self.tokens as i64,
            ld_in: self.ld_in as i64,
            ld_out: self.ld_out as i64,
            k_dim: self.k_dim as i32,
            n_dim: self.n_dim as i32,
            rank: self.rank as i32,
            cols_per_block: cols_per_block.min(i32::MAX as usize) as i32,
            scale: self.scale,
            beta: self.beta,
            in_vec: vec_ok::<T>(self.input, self.ld_in),
            out_vec: vec_ok::<T>(self.out, self.ld_out),
            a_vec: vec_ok::<T>(self.a, self.rank),
            pad_: 0,
        };
        launch(stream, kernel, grid, &params)
    }
}
