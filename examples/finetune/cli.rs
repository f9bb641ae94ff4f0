//! The command line of the two finetune examples (this one and
//! singlora-candle's examples/finetune, which includes this file next to
//! task.rs): the flags and the config they override, the lines a run prints,
//! and its verdict.
#![allow(dead_code)]

use std::process::ExitCode;

use crate::task::{Config, Report};

/// The loss must fall at least this many times.
pub const MIN_FALL: f64 = 100.0;

/// The dtypes `--dtype` takes.
pub const DTYPES: [&str; 3] = ["bf16", "f16", "f32"];

/// The flags: what the example decides (`dtype`, `cpu`), and the config's
/// overrides, which [`Args::apply`] applies.
pub struct Args {
    /// One of [`DTYPES`]; `None` leaves the choice to the example.
    pub dtype: Option<String>,
    pub cpu: bool,
    d: Option<usize>,
    rank: Option<usize>,
    tokens: Option<usize>,
    steps: Option<usize>,
    lr: Option<f32>,
}

/// The process's flags.
pub fn parse() -> Result<Args, String> {
    let mut a = Args {
        dtype: None,
        cpu: false,
        d: None,
        rank: None,
        tokens: None,
        steps: None,
        lr: None,
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
    if let Some(dtype) = &a.dtype {
        if !DTYPES.contains(&dtype.as_str()) {
            return Err(format!("--dtype must be bf16, f16 or f32, not {dtype}"));
        }
    }
    Ok(a)
}

impl Args {
    /// `cfg` with the sizes, steps and learning rate the flags give.
    pub fn apply(&self, mut cfg: Config) -> Config {
        cfg.d = self.d.unwrap_or(cfg.d);
        if let Some(r) = self.rank {
            // Keep alpha / rank = 1, the scale the defaults train at.
            cfg.alpha = r as f64;
            cfg.rank = r;
        }
        cfg.tokens = self.tokens.unwrap_or(cfg.tokens);
        cfg.steps = self.steps.unwrap_or(cfg.steps);
        cfg.lr = self.lr.unwrap_or(cfg.lr);
        cfg
    }
}

/// The first line after the device's: `finetune {on}: d = …` (`on`: "on
/// <backend>" or "with <backend>").
pub fn print_config(on: &str, cfg: &Config) {
    println!(
        "finetune {on}: d = {}, rank = {}, alpha = {}, {} tokens/step, {} steps, ramp over {} steps",
        cfg.d, cfg.rank, cfg.alpha, cfg.tokens, cfg.steps, cfg.warmup
    );
}

/// The progress line of step `t`, on every tenth of the run and its last
/// step; `None` between.
// `is_multiple_of` is newer than singlora's rust-version (1.80).
#[allow(clippy::manual_is_multiple_of)]
pub fn step_line(cfg: &Config, t: usize, loss: f64, tokens_per_s: f64) -> Option<String> {
    let every = (cfg.steps / 10).max(1);
    (t % every == 0 || t + 1 == cfg.steps).then(|| {
        format!(
            "step {:>5}  loss {loss:.4e}  {tokens_per_s:.0} tokens/s",
            t + 1
        )
    })
}

/// The run's summary: the losses, the held-out loss, the time and speed.
pub fn summary(report: &Report) -> String {
    format!(
        "loss {:.4e} -> {:.4e} (fell {:.2e}x); held-out loss {:.4e}; {:.2} s, {:.0} tokens/s",
        report.first_loss(),
        report.final_loss(),
        report.fall(),
        report.held_out_loss,
        report.seconds,
        report.tokens_per_s
    )
}

/// Prints the merged layer's error against `tolerance`, then: an error if the
/// loss fell less than [`MIN_FALL`] times or the merged layer misses the bar,
/// else "OK".
pub fn verdict(report: &Report, tolerance: f64) -> Result<(), String> {
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

/// The process's exit: success, or the error on stderr and failure.
pub fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finetune: {e}");
            ExitCode::FAILURE
        }
    }
}
