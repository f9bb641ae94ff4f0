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

#[path = "task.rs"]
mod task;

use std::process::ExitCode;

use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use singlora::{open_device, DType, Error};
use task::{gpu::Gpu, train, Backend, Config, Cpu};

/// The loss must fall at least this many times.
const MIN_FALL: f64 = 100.0;

struct Args {
    d: Option<usize>,
    rank: Option<usize>,
    tokens: Option<usize>,
    steps: Option<usize>,
    lr: Option<f32>,
    dtype: String,
    cpu: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        d: None,
        rank: None,
        tokens: None,
        steps: None,
        lr: None,
        dtype: "bf16".into(),
        cpu: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |name: &str, v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--d" => a.d = Some(num("--d", value("--d")?)?),
            "--rank" => a.rank = Some(num("--rank", value("--rank")?)?),
            "--tokens" => a.tokens = Some(num("--tokens", value("--tokens")?)?),
            "--steps" => a.steps = Some(num("--steps", value("--steps")?)?),
            "--lr" => {
                let v = value("--lr")?;
                a.lr = Some(v.parse().map_err(|_| format!("--lr: not a number: {v}"))?);
            }
            "--dtype" => a.dtype = value("--dtype")?,
            "--cpu" => a.cpu = true,
            "-h" | "--help" => {
                println!("usage: finetune [--d N] [--rank R] [--tokens N] [--steps N] [--dtype bf16|f16|f32] [--lr LR] [--cpu]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    if !["bf16", "f16", "f32"].contains(&a.dtype.as_str()) {
        return Err(format!("--dtype must be bf16, f16 or f32, not {}", a.dtype));
    }
    Ok(a)
}

fn apply(args: &Args, mut cfg: Config) -> Config {
    cfg.d = args.d.unwrap_or(cfg.d);
    if let Some(r) = args.rank {
        // Keep alpha / rank = 1, the scale the defaults train at.
        cfg.alpha = r as f64;
        cfg.rank = r;
    }
    cfg.tokens = args.tokens.unwrap_or(cfg.tokens);
    cfg.steps = args.steps.unwrap_or(cfg.steps);
    cfg.lr = args.lr.unwrap_or(cfg.lr);
    cfg
}

fn gpu_backend<T: DType>(cfg: &Config, device: &str) -> Result<Box<dyn Backend>, String>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let ctx = open_device(0).map_err(|e| e.to_string())?;
    let stream = ctx.new_stream().map_err(|e| e.to_string())?;
    Ok(Box::new(Gpu::<T>::new(&stream, cfg, device)?))
}

fn run() -> Result<(), String> {
    let args = parse()?;
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
            let cfg = apply(&args, Config::large());
            match args.dtype.as_str() {
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
            let cfg = apply(&args, Config::small());
            (cfg.clone(), Box::new(Cpu::new(&cfg)?), 1e-12)
        }
    };
    println!(
        "finetune on {}: d = {}, rank = {}, alpha = {}, {} tokens/step, {} steps, ramp over {} steps",
        backend.describe(),
        cfg.d,
        cfg.rank,
        cfg.alpha,
        cfg.tokens,
        cfg.steps,
        cfg.warmup
    );

    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}")
            .map_err(|e| e.to_string())?,
    );
    let report_every = (cfg.steps / 10).max(1);
    let report = train(backend.as_mut(), &cfg, |t, loss, tps| {
        bar.set_position(t as u64 + 1);
        bar.set_message(format!("loss {loss:.3e}  {tps:.0} tokens/s"));
        if t % report_every == 0 || t + 1 == cfg.steps {
            let line = format!("step {:>5}  loss {loss:.4e}  {tps:.0} tokens/s", t + 1);
            // A hidden bar (output is not a terminal) prints nothing.
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        }
    })?;
    bar.finish_and_clear();

    println!(
        "loss {:.4e} -> {:.4e} (fell {:.2e}x); held-out loss {:.4e}; {:.2} s, {:.0} tokens/s",
        report.first_loss(),
        report.final_loss(),
        report.fall(),
        report.held_out_loss,
        report.seconds,
        report.tokens_per_s
    );
    println!(
        "merged layer vs adapter outputs: relative L2 error {:.3e} (bar {:.0e})",
        report.merged_error, tolerance
    );
    if report.fall() < MIN_FALL {
        return Err(format!(
            "the loss fell only {:.1}x (needs {MIN_FALL}x)",
            report.fall()
        ));
    }
    if report.merged_error.is_nan() || report.merged_error > tolerance {
        return Err("the merged layer misses the bar".into());
    }
    println!("OK");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finetune: {e}");
            ExitCode::FAILURE
        }
    }
}
