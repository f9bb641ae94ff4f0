//! C arguments into checked Rust values: dimensions, strides, pointers,
//! device ordinals, dtype and backward-kernel codes, each refusal naming
//! its argument.

use crate::dims::Dims;
use crate::dropout::Dropout;
use crate::error::Error;
use crate::ffi::status::{
    Failure, Outcome, SINGLORA_BACKWARD_FUSED, SINGLORA_BACKWARD_SPLIT,
    SINGLORA_ERROR_UNKNOWN_DTYPE,
};
use crate::ops::backward::BackwardKernel;
use crate::ops::scale::RawScale;
use crate::params::singlora_dtype;

pub(crate) fn invalid(name: &'static str, expected: &'static str, actual: String) -> Failure {
    Error::invalid(name, expected, actual).into()
}

/// A non-negative `int64_t` dimension or stride as `usize`.
pub(crate) fn non_negative(name: &'static str, v: i64) -> Result<usize, Failure> {
    usize::try_from(v).map_err(|_| invalid(name, "a non-negative integer", v.to_string()))
}

pub(crate) fn dims(tokens: i64, d_in: i64, d_out: i64, rank: i64) -> Result<Dims, Failure> {
    Ok(Dims::new(
        non_negative("tokens", tokens)?,
        non_negative("d_in", d_in)?,
        non_negative("d_out", d_out)?,
        non_negative("rank", rank)?,
    )?)
}

/// The scale of a launch, as every C launch takes it (include/singlora.h,
/// "The scale"): `value` when `ptr` is 0, else the device `float` at `ptr`
/// (its alignment is checked with the shape, by [`RawScale::check`]).
pub(crate) fn scale(value: f32, ptr: u64) -> RawScale {
    if ptr == 0 {
        RawScale::Value(value)
    } else {
        RawScale::Device(ptr)
    }
}

/// The adapter dropout of a launch (include/singlora.h, "Dropout"):
/// `dropout_p` in `[0, 1)`, refused naming `dropout_p` otherwise.
pub(crate) fn dropout(p: f64, seed: u64, offset: u64) -> Result<Dropout, Failure> {
    Dropout::new(p, seed, offset)
        .map_err(|_| invalid("dropout_p", "a drop probability in [0, 1)", p.to_string()))
}

/// A device pointer: non-null when `required`, and aligned to `align` bytes
/// (the element size, or 16 for the workspace) when non-null.
pub(crate) fn pointer(name: &'static str, p: u64, align: u64, required: bool) -> Outcome {
    if p == 0 {
        if required {
            return Err(invalid(name, "a non-null device pointer", "NULL".into()));
        }
        return Ok(());
    }
    if p % align != 0 {
        let expected = match align {
            2 => "a 2-byte aligned device pointer (the element size)",
            4 => "a 4-byte aligned device pointer (the element size)",
            _ => "a 16-byte aligned device pointer",
        };
        return Err(invalid(name, expected, format!("{p:#x}")));
    }
    Ok(())
}

pub(crate) fn device_ordinal(device: i32) -> Result<usize, Failure> {
    usize::try_from(device).map_err(|_| {
        invalid(
            "device",
            "a non-negative CUDA device ordinal",
            device.to_string(),
        )
    })
}

/// The element types, by their C code.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dt {
    F32,
    F16,
    Bf16,
}

pub(crate) fn dtype(code: i32) -> Result<Dt, Failure> {
    const F32: i32 = singlora_dtype::SINGLORA_DTYPE_F32 as i32;
    const F16: i32 = singlora_dtype::SINGLORA_DTYPE_F16 as i32;
    const BF16: i32 = singlora_dtype::SINGLORA_DTYPE_BF16 as i32;
    match code {
        F32 => Ok(Dt::F32),
        F16 => Ok(Dt::F16),
        BF16 => Ok(Dt::Bf16),
        _ => Err(Failure {
            status: SINGLORA_ERROR_UNKNOWN_DTYPE,
            message: format!(
                "invalid argument `dtype`: expected SINGLORA_DTYPE_F32 ({F32}), \
                 SINGLORA_DTYPE_F16 ({F16}) or SINGLORA_DTYPE_BF16 ({BF16}), got {code}"
            ),
        }),
    }
}

impl Dt {
    pub(crate) fn size(self) -> u64 {
        match self {
            Dt::F32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
        }
    }
}

/// Runs `$body` with `$T` bound to the element type of `$dt`.
macro_rules! with_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            Dt::F32 => {
                type $T = f32;
                $body
            }
            Dt::F16 => {
                type $T = f16;
                $body
            }
            Dt::Bf16 => {
                type $T = bf16;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

/// singlora_backward's `kernel`: one of `SINGLORA_BACKWARD_*`.
pub(crate) fn backward_kernel(code: i32) -> Result<BackwardKernel, Failure> {
    match code {
        SINGLORA_BACKWARD_SPLIT => Ok(BackwardKernel::Split),
        SINGLORA_BACKWARD_FUSED => Ok(BackwardKernel::Fused),
        _ => Err(invalid(
            "kernel",
            "SINGLORA_BACKWARD_SPLIT (0) or SINGLORA_BACKWARD_FUSED (1)",
            code.to_string(),
        )),
    }
}
