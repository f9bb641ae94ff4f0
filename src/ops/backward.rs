//! backward: the launchers of kernels/backward/ (and of the forward kernel
//! for dX).
//!
//! ```text
//! Q  = G · A[:d_out]                                   (f32, workspace)
//! dX = dx_beta·dX + s · Q · A[:d_in]ᵀ                  (forward kernel, G in X's place)
//! dA = da_beta·dA + s · (Gᵀ·S into rows :d_out + Xᵀ·Q into rows :d_in)
//! ```
//! dA is reduced over token splits into per-block f32 partials that a second
//! kernel sums in a fixed order: the result is bitwise reproducible.
//!
//! Two ways to get there ([`BackwardKernel`]): the split path above (the
//! default, on every GPU), which reads G twice, and the fused sm_90a kernel
//! (kernels/backward/backward_fused_sm90.cu, opt-in), which forms Q, S, dX
//! and both dA terms in one pass over G and X.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::dims::{check_beta, check_len, mul, Dims, Matrix};
use crate::dropout::Dropout;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::forward::{forward_kernels, ForwardKernel, ShrinkExpand};
use crate::ops::regions::{check_disjoint, Region};
use crate::ops::scale::{RawScale, Scale};
use crate::params::{
    singlora_backward_fused_params, singlora_da_params, SINGLORA_BACKWARD_FUSED_BAND,
    SINGLORA_BACKWARD_FUSED_CLUSTER, SINGLORA_BACKWARD_FUSED_MAX_CLUSTERS,
    SINGLORA_BACKWARD_FUSED_MIN_CLUSTER_TOKENS, SINGLORA_DA_BD, SINGLORA_DA_MIN_SPLIT_TOKENS,
    SINGLORA_DA_TARGET_BLOCKS,
};
use crate::runtime::launch::{launch, or_null, pair_ok, vec_ok, THREADS};
use crate::runtime::registry::{Family, Kernel, KernelId, Kernels};

/// f32 elements of each workspace segment are rounded up to this (256 bytes)
/// so every segment starts 16-byte aligned.
const SEGMENT_ALIGN: usize = 64;

/// Which kernels form a backward. Both give dA bitwise reproducibly (fixed
/// summation orders that depend on [`Dims`] alone) and meet the same error
/// bars; their bits differ from each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackwardKernel {
    /// Q and dX by the forward kernel, S when not saved, then the dA
    /// partials and their reduction (kernels/backward/backward.cu): G is
    /// read twice. Every GPU, every shape: the proven default.
    #[default]
    Split,
    /// One pass over G and X (kernels/backward/backward_fused_sm90.cu): a
    /// thread-block cluster spans d, sums partial Q and S through
    /// distributed shared memory, writes dX and keeps its band's dA rows on
    /// chip. Runs where [`BackwardKernel::resolve`] says so (bf16, rank
    /// ≤ 32, d_in and d_out ≤ 4096, at least one token, and a build with
    /// sm_90a on a compute capability 9.0 device that grants its shared
    /// memory and holds one of its clusters); elsewhere the call takes
    /// [`BackwardKernel::Split`]. Opt-in
    /// until a GPU run proves it correct and faster.
    Fused,
    /// [`BackwardKernel::Fused`] with each step's partial Q and S summed by
    /// reduce-scatter: each CTA of the cluster sums an eighth of them and
    /// writes the sums into every CTA (an eighth of the distributed
    /// shared-memory reads, one more cluster barrier per step). The same
    /// sums in the same order, so the same bits; the GPU run decides which
    /// is faster.
    FusedScatter,
}

impl BackwardKernel {
    /// The kernels a backward of element type `T` at `dims` runs when this
    /// one is asked for, on the device `kernels` belongs to.
    pub fn resolve<T: DType>(self, kernels: &Kernels, dims: &Dims) -> BackwardKernel {
        match self {
            BackwardKernel::Fused | BackwardKernel::FusedScatter
                if fused_kernel::<T>(kernels, dims).is_some() =>
            {
                self
            }
            _ => BackwardKernel::Split,
        }
    }
}

