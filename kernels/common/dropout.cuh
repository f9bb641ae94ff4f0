// Adapter dropout in the kernels: the mask of kernels/params.h
// (singlora_dropout), regenerated from Philox4x32-10 wherever it is needed.
// Masking zeroes elements (exact); the 1/(1 − p) scale is applied by the
// callers to f32 results.
#pragma once

#include "common/elements.cuh"
#include "common/philox.cuh"

namespace singlora {

// Zeroes the dropped elements of one 16-byte chunk of a row in shared
// memory: vec_elems<T>() elements of row `token` from column `col`
// (col % 4 == 0), one Philox call per four columns. All-zero bits are +0 in
// every element type.
template <typename T>
__device__ __forceinline__ void drop_chunk(T* chunk, const singlora_dropout& d, uint32_t token, uint32_t col) {
    constexpr int V = vec_elems<T>();
    constexpr int EPW = 4 / (int)sizeof(T);  // elements per 32-bit word
    const uint4 raw = *reinterpret_cast<const uint4*>(chunk);
    // Registers, not an alias of raw (an address taken would put it on the stack).
    uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
        const Philox4 r = dropout_words(d.seed, d.offset, token, (col >> 2) + q);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int e = q * 4 + j;  // element of the chunk
            if (r.v[j] < d.threshold) {
                if constexpr (EPW == 1) {
                    w[e] = 0u;
                } else {
                    w[e / 2] &= (e % 2) ? 0x0000FFFFu : 0xFFFF0000u;
                }
            }
        }
    }
    *reinterpret_cast<uint4*>(chunk) = make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace singlora
