//! adamw: the launcher of kernels/adamw/, one fused AdamW step over A.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::dims::check_len;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::regions::{check_disjoint, Region};
use crate::params::{singlora_adamw_params, singlora_step_params};
use crate::runtime::launch::{launch, or_null, THREADS};
use crate::runtime::registry::{Family, KernelId, Kernels};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamW {
    /// Checks every hyper-parameter and the step (1-based) and returns the
    /// bias corrections `(1 − beta1^t, 1 − beta2^t)`, computed in f64.
    pub fn bias_corrections(&self, step: u64) -> Result<(f64, f64)> {
        let bad =
            |name: &'static str, expected: &'static str, v: f32| Error::invalid(name, expected, v);
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(bad("lr", "a finite number >= 0", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(name, "a number in [0, 1)", b));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(bad("eps", "a finite number > 0", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(
                "weight_decay",
                "a finite number >= 0",
                self.weight_decay,
            ));
        }
        if step == 0 {
            return Err(Error::invalid(
                "step",
                "the 1-based optimizer step (>= 1)",
                "0",
            ));
        }
        Ok((
            1.0 - powi(self.beta1 as f64, step),
            1.0 - powi(self.beta2 as f64, step),
        ))
    }
}

/// `x^n` (n ≥ 1) by binary powering: the exact sequence of f64 products the
/// AdamW kernel makes from a device step (kernels/common/scale.cuh), so the
/// host and device bias corrections have the same bits.
pub fn powi(x: f64, mut n: u64) -> f64 {
    let (mut x, mut r) = (x, 1.0);
    while n != 0 {
        if n & 1 == 1 {
            r *= x;
        }
        n >>= 1;
        if n != 0 {
            x *= x;
        }
    }
    r
}

/// The f32 optimizer state of one parameter: moments, and a master copy when
/// the parameter is 16-bit.
pub struct AdamWState<'a> {
    pub m: &'a mut dyn DevicePtrMut<f32>,
    pub v: &'a mut dyn DevicePtrMut<f32>,
    /// f32 master weights (A receives them rounded); `None`: A is updated
    /// in its own type (exact for f32).
    pub master: Option<&'a mut dyn DevicePtrMut<f32>>,
}

impl<'a> AdamWState<'a> {
    /// The state kept in f32 device slices (the layer's layout, and the
    /// bindings').
    pub fn from_slices(
        m: &'a mut CudaSlice<f32>,
        v: &'a mut CudaSlice<f32>,
        master: Option<&'a mut CudaSlice<f32>>,
    ) -> Self {
        Self {
            m,
            v,
            master: master.map(|m| m as &mut dyn DevicePtrMut<f32>),
        }
    }
}

/// One AdamW step (`step` is 1-based) over the `a.len()` elements of `a`,
/// with gradient `grad_scale · grad` (e.g. 1 / micro-batches). Every argument
/// is checked before anything is enqueued; a refused call leaves `a` and the
/// state untouched.
pub fn adamw<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AdamW,
    step: u64,
    a: &mut impl DevicePtrMut<T>,
    grad: &impl DevicePtr<f32>,
    grad_scale: f32,
    state: AdamWState<'_>,
) -> Result<()> {
    let (bias1, bias2) = cfg.bias_corrections(step)?;
    launch_adamw(
        stream,
        cfg,
        (bias1 as f32, bias2 as f32, 0),
        a,
        grad,
        grad_scale,
        state,
    )
}

/// [`adamw`] with the step on the device: `step` (one u64) counts the
/// optimizer steps taken; this update uses `t = step + 1` for its bias
/// corrections, computed by the kernel (bitwise [`AdamW::bias_corrections`]),
/// and then advances `step` by one ([`advance_step`]). Nothing is read back
/// to the host, so a captured CUDA graph replays successive steps correctly.
pub fn adamw_device_step<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AdamW,
    step: &mut impl DevicePtrMut<u64>,
    a: &mut impl DevicePtrMut<T>,
    grad: &impl DevicePtr<f32>,
    grad_scale: f32,
    state: AdamWState<'_>,
) -> Result<()> {
    // The hyper-parameters are checked as for step 1; the step itself is
    // the device's.
    cfg.bias_corrections(1)?;
    check_len("step", step.len(), 1)?;
    let kernels = Kernels::for_stream(stream)?;
    let advance = kernels.kernel(KernelId::untyped(Family::StepAdvance))?;
    {
        let (step_ptr, _rec) = step.device_ptr_mut(stream);
        launch_adamw(
            stream,
            cfg,
            (1.0, 1.0, step_ptr),
            a,
            grad,
            grad_scale,
            state,
        )?;
    }
    let (step_ptr, _rec) = step.device_ptr_mut(stream);
    let params = singlora_step_params { step: step_ptr };
    // SAFETY: `step` holds at least one u64 (checked) on this stream's
    // context, borrowed mutably; the kernel touches element 0 only.
    unsafe { launch(stream, advance, (1, 1, 1), &params) }
}

