//! The C ABI (src/capi.rs, include/singlora.h).
//!
//! Everywhere (no GPU needed): every refusal's status code and the argument
//! its message names, negative dimensions and strides, null and misaligned
//! pointers, unknown dtypes, the no-driver / no-device path, a panic caught
//! at the boundary, the per-thread message, and the header: a C99 program
//! compiled against include/singlora.h with -pedantic -Werror, whose
//! prototypes are checked against the Rust functions' types (one table for
//! both), linked to the built libsinglora.so and run.
//!
//! On a GPU: forward, backward and merge through the C ABI give bitwise the
//! results of the Rust API; the caller's current context is restored; a
//! stream of another context is refused.
//!
//! Fake device pointers appear only in calls that are refused before any
//! device is touched, or that name a device ordinal no machine has.

mod common;

use std::ffi::{c_char, c_void, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;

use singlora::capi::*;
use singlora::{backward_workspace_len, Dims};

const F32: i32 = 0;
const F16: i32 = 1;
const BF16: i32 = 2;
/// A device ordinal no machine has: valid calls on it reach the device
/// check and stop there (no driver here, no such device on a GPU host).
const NO_SUCH_DEVICE: i32 = 1000;
/// A 256-byte aligned fake device address.
const P: u64 = 0x7f00_0000_0000;

fn last_error() -> String {
    // SAFETY: singlora_last_error never returns NULL, and the string lives
    // until the next singlora call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(singlora_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn status_name(code: i32) -> String {
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(singlora_status_name(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a refusal: the code, and a message naming `arg` in backticks.
#[track_caller]
fn assert_refused(code: i32, want: i32, arg: &str) {
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
fn assert_no_device(code: i32) {
    let msg = last_error();
    // SAFETY: only tries to dlopen libcuda.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if driver {
        assert_eq!(code, SINGLORA_ERROR_NO_DEVICE, "{msg}");
        assert!(msg.contains("no CUDA device with ordinal 1000"), "{msg}");
    } else {
        assert_eq!(code, SINGLORA_ERROR_NO_DRIVER, "{msg}");
        assert!(msg.contains("no CUDA driver"), "{msg}");
    }
}

// ------------------------------------------------------------ forward

#[derive(Clone, Copy, Debug)]
struct Fwd {
    dtype: i32,
    device: i32,
    tokens: i64,
    d_in: i64,
    d_out: i64,
    rank: i64,
    x: u64,
    ld_x: i64,
    a: u64,
    y: u64,
    ld_y: i64,
    s: u64,
    scale: f32,
    beta: f32,
    stream: usize,
}

/// Valid arguments (with fake pointers) on a device that does not exist.
fn fwd() -> Fwd {
    Fwd {
        dtype: BF16,
        device: NO_SUCH_DEVICE,
        tokens: 33,
        d_in: 96,
        d_out: 160,
        rank: 8,
        x: P,
        ld_x: 96,
        a: P + 0x10_0000,
        y: P + 0x20_0000,
        ld_y: 160,
        s: P + 0x30_0000,
        scale: 2.0,
        beta: 1.0,
        stream: 0,
    }
}

impl Fwd {
    fn call(&self) -> i32 {
        // SAFETY: only called with arguments that are refused before any
        // device access, or with a device ordinal that does not exist.
        unsafe {
            singlora_forward(
                self.dtype,
                self.device,
                self.tokens,
                self.d_in,
                self.d_out,
                self.rank,
                self.x,
                self.ld_x,
                self.a,
                self.y,
                self.ld_y,
                self.s,
                self.scale,
                self.beta,
                self.stream as *mut c_void,
            )
        }
    }
}

#[test]
fn forward_valid_arguments_reach_the_device_check() {
    assert_no_device(fwd().call());
    // S is optional; f32 and f16; tokens 0 allows null row pointers.
    assert_no_device(Fwd { s: 0, ..fwd() }.call());
    assert_no_device(
        Fwd {
            dtype: F32,
            ..fwd()
        }
        .call(),
    );
    assert_no_device(
        Fwd {
            dtype: F16,
            ..fwd()
        }
        .call(),
    );
    assert_no_device(
        Fwd {
            tokens: 0,
            x: 0,
            y: 0,
            s: 0,
            ..fwd()
        }
        .call(),
    );
    // Strides larger than the rows; the special stream handles.
    assert_no_device(
        Fwd {
            ld_x: 1000,
            ld_y: 333,
            ..fwd()
        }
        .call(),
    );
    assert_no_device(Fwd { stream: 1, ..fwd() }.call());
    assert_no_device(Fwd { stream: 2, ..fwd() }.call());
}

#[test]
fn forward_refusals_name_the_argument() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    let cases: Vec<(Fwd, i32, &str)> = vec![
        (
            Fwd {
                tokens: -1,
                ..fwd()
            },
            INVALID,
            "tokens",
        ),
        (Fwd { d_in: -96, ..fwd() }, INVALID, "d_in"),
        (Fwd { d_out: -1, ..fwd() }, INVALID, "d_out"),
        (Fwd { rank: -8, ..fwd() }, INVALID, "rank"),
        (Fwd { rank: 0, ..fwd() }, INVALID, "rank"),
        (Fwd { rank: 257, ..fwd() }, INVALID, "rank"),
        (Fwd { d_in: 0, ..fwd() }, INVALID, "d_in"),
        (Fwd { d_out: 0, ..fwd() }, INVALID, "d_out"),
        (
            Fwd {
                d_in: i64::MAX,
                ..fwd()
            },
            INVALID,
            "d_in",
        ),
        (Fwd { ld_x: -96, ..fwd() }, INVALID, "ld_x"),
        (Fwd { ld_x: 95, ..fwd() }, INVALID, "ld_x"),
        (Fwd { ld_y: 159, ..fwd() }, INVALID, "ld_y"),
        (Fwd { ld_y: -1, ..fwd() }, INVALID, "ld_y"),
        (Fwd { x: 0, ..fwd() }, INVALID, "x"),
        (Fwd { a: 0, ..fwd() }, INVALID, "a"),
        (Fwd { y: 0, ..fwd() }, INVALID, "y"),
        (
            Fwd {
                tokens: 0,
                a: 0,
                ..fwd()
            },
            INVALID,
            "a",
        ),
        (Fwd { x: P + 1, ..fwd() }, INVALID, "x"),
        (Fwd { a: P + 3, ..fwd() }, INVALID, "a"),
        (
            Fwd {
                dtype: F32,
                y: P + 2,
                ..fwd()
            },
            INVALID,
            "y",
        ),
        (Fwd { s: P + 2, ..fwd() }, INVALID, "s"),
        (
            Fwd {
                scale: f32::NAN,
                ..fwd()
            },
            INVALID,
            "scale",
        ),
        (
            Fwd {
                scale: f32::INFINITY,
                ..fwd()
            },
            INVALID,
            "scale",
        ),
        (Fwd { beta: 0.5, ..fwd() }, INVALID, "beta"),
        (
            Fwd {
                beta: -1.0,
                ..fwd()
            },
            INVALID,
            "beta",
        ),
        (
            Fwd {
                device: -1,
                ..fwd()
            },
            INVALID,
            "device",
        ),
        (
            Fwd { dtype: 3, ..fwd() },
            SINGLORA_ERROR_UNKNOWN_DTYPE,
            "dtype",
        ),
        (
            Fwd { dtype: -1, ..fwd() },
            SINGLORA_ERROR_UNKNOWN_DTYPE,
            "dtype",
        ),
    ];
    for (args, want, name) in cases {
        let code = args.call();
        let msg = last_error();
        assert_eq!(code, want, "{args:?}: {msg}");
        assert!(msg.contains(&format!("`{name}`")), "{args:?}: {msg}");
    }
    // The value given is in the message.
    Fwd {
        tokens: -5,
        ..fwd()
    }
    .call();
    assert!(last_error().contains("-5"), "{}", last_error());
    Fwd { dtype: 42, ..fwd() }.call();
    assert!(last_error().contains("42"), "{}", last_error());
}

// ------------------------------------------------------------ backward

#[derive(Clone, Copy, Debug)]
struct Bwd {
    dtype: i32,
    device: i32,
    tokens: i64,
    d_in: i64,
    d_out: i64,
    rank: i64,
    x: u64,
    ld_x: i64,
    g: u64,
    ld_g: i64,
    a: u64,
    saved_s: u64,
    scale: f32,
    dx: u64,
    ld_dx: i64,
    dx_beta: f32,
    da: u64,
    da_beta: f32,
    workspace: u64,
    workspace_bytes: u64,
    stream: usize,
}

fn ws_bytes(tokens: usize, d_in: usize, d_out: usize, rank: usize, saved_s: bool) -> u64 {
    let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
    backward_workspace_len(&dims, saved_s).unwrap() as u64 * 4
}

fn bwd() -> Bwd {
    Bwd {
        dtype: BF16,
        device: NO_SUCH_DEVICE,
        tokens: 33,
        d_in: 96,
        d_out: 160,
        rank: 8,
        x: P,
        ld_x: 96,
        g: P + 0x10_0000,
        ld_g: 160,
        a: P + 0x20_0000,
        saved_s: P + 0x30_0000,
        scale: 2.0,
        dx: P + 0x40_0000,
        ld_dx: 96,
        dx_beta: 0.0,
        da: P + 0x50_0000,
        da_beta: 1.0,
        workspace: P + 0x60_0000,
        workspace_bytes: ws_bytes(33, 96, 160, 8, true),
        stream: 0,
    }
}

impl Bwd {
    fn call(&self) -> i32 {
        // SAFETY: as for Fwd::call.
        unsafe {
            singlora_backward(
                self.dtype,
                self.device,
                self.tokens,
                self.d_in,
                self.d_out,
                self.rank,
                self.x,
                self.ld_x,
                self.g,
                self.ld_g,
                self.a,
                self.saved_s,
                self.scale,
                self.dx,
                self.ld_dx,
                self.dx_beta,
                self.da,
                self.da_beta,
                self.workspace,
                self.workspace_bytes,
                self.stream as *mut c_void,
            )
        }
    }
}

#[test]
fn backward_valid_arguments_reach_the_device_check() {
    assert_no_device(bwd().call());
    // No dX: its stride and beta are ignored.
    assert_no_device(
        Bwd {
            dx: 0,
            ld_dx: -7,
            dx_beta: 0.5,
            ..bwd()
        }
        .call(),
    );
    // No saved S needs the larger workspace.
    assert_no_device(
        Bwd {
            saved_s: 0,
            workspace_bytes: ws_bytes(33, 96, 160, 8, false),
            ..bwd()
        }
        .call(),
    );
    assert_no_device(
        Bwd {
            tokens: 0,
            x: 0,
            g: 0,
            saved_s: 0,
            dx: 0,
            workspace_bytes: ws_bytes(0, 96, 160, 8, false),
            ..bwd()
        }
        .call(),
    );
}

#[test]
fn backward_refusals_name_the_argument() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    let small = ws_bytes(33, 96, 160, 8, true);
    let cases: Vec<(Bwd, i32, &str)> = vec![
        (
            Bwd {
                tokens: -33,
                ..bwd()
            },
            INVALID,
            "tokens",
        ),
        (Bwd { d_in: -1, ..bwd() }, INVALID, "d_in"),
        (Bwd { d_out: -1, ..bwd() }, INVALID, "d_out"),
        (Bwd { rank: -1, ..bwd() }, INVALID, "rank"),
        (Bwd { rank: 300, ..bwd() }, INVALID, "rank"),
        (Bwd { ld_x: 10, ..bwd() }, INVALID, "ld_x"),
        (Bwd { ld_x: -1, ..bwd() }, INVALID, "ld_x"),
        (Bwd { ld_g: 100, ..bwd() }, INVALID, "ld_g"),
        (
            Bwd {
                ld_g: -100,
                ..bwd()
            },
            INVALID,
            "ld_g",
        ),
        (Bwd { ld_dx: 95, ..bwd() }, INVALID, "ld_dx"),
        (
            Bwd {
                ld_dx: -96,
                ..bwd()
            },
            INVALID,
            "ld_dx",
        ),
        (
            Bwd {
                dx_beta: 2.0,
                ..bwd()
            },
            INVALID,
            "dx_beta",
        ),
        (
            Bwd {
                da_beta: 0.5,
                ..bwd()
            },
            INVALID,
            "da_beta",
        ),
        (
            Bwd {
                scale: f32::NEG_INFINITY,
                ..bwd()
            },
            INVALID,
            "scale",
        ),
        (Bwd { x: 0, ..bwd() }, INVALID, "x"),
        (Bwd { g: 0, ..bwd() }, INVALID, "g"),
        (Bwd { a: 0, ..bwd() }, INVALID, "a"),
        (Bwd { da: 0, ..bwd() }, INVALID, "da"),
        (
            Bwd {
                workspace: 0,
                ..bwd()
            },
            INVALID,
            "workspace",
        ),
        (Bwd { g: P + 1, ..bwd() }, INVALID, "g"),
        (Bwd { dx: P + 1, ..bwd() }, INVALID, "dx"),
        (
            Bwd {
                saved_s: P + 2,
                ..bwd()
            },
            INVALID,
            "saved_s",
        ),
        (Bwd { da: P + 6, ..bwd() }, INVALID, "da"),
        (
            Bwd {
                workspace: P + 8,
                ..bwd()
            },
            INVALID,
            "workspace",
        ),
        (
            Bwd {
                workspace_bytes: small - 4,
                ..bwd()
            },
            INVALID,
            "workspace",
        ),
        // Without a saved S the workspace must hold S too.
        (
            Bwd {
                saved_s: 0,
                ..bwd()
            },
            INVALID,
            "workspace",
        ),
        (
            Bwd {
                device: -3,
                ..bwd()
            },
            INVALID,
            "device",
        ),
        (
            Bwd { dtype: 9, ..bwd() },
            SINGLORA_ERROR_UNKNOWN_DTYPE,
            "dtype",
        ),
    ];
    for (args, want, name) in cases {
        let code = args.call();
        let msg = last_error();
        assert_eq!(code, want, "{args:?}: {msg}");
        assert!(msg.contains(&format!("`{name}`")), "{args:?}: {msg}");
    }
    Bwd {
        workspace_bytes: small - 4,
        ..bwd()
    }
    .call();
    let msg = last_error();
    assert!(
        msg.contains(&format!("needs {small} bytes")) && msg.contains(&format!("{}", small - 4)),
        "{msg}"
    );
}

#[test]
fn workspace_size_matches_the_rust_query() {
    for (t, di, dout, r) in [
        (0, 1, 1, 1),
        (1, 4096, 4096, 16),
        (16384, 4096, 4096, 64),
        (77, 3424, 64, 64),
        (5, 40, 11, 7),
    ] {
        for saved in [true, false] {
            let mut bytes = 0u64;
            // SAFETY: `bytes` is a valid u64 to write.
            let code = unsafe {
                singlora_backward_workspace_size(
                    t as i64,
                    di as i64,
                    dout as i64,
                    r as i64,
                    saved as i32,
                    &mut bytes,
                )
            };
            assert_eq!(code, SINGLORA_OK, "{}", last_error());
            assert_eq!(last_error(), "");
            assert_eq!(bytes, ws_bytes(t, di, dout, r, saved));
            assert_eq!(bytes % 16, 0);
        }
    }
    let mut bytes = 0u64;
    // SAFETY: as above; the refused calls write nothing.
    unsafe {
        let code = singlora_backward_workspace_size(1, 2, 3, 4, 1, std::ptr::null_mut());
        assert_refused(code, SINGLORA_ERROR_INVALID_ARGUMENT, "out_bytes");
        let code = singlora_backward_workspace_size(-1, 2, 3, 4, 1, &mut bytes);
        assert_refused(code, SINGLORA_ERROR_INVALID_ARGUMENT, "tokens");
        let code = singlora_backward_workspace_size(1, 2, 3, 0, 1, &mut bytes);
        assert_refused(code, SINGLORA_ERROR_INVALID_ARGUMENT, "rank");
        let code = singlora_backward_workspace_size(1, 0, 3, 4, 1, &mut bytes);
        assert_refused(code, SINGLORA_ERROR_INVALID_ARGUMENT, "d_in");
        let code = singlora_backward_workspace_size(1, 2, -3, 4, 1, &mut bytes);
        assert_refused(code, SINGLORA_ERROR_INVALID_ARGUMENT, "d_out");
    }
    assert_eq!(bytes, 0, "a refused call wrote its output");
}

// ------------------------------------------------------------ merge

#[derive(Clone, Copy, Debug)]
struct Merge {
    dtype: i32,
    device: i32,
    d_in: i64,
    d_out: i64,
    rank: i64,
    w: u64,
    ld_w: i64,
    a: u64,
    scale: f32,
}

fn mrg() -> Merge {
    Merge {
        dtype: F16,
        device: NO_SUCH_DEVICE,
        d_in: 96,
        d_out: 160,
        rank: 8,
        w: P,
        ld_w: 96,
        a: P + 0x10_0000,
        scale: 2.0,
    }
}

impl Merge {
    fn call(&self, undo: bool) -> i32 {
        let f = if undo {
            singlora_unmerge
        } else {
            singlora_merge
        };
        // SAFETY: as for Fwd::call.
        unsafe {
            f(
                self.dtype,
                self.device,
                self.d_in,
                self.d_out,
                self.rank,
                self.w,
                self.ld_w,
                self.a,
                self.scale,
                std::ptr::null_mut(),
            )
        }
    }
}

#[test]
fn merge_and_unmerge_check_their_arguments() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    for undo in [false, true] {
        assert_no_device(mrg().call(undo));
        assert_no_device(Merge { ld_w: 200, ..mrg() }.call(undo));
        let cases: Vec<(Merge, i32, &str)> = vec![
            (Merge { d_in: -1, ..mrg() }, INVALID, "d_in"),
            (Merge { d_out: 0, ..mrg() }, INVALID, "d_out"),
            (Merge { rank: 0, ..mrg() }, INVALID, "rank"),
            (Merge { rank: -2, ..mrg() }, INVALID, "rank"),
            (Merge { ld_w: 95, ..mrg() }, INVALID, "ld_w"),
            (Merge { ld_w: -96, ..mrg() }, INVALID, "ld_w"),
            (Merge { w: 0, ..mrg() }, INVALID, "w"),
            (Merge { a: 0, ..mrg() }, INVALID, "a"),
            (Merge { w: P + 1, ..mrg() }, INVALID, "w"),
            (
                Merge {
                    scale: f32::NAN,
                    ..mrg()
                },
                INVALID,
                "scale",
            ),
            (
                Merge {
                    device: -1,
                    ..mrg()
                },
                INVALID,
                "device",
            ),
            (
                Merge { dtype: 5, ..mrg() },
                SINGLORA_ERROR_UNKNOWN_DTYPE,
                "dtype",
            ),
        ];
        for (args, want, name) in cases {
            let code = args.call(undo);
            let msg = last_error();
            assert_eq!(code, want, "{args:?} (undo {undo}): {msg}");
            assert!(msg.contains(&format!("`{name}`")), "{args:?}: {msg}");
        }
    }
}

// ------------------------------------------------- codes, messages, panics

#[test]
fn status_codes_are_distinct_and_named() {
    let mut codes: Vec<i32> = STATUS_NAMES.iter().map(|&(c, _)| c).collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), STATUS_NAMES.len());
    assert_eq!(codes, (0..STATUS_NAMES.len() as i32).collect::<Vec<_>>());
    for (code, name) in STATUS_NAMES {
        assert_eq!(status_name(code), name.to_str().unwrap());
    }
    assert_eq!(status_name(-1), "SINGLORA_UNKNOWN_STATUS");
    assert_eq!(status_name(10), "SINGLORA_UNKNOWN_STATUS");
}

