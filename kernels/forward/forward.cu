// forward: the portable shrink-expand kernels (sm_80 and up), one per element
// type and rank bucket, and forward_small, the configuration that fits
// SINGLORA_SMALL_SMEM_BYTES for the buckets whose regular one does not (the
// host picks it only there). The kernel body is in shrink_expand.cuh.
#include "shrink_expand.cuh"

#define SINGLORA_FORWARD_KERNEL(family, SMALL, tname, T, RP)                                   \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads,                           \
                                                 (singlora::ForwardConfig<T, RP, SMALL>::MIN_BLOCKS)) \
        family##_##tname##_r##RP(const singlora_forward_params p) {                            \
        singlora::forward_kernel<T, RP, 1, SMALL>(p);                                          \
    }                                                                                          \
    SINGLORA_KERNEL_INFO(family##_##tname##_r##RP, (singlora::ForwardConfig<T, RP, SMALL>::SMEM_BYTES), \
                         (singlora::ForwardConfig<T, RP, SMALL>::BM),                          \
                         (singlora::ForwardConfig<T, RP, SMALL>::BN), RP)

#define SINGLORA_FORWARD(tname, T, RP) SINGLORA_FORWARD_KERNEL(forward, false, tname, T, RP)
#define SINGLORA_FORWARD_SMALL(tname, T, RP) SINGLORA_FORWARD_KERNEL(forward_small, true, tname, T, RP)

#define SINGLORA_FORWARD_RANKS(tname, T) SINGLORA_RANK_BUCKETS(SINGLORA_FORWARD, tname, T)
#define SINGLORA_FORWARD_SMALL_RANKS(tname, T) SINGLORA_SMALL_FORWARD_RANK_BUCKETS(SINGLORA_FORWARD_SMALL, tname, T)
SINGLORA_DTYPES(SINGLORA_FORWARD_RANKS)
SINGLORA_DTYPES(SINGLORA_FORWARD_SMALL_RANKS)