/// Advances a device optimizer-step counter (one u64) by one, in stream
/// order: for callers with their own optimizer that read the step through
/// a device [`crate::ops::scale::Scale::Ramp`].
pub fn advance_step(stream: &Arc<CudaStream>, step: &mut impl DevicePtrMut<u64>) -> Result<()> {
    check_len("step", step.len(), 1)?;
    let kernels = Kernels::for_stream(stream)?;
    let kernel = kernels.kernel(KernelId::untyped(Family::StepAdvance))?;
    let (step_ptr, _rec) = step.device_ptr_mut(stream);
    let params = singlora_step_params { step: step_ptr };
    // SAFETY: as in adamw_device_step.
    unsafe { launch(stream, kernel, (1, 1, 1), &params) }
}

/// `bias`: (bias1, bias2, step pointer) — the by-value corrections, or a
/// device step the kernel derives them from.
fn launch_adamw<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AdamW,
    bias: (f32, f32, u64),
    a: &mut impl DevicePtrMut<T>,
    grad: &impl DevicePtr<f32>,
    grad_scale: f32,
    state: AdamWState<'_>,
) -> Result<()> {
    let n = a.len();
    let (bias1, bias2, step_ptr) = bias;
    if !grad_scale.is_finite() {
        return Err(Error::invalid("grad_scale", "a finite number", grad_scale));
    }
    check_len("grad", grad.len(), n)?;
    check_len("m", state.m.len(), n)?;
    check_len("v", state.v.len(), n)?;
    if let Some(master) = &state.master {
        check_len("master", master.len(), n)?;
    }
    let kernels = Kernels::for_stream(stream)?;
    let kernel = kernels.kernel(KernelId::of::<T>(Family::Adamw, 0).expect("adamw is unranked"))?;
    if n == 0 {
        return Ok(());
    }
    let (a_ptr, _a_rec) = a.device_ptr_mut(stream);
    let (g_ptr, _g_rec) = grad.device_ptr(stream);
    let (m_ptr, _m_rec) = state.m.device_ptr_mut(stream);
    let (v_ptr, _v_rec) = state.v.device_ptr_mut(stream);
    let (master_ptr, _master_rec) = or_null(state.master.map(|m| m.device_ptr_mut(stream)));
    let t = std::mem::size_of::<T>();
    check_disjoint(
        &[
            Region::contiguous("a", a_ptr, n, t)?,
            Region::contiguous("m", m_ptr, n, 4)?,
            Region::contiguous("v", v_ptr, n, 4)?,
            Region::contiguous("master", master_ptr, n, 4)?,
        ],
        &[
            Region::contiguous("grad", g_ptr, n, 4)?,
            Region::contiguous("step", step_ptr, (step_ptr != 0) as usize, 8)?,
        ],
    )?;
    let params = singlora_adamw_params {
        a: a_ptr,
        master: master_ptr,
        grad: g_ptr,
        m: m_ptr,
        v: v_ptr,
        n: n as u64,
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        grad_scale,
        bias1,
        bias2,
        step: step_ptr,
    };
    let blocks = n.div_ceil(THREADS as usize).min(4096) as u32;
    // SAFETY: a, grad, m, v (and master) hold at least n elements (checked
    // above) on this stream's context; the kernel touches elements 0..n; the
    // outputs are distinct mutable borrows, alive until the launch is enqueued.
    unsafe { launch(stream, kernel, (blocks, 1, 1), &params) }
}
