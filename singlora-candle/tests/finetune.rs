//! The candle fine-tuning example's loop on candle's CPU backend (the small
//! config): the loss falls at least 100-fold through candle's autograd and
//! FusedAdamW, and the merged layer reproduces the adapter's outputs.

#[path = "../examples/finetune/backend.rs"]
mod backend;
#[path = "../../examples/finetune/task.rs"]
mod task;

use candle_core::{DType, Device};

#[test]
fn the_loss_falls_100_fold_on_the_cpu() {
    let cfg = task::Config::small();
    let mut b = backend::Candle::new(&cfg, Device::Cpu, DType::F32).unwrap();
    let report = task::train(&mut b, &cfg, |_, _, _| {}).unwrap();
    println!(
        "loss {:.3e} -> {:.3e} ({:.1e}x), held out {:.3e}, merged error {:.2e}, {:.0} tokens/s",
        report.first_loss(),
        report.final_loss(),
        report.fall(),
        report.held_out_loss,
        report.merged_error,
        report.tokens_per_s
    );
    assert!(report.fall() >= 100.0, "fell {:.1}x", report.fall());
    assert!(report.held_out_loss < report.first_loss() / 100.0);
    assert!(
        report.merged_error < 1e-5,
        "merged error {:.2e}",
        report.merged_error
    );
    assert_eq!(
        b.layer().steps(),
        cfg.steps as u64,
        "one ramp step per optimizer step"
    );
}

#[test]
fn bf16_trains_too() {
    let cfg = task::Config {
        steps: 150,
        ..task::Config::small()
    };
    let mut b = backend::Candle::new(&cfg, Device::Cpu, DType::BF16).unwrap();
    let report = task::train(&mut b, &cfg, |_, _, _| {}).unwrap();
    assert!(report.fall() >= 10.0, "fell {:.1}x", report.fall());
    assert!(
        report.merged_error < 1e-2,
        "merged error {:.2e}",
        report.merged_error
    );
}
