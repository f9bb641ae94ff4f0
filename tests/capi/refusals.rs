//! Refusals: every argument check of the C ABI, on fake pointers, with no
//! GPU needed (valid calls stop at the device check of a device that does
//! not exist).

use std::ffi::c_void;

use singlora::ffi::*;

use crate::*;

/// The calls of this file: on fake pointers, and every one either refused
/// before any device access or naming a device ordinal that does not exist.
trait Call: Launch {
    fn call(&self) -> i32 {
        // SAFETY: see the trait: no call here reaches a device.
        unsafe { self.launch() }
    }
}

impl<A: Launch> Call for A {}

/// Asserts each `(arguments, code, argument named)`: `call` returns the code
/// and the message names the argument in backticks (`note` follows the
/// arguments in a failure's message).
fn assert_each_refused<A: std::fmt::Debug>(
    cases: Vec<(A, i32, &str)>,
    call: impl Fn(&A) -> i32,
    note: &str,
) {
    for (args, want, name) in cases {
        let code = call(&args);
        let msg = last_error();
        assert_eq!(code, want, "{args:?}{note}: {msg}");
        assert!(msg.contains(&format!("`{name}`")), "{args:?}{note}: {msg}");
    }
}

// ------------------------------------------------------------ forward

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
        scale_ptr: 0,
        beta: 1.0,
        dropout_p: 0.0,
        dropout_seed: 0,
        dropout_offset: 0,
        stream: std::ptr::null_mut(),
    }
}

#[test]
fn forward_valid_arguments_reach_the_device_check() {
    assert_no_device(fwd().call());
    // S is optional; f32 and f16; tokens 0 allows null row pointers.
    assert_no_device(Fwd { s: 0, ..fwd() }.call());
    // With dropout (p in [0, 1), any seed and offset).
    let dropped = Fwd {
        dropout_p: 0.1,
        dropout_seed: u64::MAX,
        dropout_offset: 12,
        ..fwd()
    };
    assert_no_device(dropped.call());
    assert_no_device(Bwd::after(&dropped, [P + 0x40_0000, 0, P + 0x50_0000, P + 0x60_0000]).call());
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
    assert_no_device(
        Fwd {
            stream: 1 as *mut c_void,
            ..fwd()
        }
        .call(),
    );
    assert_no_device(
        Fwd {
            stream: 2 as *mut c_void,
            ..fwd()
        }
        .call(),
    );
}

#[test]
fn forward_refusals_name_the_argument() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    #[rustfmt::skip]
    let cases: Vec<(Fwd, i32, &str)> = vec![
        (Fwd { tokens: -1, ..fwd() }, INVALID, "tokens"),
        (Fwd { d_in: -96, ..fwd() }, INVALID, "d_in"),
        (Fwd { d_out: -1, ..fwd() }, INVALID, "d_out"),
        (Fwd { rank: -8, ..fwd() }, INVALID, "rank"),
        (Fwd { rank: 0, ..fwd() }, INVALID, "rank"),
        (Fwd { rank: 257, ..fwd() }, INVALID, "rank"),
        (Fwd { d_in: 0, ..fwd() }, INVALID, "d_in"),
        (Fwd { d_out: 0, ..fwd() }, INVALID, "d_out"),
        (Fwd { d_in: i64::MAX, ..fwd() }, INVALID, "d_in"),
        (Fwd { ld_x: -96, ..fwd() }, INVALID, "ld_x"),
        (Fwd { ld_x: 95, ..fwd() }, INVALID, "ld_x"),
        (Fwd { ld_y: 159, ..fwd() }, INVALID, "ld_y"),
        (Fwd { ld_y: -1, ..fwd() }, INVALID, "ld_y"),
        (Fwd { x: 0, ..fwd() }, INVALID, "x"),
        (Fwd { a: 0, ..fwd() }, INVALID, "a"),
        (Fwd { y: 0, ..fwd() }, INVALID, "y"),
        (Fwd { tokens: 0, a: 0, ..fwd() }, INVALID, "a"),
        (Fwd { x: P + 1, ..fwd() }, INVALID, "x"),
        (Fwd { a: P + 3, ..fwd() }, INVALID, "a"),
        (Fwd { dtype: F32, y: P + 2, ..fwd() }, INVALID, "y"),
        (Fwd { s: P + 2, ..fwd() }, INVALID, "s"),
        (Fwd { scale: f32::NAN, ..fwd() }, INVALID, "scale"),
        (Fwd { scale: f32::INFINITY, ..fwd() }, INVALID, "scale"),
        (Fwd { beta: 0.5, ..fwd() }, INVALID, "beta"),
        (Fwd { beta: -1.0, ..fwd() }, INVALID, "beta"),
        (Fwd { dropout_p: 1.0, ..fwd() }, INVALID, "dropout_p"),
        (Fwd { dropout_p: -0.5, ..fwd() }, INVALID, "dropout_p"),
        (Fwd { dropout_p: f64::NAN, ..fwd() }, INVALID, "dropout_p"),
        (Fwd { device: -1, ..fwd() }, INVALID, "device"),
        (Fwd { dtype: 3, ..fwd() }, SINGLORA_ERROR_UNKNOWN_DTYPE, "dtype"),
        (Fwd { dtype: -1, ..fwd() }, SINGLORA_ERROR_UNKNOWN_DTYPE, "dtype"),
    ];
    assert_each_refused(cases, |args| args.call(), "");
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