#[test]
fn version_and_abi_version() {
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(singlora_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(singlora_abi_version(), SINGLORA_ABI_VERSION);
}

#[test]
fn init_reports_the_missing_device() {
    assert_no_device(singlora_init(NO_SUCH_DEVICE));
    assert_refused(singlora_init(-1), SINGLORA_ERROR_INVALID_ARGUMENT, "device");
    if let Err(e) = singlora::open_device(0) {
        // No usable GPU here: device 0 reports the same reason.
        let code = singlora_init(0);
        assert_ne!(code, SINGLORA_OK);
        assert_eq!(last_error(), e.to_string());
        let code = Fwd { device: 0, ..fwd() }.call();
        assert!(
            [
                SINGLORA_ERROR_NO_DRIVER,
                SINGLORA_ERROR_NO_DEVICE,
                SINGLORA_ERROR_UNSUPPORTED_DEVICE
            ]
            .contains(&code),
            "{}",
            last_error()
        );
    }
}

#[test]
fn a_panic_is_caught_at_the_boundary() {
    let code = ffi_guard_test(Some("deliberate test panic"));
    assert_eq!(code, SINGLORA_ERROR_PANIC);
    let msg = last_error();
    assert!(
        msg.contains("panicked") && msg.contains("deliberate test panic"),
        "{msg}"
    );
    // The next call clears the message.
    assert_eq!(ffi_guard_test(None), SINGLORA_OK);
    assert_eq!(last_error(), "");
}

#[test]
fn the_message_is_per_thread() {
    let code = Fwd { rank: 0, ..fwd() }.call();
    assert_eq!(code, SINGLORA_ERROR_INVALID_ARGUMENT);
    let mine = last_error();
    assert!(mine.contains("`rank`"), "{mine}");
    std::thread::spawn(|| {
        assert_eq!(last_error(), "", "a new thread starts with no message");
        Fwd { x: 0, ..fwd() }.call();
        assert!(last_error().contains("`x`"), "{}", last_error());
    })
    .join()
    .unwrap();
    assert_eq!(last_error(), mine, "another thread's call changed mine");
    // A successful call clears it.
    let mut bytes = 0u64;
    // SAFETY: `bytes` is a valid u64 to write.
    let code = unsafe { singlora_backward_workspace_size(1, 2, 3, 4, 0, &mut bytes) };
    assert_eq!(code, SINGLORA_OK);
    assert_eq!(last_error(), "");
}

// ------------------------------------------------------------ the header

/// The C ABI as one table: each function's Rust type is checked by the
/// compiler (a coercion to the fn-pointer type), and the same table, spelt
/// in C, is redeclared after `#include "singlora.h"`, where a C compiler
/// rejects any prototype that disagrees with the header's.
macro_rules! abi_table {
    ($( $name:ident ( $($arg:ident : $t:ident),* ) -> $ret:ident; )*) => {
        #[allow(dead_code)]
        fn rust_signatures_match() {
            $( let _: unsafe extern "C" fn($($t),*) -> $ret = $name; )*
        }
        fn c_prototypes() -> Vec<(&'static str, String)> {
            vec![$( (
                stringify!($name),
                {
                    let args: Vec<String> =
                        vec![$(format!("{} {}", c_type(stringify!($t)), stringify!($arg))),*];
                    let args = if args.is_empty() { "void".to_string() } else { args.join(", ") };
                    format!("{} {}({});", c_type(stringify!($ret)), stringify!($name), args)
                },
            ) ),*]
        }
    };
}

type Status = i32;
type Str = *const c_char;
type Stream = *mut c_void;
type U64Out = *mut u64;

fn c_type(rust: &str) -> &'static str {
    match rust {
        "i32" => "int32_t",
        "i64" => "int64_t",
        "u64" => "uint64_t",
        "f32" => "float",
        "Status" => "singlora_status",
        "Str" => "const char *",
        "Stream" => "void *",
        "U64Out" => "uint64_t *",
        other => panic!("no C spelling for {other}"),
    }
}

