// backward_fused_sm90: the backward in one pass over G and X (sm_90a,
// bf16, rank <= 32; kernels/params.h, singlora_backward_fused_params).
//
// Why a cluster: Q = G·A_out needs a whole row of G, while dA's Gᵀ·S and
// Xᵀ·Q need a block to own a band of columns across many tokens. A cluster
// of CL CTAs spans d: CTA q owns the columns [q·band, (q+1)·band) of G, X and
// dX, and the cluster walks a token range BM rows at a time (the grid is
// persistent: a cluster takes ranges blockIdx.y, blockIdx.y + gridDim.y, ...,
// each ending in its own dA partials). Per step:
//
//   1. the step's tiles G[rows, band_out] and X[rows, band_in] land in
//      shared memory (cp.async, STAGES deep; X masked in place for dropout);
//   2. partial Q = G_tile·A_out[band] and S = X_tile·A_in[band] (BM × rank,
//      f32, tensor cores), K split over warp pairs and summed in a fixed
//      order into this CTA's exchange buffer;
//   3. cluster barrier; every CTA sums the CL exchange buffers through
//      distributed shared memory in rank order 0..CL-1, so all get the same
//      bits of Q and S, and rounds them to bf16 (CTA 0 also stores Q); or,
//      with p.scatter, each CTA sums 1/CL of the elements and writes them
//      into every CTA's bf16 buffer, then a second cluster barrier (the same
//      sums in the same order: the same bits);
//   4. each warp accumulates its 64 columns' dA rows in registers:
//      Gᵀ·S (rows of d_out) and Xᵀ·Q (rows of d_in), over the whole range;
//   5. each warp writes its 64 columns of dX = dx_beta·dX + s·Q·A_inᵀ
//      straight from registers.
//
// G and X are read once, dX written once; A's bands are read once per CTA
// and stay in shared memory. The exchange buffers are double-buffered, so
// one cluster barrier per step suffices: a CTA overwrites its buffer of
// step i at step i + 2, after the barrier of step i + 1, which no CTA
// reaches before it has finished reading step i's buffers. At the end of a
// range each CTA writes one dA partial per (range, band) into the workspace, summed
// in a fixed order by backward_da_reduce: no atomics, and the bits depend on
// Dims alone.
// With p.scatter, a CTA writes the others' bf16 Q and S of step i + 1 only
// after the first barrier of step i + 1, which none reaches before it has
// finished reading its own of step i.
//
// This translation unit is compiled for sm_90a alone (build.rs: *_sm90.cu).
#include <cooperative_groups.h>
#include <type_traits>

#include "common/copies.cuh"
#include "common/dropout.cuh"
#include "common/mma.cuh"
#include "common/scale.cuh"

