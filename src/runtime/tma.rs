//! Tensor maps for Hopper's bulk tensor copies (TMA): the host half of
//! kernels/common/tma.cuh. A map describes a row-major 2-D matrix of device
//! memory and the box one copy moves; the driver encodes it on the host (no
//! device work, no synchronisation) and the kernel takes it by value.

use cudarc::driver::sys;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::{singlora_dtype, singlora_tensor_map};

/// A row-major matrix a tensor map can describe: a 16-byte aligned base and
/// a row pitch of a multiple of 16 bytes (the copy engine's rule), rows and
/// columns within its 32-bit coordinates.
pub(crate) fn describable<T>(ptr: u64, rows: usize, cols: usize, ld: usize) -> bool {
    let elem = std::mem::size_of::<T>();
    ptr % 16 == 0
        && (ld * elem) % 16 == 0
        && rows > 0
        && cols > 0
        && rows <= i32::MAX as usize
        && cols <= i32::MAX as usize
}

/// The map of `rows × cols` elements of `T` at `ptr` (row pitch `ld`
/// elements), moved in boxes of `box_cols × box_rows` and laid out in shared
/// memory with the swizzle of `box_cols · size_of::<T>()` bytes (32, 64 or
/// 128). Elements of a box outside the matrix are read as zeros and never
/// written. The caller checked [`describable`].
pub(crate) fn tensor_map_2d<T: DType>(
    ptr: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    (box_cols, box_rows): (u32, u32),
) -> Result<singlora_tensor_map> {
    let elem = std::mem::size_of::<T>();
    let data_type = match T::CODE {
        singlora_dtype::SINGLORA_DTYPE_F32 => {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32
        }
        singlora_dtype::SINGLORA_DTYPE_F16 => {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
        }
        singlora_dtype::SINGLORA_DTYPE_BF16 => {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        }
    };
    let swizzle = match box_cols as usize * elem {
        32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        bytes => {
            return Err(Error::invalid(
                "tensor map box",
                "rows of 32, 64 or 128 bytes",
                bytes,
            ))
        }
    };
    let dims = [cols as u64, rows as u64];
    let strides = [(ld * elem) as u64];
    let boxes = [box_cols, box_rows];
    let element_strides = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every array has the length the rank (2) asks for (strides:
    // rank − 1); `map` is a writable CUtensorMap; the driver only encodes
    // (it reads no device memory).
    let rc = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != sys::cudaError_enum::CUDA_SUCCESS {
        return Err(cudarc::driver::DriverError(rc).into());
    }
    // SAFETY: the call succeeded, so the map is initialised; it is 16
    // u64s, the layout singlora_tensor_map (params.h) copies.
    let map = unsafe { map.assume_init() };
    Ok(singlora_tensor_map { opaque: map.opaque })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describable_needs_16_byte_bases_and_pitches() {
        assert!(describable::<u16>(0x1000, 10, 100, 104));
        assert!(!describable::<u16>(0x1008, 10, 100, 104));
        assert!(!describable::<u16>(0x1000, 10, 100, 100));
        assert!(!describable::<u16>(0x1000, 0, 100, 104));
        assert!(describable::<f32>(0x1000, 10, 100, 100));
    }
}
