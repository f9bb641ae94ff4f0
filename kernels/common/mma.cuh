// Tensor-core products: ldmatrix, mma.sync m16n8k16, and the warp-level
// 16-deep tile product (with its f32 FMA twin for f32 operands).
#pragma once

#include "copies.cuh"  // smem_addr
#include "elements.cuh"

namespace singlora {

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
// The two 16-bit specialisations differ only in the PTX operand type.
#define SINGLORA_MMA16816(T, PTX_T)                                                                       \
    template <>                                                                                          \
    __device__ __forceinline__ void mma16816<T>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,      \
                                                uint32_t b1) {                                           \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T                             \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                      \
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                     \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                      \
    }
SINGLORA_MMA16816(__nv_bfloat16, "bf16")
SINGLORA_MMA16816(__half, "f16")
#undef SINGLORA_MMA16816

// One 16-deep step of a warp's MT x NT tile of 16x8 products:
//   acc[mt][nt] += A(m0 + 16 mt .., k0 .. k0+16) * B(k0 .., n0 + 8 nt ..)
// Operands live in shared memory in either orientation:
//   A_K_CONTIG: A(m,k) at a[m*lda + k]; else at a[k*lda + m]
//   B_K_CONTIG: B(k,n) at b[n*ldb + k]; else at b[k*ldb + n]
// ldmatrix(.trans) turns either into the mma fragments, so no operand is
// ever transposed in memory. Column pairs of n-tiles at or beyond n_limit
// (the padded rank) are skipped: a warp-uniform branch. warp_mma_k16_at
// takes each operand's storage as a function instead: at(row, col), the
// address of the element at (row, col) of the array as stored ((m, k) or
// (k, m) per orientation), where ldmatrix reads 8 contiguous elements.
// The accumulator layout is mma.sync's: lane (g = lane/4, t = lane%4) holds
// rows g and g+8, columns 2t and 2t+1 of each 16x8 tile, in c[0..3] as
// (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1). The f32 variant computes exactly the
// same elements with FMAs, so every epilogue is shared.
template <typename T, int MT, int NT, bool A_K_CONTIG, bool B_K_CONTIG, typename FA, typename FB>
__device__ __forceinline__ void warp_mma_k16_at(float (&acc)[MT][NT][4], FA&& a_at, FB&& b_at, int m0, int n0,
                                                int k0, int n_limit) {
    static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
    const int lane = threadIdx.x & 31;
    const int i = lane >> 3, r = lane & 7;
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int m = m0 + mt * 16;
        if (A_K_CONTIG) {
            ldmatrix_x4(af[mt], a_at(m + (lane & 15), k0 + (lane >> 4) * 8));
        } else {
            ldmatrix_x4_trans(af[mt], a_at(k0 + r + ((i >> 1) << 3), m + ((i & 1) << 3)));
        }
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
        const int n = n0 + np * 16;
        if (n >= n_limit) break;
        uint32_t bf[4];
        if (B_K_CONTIG) {
            ldmatrix_x4(bf, b_at(n + r + ((i >> 1) << 3), k0 + ((i & 1) << 3)));
        } else {
            ldmatrix_x4_trans(bf, b_at(k0 + r + ((i & 1) << 3), n + ((i >> 1) << 3)));
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
            mma16816<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
    }
}

// The same over row-major shared arrays with row strides lda and ldb
// (elements): every kernel but the TMA one, whose tiles are swizzled.
template <typename T, int MT, int NT, bool A_K_CONTIG, bool B_K_CONTIG>
__device__ __forceinline__ void warp_mma_k16(float (&acc)[MT][NT][4], const T* __restrict__ a, int lda,
                                             const T* __restrict__ b, int ldb, int m0, int n0, int k0,
                                             int n_limit) {
    warp_mma_k16_at<T, MT, NT, A_K_CONTIG, B_K_CONTIG>(
        acc, [&](int row, int col) { return a + row * lda + col; },
        [&](int row, int col) { return b + row * ldb + col; }, m0, n0, k0, n_limit);
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

// Visits a warp's MT × NT accumulator tile (rows from m0, columns from n0)
// in mma.sync's layout: f(mt, nt, h, row, col, v0, v1) for the element pair
// (row, col), (row, col + 1) of each 16 × 8 tile (mt, nt), h selecting the
// upper (g) or lower (g + 8) row of the thread's pair. One home for the
// layout every epilogue walks.
template <int MT, int NT, typename F>
__device__ __forceinline__ void for_each_pair_nt(const float (&acc)[MT][NT][4], int m0, int n0, F&& f) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                f(mt, nt, h, m0 + mt * 16 + g + 8 * h, n0 + nt * 8 + 2 * t, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
}

// The same without the n-tile index: f(mt, h, row, col, v0, v1).
template <int MT, int NT, typename F>
__device__ __forceinline__ void for_each_pair(const float (&acc)[MT][NT][4], int m0, int n0, F&& f) {
    for_each_pair_nt(acc, m0, n0,
                     [&](int mt, int, int h, int r, int c, float v0, float v1) { f(mt, h, r, c, v0, v1); });
}

}  // namespace singlora
