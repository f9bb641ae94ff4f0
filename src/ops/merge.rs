//! merge: the launcher of kernels/merge/.
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

use crate::dims::{check_len, Dims, Matrix};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::regions::{check_disjoint, Region};
use crate::ops::scale::{RawScale, Scale};
use crate::params::{singlora_merge_params, SINGLORA_MERGE_BM, SINGLORA_MERGE_BN};
use crate::runtime::launch::{launch, pair_ok, vec_ok};
use crate::runtime::registry::{Family, KernelId, Kernels};

/// `w` (`d_out × d_in`, row stride `ld_w`) ← `w + scale · A[:d_out] · A[:d_in]ᵀ`.
/// `dims.tokens` is not used.
///
/// Every argument is checked before anything is enqueued; a refused call
/// leaves `w` untouched. The call only enqueues work.
pub fn merge<'s, T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: &mut impl DevicePtrMut<T>,
    ld_w: usize,
    a: &impl DevicePtr<T>,
    scale: impl Into<Scale<'s>>,
) -> Result<()> {
    merge_with(
        stream,
        dims,
        w,
        ld_w,
        a,
        scale,
        false,
        MergeKernel::default(),
    )
}

/// `w` ← `w − scale · A[:d_out] · A[:d_in]ᵀ`: undoes [`merge`] with the same
/// `a` and `scale` (to within one rounding per element).
pub fn unmerge<'s, T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: &mut impl DevicePtrMut<T>,
    ld_w: usize,
    a: &impl DevicePtr<T>,
    scale: impl Into<Scale<'s>>,
) -> Result<()> {
    merge_with(
        stream,
        dims,
        w,
        ld_w,
        a,
        scale,
        true,
        MergeKernel::default(),
    )
}

/// Which kernel forms the product of a merge. Both give merge and unmerge
/// bit-identical products, so each undoes the other to one rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MergeKernel {
    /// f32 FMAs on CUDA cores in a fixed order (kernels/merge/merge.cu):
    /// the proven default.
    #[default]
    Fma,
    /// mma.sync on tensor cores, W read and written with 16-byte accesses
    /// (kernels/merge/merge_mma.cu). Opt-in until a GPU run proves it
    /// correct and faster.
    TensorCore,
}

/// [`merge`] (`undo` false) or [`unmerge`] (`undo` true) with the product
/// formed by `kernel`.
#[allow(clippy::too_many_arguments)]
pub fn merge_with<'s, T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    w: &mut impl DevicePtrMut<T>,
    ld_w: usize,
    a: &impl DevicePtr<T>,
    scale: impl Into<Scale<'s>>,
    undo: bool,
    kernel: MergeKernel,
) -> Result<()> {
    let scale = scale.into();
    let (raw_scale, _scale_rec) = scale.raw(stream)?;
    let shape = MergeShape::new(dims, ld_w, raw_scale)?.with_kernel(kernel);
    let shape = if undo { shape.undo() } else { shape };
    shape.check_lens(w.len(), a.len())?;
    let (a_ptr, _a_rec) = a.device_ptr(stream);
    let (w_ptr, _w_rec) = w.device_ptr_mut(stream);
    // SAFETY: the lengths checked above cover every element the kernel
    // touches; the borrows (and cudarc's event records) live until the
    // launch is enqueued.
    unsafe { merge_raw::<T>(stream, &shape, w_ptr, a_ptr) }
}

/// The checked shape of a merge or unmerge: the weight `d_out × d_in` with
/// row stride `ld_w`, the scale and its sign (-1 for unmerge).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MergeShape {
    dims: Dims,
    w: Matrix,
    scale: RawScale,
    sign: f32,
    kernel: MergeKernel,
}

