#!/usr/bin/env bash
# scripts/test.sh — the README's test command (and what CI runs via .ci/run).
#
# Installs any missing toolchain piece (scripts/setup.sh), then runs, in order:
#   cargo fmt --check
#   cargo clippy --release --all-targets -- -D warnings   (with DOCS_RS=1)
#   cargo test --release "$@"
#   cargo build --release --lib, then python3 python/tests/test_nogpu.py
#     (the Python package against target/release/libsinglora.so, without torch
#     and without a GPU; `cargo test` builds the cdylib under target/release/deps
#     only, `cargo build` puts it where the package looks)
# Release for the tests because the CPU reference tests do big f64 matmuls.
# Clippy cannot share the tests' build-script run (cargo builds build.rs
# separately under clippy-driver), so it would compile the kernels with nvcc a
# second time (~35 s of 2 cores). DOCS_RS=1 makes build.rs skip nvcc (empty
# fatbin; bindgen still runs): lints do not need the kernels, and the test
# build right after compiles them for real. --release shares the compiled
# build dependencies (bindgen, clang-sys, ...) with the test build.
# GPU tests print "skipped: no CUDA device (...)" and pass without a GPU.
# Extra arguments go to `cargo test`, e.g. `bash scripts/test.sh -- reference`.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/prelude.sh
source scripts/prelude.sh

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy --release --all-targets -- -D warnings"
DOCS_RS=1 cargo clippy --release --all-targets -- -D warnings
echo "==> cargo test --release $*"
cargo test --release "$@"
echo "==> cargo build --release --lib"
cargo build --release --lib
echo "==> python3 python/tests/test_nogpu.py"
python3 python/tests/test_nogpu.py
