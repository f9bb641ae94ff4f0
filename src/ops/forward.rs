//! forward: the launcher of kernels/forward/.
//!
//! `S = X·A[:d_in]` (f32, optional) and `Y = beta·Y + s·S·A[:d_out]ᵀ` in one
//! launch. The same kernel runs the backward's `dX` with G in X's place, so
//! the launch logic (`ShrinkExpand`) is shared with [`crate::ops::backward`].
//!
//! Three faces, as every op: [`check_forward`] (no GPU), [`forward_raw`]
//! (raw pointers, checked shapes) and [`forward`] (cudarc buffers).
//!
//! Two kernels ([`ForwardKernel`]): the portable one (every GPU; the
//! default) and, on sm_90a, an opt-in one whose tiles move by TMA
//! (kernels/forward/forward_tma_sm90.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::dims::{check_beta, check_len, Dims, Matrix};
use crate::dropout::Dropout;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::regions::{check_disjoint, Region};
use crate::ops::scale::{RawScale, Scale};
use crate::params::{
    singlora_forward_params, singlora_forward_tma_params, SINGLORA_DECODE_CLUSTER,
    SINGLORA_FORWARD_TMA_BOX,
};
use crate::runtime::launch::{launch, or_null, vec_ok};
use crate::runtime::registry::{Family, Kernel, KernelId, Kernels};
use crate::runtime::tma::{describable, tensor_map_2d};

/// Which kernel runs a forward. Both compute the same sums in the same
/// order per tile and meet the same error bars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardKernel {
    /// cp.async tiles through shared memory (kernels/forward/forward.cu,
    /// shrink_expand.cuh); every GPU and shape: the proven default.
    #[default]
    Portable,
    /// Tiles moved by the bulk tensor engine (TMA) onto mbarriers, stored
    /// back by TMA (kernels/forward/forward_tma_sm90.cu). Runs where it
    /// applies: the sm_90a module loaded, f16/bf16, rank ≤ 64 and a multiple
    /// of 8, X, A and Y 16-byte aligned with row pitches of a multiple of 16
    /// bytes, no dropout, more tokens than the decode kernels take; the
    /// portable kernel elsewhere. Opt-in until a GPU run proves it.
    Tma,
}

/// What a [`forward`] call takes beyond its buffers: its dropout and the
/// kernel to run. A [`Dropout`] converts into it with the default kernel.
pub type ForwardOptions = crate::ops::options::LaunchOptions<ForwardKernel>;

/// The checked shapes and scalars of one forward call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForwardShape {
    dims: Dims,
    x: Matrix,
    y: Matrix,
    scale: RawScale,
    beta: f32,
    dropout: Dropout,
    kernel: ForwardKernel,
}

impl ForwardShape {
    /// Checks the strides (`ld_x ≥ d_in`, `ld_y ≥ d_out`), the scale (a
    /// finite value, or an aligned device pointer) and beta (0 or 1).
    pub fn new(
        dims: &Dims,
        ld_x: usize,
        ld_y: usize,
        scale: impl Into<RawScale>,
        beta: f32,
    ) -> Result<Self> {
        let x = dims.x(ld_x)?;
        let y = dims.out_rows("y", "ld_y", ld_y)?;
        let scale = RawScale::checked(scale)?;
        check_beta("beta", beta)?;
        Ok(Self {
            dims: *dims,
            x,
            y,
            scale,
            beta,
            dropout: Dropout::NONE,
            kernel: ForwardKernel::default(),
        })
    }

    /// The same shape run by `kernel` where it applies (default
    /// [`ForwardKernel::Portable`]).
    pub fn with_kernel(self, kernel: ForwardKernel) -> Self {
        Self { kernel, ..self }
    }

    /// The same shape with adapter dropout (`S = drop(X)·A_in`; the default
    /// is [`Dropout::NONE`]). Refuses more than 2³² tokens when `dropout`
    /// is active (the mask's counter holds 32 bits of the token).
    pub fn with_dropout(self, dropout: Dropout) -> Result<Self> {
        dropout.check_tokens(self.dims.tokens())?;
        Ok(Self { dropout, ..self })
    }

