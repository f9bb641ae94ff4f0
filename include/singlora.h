/* singlora.h: the C ABI of libsinglora (fused CUDA kernels for SingLoRA).
 *
 * The one source of the ABI: build.rs generates the Rust status and dtype
 * constants from its #defines, and tests/capi/header.rs parses it and holds
 * the Rust exports (src/ffi/), the built library's symbols and the
 * Python ctypes table (python/singlora/_lib.py) to every prototype and code;
 * a C99 program is compiled against it (-pedantic -Werror) and run.
 *
 * SingLoRA adapts a frozen weight W0 (d_out x d_in, the nn.Linear
 * orientation) with one matrix A (D x rank, D = max(d_in, d_out)):
 *
 *     W = W0 + scale * A[:d_out] * A[:d_in]^T
 *
 * and these functions run the adapter path without ever forming the
 * d_out x d_in update:
 *
 *     forward    S  = X * A[:d_in]            (tokens x rank, f32, saved)
 *                Y  = beta*Y + scale * S * A[:d_out]^T
 *     backward   Q  = G * A[:d_out]
 *                dX = dx_beta*dX + scale * Q * A[:d_in]^T
 *                dA = da_beta*dA + scale * (G^T S into rows :d_out
 *                                           + X^T Q into rows :d_in)
 *     merge      W  = W + scale * A[:d_out] * A[:d_in]^T   (unmerge: minus)
 *
 * Conventions, the same for every function:
 *
 *  - Matrices are row-major. Dimensions and row strides are int64_t counts
 *    of elements (a negative value is refused, naming the argument). A row
 *    stride may exceed the row (a column slice of a wider matrix); A, dA, S
 *    and the workspace are contiguous.
 *  - Device pointers are uint64_t (a CUdeviceptr, or a cudaMalloc /
 *    torch data_ptr() value) on the device `device` (its ordinal). They must
 *    be aligned to their element size (the workspace to 16 bytes).
 *  - dtype is one of SINGLORA_DTYPE_*: the type of X, Y, G, dX, A and W.
 *    S, Q, dA and the workspace are always f32; every reduction runs in f32.
 *  - Every function returns a status (SINGLORA_OK or SINGLORA_ERROR_*). On
 *    failure singlora_last_error() gives a message naming the argument, with
 *    what was expected and what was given. Every argument is checked before
 *    anything is enqueued; a refused call touches no output and needs no GPU.
 *  - No panic or exception crosses this boundary (SINGLORA_ERROR_PANIC).
 *  - Devices are used through their primary context, the one the CUDA
 *    runtime (and PyTorch) uses, opened once per ordinal. A call puts back
 *    the calling thread's current context if it had one; a thread that had
 *    none is left with the device's primary context current (as the CUDA
 *    runtime would make it on first use).
 *  - `stream` is a CUstream (or cudaStream_t) of that primary context. NULL
 *    is the legacy default stream (as in the driver API; PyTorch's default
 *    stream is NULL); CU_STREAM_LEGACY and CU_STREAM_PER_THREAD are
 *    accepted; a stream of another context is refused.
 *  - Launches only enqueue work on `stream`: no allocation, no
 *    synchronisation, so they can be captured in a CUDA graph - except the
 *    first call on a device, which loads the kernels and synchronises once
 *    (call singlora_init() before a capture). Inputs must stay valid and
 *    outputs unread until the work completes on `stream`; ordering against
 *    other streams is the caller's. An output that overlaps any other
 *    argument (exact aliasing included, as far as pointers and extents
 *    show it) is refused with SINGLORA_ERROR_INVALID_ARGUMENT naming both.
 *  - The functions are thread-safe.
 */
#ifndef SINGLORA_API_H
#define SINGLORA_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes; singlora_abi_version() returns
 * the library's. They must be equal. Version 4: singlora_backward takes the
 * kernels to run (SINGLORA_BACKWARD_*). Version 3: every launch takes its
 * scale as a value and a device pointer (scale_ptr, 0 = the value),
 * replacing version 2's separate _dscale functions, and the forward and
 * backward take the adapter's dropout. */
#define SINGLORA_ABI_VERSION 4

/* Status codes. */
typedef int32_t singlora_status;
#define SINGLORA_OK 0
/* A dimension, stride, scalar or pointer is out of range, the workspace is
 * too small, or an output overlaps another argument's memory (or a range
 * wraps past the end of the address space); the message names the
 * argument. */
#define SINGLORA_ERROR_INVALID_ARGUMENT 1
/* dtype is not one of SINGLORA_DTYPE_*. */
#define SINGLORA_ERROR_UNKNOWN_DTYPE 2
/* libcuda could not be loaded: no NVIDIA driver on this machine. */
#define SINGLORA_ERROR_NO_DRIVER 3
/* The driver is present but there is no device with that ordinal. */
#define SINGLORA_ERROR_NO_DEVICE 4
/* The device is older than compute capability 8.0. */
#define SINGLORA_ERROR_UNSUPPORTED_DEVICE 5
/* The kernel for this dtype and rank needs more shared memory per block
 * than the device grants (sm_86 and sm_89 run ranks up to 64). */
