// The fused shrink-expand kernel body, shared by forward.cu (the portable
// kernels) and forward_decode_sm90.cu (the cluster variant).
//
//   s_out = in · A[:k_dim]                      (f32, tokens × rank)
//   out   = beta·out + scale · s_out · A[:n_dim]ᵀ
//
// Forward: in = X, out = Y, s_out = S. Backward reuses it for dX with G in
// X's place (k_dim = d_out, n_dim = d_in, s_out = Q).
//
// One block owns BM token rows. Shrink: it streams its rows of `in` in BK-wide
// chunks through a STAGES-deep cp.async pipeline together with the matching
// rows of A, accumulating the BM × rank tile of S in f32 registers (tensor
// cores for f16/bf16). The tile goes through shared memory once: stored to
// s_out (coalesced), and kept on chip in the element type as the left operand
// of the expand. Expand: the block walks its output columns BN at a time
// through a pipeline of the same depth, prefetching the next BN rows of A and
// (beta = 1) the next tiles of `out`, and writes each finished tile with
// 16-byte stores. No tokens × d
// intermediate reaches device memory; `in` is read once and `out` read (beta
// = 1) and written once.
//
// Few-token calls split the output columns over grid.y; each such block
// recomputes its rows' S, which costs a re-read of a few rows of `in`. On
// sm_90 the decode variant (CL > 1) also splits that recomputation: the CL
// blocks of a cluster each reduce 1/CL of d_in, then add the CL partial S
// tiles read from each other's shared memory (in rank order, so every block
// gets the same bits) before expanding their own columns.
//
// Dropout (p.dropout.threshold != 0; a block-uniform branch, so p = 0 runs
// exactly the undropped instructions): with dropout_out == 0 each thread
// zeroes the dropped elements of its own chunks of every `in` tile once they
// have landed (before the barrier that publishes the tile), and S is scaled
// by 1/(1 − p) in f32; with dropout_out == 1 (dX) the expand's epilogue
// masks the adapter term by (token, output column) and folds 1/(1 − p) into
// the row scale. In the epilogue the two lanes that own the same four
// columns of a row split the Philox calls (one row each) and swap the other
// lane's keep bits with one shuffle.
#pragma once

#include <cooperative_groups.h>

#include "common/copies.cuh"
#include "common/dropout.cuh"
#include "common/mma.cuh"
#include "common/s_tile.cuh"
#include "common/scale.cuh"

