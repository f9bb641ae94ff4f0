//! Concurrency on one device: threads with their own streams give bitwise
//! the results of a single-threaded run — eight threads running forward
//! and backward on different shapes and element types; two layers trained
//! on two streams; the C ABI from four threads on four driver streams of
//! the primary context (what PyTorch's streams are) — and the module cache,
//! raced by first calls on a fresh (non-primary) context, loads the module
//! once: every thread gets the same registry.
//!
//! Each thread enqueues all its repetitions before it reads anything back,
//! so the threads' kernels overlap on the device. The single-threaded
//! results are first checked against the f64 reference (bitwise equality
//! to a wrong answer proves nothing). The race runs on a non-primary
//! context created for it, so it is a first call whatever ran before in
//! this process (the registry is keyed by the context handle, primary or
//! not). The primary context's first calls, Rust and C ABI, race in a
//! process of their own: tests/first_call_race.rs.

use std::ffi::{c_void, CStr};
use std::sync::{Arc, Barrier};
use std::thread;

use crate::common::capi::{Bwd, Fwd, Launch};
use crate::common::*;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use singlora::ffi::{singlora_last_error, SINGLORA_OK};
use singlora::{AdamW, DType, Dims, Dropout, Kernels, SingLoraLinear};

const SCALE: f32 = 0.75;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dt {
    F32,
    F16,
    Bf16,
}

/// One workload: an element type and a shape.
#[derive(Clone, Copy, Debug)]
struct Job {
    dt: Dt,
    sh: Shape,
}

const fn job(dt: Dt, tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Job {
    Job {
        dt,
        sh: Shape::new(tokens, d_in, d_out, rank),
    }
}

/// Eight different shapes: every element type and rank bucket, square and
/// non-square both ways, decode sizes (the sm_90 cluster kernels) and
/// regular ones, odd d.
const JOBS: [Job; 8] = [
    job(Dt::Bf16, 300, 256, 256, 16),
    job(Dt::F16, 77, 96, 160, 24),
    job(Dt::F32, 130, 160, 96, 64),
    job(Dt::Bf16, 7, 512, 128, 8),
    job(Dt::F16, 40, 200, 72, 100),
    job(Dt::Bf16, 600, 128, 192, 256),
    job(Dt::F32, 33, 1000, 64, 32),
    job(Dt::Bf16, 1024, 1024, 1024, 48),
];

/// The host inputs of a job (values exact in its element type).
struct Inputs {
    x: Vec<f64>,
    a: Vec<f64>,
    g: Vec<f64>,
    y0: Vec<f64>,
}

fn inputs(job: &Job, seed: u64) -> Inputs {
    let q = |v: Vec<f64>| match job.dt {
        Dt::F32 => quantize::<f32>(&v),
        Dt::F16 => quantize::<f16>(&v),
        Dt::Bf16 => quantize::<bf16>(&v),
    };
    let dims = job.sh.dims();
    let mut r = rng(seed);
    Inputs {
        x: q(randn(&mut r, job.sh.tokens * job.sh.d_in, 1.0)),
        a: q(randn(&mut r, dims.a_len(), 1.0 / (dims.d() as f64).sqrt())),
        g: q(randn(&mut r, job.sh.tokens * job.sh.d_out, 1.0)),
        y0: q(randn(&mut r, job.sh.tokens * job.sh.d_out, 0.5)),
    }
}

/// The outputs of one forward + backward, as bits: Y (beta 1 onto Y0), S,
/// dX (beta 0), dA (beta 0), Q.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bits {
    y: Vec<u64>,
    s: Vec<u64>,
    dx: Vec<u64>,
    da: Vec<u64>,
    q: Vec<u64>,
}

fn bits_of(v: Vec<f64>) -> Vec<u64> {
    v.into_iter().map(f64::to_bits).collect()
}

/// The device buffers of one repetition: poisoned, Y starting as Y0.
fn outs<T: DType>(stream: &Arc<CudaStream>, dims: &Dims, y0: &CudaSlice<T>) -> PassBufs<T> {
    let mut o = PassBufs::new(stream, dims, f64::NAN, true);
    stream.memcpy_dtod(y0, &mut o.y).unwrap();
    o
}

fn bits(stream: &Arc<CudaStream>, dims: &Dims, o: &PassBufs<impl DType>) -> Bits {
    let p = o.read(stream, dims);
    Bits {
        y: bits_of(p.y),
        s: bits_of(p.s),
        dx: bits_of(p.dx),
        da: bits_of(p.da),
        q: bits_of(p.q),
    }
}