#define SINGLORA_ERROR_SHARED_MEMORY 6
/* A CUDA driver call failed (the message carries the driver's error). */
#define SINGLORA_ERROR_CUDA 7
/* This build of the library embeds no kernels (a documentation build), or
 * none for this device (a build without its architecture). */
#define SINGLORA_ERROR_NO_KERNELS 8
/* A bug inside the library was caught at the boundary; please report it. */
#define SINGLORA_ERROR_PANIC 9

/* Element type codes (the values of kernels/params.h's enum singlora_dtype). */
#define SINGLORA_DTYPE_F32 0
#define SINGLORA_DTYPE_F16 1
#define SINGLORA_DTYPE_BF16 2

/* The library version, e.g. "0.1.0": a static string. */
const char *singlora_version(void);

/* The library's ABI version (compare with SINGLORA_ABI_VERSION). */
int32_t singlora_abi_version(void);

/* The message of the last failed singlora call on the calling thread, or ""
 * when that call succeeded. Never NULL. Valid until the next singlora call
 * on the same thread (other than singlora_last_error, singlora_version,
 * singlora_abi_version and singlora_status_name); copy it to keep it. */
const char *singlora_last_error(void);

/* The name of a status code ("SINGLORA_ERROR_NO_DRIVER"), or
 * "SINGLORA_UNKNOWN_STATUS": a static string, never NULL. */
const char *singlora_status_name(singlora_status status);

/* Opens device `device` (its primary context) and loads the kernels into
 * it, synchronising the device once. Optional (the first launch does the
 * same); call it before capturing launches in a CUDA graph. Returns
 * SINGLORA_ERROR_NO_DRIVER, _NO_DEVICE or _UNSUPPORTED_DEVICE where the
 * machine cannot run the kernels. */
singlora_status singlora_init(int32_t device);

/* Writes to *out_bytes the workspace size singlora_backward needs, in bytes:
 * saved_s nonzero when a saved S will be passed, zero when S is recomputed.
 * O(tokens*rank + splits*D*rank), never O(d_in*d_out). Needs no GPU. */
singlora_status singlora_backward_workspace_size(int64_t tokens, int64_t d_in, int64_t d_out,
                                                 int64_t rank, int32_t saved_s,
                                                 uint64_t *out_bytes);

/* The scale. Every launch takes the SingLoRA scale s = (alpha / rank) *
 * min(step / T, 1) in one of two ways:
 *   scale_ptr == 0   `scale` by value; it must be finite.
 *   scale_ptr != 0   a 4-byte aligned device float on `device` (e.g. a
 *                    framework's scale tensor, computed on the device from
 *                    its step), read when the kernels run and valid until the
 *                    work completes; `scale` is then ignored. Misaligned is
 *                    refused; its finiteness cannot be checked before the
 *                    launch. A captured CUDA graph of such a call follows the
 *                    scale as it changes (a by-value scale stays the one it
 *                    was captured with). */

/* Dropout (PEFT's lora_dropout). The adapter sees drop(X) = M (.) X / (1 - p)
 * and the frozen path X itself:
 *   S = drop(X) * A[:d_in];  dA[:d_in] += scale * drop(X)^T Q;
 *   dX += M (.) (scale * Q * A[:d_in]^T) / (1 - p).
 * M is regenerated from Philox4x32-10, never stored: element (t, c) of X is
 * kept iff word c % 4 of Philox4x32-10(counter = (c / 4, t, offset lo32,
 * offset hi32), key = (seed lo32, seed hi32)) is at least the u32 nearest
 * p * 2^32. dropout_p in [0, 1) (0: no dropout, bitwise the undropped path);
 * a forward and its backward take the same (p, seed, offset); a training
 * loop advances the offset once per forward. With p > 0, tokens <= 2^32.
 * singlora_dropout_mask writes M on the host, the same bits. */

/* Forward:  S = X * A[:d_in];  Y = beta*Y + scale * S * A[:d_out]^T.
 *   x      dtype, tokens x d_in, row stride ld_x >= d_in
 *   a      dtype, D x rank, contiguous (D = max(d_in, d_out)); rank 1..256
 *   y      dtype, tokens x d_out, row stride ld_y >= d_out
 *   s      f32, tokens x rank, contiguous: S for the backward; 0 = not stored
 *   scale, scale_ptr   the SingLoRA scale (alpha / rank) * min(step / T, 1):
 *          see "The scale" above
 *   beta   0 (Y is overwritten and never read) or 1 (added onto, e.g. onto
 *          the frozen layer's output X * W0^T)
 *   dropout_p, dropout_seed, dropout_offset   adapter dropout: see "Dropout"
 *          above (dropout_p 0: none)
 * tokens may be 0 (a no-op; x and y may then be 0). */
