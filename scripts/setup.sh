#!/usr/bin/env bash
# scripts/setup.sh — make sure the tools the build and the tests need exist.
#
# build.rs compiles kernels/*.cu with nvcc and runs bindgen (which needs
# libclang); the kernel-quality tests read the fatbin with cuobjdump. None of
# these is assumed to be installed system-wide (CI has no CUDA and no
# libclang.so), so anything missing is installed with pip, without root, into
# the git-ignored project folder .toolchain/:
#   .toolchain/py     pinned CUDA 13.0 compiler wheels + libclang 18.1.1
#                     (build.rs looks here last, after $NVCC, $CUDA_HOME,
#                     $CUDA_PATH and PATH)
#   .toolchain/tools  cuobjdump + nvdisasm 13.2.51 (no 13.0 release exists;
#                     13.2 reads 13.0 fatbins)
#   .toolchain/torch  torch 2.11.0 with its dependencies, when python3 has no
#                     torch (for python/tests/test_torch_cpu.py, which
#                     scripts/test.sh runs with it on PYTHONPATH; ~4.6 GB,
#                     ~2 min from PyPI; the GPU runner's torch is 2.11)
#   .toolchain/peft   peft-singlora 0.2.0, peft 0.21.2, transformers 5.24.0 and
#                     their dependencies, pinned, without torch (for
#                     python/tests/test_peft_cpu.py; ~290 MB, ~30 s; a failure
#                     here is a warning: that test then skips its peft cases)
# The versions are pinned exactly: an unpinned nvidia-nvvm resolves to a newer
# release whose PTX the 13.0 ptxas rejects.
#
# Idempotent: something already found is left alone, so a second run installs
# nothing. Finally writes .toolchain/env.sh, which the other scripts source.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

TC="$ROOT/.toolchain"
PY_TARGET="$TC/py"
TOOLS_TARGET="$TC/tools"
LOCAL_NVCC="$PY_TARGET/nvidia/cu13/bin/nvcc"
LOCAL_LIBCLANG_DIR="$PY_TARGET/clang/native"
LOCAL_CUOBJDUMP="$TOOLS_TARGET/nvidia/cu13/bin/cuobjdump"
NVCC_MARKER="$PY_TARGET/.singlora-nvcc-verified"

CUDA_WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-nvvm==13.0.88
    'nvidia-cuda-cccl>=13.0,<13.1'
)
LIBCLANG_WHEEL=libclang==18.1.1
TOOLS_WHEELS=(nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51)
TORCH_TARGET="$TC/torch"
TORCH_WHEEL=torch==2.11.0
PEFT_TARGET="$TC/peft"
# The closure of peft-singlora==0.2.0 (peft, transformers, accelerate) as pip
# resolves it next to torch 2.11.0, less torch and its own dependencies (in
# .toolchain/torch): installed --no-deps, because pip --target ignores what is
# installed and would fetch a second torch.
PEFT_WHEELS=(
    peft-singlora==0.2.0 peft==0.21.2 transformers==5.24.0 accelerate==1.15.0
    huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 hf-xet==1.8.0
    numpy==2.4.6 packaging==26.4 PyYAML==6.0.4 regex==2026.11.19 tqdm==4.70.1 psutil==7.2.2
    httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typer==0.29.2 click==8.5.1 rich==15.0.0 shellingham==1.5.4 annotated-doc==0.0.7
    markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0
)

die() {
    echo "setup.sh: ERROR: $*" >&2
    exit 1
}

pip_install() { # <target dir> <requirement>...
    local target="$1"
    shift
    python3 -m pip --version >/dev/null 2>&1 ||
        die "python3 -m pip is not available; it is needed to install: $*"
    mkdir -p "$target"
    # --upgrade: pip --target otherwise skips top-level folders that already
    # exist (e.g. a half-installed nvidia/), leaving a broken toolchain.
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --no-deps --disable-pip-version-check -q --upgrade \
        --target "$target" "$@" ||
        die "pip could not install $* into $target"
}

# ---------------------------------------------------------------- nvcc
# Same search order as build.rs::find_nvcc.
find_nvcc() {
    if [[ -n "${NVCC:-}" ]]; then
        [[ -f "$NVCC" ]] || die "NVCC=$NVCC is set but is not a file (build.rs would fail too)"
        echo "$NVCC"
        return
    fi
    local var root
    for var in CUDA_HOME CUDA_PATH; do
        root="${!var:-}"
        if [[ -n "$root" && -f "$root/bin/nvcc" ]]; then
            echo "$root/bin/nvcc"
            return
        fi
    done
    local IFS=:
    for root in $PATH; do
        if [[ -n "$root" && -f "$root/nvcc" ]]; then
            echo "$root/nvcc"
            return
        fi
    done
    if [[ -f "$LOCAL_NVCC" ]]; then
        echo "$LOCAL_NVCC"
    fi
}

