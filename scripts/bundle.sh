#!/usr/bin/env bash
# scripts/bundle.sh — build the GPU bundle in target/gpu-bundle/.
#
# The GPU host has no Rust toolchain and no network, so everything it runs is
# prebuilt here: every test executable of `cargo test --release` (the lib's
# unit tests as bin/test-lib, each test target — tests/X.rs or
# tests/X/main.rs — as bin/test-X, one process each on the GPU host) and the
# forward, backward and merge criterion benches (bin/bench-X), stripped, plus the host-side
# driver scripts/gpu/run.sh (run there as `bash target/gpu-bundle/run.sh`) and
# any scripts/gpu/*.py; the C ABI library as lib/libsinglora.so (stripped) and
# the PyTorch binding python/ (its check.py and bench.py run there against
# that library) and peft-singlora's wheel as wheels/ (for the peft check). MANIFEST.txt records the commit, date and binaries. bin/ is
# shipped packed as bin.tar.xz (run.sh unpacks it).
# Left out: tests/kernel_quality.rs and tests/philox.rs (see HOST_ONLY_TESTS below).
# Fails if the bundle is over 60 MiB. target/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

# shellcheck source=scripts/prelude.sh
source scripts/prelude.sh

BUNDLE="$ROOT/target/gpu-bundle"
LIMIT_MIB=60
# Test targets that only make sense on the build machine: kernel_quality reads
# the fatbin and ptxas report from target/release/build/ (env! paths) and runs
# the local cuobjdump; none of that exists on the GPU host, and the test needs
# no GPU (scripts/test.sh and CI run it). philox compiles
# kernels/common/philox.cuh with the host C++ compiler (no GPU either).
HOST_ONLY_TESTS="kernel_quality philox"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "==> cargo test --release --no-run"
cargo test --release --no-run --message-format=json >"$tmp/test.json"
echo "==> cargo bench --no-run --bench forward --bench backward --bench merge"
cargo bench --no-run --bench forward --bench backward --bench merge --message-format=json >"$tmp/bench.json"
echo "==> cargo build --release --examples"
cargo build --release --examples --message-format=json >"$tmp/examples.json"
echo "==> cargo build --release --lib (libsinglora.so)"
cargo build --release --lib --message-format=json >"$tmp/lib.json"
cdylib="$(python3 - "$ROOT/Cargo.toml" "$tmp/lib.json" <<'PY'
import json, sys
manifest, path = sys.argv[1:]
for line in open(path):
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("manifest_path") == manifest \
            and "cdylib" in msg["target"]["kind"]:
        print(next(f for f in msg["filenames"] if f.endswith(".so")))
PY
)"
[[ -f "$cdylib" ]] || { echo "bundle.sh: ERROR: cargo reported no libsinglora.so" >&2; exit 1; }

# "<stable name> <executable>" per line, for this package's targets only.
python3 - "$ROOT/Cargo.toml" "$HOST_ONLY_TESTS" "$tmp/test.json" "$tmp/bench.json" "$tmp/examples.json" >"$tmp/list" <<'PY'
import json, sys
manifest, host_only, *files = sys.argv[1:]
host_only = set(host_only.split())
seen = {}
for path in files:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
                continue
            if msg.get("manifest_path") != manifest:
                continue
            target, kinds = msg["target"], msg["target"]["kind"]
            if "bench" in kinds:
                name = "bench-" + target["name"]
            elif msg["profile"]["test"]:
                if "test" in kinds and target["name"] in host_only:
                    print(f"bundle.sh: leaving out host-only test {target['name']}", file=sys.stderr)
                    continue
                # The lib target's kinds are its crate types (rlib, cdylib).
                is_lib = any(k in ("lib", "rlib", "cdylib") for k in kinds)
                name = "test-lib" if is_lib else "test-" + target["name"]
            elif "example" in kinds:
                name = "example-" + target["name"]
            else:
                continue  # bins: not run on the GPU host
            if seen.get(name, msg["executable"]) != msg["executable"]:
                sys.exit(f"bundle.sh: two executables would be named {name}")
            seen[name] = msg["executable"]
