#!/usr/bin/env bash
# scripts/run.sh — the README's main-job command: the forward and backward
# benchmarks (criterion). Installs any missing toolchain piece first, since
# building the benches compiles the kernels with nvcc. Without a GPU the
# benches print a skip line and exit 0. Extra arguments go to `cargo bench`,
# e.g. `bash scripts/run.sh -- --measurement-time 2`.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/prelude.sh
source scripts/prelude.sh

cargo bench --bench forward --bench backward "$@"