abi_table! {
    singlora_version() -> Str;
    singlora_abi_version() -> i32;
    singlora_last_error() -> Str;
    singlora_status_name(status: Status) -> Str;
    singlora_init(device: i32) -> Status;
    singlora_backward_workspace_size(tokens: i64, d_in: i64, d_out: i64, rank: i64,
        saved_s: i32, out_bytes: U64Out) -> Status;
    singlora_forward(dtype: i32, device: i32, tokens: i64, d_in: i64, d_out: i64, rank: i64,
        x: u64, ld_x: i64, a: u64, y: u64, ld_y: i64, s: u64, scale: f32, beta: f32,
        stream: Stream) -> Status;
    singlora_backward(dtype: i32, device: i32, tokens: i64, d_in: i64, d_out: i64, rank: i64,
        x: u64, ld_x: i64, g: u64, ld_g: i64, a: u64, saved_s: u64, scale: f32,
        dx: u64, ld_dx: i64, dx_beta: f32, da: u64, da_beta: f32,
        workspace: u64, workspace_bytes: u64, stream: Stream) -> Status;
    singlora_merge(dtype: i32, device: i32, d_in: i64, d_out: i64, rank: i64,
        w: u64, ld_w: i64, a: u64, scale: f32, stream: Stream) -> Status;
    singlora_unmerge(dtype: i32, device: i32, d_in: i64, d_out: i64, rank: i64,
        w: u64, ld_w: i64, a: u64, scale: f32, stream: Stream) -> Status;
}

