"""The Python package without a GPU (and without torch): plain python3.

    python3 python/tests/test_nogpu.py

Needs target/release/libsinglora.so (`cargo build --release`; scripts/test.sh
builds it) unless $SINGLORA_LIB names another. Checks that `import singlora`
neither needs nor imports torch, that the library is found and speaks this
package's ABI, the workspace query against the layout formula, and that calls
fail with a SingLoraError carrying the library's message: no driver / no
device, and each invalid argument named. Fake device pointers are only used in
calls that are refused before any device is touched, or that name a device
ordinal no machine has. Exits non-zero on the first failure.
"""

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYROOT = HERE.parent  # python/
REPO = PYROOT.parent
sys.path.insert(0, str(PYROOT))

import singlora  # noqa: E402
from singlora import _lib  # noqa: E402
from singlora._lib import SingLoraError  # noqa: E402

P = 0x7F0000000000  # a 256-byte aligned fake device address
NO_SUCH_DEVICE = 1000
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    checks += 1


def raises(fn, status, *needles):
    """fn() raises SingLoraError with `status` and a message holding every needle."""
    try:
        fn()
    except SingLoraError as e:
        ok = e.status == status and all(n in str(e) for n in needles)
        check(ok, f"expected status {status} with {needles}, got {e.status}: {e}")
        return e
    check(False, f"expected SingLoraError {status} {needles}, nothing was raised")


def driver_present():
    return ctypes.util.find_library("cuda") is not None or _can_load("libcuda.so.1")


def _can_load(name):
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


# -------------------------------------------------------------- import
check("torch" not in sys.modules, "import singlora imported torch")
try:
    import torch  # noqa: F401

    have_torch = True
except ImportError:
    have_torch = False
if not have_torch:
    try:
        singlora.SingLoraLinear
        check(False, "singlora.SingLoraLinear without torch should raise ImportError")
    except ImportError as e:
        check("needs PyTorch" in str(e), f"unclear ImportError: {e}")

cargo_version = re.search(r'^version = "([^"]+)"', (REPO / "Cargo.toml").read_text(), re.M)
check(cargo_version is not None, "Cargo.toml has a version")
check(singlora.__version__ == cargo_version.group(1), "package version == Cargo.toml version")

# -------------------------------------------------------------- loading
if not os.environ.get("SINGLORA_LIB"):
    want = REPO / "target" / "release" / "libsinglora.so"
    check(want.is_file(), f"{want} exists (run `cargo build --release`)")
    check(singlora.library_path() == want, f"loaded {singlora.library_path()}, expected {want}")
check(singlora.version() == singlora.__version__, "library version == package version")
check(singlora.abi_version() == _lib.ABI_VERSION, "ABI version")
check(singlora.backward_kernel() == "split", "the split backward is the default")
check(singlora.set_backward_kernel("fused") == "split" and singlora.backward_kernel() == "fused",
      "set_backward_kernel returns the previous choice")
singlora.set_backward_kernel("split")
try:
    singlora.set_backward_kernel("fast")
    check(False, "an unknown backward kernel name should raise")
except ValueError as e:
    check("'fast'" in str(e), f"unclear error: {e}")
check(_lib.status_name(_lib.ERROR_NO_DRIVER) == "SINGLORA_ERROR_NO_DRIVER", "status names")

# A missing library: a clear error naming the places tried and the variable.
out = subprocess.run(
    [sys.executable, "-c", "import singlora\ntry:\n singlora.version()\nexcept singlora.SingLoraError as e:\n print('ERR', e)"],
    env={**os.environ, "SINGLORA_LIB": "/nonexistent/libsinglora.so", "PYTHONPATH": str(PYROOT)},
    capture_output=True,
    text=True,
    timeout=60,
)
check(out.returncode == 0, f"subprocess failed: {out.stderr}")
check(
    "ERR libsinglora.so not found" in out.stdout and "/nonexistent/libsinglora.so" in out.stdout
    and "SINGLORA_LIB" in out.stdout,
    f"missing-library message: {out.stdout!r}",
)

# -------------------------------------------------------------- workspace