/// What a [`backward`] call takes beyond its buffers: the forward's
/// dropout and the kernels to run. A [`Dropout`] converts into it with the
/// default kernels.
pub type BackwardOptions = crate::ops::options::LaunchOptions<BackwardKernel>;

/// The workspace layout for given dims, in f32 elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Workspace {
    q: usize,
    s: Option<usize>,
    partial: usize,
    len: usize,
    splits: usize,
    tokens_per_split: usize,
}

/// The fused backward's token ranges: `clusters` ranges (one dA partial
/// each) of `tokens_per_cluster` consecutive tokens (the last one fewer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FusedPlan {
    clusters: usize,
    tokens_per_cluster: usize,
}

/// The fused kernel's token ranges for `dims` (⌈tokens / 256⌉ of them, at
/// most 16), or `None` where its bands cannot span d (d_in or d_out above
/// cluster × band), the rank exceeds its largest bucket, or there are no
/// tokens. Depends on dims only, never on the device: the ranges fix dA's
/// summation order (the grid, sized from the device, only says how many
/// clusters take them at once).
fn fused_plan(dims: &Dims) -> Option<FusedPlan> {
    let max_d = (SINGLORA_BACKWARD_FUSED_CLUSTER * SINGLORA_BACKWARD_FUSED_BAND) as usize;
    let max_rank = *Family::BackwardFusedSm90.spec().buckets.last()?;
    if dims.tokens() == 0 || dims.d_in() > max_d || dims.d_out() > max_d || dims.rank() > max_rank {
        return None;
    }
    let clusters = dims
        .tokens()
        .div_ceil(SINGLORA_BACKWARD_FUSED_MIN_CLUSTER_TOKENS as usize)
        .clamp(1, SINGLORA_BACKWARD_FUSED_MAX_CLUSTERS as usize);
    Some(FusedPlan {
        clusters,
        tokens_per_cluster: dims.tokens().div_ceil(clusters),
    })
}

/// The fused kernel for `T` at `dims` with its grid, where it applies and
/// this device's modules have it (sm_90a, and its shared memory granted).
fn fused_kernel<'k, T: DType>(
    kernels: &'k Kernels,
    dims: &Dims,
) -> Option<(&'k Kernel, FusedPlan)> {
    // The kernel list has it for bf16 alone: other types find no id.
    let plan = fused_plan(dims)?;
    let id = KernelId::of::<T>(Family::BackwardFusedSm90, dims.rank())?;
    kernels
        .usable(id)
        // A device that cannot hold one of its clusters takes the split path.
        .filter(|k| k.max_clusters != Some(0))
        .map(|k| (k, plan))
}

/// Token splits of the dA reduction: about SINGLORA_DA_TARGET_BLOCKS
/// (band, split) blocks per part, each split at least
/// SINGLORA_DA_MIN_SPLIT_TOKENS tokens. Depends on dims only.
fn da_splits(dims: &Dims) -> (usize, usize) {
    let bands = dims.d().div_ceil(SINGLORA_DA_BD as usize);
    let max_splits = dims
        .tokens()
        .div_ceil(SINGLORA_DA_MIN_SPLIT_TOKENS as usize)
        .max(1);
    let splits = (SINGLORA_DA_TARGET_BLOCKS as usize)
        .div_ceil(bands)
        .clamp(1, max_splits);
    let tokens_per_split = dims.tokens().div_ceil(splits).max(1);
    (splits, tokens_per_split)
}

fn workspace(dims: &Dims, saved_s: bool) -> Result<Workspace> {
    let seg = |n: usize| -> Result<usize> {
        n.checked_next_multiple_of(SEGMENT_ALIGN)
            .ok_or(Error::Overflow { what: "workspace" })
    };
    let (splits, tokens_per_split) = da_splits(dims);
    // The fused kernel's partials share the region: room for either.
    let slots = splits.max(fused_plan(dims).map_or(0, |f| f.clusters));
    let tr = seg(dims.s_len())?;
    let partial_len = mul(
        mul(2 * slots, dims.d(), "workspace")?,
        dims.rank_pad(),
        "workspace",
    )?;
    let q = 0;
    let s = if saved_s { None } else { Some(tr) };
    let partial = if saved_s {
        tr
    } else {
        tr.checked_mul(2)
            .ok_or(Error::Overflow { what: "workspace" })?
    };
    let len = partial
        .checked_add(partial_len)
        .ok_or(Error::Overflow { what: "workspace" })?;
    Ok(Workspace {
        q,
        s,
        partial,
        len,
        splits,
        tokens_per_split,
    })
}

