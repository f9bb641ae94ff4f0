//! backward: the launchers of kernels/backward.cu (and of the forward kernel
//! for dX).
//!
//! ```text
//! Q  = G · A[:d_out]                                   (f32, workspace)
//! dX = dx_beta·dX + s · Q · A[:d_in]ᵀ                  (forward kernel, G in X's place)
//! dA = da_beta·dA + s · (Gᵀ·S into rows :d_out + Xᵀ·Q into rows :d_in)
//! ```
//! dA is reduced over token splits into per-block f32 partials that a second
//! kernel sums in a fixed order: the result is bitwise reproducible.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::device::{kernel_name, launch, Kernels, THREADS};
use crate::dims::{check_beta, check_len, check_matrix, check_scale, mul, Dims};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::forward::{vec_ok, ShrinkExpand};
use crate::params::{
    singlora_da_params, SINGLORA_DA_BD, SINGLORA_DA_MIN_SPLIT_TOKENS, SINGLORA_DA_TARGET_BLOCKS,
};

/// f32 elements of each workspace segment are rounded up to this (256 bytes)
/// so every segment starts 16-byte aligned.
const SEGMENT_ALIGN: usize = 64;

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

/// Token splits of the dA reduction: about SINGLORA_DA_TARGET_BLOCKS
/// (band, split) blocks per part, each split at least
/// SINGLORA_DA_MIN_SPLIT_TOKENS tokens. Depends on dims only.
fn da_splits(dims: &Dims) -> (usize, usize) {
    let bands = dims.d().div_ceil(SINGLORA_DA_BD as usize);
    let max_splits = dims
        .tokens
        .div_ceil(SINGLORA_DA_MIN_SPLIT_TOKENS as usize)
        .max(1);
    let splits = (SINGLORA_DA_TARGET_BLOCKS as usize)
        .div_ceil(bands)
        .clamp(1, max_splits);
    let tokens_per_split = dims.tokens.div_ceil(splits).max(1);
    (splits, tokens_per_split)
}