/// `reps` forwards + backwards of `job` on `stream` through the Rust API,
/// all enqueued before anything is read back; the outputs of every
/// repetition.
fn run_rust<T: DType>(stream: &Arc<CudaStream>, job: &Job, inp: &Inputs, reps: usize) -> Vec<Bits> {
    let dims = job.sh.dims();
    let x = upload_on::<T>(stream, &inp.x);
    let a = upload_on::<T>(stream, &inp.a);
    let g = upload_on::<T>(stream, &inp.g);
    let y0 = upload_on::<T>(stream, &inp.y0);
    let mut outs: Vec<PassBufs<T>> = (0..reps).map(|_| outs(stream, &dims, &y0)).collect();
    for o in &mut outs {
        o.run(stream, &dims, [&x, &g, &a], SCALE, 1.0, true, Dropout::NONE);
    }
    outs.iter().map(|o| bits(stream, &dims, o)).collect()
}

fn ptr<T>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> u64 {
    let (p, _record) = s.device_ptr(stream);
    p
}

fn last_error() -> String {
    // SAFETY: never NULL; valid until the next singlora call on this thread.
    unsafe { CStr::from_ptr(singlora_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The same as [`run_rust`] through the C ABI (raw pointers, the stream as
/// a `CUstream`), on a stream of the primary context.
fn run_capi<T: DType>(stream: &Arc<CudaStream>, job: &Job, inp: &Inputs, reps: usize) -> Vec<Bits> {
    let dims = job.sh.dims();
    let code = T::CODE as i32;
    let x = upload_on::<T>(stream, &inp.x);
    let a = upload_on::<T>(stream, &inp.a);
    let g = upload_on::<T>(stream, &inp.g);
    let y0 = upload_on::<T>(stream, &inp.y0);
    let outs: Vec<PassBufs<T>> = (0..reps).map(|_| outs(stream, &dims, &y0)).collect();
    let cu = stream.cu_stream() as *mut c_void;
    for o in &outs {
        let (x, a, g) = (ptr(stream, &x), ptr(stream, &a), ptr(stream, &g));
        let (y, s) = (ptr(stream, &o.y), ptr(stream, &o.s));
        let (dx, da, ws) = (ptr(stream, &o.dx), ptr(stream, &o.da), ptr(stream, &o.ws));
        let fwd = Fwd::dense(code, &dims, [x, a, y, s], (SCALE, 1.0), cu);
        let bwd = Bwd::after(&fwd, [g, dx, da, ws]);
        // SAFETY: every pointer addresses a live buffer of the described
        // shape on device 0's primary context, `cu` is a stream of that
        // context; the buffers outlive the reads below, which synchronise.
        unsafe {
            assert_eq!(fwd.launch(), SINGLORA_OK, "{}", last_error());
            assert_eq!(bwd.launch(), SINGLORA_OK, "{}", last_error());
        }
    }
    outs.iter().map(|o| bits(stream, &dims, o)).collect()
}

fn run(job: &Job, stream: &Arc<CudaStream>, inp: &Inputs, reps: usize, capi: bool) -> Vec<Bits> {
    match (job.dt, capi) {
        (Dt::F32, false) => run_rust::<f32>(stream, job, inp, reps),
        (Dt::F16, false) => run_rust::<f16>(stream, job, inp, reps),
        (Dt::Bf16, false) => run_rust::<bf16>(stream, job, inp, reps),
        (Dt::F32, true) => run_capi::<f32>(stream, job, inp, reps),
        (Dt::F16, true) => run_capi::<f16>(stream, job, inp, reps),
        (Dt::Bf16, true) => run_capi::<bf16>(stream, job, inp, reps),
    }
}

/// Checks a single-threaded result against the f64 reference at the job's
/// element type's bar.
fn check_reference(job: &Job, inp: &Inputs, b: &Bits) {
    let dims = job.sh.dims();
    let want = reference_pass(
        &dims,
        [&inp.x, &inp.g, &inp.a],
        SCALE as f64,
        (&inp.y0, 1.0),
        Dropout::NONE,
    );
    let f = |v: &[u64]| v.iter().map(|&b| f64::from_bits(b)).collect::<Vec<_>>();
    let name = format!("{job:?}");
    let close = |what: &str, got: &[u64], want: &[f64]| match job.dt {
        Dt::F32 => assert_close::<f32>(what, &name, &f(got), want),
        Dt::F16 => assert_close::<f16>(what, &name, &f(got), want),
        Dt::Bf16 => assert_close::<bf16>(what, &name, &f(got), want),
    };
    close("Y", &b.y, &want.y);
    close("S", &b.s, &want.s);
    close("dX", &b.dx, &want.dx);
    close("dA", &b.da, &want.da);
}

fn assert_same(what: &str, job: &Job, got: &[Bits], want: &Bits) {
    for (rep, b) in got.iter().enumerate() {
        for (name, g, w) in [
            ("Y", &b.y, &want.y),
            ("S", &b.s, &want.s),
            ("dX", &b.dx, &want.dx),
            ("dA", &b.da, &want.da),
            ("Q", &b.q, &want.q),
        ] {
            if let Some(i) = g.iter().zip(w).position(|(p, q)| p != q) {
                panic!(
                    "{what}, {job:?}, repetition {rep}: {name}[{i}] is {:e}, the single-threaded run \
                     gave {:e}",
                    f64::from_bits(g[i]),
                    f64::from_bits(w[i])
                );
            }
        }
    }
}

/// The single-threaded results of every job on the harness's stream,
/// checked against the reference.
fn baseline(gpu: &Gpu, inps: &[Inputs]) -> Vec<Bits> {
    JOBS.iter()
        .zip(inps)
        .map(|(job, inp)| {
            let b = run(job, &gpu.stream, inp, 1, false).remove(0);
            check_reference(job, inp, &b);
            b
        })
        .collect()
}

fn all_inputs() -> Vec<Inputs> {
    JOBS.iter()
        .enumerate()
        .map(|(i, j)| inputs(j, 40 + i as u64))
        .collect()
}

/// `reps` runs of each picked job (indices into [`JOBS`]), in a thread of
/// its own on a new stream of the harness's context, the threads started
/// together; the outputs per picked job.
fn in_threads(
    gpu: &Gpu,
    picked: &[usize],
    inps: &[Inputs],
    reps: usize,
    capi: bool,
) -> Vec<Vec<Bits>> {
    let start = Barrier::new(picked.len());
    thread::scope(|sc| {
        let handles: Vec<_> = picked
            .iter()
            .map(|&i| {
                let (ctx, start, job, inp) = (&gpu.ctx, &start, &JOBS[i], &inps[i]);
                sc.spawn(move || {
                    let stream = ctx.new_stream().unwrap();
                    start.wait();
                    run(job, &stream, inp, reps, capi)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Eight threads, each with its own stream, run their job (a different
/// shape each) four times, starting together; every repetition equals the
/// single-threaded run bit for bit.
#[test]
fn eight_threads_on_their_own_streams_equal_a_single_threaded_run() {
    let Some(gpu) = gpu() else { return };
    let inps = all_inputs();
    let want = baseline(&gpu, &inps);
    let all: Vec<usize> = (0..JOBS.len()).collect();
    let got = in_threads(&gpu, &all, &inps, 4, false);
    for ((job, g), w) in JOBS.iter().zip(&got).zip(&want) {
        assert_same("8 threads", job, g, w);
    }
}

/// The C ABI from four threads, each on its own driver stream of device
/// 0's primary context (as PyTorch's streams are), three repetitions each:
/// bitwise the Rust API's single-threaded results. No other test of this
/// binary calls into the C ABI's devices, so the four threads' first calls
/// also race to open its per-ordinal context table.
#[test]
fn capi_from_four_threads_on_their_own_streams_equals_the_rust_api() {
    let Some(gpu) = gpu() else { return };
    assert!(
        gpu.ctx.is_primary(),
        "the C ABI works in the primary context"
    );
    let inps = all_inputs();
    let want = baseline(&gpu, &inps);
    // Four jobs: every element type, decode and regular sizes.
    let picked = [0usize, 1, 2, 6];
    let got = in_threads(&gpu, &picked, &inps, 3, true);
    for (&i, g) in picked.iter().zip(&got) {
        assert_same("C ABI, 4 threads", &JOBS[i], g, &want[i]);
    }
}

/// What a layer run leaves: the last forward's Y, the last backward's dX,
/// the gradient and A after the last AdamW step, as bits.
#[derive(Debug, PartialEq, Eq)]
struct LayerBits {
    y: Vec<u64>,
    dx: Vec<u64>,
    grad: Vec<u64>,
    a: Vec<u64>,
}

/// One layer with a frozen W0 on `stream`, trained for `steps` steps
/// (forward, backward with dX, AdamW) on fixed inputs.
fn train_layer<T: DType>(
    stream: &Arc<CudaStream>,
    (d_in, d_out, rank): (usize, usize, usize),
    tokens: usize,
    steps: usize,
    seed: u64,
) -> LayerBits
where
    CudaBlas: Gemm<T>,
{
    let mut r = rng(seed);
    let q = |v: Vec<f64>| quantize::<T>(&v);
    let w0 = upload_on::<T>(stream, &q(randn(&mut r, d_out * d_in, 0.05)));
    let x = upload_on::<T>(stream, &q(randn(&mut r, tokens * d_in, 1.0)));
    let g = upload_on::<T>(stream, &q(randn(&mut r, tokens * d_out, 1.0)));
    let mut layer = SingLoraLinear::<T>::new(stream, d_in, d_out, rank, 16.0, 4, seed)
        .unwrap()
        .with_frozen(w0)
        .unwrap();
    let mut y = poisoned_on::<T>(stream, tokens * d_out);
    let mut dx = poisoned_on::<T>(stream, tokens * d_in);
    for _ in 0..steps {
        let ctx = layer.forward(tokens, &x, &mut y).unwrap();
        layer.backward(&ctx, &x, &g, Some(&mut dx), false).unwrap();
        layer.adamw_step(&AdamW::default(), 1.0).unwrap();
    }
    LayerBits {
        y: bits_of(download_on(stream, &y)),
        dx: bits_of(download_on(stream, &dx)),
        grad: bits_of(download_on(stream, layer.grad())),
        a: bits_of(download_on(stream, layer.a())),
    }
}

/// Two layers (bf16 and f16, different shapes) on two streams, trained in
/// two threads at once, end bitwise where the same layers trained one
/// after the other end.
#[test]
fn two_layers_on_two_streams_train_as_they_do_alone() {
    let Some(gpu) = gpu() else { return };
    let steps = 12;
    let one = |stream: &Arc<CudaStream>| train_layer::<bf16>(stream, (256, 384, 16), 200, steps, 1);
    let two = |stream: &Arc<CudaStream>| train_layer::<f16>(stream, (512, 512, 32), 96, steps, 2);
    let alone = (
        one(&gpu.ctx.new_stream().unwrap()),
        two(&gpu.ctx.new_stream().unwrap()),
    );
    assert!(
        alone
            .0
            .y
            .iter()
            .chain(&alone.1.y)
            .all(|&b| f64::from_bits(b).is_finite()),
        "the layers' outputs are finite"
    );
    let start = Barrier::new(2);
    let together = thread::scope(|sc| {
        let (ctx, start) = (&gpu.ctx, &start);
        let h1 = sc.spawn(move || {
            let s = ctx.new_stream().unwrap();
            start.wait();
            one(&s)
        });
        let h2 = sc.spawn(move || {
            let s = ctx.new_stream().unwrap();
            start.wait();
            two(&s)
        });
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert!(
        together.0 == alone.0,
        "the bf16 layer differs when trained beside the other"
    );
    assert!(
        together.1 == alone.1,
        "the f16 layer differs when trained beside the other"
    );
}

/// Eight threads race to be the first to use a fresh context (its module
/// not loaded yet): every one gets the same registry (Arc::ptr_eq, the
/// module loaded once), later lookups return it too, it is not the primary
/// context's, and a forward from each thread, on its own stream of that
/// context, gives the bits of the same forward in the primary context.
#[test]
fn first_calls_on_a_fresh_context_share_one_module() {
    let Some(gpu) = gpu() else { return };
    let job = job(Dt::Bf16, 77, 256, 200, 24);
    let inp = inputs(&job, 7);
    let want = run(&job, &gpu.stream, &inp, 1, false).remove(0);
    check_reference(&job, &inp, &want);

    let fresh = CudaContext::new_non_primary(0, 0).unwrap();
    let start = Barrier::new(8);
    let got: Vec<(Arc<Kernels>, Vec<Bits>)> = thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (fresh, start, inp) = (&fresh, &start, &inp);
                sc.spawn(move || {
                    let stream = fresh.new_stream().unwrap();
                    start.wait();
                    if i % 2 == 0 {
                        // A first call that is a launch (it loads the module
                        // through the stream's context)...
                        let out = run(&job, &stream, inp, 1, false);
                        (Kernels::get(fresh).unwrap(), out)
                    } else {
                        // ... or an explicit lookup.
                        let k = Kernels::get(fresh).unwrap();
                        (k, run(&job, &stream, inp, 1, false))
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = &got[0].0;
    for (i, (k, out)) in got.iter().enumerate() {
        assert!(Arc::ptr_eq(first, k), "thread {i} got another registry");
        assert_same("fresh context", &job, out, &want);
    }
    assert!(Arc::ptr_eq(first, &Kernels::get(&fresh).unwrap()));
    assert!(
        !Arc::ptr_eq(first, &Kernels::get(&gpu.ctx).unwrap()),
        "each context has its own module"
    );
    assert_eq!(first.context().cu_ctx(), fresh.cu_ctx());
}