namespace singlora {

template <int RP> struct FusedConfig {
    using T = __nv_bfloat16;
    static constexpr int CL = SINGLORA_BACKWARD_FUSED_CLUSTER;
    static constexpr int BAND = SINGLORA_BACKWARD_FUSED_BAND;
    // Each warp owns 64 band columns: dA rows (MT = 4) and dX columns.
    static constexpr int WCOLS = BAND / kWarps;
    static constexpr int DMT = WCOLS / 16, DNT = RP / 8;
    // Token rows per step. The dA accumulators take 2·RP registers per term
    // and thread; at rank 32 the step halves so that two tiles in flight
    // (three stages) still fit beside A's bands.
    static constexpr int BM = RP <= 16 ? 32 : 16;
    static constexpr int STAGES = RP <= 16 ? 2 : 3;
    static constexpr int PAD = vec_elems<T>();
    static constexpr int T_LD = BAND + PAD;  // G and X tiles [BM][T_LD]
    static constexpr int A_LD = RP + PAD;    // A bands [BAND][A_LD]
    static constexpr int QS_LD = RP + PAD;   // bf16 Q and S [BM][QS_LD]
    // Step 2's jobs: (Q or S) × 16-row tiles × 16-column pairs, each over
    // half of the band (KSPLIT warps per job).
    static constexpr int JOBS = 2 * (BM / 16) * (RP / 16);
    static constexpr int KSPLIT = kWarps / JOBS;
    static constexpr int KH = BAND / KSPLIT;
    // dX in column halves of 32 per warp (DXNT n-tiles), to bound registers.
    static constexpr int DXMT = BM / 16, DXNT = 4;

    static constexpr int STAGE_ELEMS = 2 * BM * T_LD;  // G tile, then X tile
    static constexpr int TILES_BYTES = STAGES * STAGE_ELEMS * 2;
    static constexpr int A_BYTES = 2 * BAND * A_LD * 2;        // A_out band, A_in band
    static constexpr int RED_BYTES = kWarps * 16 * 16 * 4;     // per-warp partials
    static constexpr int EXCH_BYTES = 2 * 2 * BM * RP * 4;     // [buffer][Q, S][BM][RP]
    static constexpr int QS_BYTES = 2 * BM * QS_LD * 2;        // [Q, S][BM][QS_LD]
    static constexpr int SMEM_BYTES = TILES_BYTES + A_BYTES + RED_BYTES + EXCH_BYTES + QS_BYTES;

    static_assert(JOBS * KSPLIT == kWarps && KH % 16 == 0, "step 2's warp split");
    static_assert(2 * BM * RP % kThreads == 0, "step 3's element split");
    static_assert(SMEM_BYTES <= 227 * 1024, "fits sm_90's shared memory per block");
};

template <typename T, int RP>
__device__ __forceinline__ void backward_fused_kernel(const singlora_backward_fused_params& p) {
    using C = FusedConfig<RP>;
    static_assert(std::is_same<T, typename C::T>::value, "the fused backward is bf16 code");
    constexpr int BM = C::BM, BAND = C::BAND, CL = C::CL, STAGES = C::STAGES;
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();

    extern __shared__ __align__(128) unsigned char smem[];
    T* tiles = reinterpret_cast<T*>(smem);                           // [STAGES][G, X][BM][T_LD]
    T* a_out_s = reinterpret_cast<T*>(smem + C::TILES_BYTES);        // [BAND][A_LD]
    T* a_in_s = a_out_s + BAND * C::A_LD;                            // [BAND][A_LD]
    float* red = reinterpret_cast<float*>(smem + C::TILES_BYTES + C::A_BYTES);  // [warp][16][16]
    float* exch = red + kWarps * 256;                                // [2][2][BM][RP]
    T* qs = reinterpret_cast<T*>(exch + 2 * 2 * BM * RP);            // [Q, S][BM][QS_LD]
    T* q_t = qs;
    T* s_t = qs + BM * C::QS_LD;

    const int q = (int)cluster.block_rank();
    const int warp = threadIdx.x >> 5;
    const int rank = p.rank;
    const int rpad = p.rank_pad;
    // This CTA's bands: columns [band0, band0 + valid) of d_out and d_in.
    auto band_of = [](int d) { return ((d + CL - 1) / CL + 63) / 64 * 64; };
    const int bo = band_of(p.d_out), bi = band_of(p.d_in);
    const int64_t out0 = (int64_t)q * bo, in0 = (int64_t)q * bi;
    const int out_valid = (int)max((int64_t)0, min((int64_t)bo, p.d_out - out0));
    const int in_valid = (int)max((int64_t)0, min((int64_t)bi, p.d_in - in0));
    const bool drop = p.dropout.threshold != 0;

    const T* g = reinterpret_cast<const T*>(p.g);
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* a = reinterpret_cast<const T*>(p.a);

    // A's bands, once (the first cp.async group).
    {
        const TileCopy<T, BAND, RP> a_copy(rank);
        a_copy.copy(a_out_s, C::A_LD, a + out0 * rank, out_valid, rank, p.a_vec != 0);
        a_copy.copy(a_in_s, C::A_LD, a + in0 * rank, in_valid, rank, p.a_vec != 0);
    }
    // Step 2's job of this warp: Q (0) or S (1), a 16-row tile, a 16-column
    // pair, and one of KSPLIT slices of the band.
    const int job = warp % C::JOBS, kslice = warp / C::JOBS;
    const int which = job & 1;
    const int jm = (job >> 1) % (BM / 16), jn = (job >> 1) / (BM / 16);
    const int k_valid = which == 0 ? out_valid : in_valid;
    const int k_begin = kslice * C::KH;
    const int k_end = min(k_begin + C::KH, (k_valid + 15) / 16 * 16);
    const T* job_b = which == 0 ? a_out_s : a_in_s;

    // Step 4's accumulators: this warp's 64 columns' dA rows.
    const int wc0 = warp * C::WCOLS;
    float acc_g[C::DMT][C::DNT][4], acc_x[C::DMT][C::DNT][4];
    const float scale = resolve_scale(p.scale) * (drop ? p.dropout.scale : 1.0f);
    T* dx = reinterpret_cast<T*>(p.dx);
    const bool accumulate = p.dx_beta != 0.0f;
    float* q_out = reinterpret_cast<float*>(p.q);
    const TileCopy<T, BM, BAND> g_copy(p.ld_g);
    const TileCopy<T, BM, BAND> x_copy(p.ld_x);

    // Token range cid of p.clusters: the ranges fix the summation order;
    // the grid holds as many clusters as the device can at once, each
    // taking the ranges blockIdx.y, blockIdx.y + gridDim.y, ...
    for (int cid = blockIdx.y; cid < p.clusters; cid += gridDim.y) {
        const int64_t t_begin = (int64_t)cid * p.tokens_per_cluster;
        const int64_t t_end = min(p.tokens, t_begin + p.tokens_per_cluster);
        // Uniform over the cluster (cid is), so every CTA takes the same number
        // of cluster barriers.
        const int steps = t_end > t_begin ? (int)((t_end - t_begin + BM - 1) / BM) : 0;
        auto rows_of = [&](int i) { return (int)min((int64_t)BM, t_end - t_begin - (int64_t)i * BM); };
        auto load_step = [&](int stage, int i) {
            const int64_t t0 = t_begin + (int64_t)i * BM;
            T* gt = tiles + stage * C::STAGE_ELEMS;
            g_copy.copy(gt, C::T_LD, g + t0 * p.ld_g + out0, rows_of(i), out_valid, p.g_vec != 0);
            x_copy.copy(gt + BM * C::T_LD, C::T_LD, x + t0 * p.ld_x + in0, rows_of(i), in_valid, p.x_vec != 0);
        };
        // The previous range's last barrier freed every buffer (tiles, red,
        // exch, qs), so its step parity restarts at 0.
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < steps) load_step(s, s);
            cp_async_commit();
        }
        zero_acc(acc_g);
        zero_acc(acc_x);