    /// Checks buffer lengths in elements (`s_len`: `None` when no S is stored).
    pub fn check_lens(
        &self,
        x_len: usize,
        a_len: usize,
        y_len: usize,
        s_len: Option<usize>,
    ) -> Result<()> {
        self.x.check_len(x_len)?;
        check_len("a", a_len, self.dims.a_len())?;
        self.y.check_len(y_len)?;
        if let Some(n) = s_len {
            check_len("s", n, self.dims.s_len())?;
        }
        Ok(())
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// Refuses outputs (`y`, `s`) that overlap any other argument, and
    /// ranges that wrap past the end of the address space, for elements of
    /// `elem` bytes. Needs no GPU.
    pub fn check_ptrs(&self, ptrs: &ForwardPtrs, elem: usize) -> Result<()> {
        check_disjoint(
            &[
                Region::matrix(ptrs.y, &self.y, elem)?,
                Region::contiguous("s", ptrs.s, self.dims.s_len(), 4)?,
            ],
            &[
                Region::matrix(ptrs.x, &self.x, elem)?,
                Region::contiguous("a", ptrs.a, self.dims.a_len(), elem)?,
                Region::scale(&self.scale)?,
            ],
        )
    }
}

/// The device pointers of a forward (`s` = 0: S is not stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardPtrs {
    pub x: u64,
    pub a: u64,
    pub y: u64,
    pub s: u64,
}

/// Runs the adapter forward on `stream`:
///
/// * `s` (if given, `tokens × rank` f32, contiguous) ← `drop(X) · A[:d_in]`
/// * `y` (`tokens × d_out`, row stride `ld_y`) ← `beta·y + scale · S · A[:d_out]ᵀ`
///
/// `drop(X) = M ⊙ X / (1 − p)` with the mask of `options`' dropout (see
/// [`Dropout`]; [`Dropout::NONE`]: `X` itself, bitwise the undropped
/// kernels); the frozen path, which the caller computes into `y`, is not
/// dropped. Pass the same dropout to the matching [`crate::backward()`].
/// `options` also names the kernel ([`ForwardKernel`]); a bare [`Dropout`]
/// takes the default one.
///
/// `x` is `tokens × d_in` with row stride `ld_x`; `a` is `D × rank`,
/// contiguous. `beta` is 0 (overwrite; `y` is never read) or 1 (add onto the
/// frozen layer's output). A row stride larger than the row lets `y` be a
/// column slice of a wider output (fused QKV): elements outside the slice are
/// never touched.
///
/// Every argument is checked before anything is enqueued; a refused call
/// leaves `y` and `s` untouched. The call only enqueues work (no allocation,
/// no synchronisation), so it can be captured in a CUDA graph; with a
/// device [`Scale`] the captured graph follows the scale as it changes.
#[allow(clippy::too_many_arguments)]
pub fn forward<'s, T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    x: &impl DevicePtr<T>,
    ld_x: usize,
    a: &impl DevicePtr<T>,
    y: &mut impl DevicePtrMut<T>,
    ld_y: usize,
    s: Option<&mut dyn DevicePtrMut<f32>>,
    scale: impl Into<Scale<'s>>,
    beta: f32,
    options: impl Into<ForwardOptions>,
) -> Result<()> {
    let options = options.into();
    let scale = scale.into();
    let (raw_scale, _scale_rec) = scale.raw(stream)?;
    let shape = ForwardShape::new(dims, ld_x, ld_y, raw_scale, beta)?
        .with_dropout(options.dropout)?
        .with_kernel(options.kernel);
    shape.check_lens(x.len(), a.len(), y.len(), s.as_ref().map(|s| s.len()))?;
    let (x_ptr, _x_rec) = x.device_ptr(stream);
    let (a_ptr, _a_rec) = a.device_ptr(stream);
    let (y_ptr, _y_rec) = y.device_ptr_mut(stream);
    let (s_ptr, _s_rec) = or_null(s.map(|s| s.device_ptr_mut(stream)));
    let ptrs = ForwardPtrs {
        x: x_ptr,
        a: a_ptr,
        y: y_ptr,
        s: s_ptr,
    };
    // SAFETY: the lengths checked above cover every element the kernel
    // touches for these dims and strides; the pointers come from borrows that
    // live (with cudarc's event records) until the launch is enqueued.
    unsafe { forward_raw::<T>(stream, &shape, &ptrs) }
}

