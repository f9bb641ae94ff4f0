//! fill: the smoke kernel's launcher (kernels/fill/).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtrMut};

use crate::dtype::DType;
use crate::error::Result;
use crate::params::singlora_fill_params;
use crate::runtime::launch::{launch, THREADS};
use crate::runtime::registry::{Family, KernelId, Kernels};

/// Sets every element of `out` to the bit pattern `bits` (the low 16 bits for
/// f16/bf16). Tests poison outputs with `fill_bits(stream, out, T::NAN_BITS)`.
pub fn fill_bits<T: DType>(
    stream: &Arc<CudaStream>,
    out: &mut impl DevicePtrMut<T>,
    bits: u32,
) -> Result<()> {
    let kernels = Kernels::for_stream(stream)?;
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(THREADS as usize).min(4096) as u32;
    let (ptr, _record) = out.device_ptr_mut(stream);
    let params = singlora_fill_params {
        out: ptr,
        n: n as u64,
        bits,
        elem_bytes: std::mem::size_of::<T>() as i32,
    };
    // SAFETY: `ptr` addresses `n` elements of size_of::<T>() bytes on this
    // stream's context (borrowed mutably until the launch is enqueued), and
    // the kernel writes exactly elements 0..n.
    unsafe {
        launch(
            stream,
            kernels.kernel(KernelId::untyped(Family::Fill))?,
            (blocks, 1, 1),
            &params,
        )
    }
}
