// Element types: conversions to and from f32, the per-type traits, the
// power-of-two scaling that keeps f16 operands in range, paired accesses.
#pragma once

#include "kernel.cuh"

namespace singlora {

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

// p[0..2) = v, or p[0..2) + v when `accumulate`, rounded once to T: the
// epilogues' paired store onto an output.
template <typename T> __device__ __forceinline__ void store2_onto(T* p, float2 v, bool accumulate) {
    if (accumulate) {
        const float2 old = load2(p);
        v.x += old.x;
        v.y += old.y;
    }
    store2(p, v);
}

// w[0..8) += d[0..8) with one rounding to T per element, as one (16-bit T)
// or two (f32) 16-byte accesses: the caller checked that w and its row stride
// allow them and that the 8 elements are inside the row.
template <typename T> __device__ __forceinline__ void add8_vec(T* w, const float* d) {
    constexpr int kChunks = 8 * (int)sizeof(T) / 16;
    uint4 raw[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) raw[c] = reinterpret_cast<const uint4*>(w)[c];
    T* v = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = from_f32<T>(__fadd_rn(to_f32(v[j]), d[j]));
#pragma unroll
    for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(w)[c] = raw[c];
}

}  // namespace singlora