/// Valid arguments for the backward of [`fwd`]'s sizes and X (its S as
/// the saved S), A elsewhere, accumulating into dA.
fn bwd() -> Bwd {
    let [g, dx, da, ws] = [0x10_0000, 0x40_0000, 0x50_0000, 0x60_0000].map(|o| P + o);
    Bwd {
        a: P + 0x20_0000,
        da_beta: 1.0,
        ..Bwd::after(&fwd(), [g, dx, da, ws])
    }
}

#[test]
fn backward_valid_arguments_reach_the_device_check() {
    assert_no_device(bwd().call());
    // The fused kernels asked for (they run where they apply).
    assert_no_device(
        Bwd {
            kernel: SINGLORA_BACKWARD_FUSED,
            ..bwd()
        }
        .call(),
    );
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
    #[rustfmt::skip]
    let cases: Vec<(Bwd, i32, &str)> = vec![
        (Bwd { tokens: -33, ..bwd() }, INVALID, "tokens"),
        (Bwd { kernel: 2, ..bwd() }, INVALID, "kernel"),
        (Bwd { kernel: -1, ..bwd() }, INVALID, "kernel"),
        (Bwd { dropout_p: 1.5, ..bwd() }, INVALID, "dropout_p"),
        (Bwd { d_in: -1, ..bwd() }, INVALID, "d_in"),
        (Bwd { d_out: -1, ..bwd() }, INVALID, "d_out"),
        (Bwd { rank: -1, ..bwd() }, INVALID, "rank"),
        (Bwd { rank: 300, ..bwd() }, INVALID, "rank"),
        (Bwd { ld_x: 10, ..bwd() }, INVALID, "ld_x"),
        (Bwd { ld_x: -1, ..bwd() }, INVALID, "ld_x"),
        (Bwd { ld_g: 100, ..bwd() }, INVALID, "ld_g"),
        (Bwd { ld_g: -100, ..bwd() }, INVALID, "ld_g"),
        (Bwd { ld_dx: 95, ..bwd() }, INVALID, "ld_dx"),
        (Bwd { ld_dx: -96, ..bwd() }, INVALID, "ld_dx"),
        (Bwd { dx_beta: 2.0, ..bwd() }, INVALID, "dx_beta"),
        (Bwd { da_beta: 0.5, ..bwd() }, INVALID, "da_beta"),
        (Bwd { scale: f32::NEG_INFINITY, ..bwd() }, INVALID, "scale"),
        (Bwd { x: 0, ..bwd() }, INVALID, "x"),
        (Bwd { g: 0, ..bwd() }, INVALID, "g"),
        (Bwd { a: 0, ..bwd() }, INVALID, "a"),
        (Bwd { da: 0, ..bwd() }, INVALID, "da"),
        (Bwd { workspace: 0, ..bwd() }, INVALID, "workspace"),
        (Bwd { g: P + 1, ..bwd() }, INVALID, "g"),
        (Bwd { dx: P + 1, ..bwd() }, INVALID, "dx"),
        (Bwd { saved_s: P + 2, ..bwd() }, INVALID, "saved_s"),
        (Bwd { da: P + 6, ..bwd() }, INVALID, "da"),
        (Bwd { workspace: P + 8, ..bwd() }, INVALID, "workspace"),
        (Bwd { workspace_bytes: small - 4, ..bwd() }, INVALID, "workspace"),
        // Without a saved S the workspace must hold S too.
        (Bwd { saved_s: 0, ..bwd() }, INVALID, "workspace"),
        (Bwd { device: -3, ..bwd() }, INVALID, "device"),
        (Bwd { dtype: 9, ..bwd() }, SINGLORA_ERROR_UNKNOWN_DTYPE, "dtype"),
    ];
    assert_each_refused(cases, |args| args.call(), "");
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
        scale_ptr: 0,
        stream: std::ptr::null_mut(),
    }
}