# Checks the local toolchain: version 13.0, then (once, remembered in a marker)
# a tiny kernel compiled to sm_80 SASS, which exercises cicc (nvvm), ptxas,
# the runtime/crt headers and the host compiler together.
verify_local_nvcc() {
    local version
    version="$("$LOCAL_NVCC" --version 2>&1)" ||
        die "$LOCAL_NVCC does not run:
$version
Remove .toolchain/py and run scripts/setup.sh again."
    grep -q 'release 13\.0' <<<"$version" ||
        die "$LOCAL_NVCC is not CUDA 13.0:
$version
Remove .toolchain/py and run scripts/setup.sh again."
    local want
    want="$(grep 'release' <<<"$version")"
    if [[ -f "$NVCC_MARKER" && "$(cat "$NVCC_MARKER")" == "$want" ]]; then
        return
    fi
    local tmp
    tmp="$(mktemp -d)"
    cat >"$tmp/smoke.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void smoke(__half *y, const __nv_bfloat16 *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(__bfloat162float(x[i]) * 2.0f);
}
EOF
    local log
    if ! log="$("$LOCAL_NVCC" -cubin -arch=sm_80 -o "$tmp/smoke.cubin" "$tmp/smoke.cu" 2>&1)"; then
        rm -rf "$tmp"
        die "the local CUDA toolchain cannot compile a test kernel (mismatched wheel versions?):
$log
Remove .toolchain/py and run scripts/setup.sh again."
    fi
    rm -rf "$tmp"
    echo "$want" >"$NVCC_MARKER"
}

# ---------------------------------------------------------------- libclang
# A system libclang that clang-sys (bindgen) finds by itself: ldconfig's cache
# or the usual LLVM folders. libclang-cpp is a different library.
find_system_libclang() {
    local hit
    hit="$( (ldconfig -p 2>/dev/null || true) |
        awk '$1 ~ /^libclang(-[0-9][0-9.]*)?\.so(\.[0-9]+)*$/ { print $NF; exit }')"
    if [[ -n "$hit" ]]; then
        echo "$hit"
        return
    fi
    local f
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
        /usr/local/llvm*/lib*/libclang.so* /usr/local/lib*/libclang.so* \
        /usr/lib*/libclang.so* /usr/lib*/*/libclang.so* /usr/lib*/*/libclang-[0-9]*.so*; do
        if [[ -f "$f" ]]; then
            echo "$f"
            return
        fi
    done
}

# ---------------------------------------------------------------- decide
need_py=()

nvcc="$(find_nvcc)"
if [[ -n "$nvcc" ]]; then
    nvcc_state=found
else
    nvcc_state=install
    need_py+=("${CUDA_WHEELS[@]}")
fi

libclang_state=
if [[ -n "${LIBCLANG_PATH:-}" ]]; then
    libclang_state="found libclang via LIBCLANG_PATH=$LIBCLANG_PATH"
elif [[ -f "$LOCAL_LIBCLANG_DIR/libclang.so" ]]; then
    # build.rs prefers the local one over a system one, so check it first.
    libclang_state="found libclang at $LOCAL_LIBCLANG_DIR/libclang.so"
else
    sys_libclang="$(find_system_libclang)"
    if [[ -n "$sys_libclang" ]]; then
        libclang_state="found libclang at $sys_libclang"
    else
        need_py+=("$LIBCLANG_WHEEL")
    fi
fi