/// f32 elements of workspace [`backward`] needs for `dims`: Q (tokens × rank),
/// S when no saved S is passed (tokens × rank), and the dA partials
/// (2 × splits × D × rank rounded up to 16, splits ≤ 256 / ⌈D/128⌉ and
/// ≤ ⌈tokens/256⌉, or, where the dims let [`BackwardKernel::Fused`] run
/// (whatever the element type or device: the query knows neither), at
/// least its token ranges, ≤ 16). The same for both kernels, so a workspace
/// sized once serves either. That is O(tokens·rank + splits·D·rank), never O(d²):
/// for d = 4096, rank 64, 16384 tokens it is 4 MiB for Q (8 MiB with S) plus
/// 16 MiB of partials.
pub fn backward_workspace_len(dims: &Dims, saved_s: bool) -> Result<usize> {
    Ok(workspace(dims, saved_s)?.len)
}

/// The optional input-gradient output of [`backward`]: `dx` (`tokens × d_in`,
/// row stride `ld_dx`) ← `beta·dx + scale · Q · A[:d_in]ᵀ`.
pub struct DxOut<'a, T> {
    pub dx: &'a mut dyn DevicePtrMut<T>,
    pub ld_dx: usize,
    pub beta: f32,
}

/// The checked shapes, scalars and workspace layout of one backward call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackwardShape {
    dims: Dims,
    x: Matrix,
    g: Matrix,
    dx: Option<(Matrix, f32)>,
    scale: RawScale,
    da_beta: f32,
    ws: Workspace,
    dropout: Dropout,
    kernel: BackwardKernel,
}

impl BackwardShape {
    /// Checks the strides, `dx_beta` and `da_beta` (0 or 1), the scale, and
    /// lays out the workspace for a saved S (`saved_s`) or a recomputed one.
    /// `dx`: `(ld_dx, dx_beta)`, `None` for no input gradient.
    pub fn new(
        dims: &Dims,
        ld_x: usize,
        ld_g: usize,
        dx: Option<(usize, f32)>,
        saved_s: bool,
        scale: impl Into<RawScale>,
        da_beta: f32,
    ) -> Result<Self> {
        let x = dims.x(ld_x)?;
        let g = dims.out_rows("g", "ld_g", ld_g)?;
        let dx = match dx {
            Some((ld_dx, beta)) => {
                let m = dims.in_rows("dx", "ld_dx", ld_dx)?;
                check_beta("dx_beta", beta)?;
                Some((m, beta))
            }
            None => None,
        };
        let scale = RawScale::checked(scale)?;
        check_beta("da_beta", da_beta)?;
        Ok(Self {
            dims: *dims,
            x,
            g,
            dx,
            scale,
            da_beta,
            ws: workspace(dims, saved_s)?,
            dropout: Dropout::NONE,
            kernel: BackwardKernel::default(),
        })
    }

    /// The same shape run by `kernel` where it applies (default
    /// [`BackwardKernel::Split`]; see [`BackwardKernel::resolve`]).
    pub fn with_kernel(self, kernel: BackwardKernel) -> Self {
        Self { kernel, ..self }
    }

    /// The same shape with the adapter dropout of the forward it
    /// differentiates (default [`Dropout::NONE`]): dA's `Xᵀ·Q` term uses
    /// `drop(X)`, dX's adapter term is masked, and a recomputed S is
    /// `drop(X)·A_in`; a saved S must come from the forward with the same
    /// dropout. Refuses more than 2³² tokens when `dropout` is active.
    pub fn with_dropout(self, dropout: Dropout) -> Result<Self> {
        dropout.check_tokens(self.dims.tokens())?;
        Ok(Self { dropout, ..self })
    }

