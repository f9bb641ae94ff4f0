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
#[path = "../../../examples/finetune/task.rs"]
mod task;

use std::process::ExitCode;

use candle_core::{DType, Device};
use task::{train, Config};

/// The loss must fall at least this many times.
const MIN_FALL: f64 = 100.0;

struct Args {
    d: Option<usize>,
    rank: Option<usize>,
    tokens: Option<usize>,
    steps: Option<usize>,
    lr: Option<f32>,
    dtype: Option<String>,
    cpu: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        d: None,
        rank: None,
        tokens: None,
        steps: None,
        lr: None,
        dtype: None,
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
            "--dtype" => a.dtype = Some(value("--dtype")?),
            "--cpu" => a.cpu = true,
            "-h" | "--help" => {
                println!("usage: finetune [--d N] [--rank R] [--tokens N] [--steps N] [--dtype bf16|f16|f32] [--lr LR] [--cpu]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
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
    let args = parse()?;
    let (device, cfg, default_dtype) = match gpu(&args) {
        Ok(dev) => (dev, apply(&args, Config::large()), "bf16"),
        Err(why) => {
            println!(
                "no GPU ({why}): running the same loop on candle's CPU backend at a small size"
            );
            (Device::Cpu, apply(&args, Config::small()), "f32")
        }
    };
    let (dtype, tolerance) = match args.dtype.as_deref().unwrap_or(default_dtype) {
        "f32" => (DType::F32, 1e-5),
        "f16" => (DType::F16, 2e-3),
        "bf16" => (DType::BF16, 1e-2),
        other => return Err(format!("--dtype must be bf16, f16 or f32, not {other}")),
    };
    let mut backend = backend::Candle::new(&cfg, device, dtype)?;
    println!(
        "finetune with {}: d = {}, rank = {}, alpha = {}, {} tokens/step, {} steps, ramp over {} steps",
        task::Backend::describe(&backend),
        cfg.d,
        cfg.rank,
        cfg.alpha,
        cfg.tokens,
        cfg.steps,
        cfg.warmup
    );
    let report_every = (cfg.steps / 10).max(1);
    let report = train(&mut backend, &cfg, |t, loss, tps| {
        if t % report_every == 0 || t + 1 == cfg.steps {
            println!("step {:>5}  loss {loss:.4e}  {tps:.0} tokens/s", t + 1);
        }
    })?;
    println!(
        "loss {:.4e} -> {:.4e} (fell {:.2e}x); held-out loss {:.4e}; {:.2} s, {:.0} tokens/s; ramp at step {}",
        report.first_loss(),
        report.final_loss(),
        report.fall(),
        report.held_out_loss,
        report.seconds,
        report.tokens_per_s,
        backend.layer().steps()
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
