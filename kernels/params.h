/* The one header host and device share.
 *
 * The kernels include it, and build.rs runs bindgen over it to produce the
 * Rust side (src/params.rs includes the result), so a launch-parameter struct
 * or a tiling constant cannot disagree between the two.
 *
 * Plain C only: stdint types, device pointers as uint64_t (a CUdeviceptr),
 * every struct passed to a kernel by value.
 */
#ifndef SINGLORA_PARAMS_H
#define SINGLORA_PARAMS_H

#include <stdint.h>

/* Largest adapter rank the kernels accept. */
#define SINGLORA_MAX_RANK 256
/* Rank is padded (with zeros, on chip) to a multiple of this: the mma.sync
 * m16n8k16 k extent, and two n8 tiles. */
#define SINGLORA_RANK_ALIGN 16
/* ---------------------------------------------------------------- the kernel list
 * The one list of kernels, as X-macros. The .cu files instantiate from them,
 * and build.rs parses them (plain text, one entry per line as written here)
 * into the host's typed registry (src/runtime/registry.rs), so a kernel's
 * name, element types and rank buckets are spelled once.
 *
 * Element types: X(name, device type). */
#define SINGLORA_DTYPES(X) \
    X(f32, float)          \
    X(f16, __half)         \
    X(bf16, __nv_bfloat16)

/* Rank buckets: kernels are instantiated for these rank capacities; a rank
 * runs in the smallest bucket that holds it. Four buckets keep the build at a
 * dozen instantiations per ranked family. X(tname, T, bucket). */
#define SINGLORA_RANK_BUCKETS(X, tname, T) \
    X(tname, T, 32)                        \
    X(tname, T, 64)                        \
    X(tname, T, 128)                       \
    X(tname, T, 256)
/* The decode-size forward exists for ranks up to 64 only. */
#define SINGLORA_DECODE_RANK_BUCKETS(X, tname, T) \
    X(tname, T, 32)                               \
    X(tname, T, 64)
/* The small configurations, for devices that grant SINGLORA_SMALL_SMEM_BYTES
 * of shared memory per block (sm_86, sm_89): only the buckets whose regular
 * configuration needs more (the kernel-quality tests check both claims from
 * the kernels' published sizes). */
#define SINGLORA_SMALL_FORWARD_RANK_BUCKETS(X, tname, T) \
    X(tname, T, 256)
#define SINGLORA_SMALL_DA_RANK_BUCKETS(X, tname, T) \
    X(tname, T, 128)                                \
    X(tname, T, 256)
/* The fused backward exists for ranks up to 32 (its dA rows live in
 * registers, 2·bucket f32 per thread and term). */
#define SINGLORA_BACKWARD_FUSED_RANK_BUCKETS(X, tname, T) \
    X(tname, T, 16)                                       \
    X(tname, T, 32)

/* The element types of the tensor-core-only families. X(name, device type). */
#define SINGLORA_MMA_DTYPES(X) \
    X(f16, __half)             \
    X(bf16, __nv_bfloat16)
#define SINGLORA_BF16_DTYPES(X) \
    X(bf16, __nv_bfloat16)
/* The TMA forward's rank buckets: A's rows (rank × 2 bytes) fit one
 * swizzled TMA box (at most 128 bytes). */
#define SINGLORA_FORWARD_TMA_RANK_BUCKETS(X, tname, T) \
    X(tname, T, 32)                                    \
    X(tname, T, 64)

/* Kernel families: X(name, dtypes, buckets). A kernel is named
 * name[_<dtype>][_r<bucket>]: dtypes, the name of one of the element-type
 * lists above, adds the element type (one kernel per type listed), NONE
 * adds nothing; buckets, the name of one of the bucket lists above, adds
 * the rank bucket, NONE adds nothing. A family whose name ends in _sm90 is sm_90a code: it lives in its
 * own translation unit (kernels/<family>/*_sm90.cu), compiled for sm_90a
 * alone, and is absent from the module on every other GPU (the host then
 * takes the portable path). A family whose name ends in _small is the same
 * kernel in a configuration that fits SINGLORA_SMALL_SMEM_BYTES, which the
 * host takes where the regular one does not fit. The fused backward is
 * bf16 alone: f16 would need S and Q scaled into range per column over a
 * whole token range (the split path's dA kernel does that), and f32 runs on
 * CUDA cores, where the split path is the one to keep. */
