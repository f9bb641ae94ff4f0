//! Shared benchmark plumbing: CUDA-event timing for criterion's iter_custom,
//! the device-to-device copy bandwidth measured in the same run, random
//! device inputs, and the summary table (printed, and appended to
//! $SINGLORA_BENCH_TABLE when set).
#![allow(dead_code)]

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use cudarc::cublas::{sys::cublasOperation_t, GemmConfig};
use cudarc::driver::{
    sys::CUevent_flags, CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use singlora::{Dims, Dropout};

/// The hidden size of the forward and backward benchmarks.
pub const D: usize = 4096;
/// The adapter scale every benchmark launches with.
pub const SCALE: f32 = 0.5;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// The GPU, or `None` after printing why the benchmarks are skipped.
pub fn gpu() -> Option<Gpu> {
    match singlora::open_device(0) {
        Ok(ctx) => {
            singlora::Kernels::get(&ctx).expect("module loads");
            // One stream: cudarc's cross-stream event tracking would only add
            // host work to every launch being timed.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().unwrap();
            Some(Gpu { ctx, stream })
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Wall time of `iters` back-to-back launches, by CUDA events.
pub fn time_launches(stream: &Arc<CudaStream>, iters: u64, mut launch: impl FnMut()) -> Duration {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(flags).unwrap();
    for _ in 0..iters {
        launch();
    }
    let end = stream.record_event(flags).unwrap();
    end.synchronize().unwrap();
    Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
}

thread_local! {
    static SAMPLES: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// iter_custom body that also keeps the per-launch time of each sample, so
/// the table can report criterion's samples' median.
pub fn timed(stream: &Arc<CudaStream>, iters: u64, launch: impl FnMut()) -> Duration {
    let d = time_launches(stream, iters, launch);
    SAMPLES.with(|s| s.borrow_mut().push(d.as_secs_f64() / iters as f64));
    d
}

/// Median seconds per launch of the samples taken since the last call.
pub fn take_median() -> f64 {
    SAMPLES.with(|s| {
        let mut v = std::mem::take(&mut *s.borrow_mut());
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    })
}

/// Random bf16 in [-1, 1) (never zeros) on the device.
pub fn random_bf16(gpu: &Gpu, n: usize, seed: u64) -> CudaSlice<bf16> {
    let mut r = StdRng::seed_from_u64(seed);
    let host: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
        .collect();
    gpu.stream.clone_htod(&host).unwrap()
}

pub fn random_f32(gpu: &Gpu, n: usize, seed: u64) -> CudaSlice<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    let host: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    gpu.stream.clone_htod(&host).unwrap()
}

/// `n` zeros on the device.
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, n: usize) -> CudaSlice<T> {
    gpu.stream.alloc_zeros::<T>(n).unwrap()
}

/// Device-to-device copy bandwidth (bytes read + written per second) of a
/// 2 GiB copy, median of 10: the roofline the kernels' GB/s is compared to.
pub fn copy_bandwidth(gpu: &Gpu) -> f64 {
    let n = 1usize << 30; // bf16 elements = 2 GiB
    let src = zeros::<bf16>(gpu, n);
    let mut dst = zeros::<bf16>(gpu, n);
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            time_launches(&gpu.stream, 1, || {
                gpu.stream.memcpy_dtod(&src, &mut dst).unwrap()
            })
            .as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    2.0 * (n * 2) as f64 / times[5]
}

/// One line of the summary table.
pub struct Row {
    pub op: &'static str,
    pub shape: String,
    pub ours_s: f64,
    pub bytes: f64,
    pub copy_bw: f64,
    pub peer: &'static str,
    pub peer_s: f64,
}

pub fn print_table(title: &str, rows: &[Row]) {
    let mut out = String::new();
    out.push_str(&format!("\n### {title}\n\n"));
    out.push_str(
        "| op | shape | ours (µs) | ours GB/s | % of copy BW | peer | peer (µs) | speed-up |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---|---:|---:|\n");
    for r in rows {
        let gbs = r.bytes / r.ours_s / 1e9;
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {:.1} % | {} | {:.1} | {:.2}× |\n",
            r.op,
            r.shape,
            r.ours_s * 1e6,
            gbs,
            100.0 * r.bytes / r.ours_s / r.copy_bw,
            r.peer,
            r.peer_s * 1e6,
            r.peer_s / r.ours_s
        ));
    }
    if let Some(r) = rows.first() {
        out.push_str(&format!(
            "\ncopy bandwidth (device-to-device, same run): {:.0} GB/s\n",
            r.copy_bw / 1e9
        ));
    }
    println!("{out}");
    if let Ok(path) = std::env::var("SINGLORA_BENCH_TABLE") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(out.as_bytes()).unwrap();
    }
}