    /// Checks the buffer lengths (elements) against the shapes.
    pub fn check_lens(&self, lens: &BackwardLens) -> Result<()> {
        self.x.check_len(lens.x)?;
        self.g.check_len(lens.g)?;
        check_len("a", lens.a, self.dims.a_len())?;
        if let Some(n) = lens.saved_s {
            check_len("saved_s", n, self.dims.s_len())?;
        }
        if let (Some((m, _)), Some((n, _, _))) = (&self.dx, lens.dx) {
            m.check_len(n)?;
        }
        check_len("da", lens.da, self.dims.a_len())?;
        check_len("workspace", lens.workspace, self.ws.len)
    }

    /// f32 elements of workspace this call needs.
    pub fn workspace_len(&self) -> usize {
        self.ws.len
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// Refuses pointers that disagree with the shape (a `saved_s` or `dx`
    /// given or not), a 16-byte misaligned workspace, outputs (`dx`, `da`,
    /// `workspace`) that overlap each other or any input, and ranges that
    /// wrap past the end of the address space, for elements of `elem`
    /// bytes. Needs no GPU.
    pub fn check_ptrs(&self, ptrs: &BackwardPtrs, elem: usize) -> Result<()> {
        if (ptrs.saved_s != 0) != self.ws.s.is_none() {
            return Err(Error::invalid(
                "saved_s",
                "a pointer exactly when the shape was built with saved_s",
                format!("{:#x}", ptrs.saved_s),
            ));
        }
        if (ptrs.dx != 0) != self.dx.is_some() {
            return Err(Error::invalid(
                "dx",
                "a pointer exactly when the shape was built with dx",
                format!("{:#x}", ptrs.dx),
            ));
        }
        if ptrs.workspace % 16 != 0 {
            // The dA partials are written as f32 pairs and the workspace
            // segments are 256-byte multiples: a 16-byte aligned workspace
            // keeps every access aligned.
            return Err(Error::invalid(
                "workspace",
                "a 16-byte aligned device pointer",
                format!("{:#x}", ptrs.workspace),
            ));
        }
        let dims = &self.dims;
        let dx_region = match &self.dx {
            Some((m, _)) => Region::matrix(ptrs.dx, m, elem)?,
            None => Region::contiguous("dx", 0, 0, elem)?,
        };
        check_disjoint(
            &[
                dx_region,
                Region::contiguous("da", ptrs.da, dims.a_len(), 4)?,
                Region::contiguous("workspace", ptrs.workspace, self.ws.len, 4)?,
            ],
            &[
                Region::matrix(ptrs.x, &self.x, elem)?,
                Region::matrix(ptrs.g, &self.g, elem)?,
                Region::contiguous("a", ptrs.a, dims.a_len(), elem)?,
                Region::contiguous("saved_s", ptrs.saved_s, dims.s_len(), 4)?,
                Region::scale(&self.scale)?,
            ],
        )
    }
}

/// Runs the adapter backward on `stream`, for the forward that ran with
/// `options`' dropout (the same seed and offset: the mask is regenerated,
/// see [`Dropout`]; pass [`Dropout::NONE`] without dropout), by `options`'
/// kernels ([`BackwardKernel`]; a bare [`Dropout`] takes the default).
///
/// * `g` = ∂L/∂Y (`tokens × d_out`, row stride `ld_g`), `x` the forward's
///   input (`tokens × d_in`, `ld_x`), `a` (`D × rank`).
/// * `saved_s`: the forward's `S = X·A[:d_in]` (`tokens × rank` f32); `None`
///   recomputes it (one more read of X).
/// * `dx`: see [`DxOut`]; `None` for a frozen input (only Q is computed).
/// * `da` (`D × rank` f32) ← `da_beta·da + scale·(Gᵀ·S + Xᵀ·Q)`, with
///   `da_beta` 0 (overwrite, never read) or 1 (gradient accumulation).
///   Bitwise reproducible: no atomics, a fixed summation order.
/// * `workspace`: at least [`backward_workspace_len`] f32 elements,
///   16-byte aligned. Once the call's work completes, its first
///   `tokens × rank` elements hold `Q = G·A[:d_out]` (row-major f32).
///
/// Every argument is checked before anything is enqueued; a refused call
/// leaves every output untouched. The call only enqueues work.
#[allow(clippy::too_many_arguments)]
pub fn backward<'s, T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    x: &impl DevicePtr<T>,
    ld_x: usize,
    g: &impl DevicePtr<T>,
    ld_g: usize,
    a: &impl DevicePtr<T>,
    saved_s: Option<&dyn DevicePtr<f32>>,
    scale: impl Into<Scale<'s>>,
    dx: Option<DxOut<'_, T>>,
    da: &mut impl DevicePtrMut<f32>,
    da_beta: f32,
    workspace_buf: &mut impl DevicePtrMut<f32>,
    options: impl Into<BackwardOptions>,
) -> Result<()> {
    let options = options.into();
    let lens = BackwardLens {
        x: x.len(),
        ld_x,
        g: g.len(),
        ld_g,
        a: a.len(),
        saved_s: saved_s.map(|s| s.len()),
        dx: dx.as_ref().map(|d| (d.dx.len(), d.ld_dx, d.beta)),
        da: da.len(),
        workspace: workspace_buf.len(),
    };
    let scale = scale.into();
    let (raw_scale, _scale_rec) = scale.raw(stream)?;
    let shape = BackwardShape::new(
        dims,
        ld_x,
        ld_g,
        lens.dx.map(|(_, ld, beta)| (ld, beta)),
        saved_s.is_some(),
        raw_scale,
        da_beta,
    )?
    .with_dropout(options.dropout)?
    .with_kernel(options.kernel);
    shape.check_lens(&lens)?;
    let (x_ptr, _x_rec) = x.device_ptr(stream);
    let (g_ptr, _g_rec) = g.device_ptr(stream);
    let (a_ptr, _a_rec) = a.device_ptr(stream);
    let (s_ptr, _s_rec) = or_null(saved_s.map(|s| s.device_ptr(stream)));
    let (dx_ptr, _dx_rec) = or_null(dx.map(|d| d.dx.device_ptr_mut(stream)));
    let (da_ptr, _da_rec) = da.device_ptr_mut(stream);
    let (ws_ptr, _ws_rec) = workspace_buf.device_ptr_mut(stream);
    let ptrs = BackwardPtrs {
        x: x_ptr,
        g: g_ptr,
        a: a_ptr,
        saved_s: s_ptr,
        dx: dx_ptr,
        da: da_ptr,
        workspace: ws_ptr,
    };
    // SAFETY: every length was checked above against what the kernels touch
    // for these dims and strides (the workspace against its layout); the
    // borrows live until the launches are enqueued, ordered on `stream`.
    unsafe { backward_raw::<T>(stream, &shape, &ptrs) }
}