singlora_status singlora_forward(int32_t dtype, int32_t device, int64_t tokens, int64_t d_in,
                                 int64_t d_out, int64_t rank, uint64_t x, int64_t ld_x,
                                 uint64_t a, uint64_t y, int64_t ld_y, uint64_t s, float scale,
                                 uint64_t scale_ptr, float beta, double dropout_p,
                                 uint64_t dropout_seed, uint64_t dropout_offset, void *stream);

/* Which kernels singlora_backward runs (its `kernel`); both meet the same
 * error bars and give dA bitwise reproducibly, with different bits.
 * The default: Q and dX, then dA's partials and their reduction; every
 * device and shape (G is read twice). */
#define SINGLORA_BACKWARD_SPLIT 0
/* One pass over G and X where it applies (bf16, rank <= 32, d_in and
 * d_out <= 4096, tokens > 0, on a compute capability 9.0 device that grants
 * its shared memory and holds one of its clusters), the split kernels
 * elsewhere. Opt-in until a GPU run proves it correct and faster. */
#define SINGLORA_BACKWARD_FUSED 1

/* Backward of the forward above, given G = dL/dY:
 *   Q  = G * A[:d_out]                    (f32; left in the workspace's first
 *                                          tokens*rank floats on completion)
 *   dX = dx_beta*dX + scale * Q * A[:d_in]^T           (when dx is not 0)
 *   dA = da_beta*dA + scale * (G^T S into rows :d_out + X^T Q into rows :d_in)
 *        (bitwise reproducible: no atomics, a fixed summation order)
 *   x          dtype, tokens x d_in, ld_x (the forward's input)
 *   g          dtype, tokens x d_out, ld_g
 *   a          dtype, D x rank, contiguous
 *   saved_s    f32, tokens x rank: the forward's S; 0 = recompute it
 *   dx         dtype, tokens x d_in, ld_dx; 0 = no input gradient (ld_dx and
 *              dx_beta are then ignored)
 *   dx_beta, da_beta   0 (overwrite) or 1 (accumulate)
 *   da         f32, D x rank, contiguous
 *   workspace  16-byte aligned, workspace_bytes >= singlora_backward_
 *              workspace_size(..., saved_s != 0, ...) bytes
 *   dropout_p, dropout_seed, dropout_offset   the forward's: X is dropped
 *              in X^T Q (and in S when it is recomputed), dX's adapter term
 *              masked and scaled by 1/(1 - p)
 *   kernel     SINGLORA_BACKWARD_SPLIT or SINGLORA_BACKWARD_FUSED (above)
 * tokens may be 0 (x, g, saved_s may then be 0; dA = da_beta*dA). */
singlora_status singlora_backward(int32_t dtype, int32_t device, int64_t tokens, int64_t d_in,
                                  int64_t d_out, int64_t rank, uint64_t x, int64_t ld_x,
                                  uint64_t g, int64_t ld_g, uint64_t a, uint64_t saved_s,
                                  float scale, uint64_t scale_ptr, uint64_t dx, int64_t ld_dx,
                                  float dx_beta,
                                  uint64_t da, float da_beta, uint64_t workspace,
                                  uint64_t workspace_bytes, double dropout_p,
                                  uint64_t dropout_seed, uint64_t dropout_offset, int32_t kernel,
                                  void *stream);

/* The dropout mask M of a tokens x cols matrix (see "Dropout"), on the host
 * (no device is touched): keep[t * cols + c] = 1 where element (t, c) is kept,
 * 0 where dropped; `keep` holds tokens * cols bytes. */
singlora_status singlora_dropout_mask(double dropout_p, uint64_t dropout_seed,
                                      uint64_t dropout_offset, int64_t tokens, int64_t cols,
                                      uint8_t *keep);

/* Merge the adapter into the frozen weight in place, for inference:
 *   W = W + scale * A[:d_out] * A[:d_in]^T
 *   w   dtype, d_out x d_in (the nn.Linear weight), row stride ld_w >= d_in
 *   a   dtype, D x rank, contiguous */
singlora_status singlora_merge(int32_t dtype, int32_t device, int64_t d_in, int64_t d_out,
                               int64_t rank, uint64_t w, int64_t ld_w, uint64_t a, float scale,
                               uint64_t scale_ptr, void *stream);

/* Undo singlora_merge with the same arguments:
 *   W = W - scale * A[:d_out] * A[:d_in]^T
 * (each element returns to within one rounding of its value before). */
singlora_status singlora_unmerge(int32_t dtype, int32_t device, int64_t d_in, int64_t d_out,
                                 int64_t rank, uint64_t w, int64_t ld_w, uint64_t a, float scale,
                                 uint64_t scale_ptr, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* SINGLORA_API_H */