/// The same forward on raw device pointers, for frameworks that own their
/// memory. Refuses outputs (`y`, `s`) that overlap any other argument and
/// ranges that wrap past the end of the address space.
///
/// # Safety
/// `x`, `a`, `y` and `s` must be device pointers of `stream`'s context
/// addressing at least the matrices `shape` describes (see [`forward`]),
/// valid until the kernel completes.
pub unsafe fn forward_raw<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ForwardShape,
    ptrs: &ForwardPtrs,
) -> Result<()> {
    let dims = shape.dims;
    shape.check_ptrs(ptrs, std::mem::size_of::<T>())?;
    let kernels = Kernels::for_stream(stream)?;
    if dims.tokens() == 0 {
        return Ok(());
    }
    shape.shrink_expand(ptrs).launch::<T>(stream, &kernels)
}

impl ForwardShape {
    /// The launch of this shape on `ptrs`.
    fn shrink_expand(&self, ptrs: &ForwardPtrs) -> ShrinkExpand {
        let dims = &self.dims;
        ShrinkExpand {
            input: ptrs.x,
            ld_in: self.x.ld(),
            k_dim: dims.d_in(),
            a: ptrs.a,
            out: ptrs.y,
            ld_out: self.y.ld(),
            n_dim: dims.d_out(),
            s_out: ptrs.s,
            tokens: dims.tokens(),
            rank: dims.rank(),
            scale: self.scale,
            beta: self.beta,
            dropout: self.dropout,
            dropout_out: false,
            kernel: self.kernel,
        }
    }

    /// The kernel a forward of this shape on `ptrs` runs on the device
    /// `kernels` belongs to: [`ForwardKernel::Tma`] where it was asked for
    /// and applies, else [`ForwardKernel::Portable`].
    pub fn kernel_for<T: DType>(&self, kernels: &Kernels, ptrs: &ForwardPtrs) -> ForwardKernel {
        let op = self.shrink_expand(ptrs);
        let bm = shrink_expand_kernel::<T>(kernels, self.dims.rank()).map(|k| k.info.block_rows);
        match bm {
            Ok(bm) if op.tma_kernel::<T>(kernels, bm as usize).is_some() => ForwardKernel::Tma,
            _ => ForwardKernel::Portable,
        }
    }
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
    ForwardShape::new(dims, ld_x, ld_y, scale, beta)?.check_lens(x_len, a_len, y_len, s_len)
}

/// Resolves the kernels a forward of this rank needs, so a caller that
/// writes an output before the forward (the layer's frozen GEMM) can be
/// refused first. The decode variant is optional and never refuses.
pub(crate) fn forward_kernels<T: DType>(kernels: &Kernels, rank: usize) -> Result<()> {
    shrink_expand_kernel::<T>(kernels, rank)?;
    Ok(())
}

/// The regular shrink-expand kernel, or its small configuration on devices
/// that cannot grant the regular one's shared memory.
fn shrink_expand_kernel<T: DType>(kernels: &Kernels, rank: usize) -> Result<&Kernel> {
    kernels.fitting::<T>(Family::Forward, Family::ForwardSmall, rank)
}

/// One launch of the shrink-expand kernel: `s_out = input · A[:k_dim]`,
/// `out = beta·out + scale · s_out · A[:n_dim]ᵀ` (`out == 0`: shrink only).
/// An active `dropout` drops `input` (`dropout_out` false: the forward's S)
/// or masks the adapter term of `out` (`dropout_out` true: the backward's dX).
/// `kernel` [`ForwardKernel::Tma`] takes the TMA kernel where it applies.
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
    pub scale: RawScale,
    pub beta: f32,
    pub dropout: Dropout,
    pub dropout_out: bool,
    pub kernel: ForwardKernel,
}

/// The grid of one shrink-expand launch, a pure function of the shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    pub grid: (u64, u64),
    pub cols_per_block: usize,
}

