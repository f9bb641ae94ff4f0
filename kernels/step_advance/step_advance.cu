// step_advance: advances a device optimizer-step counter by one. Launched
// after the optimizer step that read the counter (stream order), so a
// captured training step replays with the ramp and AdamW's bias corrections
// moving on, and no host read of the counter is ever needed.
#include "common/kernel.cuh"

extern "C" __global__ void __launch_bounds__(singlora::kThreads, 1) step_advance(const singlora_step_params p) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *reinterpret_cast<unsigned long long*>(p.step) += 1;
}
SINGLORA_KERNEL_INFO(step_advance, 0, 0, 0, 0)
