//! The C ABI: `extern "C"` functions over raw device pointers, declared for C
//! in `include/singlora.h`, the one source of the ABI (tests/capi/header.rs
//! parses it and holds these exports, the status and dtype tables and the
//! Python ctypes table to it; a C99 program is compiled against it).
//!
//! Split by concern: [`status`] (codes, the thread-local message, the panic
//! guard), `args` (turning C arguments into checked Rust values), `context`
//! (primary contexts and borrowed streams), [`exports`] (queries and set-up)
//! and one module per operation's launches ([`forward`], [`backward`], [`merge`]).
//!
//! Conventions, the same for every function:
//!
//! * Each returns a status code (`SINGLORA_OK` = 0, else one of the
//!   `SINGLORA_ERROR_*` codes below) and, on failure, leaves a message in a
//!   thread-local buffer read with [`singlora_last_error`]. Every call except
//!   the getters clears that message first.
//! * Every argument is validated before anything is enqueued: negative
//!   dimensions or strides, null required pointers, misaligned pointers,
//!   unknown dtype codes, non-finite scales, betas other than 0 and 1 are
//!   refused with `SINGLORA_ERROR_INVALID_ARGUMENT` (or
//!   `SINGLORA_ERROR_UNKNOWN_DTYPE`) and a message naming the argument. A
//!   refused call touches no output and needs no GPU.
//! * No panic crosses the boundary: every body runs under `catch_unwind`,
//!   and a panic becomes `SINGLORA_ERROR_PANIC` with its message.
//! * Devices are opened through their **primary context** (the one the CUDA
//!   runtime, hence PyTorch, uses), once per ordinal and kept for the life of
//!   the process. A call puts back the calling thread's current context if
//!   it had one; a thread that had none keeps the primary context current.
//! * `stream` is a `CUstream` of that primary context (a `cudaStream_t` of
//!   the runtime is the same thing). `NULL` means the legacy default stream,
//!   as in the driver API (PyTorch's default stream reports 0);
//!   `CU_STREAM_LEGACY` (0x1) and `CU_STREAM_PER_THREAD` (0x2) are accepted.
//!   A stream of another context is refused. The launch functions only
//!   enqueue (no allocation, no synchronisation) — except the first call on a
//!   device, which loads the kernels and synchronises once; call
//!   [`singlora_init`] first when the calls will be captured in a CUDA graph.

mod args;
pub mod backward;
mod context;
pub mod exports;
pub mod forward;
pub mod merge;
pub mod status;

pub use backward::*;
pub use exports::*;
pub use forward::*;
pub use merge::*;
pub use status::*;
