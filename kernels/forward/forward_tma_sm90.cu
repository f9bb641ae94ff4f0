// forward_tma_sm90: the shrink-expand forward on Hopper's bulk tensor copies
// (sm_90a, f16/bf16, rank <= 64; kernels/params.h,
// singlora_forward_tma_params). The math is the portable kernel's
// (shrink_expand.cuh): a block owns BM token rows,
//   S   = in[rows] · A[:k_dim]                   (f32, tensor cores)
//   out = beta·out + scale · S · A[:n_dim]ᵀ      (BN columns at a time)
// and what changes is how the tiles move. run 7's profile showed the
// portable kernel bound by its own instructions (a cp.async per 16 bytes and
// thread), block-wide barriers and the epilogue's shared-memory round trip,
// not by DRAM. Here:
//
//   * one ring of STAGES slots, each a BM × 64 tile (`in` in the shrink,
//     `out` in the expand at beta = 1) and a 64-row tile of A, filled by
//     TMA boxes that thread 0 issues and that complete on the slot's `full`
//     mbarrier; the warps wait on it, compute, and release the slot on its
//     `empty` mbarrier (one arrival per warp): no block barrier in either
//     loop, and no per-thread copy instructions;
//   * the tiles arrive swizzled (128 B for `in` and `out`, the row width for
//     A), which the ldmatrix addresses undo (tma.cuh's `swizzled`), so the
//     fragments load without bank conflicts from unpadded boxes;
//   * the epilogue adds in place in the slot's `out` tile and one TMA store
//     writes it back; boxes past the tensor's edge read zeros and write
//     nothing, so partial tiles need no masks.
//
// The slots are walked in one sequence, n = 0 .. k_tiles + chunks − 1 (the
// shrink's k tiles, then the expand's column chunks); slot n % STAGES, use
// n / STAGES, whose parity the waits take. Thread 0 refills the slot of
// n − 1 at the top of step n, after every warp released it (and, in the
// expand, after its store of that tile has read shared memory).
//
// Inputs a tensor map cannot describe (16-byte alignment of base and row
// pitch, rank a multiple of 8), dropout, shrink-only and decode-size calls
// take the portable kernels (src/ops/forward.rs).
#include "common/tma.cuh"
#include "common/mma.cuh"
#include "common/s_tile.cuh"
#include "common/scale.cuh"