impl Merge {
    /// `singlora_unmerge` for `undo`, else `singlora_merge`.
    fn call(&self, undo: bool) -> i32 {
        let f = if undo {
            singlora_unmerge
        } else {
            singlora_merge
        };
        // SAFETY: as for Call::call.
        unsafe { self.launch_with(f) }
    }
}

#[test]
fn merge_and_unmerge_check_their_arguments() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    for undo in [false, true] {
        assert_no_device(mrg().call(undo));
        assert_no_device(Merge { ld_w: 200, ..mrg() }.call(undo));
        #[rustfmt::skip]
        let cases: Vec<(Merge, i32, &str)> = vec![
            // In the order of the C function's parameters.
            (Merge { dtype: 5, ..mrg() }, SINGLORA_ERROR_UNKNOWN_DTYPE, "dtype"),
            (Merge { device: -1, ..mrg() }, INVALID, "device"),
            (Merge { d_in: -1, ..mrg() }, INVALID, "d_in"),
            (Merge { d_out: 0, ..mrg() }, INVALID, "d_out"),
            (Merge { rank: 0, ..mrg() }, INVALID, "rank"),
            (Merge { rank: -2, ..mrg() }, INVALID, "rank"),
            (Merge { w: 0, ..mrg() }, INVALID, "w"),
            (Merge { w: P + 1, ..mrg() }, INVALID, "w"),
            (Merge { ld_w: 95, ..mrg() }, INVALID, "ld_w"),
            (Merge { ld_w: -96, ..mrg() }, INVALID, "ld_w"),
            (Merge { a: 0, ..mrg() }, INVALID, "a"),
            (Merge { scale: f32::NAN, ..mrg() }, INVALID, "scale"),
        ];
        assert_each_refused(cases, |args| args.call(undo), &format!(" (undo {undo})"));
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

// ------------------------------------------------- aliasing, overlap, wrap

/// Outputs that alias or overlap another argument, and ranges that wrap past
/// the end of the address space, are refused before any device is touched,
/// naming the output; disjoint column slices of one fused buffer pass.
#[test]
fn overlapping_outputs_and_wrapping_ranges_are_refused() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    // forward: y == x (bf16, 33 × 96 and 33 × 160 rows)
    let f = Fwd {
        d_out: 96,
        ld_y: 96,
        y: P,
        ..fwd()
    };
    assert_refused(f.call(), INVALID, "y");
    assert!(last_error().contains("overlaps `x`"), "{}", last_error());
    // S inside Y; Y's last row reaching into A.
    assert_refused(
        Fwd {
            s: P + 0x20_0000 + 64,
            ..fwd()
        }
        .call(),
        INVALID,
        "s",
    );
    let y_end = P + 0x10_0000 - (32 * 160 + 160) * 2 + 2;
    assert_refused(Fwd { y: y_end, ..fwd() }.call(), INVALID, "y");
    // A fused [x | y] buffer: x the first 96 columns, y the next 160 of rows
    // of 256 elements, does not overlap; one column less apart does.
    let fused = Fwd {
        x: P,
        ld_x: 256,
        y: P + 96 * 2,
        ld_y: 256,
        ..fwd()
    };
    assert_no_device(fused.call());
    assert_refused(
        Fwd {
            y: P + 94 * 2,
            ..fused
        }
        .call(),
        INVALID,
        "y",
    );
    // A y whose range wraps past 2^64.
    assert_refused(
        Fwd {
            y: u64::MAX - 1023,
            ..fwd()
        }
        .call(),
        INVALID,
        "y",
    );
    assert!(last_error().contains("wraps"), "{}", last_error());

    // backward: dx == g's memory, da inside the workspace, workspace over x.
    assert_refused(
        Bwd {
            dx: P + 0x10_0000,
            ..bwd()
        }
        .call(),
        INVALID,
        "dx",
    );
    assert_refused(
        Bwd {
            da: P + 0x60_0000 + 256,
            ..bwd()
        }
        .call(),
        INVALID,
        "da",
    );
    assert_refused(
        Bwd {
            workspace: P,
            ..bwd()
        }
        .call(),
        INVALID,
        "workspace",
    );
    // Inputs may share memory (x and g the same tensor).
    assert_no_device(
        Bwd {
            g: P,
            ld_g: 160,
            d_in: 160,
            ld_x: 160,
            ld_dx: 160,
            ..bwd()
        }
        .call(),
    );

    // merge: w over a.
    for undo in [false, true] {
        assert_refused(Merge { a: P + 64, ..mrg() }.call(undo), INVALID, "w");
        assert!(last_error().contains("overlaps `a`"), "{}", last_error());
    }
}

