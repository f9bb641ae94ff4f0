// forward_decode_sm90: the decode-size forward (tokens <= SINGLORA_FORWARD_BM)
// on sm_90a. A thread-block cluster of SINGLORA_DECODE_CLUSTER blocks splits
// the shrink's reduction over k_dim and sums the partial S tiles through
// distributed shared memory in a fixed order (see shrink_expand.cuh).
//
// This translation unit is compiled for sm_90a alone (build.rs: every
// *_sm90.cu), into its own module: other GPUs never see these kernels, and
// the host's registry, not the compute capability, says whether they exist.
#include "shrink_expand.cuh"

#define SINGLORA_FORWARD_DECODE(tname, T, RP)                                                                 \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads, 1)                                       \
        __cluster_dims__(SINGLORA_DECODE_CLUSTER, 1, 1)                                                       \
            forward_decode_sm90_##tname##_r##RP(const singlora_forward_params p) {                            \
        singlora::forward_kernel<T, RP, SINGLORA_DECODE_CLUSTER>(p);                                          \
    }                                                                                                         \
    SINGLORA_KERNEL_INFO(forward_decode_sm90_##tname##_r##RP, (singlora::ForwardConfig<T, RP>::SMEM_BYTES),   \
                         (singlora::ForwardConfig<T, RP>::BM), (singlora::ForwardConfig<T, RP>::BN), RP)

#define SINGLORA_FORWARD_DECODE_RANKS(tname, T) SINGLORA_DECODE_RANK_BUCKETS(SINGLORA_FORWARD_DECODE, tname, T)
SINGLORA_DTYPES(SINGLORA_FORWARD_DECODE_RANKS)
