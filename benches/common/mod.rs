//! Shared benchmark plumbing: CUDA-event timing for criterion's iter_custom,
//! the device-to-device copy bandwidth measured in the same run, random
//! device inputs, and the summary table (printed, and appended to
//! $SINGLORA_BENCH_TABLE when set).
#![allow(dead_code)]

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{sys::CUevent_flags, CudaContext, CudaSlice, CudaStream};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// Device-to-device copy bandwidth (bytes read + written per second) of a
/// 2 GiB copy, median of 10: the roofline the kernels' GB/s is compared to.
pub fn copy_bandwidth(gpu: &Gpu) -> f64 {
    let n = 1usize << 30; // bf16 elements = 2 GiB
    let src = gpu.stream.alloc_zeros::<bf16>(n).unwrap();
    let mut dst = gpu.stream.alloc_zeros::<bf16>(n).unwrap();
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