# One pip call for everything bound for .toolchain/py.
if ((${#need_py[@]})); then
    pip_install "$PY_TARGET" "${need_py[@]}"
    rm -f "$NVCC_MARKER"
fi

# ---------------------------------------------------------------- report
if [[ "$nvcc_state" == install ]]; then
    [[ -f "$LOCAL_NVCC" ]] || die "pip finished but $LOCAL_NVCC does not exist"
    nvcc="$LOCAL_NVCC"
    verify_local_nvcc
    echo "installed nvcc (CUDA 13.0.88 wheels) at $nvcc"
else
    if [[ "$nvcc" == "$LOCAL_NVCC" ]]; then
        verify_local_nvcc
    elif ! "$nvcc" --version >/dev/null 2>&1; then
        die "$nvcc (found first, as build.rs would) does not run"
    fi
    echo "found nvcc at $nvcc ($("$nvcc" --version 2>&1 | grep -o 'release [0-9.]*' || echo 'unknown version'))"
fi

if [[ -z "$libclang_state" ]]; then
    [[ -f "$LOCAL_LIBCLANG_DIR/libclang.so" ]] ||
        die "pip finished but $LOCAL_LIBCLANG_DIR/libclang.so does not exist"
    echo "installed libclang 18.1.1 at $LOCAL_LIBCLANG_DIR/libclang.so"
else
    echo "$libclang_state"
fi

# ---------------------------------------------------------------- cuobjdump
if cuobjdump="$(command -v cuobjdump)"; then
    echo "found cuobjdump at $cuobjdump"
elif [[ -x "$LOCAL_CUOBJDUMP" ]]; then
    cuobjdump="$LOCAL_CUOBJDUMP"
    echo "found cuobjdump at $cuobjdump"
else
    pip_install "$TOOLS_TARGET" "${TOOLS_WHEELS[@]}"
    [[ -x "$LOCAL_CUOBJDUMP" ]] || die "pip finished but $LOCAL_CUOBJDUMP does not exist"
    cuobjdump="$LOCAL_CUOBJDUMP"
    echo "installed cuobjdump + nvdisasm 13.2.51 at $(dirname "$cuobjdump")"
fi
"$cuobjdump" --version >/dev/null 2>&1 || die "$cuobjdump does not run"

# ---------------------------------------------------------------- torch
# For the CPU test of the torch binding only (no GPU needed). Unlike the
# wheels above, torch is installed WITH its dependencies (sympy, networkx,
# the nvidia-* runtime wheels, ...), into its own folder.
if python3 -c "import torch" >/dev/null 2>&1; then
    echo "found torch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
elif PYTHONPATH="$TORCH_TARGET" python3 -c "import torch" >/dev/null 2>&1; then
    echo "found torch at $TORCH_TARGET"
else
    python3 -m pip --version >/dev/null 2>&1 ||
        die "python3 -m pip is not available; it is needed to install $TORCH_WHEEL"
    mkdir -p "$TORCH_TARGET"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check -q --upgrade \
        --target "$TORCH_TARGET" "$TORCH_WHEEL" ||
        die "pip could not install $TORCH_WHEEL into $TORCH_TARGET"
    PYTHONPATH="$TORCH_TARGET" python3 -c "import torch" >/dev/null 2>&1 ||
        die "pip installed $TORCH_WHEEL into $TORCH_TARGET, but python3 cannot import it"
    echo "installed $TORCH_WHEEL at $TORCH_TARGET"
fi

# ---------------------------------------------------------------- peft
# For python/tests/test_peft_cpu.py only (the peft-singlora round trip). Not
# fatal: without these the test skips those cases and prints why.
peft_import() { # prints transformers' version, or the import error's last line
    PYTHONPATH="$TORCH_TARGET:$PEFT_TARGET" python3 -c \
        "import peft_singlora, peft, transformers; print(transformers.__version__)" 2>&1 | tail -1
}
peft_state="$(peft_import)" || true
if [[ "$peft_state" =~ ^[0-9] ]]; then
    echo "found peft-singlora, peft and transformers $peft_state"
elif ! python3 -m pip --version >/dev/null 2>&1; then
    echo "setup.sh: warning: no pip to install peft-singlora, peft, transformers (test_peft_cpu.py skips them)" >&2
elif ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --no-deps --disable-pip-version-check -q \
    --upgrade --target "$PEFT_TARGET" "${PEFT_WHEELS[@]}"; then
    echo "setup.sh: warning: pip could not install peft-singlora, peft, transformers into $PEFT_TARGET" \
        "(test_peft_cpu.py skips them)" >&2
elif peft_state="$(peft_import)" && [[ "$peft_state" =~ ^[0-9] ]]; then
    echo "installed peft-singlora 0.2.0, peft 0.21.2, transformers $peft_state at $PEFT_TARGET"
else
    echo "setup.sh: warning: peft-singlora, peft, transformers installed but do not import:" \
        "$peft_state (test_peft_cpu.py skips them)" >&2
fi

# ---------------------------------------------------------------- env.sh
# Deliberately no LIBCLANG_PATH, PATH or NVCC here: build.rs already finds the
# local toolchain itself, and it declares rerun-if-env-changed on those
# variables, so exporting them would make builds from these scripts and plain
# `cargo` builds invalidate each other (a full nvcc recompile each switch).
mkdir -p "$TC"
tmp_env="$(mktemp "$TC/env.sh.XXXXXX")"
{
    echo "# Generated by scripts/setup.sh; sourced by the other scripts. Do not edit."
    # shellcheck disable=SC2016 # the ${...:-} is meant for env.sh, not here
    printf 'export SINGLORA_CUOBJDUMP="${SINGLORA_CUOBJDUMP:-%s}"\n' "$cuobjdump"
} >"$tmp_env"
chmod 644 "$tmp_env"
mv -f "$tmp_env" "$TC/env.sh"