#define SINGLORA_FAMILIES(X)                                                        \
    X(fill, NONE, NONE)                                                             \
    X(forward, SINGLORA_DTYPES, SINGLORA_RANK_BUCKETS)                              \
    X(forward_small, SINGLORA_DTYPES, SINGLORA_SMALL_FORWARD_RANK_BUCKETS)          \
    X(forward_decode_sm90, SINGLORA_DTYPES, SINGLORA_DECODE_RANK_BUCKETS)           \
    X(forward_tma_sm90, SINGLORA_MMA_DTYPES, SINGLORA_FORWARD_TMA_RANK_BUCKETS)     \
    X(backward_da_partial, SINGLORA_DTYPES, SINGLORA_RANK_BUCKETS)                  \
    X(backward_da_partial_small, SINGLORA_DTYPES, SINGLORA_SMALL_DA_RANK_BUCKETS)   \
    X(backward_da_reduce, NONE, NONE)                                               \
    X(backward_fused_sm90, SINGLORA_BF16_DTYPES, SINGLORA_BACKWARD_FUSED_RANK_BUCKETS) \
    X(merge, SINGLORA_DTYPES, NONE)                                                 \
    X(merge_mma, SINGLORA_DTYPES, NONE)                                             \
    X(adamw, SINGLORA_DTYPES, NONE)                                                 \
    X(step_advance, NONE, NONE)                                                     \
    X(mse, SINGLORA_DTYPES, NONE)

/* The shared memory per block of the smallest devices the kernels serve
 * (sm_86 and sm_89 grant 99 KiB): every rank must have a configuration of
 * each family that fits it. */
#define SINGLORA_SMALL_SMEM_BYTES (99 * 1024)

/* Every kernel runs 256 threads (8 warps) per block. */
#define SINGLORA_THREADS 256
/* Token rows per block of the forward (shrink-expand) kernel: 64 rows give
 * 256 blocks at 16k tokens, two to three per SM, while the L2 re-reads of A
 * stay below the HBM traffic for ranks up to 64. */
#define SINGLORA_FORWARD_BM 64
/* Decode-size forward on sm_90 (tokens <= SINGLORA_FORWARD_BM, ranks of SINGLORA_DECODE_RANK_BUCKETS):
 * a thread-block cluster of this many blocks splits the shrink's reduction
 * over d_in and sums the partial S tiles through distributed shared memory,
 * in a fixed order. */
#define SINGLORA_DECODE_CLUSTER 8

/* Rows of dA (a band of d) per block of the dA partial kernel. */
#define SINGLORA_DA_BD 128
/* The dA partial kernel is split over token ranges so that about this many
 * (band, split) blocks run per part; each split covers at least
 * SINGLORA_DA_MIN_SPLIT_TOKENS tokens. The split count follows from Dims
 * alone (never from the device), so the workspace size and the summation
 * order, hence dA's bits, are the same on every GPU. */
#define SINGLORA_DA_TARGET_BLOCKS 256
#define SINGLORA_DA_MIN_SPLIT_TOKENS 256

/* The TMA forward on sm_90a (forward_tma_sm90; opt-in until a GPU run
 * proves it): the tiles of `in`, A and `out` are boxes of
 * SINGLORA_FORWARD_TMA_BOX columns (128 bytes of a 16-bit row) by
 * SINGLORA_FORWARD_BM rows (in, out) or SINGLORA_FORWARD_TMA_BOX rows (A,
 * whose box is rank-bucket columns wide), copied by the bulk tensor engine
 * with a swizzle of the box row's width. */
#define SINGLORA_FORWARD_TMA_BOX 64