namespace singlora {

template <typename T, int RP> struct TmaForwardConfig {
    static constexpr int BM = SINGLORA_FORWARD_BM;
    static constexpr int BOX = SINGLORA_FORWARD_TMA_BOX;  // 64 columns: 128 bytes of a 16-bit row
    static constexpr int BK = BOX, BN = BOX;
    static constexpr int STAGES = 4;
    static constexpr int A_ROW = RP * (int)sizeof(T);  // bytes of a row of A's box, its swizzle span
    static constexpr int BIG_BYTES = BM * BOX * (int)sizeof(T);  // an `in` or `out` tile
    static constexpr int A_BYTES = BOX * A_ROW;                 // 64 rows of A
    static constexpr int SLOT_BYTES = BIG_BYTES + A_BYTES;       // a multiple of 1024
    // Shrink warp grid over the BM × RP tile of S (the portable kernel's).
    static constexpr int WARPS_N = 2, WARPS_M = kWarps / WARPS_N;
    static constexpr int WTM = BM / WARPS_M, WTN = RP / WARPS_N;
    static constexpr int MT = WTM / 16, NT = WTN / 8;
    // Expand warp grid over the BM × BN output tile.
    static constexpr int EWARPS_M = 4, EWARPS_N = 2;
    static constexpr int EMT = BM / EWARPS_M / 16, ENT = BN / EWARPS_N / 8;
    static constexpr int PAD = vec_elems<T>();
    static constexpr int SF_LD = RP + 4;   // f32 staging of S
    static constexpr int ST_LD = RP + PAD; // S in T, the expand's left operand
    static constexpr int RING_BYTES = STAGES * SLOT_BYTES;
    static constexpr int SF_BYTES = BM * SF_LD * 4;
    static constexpr int ST_BYTES = BM * ST_LD * (int)sizeof(T);
    static constexpr int BAR_BYTES = 2 * STAGES * 8;
    // + 1024: the dynamic shared memory is aligned up to 1024 in the kernel.
    static constexpr int SMEM_BYTES = RING_BYTES + SF_BYTES + ST_BYTES + BM * 4 + BAR_BYTES + 1024;
    static_assert(A_ROW == 64 || A_ROW == 128, "A's box row is a swizzle span");
    static_assert(SLOT_BYTES % 1024 == 0 && SF_BYTES % 16 == 0 && ST_BYTES % 16 == 0, "alignment");
    static_assert(WTM % 16 == 0 && WTN % 16 == 0 && ENT % 2 == 0 && EMT >= 1, "warp tiles");
};

template <typename T, int RP> __device__ __forceinline__ void forward_tma_kernel(const singlora_forward_tma_params& tp) {
    using C = TmaForwardConfig<T, RP>;
    constexpr int BM = C::BM, BK = C::BK, BN = C::BN, STAGES = C::STAGES;
    const singlora_forward_params& p = tp.p;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // 1024-byte aligned base: the swizzle pattern is one of absolute
    // shared-memory addresses.
    const uint32_t raw = smem_addr(smem_raw);
    unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
    const uint32_t base = smem_addr(smem);
    float* sf = reinterpret_cast<float*>(smem + C::RING_BYTES);                           // [BM][SF_LD]
    T* st = reinterpret_cast<T*>(smem + C::RING_BYTES + C::SF_BYTES);                      // [BM][ST_LD]
    float* row_inv = reinterpret_cast<float*>(smem + C::RING_BYTES + C::SF_BYTES + C::ST_BYTES);  // [BM]
    const uint32_t bars = base + C::RING_BYTES + C::SF_BYTES + C::ST_BYTES + BM * 4;
    auto full = [&](int s) { return bars + 8u * s; };
    auto empty = [&](int s) { return bars + 8u * (STAGES + s); };
    auto big_at = [&](int s) { return base + (uint32_t)(s * C::SLOT_BYTES); };
    auto a_at = [&](int s) { return base + (uint32_t)(s * C::SLOT_BYTES + C::BIG_BYTES); };
    // Element (r, c) of slot s's tiles as the swizzled copies laid them out:
    // the in/out tile (BM rows of 64) and the A tile (64 rows of RP).
    auto big_el = [&](int s, int r, int c) {
        return reinterpret_cast<T*>(
            __cvta_shared_to_generic(big_at(s) + swizzled<128>((uint32_t)(r * C::BOX + c) * (uint32_t)sizeof(T))));
    };
    auto a_el_of = [&](int s, int r, int c) {
        return reinterpret_cast<const T*>(
            __cvta_shared_to_generic(a_at(s) + swizzled<C::A_ROW>((uint32_t)(r * RP + c) * (uint32_t)sizeof(T))));
    };

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool producer = threadIdx.x == 0;
    const int64_t row0 = (int64_t)blockIdx.x * BM;
    const int rows = (int)min((int64_t)BM, p.tokens - row0);
    const int rank = p.rank;
    const int rpad = (rank + SINGLORA_RANK_ALIGN - 1) / SINGLORA_RANK_ALIGN * SINGLORA_RANK_ALIGN;
    const bool accumulate = p.beta != 0.0f;
    const int k_tiles = (int)(((int64_t)p.k_dim + BK - 1) / BK);
    const int64_t col_begin = (int64_t)blockIdx.y * p.cols_per_block;
    const int64_t col_end = min((int64_t)p.n_dim, col_begin + p.cols_per_block);
    const int chunks = (int)((col_end - col_begin + BN - 1) / BN);
    const int steps = k_tiles + chunks;

    if (producer) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), kWarps);
        }
        mbar_init_fence();
    }
    __syncthreads();

    // Step n's copies into slot n % STAGES (thread 0).
    auto issue = [&](int n) {
        const int s = n % STAGES;
        if (n < k_tiles) {
            const int k0 = n * BK;
            mbar_expect_tx(full(s), C::BIG_BYTES + C::A_BYTES);
            tma_load_2d(big_at(s), &tp.in_map, full(s), k0, (int)row0);
            tma_load_2d(a_at(s), &tp.a_in_map, full(s), 0, k0);
        } else {
            const int c0 = (int)(col_begin + (int64_t)(n - k_tiles) * BN);
            mbar_expect_tx(full(s), (accumulate ? C::BIG_BYTES : 0) + C::A_BYTES);
            if (accumulate) tma_load_2d(big_at(s), &tp.out_map, full(s), c0, (int)row0);
            tma_load_2d(a_at(s), &tp.a_out_map, full(s), 0, c0);
        }
    };
    // Top of step n: refill the slot step n − 1 used, once every warp has
    // released it (its use (n − 1) / STAGES has completed on `empty`).
    // Warp 0 reconverges after its lane 0's wait and copies, before the
    // warp-collective ldmatrix and mma that follow.
    auto refill = [&](int n) {
        const int m = n + STAGES - 1;
        if (producer && m < steps) {
            if (m >= STAGES) mbar_wait(empty(m % STAGES), (uint32_t)((m / STAGES - 1) & 1));
            issue(m);
        }
        __syncwarp();
    };
    auto release = [&](int n) {
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(n % STAGES));
    };
    if (producer) {
        for (int n = 0; n < STAGES - 1 && n < steps; ++n) issue(n);
    }

    // ---- shrink: S = in[rows] · A[:k_dim] --------------------------------
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    float acc[C::MT][C::NT][4];
    zero_acc(acc);
    for (int n = 0; n < k_tiles; ++n) {
        refill(n);
        const int s = n % STAGES;
        mbar_wait(full(s), (uint32_t)((n / STAGES) & 1));
        // in tile (row, col) and A tile (k, rank column), swizzled.
        auto x_el = [&](int r, int c) { return big_el(s, r, c); };
        auto a_el = [&](int r, int c) { return a_el_of(s, r, c); };
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16)
            warp_mma_k16_at<T, C::MT, C::NT, true, false>(acc, x_el, a_el, wm * C::WTM, wn * C::WTN, kk, rpad);
        release(n);
    }

    // S through shared memory once: to s_out and, in T, to the expand.
    for_each_pair(acc, wm * C::WTM, wn * C::WTN, [&](int, int, int r, int c, float v0, float v1) {
        *reinterpret_cast<float2*>(&sf[r * C::SF_LD + c]) = make_float2(v0, v1);
    });
    __syncthreads();
    if (p.s_out != 0 && blockIdx.y == 0) store_s_rows(reinterpret_cast<float*>(p.s_out), sf, C::SF_LD, row0, rows, rank);
    s_to_operand<T, BM, RP>(sf, C::SF_LD, st, C::ST_LD, row_inv);
    __syncthreads();

    // ---- expand: out[rows, cols] = beta·out + scale · S · A[cols]ᵀ ----------
    const int ewm = warp / C::EWARPS_N, ewn = warp % C::EWARPS_N;
    const int em0 = ewm * C::EMT * 16, en0 = ewn * C::ENT * 8;
    const int g = lane >> 2;
    const float scale = resolve_scale(p.scale);
    float rs[C::EMT][2];