/// Raw device pointers for [`backward_raw`] (`0` for an absent `saved_s` or
/// `dx`; they must agree with the [`BackwardShape`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardPtrs {
    pub x: u64,
    pub g: u64,
    pub a: u64,
    pub saved_s: u64,
    pub dx: u64,
    pub da: u64,
    pub workspace: u64,
}

/// [`backward`] on raw device pointers, for frameworks that own their memory.
/// Refuses a 16-byte misaligned workspace, pointers that disagree with the
/// shape (a `saved_s` or `dx` given or not), outputs (`dx`, `da`,
/// `workspace`) that overlap each other or any input, and ranges that wrap
/// past the end of the address space.
///
/// # Safety
/// Every non-zero pointer must address, on `stream`'s context and until the
/// kernels complete, at least the matrix `shape` describes (see
/// [`backward`]); `workspace` at least [`BackwardShape::workspace_len`] f32
/// elements.
pub unsafe fn backward_raw<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &BackwardShape,
    ptrs: &BackwardPtrs,
) -> Result<()> {
    shape.check_ptrs(ptrs, std::mem::size_of::<T>())?;
    let kernels = Kernels::for_stream(stream)?;
    launch_backward::<T>(stream, &kernels, shape, ptrs)
}

/// The buffer lengths (elements) and strides of a [`backward`] call, for
/// [`check_backward`]. `dx` is `(len, ld_dx, dx_beta)`.
#[derive(Clone, Copy, Debug)]
pub struct BackwardLens {
    pub x: usize,
    pub ld_x: usize,
    pub g: usize,
    pub ld_g: usize,
    pub a: usize,
    pub saved_s: Option<usize>,
    pub dx: Option<(usize, usize, f32)>,
    pub da: usize,
    pub workspace: usize,
}