/* The fused backward on sm_90a (backward_fused_sm90; opt-in until a
 * GPU run proves it): a thread-block cluster of SINGLORA_BACKWARD_FUSED_CLUSTER
 * CTAs spans d for one block of token rows at a time. CTA q owns the columns
 * [q·band, (q+1)·band) of d_out (of G; band of d_out) and of d_in (of X and
 * dX; band of d_in), each band ⌈d / CLUSTER⌉ rounded up to 64 and at most
 * SINGLORA_BACKWARD_FUSED_BAND, so d_in, d_out <= CLUSTER × BAND. The tokens are cut into
 * ⌈tokens / SINGLORA_BACKWARD_FUSED_MIN_CLUSTER_TOKENS⌉ ranges, at most
 * SINGLORA_BACKWARD_FUSED_MAX_CLUSTERS, one dA partial each: a count that
 * follows from Dims alone, so dA's bits do not depend on the GPU. The grid
 * is persistent: as many clusters as the device holds at once (the host
 * asks the driver), each taking ranges blockIdx.y, blockIdx.y + gridDim.y,
 * ... */
#define SINGLORA_BACKWARD_FUSED_CLUSTER 8
#define SINGLORA_BACKWARD_FUSED_BAND 512
#define SINGLORA_BACKWARD_FUSED_MAX_CLUSTERS 16
#define SINGLORA_BACKWARD_FUSED_MIN_CLUSTER_TOKENS 256

/* What a kernel tells the host about its own launch shape: every kernel
 * `name` has a __constant__ `name_info` of this type, read once when the
 * module is loaded, so tile sizes live only in the .cu files. */
typedef struct singlora_kernel_info {
    uint32_t smem_bytes;     /* dynamic shared memory per block */
    uint32_t block_rows;     /* token rows (forward) or dA rows (dA) per block */
    uint32_t block_cols;     /* output columns per expand step (forward) */
    uint32_t rank_cap;       /* largest rank the instantiation holds */
} singlora_kernel_info;

/* Element type codes. */
enum singlora_dtype {
    SINGLORA_DTYPE_F32 = 0,
    SINGLORA_DTYPE_F16 = 1,
    SINGLORA_DTYPE_BF16 = 2
};

/* Where a kernel takes the SingLoRA scale from, resolved when it runs:
 *   ptr != 0:  *ptr, a device f32 (e.g. a framework's scale tensor);
 *   step != 0: alpha_over_rank * min(t / warmup, 1) with t = *step, a device
 *              count of optimizer steps (u64); computed in f64 and rounded
 *              once to f32, the same operations as the host's Ramp::scale,
 *              so both give the same bits; warmup 0 means u = 1;
 *   neither:   value, computed on the host.
 * The result is multiplied by sign (+1, or -1 for unmerge; exact). A
 * captured CUDA graph that reads the scale from the device replays correctly
 * as the ramp advances; a by-value scale stays the one it was captured with. */
typedef struct singlora_scale {
    uint64_t ptr;            /* const float *, or 0 */
    uint64_t step;           /* const uint64_t *, or 0 */
    double alpha_over_rank;
    uint64_t warmup;
    float value;
    float sign;
} singlora_scale;

/* Adapter dropout (PEFT's lora_dropout): the adapter sees
 * drop(X) = M ⊙ X / (1 − p), M ~ Bernoulli(1 − p) per element; the frozen
 * path sees X. M is never stored: every kernel that needs it regenerates it
 * from Philox4x32-10 (kernels/common/philox.cuh; the host's twin is
 * src/dropout.rs), keyed by (seed, offset) and the element's (token, column):
 *
 *   key     = (seed lo32, seed hi32)
 *   counter = (column / 4, token lo32, offset lo32, offset hi32)
 *   word    = output word (column % 4) of Philox4x32-10(counter, key)
 *   keep    = word >= threshold
 *
 * token is the row of X (0-based in the call; tokens <= 2^32 when p > 0,
 * which the host checks), column the column of X (of d_in). One Philox call
 * serves four consecutive columns of a row. threshold is the u32 nearest
 * p·2^32 (saturated at 2^32 − 1), computed once on the host, so the keep
 * probability is 1 − threshold/2^32 = 1 − p to within 2^-33; threshold 0
 * means dropout is off (p = 0, or p < 2^-33), and the kernels then do no
 * mask work at all (bitwise the undropped path). scale = 1/(1 − p),
 * computed on the host in f64 and rounded once to f32; the kernels apply it
 * to f32 results (S, dA's Xᵀ·Q partials, dX's adapter term), never to the
 * element-typed inputs, so masking itself is exact.
 * The same (seed, offset) must be passed to the forward and its backward;
 * a training loop advances offset once per forward (SingLoraLinear does). */
