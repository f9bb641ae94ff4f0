//! The main job's training loop (examples/finetune/task.rs) converges: on
//! the CPU reference always, and on the GPU when there is one.

#[path = "../examples/finetune/task.rs"]
mod task;

mod common;

use half::bf16;
use task::{train, Config, Cpu};

#[test]
fn finetune_converges_on_the_cpu_reference() {
    let cfg = Config {
        steps: 200,
        ..Config::small()
    };
    let mut cpu = Cpu::new(&cfg).unwrap();
    let report = train(&mut cpu, &cfg, |_, _, _| {}).unwrap();
    assert!(
        report.fall() > 1e4,
        "the loss fell only {:.1}x: {:?}",
        report.fall(),
        &report.losses[..5]
    );
    assert!(
        report.held_out_loss < report.first_loss() / 1e4,
        "held-out {}",
        report.held_out_loss
    );
    assert!(
        report.merged_error < 1e-12,
        "merged {}",
        report.merged_error
    );
    // The loss is recorded once per step.
    assert_eq!(report.losses.len(), cfg.steps);
}

#[test]
fn finetune_converges_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    let cfg = Config {
        d: 512,
        rank: 8,
        alpha: 8.0,
        tokens: 1024,
        steps: 300,
        lr: 1e-2,
        ..Config::small()
    };
    let mut backend = task::gpu::Gpu::<bf16>::new(&gpu.stream, &cfg, "test GPU").unwrap();
    let report = train(&mut backend, &cfg, |_, _, _| {}).unwrap();
    println!(
        "bf16 d=512: loss {:.3e} -> {:.3e} ({:.0}x), held-out {:.3e}, merged error {:.2e}",
        report.first_loss(),
        report.final_loss(),
        report.fall(),
        report.held_out_loss,
        report.merged_error
    );
    assert!(
        report.fall() > 100.0,
        "the loss fell only {:.1}x",
        report.fall()
    );
    assert!(report.held_out_loss < report.first_loss() / 100.0);
    assert!(
        report.merged_error <= 1e-2,
        "merged {}",
        report.merged_error
    );
}
