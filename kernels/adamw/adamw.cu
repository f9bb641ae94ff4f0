// adamw: one fused AdamW step over A, so a training loop never copies dA to
// the host. Elementwise with f32 moments; see singlora_adamw_params for the
// update (PyTorch's torch.optim.AdamW order of operations).
#include "common/elements.cuh"
#include "common/scale.cuh"

namespace singlora {

template <typename T>
__device__ __forceinline__ void adamw_kernel(const singlora_adamw_params& p) {
    T* a = reinterpret_cast<T*>(p.a);
    float* master = reinterpret_cast<float*>(p.master);
    const float* grad = reinterpret_cast<const float*>(p.grad);
    float* m = reinterpret_cast<float*>(p.m);
    float* v = reinterpret_cast<float*>(p.v);
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    float bias1 = p.bias1, bias2 = p.bias2;
    if (p.step != 0) {
        // The 1-based step of this update: steps taken so far, plus one.
        const unsigned long long t = *reinterpret_cast<const unsigned long long*>(p.step) + 1;
        bias1 = (float)(1.0 - powi((double)p.beta1, t));
        bias2 = (float)(1.0 - powi((double)p.beta2, t));
    }
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float g = p.grad_scale * grad[i];
        float x = master ? master[i] : to_f32(a[i]);
        x *= 1.0f - p.lr * p.weight_decay;
        const float mi = p.beta1 * m[i] + (1.0f - p.beta1) * g;
        const float vi = p.beta2 * v[i] + (1.0f - p.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        x -= p.lr * (mi / bias1) / (sqrtf(vi / bias2) + p.eps);
        if (master) master[i] = x;
        a[i] = from_f32<T>(x);
    }
}

}  // namespace singlora

#define SINGLORA_ADAMW(tname, T) SINGLORA_PLAIN_KERNEL(adamw, tname, T, singlora_adamw_params, singlora::adamw_kernel)
SINGLORA_DTYPES(SINGLORA_ADAMW)