        for (int i = 0; i < steps; ++i) {
            const int stage = i % STAGES;
            const int64_t t0 = t_begin + (int64_t)i * BM;
            const int rows = rows_of(i);
            T* gt = tiles + stage * C::STAGE_ELEMS;
            T* xt = gt + BM * C::T_LD;
            cp_async_wait<STAGES - 2>();
            if (drop) {
                // This thread's chunks of the X tile landed (for it): mask them
                // before the barrier publishes the tile.
                x_copy.for_each_chunk(xt, C::T_LD, rows, in_valid, [&](T* chunk, int r, int c) {
                    drop_chunk(chunk, p.dropout, (uint32_t)(t0 + r), (uint32_t)(in0 + c));
                });
            }
            // The step's tiles landed everywhere; the stage refilled below was
            // last read in the previous step, before this barrier.
            __syncthreads();
            if (i + STAGES - 1 < steps) load_step((i + STAGES - 1) % STAGES, i + STAGES - 1);
            cp_async_commit();

            // ---- 2. partial Q and S over this CTA's band --------------------
            {
                float acc0[1][2][4], acc1[1][2][4];
                zero_acc(acc0);
                zero_acc(acc1);
                const T* at = which == 0 ? gt : xt;
                // Two accumulators alternate k steps: two independent mma chains.
                int k = k_begin;
                for (; k + 16 < k_end; k += 32) {
                    tile_mma_k16<T, 1, 2, true, false>(acc0, at, C::T_LD, job_b, C::A_LD, jm * 16, jn * 16, k, rpad);
                    tile_mma_k16<T, 1, 2, true, false>(acc1, at, C::T_LD, job_b, C::A_LD, jm * 16, jn * 16, k + 16,
                                                       rpad);
                }
                if (k < k_end)
                    tile_mma_k16<T, 1, 2, true, false>(acc0, at, C::T_LD, job_b, C::A_LD, jm * 16, jn * 16, k, rpad);
                for_each_pair(acc0, 0, 0, [&](int mt, int h, int r, int c, float v0, float v1) {
                    // acc1 holds the same elements at the same indices.
                    const int nt = c / 8;
                    const float w0 = v0 + acc1[mt][nt][2 * h], w1 = v1 + acc1[mt][nt][2 * h + 1];
                    *reinterpret_cast<float2*>(&red[warp * 256 + r * 16 + c]) = make_float2(w0, w1);
                });
            }
            __syncthreads();
            float* mine = exch + (i % 2) * 2 * BM * RP;
            constexpr int PER = 2 * BM * RP / kThreads;
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int idx = threadIdx.x + e * kThreads;
                const int wh = idx / (BM * RP), rem = idx % (BM * RP);
                const int r = rem / RP, c = rem % RP;
                const int jb = wh | ((r / 16 + (c / 16) * (BM / 16)) << 1);
                float v = 0.0f;
#pragma unroll
                for (int ks = 0; ks < C::KSPLIT; ++ks) v += red[(jb + ks * C::JOBS) * 256 + (r % 16) * 16 + c % 16];
                mine[idx] = v;
            }

