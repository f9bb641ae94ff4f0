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

// Keep bits of a warp's EMT × ENT tile of 16 × 8 accumulators in mma.sync's
// layout (kernels/common/mma.cuh): the element (row token0 + 16·mt + g + 8·h,
// column col0 + 8·nt + 2·(lane % 4) + e) is kept iff bit 4·(mt·ENT + nt) +
// 2·h + e is set. col0 % 8 == 0. Lanes 2i and 2i+1 own the two halves of the
// same four columns: lane parity b draws the rows h = b and hands the
// partner its half through one shuffle, so each Philox call is made once.
// Warp-collective (every lane of the warp must call it).
template <int EMT, int ENT>
__device__ __forceinline__ uint32_t tile_keep_bits(const singlora_dropout& d, int64_t token0, int64_t col0) {
    static_assert(EMT * ENT * 4 <= 32, "keep bits of a warp's tile fit a word");
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, b = lane & 1;
    const uint32_t col4 = (uint32_t)((col0 + 2 * (lane & 3)) >> 2);
    uint32_t keep = 0, give = 0;
#pragma unroll
    for (int mt = 0; mt < EMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < ENT; ++nt) {
            const uint32_t token = (uint32_t)(token0 + mt * 16 + g + 8 * b);
            const Philox4 w = dropout_words(d.seed, d.offset, token, col4 + 2 * nt);
            const uint32_t th = d.threshold;
            const int bit = 4 * (mt * ENT + nt) + 2 * b;
            // Selects, not w.v[2·b]: a runtime index would put w on the stack.
            const uint32_t k01 = (uint32_t)(w.v[0] >= th) | (uint32_t)(w.v[1] >= th) << 1;
            const uint32_t k23 = (uint32_t)(w.v[2] >= th) | (uint32_t)(w.v[3] >= th) << 1;
            keep |= (b ? k23 : k01) << bit;
            give |= (b ? k01 : k23) << bit;
        }
    // The partner drew the rows h = 1 − b and put this lane's columns at
    // exactly the bits of this lane's h = 1 − b slots.
    return keep | __shfl_xor_sync(0xffffffffu, give, 1);
}

// Whether bit `bit` of keep bits from tile_keep_bits says keep.
__device__ __forceinline__ bool kept(uint32_t keep, int bit) { return (keep >> bit & 1u) != 0; }

}  // namespace singlora