/// Regular path: one block per `bm` token rows; when those row blocks
/// cannot fill the `sm` SMs, the output columns are split over grid.y into
/// about `sm / row_blocks` column groups of whole `bn` chunks (each block
/// recomputes its rows' S: a re-read of few rows). Shrink-only launches
/// never split.
pub(crate) fn regular_grid(
    tokens: usize,
    n_dim: usize,
    bm: usize,
    bn: usize,
    sm: usize,
    expand: bool,
) -> Grid {
    let row_blocks = tokens.div_ceil(bm);
    let col_chunks = n_dim.div_ceil(bn);
    let splits = if !expand || row_blocks >= sm {
        1
    } else {
        col_chunks.min(sm.div_ceil(row_blocks))
    };
    let cols_per_block = col_chunks.div_ceil(splits) * bn;
    Grid {
        grid: (row_blocks as u64, n_dim.div_ceil(cols_per_block) as u64),
        cols_per_block,
    }
}

/// Decode path (one row block, sm_90a): grid.x is the cluster of `cl`
/// blocks that split the S reduction; grid.y the column groups, about two
/// blocks per SM in all.
pub(crate) fn decode_grid(n_dim: usize, bn: usize, sm: usize, cl: usize) -> Grid {
    let col_chunks = n_dim.div_ceil(bn);
    let groups = col_chunks.div_ceil(cl).min((2 * sm).div_ceil(cl)).max(1);
    let cols_per_block = col_chunks.div_ceil(groups * cl) * bn;
    Grid {
        grid: (cl as u64, n_dim.div_ceil(cols_per_block * cl) as u64),
        cols_per_block,
    }
}