            // ---- 3. the cluster's sum, in rank order ------------------------
            cluster.sync();
            // Element idx of the step's [Q, S] summed over the cluster's
            // partials, rank 0 first (every CTA, either way, gets the same
            // bits); S scaled by 1/(1 − p) (S = drop(X)·A_in = (M ⊙ X)·A_in /
            // (1 − p)); Q stored to q_out by the CTA that summed it.
            auto sum_of = [&](int idx, bool store_q) {
                float v = 0.0f;
#pragma unroll
                for (int src = 0; src < CL; ++src) v += cluster.map_shared_rank(mine, src)[idx];
                const int wh = idx / (BM * RP), rem = idx % (BM * RP);
                const int r = rem / RP, c = rem % RP;
                if (wh == 1 && drop) v *= p.dropout.scale;
                if (wh == 0 && store_q && r < rows && c < rank) q_out[(t0 + r) * rank + c] = v;
                return v;
            };
            auto qs_slot = [&](int idx) {
                const int wh = idx / (BM * RP), rem = idx % (BM * RP);
                return wh * BM * C::QS_LD + (rem / RP) * C::QS_LD + rem % RP;
            };
            if (p.scatter == 0) {
#pragma unroll
                for (int e = 0; e < PER; ++e) {
                    const int idx = threadIdx.x + e * kThreads;
                    qs[qs_slot(idx)] = from_f32<T>(sum_of(idx, q == 0));
                }
                __syncthreads();  // bf16 Q and S ready
            } else {
                // CTA q sums its slice and writes it into every CTA's qs.
                constexpr int SLICE = 2 * BM * RP / CL;
                static_assert(SLICE <= kThreads && 2 * BM * RP % CL == 0, "one element per thread");
                if (threadIdx.x < SLICE) {
                    const int idx = q * SLICE + threadIdx.x;
                    const T v = from_f32<T>(sum_of(idx, true));
#pragma unroll
                    for (int dst = 0; dst < CL; ++dst) cluster.map_shared_rank(qs, dst)[qs_slot(idx)] = v;
                }
                cluster.sync();  // every CTA's bf16 Q and S complete
            }

            // ---- 4. dA rows: Gᵀ·S and Xᵀ·Q over the step's tokens -------------
            if (wc0 < out_valid) {
#pragma unroll
                for (int kk = 0; kk < BM; kk += 16)
                    tile_mma_k16<T, C::DMT, C::DNT, false, false>(acc_g, gt, C::T_LD, s_t, C::QS_LD, wc0, 0, kk, rpad);
            }
            if (wc0 < in_valid) {
#pragma unroll
                for (int kk = 0; kk < BM; kk += 16)
                    tile_mma_k16<T, C::DMT, C::DNT, false, false>(acc_x, xt, C::T_LD, q_t, C::QS_LD, wc0, 0, kk, rpad);
            }

