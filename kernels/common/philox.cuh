// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As
// Easy as 1, 2, 3", SC11; the Random123 library's philox4x32 with 10
// rounds) and the dropout mask's element-to-counter mapping.
//
// One header for device and host: the kernels include it under nvcc, and
// tests/philox.rs compiles it as plain host C++ (g++/clang++) to prove that
// it computes the same words as the Rust generator of src/dropout.rs, which
// is itself checked against Random123's known-answer vectors. Plain C++11,
// no CUDA header needed off the device.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SINGLORA_HD __host__ __device__ __forceinline__
#else
#define SINGLORA_HD inline
#endif

namespace singlora {

struct Philox4 {
    uint32_t v[4];
};

// The Random123 constants (philox.h: PHILOX_M4x32_0/1, PHILOX_W32_0/1).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

SINGLORA_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1) -> 4 words.
// Round: (hi0, lo0) = M0·c0, (hi1, lo1) = M1·c2,
//        c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
// the key is bumped by (W0, W1) before every round after the first.
SINGLORA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                  uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += kPhiloxW0;
            k1 += kPhiloxW1;
        }
        const uint32_t hi0 = philox_mulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
        const uint32_t hi1 = philox_mulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    Philox4 out = {{c0, c1, c2, c3}};
    return out;
}

// The dropout mapping (kernels/params.h, singlora_dropout): the four words
// of the mask of elements (token, 4·col4 + j), j = 0..3, of the dropped
// matrix (X in the forward and dA, dX's adapter term in the backward):
//   key     = (seed lo32, seed hi32)
//   counter = (col4, token lo32, offset lo32, offset hi32)
// Element (token, col) keeps iff word col % 4 of (token, col / 4) is
// >= the threshold. token < 2^32 (the host refuses more tokens).
SINGLORA_HD Philox4 dropout_words(uint64_t seed, uint64_t offset, uint32_t token, uint32_t col4) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#if defined(__CUDA_ARCH__)
    // Opaque to the optimiser, so the key schedule stays at the call (ten
    // adds) instead of being hoisted out of the caller's loops, where its
    // twenty words would hold registers for the whole kernel (and cost
    // occupancy even when dropout is off).
    asm volatile("" : "+r"(k0), "+r"(k1));
#endif
    return philox4x32_10(col4, token, (uint32_t)offset, (uint32_t)(offset >> 32), k0, k1);
}

}  // namespace singlora