for name, exe in sorted(seen.items()):
    print(name, exe)
PY
[[ -s "$tmp/list" ]] || { echo "bundle.sh: ERROR: cargo reported no test or bench executables" >&2; exit 1; }

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin"
have_strip=1
command -v strip >/dev/null || { have_strip=0; echo "bundle.sh: warning: no strip, binaries left unstripped" >&2; }
while read -r name exe; do
    cp "$exe" "$BUNDLE/bin/$name"
    if ((have_strip)); then strip "$BUNDLE/bin/$name"; fi
done <"$tmp/list"

mkdir -p "$BUNDLE/lib"
cp "$cdylib" "$BUNDLE/lib/libsinglora.so"
# --strip-unneeded keeps the dynamic symbols (the C ABI's exports).
if ((have_strip)); then strip --strip-unneeded "$BUNDLE/lib/libsinglora.so"; fi
# The PyTorch binding, without caches.
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - python | tar -C "$BUNDLE" -xf -
# peft-singlora's wheel (9.6 kB, pure Python) for run.sh's peft-singlora
# equality check on CUDA: the GPU host has torch, transformers and peft, but
# not peft-singlora, and no network. Not committed: downloaded here.
mkdir -p "$BUNDLE/wheels"
python3 -m pip download --no-deps --disable-pip-version-check -q -d "$BUNDLE/wheels" peft-singlora==0.2.0 ||
    echo "bundle.sh: warning: could not download peft-singlora==0.2.0; run.sh's peft check will fail" >&2

cp scripts/gpu/run.sh "$BUNDLE/run.sh"
chmod +x "$BUNDLE/run.sh"
shopt -s nullglob
for py in scripts/gpu/*.py; do cp "$py" "$BUNDLE/"; done
shopt -u nullglob

if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
    # GIT_OPTIONAL_LOCKS=0: status must not rewrite the index (read-only use).
    [[ -z "$(GIT_OPTIONAL_LOCKS=0 git status --porcelain 2>/dev/null)" ]] || commit="$commit-dirty"
else
    commit="no-commit"
fi
{
    echo "singlora GPU bundle"
    echo "commit: $commit"
    echo "built:  $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "run:    bash target/gpu-bundle/run.sh   (results in \$OUT, default ./gpu-results)"
    echo "binaries (bytes):"
    for f in "$BUNDLE"/bin/* "$BUNDLE"/lib/*; do
        printf '  %-24s %12d\n' "$(basename "$f")" "$(stat -c %s "$f")"
    done
} >"$BUNDLE/MANIFEST.txt"

# Every test and bench binary carries the kernels and most of the same code:
# packed together with xz (whose window spans several binaries) they shrink
# about six-fold (24 binaries: 71 MB → 11 MB), which is what keeps the bundle
# under its limit. run.sh unpacks bin/ on the GPU host before anything else
# (to run one binary by hand there: tar -xJf bin.tar.xz).
if command -v xz >/dev/null; then
    echo "==> packing bin/ into bin.tar.xz"
    tar -C "$BUNDLE" -cf - bin | xz -T2 -6 >"$BUNDLE/bin.tar.xz"
    rm -rf "$BUNDLE/bin"
    echo "packed: bin/ is in bin.tar.xz ($(stat -c %s "$BUNDLE/bin.tar.xz") bytes); run.sh unpacks it" >>"$BUNDLE/MANIFEST.txt"
else
    echo "bundle.sh: warning: no xz, bin/ left unpacked" >&2
fi

echo "==> target/gpu-bundle"
cat "$BUNDLE/MANIFEST.txt"
du -sh "$BUNDLE"
size_kib="$(du -sk "$BUNDLE" | cut -f1)"
if ((size_kib > LIMIT_MIB * 1024)); then
    echo "bundle.sh: ERROR: the bundle is $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB limit" >&2
    exit 1
fi