namespace singlora {

// SMALL: the configuration for devices that grant SINGLORA_SMALL_SMEM_BYTES
// per block (sm_86/sm_89), used for the buckets whose regular one needs more:
// half the token rows, two stages, and for f32 half-width (64-byte) chunks.
template <typename T, int RP, bool SMALL = false> struct ForwardConfig {
    static constexpr int BM = SMALL ? SINGLORA_FORWARD_BM / 2 : SINGLORA_FORWARD_BM;
    // 128 bytes of a row per pipeline step / per expand step.
    static constexpr int CHUNK_BYTES = SMALL && sizeof(T) == 4 ? 64 : 128;
    static constexpr int BK = CHUNK_BYTES / (int)sizeof(T);
    static constexpr int BN = CHUNK_BYTES / (int)sizeof(T);
    static constexpr int PAD = vec_elems<T>();
    // Shrink warp grid over the BM × RP tile of S. Rank 256 takes 2 × 4
    // (32 × 64 per warp) so an A fragment is reused over 8 n-tiles.
    static constexpr int WARPS_N = RP >= 256 ? 4 : 2;
    static constexpr int WARPS_M = kWarps / WARPS_N;
    static constexpr int WTM = BM / WARPS_M, WTN = RP / WARPS_N;
    static constexpr int MT = WTM / 16, NT = WTN / 8;
    // Expand warp grid over the BM × BN output tile (the small f32 tile,
    // 32 × 16, is covered by two warps; the others skip the expand).
    static constexpr int EWARPS_M = SMALL ? 2 : 4;
    static constexpr int EWARPS_N = !SMALL ? 2 : sizeof(T) == 4 ? 1 : 4;
    static constexpr int EMT = BM / EWARPS_M / 16, ENT = BN / EWARPS_N / 8;
    // Pipeline depth of both phases (shrink: X and A chunks; expand: A and Y
    // tiles): enough bytes in flight per SM to cover HBM latency (see
    // benches/RESULTS.md for the measurements behind the choice).
    // Four stages keep three 8 KiB tiles in flight per block for ranks <= 64
    // (83 KB of smem at rank 64: two blocks per SM; 63 KB at rank 32: three).
    // Big ranks and f32 use fewer so that two blocks still fit.
    static constexpr int STAGES = SMALL || sizeof(T) == 4 || RP >= 256 ? 2 : RP >= 128 ? 3 : 4;
    // Blocks per SM the registers must allow (the smem allows 2-3): two
    // blocks cap a thread at 128 registers, where no instantiation spills
    // (the kernel-quality tests hold every kernel to zero spills).
    static constexpr int MIN_BLOCKS = 2;

    static constexpr int X_LD = BK + PAD;
    static constexpr int A_LD = RP + PAD;   // shrink A chunk [BK][A_LD] and expand A chunk [BN][A_LD]
    static constexpr int SF_LD = RP + 4;    // f32 staging of S
    static constexpr int ST_LD = sizeof(T) == 4 ? SF_LD : RP + PAD;
    static constexpr int Y_LD = BN + PAD;

    static constexpr int SHRINK_BYTES = STAGES * (BM * X_LD + BK * A_LD) * (int)sizeof(T);
    static constexpr int EXPAND_BYTES = STAGES * (BN * A_LD + BM * Y_LD) * (int)sizeof(T);
    static constexpr int SF_BYTES = BM * SF_LD * 4;
    static constexpr int R1_BYTES_ = SHRINK_BYTES > EXPAND_BYTES ? SHRINK_BYTES : EXPAND_BYTES;
    // For 16-bit types the f32 staging of S aliases the pipeline buffers; for
    // f32 it is the expand operand itself and lives in region 2.
    static constexpr int R1_BYTES =
        (sizeof(T) == 4 || R1_BYTES_ >= SF_BYTES) ? R1_BYTES_ : SF_BYTES;
    static constexpr int ST_BYTES = BM * ST_LD * (int)sizeof(T);
    static constexpr int SMEM_BYTES = R1_BYTES + ST_BYTES + BM * 4;

    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "shrink warp tile");
    static_assert(EMT >= 1 && ENT % 2 == 0, "expand warp tile");
    static_assert(EWARPS_M * EWARPS_N <= kWarps && EWARPS_M * EMT * 16 == BM, "expand warp grid");
    static_assert(!SMALL || SMEM_BYTES <= SINGLORA_SMALL_SMEM_BYTES, "small configuration fits");
    static_assert(BK % 16 == 0 && RP % 16 == 0, "k steps of 16");
};