/// Where the libsinglora.so built with this test is: next to it in cargo's
/// `deps` folder (or one folder up), or in `lib/` beside `bin/` in the GPU
/// bundle. The second field is true in a cargo build folder, where a missing
/// library or C compiler is a failure rather than a skip.
fn cdylib_dir() -> (Option<PathBuf>, bool) {
    let Some(exe) = std::env::current_exe().ok() else {
        return (None, false);
    };
    let Some(dir) = exe.parent() else {
        return (None, false);
    };
    let in_cargo = dir.file_name().is_some_and(|n| n == "deps");
    let up = dir.parent().unwrap_or(dir);
    let found = [dir.to_path_buf(), up.to_path_buf(), up.join("lib")]
        .into_iter()
        .find(|d| d.join("libsinglora.so").is_file());
    (found, in_cargo)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

const C_MAIN: &str = r#"
#include <stdio.h>
#include <string.h>

static int failures = 0;
#define EXPECT(cond) do { if (!(cond)) { printf("FAILED: %s (line %d)\n", #cond, __LINE__); failures++; } } while (0)

int main(void) {
    uint64_t bytes = 0;
    singlora_status st;
    EXPECT(strcmp(singlora_version(), EXPECTED_VERSION) == 0);
    EXPECT(singlora_abi_version() == SINGLORA_ABI_VERSION);
    EXPECT(strcmp(singlora_last_error(), "") == 0);
    EXPECT(strcmp(singlora_status_name(SINGLORA_ERROR_NO_DRIVER), "SINGLORA_ERROR_NO_DRIVER") == 0);

    st = singlora_backward_workspace_size(16384, 4096, 4096, 64, 1, &bytes);
    EXPECT(st == SINGLORA_OK);
    EXPECT(bytes == EXPECTED_WS_BYTES);

    /* a null x with tokens > 0: refused, naming `x` */
    st = singlora_forward(SINGLORA_DTYPE_BF16, 0, 16, 64, 64, 8, 0, 64, 0x10000, 0x20000, 64, 0,
                          1.0f, 1.0f, NULL);
    EXPECT(st == SINGLORA_ERROR_INVALID_ARGUMENT);
    EXPECT(strstr(singlora_last_error(), "`x`") != NULL);
    printf("forward(x = NULL): %s: %s\n", singlora_status_name(st), singlora_last_error());

    st = singlora_backward(77, 0, 16, 64, 64, 8, 0x10000, 64, 0x20000, 64, 0x30000, 0, 1.0f,
                           0, 0, 0.0f, 0x40000, 0.0f, 0x50000, 1u << 30, NULL);
    EXPECT(st == SINGLORA_ERROR_UNKNOWN_DTYPE);

    st = singlora_merge(SINGLORA_DTYPE_F16, 0, 64, 64, 8, 0x10000, -1, 0x20000, 1.0f, NULL);
    EXPECT(st == SINGLORA_ERROR_INVALID_ARGUMENT);
    EXPECT(strstr(singlora_last_error(), "`ld_w`") != NULL);

    /* valid arguments on a device that does not exist */
    st = singlora_unmerge(SINGLORA_DTYPE_F32, 1000, 64, 64, 8, 0x10000, 64, 0x20000, 1.0f, NULL);
    EXPECT(st == SINGLORA_ERROR_NO_DRIVER || st == SINGLORA_ERROR_NO_DEVICE);
    printf("unmerge(device 1000): %s: %s\n", singlora_status_name(st), singlora_last_error());
    st = singlora_init(1000);
    EXPECT(st == SINGLORA_ERROR_NO_DRIVER || st == SINGLORA_ERROR_NO_DEVICE);

    printf("%s\n", failures ? "C PROGRAM FAILED" : "C PROGRAM OK");
    return failures != 0;
}
"#;

#[test]
fn header_agrees_with_the_library_and_a_c_program_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = root.join("include/singlora.h");
    if !header.is_file() {
        // The GPU host runs this binary from the bundle, without the sources.
        println!("skipped: include/singlora.h is not on this machine (build machine only)");
        return;
    }
    let text = std::fs::read_to_string(&header).unwrap();

    // The header declares exactly the table's functions.
    let table = c_prototypes();
    // Every `singlora_<identifier>(` in the header, comments aside.
    let mut declared: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim_start) {
        if line.starts_with("/*") || line.starts_with('*') {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("singlora_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if tail[end..].trim_start().starts_with('(') {
                declared.push(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    declared.sort();
    declared.dedup();
    let mut names: Vec<String> = table.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(declared, names, "the header's functions vs the ABI table");

    // The library exports exactly those singlora_* symbols.
    let (dir, in_cargo) = cdylib_dir();
    let Some(dir) = dir else {
        assert!(
            !in_cargo,
            "libsinglora.so not found next to the test executable (Cargo.toml's crate-type \
             must list cdylib)"
        );
        println!("skipped: no libsinglora.so beside this test executable");
        return;
    };
    let lib = dir.join("libsinglora.so");
    if let Ok(out) = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
    {
        if out.status.success() {
            let mut exported: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().last())
                .filter(|s| s.starts_with("singlora_"))
                .map(str::to_string)
                .collect();
            exported.sort();
            assert_eq!(exported, names, "libsinglora.so's exports vs the ABI table");
        }
    }

    // A C99 program: the codes, the prototypes (redeclared from the table:
    // a disagreement with the header is a compile error), and calls.
    let tmp = std::env::temp_dir().join(format!("singlora-capi-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = String::from("#include \"singlora.h\"\n\n");
    c += "#define CHECK(name, cond) typedef char name[(cond) ? 1 : -1]\n";
    for (code, name) in STATUS_NAMES {
        let name = name.to_str().unwrap();
        c += &format!("CHECK(check_{name}, {name} == {code});\n");
    }
    for (name, value) in [
        (
            "SINGLORA_DTYPE_F32",
            singlora::params::singlora_dtype::SINGLORA_DTYPE_F32 as i32,
        ),
        (
            "SINGLORA_DTYPE_F16",
            singlora::params::singlora_dtype::SINGLORA_DTYPE_F16 as i32,
        ),
        (
            "SINGLORA_DTYPE_BF16",
            singlora::params::singlora_dtype::SINGLORA_DTYPE_BF16 as i32,
        ),
        ("SINGLORA_ABI_VERSION", SINGLORA_ABI_VERSION),
    ] {
        c += &format!("CHECK(check_{name}, {name} == {value});\n");
    }
    // Every table function must already be declared by the header (C99
    // has no implicit declarations) before the table's redeclarations.
    c += "typedef void (*any_function)(void);\nconst any_function every_function[] = {\n";
    for (name, _) in &table {
        c += &format!("    (any_function)&{name},\n");
    }
    c += "};\n";
    for (_, proto) in &table {
        c += proto;
        c += "\n";
    }
    c += &format!(
        "#define EXPECTED_VERSION \"{}\"\n#define EXPECTED_WS_BYTES {}ull\n",
        env!("CARGO_PKG_VERSION"),
        ws_bytes(16384, 4096, 4096, 64, true)
    );
    c += C_MAIN;
    let src = tmp.join("capi_check.c");
    std::fs::write(&src, &c).unwrap();
    let exe = tmp.join("capi_check");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    if !in_cargo && Command::new(&cc).arg("--version").output().is_err() {
        println!("skipped: no C compiler ({cc}) on this machine");
        return;
    }
    run(Command::new(&cc)
        .args([
            "-std=c99",
            "-pedantic",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wstrict-prototypes",
        ])
        .arg("-I")
        .arg(root.join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&dir)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-lsinglora"));
    let out = run(&mut Command::new(&exe));
    println!("{out}");
    assert!(out.contains("C PROGRAM OK"), "{out}");

    // The header also compiles as C++ (extern "C"), where a C++ compiler is.
    if Command::new("c++").arg("--version").output().is_ok() {
        let cpp = tmp.join("capi_check.cpp");
        std::fs::write(&cpp, "#include \"singlora.h\"\nint main() { return singlora_abi_version() != SINGLORA_ABI_VERSION; }\n").unwrap();
        run(Command::new("c++")
            .args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"])
            .arg("-I")
            .arg(root.join("include"))
            .arg(&cpp));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

// ------------------------------------------------------------ on a GPU

mod gpu {
    use super::*;
    use common::*;
    use cudarc::driver::{result as cu, CudaContext, CudaSlice, DevicePtr};
    use half::{bf16, f16};
    use singlora::{backward, forward, merge, unmerge, DType, DxOut};

    const SCALE: f32 = 0.75;

    fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&gpu.stream);
        p
    }

    fn stream(gpu: &Gpu) -> *mut c_void {
        gpu.stream.cu_stream() as *mut c_void
    }

    fn bits<T: DType>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<u64> {
        download(gpu, s).into_iter().map(f64::to_bits).collect()
    }

    /// Forward and backward through the C ABI equal the Rust API's, bit
    /// for bit (same kernels, same order), with strides and both betas.
    fn forward_backward<T: DType>(code: i32) {
        let Some(gpu) = gpu() else { return };
        let (tokens, d_in, d_out, rank, pad) = (77usize, 96usize, 160usize, 24usize, 5usize);
        let dims = Dims::new(tokens, d_in, d_out, rank).unwrap();
        let (ld_x, ld_y) = (d_in + pad, d_out + pad);
        let mut r = rng(11);
        let x = upload::<T>(&gpu, &randn(&mut r, (tokens - 1) * ld_x + d_in, 1.0));
        let a = upload::<T>(&gpu, &randn(&mut r, dims.a_len(), 0.1));
        let y0 = randn(&mut r, (tokens - 1) * ld_y + d_out, 1.0);
        let g = upload::<T>(&gpu, &randn(&mut r, (tokens - 1) * ld_y + d_out, 1.0));

        // Rust API.
        let mut y_r = upload::<T>(&gpu, &y0);
        let mut s_r = poisoned::<f32>(&gpu, dims.s_len());
        forward(
            &gpu.stream,
            &dims,
            &x,
            ld_x,
            &a,
            &mut y_r,
            ld_y,
            Some(&mut s_r),
            SCALE,
            1.0,
        )
        .unwrap();
        let mut dx_r = poisoned::<T>(&gpu, (tokens - 1) * ld_x + d_in);
        let mut da_r = poisoned::<f32>(&gpu, dims.a_len());
        let mut ws_r = poisoned::<f32>(&gpu, backward_workspace_len(&dims, true).unwrap());
        backward(
            &gpu.stream,
            &dims,
            &x,
            ld_x,
            &g,
            ld_y,
            &a,
            Some(&s_r),
            SCALE,
            Some(DxOut {
                dx: &mut dx_r,
                ld_dx: ld_x,
                beta: 0.0,
            }),
            &mut da_r,
            0.0,
            &mut ws_r,
        )
        .unwrap();

        // C ABI on the same stream.
        let y_c = upload::<T>(&gpu, &y0);
        let s_c = poisoned::<f32>(&gpu, dims.s_len());
        let dx_c = poisoned::<T>(&gpu, (tokens - 1) * ld_x + d_in);
        let da_c = poisoned::<f32>(&gpu, dims.a_len());
        let ws_len = backward_workspace_len(&dims, true).unwrap();
        let ws_c = poisoned::<f32>(&gpu, ws_len);
        let (t, di, dout, rk) = (tokens as i64, d_in as i64, d_out as i64, rank as i64);
        // SAFETY: every pointer addresses a live buffer of the size the
        // arguments describe, on device 0's primary context; `stream` is the
        // harness's stream of that context; the buffers outlive the
        // downloads below, which synchronise.
        unsafe {
            let st = singlora_forward(
                code,
                0,
                t,
                di,
                dout,
                rk,
                ptr(&gpu, &x),
                ld_x as i64,
                ptr(&gpu, &a),
                ptr(&gpu, &y_c),
                ld_y as i64,
                ptr(&gpu, &s_c),
                SCALE,
                1.0,
                stream(&gpu),
            );
            assert_eq!(st, SINGLORA_OK, "{}", last_error());
            let st = singlora_backward(
                code,
                0,
                t,
                di,
                dout,
                rk,
                ptr(&gpu, &x),
                ld_x as i64,
                ptr(&gpu, &g),
                ld_y as i64,
                ptr(&gpu, &a),
                ptr(&gpu, &s_c),
                SCALE,
                ptr(&gpu, &dx_c),
                ld_x as i64,
                0.0,
                ptr(&gpu, &da_c),
                0.0,
                ptr(&gpu, &ws_c),
                ws_len as u64 * 4,
                stream(&gpu),
            );
            assert_eq!(st, SINGLORA_OK, "{}", last_error());
        }
        assert!(bits(&gpu, &y_c) == bits(&gpu, &y_r), "{} y", T::NAME);
        assert!(bits(&gpu, &s_c) == bits(&gpu, &s_r), "{} S", T::NAME);
        let strip = |v: Vec<f64>| unstride(&v, tokens, d_in, ld_x);
        assert!(
            strip(download(&gpu, &dx_c))
                .iter()
                .zip(strip(download(&gpu, &dx_r)))
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{} dX",
            T::NAME
        );
        assert!(bits(&gpu, &da_c) == bits(&gpu, &da_r), "{} dA", T::NAME);
        assert!(!download(&gpu, &da_c).iter().any(|v| v.is_nan()));
        let q = |ws: &CudaSlice<f32>| download(&gpu, ws)[..dims.s_len()].to_vec();
        assert!(q(&ws_c) == q(&ws_r), "{} Q", T::NAME);

        // The NULL (legacy default) stream works too.
        let y_n = upload::<T>(&gpu, &y0);
        gpu.stream.synchronize().unwrap();
        // SAFETY: as above; the legacy stream is synchronised before reading.
        unsafe {
            let st = singlora_forward(
                code,
                0,
                t,
                di,
                dout,
                rk,
                ptr(&gpu, &x),
                ld_x as i64,
                ptr(&gpu, &a),
                ptr(&gpu, &y_n),
                ld_y as i64,
                0,
                SCALE,
                1.0,
                std::ptr::null_mut(),
            );
            assert_eq!(st, SINGLORA_OK, "{}", last_error());
        }
        gpu.ctx.synchronize().unwrap();
        assert!(
            bits(&gpu, &y_n) == bits(&gpu, &y_r),
            "{} y (NULL stream)",
            T::NAME
        );
    }

    #[test]
    fn capi_forward_backward_equal_the_rust_api_f32() {
        forward_backward::<f32>(F32);
    }

    #[test]
    fn capi_forward_backward_equal_the_rust_api_f16() {
        forward_backward::<f16>(F16);
    }

    #[test]
    fn capi_forward_backward_equal_the_rust_api_bf16() {
        forward_backward::<bf16>(BF16);
    }

    #[test]
    fn capi_merge_unmerge_equal_the_rust_api() {
        let Some(gpu) = gpu() else { return };
        let (d_in, d_out, rank, ld_w) = (200usize, 130usize, 16usize, 208usize);
        let dims = Dims::new(0, d_in, d_out, rank).unwrap();
        let mut r = rng(5);
        let w0 = randn(&mut r, (d_out - 1) * ld_w + d_in, 1.0);
        let a = upload::<bf16>(&gpu, &randn(&mut r, dims.a_len(), 0.1));
        let mut w_r = upload::<bf16>(&gpu, &w0);
        let w_c = upload::<bf16>(&gpu, &w0);
        merge(&gpu.stream, &dims, &mut w_r, ld_w, &a, SCALE).unwrap();
        let call = |f: unsafe extern "C" fn(
            i32,
            i32,
            i64,
            i64,
            i64,
            u64,
            i64,
            u64,
            f32,
            *mut c_void,
        ) -> i32| {
            // SAFETY: w_c and a are live buffers of the described shapes on
            // device 0's primary context, on the harness's stream.
            let st = unsafe {
                f(
                    BF16,
                    0,
                    d_in as i64,
                    d_out as i64,
                    rank as i64,
                    ptr(&gpu, &w_c),
                    ld_w as i64,
                    ptr(&gpu, &a),
                    SCALE,
                    stream(&gpu),
                )
            };
            assert_eq!(st, SINGLORA_OK, "{}", last_error());
        };
        call(singlora_merge);
        assert!(bits(&gpu, &w_c) == bits(&gpu, &w_r), "merge");
        unmerge(&gpu.stream, &dims, &mut w_r, ld_w, &a, SCALE).unwrap();
        call(singlora_unmerge);
        assert!(bits(&gpu, &w_c) == bits(&gpu, &w_r), "unmerge");
    }

    #[test]
    fn capi_restores_the_callers_current_context() {
        let Some(_gpu) = gpu() else { return };
        // SAFETY: unbinding the thread's context is always valid.
        unsafe { cu::ctx::set_current(std::ptr::null_mut()) }.unwrap();
        assert_eq!(singlora_init(0), SINGLORA_OK, "{}", last_error());
        assert_eq!(cu::ctx::get_current().unwrap(), None);
    }

    #[test]
    fn capi_refuses_a_stream_of_another_context() {
        let Some(gpu) = gpu() else { return };
        let other = CudaContext::new_non_primary(0, 0).unwrap();
        let foreign = other.new_stream().unwrap();
        let dims = Dims::new(4, 32, 32, 8).unwrap();
        let x = upload::<bf16>(&gpu, &vec![1.0; 4 * 32]);
        let a = upload::<bf16>(&gpu, &vec![1.0; dims.a_len()]);
        let y = upload::<bf16>(&gpu, &vec![1.0; 4 * 32]);
        // SAFETY: the buffers are live on device 0's primary context; the
        // call is refused before any launch.
        let st = unsafe {
            singlora_forward(
                BF16,
                0,
                4,
                32,
                32,
                8,
                ptr(&gpu, &x),
                32,
                ptr(&gpu, &a),
                ptr(&gpu, &y),
                32,
                0,
                1.0,
                0.0,
                foreign.cu_stream() as *mut c_void,
            )
        };
        assert_refused(st, SINGLORA_ERROR_INVALID_ARGUMENT, "stream");
        assert!(
            download(&gpu, &y).iter().all(|&v| v == 1.0),
            "a refused call wrote y"
        );
    }
}