            // ---- 5. dX = dx_beta·dX + s·M ⊙ (Q·A_inᵀ)/(1 − p), from registers ----
            if (dx != nullptr) {
#pragma unroll
                for (int half = 0; half < C::WCOLS / 32; ++half) {
                    const int n0 = wc0 + half * 32;
                    if (n0 >= in_valid) break;
                    float acc[C::DXMT][C::DXNT][4];
                    zero_acc(acc);
                    for (int k0 = 0; k0 < rpad; k0 += 16)
                        tile_mma_k16<T, C::DXMT, C::DXNT, true, true>(acc, q_t, C::QS_LD, a_in_s, C::A_LD, 0, n0, k0,
                                                                      BAND);
                    const uint32_t keep = drop ? tile_keep_bits<C::DXMT, C::DXNT>(p.dropout, t0, in0 + n0) : 0u;
                    for_each_pair_nt(acc, 0, n0, [&](int mt, int nt, int h, int r, int c, float v0, float v1) {
                        if (r >= rows || c >= in_valid) return;
                        float2 v = make_float2(v0 * scale, v1 * scale);
                        if (drop) {
                            const int bit = 4 * (mt * C::DXNT + nt) + 2 * h;
                            if (!kept(keep, bit)) v.x = 0.0f;
                            if (!kept(keep, bit + 1)) v.y = 0.0f;
                        }
                        T* dst = dx + (t0 + r) * p.ld_dx + in0 + c;
                        if (p.dx_pair != 0 && c + 1 < in_valid) {
                            store2_onto(dst, v, accumulate);
                        } else {
                            dst[0] = from_f32<T>(v.x + (accumulate ? to_f32(dst[0]) : 0.0f));
                            if (c + 1 < in_valid) dst[1] = from_f32<T>(v.y + (accumulate ? to_f32(dst[1]) : 0.0f));
                        }
                    });
                }
            }
            // The next step's first barrier orders these reads of the tiles and
            // of q_t/s_t before they are overwritten.
        }
        cp_async_wait<0>();
        // No CTA may leave (its shared memory with it) or start the next range
        // (its buffers) while another still reads its exchange buffer.
        cluster.sync();

        // ---- this (cluster, band)'s dA partials --------------------------------
        float* part = reinterpret_cast<float*>(p.partial);
        const float x_scale = drop ? p.dropout.scale : 1.0f;  // drop(X)ᵀ·Q = (M ⊙ X)ᵀ·Q / (1 − p)
        float* part_g = part + ((int64_t)(0 * p.clusters + cid) * p.d) * rpad;
        float* part_x = part + ((int64_t)(1 * p.clusters + cid) * p.d) * rpad;
        for_each_pair(acc_g, wc0, 0, [&](int, int, int r, int c, float v0, float v1) {
            if (r < out_valid && c < rpad)
                *reinterpret_cast<float2*>(part_g + (out0 + r) * rpad + c) = make_float2(v0, v1);
        });
        for_each_pair(acc_x, wc0, 0, [&](int, int, int r, int c, float v0, float v1) {
            if (r < in_valid && c < rpad)
                *reinterpret_cast<float2*>(part_x + (in0 + r) * rpad + c) = make_float2(v0 * x_scale, v1 * x_scale);
        });
    }  // token ranges
    // The A-band copy (group 0) completed before the first range's first
    // step; with no range at all it is waited for here.
    cp_async_wait<0>();
}

}  // namespace singlora

#define SINGLORA_BACKWARD_FUSED(tname, T, RP)                                                                 \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads, 1)                                       \
        __cluster_dims__(SINGLORA_BACKWARD_FUSED_CLUSTER, 1, 1)                                               \
            backward_fused_sm90_##tname##_r##RP(const singlora_backward_fused_params p) {                     \
        singlora::backward_fused_kernel<T, RP>(p);                                                            \
    }                                                                                                         \
    SINGLORA_KERNEL_INFO(backward_fused_sm90_##tname##_r##RP, (singlora::FusedConfig<RP>::SMEM_BYTES),        \
                         (singlora::FusedConfig<RP>::BM), (singlora::FusedConfig<RP>::BAND), RP)

#define SINGLORA_BACKWARD_FUSED_RANKS(tname, T) SINGLORA_BACKWARD_FUSED_RANK_BUCKETS(SINGLORA_BACKWARD_FUSED, tname, T)
SINGLORA_BF16_DTYPES(SINGLORA_BACKWARD_FUSED_RANKS)
