//! mse: the launcher of kernels/mse/, the mean-squared-error loss and its
//! gradient on the device (the training loss of examples/finetune.rs).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::dims::{check_len, Matrix};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::regions::{check_disjoint, Region};
use crate::params::{singlora_mse_params, SINGLORA_MSE_BLOCKS};
use crate::runtime::launch::launch;
use crate::runtime::registry::{Family, KernelId, Kernels};

/// f32 elements of the partial-sum buffer [`mse`] writes.
pub const MSE_PARTIALS: usize = SINGLORA_MSE_BLOCKS as usize;

/// For a `rows × cols` prediction and target (row strides `ld_pred`,
/// `ld_target`): writes, if `grad` is given (`(buffer, ld_grad)`),
/// `grad = loss_scale · 2/(rows·cols) · (pred − target)`, and into `partial`
/// ([`MSE_PARTIALS`] f32) per-block sums of `(pred − target)²` that
/// [`mse_loss`] turns into the (unscaled) loss. Deterministic: a fixed grid
/// and a fixed reduction order.
///
/// `loss_scale` (finite, > 0; 1 for the plain gradient) is mixed-precision
/// loss scaling: the mean's 2/(rows·cols) underflows f16 for large outputs,
/// so a training loop scales the gradient up here and back down in the
/// optimizer (`grad_scale = 1 / loss_scale` of [`crate::adamw()`]).
#[allow(clippy::too_many_arguments)]
pub fn mse<T: DType>(
    stream: &Arc<CudaStream>,
    rows: usize,
    cols: usize,
    pred: &impl DevicePtr<T>,
    ld_pred: usize,
    target: &impl DevicePtr<T>,
    ld_target: usize,
    grad: Option<(&mut dyn DevicePtrMut<T>, usize)>,
    loss_scale: f32,
    partial: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    for (name, v) in [("rows", rows), ("cols", cols)] {
        if v == 0 || v > i64::MAX as usize {
            return Err(Error::InvalidDim {
                name,
                expected: format!("1..={}", i64::MAX),
                actual: v as u64,
            });
        }
    }
    if !(loss_scale.is_finite() && loss_scale > 0.0) {
        return Err(Error::invalid(
            "loss_scale",
            "a finite number > 0",
            loss_scale,
        ));
    }
    let pred_m = Matrix::new("pred", "ld_pred", rows, cols, ld_pred)?;
    pred_m.check_len(pred.len())?;
    let target_m = Matrix::new("target", "ld_target", rows, cols, ld_target)?;
    target_m.check_len(target.len())?;
    let grad_m = match &grad {
        Some((g, ld)) => {
            let m = Matrix::new("grad", "ld_grad", rows, cols, *ld)?;
            m.check_len(g.len())?;
            Some(m)
        }
        None => None,
    };
    check_len("partial", partial.len(), MSE_PARTIALS)?;
    let kernels = Kernels::for_stream(stream)?;
    let kernel = kernels.kernel(KernelId::of::<T>(Family::Mse, 0).expect("mse is unranked"))?;
    let (p_ptr, _p_rec) = pred.device_ptr(stream);
    let (t_ptr, _t_rec) = target.device_ptr(stream);
    let (g_ptr, ld_grad, _g_rec) = match grad {
        Some((g, ld)) => {
            let (ptr, rec) = g.device_ptr_mut(stream);
            (ptr, ld, Some(rec))
        }
        None => (0, 0, None),
    };
    let (partial_ptr, _partial_rec) = partial.device_ptr_mut(stream);
    let t = std::mem::size_of::<T>();
    let grad_region = match &grad_m {
        Some(m) => Region::matrix(g_ptr, m, t)?,
        None => Region::contiguous("grad", 0, 0, t)?,
    };
    check_disjoint(
        &[
            grad_region,
            Region::contiguous("partial", partial_ptr, MSE_PARTIALS, 4)?,
        ],
        &[
            Region::matrix(p_ptr, &pred_m, t)?,
            Region::matrix(t_ptr, &target_m, t)?,
        ],
    )?;
    let params = singlora_mse_params {
        pred: p_ptr,
        target: t_ptr,
        grad: g_ptr,
        partial: partial_ptr,
        rows: rows as i64,
        cols: cols as i64,
        ld_pred: ld_pred as i64,
        ld_target: ld_target as i64,
        ld_grad: ld_grad as i64,
        grad_factor: (loss_scale as f64 * 2.0 / (rows as f64 * cols as f64)) as f32,
        pad_: 0,
    };
    // SAFETY: every matrix was checked to hold rows × cols with its stride,
    // partial to hold one f32 per block; the borrows live until the launch
    // is enqueued, and grad/partial are exclusive borrows.
    unsafe { launch(stream, kernel, (SINGLORA_MSE_BLOCKS, 1, 1), &params) }
}

/// The loss from the partial sums [`mse`] wrote (copied to the host): their
/// sum in order, in f64, over `rows · cols`.
pub fn mse_loss(partial: &[f32], rows: usize, cols: usize) -> f64 {
    partial.iter().map(|&v| v as f64).sum::<f64>() / (rows as f64 * cols as f64)
}