/// The label of a forward or backward at `tokens` × D, rank `rank`, and its
/// minimal bytes: three tokens × D bf16 matrices moved once.
pub fn token_shape(tokens: usize, rank: usize) -> (String, f64) {
    let bytes = (3 * tokens * D * 2) as f64;
    (format!("t={tokens} d={D} r={rank}"), bytes)
}

/// The label of a forward or backward row at `dims`, run by `kernel`:
/// `t=… d=… r=… Kernel`, or `t=… d_in=… d_out=… r=… Kernel` when non-square.
pub fn dims_label(d: &Dims, kernel: impl std::fmt::Debug) -> String {
    let (t, r) = (d.tokens(), d.rank());
    if d.d_in() == d.d_out() {
        format!("t={t} d={} r={r} {kernel:?}", d.d_in())
    } else {
        format!(
            "t={t} d_in={} d_out={} r={r} {kernel:?}",
            d.d_in(),
            d.d_out()
        )
    }
}

/// A cuBLAS bf16 GEMM configuration (column-major; `trans*` true for
/// CUBLAS_OP_T).
#[allow(clippy::too_many_arguments)]
pub fn gemm_cfg(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    lda: usize,
    ldb: usize,
    beta: f32,
    ldc: usize,
) -> GemmConfig<bf16> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    GemmConfig {
        transa: op(transa),
        transb: op(transb),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: bf16::from_f32(alpha),
        lda: lda as i32,
        ldb: ldb as i32,
        beta: bf16::from_f32(beta),
        ldc: ldc as i32,
    }
}

/// Which side of a comparison a launch is: ours, or the peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Ours,
    Peer,
}

/// One benchmark binary (of one op, against one peer): criterion (10
/// samples), the copy bandwidth measured at the start, and the summary
/// table's rows.
pub struct Bench<'a> {
    op: &'static str,
    peer: &'static str,
    stream: &'a Arc<CudaStream>,
    c: Criterion,
    copy_bw: f64,
    rows: Vec<Row>,
}

impl<'a> Bench<'a> {
    pub fn new(gpu: &'a Gpu, op: &'static str, peer: &'static str) -> Self {
        let c = Criterion::default().sample_size(10).configure_from_args();
        let copy_bw = copy_bandwidth(gpu);
        Self {
            op,
            peer,
            stream: &gpu.stream,
            c,
            copy_bw,
            rows: Vec::new(),
        }
    }

    /// Times `launch(Side::Ours)` ("singlora") and then `launch(Side::Peer)`
    /// ("cublas") as the group `op/shape`, one launch per call, and adds
    /// their row (`bytes`: the minimal bytes moved).
    pub fn compare(&mut self, (shape, bytes): (String, f64), mut launch: impl FnMut(Side)) {
        let stream = self.stream;
        let mut group = self.c.benchmark_group(format!("{}/{shape}", self.op));
        group.bench_function("singlora", |b| {
            b.iter_custom(|iters| timed(stream, iters, || launch(Side::Ours)))
        });
        let ours_s = take_median();
        group.bench_function("cublas", |b| {
            b.iter_custom(|iters| timed(stream, iters, || launch(Side::Peer)))
        });
        let peer_s = take_median();
        group.finish();
        self.rows.push(Row {
            op: self.op,
            shape,
            ours_s,
            bytes,
            copy_bw: self.copy_bw,
            peer: self.peer,
            peer_s,
        });
    }

    /// [`compare`](Self::compare) of one launch with `dropout` (ours)
    /// against the same launch without it (the peer).
    pub fn compare_dropout(
        &mut self,
        shape: (String, f64),
        dropout: Dropout,
        mut launch: impl FnMut(Dropout),
    ) {
        self.compare(shape, |side| {
            launch(match side {
                Side::Ours => dropout,
                Side::Peer => Dropout::NONE,
            })
        });
    }

    /// Criterion's summary, then the table.
    pub fn finish(self, title: &str) {
        self.c.final_summary();
        print_table(title, &self.rows);
    }
}
