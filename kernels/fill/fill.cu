// fill: the smoke kernel. Sets n elements of 2 or 4 bytes to one bit pattern.
// It proves the fatbin loads and launches, and tests poison outputs with NaN
// through it, whatever the element type.
#include "common/kernel.cuh"

extern "C" __global__ void __launch_bounds__(singlora::kThreads, 1) fill(const singlora_fill_params p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        if (p.elem_bytes == 2) {
            reinterpret_cast<uint16_t*>(p.out)[i] = (uint16_t)p.bits;
        } else {
            reinterpret_cast<uint32_t*>(p.out)[i] = p.bits;
        }
    }
}
SINGLORA_KERNEL_INFO(fill, 0, 0, 0, 0)
