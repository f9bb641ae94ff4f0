// The shrink's result S between the shrink and the expand, shared by the
// shrink-expand kernels (shrink_expand.cuh, forward_tma_sm90.cu): its f32
// staging tile is stored to s_out and turned into the expand's left operand.
#pragma once

#include "common/elements.cuh"

namespace singlora {

// s_out[(row0 + r)·rank + c] = sf[r·sf_ld + c] for the block's rows and the
// rank's columns (coalesced over the block's threads).
__device__ __forceinline__ void store_s_rows(float* s_out, const float* sf, int sf_ld, int64_t row0, int rows,
                                             int rank) {
    for (int i = threadIdx.x; i < rows * rank; i += kThreads) {
        const int r = i / rank, c = i % rank;
        s_out[(row0 + r) * rank + c] = sf[r * sf_ld + c];
    }
}

// st[r][c] = S[r][c] in T for the expand's tensor cores, BM rows of RP
// columns, kThreads / BM threads per row; f16 rows are scaled by a power of
// two into range (row_inv[r] = the inverse, exact, undone in the epilogue).
template <typename T, int BM, int RP>
__device__ __forceinline__ void s_to_operand(const float* sf, int sf_ld, T* st, int st_ld, float* row_inv) {
    constexpr int TPR = kThreads / BM;  // threads per row
    const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
    float scale = 1.0f;
    if constexpr (Elem<T>::kNeedsScaling) {
        float mx = 0.0f;
        for (int c = part; c < RP; c += TPR) mx = fmaxf(mx, fabsf(sf[r * sf_ld + c]));
#pragma unroll
        for (int o = TPR / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        scale = pow2_scale_for(mx);
    }
    for (int c = part; c < RP; c += TPR) st[r * st_ld + c] = from_f32<T>(sf[r * sf_ld + c] * scale);
    if (part == 0) row_inv[r] = 1.0f / scale;
}

}  // namespace singlora
