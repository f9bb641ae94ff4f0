//! The C ABI's calls as structs: each function's arguments, in order, to
//! fill in by struct update from a valid set (tests/capi, and the
//! hardening tests' C ABI threads), and the dense forward and backward.

use std::ffi::c_void;

use singlora::ffi::*;
use singlora::{backward_workspace_len, Dims};

/// A call of one C ABI function: its arguments, in order, as a struct.
pub trait Launch {
    /// Calls the function with these arguments.
    ///
    /// # Safety
    /// Every pointer addresses a live device buffer of the size the
    /// arguments describe, on the device's primary context, and `stream` is
    /// NULL, a special handle or a stream of that context; or the call is
    /// refused before any device access, or names a device ordinal that does
    /// not exist.
    unsafe fn launch(&self) -> i32;
}

/// The arguments of `f` as a struct `name` (to fill in by struct update from
/// a valid set), with [`Launch`] calling `f` and `launch_with` any function
/// of the same signature.
macro_rules! c_call {
    ($name:ident = $f:ident($($field:ident: $ty:ty),+ $(,)?)) => {
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            $(pub $field: $ty,)+
        }

        impl $name {
            /// Calls `f` with these arguments.
            ///
            /// # Safety
            /// As for [`Launch::launch`].
            #[allow(dead_code)]
            pub unsafe fn launch_with(
                &self,
                f: unsafe extern "C" fn($($ty),+) -> i32,
            ) -> i32 {
                // SAFETY: the caller's contract.
                unsafe { f($(self.$field),+) }
            }
        }

        impl Launch for $name {
            unsafe fn launch(&self) -> i32 {
                // SAFETY: the caller's contract.
                unsafe { self.launch_with($f) }
            }
        }
    };
}

c_call!(Fwd = singlora_forward(
    dtype: i32, device: i32, tokens: i64, d_in: i64, d_out: i64, rank: i64,
    x: u64, ld_x: i64, a: u64, y: u64, ld_y: i64, s: u64, scale: f32, scale_ptr: u64, beta: f32,
    dropout_p: f64, dropout_seed: u64, dropout_offset: u64, stream: *mut c_void,
));

c_call!(Bwd = singlora_backward(
    dtype: i32, device: i32, tokens: i64, d_in: i64, d_out: i64, rank: i64,
    x: u64, ld_x: i64, g: u64, ld_g: i64, a: u64, saved_s: u64, scale: f32, scale_ptr: u64,
    dx: u64, ld_dx: i64, dx_beta: f32, da: u64, da_beta: f32,
    workspace: u64, workspace_bytes: u64,
    dropout_p: f64, dropout_seed: u64, dropout_offset: u64, kernel: i32, stream: *mut c_void,
));

c_call!(Merge = singlora_merge(
    dtype: i32, device: i32, d_in: i64, d_out: i64, rank: i64,
    w: u64, ld_w: i64, a: u64, scale: f32, scale_ptr: u64, stream: *mut c_void,
));

/// `dims`' sizes as the C ABI takes them: (tokens, d_in, d_out, rank).
fn sizes(dims: &Dims) -> (i64, i64, i64, i64) {
    let i = |v: usize| v as i64;
    (
        i(dims.tokens()),
        i(dims.d_in()),
        i(dims.d_out()),
        i(dims.rank()),
    )
}

impl Fwd {
    /// A forward of `dims` in `dtype` on device 0 over dense rows: `[x, a,
    /// y, s]` device pointers (`s` 0: not saved), then the scale (by value)
    /// and beta.
    pub fn dense(
        dtype: i32,
        dims: &Dims,
        [x, a, y, s]: [u64; 4],
        (scale, beta): (f32, f32),
        stream: *mut c_void,
    ) -> Self {
        let (tokens, d_in, d_out, rank) = sizes(dims);
        Fwd {
            dtype,
            device: 0,
            tokens,
            d_in,
            d_out,
            rank,
            x,
            ld_x: d_in,
            a,
            y,
            ld_y: d_out,
            s,
            scale,
            scale_ptr: 0,
            beta,
            dropout_p: 0.0,
            dropout_seed: 0,
            dropout_offset: 0,
            stream,
        }
    }
}

impl Bwd {
    /// The backward of `fwd`'s call (its dtype, device, sizes, X, A, scale,
    /// stream and strides; its S as the saved S, 0: recomputed): G at Y's
    /// row stride, dX at X's, both betas 0, `[g, dx, da, workspace]` device
    /// pointers, the workspace of the size the query gives.
    pub fn after(fwd: &Fwd, [g, dx, da, workspace]: [u64; 4]) -> Self {
        let f = fwd;
        let dims = Dims::new(
            f.tokens as usize,
            f.d_in as usize,
            f.d_out as usize,
            f.rank as usize,
        )
        .unwrap();
        let ws_len = backward_workspace_len(&dims, f.s != 0).unwrap();
        Bwd {
            dtype: f.dtype,
            device: f.device,
            tokens: f.tokens,
            d_in: f.d_in,
            d_out: f.d_out,
            rank: f.rank,
            x: f.x,
            ld_x: f.ld_x,
            g,
            ld_g: f.ld_y,
            a: f.a,
            saved_s: f.s,
            scale: f.scale,
            scale_ptr: f.scale_ptr,
            dx,
            ld_dx: f.ld_x,
            dx_beta: 0.0,
            da,
            da_beta: 0.0,
            workspace,
            workspace_bytes: ws_len as u64 * 4,
            dropout_p: f.dropout_p,
            dropout_seed: f.dropout_seed,
            dropout_offset: f.dropout_offset,
            kernel: SINGLORA_BACKWARD_SPLIT,
            stream: f.stream,
        }
    }
}
