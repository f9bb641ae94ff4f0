# scripts/prelude.sh — sourced (from the repository root) by test.sh, run.sh
# and bundle.sh: installs what is missing (scripts/setup.sh), then sets the
# build environment the three share, so that their builds reuse each other's
# output (build.rs reruns when SINGLORA_NVCC_THREADS changes).
bash scripts/setup.sh
# shellcheck source=/dev/null
source .toolchain/env.sh
# Lean builds for CI's 2 cores.
export CARGO_INCREMENTAL=0
export SINGLORA_NVCC_THREADS="${SINGLORA_NVCC_THREADS:-2}"
