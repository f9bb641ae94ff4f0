"""What the CPU tests of the torch binding share: importing torch (or
skipping, unless SINGLORA_REQUIRE_TORCH=1), the relative L2 measure, and the
case runner that prints one line per case and the closing count.

    from torch_harness import torch, Runner

A test using it prints one line per case, then "N passed, M failed", and
exits 1 on a failure. Without torch it prints "skipped: torch not installed"
and exits 0, unless SINGLORA_REQUIRE_TORCH=1 (scripts/test.sh sets it), then
it fails.
"""

import math
import os
import struct
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # python/

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Failed to initialize NumPy"
        import torch
except ImportError as e:
    if os.environ.get("SINGLORA_REQUIRE_TORCH") == "1":
        print(f"FAIL: torch cannot be imported ({e}) but SINGLORA_REQUIRE_TORCH=1")
        print("0 passed, 1 failed")
        sys.exit(1)
    print("skipped: torch not installed")
    sys.exit(0)

warnings.filterwarnings("ignore", message=".*NumPy.*")

F32_BAR, BF16_BAR = 1e-5, 1e-2


def f32(v):
    """``v`` rounded to float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


def rel_l2(out, ref):
    """‖out − ref‖₂ / ‖ref‖₂ in float64; inf for a shape mismatch or any
    non-finite output."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def expect(problems, cond, what):
    if not cond:
        problems.append(what)


def keep_mask(p, seed, offset, tokens, cols):
    """The kernels' dropout keep mask of a tokens × cols input (float64 0/1),
    from the library (``_lib.dropout_mask``: needs libsinglora.so)."""
    from singlora import _lib

    keep = _lib.dropout_mask(p, seed, offset, tokens, cols)
    return torch.tensor(list(keep), dtype=torch.float64).reshape(tokens, cols)  # list: no frombuffer of b""


def _dropped(x, keep, p):
    """drop(x) = keep ⊙ x / (1 − p) (x itself without a mask); keep is
    tokens × d_in, x any leading shape."""
    if keep is None:
        return x
    return (x.reshape(-1, x.shape[-1]) * keep.double() / (1.0 - p)).reshape(x.shape)


def reference_linear(x, w, b, a, s, g, keep=None, p=0.0):
    """float64 autograd of the formula: y, dX, dA (with ``keep``, the
    adapter sees drop(x) = keep ⊙ x / (1 − p), the frozen path x)."""
    d_out, d_in = w.shape
    x = x.detach().double().requires_grad_(True)
    a = a.detach().double().requires_grad_(True)
    y = x @ w.double().T + s * (_dropped(x, keep, p) @ a[:d_in]) @ a[:d_out].T
    if b is not None:
        y = y + b.double()
    y.backward(g.double())
    return y.detach(), x.grad, a.grad


def reference_adapter(x, a, s, d_out, g, base=None, keep=None, p=0.0):
    """float64 autograd of the adapter term (plus base): y, dX, dA (dropout
    as in reference_linear)."""
    d_in = x.shape[-1]
    x = x.detach().double().requires_grad_(True)
    a = a.detach().double().requires_grad_(True)
    y = s * (_dropped(x, keep, p) @ a[:d_in]) @ a[:d_out].T
    if base is not None:
        y = y + base.double()
    y.backward(g.double())
    return y.detach(), x.grad, a.grad


class Runner:
    """Runs each case when it is declared (``@runner.case``): the case gets
    the list it appends its problems to (and whatever ``setup`` provides),
    any exception is a problem, and one PASS/FAIL line is printed."""

    def __init__(self, setup=None):
        self.results = []
        self.setup = setup

    def case(self, fn):
        name = fn.__name__
        try:
            if self.setup is None:
                problems = []
                fn(problems)
            else:
                problems = self.setup(fn)
        except Exception:
            problems = ["raised:\n" + traceback.format_exc()]
        self.results.append((name, problems))
        print(("PASS " if not problems else "FAIL ") + name, flush=True)
        for p in problems:
            print("    " + p.replace("\n", "\n    "))
        return fn

    def finish(self):
        """Prints the closing count and exits (1 on any failure)."""
        passed = sum(1 for _, pr in self.results if not pr)
        failed = len(self.results) - passed
        print(f"torch {torch.__version__}")
        print(f"{passed} passed, {failed} failed")
        sys.exit(1 if failed else 0)
