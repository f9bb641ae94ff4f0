// Device helpers shared by the kernels: element traits, cp.async, ldmatrix,
// mma.sync, a warp-level 16-deep tile product, and tile loaders.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "singlora.h"

namespace singlora {

constexpr int kThreads = SINGLORA_THREADS;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------- elements --

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// f32 runs on CUDA cores (exact to the f32 bar; TF32 would not meet 1e-5),
// f16 and bf16 on tensor cores. f16 operands made from f32 intermediates (S,
// Q) are scaled by powers of two first: f16's range ends at 65504 and its
// subnormals start at 6e-5, and S or Q may sit outside that.
template <typename T> struct Elem {
    static constexpr bool kTensorCore = true;
    static constexpr bool kNeedsScaling = false;
};
template <> struct Elem<float> {
    static constexpr bool kTensorCore = false;
    static constexpr bool kNeedsScaling = false;
};
template <> struct Elem<__half> {
    static constexpr bool kTensorCore = true;
    static constexpr bool kNeedsScaling = true;
};

// Elements per 16-byte access; shared-memory rows are padded by this much so
// that the 8 rows one ldmatrix (or 8 lanes) reads fall in distinct banks.
template <typename T> __host__ __device__ constexpr int vec_elems() { return 16 / (int)sizeof(T); }

// A power of two p with max_abs * p in [2^13, 2^14): exact to apply and to
// undo, and leaves f16 headroom for rounding. 1 for 0, inf or NaN.
__device__ __forceinline__ float pow2_scale_for(float max_abs) {
    if (!(max_abs > 0.0f) || !isfinite(max_abs)) return 1.0f;
    int e;
    frexpf(max_abs, &e);  // max_abs = m * 2^e, m in [0.5, 1)
    // Capped at 2^126 so that the scale of a tiny (< 2^-112) maximum stays
    // finite: 0 * inf would turn the row's zeros into NaN.
    return ldexpf(1.0f, min(14 - e, 126));
}

// ---------------------------------------------------------------- cp.async --

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
// computed once (the first H200 profile showed the kernels issue-bound, with
// per-chunk index arithmetic a large part of the instructions).
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
    static constexpr int PASSES = ROWS / RSTEP;
    static_assert(COLS % V == 0 && kThreads % CPR == 0 && ROWS % RSTEP == 0, "tile shape");

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

// Two adjacent elements, as f32 (one 32- or 64-bit shared access).
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ void store2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }
__device__ __forceinline__ void store2(__half* p, float2 v) { *reinterpret_cast<__half2*>(p) = __float22half2_rn(v); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float2 v) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __float22bfloat162_rn(v);
}

// ----------------------------------------------------------------- mma.sync --

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                                               uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 16-deep step of a warp's MT x NT tile of 16x8 products:
//   acc[mt][nt] += A(m0 + 16 mt .., k0 .. k0+16) * B(k0 .., n0 + 8 nt ..)
// Operands live in shared memory in either orientation:
//   A_K_CONTIG: A(m,k) at a[m*lda + k]; else at a[k*lda + m]
//   B_K_CONTIG: B(k,n) at b[n*ldb + k]; else at b[k*ldb + n]
// ldmatrix(.trans) turns either into the mma fragments, so no operand is
// ever transposed in memory. Column pairs of n-tiles at or beyond n_limit
// (the padded rank) are skipped: a warp-uniform branch.
// The accumulator layout is mma.sync's: lane (g = lane/4, t = lane%4) holds
// rows g and g+8, columns 2t and 2t+1 of each 16x8 tile, in c[0..3] as
// (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1). The f32 variant computes exactly the
// same elements with FMAs, so every epilogue is shared.
template <typename T, int MT, int NT, bool A_K_CONTIG, bool B_K_CONTIG>
__device__ __forceinline__ void warp_mma_k16(float (&acc)[MT][NT][4], const T* __restrict__ a, int lda,
                                             const T* __restrict__ b, int ldb, int m0, int n0, int k0,
                                             int n_limit) {
    static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
    const int lane = threadIdx.x & 31;
    const int i = lane >> 3, r = lane & 7;
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int m = m0 + mt * 16;
        if (A_K_CONTIG) {
            ldmatrix_x4(af[mt], a + (m + (lane & 15)) * lda + k0 + (lane >> 4) * 8);
        } else {
            ldmatrix_x4_trans(af[mt], a + (k0 + r + ((i >> 1) << 3)) * lda + m + ((i & 1) << 3));
        }
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
        const int n = n0 + np * 16;
        if (n >= n_limit) break;
        uint32_t bf[4];
        if (B_K_CONTIG) {
            ldmatrix_x4(bf, b + (n + r + ((i >> 1) << 3)) * ldb + k0 + ((i & 1) << 3));
        } else {
            ldmatrix_x4_trans(bf, b + (k0 + r + ((i & 1) << 3)) * ldb + n + ((i >> 1) << 3));
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
            mma16816<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
    }
}

template <int MT, int NT, bool A_K_CONTIG, bool B_K_CONTIG>
__device__ __forceinline__ void warp_mma_k16_f32(float (&acc)[MT][NT][4], const float* __restrict__ a,
                                                 int lda, const float* __restrict__ b, int ldb, int m0,
                                                 int n0, int k0, int n_limit) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
        const int k = k0 + kk;
        float av[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int m = m0 + mt * 16 + g + 8 * h;
                av[mt][h] = A_K_CONTIG ? a[m * lda + k] : a[k * lda + m];
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int nb = n0 + nt * 8;
            if (nb >= n_limit) break;
            const int n = nb + 2 * t;
            const float b0 = B_K_CONTIG ? b[n * ldb + k] : b[k * ldb + n];
            const float b1 = B_K_CONTIG ? b[(n + 1) * ldb + k] : b[k * ldb + n + 1];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                acc[mt][nt][0] = fmaf(av[mt][0], b0, acc[mt][nt][0]);
                acc[mt][nt][1] = fmaf(av[mt][0], b1, acc[mt][nt][1]);
                acc[mt][nt][2] = fmaf(av[mt][1], b0, acc[mt][nt][2]);
                acc[mt][nt][3] = fmaf(av[mt][1], b1, acc[mt][nt][3]);
            }
        }
    }
}

// Dispatch: tensor cores for 16-bit types, FMAs for f32.
template <typename T, int MT, int NT, bool A_K_CONTIG, bool B_K_CONTIG>
__device__ __forceinline__ void tile_mma_k16(float (&acc)[MT][NT][4], const T* a, int lda, const T* b,
                                             int ldb, int m0, int n0, int k0, int n_limit) {
    if constexpr (Elem<T>::kTensorCore) {
        warp_mma_k16<T, MT, NT, A_K_CONTIG, B_K_CONTIG>(acc, a, lda, b, ldb, m0, n0, k0, n_limit);
    } else {
        warp_mma_k16_f32<MT, NT, A_K_CONTIG, B_K_CONTIG>(acc, a, lda, b, ldb, m0, n0, k0, n_limit);
    }
}

template <int MT, int NT> __device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
}

}  // namespace singlora

// Every kernel `name` publishes its launch shape as `name_info`.
#define SINGLORA_KERNEL_INFO(name, smem, rows, cols, rank_cap) \
    extern "C" __constant__ singlora_kernel_info name##_info = {(smem), (rows), (cols), (rank_cap)};
