// backward: dA = da_beta·dA + s·(Gᵀ·S into rows [0, d_out) + Xᵀ·Q into rows
// [0, d_in)), deterministic. (dX and Q come from the forward kernel with G in
// X's place; see forward.cu.)
//
// backward_da_partial: block (band, split, part × rank half) owns BD rows of
// dA and one token range. It streams BT-token tiles of G (part 0) or X (part
// 1) through a cp.async pipeline, with the matching rows of S or Q converted
// from f32 to the element type on the way into shared memory, and
// accumulates the BD × rank tile on tensor cores. G and X are read once. Each
// block writes its f32 partial to its own slot of the workspace: no atomics.
//
// backward_da_reduce: sums the partials of every split and both parts in a
// fixed order, so dA's bits do not depend on scheduling.
//
// Dropout (p.dropout.threshold != 0, part 1 only; a block-uniform branch, so
// p = 0 runs exactly the undropped instructions): each thread zeroes the
// dropped elements of its own chunks of every X tile once they have landed
// (before the barrier that publishes the tile), by (token, column of d_in),
// so the tile is M ⊙ X; the 1/(1 − p) is folded into the partial's column
// scale, in f32. Part 0 (Gᵀ·S) takes the dropped S as it is given.
#include "common/copies.cuh"
#include "common/dropout.cuh"
#include "common/mma.cuh"
#include "common/scale.cuh"

namespace singlora {

// SMALL: two pipeline stages instead of three, so that the 128-column tiles
// fit SINGLORA_SMALL_SMEM_BYTES (sm_86/sm_89); used only where the regular
// configuration does not fit.
template <typename T, int RP, bool SMALL = false> struct DaConfig {
    static constexpr int BD = SINGLORA_DA_BD;
    static constexpr int BT = 128 / (int)sizeof(T);
    static constexpr int PAD = vec_elems<T>();
    // A block covers at most 128 rank columns so the BD × columns f32 tile
    // fits in 64 registers per thread; rank 256 runs as two column halves.
    static constexpr int RPB = RP > 128 ? 128 : RP;
    static constexpr int RSPLITS = RP / RPB;
    static constexpr int WARPS_N = RPB >= 128 ? 2 : 1;
    static constexpr int WARPS_M = kWarps / WARPS_N;
    static constexpr int WTM = BD / WARPS_M, WTN = RPB / WARPS_N;
    static constexpr int MT = WTM / 16, NT = WTN / 8;
    static constexpr int STAGES = SMALL ? 2 : 3;
    // Blocks per SM the registers must allow (see shrink_expand.cuh): three
    // up to rank 32 (their shared memory allows three; without the bound the
    // dropout branch's registers would cut them to two, dropout off or on),
    // two up to rank 64; the 128-column tiles need more than 128 registers.
    static constexpr int MIN_BLOCKS = RPB >= 128 ? 1 : RPB <= 32 ? 3 : 2;
    static constexpr int SRC_LD = BD + PAD;
    static constexpr int SS_LD = RPB + PAD;
    static constexpr int NG = kThreads / RPB;  // column-max row groups
    static constexpr int SMEM_BYTES =
        STAGES * (BT * SRC_LD + BT * SS_LD) * (int)sizeof(T) + (2 * RPB + NG * RPB) * 4;
    static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BT % 16 == 0, "warp tile");
    static_assert(!SMALL || SMEM_BYTES <= SINGLORA_SMALL_SMEM_BYTES, "small configuration fits");
};