template <typename T, int RP, int CL, bool SMALL = false>
__device__ __forceinline__ void forward_kernel(const singlora_forward_params& p) {
    using C = ForwardConfig<T, RP, SMALL>;
    constexpr int BM = C::BM, BK = C::BK, BN = C::BN, STAGES = C::STAGES;
    extern __shared__ __align__(128) unsigned char smem[];
    T* xs = reinterpret_cast<T*>(smem);                       // [STAGES][BM][X_LD]
    T* as = xs + STAGES * BM * C::X_LD;                       // [STAGES][BK][A_LD]
    T* st = reinterpret_cast<T*>(smem + C::R1_BYTES);         // [BM][ST_LD]
    float* row_inv = reinterpret_cast<float*>(smem + C::R1_BYTES + C::ST_BYTES);  // [BM]
    float* sf = sizeof(T) == 4 ? reinterpret_cast<float*>(st) : reinterpret_cast<float*>(smem);

    const T* in = reinterpret_cast<const T*>(p.in);
    const T* a = reinterpret_cast<const T*>(p.a);
    // Normal grid: (row blocks, column splits). Decode grid: (CL, column
    // groups), one row block.
    const int64_t row0 = CL == 1 ? (int64_t)blockIdx.x * BM : 0;
    const int rank = p.rank;
    const int rpad = (rank + SINGLORA_RANK_ALIGN - 1) / SINGLORA_RANK_ALIGN * SINGLORA_RANK_ALIGN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool in_vec = p.in_vec != 0, a_vec = p.a_vec != 0;
    // Token rows of this block (fewer than BM only in the last block, or at
    // decode sizes).
    const int rows = (int)min((int64_t)BM, p.tokens - row0);

    // ---- shrink: S = in[rows] · A[:k_dim] ------------------------------------
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    float acc[C::MT][C::NT][4];
    zero_acc(acc);
    int kt_begin = 0;
    int k_tiles = (int)(((int64_t)p.k_dim + BK - 1) / BK);  // k_dim may be near INT_MAX
    if constexpr (CL > 1) {
        const int per = (k_tiles + CL - 1) / CL;
        kt_begin = min(k_tiles, (int)blockIdx.x * per);
        k_tiles = min(k_tiles, kt_begin + per) - kt_begin;
    }
    const TileCopy<T, BM, BK> x_copy(p.ld_in);
    const TileCopy<T, BK, RP> a_copy(rank);
    const T* x_tile = in + row0 * p.ld_in;
    auto load_stage = [&](int stage, int kt) {
        const int64_t k0 = (int64_t)(kt_begin + kt) * BK;
        const int k_valid = (int)min((int64_t)BK, p.k_dim - k0);
        x_copy.copy(xs + stage * BM * C::X_LD, C::X_LD, x_tile + k0, rows, k_valid, in_vec);
        a_copy.copy(as + stage * BK * C::A_LD, C::A_LD, a + k0 * rank, k_valid, rank, a_vec);
    };
    // Warps whose rows are all padding (few tokens) skip the tensor-core work.
    const bool shrink_rows = wm * C::WTM < rows;
    // Dropout on `in` (forward S, recomputed S): mask this thread's chunks
    // of a landed stage in place.
    const bool drop_in = p.dropout.threshold != 0 && p.dropout_out == 0;
    auto drop_stage = [&](int stage, int kt) {
        const int64_t k0 = (int64_t)(kt_begin + kt) * BK;
        const int k_valid = (int)min((int64_t)BK, p.k_dim - k0);
        x_copy.for_each_chunk(xs + stage * BM * C::X_LD, C::X_LD, rows, k_valid, [&](T* chunk, int r, int c) {
            drop_chunk(chunk, p.dropout, (uint32_t)(row0 + r), (uint32_t)(k0 + c));
        });
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        // This thread's chunks of stage kt have landed (for it).
        if (drop_in) drop_stage(kt % STAGES, kt);
        // Also frees the stage refilled below: every warp finished reading it
        // in the previous iteration.
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next);
        cp_async_commit();
        const T* xt = xs + (kt % STAGES) * BM * C::X_LD;
        const T* at = as + (kt % STAGES) * BK * C::A_LD;
        if (shrink_rows) {
#pragma unroll
            for (int kk = 0; kk < BK; kk += 16) {
                tile_mma_k16<T, C::MT, C::NT, true, false>(acc, xt, C::X_LD, at, C::A_LD, wm * C::WTM,
                                                           wn * C::WTN, kk, rpad);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers become the f32 staging of S

    if (drop_in) {
        // S = drop(in)·A = (M ⊙ in)·A / (1 − p), scaled once in f32.
        const float ks = p.dropout.scale;
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= ks;
    }

    for_each_pair(acc, wm * C::WTM, wn * C::WTN, [&](int, int, int r, int c, float v0, float v1) {
        *reinterpret_cast<float2*>(&sf[r * C::SF_LD + c]) = make_float2(v0, v1);
    });
    __syncthreads();

    if constexpr (CL > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // Sum the cluster's partial S tiles, rank 0 first in every block.
        namespace cg = cooperative_groups;
        cg::cluster_group cluster = cg::this_cluster();
        constexpr int PER = BM * RP / kThreads;
        float sum[PER];
        cluster.sync();  // every partial tile is complete
#pragma unroll
        for (int e = 0; e < PER; ++e) sum[e] = 0.0f;
        for (int q = 0; q < CL; ++q) {
            const float* part = cluster.map_shared_rank(sf, q);
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int i = threadIdx.x + e * kThreads;
                sum[e] += part[(i / RP) * C::SF_LD + i % RP];
            }
        }
        cluster.sync();  // nobody reads a partial tile any more
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            const int i = threadIdx.x + e * kThreads;
            sf[(i / RP) * C::SF_LD + i % RP] = sum[e];
        }
        __syncthreads();
#else
        // The cluster variant is compiled in forward_decode_sm90.cu, for
        // sm_90a alone; the portable translation unit instantiates CL = 1.
        static_assert(CL == 1, "the cluster variant exists for sm_90a only");
#endif
    }

    // Only the first column split stores S (every split computed the same).
    if (p.s_out != 0 && blockIdx.y == 0 && (CL == 1 || blockIdx.x == 0)) {
        store_s_rows(reinterpret_cast<float*>(p.s_out), sf, C::SF_LD, row0, rows, rank);
    }
    if (p.out == 0) return;  // shrink only

    if constexpr (sizeof(T) != 4) {
        // Keep S on chip in T for the expand's tensor cores.
        s_to_operand<T, BM, RP>(sf, C::SF_LD, st, C::ST_LD, row_inv);
    } else {
        for (int r = threadIdx.x; r < BM; r += kThreads) row_inv[r] = 1.0f;
    }
    __syncthreads();  // S tile ready; the pipeline buffers are free

    // ---- expand: out[rows, cols] = beta·out + scale · S · A[cols]ᵀ ------------
    T* aos = reinterpret_cast<T*>(smem);  // [STAGES][BN][A_LD]
    T* ys = aos + STAGES * BN * C::A_LD;  // [STAGES][BM][Y_LD]
    T* out = reinterpret_cast<T*>(p.out);
    const bool out_vec = p.out_vec != 0;
    const bool accumulate = p.beta != 0.0f;
    const int64_t col_block = CL == 1 ? blockIdx.y : (int64_t)blockIdx.y * CL + blockIdx.x;
    const int64_t col_begin = col_block * p.cols_per_block;
    const int64_t col_end = min((int64_t)p.n_dim, col_begin + p.cols_per_block);
    const int chunks = (int)((col_end - col_begin + BN - 1) / BN);
    const int ewm = warp / C::EWARPS_N, ewn = warp % C::EWARPS_N;
    const int em0 = ewm * C::EMT * 16, en0 = ewn * C::ENT * 8;

    const TileCopy<T, BN, RP> ao_copy(rank);
    const TileCopy<T, BM, BN> y_copy(p.ld_out);
    T* y_tile = out + row0 * p.ld_out;
    auto cols_of = [&](int j) { return (int)min((int64_t)BN, col_end - col_begin - (int64_t)j * BN); };
    auto issue = [&](int buf, int j) {
        const int64_t c0 = col_begin + (int64_t)j * BN;
        ao_copy.copy(aos + buf * BN * C::A_LD, C::A_LD, a + c0 * rank, cols_of(j), rank, a_vec);
        if (accumulate) y_copy.copy(ys + buf * BM * C::Y_LD, C::Y_LD, y_tile + c0, rows, cols_of(j), out_vec);
    };
    const bool expand_rows = em0 < rows;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < chunks) issue(s, s);
        cp_async_commit();
    }

    const int g = lane >> 2;
    float rs[C::EMT][2];  // scale / row scale of this thread's rows
    const float scale = resolve_scale(p.scale);