typedef struct singlora_dropout {
    uint64_t seed;
    uint64_t offset;
    uint32_t threshold;      /* keep iff word >= threshold; 0: off */
    float scale;             /* 1 / (1 − p), f32 */
} singlora_dropout;

/* Fused shrink-expand over token rows:
 *   s_out = in · A[:k_dim]                (tokens × rank, f32)
 *   out   = beta·out + scale · s_out · A[:n_dim]ᵀ
 * Forward: in = X, k_dim = d_in, n_dim = d_out, out = Y, s_out = S.
 * Backward dX: in = G, k_dim = d_out, n_dim = d_in, out = dX, s_out = Q.
 * out == 0 runs the shrink alone (S or Q without an expand).
 * Dropout (threshold != 0), by dropout_out:
 *   0: in is dropped: s_out = drop(in) · A[:k_dim] (forward S; the backward's
 *      recomputed S), mask by (token, column of k_dim);
 *   1: out's adapter term is masked: out = beta·out + M ⊙ (scale · s_out ·
 *      A[:n_dim]ᵀ) / (1 − p) (backward dX, k_dim = d_out), mask by (token,
 *      column of n_dim = d_in); s_out (Q) is not dropped. */
typedef struct singlora_forward_params {
    uint64_t in;             /* T, tokens × k_dim, row stride ld_in */
    uint64_t a;              /* T, D × rank, contiguous */
    uint64_t out;            /* T, tokens × n_dim, row stride ld_out; 0: none */
    uint64_t s_out;          /* f32, tokens × rank, contiguous; 0: not stored */
    int64_t tokens;
    int64_t ld_in;           /* elements */
    int64_t ld_out;          /* elements */
    int32_t k_dim;
    int32_t n_dim;
    int32_t rank;
    int32_t cols_per_block;  /* expand columns per block (grid.y splits n_dim) */
    singlora_scale scale;
    float beta;              /* 0: overwrite out (never read), 1: add into it */
    int32_t in_vec;          /* 1: in and ld_in allow 16-byte loads */
    int32_t out_vec;         /* 1: out and ld_out allow 16-byte accesses */
    int32_t a_vec;           /* 1: A rows allow 16-byte loads */
    int32_t dropout_out;     /* 0: dropout on in; 1: on out's adapter term */
    singlora_dropout dropout;
} singlora_forward_params;

/* A CUtensorMap (cuda.h) as the host encodes it (cuTensorMapEncodeTiled):
 * 128 opaque bytes, 128-byte aligned (CUDA 13's alignment; 12's is 64). */
typedef struct __attribute__((aligned(128))) singlora_tensor_map {
    uint64_t opaque[16];
} singlora_tensor_map;

/* The TMA forward (forward_tma_sm90, f16/bf16, rank <= 64, sm_90a): the
 * portable kernel's math and parameters (p; out != 0, no dropout) with its
 * three operands also described as tensor maps, passed by value (a
 * __grid_constant__ parameter):
 *   in_map     in,        dims {k_dim, tokens}, row pitch ld_in, box {BOX, BM}, 128 B swizzle
 *   a_in_map   A[:k_dim], dims {rank, k_dim}, row pitch rank, box {bucket, BOX}, swizzle of
 *              bucket × 2 B (the shrink's; rows past k_dim read zeros, as the portable kernel's)
 *   a_out_map  A[:n_dim], the same over n_dim rows (the expand's)
 *   out_map    out,       dims {n_dim, tokens}, row pitch ld_out, box {BOX, BM}, 128 B swizzle
 * Boxes past a tensor's edge read zeros and write nothing. */
typedef struct __attribute__((aligned(128))) singlora_forward_tma_params {
    singlora_tensor_map in_map;
    singlora_tensor_map a_in_map;
    singlora_tensor_map a_out_map;
    singlora_tensor_map out_map;
    singlora_forward_params p;
} singlora_forward_tma_params;

