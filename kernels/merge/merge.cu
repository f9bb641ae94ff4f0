// merge: W = W + scale · A[:d_out] · A[:d_in]ᵀ in place (unmerge: -scale).
// The one operation that touches a d_out × d_in matrix, because it is the
// weight: every element of W is read once and written once.
//
// A block owns a BM × BN tile of W; thread (ty, tx) owns rows ty·4.. and
// columns tx·8.. of it (4 × 8 f32 accumulators), so a warp's loads and stores
// cover 128 contiguous elements of two rows. The rank is reduced in BK
// chunks of A_out and A_in rows staged in shared memory as f32, with FMAs on
// CUDA cores: the product has only rank ≤ 256 terms, W's traffic dominates,
// and f32 FMAs in a fixed order make the product bit-identical between merge
// and unmerge (their only difference is the sign of scale, which is exact).
#include "common/elements.cuh"
#include "common/scale.cuh"

namespace singlora {

constexpr int kMergeBM = SINGLORA_MERGE_BM;
constexpr int kMergeBN = SINGLORA_MERGE_BN;
constexpr int kMergeBK = SINGLORA_MERGE_BK;
// Rows of the staged chunks are padded by 4 floats: the transposing stores
// hit 4-way instead of 32-way bank conflicts, and rows stay 16-byte aligned
// for the float4 reads of the inner loop.
constexpr int kMergeLdo = kMergeBM + 4;
constexpr int kMergeLdi = kMergeBN + 4;
static_assert(kMergeBM / 4 * (kMergeBN / 8) == kThreads, "one 4x8 patch per thread");

template <typename T>
__device__ __forceinline__ void merge_kernel(const singlora_merge_params& p) {
    __shared__ __align__(16) float a_out[kMergeBK][kMergeLdo];
    __shared__ __align__(16) float a_in[kMergeBK][kMergeLdi];

    const T* a = reinterpret_cast<const T*>(p.a);
    T* w = reinterpret_cast<T*>(p.w);
    const int tx = threadIdx.x % (kMergeBN / 8), ty = threadIdx.x / (kMergeBN / 8);
    const int row0 = blockIdx.y * kMergeBM;
    const int64_t col0 = (int64_t)blockIdx.x * kMergeBN;
    const int rank = p.rank;

    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < rank; k0 += kMergeBK) {
        // Consecutive threads read consecutive rank entries of one A row
        // (A is row-major D × rank); zeros pad rows and ranks out of range.
        for (int e = threadIdx.x; e < kMergeBM * kMergeBK; e += kThreads) {
            const int m = e / kMergeBK, k = e % kMergeBK;
            const int row = row0 + m;
            a_out[k][m] = (row < p.d_out && k0 + k < rank) ? to_f32(a[(int64_t)row * rank + k0 + k]) : 0.0f;
        }
        for (int e = threadIdx.x; e < kMergeBN * kMergeBK; e += kThreads) {
            const int n = e / kMergeBK, k = e % kMergeBK;
            const int64_t col = col0 + n;
            a_in[k][n] = (col < p.d_in && k0 + k < rank) ? to_f32(a[(int64_t)col * rank + k0 + k]) : 0.0f;
        }
        __syncthreads();
        // Only the chunk's real ranks: zero padding would add nothing but FMAs.
        const int kn = min(kMergeBK, rank - k0);
#pragma unroll 8
        for (int k = 0; k < kn; ++k) {
            const float4 o = *reinterpret_cast<const float4*>(&a_out[k][ty * 4]);
            const float4 i0 = *reinterpret_cast<const float4*>(&a_in[k][tx * 8]);
            const float4 i1 = *reinterpret_cast<const float4*>(&a_in[k][tx * 8 + 4]);
            const float ov[4] = {o.x, o.y, o.z, o.w};
            const float iv[8] = {i0.x, i0.y, i0.z, i0.w, i1.x, i1.y, i1.z, i1.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(ov[i], iv[j], acc[i][j]);
        }
        // The next chunk overwrites what slower warps may still be reading.
        __syncthreads();
    }

    // Explicit roundings (no contraction into an FMA with W): the update is
    // rounded to f32 once, identically for merge and unmerge, then added.
    // A thread's 8 columns are 16 bytes of a 16-bit W (32 of an f32 one):
    // one (two) 16-byte accesses per row when W allows them, so a warp
    // moves two full 256-byte row segments per instruction.
    const float scale = resolve_scale(p.scale);
    // 64-bit: with d_in near INT_MAX, col + 8 would wrap in 32 bits and pass
    // the bounds test below, touching elements past the row.
    const int64_t col = (int64_t)col0 + tx * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + ty * 4 + i;
        if (row >= p.d_out) break;
        T* wr = w + (int64_t)row * p.ld_w + col;
        float d[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) d[j] = __fmul_rn(scale, acc[i][j]);
        if (p.w_vec && col + 8 <= p.d_in) {
            add8_vec(wr, d);
        } else {
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                if (p.w_pair && col + j + 1 < p.d_in) {
                    const float2 v = load2(wr + j);
                    store2(wr + j, make_float2(__fadd_rn(v.x, d[j]), __fadd_rn(v.y, d[j + 1])));
                } else {
                    if (col + j < p.d_in) wr[j] = from_f32<T>(__fadd_rn(to_f32(wr[j]), d[j]));
                    if (col + j + 1 < p.d_in) wr[j + 1] = from_f32<T>(__fadd_rn(to_f32(wr[j + 1]), d[j + 1]));
                }
            }
        }
    }
}

}  // namespace singlora

#define SINGLORA_MERGE(tname, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(singlora::kThreads) merge_##tname(const singlora_merge_params p) { \
        singlora::merge_kernel<T>(p);                                                                     \
    }                                                                                                     \
    SINGLORA_KERNEL_INFO(merge_##tname, 0, SINGLORA_MERGE_BM, SINGLORA_MERGE_BN, SINGLORA_MAX_RANK)

SINGLORA_DTYPES(SINGLORA_MERGE)
