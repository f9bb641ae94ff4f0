//! The main job: fine-tune a SingLoRA adapter to recover a hidden teacher.
//!
//! ```text
//! cargo run --release --example finetune -- [--d 4096] [--rank 16] [--tokens 4096]
//!     [--steps 400] [--dtype bf16|f16|f32] [--lr 5e-3] [--cpu]
//! ```
//! With a GPU it trains at d = 4096 in bf16 with the fused kernels (the
//! layer, the device-side MSE and AdamW); without one (or with `--cpu`) it
//! runs the same loop on the f64 CPU reference at d = 64, and says so in its
//! first line. It prints the loss as it falls, then merges the adapter into
//! the frozen weight and checks the merged layer against the adapter's
//! outputs. Exits non-zero if the loss did not fall 100-fold or the merged
//! layer misses the dtype's bar.

#[path = "cli.rs"]
mod cli;
#[path = "task.rs"]
mod task;

use std::process::ExitCode;

use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use singlora::{open_device, DType, Error};
use task::{gpu::Gpu, train, Backend, Config, Cpu};

fn gpu_backend<T: DType>(cfg: &Config, device: &str) -> Result<Box<dyn Backend>, String>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let ctx = open_device(0).map_err(|e| e.to_string())?;
    let stream = ctx.new_stream().map_err(|e| e.to_string())?;
    Ok(Box::new(Gpu::<T>::new(&stream, cfg, device)?))
}

fn run() -> Result<(), String> {
    let args = cli::parse()?;
    let gpu = if args.cpu {
        Err("--cpu was given".to_string())
    } else {
        match open_device(0) {
            Ok(ctx) => Ok(ctx.name().unwrap_or_else(|_| "CUDA device".into())),
            Err(
                e @ (Error::NoDriver | Error::NoDevice { .. } | Error::UnsupportedDevice { .. }),
            ) => Err(e.to_string()),
            Err(e) => return Err(e.to_string()),
        }
    };
    let (cfg, mut backend, tolerance): (Config, Box<dyn Backend>, f64) = match gpu {
        Ok(device) => {
            let cfg = args.apply(Config::large());
            match args.dtype.as_deref().unwrap_or("bf16") {
                "f32" => (
                    cfg.clone(),
                    gpu_backend::<f32>(&cfg, &device)?,
                    f32::TOLERANCE,
                ),
                "f16" => (
                    cfg.clone(),
                    gpu_backend::<f16>(&cfg, &device)?,
                    f16::TOLERANCE,
                ),
                _ => (
                    cfg.clone(),
                    gpu_backend::<bf16>(&cfg, &device)?,
                    bf16::TOLERANCE,
                ),
            }
        }
        Err(why) => {
            println!(
                "no GPU ({why}): running the same loop on the f64 CPU reference at a small size"
            );
            let cfg = args.apply(Config::small());
            (cfg.clone(), Box::new(Cpu::new(&cfg)?), 1e-12)
        }
    };
    cli::print_config(&format!("on {}", backend.describe()), &cfg);

    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}")
            .map_err(|e| e.to_string())?,
    );
    let report = train(backend.as_mut(), &cfg, |t, loss, tps| {
        bar.set_position(t as u64 + 1);
        bar.set_message(format!("loss {loss:.3e}  {tps:.0} tokens/s"));
        if let Some(line) = cli::step_line(&cfg, t, loss, tps) {
            // A hidden bar (output is not a terminal) prints nothing.
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        }
    })?;
    bar.finish_and_clear();

    println!("{}", cli::summary(&report));
    cli::verdict(&report, tolerance)
}

fn main() -> ExitCode {
    cli::exit(run())
}
