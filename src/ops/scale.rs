//! Where a launch takes the SingLoRA scale from: a value computed on the
//! host, a device f32, or a device optimizer-step counter through the ramp
//! (kernels/params.h, `singlora_scale`). The device forms let a captured CUDA
//! graph replay a training step correctly as the ramp advances, with no host
//! read of device state.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, SyncOnDrop};

use crate::dims::check_scale;
use crate::error::{Error, Result};
use crate::params::singlora_scale;

/// The scale of a safe launch (`f32` converts into [`Scale::Value`]).
#[derive(Clone, Copy)]
pub enum Scale<'a> {
    /// Computed on the host; must be finite.
    Value(f32),
    /// A device f32 (one element), read when the kernels run.
    Device(&'a dyn DevicePtr<f32>),
    /// `alpha_over_rank · min(t / warmup_steps, 1)` with `t` the device
    /// counter of optimizer steps (one u64), in f64 on the device, rounded
    /// once to f32: bitwise [`crate::Ramp::scale`] of the same step.
    Ramp {
        step: &'a dyn DevicePtr<u64>,
        alpha_over_rank: f64,
        warmup_steps: u64,
    },
}

impl From<f32> for Scale<'_> {
    fn from(v: f32) -> Self {
        Scale::Value(v)
    }
}

impl std::fmt::Debug for Scale<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scale::Value(v) => write!(f, "Scale::Value({v})"),
            Scale::Device(_) => write!(f, "Scale::Device(..)"),
            Scale::Ramp {
                alpha_over_rank,
                warmup_steps,
                ..
            } => write!(f, "Scale::Ramp {{ alpha_over_rank: {alpha_over_rank}, warmup_steps: {warmup_steps} }}"),
        }
    }
}

/// The scale of a raw launch: device pointers as `u64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RawScale {
    Value(f32),
    /// `const float *` on the launch's device.
    Device(u64),
    /// `const uint64_t *` optimizer-step counter on the launch's device.
    Ramp {
        step: u64,
        alpha_over_rank: f64,
        warmup_steps: u64,
    },
}

impl From<f32> for RawScale {
    fn from(v: f32) -> Self {
        RawScale::Value(v)
    }
}

impl RawScale {
    /// `scale` as a raw scale, checked ([`RawScale::check`]).
    pub fn checked(scale: impl Into<RawScale>) -> Result<Self> {
        let scale = scale.into();
        scale.check()?;
        Ok(scale)
    }

    /// Refuses a non-finite value or alpha/rank, and a null or misaligned
    /// pointer (4 bytes for the f32, 8 for the step counter).
    pub fn check(&self) -> Result<()> {
        match *self {
            RawScale::Value(v) => check_scale(v),
            RawScale::Device(p) => check_ptr("scale_ptr", p, 4),
            RawScale::Ramp {
                step,
                alpha_over_rank,
                ..
            } => {
                check_ptr("step_ptr", step, 8)?;
                if !alpha_over_rank.is_finite() {
                    return Err(Error::invalid(
                        "alpha_over_rank",
                        "a finite number",
                        alpha_over_rank,
                    ));
                }
                Ok(())
            }
        }
    }

    /// The device pointer the scale is read through (0 for a value), for
    /// overlap checks.
    pub(crate) fn region(&self) -> (&'static str, u64, usize) {
        match *self {
            RawScale::Value(_) => ("scale", 0, 0),
            RawScale::Device(p) => ("scale_ptr", p, 4),
            RawScale::Ramp { step, .. } => ("step_ptr", step, 8),
        }
    }

    /// The kernel parameter, with `sign` (+1, or -1 for unmerge).
    pub(crate) fn param(&self, sign: f32) -> singlora_scale {
        let mut p = singlora_scale {
            sign,
            ..Default::default()
        };
        match *self {
            RawScale::Value(v) => p.value = v,
            RawScale::Device(ptr) => p.ptr = ptr,
            RawScale::Ramp {
                step,
                alpha_over_rank,
                warmup_steps,
            } => {
                p.step = step;
                p.alpha_over_rank = alpha_over_rank;
                p.warmup = warmup_steps;
            }
        }
        p
    }
}

fn check_ptr(name: &'static str, p: u64, align: u64) -> Result<()> {
    if p == 0 || p % align != 0 {
        let expected = if align == 4 {
            "a non-null, 4-byte aligned device pointer to one f32"
        } else {
            "a non-null, 8-byte aligned device pointer to one u64"
        };
        return Err(Error::invalid(name, expected, format!("{p:#x}")));
    }
    Ok(())
}

impl Scale<'_> {
    /// The raw form, and the records that keep cudarc's stream ordering
    /// until the launch is enqueued. Checks the buffers hold one element.
    pub(crate) fn raw<'s>(
        &'s self,
        stream: &'s Arc<CudaStream>,
    ) -> Result<(RawScale, Option<SyncOnDrop<'s>>)> {
        Ok(match self {
            Scale::Value(v) => (RawScale::Value(*v), None),
            Scale::Device(b) => {
                crate::dims::check_len("scale_ptr", b.len(), 1)?;
                let (p, rec) = b.device_ptr(stream);
                (RawScale::Device(p), Some(rec))
            }
            Scale::Ramp {
                step,
                alpha_over_rank,
                warmup_steps,
            } => {
                crate::dims::check_len("step_ptr", step.len(), 1)?;
                let (p, rec) = step.device_ptr(stream);
                (
                    RawScale::Ramp {
                        step: p,
                        alpha_over_rank: *alpha_over_rank,
                        warmup_steps: *warmup_steps,
                    },
                    Some(rec),
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_scales_are_checked() {
        assert!(RawScale::Value(1.0).check().is_ok());
        assert!(RawScale::Value(f32::NAN).check().is_err());
        assert!(RawScale::Device(0x1000).check().is_ok());
        assert!(matches!(
            RawScale::Device(0).check(),
            Err(Error::InvalidArgument {
                name: "scale_ptr",
                ..
            })
        ));
        assert!(RawScale::Device(0x1002).check().is_err());
        let ramp = |step, a| RawScale::Ramp {
            step,
            alpha_over_rank: a,
            warmup_steps: 10,
        };
        assert!(ramp(0x1000, 2.0).check().is_ok());
        assert!(matches!(
            ramp(0x1004, 2.0).check(),
            Err(Error::InvalidArgument {
                name: "step_ptr",
                ..
            })
        ));
        assert!(matches!(
            ramp(0x1000, f64::INFINITY).check(),
            Err(Error::InvalidArgument {
                name: "alpha_over_rank",
                ..
            })
        ));
    }

    #[test]
    fn the_kernel_parameter_names_one_source() {
        let p = RawScale::Value(0.5).param(-1.0);
        assert_eq!((p.ptr, p.step, p.value, p.sign), (0, 0, 0.5, -1.0));
        let p = RawScale::Device(0x40).param(1.0);
        assert_eq!((p.ptr, p.step), (0x40, 0));
        let p = RawScale::Ramp {
            step: 0x80,
            alpha_over_rank: 4.0,
            warmup_steps: 7,
        }
        .param(1.0);
        assert_eq!(
            (p.ptr, p.step, p.alpha_over_rank, p.warmup),
            (0, 0x80, 4.0, 7)
        );
    }
}
