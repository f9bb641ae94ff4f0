#!/usr/bin/env bash
# scripts/test.sh — the README's test command (and what CI runs via .ci/run).
#
# Installs any missing toolchain piece (scripts/setup.sh), then runs, in order:
#   cargo fmt --check
#   cargo clippy --release --all-targets -- -D warnings   (with DOCS_RS=1)
#   cargo doc --release --no-deps, warnings as errors (broken intra-doc links)
#   cargo test --release "$@", then a count of the GPU tests skipped and why
#   cargo test --release -p singlora-candle (the candle binding, workspace
#     member: candle's CPU backend; its clippy runs after singlora's)
#   cargo check of checks/coexist three ways (a dependent of singlora with
#     candle-core 0.11.1's exact cudarc features; seconds, no linking)
#   cargo build --release --lib, then python3 python/tests/test_nogpu.py
#     (the Python package against target/release/libsinglora.so, without torch
#     and without a GPU; `cargo test` builds the cdylib under target/release/deps
#     only, `cargo build` puts it where the package looks)
#   python3 python/tests/test_torch_cpu.py   (the torch binding's logic on CPU
#     with faked launches; torch from .toolchain/torch, see setup.sh)
#   python3 python/tests/test_library_cpu.py   (the torch.library ops on CPU:
#     opcheck, torch.compile without graph breaks or recompiles, numerics)
#   python3 python/tests/test_peft_cpu.py   (singlora.peft: inject, the
#     peft-singlora 0.2 layers and state dicts both ways; peft-singlora, peft
#     and transformers from .toolchain/peft, its cases skipped with the reason
#     printed when setup.sh could not install them)
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
echo "==> cargo clippy --release -p singlora-candle --all-targets -- -D warnings"
DOCS_RS=1 cargo clippy --release -p singlora-candle --all-targets -- -D warnings
echo "==> cargo doc --release --no-deps (warnings are errors)"
DOCS_RS=1 RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --quiet
echo "==> cargo test --release $*"
# The tests' own output is shown (RUST_TEST_NOCAPTURE) so that every GPU
# test's skip line can be counted below: libtest counts a skipped GPU test
# as passed.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
RUST_TEST_NOCAPTURE=1 cargo test --release "$@" 2>&1 | tee "$log"
echo "==> cargo test --release -p singlora-candle"
# The workspace member (default-members is singlora alone, so the command
# above never compiles candle). Without DOCS_RS: it reuses the kernels the
# build above compiled (singlora with the same features); candle's CPU
# backend only, so no CUDA library is needed.
cargo test --release -p singlora-candle
echo "==> cudarc coexistence: cargo check of checks/coexist"
# A dependent's crate: singlora next to cudarc with candle-core 0.11.1's
# exact features (dynamic-linking, cuda-version-from-build-system). cargo
# check links nothing, so no CUDA library is needed; it shares this target
# folder (its own cudarc features give it its own units).
coexist() {
    DOCS_RS=1 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
        cargo check --release --quiet --manifest-path checks/coexist/Cargo.toml "$@"
}
echo "    singlora's default CUDA version (cuda-13000)"
coexist
echo "    the dependent's own version (singlora without default features, cudarc/cuda-12080)"
coexist --no-default-features --features own-version
echo "    candle's choice (cuda-version-from-build-system: the pinned nvcc --version)"
PATH="$PWD/.toolchain/py/nvidia/cu13/bin:$PATH" coexist --no-default-features
echo "==> cargo build --release --lib"
cargo build --release --lib
echo "==> python3 python/tests/test_nogpu.py"
python3 python/tests/test_nogpu.py
echo "==> python3 python/tests/test_torch_cpu.py"
SINGLORA_REQUIRE_TORCH=1 PYTHONPATH=".toolchain/torch${PYTHONPATH:+:$PYTHONPATH}" \
    python3 python/tests/test_torch_cpu.py
echo "==> python3 python/tests/test_library_cpu.py"
SINGLORA_REQUIRE_TORCH=1 PYTHONPATH=".toolchain/torch${PYTHONPATH:+:$PYTHONPATH}" \
    python3 python/tests/test_library_cpu.py
echo "==> python3 python/tests/test_peft_cpu.py"
SINGLORA_REQUIRE_TORCH=1 PYTHONPATH=".toolchain/torch:.toolchain/peft${PYTHONPATH:+:$PYTHONPATH}" \
    python3 python/tests/test_peft_cpu.py

# The GPU tests this machine skipped, and why (a GPU test prints
# "skipped: no CUDA device (<reason>)" and passes; with SINGLORA_REQUIRE_GPU=1
# a skip fails instead).
skipped="$(grep -o 'skipped: no CUDA device ([^)]*)' "$log" | sort | uniq -c || true)"
total="$(grep -o 'skipped: no CUDA device' "$log" | wc -l)"
echo "==> GPU tests skipped: $total"
if [[ -n "$skipped" ]]; then
    echo "$skipped" | sed 's/^ */    /'
fi

