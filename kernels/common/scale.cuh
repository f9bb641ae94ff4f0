// The scale and the optimizer step as the kernels read them: by value, from
// a device f32, or derived from a device step counter (so a captured CUDA
// graph replays the ramp correctly). The f64 operations mirror the host's
// (src/nn/ramp.rs, src/ops/adamw.rs) one for one, so both sides give the
// same bits.
#pragma once

#include "kernel.cuh"

namespace singlora {

__device__ __forceinline__ float resolve_scale(const singlora_scale& s) {
    float v;
    if (s.ptr != 0) {
        v = *reinterpret_cast<const float*>(s.ptr);
    } else if (s.step != 0) {
        const double t = (double)*reinterpret_cast<const unsigned long long*>(s.step);
        const double u = s.warmup == 0 ? 1.0 : fmin(t / (double)s.warmup, 1.0);
        v = (float)(s.alpha_over_rank * u);
    } else {
        v = s.value;
    }
    return v * s.sign;
}

// x^n by binary powering (n >= 1): the exact sequence of f64 products the
// host's adamw::powi makes.
__device__ __forceinline__ double powi(double x, unsigned long long n) {
    double r = 1.0;
    while (n != 0) {
        if (n & 1) r *= x;
        n >>= 1;
        if (n != 0) x *= x;
    }
    return r;
}

}  // namespace singlora