#pragma unroll
    for (int mt = 0; mt < C::EMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) rs[mt][h] = scale * row_inv[em0 + mt * 16 + g + 8 * h];
    for (int j = 0; j < chunks; ++j) {
        const int n = k_tiles + j;
        refill(n);
        const int s = n % STAGES;
        mbar_wait(full(s), (uint32_t)((n / STAGES) & 1));
        const uint32_t yt = big_at(s);
        auto a_el = [&](int r, int c) { return a_el_of(s, r, c); };
        auto st_el = [&](int r, int c) { return st + r * C::ST_LD + c; };
        float eacc[C::EMT][C::ENT][4];
        zero_acc(eacc);
        for (int k0 = 0; k0 < rpad; k0 += 16)
            warp_mma_k16_at<T, C::EMT, C::ENT, true, true>(eacc, st_el, a_el, em0, en0, k0, BN);
        // In place in the out tile (each element pair has one owner; rows
        // and columns past the tensor are computed but never stored).
        for_each_pair(eacc, em0, en0, [&](int mt, int h, int r, int c, float v0, float v1) {
            T* y = big_el(s, r, c);
            float2 v = make_float2(v0 * rs[mt][h], v1 * rs[mt][h]);
            store2_onto(y, v, accumulate);
        });
        // Every thread's writes, then the copy engine's read of the tile.
        fence_proxy_async();
        __syncthreads();
        if (producer) {
            tma_store_2d(&tp.out_map, yt, (int)(col_begin + (int64_t)j * BN), (int)row0);
            // The slot is refilled next step: the store must have read it.
            tma_store_wait<true>();
        }
        release(n);
    }
    if (producer) tma_store_wait<false>();
}

}  // namespace singlora

#define SINGLORA_FORWARD_TMA(tname, T, RP)                                                                  \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads, 2)                                     \
        forward_tma_sm90_##tname##_r##RP(const __grid_constant__ singlora_forward_tma_params p) {           \
        singlora::forward_tma_kernel<T, RP>(p);                                                             \
    }                                                                                                       \
    SINGLORA_KERNEL_INFO(forward_tma_sm90_##tname##_r##RP, (singlora::TmaForwardConfig<T, RP>::SMEM_BYTES), \
                         (singlora::TmaForwardConfig<T, RP>::BM), (singlora::TmaForwardConfig<T, RP>::BN), RP)

#define SINGLORA_FORWARD_TMA_RANKS(tname, T) SINGLORA_FORWARD_TMA_RANK_BUCKETS(SINGLORA_FORWARD_TMA, tname, T)
SINGLORA_MMA_DTYPES(SINGLORA_FORWARD_TMA_RANKS)
