//! Fine-tunes a SingLoRA adapter with candle's autograd, end to end: the
//! hidden-teacher task of the singlora crate's examples/finetune (the same
//! config, data and loop), on candle tensors.
//!
//! ```text
//! cargo run --release -p singlora-candle --example finetune -- [--d N] [--rank R]
//!     [--tokens N] [--steps N] [--dtype bf16|f16|f32] [--lr LR] [--cpu]
//! cargo run --release -p singlora-candle --features cuda --example finetune   # on a GPU
//! ```
//! With the `cuda` feature and a GPU it trains at d = 4096 in bf16 (the
//! forward and backward are singlora's fused kernels on candle's stream, the
//! optimizer its fused AdamW); otherwise (or with `--cpu`) the same loop
//! runs on candle's CPU backend at d = 64 in f32, and says so in its first
//! line. It prints the loss and tokens/s as it trains, then merges the
//! adapter into the frozen weight and checks the merged layer against the
//! adapter's outputs. Exits non-zero if the loss did not fall 100-fold or
//! the merged layer misses the dtype's bar.

mod backend;
#[path = "../../../examples/finetune/cli.rs"]
mod cli;
#[path = "../../../examples/finetune/task.rs"]
mod task;

use std::process::ExitCode;

use candle_core::{DType, Device};
use cli::Args;
use task::{train, Config};

/// A CUDA device, or why not.
fn gpu(args: &Args) -> Result<Device, String> {
    if args.cpu {
        return Err("--cpu was given".into());
    }
    if !cfg!(feature = "cuda") {
        return Err("built without the `cuda` feature".into());
    }
    if !singlora::runtime::device::driver_present() {
        return Err(singlora::Error::NoDriver.to_string());
    }
    Device::new_cuda(0).map_err(|e| e.to_string())
}

fn run() -> Result<(), String> {
    let args = cli::parse()?;
    let (device, cfg, default_dtype) = match gpu(&args) {
        Ok(dev) => (dev, args.apply(Config::large()), "bf16"),
        Err(why) => {
            println!(
                "no GPU ({why}): running the same loop on candle's CPU backend at a small size"
            );
            (Device::Cpu, args.apply(Config::small()), "f32")
        }
    };
    let (dtype, tolerance) = match args.dtype.as_deref().unwrap_or(default_dtype) {
        "f32" => (DType::F32, 1e-5),
        "f16" => (DType::F16, 2e-3),
        "bf16" => (DType::BF16, 1e-2),
        other => return Err(format!("--dtype must be bf16, f16 or f32, not {other}")),
    };
    let mut backend = backend::Candle::new(&cfg, device, dtype)?;
    cli::print_config(&format!("with {}", task::Backend::describe(&backend)), &cfg);
    let report = train(&mut backend, &cfg, |t, loss, tps| {
        if let Some(line) = cli::step_line(&cfg, t, loss, tps) {
            println!("{line}");
        }
    })?;
    println!(
        "{}; ramp at step {}",
        cli::summary(&report),
        backend.layer().steps()
    );
    cli::verdict(&report, tolerance)
}

fn main() -> ExitCode {
    cli::exit(run())
}
