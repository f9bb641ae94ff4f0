// forward: the portable shrink-expand kernels (sm_80 and up), one per element
// type and rank bucket; the kernel body is in shrink_expand.cuh.
#include "shrink_expand.cuh"

#define SINGLORA_FORWARD(tname, T, RP)                                                           \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads,                             \
                                                 (singlora::ForwardConfig<T, RP>::MIN_BLOCKS))   \
        forward_##tname##_r##RP(const singlora_forward_params p) {                               \
        singlora::forward_kernel<T, RP, 1>(p);                                                   \
    }                                                                                            \
    SINGLORA_KERNEL_INFO(forward_##tname##_r##RP, (singlora::ForwardConfig<T, RP>::SMEM_BYTES),  \
                         (singlora::ForwardConfig<T, RP>::BM), (singlora::ForwardConfig<T, RP>::BN), RP)

#define SINGLORA_FORWARD_RANKS(tname, T) SINGLORA_RANK_BUCKETS(SINGLORA_FORWARD, tname, T)
SINGLORA_DTYPES(SINGLORA_FORWARD_RANKS)
