//! The C ABI (src/ffi/, include/singlora.h), split by concern:
//!
//! * refusals.rs (no GPU needed): every refusal's status code and the
//!   argument its message names, negative dimensions and strides, null,
//!   misaligned and overlapping pointers, unknown dtypes, the no-driver /
//!   no-device path, a panic caught at the boundary, the per-thread message.
//! * header.rs (no GPU needed): include/singlora.h is the one source of the
//!   ABI; it is parsed, and the Rust exports, the library's symbols, the
//!   status and dtype tables and the Python ctypes table are held to it; a
//!   C99 program is compiled against it, linked to libsinglora.so and run.
//! * gpu.rs: forward, backward and merge through the C ABI give bitwise the
//!   results of the Rust API; the caller's current context is restored; a
//!   stream of another context is refused.
//!
//! Fake device pointers appear only in calls that are refused before any
//! device is touched, or that name a device ordinal no machine has.

#[path = "../common/mod.rs"]
mod common;
mod gpu;
mod header;
mod refusals;

pub(crate) use common::capi::{Bwd, Fwd, Launch, Merge};

use std::ffi::CStr;

use singlora::ffi::*;
use singlora::{backward_workspace_len, DType, Dims};

/// The dtype codes, from the element types (held to the header's by header.rs).
pub(crate) const F32: i32 = <f32 as DType>::CODE as i32;
pub(crate) const F16: i32 = <half::f16 as DType>::CODE as i32;
pub(crate) const BF16: i32 = <half::bf16 as DType>::CODE as i32;
/// A device ordinal no machine has: valid calls on it reach the device
/// check and stop there (no driver here, no such device on a GPU host).
pub(crate) const NO_SUCH_DEVICE: i32 = 1000;
/// A 256-byte aligned fake device address.
pub(crate) const P: u64 = 0x7f00_0000_0000;

pub(crate) fn last_error() -> String {
    // SAFETY: singlora_last_error never returns NULL, and the string lives
    // until the next singlora call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(singlora_last_error()) }
        .to_string_lossy()
        .into_owned()
}

pub(crate) fn status_name(code: i32) -> String {
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(singlora_status_name(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a refusal: the code, and a message naming `arg` in backticks.
#[track_caller]
pub(crate) fn assert_refused(code: i32, want: i32, arg: &str) {
    let msg = last_error();
    assert_eq!(
        code,
        want,
        "expected {} naming `{arg}`, got {} ({msg})",
        status_name(want),
        status_name(code)
    );
    assert!(
        msg.contains(&format!("`{arg}`")),
        "the message should name `{arg}`: {msg}"
    );
}

/// Asserts that a call with valid arguments reached the device check on a
/// device that does not exist (no driver here; no such ordinal elsewhere).
#[track_caller]
pub(crate) fn assert_no_device(code: i32) {
    let msg = last_error();
    let driver = singlora::runtime::device::driver_present();
    if driver {
        assert_eq!(code, SINGLORA_ERROR_NO_DEVICE, "{msg}");
        assert!(msg.contains("no CUDA device with ordinal 1000"), "{msg}");
    } else {
        assert_eq!(code, SINGLORA_ERROR_NO_DRIVER, "{msg}");
        assert!(msg.contains("no CUDA driver"), "{msg}");
    }
}

/// Bytes of workspace the Rust query gives for these dims.
pub(crate) fn ws_bytes(
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    saved_s: bool,
) -> u64 {
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    backward_workspace_len(&dims, saved_s).unwrap() as u64 * 4
}