/* dA partials: part 0 is Gᵀ·S into rows [0, d_out), part 1 is Xᵀ·Q into rows
 * [0, d_in). Block (band, split, part) writes its f32 partial for rows
 * band·BD.. and tokens split·tokens_per_split.. into
 * partial[((part·splits + split)·D + row)·rank_pad + col].
 * Dropout (threshold != 0): part 1 uses drop(X) (X's tiles are masked by
 * (token, column of d_in) once in shared memory, and the partial is scaled
 * by 1/(1 − p) in f32); s must then be the dropped forward's S. */
typedef struct singlora_da_params {
    uint64_t x;              /* T, tokens × d_in, row stride ld_x */
    uint64_t g;              /* T, tokens × d_out, row stride ld_g */
    uint64_t s;              /* f32, tokens × rank (saved S = X·A_in) */
    uint64_t q;              /* f32, tokens × rank (Q = G·A_out) */
    uint64_t partial;        /* f32 workspace, 2 × splits × D × rank_pad */
    uint64_t da;             /* f32, D × rank */
    int64_t tokens;
    int64_t ld_x;
    int64_t ld_g;
    int64_t tokens_per_split;
    int32_t d_in;
    int32_t d_out;
    int32_t d;               /* D = max(d_in, d_out) */
    int32_t rank;
    int32_t rank_pad;
    int32_t splits;
    singlora_scale scale;
    float da_beta;           /* 0: overwrite dA (never read), 1: accumulate */
    int32_t x_vec;
    int32_t g_vec;
    int32_t pad_;
    singlora_dropout dropout;
} singlora_da_params;

/* The fused backward (sm_90a, bf16, rank <= 32), one pass over G and X:
 *   Q  = G · A[:d_out],  S = drop(X) · A[:d_in]   (f32, never leave the chip
 *        but for Q's copy in q)
 *   dX = dx_beta·dX + scale · M ⊙ (Q · A[:d_in]ᵀ) / (1 − p)   (dx != 0)
 *   partial[((0·clusters + c)·D + row)·rank_pad + col] = (Gᵀ·S)[row, col]
 *   partial[((1·clusters + c)·D + row)·rank_pad + col] = (drop(X)ᵀ·Q)[row, col]
 * over range c's tokens [c·tokens_per_cluster, (c+1)·tokens_per_cluster):
 * the layout of singlora_da_params's partials with splits = clusters, which
 * backward_da_reduce sums. S is always formed on chip from the X tiles (the
 * dA pass reads them anyway), so a saved S is not read. */
typedef struct singlora_backward_fused_params {
    uint64_t x;              /* T, tokens × d_in, row stride ld_x */
    uint64_t g;              /* T, tokens × d_out, row stride ld_g */
    uint64_t a;              /* T, D × rank, contiguous */
    uint64_t dx;             /* T, tokens × d_in, row stride ld_dx; 0: none */
    uint64_t q;              /* f32, tokens × rank */
    uint64_t partial;        /* f32, 2 × clusters × D × rank_pad */
    int64_t tokens;
    int64_t ld_x;
    int64_t ld_g;
    int64_t ld_dx;
    int64_t tokens_per_cluster;
    int32_t d_in;
    int32_t d_out;
    int32_t d;               /* D = max(d_in, d_out) */
    int32_t rank;
    int32_t rank_pad;
    int32_t clusters;        /* token ranges (gridDim.y clusters take them) */
    singlora_scale scale;
    float dx_beta;           /* 0: overwrite dX (never read), 1: add into it */
    int32_t x_vec;           /* 1: x and ld_x allow 16-byte loads */
    int32_t g_vec;
    int32_t a_vec;           /* 1: A rows allow 16-byte loads */
    int32_t dx_pair;         /* 1: dx and ld_dx allow 2-element accesses */
    int32_t scatter;         /* how a step's partial Q and S are summed: 0, every CTA
                                sums all of them from the cluster's buffers; 1, each
                                sums 1/CLUSTER of them and writes the sums into every
                                CTA (1/CLUSTER of the remote reads, one more cluster
                                barrier). The same order either way: the same bits. */
    int32_t pad_;
    singlora_dropout dropout;
} singlora_backward_fused_params;

/* The smoke kernel: every element of out (n elements of elem_bytes = 2 or 4)
 * is set to the bit pattern `bits`. Proves the module loads and launches;
 * tests also use it to poison outputs with NaN, for any dtype, before a launch. */
