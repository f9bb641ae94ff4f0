// Hopper's bulk tensor copies (TMA) and the mbarriers they complete on
// (sm_90; included by *_sm90.cu translation units only), and the shared-
// memory swizzle the copies apply.
#pragma once

#include "common/copies.cuh"

namespace singlora {

// The byte offset at which a TMA copy with a SPAN-byte swizzle (32, 64 or
// 128: CU_TENSOR_MAP_SWIZZLE_<SPAN>B) puts the byte at linear offset `o` of
// its box (rows of SPAN bytes or fewer, packed): the 16-byte chunk bits
// [4, 4 + log2(SPAN/16)) are XORed with the bits 3 places above them. The
// tile must start on a 1024-byte boundary (the pattern repeats every 1024
// bytes at most). Reading 8 rows' same chunk then touches 8 distinct bank
// groups, which ldmatrix needs to run without conflicts.
template <int SPAN> __device__ __forceinline__ uint32_t swizzled(uint32_t o) {
    static_assert(SPAN == 32 || SPAN == 64 || SPAN == 128, "TMA swizzle spans");
    constexpr uint32_t mask = (uint32_t)(SPAN / 16 - 1) << 4;
    return o ^ ((o >> 3) & mask);
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the copy engine (then a block
// barrier makes them visible to the other threads).
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The producer's arrival, announcing `bytes` of copies to complete on it.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Whether the phase of parity `parity` has completed (after a bounded,
// hardware-timed wait).
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

// Waits for the phase of parity `parity` to complete. 2^28 unsuccessful
// tries (each suspends the thread for a while) are minutes, far past any
// real wait: a broken protocol traps (a launch error) instead of hanging
// the GPU.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    for (uint32_t tries = 0; !mbar_try_wait(bar, parity); ++tries) {
        if (tries == (1u << 28)) __trap();
    }
}

// Global → shared: the box of `map` at (c0 innermost, c1), completing on
// `bar` (elements outside the tensor arrive as zeros).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, uint32_t bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
            dst),
        "l"(map), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}

// Shared → global: the box at (c0, c1) (elements outside the tensor are not
// written), as one bulk group.
__device__ __forceinline__ void tma_store_2d(const void* map, uint32_t src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(map),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Waits until the bulk stores issued by this thread have read their shared
// memory (kReadOnly) or completed.
template <bool kReadOnly> __device__ __forceinline__ void tma_store_wait() {
    if constexpr (kReadOnly) {
        asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    } else {
        asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
}

// Orders this thread's ordinary shared-memory writes before later reads of
// the copy engine (a TMA store of the tile).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace singlora