/// Every check [`backward`] runs before it enqueues anything. Needs no GPU.
pub fn check_backward(dims: &Dims, lens: &BackwardLens, scale: f32, da_beta: f32) -> Result<()> {
    BackwardShape::new(
        dims,
        lens.ld_x,
        lens.ld_g,
        lens.dx.map(|(_, ld, beta)| (ld, beta)),
        lens.saved_s.is_some(),
        scale,
        da_beta,
    )?
    .check_lens(lens)
}

/// Resolves every kernel a backward of this rank launches, so that a device
/// that cannot run one refuses the call before any output is touched.
pub(crate) fn backward_kernels<T: DType>(kernels: &Kernels, rank: usize) -> Result<()> {
    forward_kernels::<T>(kernels, rank)?;
    da_partial_kernel::<T>(kernels, rank)?;
    kernels.kernel(KernelId::untyped(Family::BackwardDaReduce))?;
    Ok(())
}

/// The regular dA partial kernel, or its small configuration on devices
/// that cannot grant the regular one's shared memory.
fn da_partial_kernel<T: DType>(kernels: &Kernels, rank: usize) -> Result<&Kernel> {
    kernels.fitting::<T>(
        Family::BackwardDaPartial,
        Family::BackwardDaPartialSmall,
        rank,
    )
}

