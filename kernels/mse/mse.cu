// mse: the mean-squared-error loss of a prediction and its gradient, the
// loss of examples/finetune.rs, kept on the device so a training step never
// copies activations to the host.
//
// Block b walks rows b, b + gridDim.x, ... with its threads across the
// columns (no 64-bit division per element), writes the gradient, and reduces
// its squared errors in a fixed order (shuffle tree, then warp sums in warp
// order) into partial[b]; the host adds the partials in order. The loss is
// therefore bitwise reproducible.
#include "common/elements.cuh"

namespace singlora {

template <typename T>
__device__ __forceinline__ void mse_kernel(const singlora_mse_params& p) {
    __shared__ float warp_sums[kWarps];
    const T* pred = reinterpret_cast<const T*>(p.pred);
    const T* target = reinterpret_cast<const T*>(p.target);
    T* grad = reinterpret_cast<T*>(p.grad);
    float sum = 0.0f;
    for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* pr = pred + r * p.ld_pred;
        const T* tr = target + r * p.ld_target;
        for (int64_t c = threadIdx.x; c < p.cols; c += kThreads) {
            const float diff = to_f32(pr[c]) - to_f32(tr[c]);
            sum = fmaf(diff, diff, sum);
            if (grad) grad[r * p.ld_grad + c] = from_f32<T>(p.grad_factor * diff);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < kWarps; ++i) total += warp_sums[i];
        reinterpret_cast<float*>(p.partial)[blockIdx.x] = total;
    }
}

}  // namespace singlora

#define SINGLORA_MSE(tname, T) SINGLORA_PLAIN_KERNEL(mse, tname, T, singlora_mse_params, singlora::mse_kernel)
SINGLORA_DTYPES(SINGLORA_MSE)
