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

/// One element type: its code, name, bar and NaN pattern; f16 and bf16
/// convert through `half`'s own f64 conversions.
macro_rules! dtype {
    ($t:ty, $code:ident, $name:literal, $tol:literal, $nan:literal, $from:expr) => {
        impl DType for $t {
            const CODE: singlora_dtype = singlora_dtype::$code;
            const NAME: &'static str = $name;
            const TOLERANCE: f64 = $tol;
            const NAN_BITS: u32 = $nan;
            fn to_f64(self) -> f64 {
                self.into()
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}

dtype!(
    f32,
    SINGLORA_DTYPE_F32,
    "f32",
    1e-5,
    0x7fc0_0000,
    |v: f64| v as f32
);
dtype!(f16, SINGLORA_DTYPE_F16, "f16", 2e-3, 0x7e00, f16::from_f64);
dtype!(
    bf16,
    SINGLORA_DTYPE_BF16,
    "bf16",
    1e-2,
    0x7fc0,
    bf16::from_f64
);
