#!/usr/bin/env bash
# scripts/run.sh — the README's main-job command: examples/finetune, which
# trains a SingLoRA adapter to recover a hidden teacher and merges it.
# Installs any missing toolchain piece first (building the crate compiles the
# kernels with nvcc). With a GPU it trains at d = 4096 in bf16; without one it
# runs the same loop on the f64 CPU reference at d = 64 and says so in its
# first line. Extra arguments go to the example, e.g.
#     bash scripts/run.sh --d 2048 --rank 32 --dtype f16
# The benchmarks: cargo bench --bench forward --bench backward --bench merge.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/prelude.sh
source scripts/prelude.sh

cargo run --release --example finetune -- "$@"