fn workspace(dims: &Dims, saved_s: bool) -> Result<Workspace> {
    dims.validate()?;
    let seg = |n: usize| -> Result<usize> {
        n.checked_next_multiple_of(SEGMENT_ALIGN)
            .ok_or(Error::Overflow { what: "workspace" })
    };
    let (splits, tokens_per_split) = da_splits(dims);
    let tr = seg(dims.s_len())?;
    let partial_len = mul(
        mul(2 * splits, dims.d(), "workspace")?,
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
/// ≤ ⌈tokens/256⌉). That is O(tokens·rank + splits·D·rank), never O(d²):
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

/// Runs the adapter backward on `stream`.
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
///   `tokens × rank` elements hold Q = G·A[:d_out] (row-major f32).
///
/// Every argument is checked before anything is enqueued; a refused call
/// leaves every output untouched. The call only enqueues work.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    x: &impl DevicePtr<T>,
    ld_x: usize,
    g: &impl DevicePtr<T>,
    ld_g: usize,
    a: &impl DevicePtr<T>,
    saved_s: Option<&dyn DevicePtr<f32>>,
    scale: f32,
    dx: Option<DxOut<'_, T>>,
    da: &mut impl DevicePtrMut<f32>,
    da_beta: f32,
    workspace_buf: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
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
    check_backward(dims, &lens, scale, da_beta)?;
    let ws = workspace(dims, saved_s.is_some())?;
    let kernels = Kernels::for_stream(stream)?;

    let (x_ptr, _x_rec) = x.device_ptr(stream);
    let (g_ptr, _g_rec) = g.device_ptr(stream);
    let (a_ptr, _a_rec) = a.device_ptr(stream);
    let (s_ptr, _s_rec) = match saved_s {
        Some(s) => {
            let (p, rec) = s.device_ptr(stream);
            (p, Some(rec))
        }
        None => (0, None),
    };
    let (dx_ptr, ld_dx, dx_beta, _dx_rec) = match dx {
        Some(d) => {
            let (p, rec) = d.dx.device_ptr_mut(stream);
            (p, d.ld_dx, d.beta, Some(rec))
        }
        None => (0, 0, 0.0, None),
    };
    let (da_ptr, _da_rec) = da.device_ptr_mut(stream);
    let (ws_ptr, _ws_rec) = workspace_buf.device_ptr_mut(stream);
    check_workspace_ptr(ws_ptr)?;
    let raw = RawBackward {
        x: x_ptr,
        ld_x,
        g: g_ptr,
        ld_g,
        a: a_ptr,
        saved_s: s_ptr,
        scale,
        dx: dx_ptr,
        ld_dx,
        dx_beta,
        da: da_ptr,
        da_beta,
        workspace: ws_ptr,
    };
    // SAFETY: every length was checked above against what the kernels touch
    // for these dims and strides (the workspace against its layout); the
    // borrows live until the launches are enqueued, ordered on `stream`.
    unsafe { raw.launch::<T>(stream, &kernels, dims, &ws) }
}

/// Raw device pointers for [`backward_raw`] (`0` for an absent `saved_s` or
/// `dx`).
#[derive(Clone, Copy, Debug)]
pub struct RawBackward {
    pub x: u64,
    pub ld_x: usize,
    pub g: u64,
    pub ld_g: usize,
    pub a: u64,
    pub saved_s: u64,
    pub scale: f32,
    pub dx: u64,
    pub ld_dx: usize,
    pub dx_beta: f32,
    pub da: u64,
    pub da_beta: f32,
    pub workspace: u64,
}

/// [`backward`] on raw device pointers, for frameworks that own their memory.
///
/// # Safety
/// Every non-zero pointer must address, on `stream`'s context and until the
/// kernels complete, at least the matrix `dims` and its stride describe (see
/// [`backward`]); `workspace` at least [`backward_workspace_len`] f32
/// elements; outputs (`dx`, `da`, `workspace`) must not overlap each other or
/// any input.
pub unsafe fn backward_raw<T: DType>(
    stream: &Arc<CudaStream>,
    dims: &Dims,
    args: &RawBackward,
) -> Result<()> {
    let dx = (args.dx != 0).then_some((args.ld_dx, args.dx_beta));
    let ws = check_backward_args(
        dims,
        args.ld_x,
        args.ld_g,
        dx,
        args.scale,
        args.da_beta,
        args.saved_s != 0,
    )?;
    check_workspace_ptr(args.workspace)?;
    let kernels = Kernels::for_stream(stream)?;
    args.launch::<T>(stream, &kernels, dims, &ws)
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
    let ws = check_backward_args(
        dims,
        lens.ld_x,
        lens.ld_g,
        lens.dx.map(|(_, ld, beta)| (ld, beta)),
        scale,
        da_beta,
        lens.saved_s.is_some(),
    )?;
    check_matrix("x", "ld_x", lens.x, dims.tokens, dims.d_in, lens.ld_x)?;
    check_matrix("g", "ld_g", lens.g, dims.tokens, dims.d_out, lens.ld_g)?;
    check_len("a", lens.a, dims.a_len())?;
    if let Some(n) = lens.saved_s {
        check_len("saved_s", n, dims.s_len())?;
    }
    if let Some((n, ld, _)) = lens.dx {
        check_matrix("dx", "ld_dx", n, dims.tokens, dims.d_in, ld)?;
    }
    check_len("da", lens.da, dims.a_len())?;
    check_len("workspace", lens.workspace, ws.len)
}

fn check_backward_args(
    dims: &Dims,
    ld_x: usize,
    ld_g: usize,
    dx: Option<(usize, f32)>,
    scale: f32,
    da_beta: f32,
    saved_s: bool,
) -> Result<Workspace> {
    dims.validate()?;
    check_matrix("x", "ld_x", usize::MAX, dims.tokens, dims.d_in, ld_x)?;
    check_matrix("g", "ld_g", usize::MAX, dims.tokens, dims.d_out, ld_g)?;
    if let Some((ld_dx, beta)) = dx {
        check_matrix("dx", "ld_dx", usize::MAX, dims.tokens, dims.d_in, ld_dx)?;
        check_beta("dx_beta", beta)?;
    }
    check_scale(scale)?;
    check_beta("da_beta", da_beta)?;
    workspace(dims, saved_s)
}

/// The dA partials are written as f32 pairs and the workspace segments are
/// 256-byte multiples: a 16-byte aligned workspace keeps every access aligned.
fn check_workspace_ptr(ptr: u64) -> Result<()> {
    if ptr % 16 != 0 {
        return Err(Error::InvalidArgument {
            name: "workspace",
            expected: "a 16-byte aligned device pointer",
            actual: format!("{ptr:#x}"),
        });
    }
    Ok(())
}

impl RawBackward {
    unsafe fn launch<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        dims: &Dims,
        ws: &Workspace,
    ) -> Result<()> {
        // Look every kernel up first: a device that cannot run one of them
        // refuses the call before any output is touched.
        kernels.kernel(&kernel_name::<T>("forward", dims.rank))?;
        let partial = kernels.kernel(&kernel_name::<T>("backward_da_partial", dims.rank))?;
        let reduce = kernels.kernel("backward_da_reduce")?;
        let f32_at = |offset: usize| self.workspace + (offset * 4) as u64;
        let q = f32_at(ws.q);
        let s = match ws.s {
            Some(off) => f32_at(off),
            None => self.saved_s,
        };
        if dims.tokens > 0 {
            // Q = G·A[:d_out] and dX = dx_beta·dX + s·Q·A[:d_in]ᵀ: the forward
            // kernel with G in X's place.
            ShrinkExpand {
                input: self.g,
                ld_in: self.ld_g,
                k_dim: dims.d_out,
                a: self.a,
                out: self.dx,
                ld_out: self.ld_dx,
                n_dim: dims.d_in,
                s_out: q,
                tokens: dims.tokens,
                rank: dims.rank,
                scale: self.scale,
                beta: self.dx_beta,
            }
            .launch::<T>(stream, kernels)?;
            if ws.s.is_some() {
                // No saved S: recompute it (shrink only).
                ShrinkExpand {
                    input: self.x,
                    ld_in: self.ld_x,
                    k_dim: dims.d_in,
                    a: self.a,
                    out: 0,
                    ld_out: 0,
                    n_dim: dims.d_out,
                    s_out: s,
                    tokens: dims.tokens,
                    rank: dims.rank,
                    scale: self.scale,
                    beta: 0.0,
                }
                .launch::<T>(stream, kernels)?;
            }
        }
        let params = singlora_da_params {
            x: self.x,
            g: self.g,
            s,
            q,
            partial: f32_at(ws.partial),
            da: self.da,
            tokens: dims.tokens as i64,
            ld_x: self.ld_x as i64,
            ld_g: self.ld_g as i64,
            tokens_per_split: ws.tokens_per_split as i64,
            d_in: dims.d_in as i32,
            d_out: dims.d_out as i32,
            d: dims.d() as i32,
            rank: dims.rank as i32,
            rank_pad: dims.rank_pad() as i32,
            splits: ws.splits as i32,
            scale: self.scale,
            da_beta: self.da_beta,
            x_vec: vec_ok::<T>(self.x, self.ld_x),
            g_vec: vec_ok::<T>(self.g, self.ld_g),
        };
        let bands = dims.d().div_ceil(partial.info.block_rows as usize) as u32;
        let rank_splits = partial.info.rank_cap / partial.info.block_cols;
        launch(
            stream,
            partial,
            (bands, ws.splits as u32, 2 * rank_splits),
            &params,
        )?;
        let blocks = u32::try_from(dims.a_len().div_ceil(THREADS as usize)).map_err(|_| {
            Error::Overflow {
                what: "dA reduce grid",
            }
        })?;
        launch(stream, reduce, (blocks, 1, 1), &params)
    }
}