template <typename T, int RP, bool SMALL = false>
__device__ __forceinline__ void da_partial_kernel(const singlora_da_params& p) {
    using C = DaConfig<T, RP, SMALL>;
    constexpr int BD = C::BD, BT = C::BT, RPB = C::RPB, STAGES = C::STAGES;
    extern __shared__ __align__(128) unsigned char smem[];
    T* srcs = reinterpret_cast<T*>(smem);             // [STAGES][BT][SRC_LD]
    T* sss = srcs + STAGES * BT * C::SRC_LD;          // [STAGES][BT][SS_LD]
    float* col_scale = reinterpret_cast<float*>(sss + STAGES * BT * C::SS_LD);  // [RPB]
    float* col_inv = col_scale + RPB;                 // [RPB]
    float* red = col_inv + RPB;                       // [NG][RPB]

    const int part = blockIdx.z % 2;
    const int rcol0 = (blockIdx.z / 2) * RPB;
    const int split = blockIdx.y;
    const int64_t rows_limit = part == 0 ? p.d_out : p.d_in;
    const int64_t band0 = (int64_t)blockIdx.x * BD;
    if (band0 >= rows_limit) return;  // whole block: this part has no such rows

    const T* src = reinterpret_cast<const T*>(part == 0 ? p.g : p.x);
    const int64_t ld = part == 0 ? p.ld_g : p.ld_x;
    const bool vec = (part == 0 ? p.g_vec : p.x_vec) != 0;
    const float* ss = reinterpret_cast<const float*>(part == 0 ? p.s : p.q);
    const int rank = p.rank;
    const int rpad_local = min(RPB, p.rank_pad - rcol0);
    const int64_t t_begin = (int64_t)split * p.tokens_per_split;
    const int64_t t_end = min(p.tokens, t_begin + p.tokens_per_split);
    const bool drop_x = part == 1 && p.dropout.threshold != 0;

    // Per-column power-of-two scale of S or Q over this token range (f16
    // only): brings the f32 values into f16 range; undone on write-out.
    {
        const int c = threadIdx.x % RPB, grp = threadIdx.x / RPB;
        float mx = 0.0f;
        if (Elem<T>::kNeedsScaling && rcol0 + c < rank) {
            for (int64_t t = t_begin + grp; t < t_end; t += C::NG) mx = fmaxf(mx, fabsf(ss[t * rank + rcol0 + c]));
        }
        red[grp * RPB + c] = mx;
        __syncthreads();
        if (threadIdx.x < RPB) {
            for (int gi = 1; gi < C::NG; ++gi) mx = fmaxf(mx, red[gi * RPB + c]);
            const float sc = Elem<T>::kNeedsScaling ? pow2_scale_for(mx) : 1.0f;
            col_scale[c] = sc;
            // 1/sc is a power of two: the product with 1/(1 − p) is exact.
            col_inv[c] = drop_x ? 1.0f / sc * p.dropout.scale : 1.0f / sc;
        }
        __syncthreads();
    }

    const int warp = threadIdx.x >> 5;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    float acc[C::MT][C::NT][4];
    zero_acc(acc);

    const int k_tiles = (int)((t_end - t_begin + BT - 1) / BT);
    // S/Q are f32 (and L2-resident): each thread fetches its share of a tile
    // into registers one pipeline step ahead, and converts it into the stage
    // at the next step, so the loads overlap the previous tile's mma.
    constexpr int SS_PER_THREAD = BT * RPB / kThreads;
    static_assert(BT * RPB % kThreads == 0, "S/Q tile split");
    float ssr[SS_PER_THREAD];
    // This thread's elements sit at rows ss_r + e·SS_RSTEP, column ss_c of
    // every tile (SS_PER_THREAD of them), so only the tile origin moves.
    constexpr int SS_RSTEP = kThreads / RPB;
    const int ss_r = threadIdx.x / RPB, ss_c = threadIdx.x % RPB;
    const bool ss_col_ok = rcol0 + ss_c < rank;
    const float* ss_thread = ss + (t_begin + ss_r) * rank + rcol0 + ss_c;
    auto fetch_ss = [&](int kt) {
        const int rows_valid = (int)min((int64_t)BT, t_end - t_begin - (int64_t)kt * BT);
        const float* base = ss_thread + (int64_t)kt * BT * rank;
#pragma unroll
        for (int e = 0; e < SS_PER_THREAD; ++e) {
            const int r = ss_r + e * SS_RSTEP;
            ssr[e] = (ss_col_ok && r < rows_valid) ? base[(int64_t)e * SS_RSTEP * rank] : 0.0f;
        }
    };
    const float my_col_scale = col_scale[ss_c];
    auto store_ss = [&](int stage) {
        T* d = sss + stage * BT * C::SS_LD + ss_r * C::SS_LD + ss_c;
#pragma unroll
        for (int e = 0; e < SS_PER_THREAD; ++e) d[e * SS_RSTEP * C::SS_LD] = from_f32<T>(ssr[e] * my_col_scale);
    };
    const TileCopy<T, BT, BD> src_copy(ld);
    const T* src_tile = src + t_begin * ld + band0;
    const int cols_valid = (int)min((int64_t)BD, rows_limit - band0);
    auto load_src = [&](int stage, int kt) {
        const int rows_valid = (int)min((int64_t)BT, t_end - t_begin - (int64_t)kt * BT);
        src_copy.copy(srcs + stage * BT * C::SRC_LD, C::SRC_LD, src_tile + (int64_t)kt * BT * ld, rows_valid,
                      cols_valid, vec);
    };
    auto drop_src = [&](int stage, int kt) {
        const int rows_valid = (int)min((int64_t)BT, t_end - t_begin - (int64_t)kt * BT);
        const int64_t t0 = t_begin + (int64_t)kt * BT;
        src_copy.for_each_chunk(srcs + stage * BT * C::SRC_LD, C::SRC_LD, rows_valid, cols_valid,
                                [&](T* chunk, int r, int c) {
                                    drop_chunk(chunk, p.dropout, (uint32_t)(t0 + r), (uint32_t)(band0 + c));
                                });
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) {
            load_src(s, s);
            fetch_ss(s);
            store_ss(s);
        }
        cp_async_commit();
    }
    fetch_ss(STAGES - 1);
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        if (drop_x) drop_src(kt % STAGES, kt);  // this thread's chunks of stage kt landed
        __syncthreads();  // stage kt landed everywhere; stage kt-1 is free
        const int next = kt + STAGES - 1;
        if (next < k_tiles) {
            load_src(next % STAGES, next);
            store_ss(next % STAGES);
        }
        cp_async_commit();
        fetch_ss(next + 1);
        const T* at = srcs + (kt % STAGES) * BT * C::SRC_LD;
        const T* bt = sss + (kt % STAGES) * BT * C::SS_LD;