// ------------------------------------------------- the device scale

/// A launch with `scale_ptr` set reads the scale from a device float: a
/// misaligned pointer is refused naming `scale_ptr`, a scale pointer that an
/// output overlaps is refused naming the output, the by-value `scale` is then
/// not used (a NaN there is no refusal), and valid calls reach the device
/// check.
#[test]
fn a_device_scale_is_checked() {
    use SINGLORA_ERROR_INVALID_ARGUMENT as INVALID;
    let scale_ptr = P + 0x70_0000;
    let f = Fwd {
        scale: f32::NAN,
        scale_ptr,
        ..fwd()
    };
    assert_no_device(f.call());
    assert_refused(
        Fwd {
            scale_ptr: scale_ptr + 2,
            ..f
        }
        .call(),
        INVALID,
        "scale_ptr",
    );
    // y written over the scale it reads.
    assert_refused(
        Fwd {
            scale_ptr: f.y + 64,
            ..f
        }
        .call(),
        INVALID,
        "y",
    );

    let b = Bwd {
        scale: f32::NAN,
        scale_ptr,
        ..bwd()
    };
    assert_no_device(b.call());
    assert_refused(
        Bwd {
            scale_ptr: scale_ptr + 1,
            ..b
        }
        .call(),
        INVALID,
        "scale_ptr",
    );
    assert_refused(
        Bwd {
            scale_ptr: b.da + 4,
            ..b
        }
        .call(),
        INVALID,
        "da",
    );

    let m = Merge {
        scale: f32::NAN,
        scale_ptr,
        ..mrg()
    };
    for undo in [false, true] {
        assert_no_device(m.call(undo));
        assert_refused(
            Merge {
                scale_ptr: scale_ptr + 3,
                ..m
            }
            .call(undo),
            INVALID,
            "scale_ptr",
        );
        assert_refused(
            Merge {
                scale_ptr: m.w + 8,
                ..m
            }
            .call(undo),
            INVALID,
            "w",
        );
    }
}

/// The host dropout mask: the kernels' bits (see tests/philox.rs for the
/// generator), refusals naming their argument, nothing written when refused.
#[test]
fn dropout_mask_matches_the_rust_mask_and_checks_its_arguments() {
    let (tokens, cols) = (9usize, 14usize);
    let mut keep = vec![7u8; tokens * cols];
    // SAFETY: `keep` holds tokens · cols bytes.
    let code = unsafe {
        singlora_dropout_mask(
            0.3,
            99,
            1 << 40,
            tokens as i64,
            cols as i64,
            keep.as_mut_ptr(),
        )
    };
    assert_eq!(code, SINGLORA_OK, "{}", last_error());
    let want = singlora::Dropout::new(0.3, 99, 1 << 40)
        .unwrap()
        .mask(tokens, cols);
    assert!(keep.iter().zip(&want).all(|(&k, &w)| k == w as u8));
    assert!(keep.contains(&0) && keep.contains(&1));
    let mut untouched = vec![7u8; 4];
    for (p, t, ptr, name) in [
        (1.0, 2, untouched.as_mut_ptr(), "dropout_p"),
        (f64::NAN, 2, untouched.as_mut_ptr(), "dropout_p"),
        (0.5, -2, untouched.as_mut_ptr(), "tokens"),
        (0.5, 2, std::ptr::null_mut(), "keep"),
    ] {
        // SAFETY: `ptr` is NULL or holds the 4 bytes a 2 × 2 mask needs.
        let code = unsafe { singlora_dropout_mask(p, 0, 0, t, 2, ptr) };
        assert_refused(code, SINGLORA_ERROR_INVALID_ARGUMENT, name);
    }
    assert_eq!(untouched, vec![7u8; 4]);
}