def workspace_formula(tokens, d_in, d_out, rank, saved_s):
    """The layout src/ops/backward.rs documents: Q (+ S), then 2·slots·D·rank_pad
    f32 dA partials, slots the split path's token splits or, where the fused
    kernel could run (tokens > 0, d_in and d_out <= 4096, rank <= 32), at
    least its token ranges (ceil(tokens/256), at most 16); segments rounded
    up to 64 floats."""
    d = max(d_in, d_out)
    seg = lambda n: -(-n // 64) * 64  # noqa: E731
    bands = -(-d // 128)
    max_splits = max(-(-tokens // 256), 1)
    splits = min(max(-(-256 // bands), 1), max_splits)
    if tokens > 0 and d_in <= 4096 and d_out <= 4096 and rank <= 32:
        splits = max(splits, min(-(-tokens // 256), 16))
    rank_pad = -(-rank // 16) * 16
    tr = seg(tokens * rank)
    return 4 * ((tr if saved_s else 2 * tr) + 2 * splits * d * rank_pad)


for shape in [(0, 1, 1, 1), (1, 4096, 4096, 16), (16384, 4096, 4096, 64), (16384, 4096, 4096, 16),
              (77, 3424, 64, 64), (5, 40, 11, 7), (5000, 4097, 64, 8)]:
    for saved in (True, False):
        got = singlora.workspace_size(*shape, saved_s=saved)
        check(got == workspace_formula(*shape, saved), f"workspace {shape} saved={saved}: {got}")
raises(lambda: singlora.workspace_size(-1, 2, 3, 4), _lib.ERROR_INVALID_ARGUMENT, "`tokens`")
raises(lambda: singlora.workspace_size(1, 2, 3, 0), _lib.ERROR_INVALID_ARGUMENT, "`rank`")

# -------------------------------------------------------------- launches


def fwd(**over):
    args = dict(
        dtype=_lib.DTYPE_BF16, device=NO_SUCH_DEVICE, tokens=33, d_in=96, d_out=160, rank=8,
        x=P, ld_x=96, a=P + 0x100000, y=P + 0x200000, ld_y=160, s=P + 0x300000,
        scale=2.0, scale_ptr=0, beta=1.0, stream=0,
    )
    args.update(over)
    return lambda: _lib.forward(**args)


def bwd(**over):
    args = dict(
        dtype=_lib.DTYPE_F16, device=NO_SUCH_DEVICE, tokens=33, d_in=96, d_out=160, rank=8,
        x=P, ld_x=96, g=P + 0x100000, ld_g=160, a=P + 0x200000, saved_s=P + 0x300000,
        scale=2.0, scale_ptr=0, dx=P + 0x400000, ld_dx=96, dx_beta=1.0, da=P + 0x500000, da_beta=0.0,
        workspace=P + 0x600000, workspace_bytes=singlora.workspace_size(33, 96, 160, 8), stream=0,
    )
    args.update(over)
    return lambda: _lib.backward(**args)


def mrg(fn, **over):
    args = dict(dtype=_lib.DTYPE_F32, device=NO_SUCH_DEVICE, d_in=96, d_out=160, rank=8, w=P,
                ld_w=96, a=P + 0x100000, scale=0.5, scale_ptr=0, stream=0)
    args.update(over)
    return lambda: fn(**args)


# Without a GPU: the no-driver (or no-device) error, with the library's message.
driver = driver_present()
no_gpu = (_lib.ERROR_NO_DEVICE, "no CUDA device with ordinal 1000") if driver else (
    _lib.ERROR_NO_DRIVER, "no CUDA driver")
for call in (fwd(), bwd(), mrg(_lib.merge), mrg(_lib.unmerge), lambda: singlora.init(NO_SUCH_DEVICE)):
    e = raises(call, *no_gpu)
if not driver:
    # Device 0 on this machine, as a user would call it.
    e = raises(fwd(device=0), _lib.ERROR_NO_DRIVER, "no CUDA driver")
    check(e.function == "singlora_forward" and e.status_name == "SINGLORA_ERROR_NO_DRIVER",
          f"error fields: {e.function} {e.status_name}")
    print(f"forward without a GPU: {e}")

# Invalid arguments: refused before any device access, naming the argument.
INV = _lib.ERROR_INVALID_ARGUMENT
for call, name in [
    (fwd(tokens=-1), "tokens"), (fwd(rank=0), "rank"), (fwd(rank=257), "rank"),
    (fwd(d_in=-5), "d_in"), (fwd(ld_x=95), "ld_x"), (fwd(ld_y=-160), "ld_y"),
    (fwd(x=0), "x"), (fwd(a=0), "a"), (fwd(y=P + 1), "y"), (fwd(s=P + 2), "s"),
    (fwd(scale=float("nan")), "scale"), (fwd(beta=0.5), "beta"), (fwd(device=-1), "device"),
    (bwd(ld_g=10), "ld_g"), (bwd(dx_beta=3.0), "dx_beta"), (bwd(da=0), "da"),
    (bwd(workspace=P + 8), "workspace"), (bwd(workspace_bytes=16), "workspace"),
    (bwd(saved_s=0), "workspace"),
    (mrg(_lib.merge, ld_w=10), "ld_w"), (mrg(_lib.unmerge, w=0), "w"),
    # A device scale: misaligned is refused; the by-value scale is then unused.
    (fwd(scale_ptr=P + 2, scale=float("nan")), "scale_ptr"), (bwd(scale_ptr=P + 1), "scale_ptr"),
    (mrg(_lib.unmerge, scale_ptr=P + 3), "scale_ptr"),
    # Dropout: p in [0, 1), checked before any device access.
    (fwd(dropout_p=1.0), "dropout_p"), (fwd(dropout_p=float("nan")), "dropout_p"),
    (bwd(dropout_p=-0.1), "dropout_p"),
]:
    raises(call, INV, f"`{name}`")
raises(fwd(dtype=7), _lib.ERROR_UNKNOWN_DTYPE, "`dtype`", "7")
e = raises(fwd(ld_x=95), INV, "`ld_x`", "95", "96")
print(f"invalid argument: {e}")

# ------------------------------------------------------- the dropout mask
# An independent Philox4x32-10 (Salmon et al., SC11) in Python, held to
# Random123's known-answer vectors (tests/kat_vectors, as tests/philox.rs
# cites them), then the library's host mask to it: the mapping of the
# header's "Dropout" comment, bit for bit.
M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return [c0, c1, c2, c3]


for ctr, key, want in [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([M32] * 4, [M32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]:
    check(philox4x32_10(ctr, key) == want, f"philox4x32_10({ctr}, {key}) known answer")


def python_mask(p, seed, offset, tokens, cols):
    th = min(round(p * 2**32), M32)
    key = [seed & M32, seed >> 32]
    out = bytearray(tokens * cols)
    for t in range(tokens):
        for c in range(cols):
            w = philox4x32_10([c // 4, t & M32, offset & M32, offset >> 32], key)[c % 4]
            out[t * cols + c] = 1 if th == 0 or w >= th else 0
    return out


import random  # noqa: E402

rnd = random.Random(16)
for p, tokens, cols in [(0.1, 7, 13), (0.5, 3, 40), (0.9, 5, 9), (0.0, 2, 5), (0.25, 1, 1), (0.3, 0, 4)]:
    seed, offset = rnd.getrandbits(64), rnd.getrandbits(64)
    got = _lib.dropout_mask(p, seed, offset, tokens, cols)
    check(got == python_mask(p, seed, offset, tokens, cols),
          f"dropout_mask(p={p}, {tokens}x{cols}) equals the Python Philox mapping")
big = _lib.dropout_mask(0.1, 1234, 5678, 1000, 1000)
kept, n = sum(big), len(big)
sigma = (n * 0.1 * 0.9) ** 0.5
check(abs(kept - 0.9 * n) <= 4 * sigma, f"keep rate {kept / n:.5f} within 4 sigma of 0.9")
raises(lambda: _lib.dropout_mask(1.0, 0, 0, 2, 2), INV, "`dropout_p`")
raises(lambda: _lib.dropout_mask(0.5, 0, 0, -1, 2), INV, "`tokens`")

print(f"test_nogpu: all {checks} checks passed (torch {'present' if have_torch else 'absent'}, "
      f"driver {'present' if driver else 'absent'}, library {singlora.library_path()})")