impl MergeShape {
    /// Checks `ld_w ≥ d_in`, a finite scale, and that `d_out` fits the grid
    /// (65535 row blocks of SINGLORA_MERGE_BM rows). `dims.tokens()` plays
    /// no part.
    pub fn new(dims: &Dims, ld_w: usize, scale: impl Into<RawScale>) -> Result<Self> {
        let w = Matrix::new("w", "ld_w", dims.d_out(), dims.d_in(), ld_w)?;
        let scale = RawScale::checked(scale)?;
        let max_rows = 65535 * SINGLORA_MERGE_BM as usize;
        if dims.d_out() > max_rows {
            return Err(Error::InvalidDim {
                name: "d_out",
                expected: format!("1..={max_rows} for merge"),
                actual: dims.d_out() as u64,
            });
        }
        Ok(Self {
            dims: *dims,
            w,
            scale,
            sign: 1.0,
            kernel: MergeKernel::default(),
        })
    }

    /// The same shape with the product formed by `kernel`.
    pub fn with_kernel(&self, kernel: MergeKernel) -> Self {
        Self { kernel, ..*self }
    }

    /// The same shape with the scale negated (exactly, on the device too):
    /// the unmerge of this merge.
    pub fn undo(&self) -> Self {
        Self {
            sign: -self.sign,
            ..*self
        }
    }

    /// Checks buffer lengths in elements.
    pub fn check_lens(&self, w_len: usize, a_len: usize) -> Result<()> {
        self.w.check_len(w_len)?;
        check_len("a", a_len, self.dims.a_len())
    }

    /// Refuses a `w` that overlaps `a`, and ranges that wrap, for elements
    /// of `elem` bytes. Needs no GPU.
    pub fn check_ptrs(&self, w: u64, a: u64, elem: usize) -> Result<()> {
        check_disjoint(
            &[Region::matrix(w, &self.w, elem)?],
            &[
                Region::contiguous("a", a, self.dims.a_len(), elem)?,
                Region::scale(&self.scale)?,
            ],
        )
    }
}

/// `w` ← `w + scale · A[:d_out] · A[:d_in]ᵀ` on raw device pointers, with the
/// scale of `shape` (negated by [`MergeShape::undo`] for an unmerge).
/// Refuses a `w` that overlaps `a` and ranges that wrap.
///
/// # Safety
/// `w` must address the `d_out × d_in` matrix of `T` that `shape` describes
/// and `a` a contiguous `D × rank` matrix, on `stream`'s context, valid until
/// the kernel completes.
pub unsafe fn merge_raw<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &MergeShape,
    w: u64,
    a: u64,
) -> Result<()> {
    let dims = &shape.dims;
    let elem = std::mem::size_of::<T>();
    shape.check_ptrs(w, a, elem)?;
    let kernels = Kernels::for_stream(stream)?;
    let family = match shape.kernel {
        MergeKernel::Fma => Family::Merge,
        MergeKernel::TensorCore => Family::MergeMma,
    };
    let kernel =
        kernels.kernel(KernelId::of::<T>(family, dims.rank()).expect("merge is unranked"))?;
    // Both kernels tile W in blocks of SINGLORA_MERGE_BM × SINGLORA_MERGE_BN,
    // as each publishes (MergeShape::new bounds d_out for the grid).
    let (bm, bn) = (
        kernel.info.block_rows as usize,
        kernel.info.block_cols as usize,
    );
    debug_assert_eq!(
        (bm, bn),
        (SINGLORA_MERGE_BM as usize, SINGLORA_MERGE_BN as usize)
    );
    let grid_x = dims.d_in().div_ceil(bn);
    let grid_y = dims.d_out().div_ceil(bm);
    let ld_w = shape.w.ld();
    let params = singlora_merge_params {
        w,
        a,
        ld_w: ld_w as i64,
        d_in: dims.d_in() as i32,
        d_out: dims.d_out() as i32,
        rank: dims.rank() as i32,
        scale: shape.scale.param(shape.sign),
        w_pair: pair_ok::<T>(w, ld_w),
        w_vec: vec_ok::<T>(w, ld_w),
        pad_: 0,
    };
    launch(stream, kernel, (grid_x as u32, grid_y as u32, 1), &params)
}

/// Every check [`merge`] and [`unmerge`] run before they enqueue anything,
/// given the buffers' lengths in elements. Needs no GPU.
pub fn check_merge(dims: &Dims, w_len: usize, ld_w: usize, a_len: usize, scale: f32) -> Result<()> {
    MergeShape::new(dims, ld_w, scale)?.check_lens(w_len, a_len)
}
