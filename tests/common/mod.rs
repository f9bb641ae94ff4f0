//! The GPU test harness: a ready device or a one-line skip, random inputs,
//! NaN poisoning, matrices placed at chosen strides and offsets, and
//! comparison against the f64 reference: relative L2 and per-element bounds
//! (bounds.rs); tables of cases run per element type (cases.rs); one dense
//! forward + backward and its reference, as a whole (pass.rs); the f64
//! reference's forward, backward, S and Q as values (host.rs); the C ABI's
//! calls as structs (capi.rs); the frozen layer's products on the host
//! (frozen.rs).
#![allow(dead_code)]

pub mod bounds;
pub mod capi;
pub mod cases;
pub mod frozen;
pub mod host;
pub mod pass;

#[allow(unused_imports)]
pub use bounds::*;
#[allow(unused_imports)]
pub use cases::*;
#[allow(unused_imports)]
pub use frozen::*;
#[allow(unused_imports)]
pub use host::*;
#[allow(unused_imports)]
pub use pass::*;

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use singlora::{
    backward_workspace_len, fill_bits, forward, DType, Dims, Dropout, Error, ForwardKernel,
    ForwardOptions, Kernels, Scale,
};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// A ready GPU with the module loaded, or `None` after printing
/// `skipped: no CUDA device (<reason>)`. With SINGLORA_REQUIRE_GPU=1 a
/// missing device fails the test instead. Any other failure (a module that
/// does not load, say) always fails.
pub fn gpu() -> Option<Gpu> {
    let require = std::env::var("SINGLORA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match singlora::open_device(0) {
        Ok(ctx) => {
            Kernels::get(&ctx).expect("the singlora module must load on this GPU");
            let stream = ctx.new_stream().expect("stream");
            Some(Gpu { ctx, stream })
        }
        Err(e @ (Error::NoDriver | Error::NoDevice { .. } | Error::UnsupportedDevice { .. })) => {
            assert!(!require, "SINGLORA_REQUIRE_GPU=1 but no usable GPU: {e}");
            println!("skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("opening the GPU failed: {e}"),
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` draws of N(0, std²), never all zero.
pub fn randn(rng: &mut StdRng, n: usize, std: f64) -> Vec<f64> {
    let d = Normal::new(0.0, std).unwrap();
    (0..n).map(|_| d.sample(rng)).collect()
}

/// Rounds to T and back, so the reference sees exactly the kernel's inputs.
pub fn quantize<T: DType>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f64(x).to_f64()).collect()
}

pub fn upload<T: DType>(gpu: &Gpu, v: &[f64]) -> CudaSlice<T> {
    upload_on(&gpu.stream, v)
}

/// [`upload`] on any stream (a test thread's own).
pub fn upload_on<T: DType>(stream: &Arc<CudaStream>, v: &[f64]) -> CudaSlice<T> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    stream.clone_htod(&host).unwrap()
}

pub fn upload_f32(gpu: &Gpu, v: &[f64]) -> CudaSlice<f32> {
    upload::<f32>(gpu, v)
}

pub fn download<T: DType>(gpu: &Gpu, d: &CudaSlice<T>) -> Vec<f64> {
    download_on(&gpu.stream, d)
}

/// [`download`] on any stream.
pub fn download_on<T: DType>(stream: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<f64> {
    let host: Vec<T> = stream.clone_dtoh(d).unwrap();
    host.into_iter().map(|x| x.to_f64()).collect()
}

/// A device buffer of `n` NaNs.
pub fn poisoned<T: DType>(gpu: &Gpu, n: usize) -> CudaSlice<T> {
    poisoned_on(&gpu.stream, n)
}

/// [`poisoned`] on any stream.
pub fn poisoned_on<T: DType>(stream: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    let mut d = stream.alloc_zeros::<T>(n.max(1)).unwrap();
    fill_bits(stream, &mut d, T::NAN_BITS).unwrap();
    d
}

/// A backward's workspace for `dims` (of the length the query reports),
/// poisoned.
pub fn poisoned_workspace(gpu: &Gpu, dims: &Dims, saved_s: bool) -> CudaSlice<f32> {
    poisoned::<f32>(gpu, backward_workspace_len(dims, saved_s).unwrap())
}

/// Relative L2 error; NaN or a missing element never passes.
pub fn rel_l2(out: &[f64], reference: &[f64]) -> f64 {
    singlora::reference::relative_l2(out, reference)
}

/// Asserts the design page's bar for T, naming the output and the case.
pub fn assert_close<T: DType>(what: &str, case: &str, out: &[f64], reference: &[f64]) {
    let err = rel_l2(out, reference);
    assert!(
        err <= T::TOLERANCE,
        "{what} ({} {case}): relative L2 error {err:e} exceeds {:e}",
        T::NAME,
        T::TOLERANCE
    );
}

/// Rows of a strided (`rows × ld`) host matrix, cut to `cols`.
pub fn unstride(v: &[f64], rows: usize, cols: usize, ld: usize) -> Vec<f64> {
    (0..rows)
        .flat_map(|r| v[r * ld..r * ld + cols].iter().copied())
        .collect()
}

/// Places a contiguous `rows × cols` matrix into a `rows × ld` one whose
/// gaps hold `fill`.
pub fn restride(v: &[f64], rows: usize, cols: usize, ld: usize, fill: f64) -> Vec<f64> {
    let mut out = vec![fill; if rows == 0 { 0 } else { (rows - 1) * ld + cols }];
    for r in 0..rows {
        out[r * ld..r * ld + cols].copy_from_slice(&v[r * cols..(r + 1) * cols]);
    }
    out
}

/// The argument a refusal names; any other error fails the test.
pub fn argument_named(err: &Error) -> &'static str {
    match err {
        Error::BufferTooSmall { name, .. }
        | Error::InvalidStride { name, .. }
        | Error::InvalidArgument { name, .. }
        | Error::InvalidDim { name, .. } => name,
        other => panic!("unexpected error {other}"),
    }
}

/// One unit in the last place of T at magnitude `x` (subnormals included):
/// the spacing of T's values around `x`.
pub fn ulp<T: DType>(x: f64) -> f64 {
    // (mantissa bits, smallest normal exponent)
    let (mant, min_exp) = match T::NAME {
        "f32" => (23, -126),
        "f16" => (10, -14),
        "bf16" => (7, -126),
        other => panic!("no ulp for {other}"),
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mant)
}

/// Asserts `got` is within `tol[i]` of `want[i]` for every element, naming
/// the first that is not (NaN never passes).
pub fn assert_each_within(what: &str, got: &[f64], want: &[f64], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let t = tol(i);
        assert!(
            (g - w).abs() <= t,
            "{what}: element {i} is {g:e}, expected {w:e} within {t:e}"
        );
    }
}

/// An exact f32 value rounded to T as the kernels round it (from all 32
/// bits: half's `bf16::from_f64` drops low bits of the f64 first, which can
/// round an f32 value differently than `__float2bfloat16_rn`).
pub fn round_f32_to<T: DType>(x: f32) -> f64 {
    match T::NAME {
        "f32" => x as f64,
        "f16" => half::f16::from_f32(x).to_f64(),
        "bf16" => half::bf16::from_f32(x).to_f64(),
        other => panic!("no rounding to {other}"),
    }
}

/// A row stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ld {
    /// The row itself.
    Dense,
    /// The row plus this many elements.
    Pad(usize),
    /// 16-byte aligned rows: the row rounded up to 16 bytes, plus 16 bytes
    /// (a column slice of a wider, aligned matrix).
    Aligned,
}

impl Ld {
    /// The stride in elements of T for rows of `cols`.
    pub fn of<T>(self, cols: usize) -> usize {
        let v = 16 / std::mem::size_of::<T>();
        match self {
            Ld::Dense => cols,
            Ld::Pad(p) => cols + p,
            Ld::Aligned => cols.next_multiple_of(v) + v,
        }
    }
}

/// Guard cells after every placed matrix.
pub const GUARD: usize = 8;
/// What an output's gaps and guard cells hold (and must still hold after a
/// launch).
pub const SENTINEL: f64 = 1234.5;

/// A matrix placed `off` elements into a device buffer (whose allocation is
/// 16-byte aligned, so `off` decides the alignment the kernel sees), with
/// `off` guard cells before it and [`GUARD`] after, all holding `guard`.
/// Inputs get NaN guards (a read outside the matrix poisons the result),
/// outputs [`SENTINEL`] guards (checked by [`Placed::read`]).
pub struct Placed<T: DType> {
    pub buf: CudaSlice<T>,
    pub off: usize,
    pub len: usize,
    guard: f64,
}

impl<T: DType> Placed<T> {
    pub fn new(gpu: &Gpu, data: &[f64], off: usize, guard: f64) -> Self {
        let mut host = vec![guard; off];
        host.extend_from_slice(data);
        host.extend(std::iter::repeat(guard).take(GUARD));
        let buf = upload::<T>(gpu, &host);
        {
            let (base, _record) = buf.device_ptr(&gpu.stream);
            assert_eq!(base % 16, 0, "device allocations are 16-byte aligned");
        }
        Self {
            buf,
            off,
            len: data.len(),
            guard,
        }
    }

    /// An input: NaN guard cells.
    pub fn input(gpu: &Gpu, data: &[f64], off: usize) -> Self {
        Self::new(gpu, data, off, f64::NAN)
    }

    /// An output: [`SENTINEL`] guard cells.
    pub fn output(gpu: &Gpu, data: &[f64], off: usize) -> Self {
        Self::new(gpu, data, off, SENTINEL)
    }

    /// A `rows × cols` matrix (contiguous `data`) placed at row stride `ld`,
    /// its gaps holding `guard` as the guard cells do: NaN for an input,
    /// [`SENTINEL`] for an output (that starts as `data`, see [`initial`]).
    pub fn strided(
        gpu: &Gpu,
        data: &[f64],
        (rows, cols, ld): (usize, usize, usize),
        off: usize,
        guard: f64,
    ) -> Self {
        Self::new(gpu, &restride(data, rows, cols, ld, guard), off, guard)
    }

    /// Whether the kernel sees a base address off 16-byte alignment.
    pub fn misaligned(&self) -> bool {
        (self.off * std::mem::size_of::<T>()) % 16 != 0
    }

    pub fn view(&self) -> CudaView<'_, T> {
        self.buf.slice(self.off..self.off + self.len)
    }

    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.buf.slice_mut(self.off..self.off + self.len)
    }

    /// The matrix, after checking that every guard cell still holds its
    /// value (bit for bit; NaN guards stay NaN).
    pub fn read(&self, gpu: &Gpu, what: &str) -> Vec<f64> {
        let all = download(gpu, &self.buf);
        let want = T::from_f64(self.guard).to_f64();
        let after = self.off + self.len;
        for (i, &v) in all.iter().enumerate() {
            if i < self.off || i >= after {
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "{what}: guard cell {} elements {} the matrix was written ({v:e})",
                    if i < self.off {
                        self.off - i
                    } else {
                        i - after + 1
                    },
                    if i < self.off { "before" } else { "after" },
                );
            }
        }
        all[self.off..after].to_vec()
    }

    /// A strided output's matrix (`rows × ld`, rows of `cols`) without its
    /// gaps, after [`read`](Self::read)'s check of the guard cells and the
    /// check that the gaps still hold [`SENTINEL`].
    pub fn read_strided(
        &self,
        gpu: &Gpu,
        what: &str,
        (rows, cols, ld): (usize, usize, usize),
    ) -> Vec<f64> {
        let all = self.read(gpu, what);
        assert_gaps_untouched::<T>(what, &all, rows, cols, ld);
        unstride(&all, rows, cols, ld)
    }
}

/// The forward on placed matrices: Y (row stride `ld_y`) ← beta·Y +
/// scale·X·A[:d_in]·A[:d_out]ᵀ from X (row stride `ld_x`), S into `s` where
/// given, by `kernel` where it applies.
#[allow(clippy::too_many_arguments)]
pub fn forward_placed<'s, T: DType>(
    gpu: &Gpu,
    dims: &Dims,
    (x, ld_x): (&Placed<T>, usize),
    a: &Placed<T>,
    (y, ld_y): (&mut Placed<T>, usize),
    s: Option<&mut Placed<f32>>,
    (scale, beta): (impl Into<Scale<'s>>, f32),
    kernel: ForwardKernel,
) {
    let mut s_view = s.map(|s| s.view_mut());
    forward(
        &gpu.stream,
        dims,
        &x.view(),
        ld_x,
        &a.view(),
        &mut y.view_mut(),
        ld_y,
        s_view.as_mut().map(|v| v as &mut dyn DevicePtrMut<f32>),
        scale,
        beta,
        ForwardOptions {
            dropout: Dropout::NONE,
            kernel,
        },
    )
    .unwrap();
}

/// The registry of `gpu` when its modules have kernel `name` (the sm_90a
/// ones load on compute capability 9.0 only); else prints why the calling
/// test skips and gives `None`.
pub fn with_kernel(gpu: &Gpu, name: &str) -> Option<Arc<Kernels>> {
    let kernels = Kernels::for_stream(&gpu.stream).unwrap();
    if kernels.contains(name) {
        Some(kernels)
    } else {
        println!("skipped: no {name} on this device (sm_90a code, compute capability 9.0 only)");
        None
    }
}

/// What an output with this beta starts as: `base` where it is added onto
/// (beta ≠ 0), NaN where it is overwritten (beta = 0), so that an unwritten
/// element shows as NaN.
pub fn initial(base: &[f64], beta: f32) -> Vec<f64> {
    if beta == 0.0 {
        vec![f64::NAN; base.len()]
    } else {
        base.to_vec()
    }
}

/// Asserts the gaps of a strided (`rows × ld`, rows of `cols`) output still
/// hold [`SENTINEL`].
pub fn assert_gaps_untouched<T: DType>(
    what: &str,
    all: &[f64],
    rows: usize,
    cols: usize,
    ld: usize,
) {
    let want = T::from_f64(SENTINEL).to_f64();
    for row in 0..rows.saturating_sub(1) {
        for col in cols..ld {
            assert_eq!(
                all[row * ld + col],
                want,
                "{what}: gap ({row},{col}) written"
            );
        }
    }
}