#pragma unroll
        for (int kk = 0; kk < BT; kk += 16) {
            tile_mma_k16<T, C::MT, C::NT, false, false>(acc, at, C::SRC_LD, bt, C::SS_LD, wm * C::WTM,
                                                        wn * C::WTN, kk, rpad_local);
        }
    }
    cp_async_wait<0>();

    // Write this block's partial (rows it owns, padded rank columns).
    float* out = reinterpret_cast<float*>(p.partial) +
                 ((int64_t)(part * p.splits + split) * p.d) * p.rank_pad + rcol0;
    for_each_pair(acc, wm * C::WTM, wn * C::WTN, [&](int, int, int r, int c, float v0, float v1) {
        const int64_t row = band0 + r;
        if (row >= rows_limit || c >= rpad_local) return;
        *reinterpret_cast<float2*>(out + row * p.rank_pad + c) = make_float2(v0 * col_inv[c], v1 * col_inv[c + 1]);
    });
}

}  // namespace singlora

extern "C" __global__ void __launch_bounds__(singlora::kThreads, 1) backward_da_reduce(const singlora_da_params p) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.d * p.rank) return;
    const int64_t i = idx / p.rank;
    const int j = (int)(idx % p.rank);
    const float* part0 = reinterpret_cast<const float*>(p.partial);
    const float* part1 = part0 + (int64_t)p.splits * p.d * p.rank_pad;
    // Fixed order: part 0 splits ascending, then part 1 splits ascending.
    float sum = 0.0f;
    if (i < p.d_out)
        for (int s = 0; s < p.splits; ++s) sum += part0[((int64_t)s * p.d + i) * p.rank_pad + j];
    if (i < p.d_in)
        for (int s = 0; s < p.splits; ++s) sum += part1[((int64_t)s * p.d + i) * p.rank_pad + j];
    float* da = reinterpret_cast<float*>(p.da);
    const float prev = p.da_beta != 0.0f ? p.da_beta * da[idx] : 0.0f;
    da[idx] = prev + singlora::resolve_scale(p.scale) * sum;
}
SINGLORA_KERNEL_INFO(backward_da_reduce, 0, 0, 0, SINGLORA_MAX_RANK)

#define SINGLORA_DA_PARTIAL_KERNEL(family, SMALL, tname, T, RP)                                   \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads,                             \
                                                 (singlora::DaConfig<T, RP, SMALL>::MIN_BLOCKS)) \
        family##_##tname##_r##RP(const singlora_da_params p) {                                   \
        singlora::da_partial_kernel<T, RP, SMALL>(p);                                            \
    }                                                                                            \
    SINGLORA_KERNEL_INFO(family##_##tname##_r##RP, (singlora::DaConfig<T, RP, SMALL>::SMEM_BYTES), \
                         (singlora::DaConfig<T, RP, SMALL>::BD), (singlora::DaConfig<T, RP, SMALL>::RPB), RP)

// The regular configuration per element type and rank bucket; the small one
// (SINGLORA_SMALL_SMEM_BYTES) where the regular one does not fit.
#define SINGLORA_DA_PARTIAL(tname, T, RP) SINGLORA_DA_PARTIAL_KERNEL(backward_da_partial, false, tname, T, RP)
#define SINGLORA_DA_PARTIAL_SMALL(tname, T, RP) \
    SINGLORA_DA_PARTIAL_KERNEL(backward_da_partial_small, true, tname, T, RP)

#define SINGLORA_DA_PARTIAL_RANKS(tname, T) SINGLORA_RANK_BUCKETS(SINGLORA_DA_PARTIAL, tname, T)
#define SINGLORA_DA_PARTIAL_SMALL_RANKS(tname, T) SINGLORA_SMALL_DA_RANK_BUCKETS(SINGLORA_DA_PARTIAL_SMALL, tname, T)
SINGLORA_DTYPES(SINGLORA_DA_PARTIAL_RANKS)
SINGLORA_DTYPES(SINGLORA_DA_PARTIAL_SMALL_RANKS)
