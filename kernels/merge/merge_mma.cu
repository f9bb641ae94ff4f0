// merge_mma: merge / unmerge with the product on tensor cores (mma.sync
// m16n8k16 for f16/bf16; the same warp tiling on FMAs for f32). Opt-in until
// a GPU run proves it (MergeKernel::TensorCore); merge.cu stays the default.
//
// A block owns a BM × BN tile of W. The rank is reduced in KC-wide chunks:
// the block stages A_out[rows, chunk] and A_in[cols, chunk] in shared memory
// (zero-padded past d_out, d_in and the rank) and its 8 warps (2 × 4, 32 × 32
// each) accumulate the f32 product tile. The update d = scale·product is
// rounded to f32 once and staged through shared memory, so that W is read
// and written with 16-byte, fully coalesced accesses, each element once.
// merge and unmerge run the same mma sequence on the same operands, so their
// products have the same bits and they differ only in the sign of scale
// (exact): unmerge(merge(W)) is within one rounding of W, as with merge.cu.
#include "common/copies.cuh"
#include "common/mma.cuh"
#include "common/scale.cuh"

namespace singlora {

struct MergeMmaConfig {
    static constexpr int BM = SINGLORA_MERGE_BM, BN = SINGLORA_MERGE_BN;
    static constexpr int WARPS_M = 2, WARPS_N = 4;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // 32 × 32
    static constexpr int MT = WTM / 16, NT = WTN / 8;
    static constexpr int D_LD = BN + 4;  // f32 staging of the update
    static_assert(WARPS_M * WARPS_N == kWarps, "warp grid");
};

template <typename T>
__device__ __forceinline__ void merge_mma_kernel(const singlora_merge_params& p) {
    using C = MergeMmaConfig;
    // Rank chunks of 128 bytes per row (64 16-bit or 32 f32 elements); rows
    // padded by 16 bytes keep ldmatrix conflict-free.
    constexpr int KC = 128 / (int)sizeof(T);
    constexpr int A_LD = KC + vec_elems<T>();
    constexpr int A_BYTES = (C::BM + C::BN) * A_LD * (int)sizeof(T);
    constexpr int D_BYTES = C::BM * C::D_LD * 4;
    __shared__ __align__(128) unsigned char smem[A_BYTES > D_BYTES ? A_BYTES : D_BYTES];
    T* ao = reinterpret_cast<T*>(smem);  // [BM][A_LD]: A_out rows of the tile
    T* ai = ao + C::BM * A_LD;           // [BN][A_LD]: A_in rows (W's columns)
    float* ds = reinterpret_cast<float*>(smem);  // [BM][D_LD], after the product

    const T* a = reinterpret_cast<const T*>(p.a);
    T* w = reinterpret_cast<T*>(p.w);
    const int64_t row0 = (int64_t)blockIdx.y * C::BM;
    const int64_t col0 = (int64_t)blockIdx.x * C::BN;
    const int rows = (int)min((int64_t)C::BM, (int64_t)p.d_out - row0);
    const int cols = (int)min((int64_t)C::BN, (int64_t)p.d_in - col0);
    const int rank = p.rank;
    const int rpad = (rank + 15) / 16 * 16;
    const bool a_vec = (rank * (int)sizeof(T)) % 16 == 0 && (p.a % 16) == 0;
    const int warp = threadIdx.x >> 5;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;

    float acc[C::MT][C::NT][4];
    zero_acc(acc);
    const TileCopy<T, C::BM, KC> out_copy(rank);
    const TileCopy<T, C::BN, KC> in_copy(rank);
    for (int k0 = 0; k0 < rpad; k0 += KC) {
        const int kc = min(KC, rank - k0);
        out_copy.copy(ao, A_LD, a + row0 * rank + k0, rows, kc, a_vec);
        in_copy.copy(ai, A_LD, a + col0 * rank + k0, cols, kc, a_vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        const int ksteps = min(KC, rpad - k0);
        for (int kk = 0; kk < ksteps; kk += 16) {
            tile_mma_k16<T, C::MT, C::NT, true, true>(acc, ao, A_LD, ai, A_LD, wm * C::WTM, wn * C::WTN, kk,
                                                      C::BN);
        }
        // The next chunk (or the staging of d) overwrites the operands.
        __syncthreads();
    }

    // d = scale · product, rounded once (explicitly: no contraction with
    // the add below), staged for the coalesced read-modify-write of W.
    const float scale = resolve_scale(p.scale);
    for_each_pair(acc, wm * C::WTM, wn * C::WTN, [&](int, int, int r, int c, float v0, float v1) {
        ds[r * C::D_LD + c] = __fmul_rn(scale, v0);
        ds[r * C::D_LD + c + 1] = __fmul_rn(scale, v1);
    });
    __syncthreads();

    // W += d: consecutive threads take consecutive 8-element chunks of a row.
    constexpr int CPR = C::BN / 8;
    for (int i = threadIdx.x; i < C::BM * CPR; i += kThreads) {
        const int r = i / CPR, c = (i % CPR) * 8;
        if (r >= rows || c >= cols) continue;
        T* wr = w + (row0 + r) * p.ld_w + col0 + c;
        const float* d = ds + r * C::D_LD + c;
        if (p.w_vec && c + 8 <= cols) {
            add8_vec(wr, d);
        } else {
            for (int j = 0; j < 8 && c + j < cols; ++j) wr[j] = from_f32<T>(__fadd_rn(to_f32(wr[j]), d[j]));
        }
    }
}

}  // namespace singlora

#define SINGLORA_MERGE_MMA(tname, T)                                                              \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads)                              \
        merge_mma_##tname(const singlora_merge_params p) {                                        \
        singlora::merge_mma_kernel<T>(p);                                                         \
    }                                                                                             \
    SINGLORA_KERNEL_INFO(merge_mma_##tname, 0, singlora::MergeMmaConfig::BM,                      \
                         singlora::MergeMmaConfig::BN, SINGLORA_MAX_RANK)

SINGLORA_DTYPES(SINGLORA_MERGE_MMA)