#pragma unroll
    for (int mt = 0; mt < C::EMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) rs[mt][h] = expand_rows ? scale * row_inv[em0 + mt * 16 + g + 8 * h] : 0.0f;
    // Dropout on out's adapter term (dX): mask by (token, output column),
    // 1/(1 − p) folded into the row scale.
    const bool drop_out = p.dropout.threshold != 0 && p.dropout_out != 0;
    if (drop_out) {
#pragma unroll
        for (int mt = 0; mt < C::EMT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) rs[mt][h] *= p.dropout.scale;
    }

    for (int j = 0; j < chunks; ++j) {
        const int buf = j % STAGES;
        cp_async_wait<STAGES - 2>();
        // Chunk j landed for everyone, and the buffer refilled below (chunk
        // j-1's) was written out before this barrier.
        __syncthreads();
        if (j + STAGES - 1 < chunks) issue((j + STAGES - 1) % STAGES, j + STAGES - 1);
        cp_async_commit();

        T* yt = ys + buf * BM * C::Y_LD;
        if (expand_rows) {
            float eacc[C::EMT][C::ENT][4];
            zero_acc(eacc);
            const T* at = aos + buf * BN * C::A_LD;
            for (int k0 = 0; k0 < rpad; k0 += 16) {
                tile_mma_k16<T, C::EMT, C::ENT, true, true>(eacc, st, C::ST_LD, at, C::A_LD, em0, en0, k0, BN);
            }
            // Keep bits of this thread's element pairs (tile_keep_bits's layout).
            const uint32_t keep = drop_out ? tile_keep_bits<C::EMT, C::ENT>(p.dropout, row0 + em0,
                                                                           col_begin + (int64_t)j * BN + en0)
                                           : 0u;
            // Epilogue in place in the Y tile: each element pair has one owner.
            for_each_pair_nt(eacc, em0, en0, [&](int mt, int nt, int h, int r, int c, float v0, float v1) {
                T* y = yt + r * C::Y_LD + c;
                float2 v = make_float2(v0 * rs[mt][h], v1 * rs[mt][h]);
                if (drop_out) {
                    const int bit = 4 * (mt * C::ENT + nt) + 2 * h;
                    if (!kept(keep, bit)) v.x = 0.0f;
                    if (!kept(keep, bit + 1)) v.y = 0.0f;
                }
                store2_onto(y, v, accumulate);
            });
        }
        __syncthreads();
        // Coalesced write-out: consecutive threads cover consecutive 16 bytes.
        y_copy.store(y_tile + col_begin + (int64_t)j * BN, yt, C::Y_LD, rows, cols_of(j), out_vec);
    }
}

}  // namespace singlora

