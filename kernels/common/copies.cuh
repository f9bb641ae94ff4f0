// Global-to-shared copies: cp.async and the per-thread tile copier.
#pragma once

#include "elements.cuh"

namespace singlora {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// .cg: stream through L2 only; X, G and Y are touched once per block.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void zero16(void* smem) { *reinterpret_cast<uint4*>(smem) = make_uint4(0, 0, 0, 0); }

// One thread's share of copying a ROWS x COLS tile of a row-major global
// matrix into shared memory, in 16-byte chunks. The thread's chunks sit at
// the same tile positions for every tile of a loop, so their offsets are
// computed once: per-chunk index arithmetic would otherwise be a large part
// of the instructions of kernels that are issue-bound (benches/RESULTS.md).
//
// copy() fills the whole tile on every call: chunks inside the valid extent
// (rows x cols, tile-relative) by cp.async (16-byte path) or element by
// element (a chunk that straddles the last column, or no 16-byte alignment:
// `vec` false), and everything outside with zeros, so padded rows and columns
// contribute nothing to a product.
template <typename T, int ROWS, int COLS> struct TileCopy {
    static constexpr int V = vec_elems<T>();
    static constexpr int CPR = COLS / V;           // chunks per row
    static constexpr int RSTEP = kThreads / CPR;   // rows apart of a thread's chunks
    // A tile of fewer chunks than threads (the small f32 configuration):
    // one pass, and the threads past its last row idle. For every other
    // tile PARTIAL is false and the guards below fold away.
    static constexpr bool PARTIAL = ROWS < RSTEP;
    static constexpr int PASSES = PARTIAL ? 1 : ROWS / RSTEP;
    static_assert(COLS % V == 0 && kThreads % CPR == 0 && (PARTIAL || ROWS % RSTEP == 0), "tile shape");

    int r0, c;         // first row and column (elements) of this thread's chunks
    int64_t goff;      // r0 * ld + c
    int64_t gstep;     // RSTEP * ld

    __device__ __forceinline__ explicit TileCopy(int64_t ld)
        : r0(threadIdx.x / CPR), c((threadIdx.x % CPR) * V), goff(r0 * ld + c), gstep(RSTEP * ld) {}

    // g: the global address of the tile's element (0, 0).
    __device__ __forceinline__ void copy(T* __restrict__ s, int sld, const T* __restrict__ g, int rows,
                                         int cols, bool vec) const {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = r0 + p * RSTEP;
            if (PARTIAL && r >= ROWS) continue;
            T* dst = s + r * sld + c;
            const T* src = g + goff + p * gstep;
            if (r >= rows || c >= cols) {
                zero16(dst);
            } else if (vec && c + V <= cols) {
                cp_async16(dst, src);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) dst[e] = c + e < cols ? src[e] : from_f32<T>(0.0f);
            }
        }
    }

    // f(chunk, r, c) for each of this thread's chunks inside the valid
    // extent (rows x cols, tile-relative): the ones copy() filled from
    // global memory (a chunk that straddles the last column has zeros past
    // it). After cp_async_wait, a thread's own chunks have landed for it,
    // so it may rewrite them in place (dropout) before the block's barrier.
    // Not unrolled: f (dropout's Philox calls) is long, and unrolled passes
    // would interleave and hold more registers than the kernels around
    // them (costing occupancy even when the branch that calls it is off).
    template <typename F>
    __device__ __forceinline__ void for_each_chunk(T* s, int sld, int rows, int cols, F&& f) const {
#pragma unroll 1
        for (int p = 0; p < PASSES; ++p) {
            const int r = r0 + p * RSTEP;
            if (PARTIAL && r >= ROWS) continue;
            if (r >= rows || c >= cols) continue;
            f(s + r * sld + c, r, c);
        }
    }

    // The reverse: shared tile -> global, rows x cols valid (others skipped).
    __device__ __forceinline__ void store(T* __restrict__ g, const T* __restrict__ s, int sld, int rows, int cols,
                                          bool vec) const {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = r0 + p * RSTEP;
            if (r >= rows || c >= cols) continue;
            const T* src = s + r * sld + c;
            T* dst = g + goff + p * gstep;
            if (vec && c + V <= cols) {
                *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
            } else {
                for (int e = 0; e < V && c + e < cols; ++e) dst[e] = src[e];
            }
        }
    }
};

}  // namespace singlora
