// What every kernel shares: the block size, and the macro that publishes a
// kernel's launch shape to the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "params.h"

namespace singlora {

constexpr int kThreads = SINGLORA_THREADS;
constexpr int kWarps = kThreads / 32;

}  // namespace singlora

// Every kernel `name` publishes its launch shape as `name_info` (read once by
// the host when the module loads, so tile sizes live only in the .cu files).
#define SINGLORA_KERNEL_INFO(name, smem, rows, cols, rank_cap) \
    extern "C" __constant__ singlora_kernel_info name##_info = {(smem), (rows), (cols), (rank_cap)};

// The kernel `family_tname` over one parameter struct for element type T:
// `body<T>(p)`, with no shared memory or tile shape to publish (the
// elementwise and reduction families).
#define SINGLORA_PLAIN_KERNEL(family, tname, T, params_t, body)                                        \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads) family##_##tname(const params_t p) { \
        body<T>(p);                                                                                  \
    }                                                                                                \
    SINGLORA_KERNEL_INFO(family##_##tname, 0, 0, 0, 0)