typedef struct singlora_fill_params {
    uint64_t out;
    uint64_t n;
    uint32_t bits;
    int32_t elem_bytes;
} singlora_fill_params;

/* Tile of the merge kernel: a block folds a MERGE_BM × MERGE_BN tile of W,
 * each thread 4 rows × 8 columns (8 columns = one 16-byte bf16/f16 access),
 * reading the A rows it needs through shared memory in MERGE_BK-rank chunks. */
#define SINGLORA_MERGE_BM 64
#define SINGLORA_MERGE_BN 128
#define SINGLORA_MERGE_BK 32

/* merge / unmerge: W = W + scale · A[:d_out] · A[:d_in]ᵀ in place (unmerge
 * passes -scale). The product is summed in f32 over rank in a fixed order
 * and rounded once (to f32) before the one rounding of the add, so merge
 * then unmerge differ from W by at most that rounding. */
typedef struct singlora_merge_params {
    uint64_t w;              /* T, d_out × d_in, row stride ld_w */
    uint64_t a;              /* T, D × rank, contiguous */
    int64_t ld_w;            /* elements */
    int32_t d_in;
    int32_t d_out;
    int32_t rank;
    int32_t w_pair;          /* 1: w and ld_w allow 2-element accesses */
    int32_t w_vec;           /* 1: w and ld_w allow 16-byte accesses */
    int32_t pad_;
    singlora_scale scale;    /* sign -1 for unmerge */
} singlora_merge_params;

/* AdamW over the n elements of A (PyTorch's torch.optim.AdamW semantics):
 *   p  = p · (1 - lr·weight_decay)
 *   m  = beta1·m + (1 - beta1)·g,   v = beta2·v + (1 - beta2)·g²,  g = grad_scale·grad
 *   p  = p - lr · (m / bias1) / (sqrt(v / bias2) + eps)
 * p is the f32 master copy when `master` is set (A then receives p rounded
 * to T), else A itself read as f32. bias1 = 1 - beta1^t and bias2 =
 * 1 - beta2^t for the 1-based step t, in f64 and rounded once to f32: given
 * by value (computed on the host), or, when step != 0, computed by the
 * kernel from t = *step + 1 (a device count of optimizer steps taken, which
 * step_advance then increments) with the same f64 operations as the host
 * (binary powering, the same multiplications in the same order:
 * kernels/common/scale.cuh and src/ops/adamw.rs), so both give the same bits. */
typedef struct singlora_adamw_params {
    uint64_t a;              /* T, n */
    uint64_t master;         /* f32, n; 0: A is its own master */
    uint64_t grad;           /* f32, n (dA) */
    uint64_t m;              /* f32, n */
    uint64_t v;              /* f32, n */
    uint64_t n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float grad_scale;
    float bias1;
    float bias2;
    uint64_t step;           /* const uint64_t *, or 0: use bias1 / bias2 */
} singlora_adamw_params;

/* step_advance: *step += 1 (one thread), after the optimizer step that read
 * it, in stream order; a separate launch so that no block of the optimizer
 * can see the new value. */
typedef struct singlora_step_params {
    uint64_t step;           /* uint64_t * */
} singlora_step_params;

/* Blocks of the mse_grad kernel (grid-stride; each block writes one partial
 * sum, which the host adds in a fixed order). */
#define SINGLORA_MSE_BLOCKS 512

/* Mean squared error of a prediction, and its gradient:
 *   grad = (2 / count) · (pred - target)      (T, same strides as pred)
 *   partial[block] = Σ over the block's elements of (pred - target)²  (f32)
 * over a rows × cols matrix (row strides ld); count = rows · cols. */
typedef struct singlora_mse_params {
    uint64_t pred;           /* T */
    uint64_t target;         /* T */
    uint64_t grad;           /* T; 0: not written */
    uint64_t partial;        /* f32, SINGLORA_MSE_BLOCKS */
    int64_t rows;
    int64_t cols;
    int64_t ld_pred;
    int64_t ld_target;
    int64_t ld_grad;
    float grad_factor;       /* 2 / count, computed on the host */
    int32_t pad_;
} singlora_mse_params;

#endif /* SINGLORA_PARAMS_H */
