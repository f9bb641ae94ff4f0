//! Launch helpers every op shares: the block size, the one launch call, and
//! the small pure facts launchers derive from pointers.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg, SyncOnDrop};

use crate::error::Result;
use crate::params::SINGLORA_THREADS;
use crate::runtime::registry::Kernel;

/// Threads per block of every kernel.
pub(crate) const THREADS: u32 = SINGLORA_THREADS;

/// A pointer and a row stride (elements of `T`) allow 16-byte accesses:
/// the kernels take their vector paths only then.
pub(crate) fn vec_ok<T>(ptr: u64, ld: usize) -> i32 {
    let bytes = std::mem::size_of::<T>();
    (ptr % 16 == 0 && (ld * bytes) % 16 == 0) as i32
}

/// A pointer and a row stride (elements of `T`) allow 2-element accesses
/// (pairs of adjacent elements as one access).
pub(crate) fn pair_ok<T>(ptr: u64, ld: usize) -> i32 {
    let bytes = std::mem::size_of::<T>();
    (ptr % (2 * bytes as u64) == 0 && ld % 2 == 0) as i32
}

/// The device pointer of an optional buffer (`0` when absent) with the
/// record that keeps cudarc's stream ordering until the launch is enqueued:
/// `or_null(buf.map(|b| b.device_ptr(stream)))` (or `device_ptr_mut`).
pub(crate) fn or_null(ptr: Option<(u64, SyncOnDrop<'_>)>) -> (u64, Option<SyncOnDrop<'_>>) {
    match ptr {
        Some((p, rec)) => (p, Some(rec)),
        None => (0, None),
    }
}

/// Enqueues `kernel` with one by-value parameter struct.
///
/// # Safety
/// Every device pointer inside `params` must be valid for the accesses the
/// kernel makes for the dimensions `params` describes, on `stream`'s context,
/// until the kernel completes; the grid must match those dimensions.
pub(crate) unsafe fn launch<P: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    kernel: &Kernel,
    grid: (u32, u32, u32),
    params: &P,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: kernel.info.smem_bytes,
    };
    let mut builder = stream.launch_builder(&kernel.func);
    builder.arg(params);
    builder.launch(cfg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_ok_needs_an_aligned_pointer_and_row_pitch() {
        assert_eq!(vec_ok::<u16>(0x1000, 8), 1);
        assert_eq!(vec_ok::<u16>(0x1002, 8), 0);
        assert_eq!(vec_ok::<u16>(0x1000, 9), 0);
        assert_eq!(vec_ok::<f32>(0x1000, 4), 1);
        assert_eq!(vec_ok::<f32>(0x1000, 6), 0);
    }

    #[test]
    fn pair_ok_needs_an_even_pointer_and_stride() {
        assert_eq!(pair_ok::<u16>(0x1004, 6), 1);
        assert_eq!(pair_ok::<u16>(0x1002, 6), 0);
        assert_eq!(pair_ok::<u16>(0x1004, 7), 0);
        assert_eq!(pair_ok::<f32>(0x1008, 2), 1);
        assert_eq!(pair_ok::<f32>(0x1004, 2), 0);
    }
}