impl ShrinkExpand {
    /// The TMA kernel, where it was asked for and applies (see
    /// [`ForwardKernel::Tma`]); `bm` the decode threshold (the portable row
    /// block).
    fn tma_kernel<'k, T: DType>(&self, kernels: &'k Kernels, bm: usize) -> Option<&'k Kernel> {
        if self.kernel != ForwardKernel::Tma
            || self.out == 0
            || self.dropout.is_active()
            || self.tokens <= bm
            || self.rank % 8 != 0
            || !describable::<T>(self.input, self.tokens, self.k_dim, self.ld_in)
            || !describable::<T>(self.out, self.tokens, self.n_dim, self.ld_out)
            || !describable::<T>(self.a, self.k_dim.max(self.n_dim), self.rank, self.rank)
        {
            return None;
        }
        kernels.usable(KernelId::of::<T>(Family::ForwardTmaSm90, self.rank)?)
    }

    /// # Safety
    /// As for [`ShrinkExpand::launch`], with `kernel` from
    /// [`ShrinkExpand::tma_kernel`].
    unsafe fn launch_tma<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        kernel: &Kernel,
        sm: usize,
    ) -> Result<()> {
        let (bm, bn) = (
            kernel.info.block_rows as usize,
            kernel.info.block_cols as usize,
        );
        let grid = regular_grid(self.tokens, self.n_dim, bm, bn, sm, true);
        let grid_x = u32::try_from(grid.grid.0).map_err(|_| Error::Overflow {
            what: "forward grid (tokens / 64)",
        })?;
        let bx = SINGLORA_FORWARD_TMA_BOX;
        // Column groups of whole 64-column boxes: no box crosses a group.
        debug_assert_eq!(grid.cols_per_block % bx as usize, 0);
        let rows = bm as u32;
        // A as each product reads it: its first k_dim rows (the shrink) or
        // n_dim rows (the expand), box rows past them reading zeros; the
        // box is the rank bucket wide (columns past the rank read zeros).
        let a_box = (kernel.info.rank_cap, bx);
        let params = singlora_forward_tma_params {
            in_map: tensor_map_2d::<T>(
                self.input,
                self.tokens,
                self.k_dim,
                self.ld_in,
                (bx, rows),
            )?,
            a_in_map: tensor_map_2d::<T>(self.a, self.k_dim, self.rank, self.rank, a_box)?,
            a_out_map: tensor_map_2d::<T>(self.a, self.n_dim, self.rank, self.rank, a_box)?,
            out_map: tensor_map_2d::<T>(
                self.out,
                self.tokens,
                self.n_dim,
                self.ld_out,
                (bx, rows),
            )?,
            p: self.params::<T>(grid.cols_per_block),
        };
        launch(stream, kernel, (grid_x, grid.grid.1 as u32, 1), &params)
    }

    /// The kernel parameters for column groups of `cols_per_block`.
    fn params<T: DType>(&self, cols_per_block: usize) -> singlora_forward_params {
        singlora_forward_params {
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
            scale: self.scale.param(1.0),
            beta: self.beta,
            in_vec: vec_ok::<T>(self.input, self.ld_in),
            out_vec: vec_ok::<T>(self.out, self.ld_out),
            a_vec: vec_ok::<T>(self.a, self.rank),
            dropout_out: i32::from(self.dropout_out),
            dropout: self.dropout.param(),
        }
    }

    /// # Safety
    /// The pointers must address the matrices the fields describe (validated
    /// dims, strides ≥ rows), on `stream`'s context, until completion.
    pub(crate) unsafe fn launch<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
    ) -> Result<()> {
        let sm = kernels.sm_count() as usize;
        let normal = shrink_expand_kernel::<T>(kernels, self.rank)?;
        let bm = normal.info.block_rows as usize;
        let bn = normal.info.block_cols as usize;
        if let Some(tma) = self.tma_kernel::<T>(kernels, bm) {
            return self.launch_tma::<T>(stream, tma, sm);
        }
        // Decode sizes where the module has the cluster kernels (sm_90a).
        let decode = KernelId::of::<T>(Family::ForwardDecodeSm90, self.rank)
            .filter(|_| self.out != 0 && self.tokens <= bm)
            .and_then(|id| kernels.usable(id));
        let (kernel, grid) = match decode {
            Some(decode) => (
                decode,
                decode_grid(self.n_dim, bn, sm, SINGLORA_DECODE_CLUSTER as usize),
            ),
            None => (
                normal,
                regular_grid(self.tokens, self.n_dim, bm, bn, sm, self.out != 0),
            ),
        };
        let grid_x = u32::try_from(grid.grid.0).map_err(|_| Error::Overflow {
            what: "forward grid (tokens / 64)",
        })?;
        let params = self.params::<T>(grid.cols_per_block);
        launch(stream, kernel, (grid_x, grid.grid.1 as u32, 1), &params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_sizes_take_one_column_split() {
        // 16384 tokens: 256 row blocks fill 132 SMs.
        let g = regular_grid(16384, 4096, 64, 64, 132, true);
        assert_eq!(
            g,
            Grid {
                grid: (256, 1),
                cols_per_block: 4096
            }
        );
    }

    #[test]
    fn few_rows_split_the_columns_in_whole_chunks() {
        // 128 tokens: 2 row blocks, 66 column groups wanted, 64 chunks there.
        let g = regular_grid(128, 4096, 64, 64, 132, true);
        assert_eq!(g.cols_per_block, 64);
        assert_eq!(g.grid, (2, 64));
        // Odd widths: the last group is partial, none is empty.
        let g = regular_grid(100, 3424, 64, 64, 132, true);
        assert_eq!(g.grid.0, 2);
        assert!((g.grid.1 as usize - 1) * g.cols_per_block < 3424);
        assert!(g.grid.1 as usize * g.cols_per_block >= 3424);
        // Shrink only: never split.
        assert_eq!(regular_grid(100, 3424, 64, 64, 132, false).grid, (2, 1));
    }

    #[test]
    fn decode_grid_covers_every_column_with_clusters_of_eight() {
        for n in [1, 64, 4096, 11008, 65536] {
            let g = decode_grid(n, 64, 132, 8);
            assert_eq!(g.grid.0, 8);
            let covered = g.grid.1 as usize * 8 * g.cols_per_block;
            assert!(
                covered >= n && covered - n < 8 * g.cols_per_block,
                "n = {n}: {g:?}"
            );
            assert!(g.grid.1 * 8 <= 2 * 132 + 8, "about two blocks per SM");
        }
    }
}