/// Enqueues Q (and dX), S when not saved, the dA partials and their
/// reduction.
///
/// # Safety
/// As for [`backward_raw`], whose checks have passed.
unsafe fn launch_backward<T: DType>(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    shape: &BackwardShape,
    p: &BackwardPtrs,
) -> Result<()> {
    let dims = &shape.dims;
    let ws = &shape.ws;
    // Look every kernel up first: a device that cannot run one of them
    // refuses the call before any output is touched.
    backward_kernels::<T>(kernels, dims.rank())?;
    let partial = da_partial_kernel::<T>(kernels, dims.rank())?;
    let reduce = kernels.kernel(KernelId::untyped(Family::BackwardDaReduce))?;
    let (ld_dx, dx_beta) = shape.dx.map_or((0, 0.0), |(m, beta)| (m.ld(), beta));
    let f32_at = |offset: usize| p.workspace + (offset * 4) as u64;
    let q = f32_at(ws.q);
    let s = match ws.s {
        Some(off) => f32_at(off),
        None => p.saved_s,
    };
    let da_params = |splits: usize, tokens_per_split: usize| singlora_da_params {
        x: p.x,
        g: p.g,
        s,
        q,
        partial: f32_at(ws.partial),
        da: p.da,
        tokens: dims.tokens() as i64,
        ld_x: shape.x.ld() as i64,
        ld_g: shape.g.ld() as i64,
        tokens_per_split: tokens_per_split as i64,
        d_in: dims.d_in() as i32,
        d_out: dims.d_out() as i32,
        d: dims.d() as i32,
        rank: dims.rank() as i32,
        rank_pad: dims.rank_pad() as i32,
        splits: splits as i32,
        scale: shape.scale.param(1.0),
        da_beta: shape.da_beta,
        x_vec: vec_ok::<T>(p.x, shape.x.ld()),
        g_vec: vec_ok::<T>(p.g, shape.g.ld()),
        pad_: 0,
        dropout: shape.dropout.param(),
    };
    let reduce_grid =
        u32::try_from(dims.a_len().div_ceil(THREADS as usize)).map_err(|_| Error::Overflow {
            what: "dA reduce grid",
        })?;
    if matches!(
        shape.kernel,
        BackwardKernel::Fused | BackwardKernel::FusedScatter
    ) {
        if let Some((fused, plan)) = fused_kernel::<T>(kernels, dims) {
            let params = singlora_backward_fused_params {
                x: p.x,
                g: p.g,
                a: p.a,
                dx: p.dx,
                q,
                partial: f32_at(ws.partial),
                tokens: dims.tokens() as i64,
                ld_x: shape.x.ld() as i64,
                ld_g: shape.g.ld() as i64,
                ld_dx: ld_dx as i64,
                tokens_per_cluster: plan.tokens_per_cluster as i64,
                d_in: dims.d_in() as i32,
                d_out: dims.d_out() as i32,
                d: dims.d() as i32,
                rank: dims.rank() as i32,
                rank_pad: dims.rank_pad() as i32,
                clusters: plan.clusters as i32,
                scale: shape.scale.param(1.0),
                dx_beta,
                x_vec: vec_ok::<T>(p.x, shape.x.ld()),
                g_vec: vec_ok::<T>(p.g, shape.g.ld()),
                a_vec: vec_ok::<T>(p.a, dims.rank()),
                dx_pair: pair_ok::<T>(p.dx, ld_dx),
                scatter: i32::from(shape.kernel == BackwardKernel::FusedScatter),
                pad_: 0,
                dropout: shape.dropout.param(),
            };
            // Grid: the cluster's CTAs along x (the kernel's compile-time
            // cluster shape), along y as many clusters as the device holds
            // at once, up to one per token range; a cluster takes the
            // ranges y, y + grid.y, ... (the ranges, not the grid, fix the
            // bits).
            let resident = fused
                .max_clusters
                .map_or(plan.clusters, |n| plan.clusters.min(n as usize));
            let grid = (SINGLORA_BACKWARD_FUSED_CLUSTER, resident as u32, 1);
            launch(stream, fused, grid, &params)?;
            // The partials' layout is the split path's with one split per
            // cluster.
            return launch(
                stream,
                reduce,
                (reduce_grid, 1, 1),
                &da_params(plan.clusters, 0),
            );
        }
    }
    if dims.tokens() > 0 {
        // Q = G·A[:d_out] and dX = dx_beta·dX + s·Q·A[:d_in]ᵀ: the forward
        // kernel with G in X's place.
        ShrinkExpand {
            input: p.g,
            ld_in: shape.g.ld(),
            k_dim: dims.d_out(),
            a: p.a,
            out: p.dx,
            ld_out: ld_dx,
            n_dim: dims.d_in(),
            s_out: q,
            tokens: dims.tokens(),
            rank: dims.rank(),
            scale: shape.scale,
            beta: dx_beta,
            dropout: shape.dropout,
            dropout_out: true,
            kernel: ForwardKernel::Portable,
        }
        .launch::<T>(stream, kernels)?;
        if ws.s.is_some() {
            // No saved S: recompute it (shrink only).
            ShrinkExpand {
                input: p.x,
                ld_in: shape.x.ld(),
                k_dim: dims.d_in(),
                a: p.a,
                out: 0,
                ld_out: 0,
                n_dim: dims.d_out(),
                s_out: s,
                tokens: dims.tokens(),
                rank: dims.rank(),
                scale: shape.scale,
                beta: 0.0,
                dropout: shape.dropout,
                dropout_out: false,
                kernel: ForwardKernel::Portable,
            }
            .launch::<T>(stream, kernels)?;
        }
    }
    let params = da_params(ws.splits, ws.tokens_per_split);
    let bands = dims.d().div_ceil(partial.info.block_rows as usize) as u32;
    let rank_splits = partial.info.rank_cap / partial.info.block_cols;
    launch(
        stream,
        partial,
        (bands, ws.splits as u32, 2 * rank_splits),
        &params,
    )?;
    launch(stream, reduce, (reduce_grid, 1, 1), &params)
}
