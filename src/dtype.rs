//! The element types the kernels run on: f32, half::f16 and half::bf16.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use crate::params::singlora_dtype;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type of X, Y, G, dX and A. Reductions always run in f32.
pub trait DType:
    sealed::Sealed
    + DeviceRepr
    + ValidAsZeroBits
    + Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// The code the kernels' names and the C header use.
    const CODE: singlora_dtype;
    /// Short name, as in kernel names: "f32", "f16", "bf16".
    const NAME: &'static str;
    /// The relative L2 error bar against the f64 reference (design page §3).
    const TOLERANCE: f64;
    /// The NaN bit pattern, widened to 32 bits (for device-side poisoning).
    const NAN_BITS: u32;

    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl DType for f32 {
    const CODE: singlora_dtype = singlora_dtype::SINGLORA_DTYPE_F32;
    const NAME: &'static str = "f32";
    const TOLERANCE: f64 = 1e-5;
    const NAN_BITS: u32 = 0x7fc0_0000;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl DType for f16 {
    const CODE: singlora_dtype = singlora_dtype::SINGLORA_DTYPE_F16;
    const NAME: &'static str = "f16";
    const TOLERANCE: f64 = 2e-3;
    const NAN_BITS: u32 = 0x7e00;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl DType for bf16 {
    const CODE: singlora_dtype = singlora_dtype::SINGLORA_DTYPE_BF16;
    const NAME: &'static str = "bf16";
    const TOLERANCE: f64 = 1e-2;
    const NAN_BITS: u32 = 0x7fc0;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}
