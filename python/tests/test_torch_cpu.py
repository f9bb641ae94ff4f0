"""The torch binding's Python logic on CPU: needs torch, no GPU, no kernels.

    PYTHONPATH=.toolchain/torch python3 python/tests/test_torch_cpu.py

Runs singlora.nn's autograd functions, autocast handling, launch guards and
the SingLoraLinear merge state machine on CPU tensors. The seam is small:

  * ``nn._device_check`` (the "all on one CUDA device" check) is replaced by
    one that accepts CPU tensors;
  * ``_lib.forward / backward / merge / unmerge / workspace_size`` are
    replaced by fakes that RECORD their arguments (dtype code, pointers,
    dimensions) and compute what the kernel would, with torch ops in f32, on
    the tensors behind the pointers (found through a ``Tensor.data_ptr``
    wrapper that remembers which tensor gave which address), so the autograd
    path really runs.

Every fake launch checks that each buffer's dtype is the one its dtype code
names (S, dA: f32) and that the dimensions and row strides match the tensor.
The fakes also apply the adapter dropout they are given (p, seed, offset),
with the mask of the real library's ``singlora_dropout_mask`` (the dropout
case needs libsinglora.so for it), and record the three.
The real device check is used once, to show that CPU tensors are still
refused without the seam.

Output, exit status and the skip without torch: torch_harness.py.
"""

import math
import sys

from torch_harness import (BF16_BAR, F32_BAR, Runner, expect, f32, keep_mask, reference_adapter, reference_linear,
                           rel_l2, torch)

from singlora import _lib  # noqa: E402
from singlora import nn as snn  # noqa: E402
from singlora.nn import SingLoraLinear, singlora_adapter, singlora_linear  # noqa: E402

DTYPE_OF = {_lib.DTYPE_F32: torch.float32, _lib.DTYPE_F16: torch.float16, _lib.DTYPE_BF16: torch.bfloat16}


# ------------------------------------------------------------------ fakes


class FakeLib:
    """Records every launch; computes the kernels' results with torch."""

    def __init__(self):
        self.calls = []  # dicts: fn, code, buffers {name: tensor}, ...
        self.problems = []  # strings: any mismatch a real kernel would misread
        self._by_ptr = {}

    # -- pointer -> tensor
    def remember(self, t, p):
        self._by_ptr[p] = t

    def tensor(self, p):
        if p == 0:
            return None
        t = self._by_ptr.get(p)
        if t is None:
            self.problems.append(f"pointer {p:#x} handed to the kernel is no tensor's data_ptr()")
        return t

    def _record(self, fn, code, buffers, f32_buffers, **dims):
        want = DTYPE_OF.get(code)
        for name, t in buffers.items():
            if t is not None and t.dtype != want:
                self.problems.append(f"{fn}: dtype code {code} ({want}) but `{name}` is {t.dtype}")
        for name, t in f32_buffers.items():
            if t is not None and t.dtype != torch.float32:
                self.problems.append(f"{fn}: `{name}` must be float32, is {t.dtype}")
        self.calls.append(dict(fn=fn, code=code, buffers={**buffers, **f32_buffers}, **dims))
        self._by_ptr.clear()

    def _mat(self, fn, name, t, rows, cols, ld):
        """Checks t is the (rows × cols, row stride ld) matrix the call describes."""
        if t is None:
            return
        ok = t.dim() == 2 and tuple(t.shape) == (rows, cols) and (cols <= 1 or t.stride(1) == 1) and (
            rows <= 1 or t.stride(0) == ld)
        if not ok:
            self.problems.append(
                f"{fn}: `{name}` is {tuple(t.shape)} strides {t.stride()}, call says {rows}x{cols} ld {ld}")

    # -- the library's functions
    def workspace_size(self, tokens, d_in, d_out, rank, saved_s=True):
        return 4 * (tokens * rank * (1 if saved_s else 2) + 64)

    @staticmethod
    def _drop(p, seed, offset, tokens, cols):
        """(keep mask f32 or None, f32 1/(1 − p)) as the kernels apply them."""
        if not p:
            return None, 1.0
        return keep_mask(p, seed, offset, tokens, cols).float(), f32(1.0 / (1.0 - p))

    def forward(self, dtype, device, tokens, d_in, d_out, rank, x, ld_x, a, y, ld_y, s, scale, scale_ptr, beta,
                dropout_p=0.0, dropout_seed=0, dropout_offset=0, stream=0):
        scale = self._scale_of("forward", scale, scale_ptr)
        X, A, Y, S = self.tensor(x), self.tensor(a), self.tensor(y), self.tensor(s)
        self._record("forward", dtype, {"x": X, "a": A, "y": Y}, {"s": S},
                     tokens=tokens, d_in=d_in, d_out=d_out, rank=rank, scale=scale, beta=beta,
                     scale_ptr=scale_ptr, ptrs=dict(x=x, a=a, y=y, s=s),
                     dropout=(dropout_p, dropout_seed, dropout_offset))
        keep, ks = self._drop(dropout_p, dropout_seed, dropout_offset, tokens, d_in)
        self._mat("forward", "x", X, tokens, d_in, ld_x)
        self._mat("forward", "y", Y, tokens, d_out, ld_y)
        self._mat("forward", "a", A, max(d_in, d_out), rank, rank)
        self._mat("forward", "s", S, tokens, rank, rank)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            Af = A.float()
            Sf = X.float() @ Af[:d_in] if keep is None else (X.float() * keep) @ Af[:d_in] * ks
            out = f32(scale) * (Sf @ Af[:d_out].T)
            if beta != 0.0:
                out = out + Y.float()
            Y.copy_(out)
            if S is not None:
                S.copy_(Sf)

    def backward(self, dtype, device, tokens, d_in, d_out, rank, x, ld_x, g, ld_g, a, saved_s, scale,
                 scale_ptr, dx, ld_dx, dx_beta, da, da_beta, workspace, workspace_bytes,
                 dropout_p=0.0, dropout_seed=0, dropout_offset=0, stream=0):
        scale = self._scale_of("backward", scale, scale_ptr)
        X, G, A, S, DX, DA = (self.tensor(p) for p in (x, g, a, saved_s, dx, da))
        self._record("backward", dtype, {"x": X, "g": G, "a": A, "dx": DX}, {"s": S, "da": DA},
                     tokens=tokens, d_in=d_in, d_out=d_out, rank=rank, scale=scale,
                     scale_ptr=scale_ptr, ptrs=dict(x=x, g=g, a=a, s=saved_s, dx=dx, da=da),
                     dropout=(dropout_p, dropout_seed, dropout_offset))
        keep, ks = self._drop(dropout_p, dropout_seed, dropout_offset, tokens, d_in)
        need = self.workspace_size(tokens, d_in, d_out, rank, saved_s != 0)
        if workspace_bytes < need:
            self.problems.append(f"backward: workspace {workspace_bytes} < {need}")
        self._mat("backward", "x", X, tokens, d_in, ld_x)
        self._mat("backward", "g", G, tokens, d_out, ld_g)
        self._mat("backward", "dx", DX, tokens, d_in, ld_dx)
        self._mat("backward", "da", DA, max(d_in, d_out), rank, rank)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            Af, Xf, Gf = A.float(), X.float(), G.float()
            if keep is not None:
                Xf = Xf * keep
            Sf = S if S is not None else Xf @ Af[:d_in] * ks
            Q = Gf @ Af[:d_out]
            sc = f32(scale)
            if DX is not None:
                out = sc * (Q @ Af[:d_in].T)
                if keep is not None:
                    out = out * ks * keep
                if dx_beta != 0.0:
                    out = out + DX.float()
                DX.copy_(out)
            dA = torch.zeros_like(Af)
            dA[:d_out] += Gf.T @ Sf
            dA[:d_in] += (Xf.T @ Q) * ks
            dA = sc * dA
            if da_beta != 0.0:
                dA = dA + DA
            DA.copy_(dA)

    def _fold(self, fn, sign, dtype, device, d_in, d_out, rank, w, ld_w, a, scale, scale_ptr, stream=0):
        scale = self._scale_of(fn, scale, scale_ptr)
        W, A = self.tensor(w), self.tensor(a)
        self._record(fn, dtype, {"w": W, "a": A}, {}, d_in=d_in, d_out=d_out, rank=rank, scale=scale,
                     scale_ptr=scale_ptr, ptrs=dict(w=w, a=a), a_value=None if A is None else A.detach().clone())
        self._mat(fn, "w", W, d_out, d_in, ld_w)
        self._mat(fn, "a", A, max(d_in, d_out), rank, rank)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            Af = A.float()
            W.copy_(W.float() + sign * f32(scale) * (Af[:d_out] @ Af[:d_in].T))

    def merge(self, *args, **kw):
        self._fold("merge", 1.0, *args, **kw)

    def unmerge(self, *args, **kw):
        self._fold("unmerge", -1.0, *args, **kw)

    # -- a device scale (scale_ptr != 0): the scale read from an f32 tensor.
    # Recorded with the scale's value (and `scale_ptr`, the pointer it was
    # read from).
    def _scale_at(self, fn, p):
        t = self.tensor(p)
        if t is None:
            self.problems.append(f"{fn}: scale_ptr {p:#x} is no tensor's data_ptr()")
            return float("nan")
        if t.dtype != torch.float32 or t.numel() != 1:
            self.problems.append(f"{fn}: the scale must be one float32, is {t.dtype} {tuple(t.shape)}")
        return float(t.reshape(-1)[0].item())

    def _scale_of(self, fn, scale, scale_ptr):
        return self._scale_at(fn, scale_ptr) if scale_ptr else scale


def cpu_device_check(*named):
    """The test's _device_check: the one device of the named tensors (CPU ok)."""
    dev = None
    for name, t in named:
        if t is None:
            continue
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise ValueError(f"`{name}` is on {t.device}, the others on {dev}")
    return dev


class Patched:
    """Installs the seam: the device check, the fake library, the pointer map."""

    def __enter__(self):
        self.fake = FakeLib()
        self.saved = [(snn, "_device_check", getattr(snn, "_device_check", None))]
        snn._device_check = cpu_device_check
        for name in ("forward", "backward", "merge", "unmerge", "workspace_size"):
            self.saved.append((_lib, name, getattr(_lib, name)))
            setattr(_lib, name, getattr(self.fake, name))
        orig = torch.Tensor.data_ptr
        fake = self.fake

        def data_ptr(t):
            p = orig(t)
            fake.remember(t, p)
            return p

        self.saved.append((torch.Tensor, "data_ptr", orig))
        torch.Tensor.data_ptr = data_ptr
        return self.fake

    def __exit__(self, *exc):
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)
        return False


# ------------------------------------------------------------------ harness

def with_fakes(fn):
    """Runs the case ``fn(fake, problems)`` with the launches faked: it
    appends to ``problems`` (by ``expect`` and ``raises``) what it finds
    wrong, and the fakes add theirs."""
    with Patched() as fake:
        problems = []
        fn(fake, problems)
        return problems + fake.problems


runner = Runner(with_fakes)
case = runner.case


def raises(problems, exc, needles, fn, what):
    try:
        fn()
    except exc as e:
        missing = [n for n in needles if n not in str(e)]
        expect(problems, not missing, f"{what}: {exc.__name__} without {missing}: {e}")
        return e
    except Exception as e:  # the wrong kind
        problems.append(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}")
        return None
    problems.append(f"{what}: expected {exc.__name__}, nothing was raised")
    return None


def codes_match(problems, fake, want_code, what):
    """Every recorded launch used want_code, and (the fakes check) every buffer had its dtype."""
    launches = [c for c in fake.calls if c["fn"] in ("forward", "backward")]
    expect(problems, launches, f"{what}: no launch recorded")
    for c in launches:
        expect(problems, c["code"] == want_code,
               f"{what}: {c['fn']} launched with dtype code {c['code']}, expected {want_code}")


def make_layer(d_in, d_out, rank, dtype=torch.float32, bias=True, seed=0, alpha=8.0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=bias).to(dtype)
    layer = SingLoraLinear(base, rank=rank, alpha=alpha)
    with torch.no_grad():  # make the adapter about as big as the frozen product
        layer.a.mul_(4.0)
    return layer


def w_back_ok(w_after, w0, w_merged):
    """|W - W0| within one rounding per element of the merged value."""
    eps = torch.finfo(w0.dtype).eps
    bound = eps * torch.maximum(w0.abs(), w_merged.abs()).double() + 1e-30
    err = (w_after.double() - w0.double()).abs()
    return bool((err <= bound).all()), err.max().item()


def unmerges_to_w0(p, layer, w0, wm, what):
    """Unmerges ``layer`` and expects W0 back (``w_back_ok``), ``what`` naming
    the case in the message."""
    layer.unmerge()
    ok, err = w_back_ok(layer.base.weight, w0, wm)
    expect(p, ok, f"{what} |W - W0| up to {err:.2e}")


# ------------------------------------------------------------------ cases: autocast


@case
def autocast_layer_f32_model_bf16(fake, p):
    """An f32 model under torch.autocast("cpu", bfloat16): one dtype per launch,
    A's grad f32 and right; forward inside, backward outside autocast."""
    layer = make_layer(48, 40, 8)
    x = torch.randn(3, 7, 48, requires_grad=True)
    g = torch.randn(3, 7, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    expect(p, y.dtype == torch.bfloat16, f"y is {y.dtype}, autocast should give bfloat16")
    y.backward(g.to(y.dtype))
    codes_match(p, fake, _lib.DTYPE_BF16, "autocast layer")
    expect(p, [c["fn"] for c in fake.calls] == ["forward", "backward"],
           f"launches {[c['fn'] for c in fake.calls]}")
    expect(p, layer.a.grad is not None and layer.a.grad.dtype == torch.float32,
           f"A.grad is {None if layer.a.grad is None else layer.a.grad.dtype}, want float32")
    expect(p, x.grad is not None and x.grad.dtype == torch.float32, "x.grad should be float32")
    y_ref, dx_ref, da_ref = reference_linear(x, layer.base.weight, layer.base.bias, layer.a,
                                             f32(layer.scale), g)
    if not p:
        errs = dict(y=rel_l2(y, y_ref), dx=rel_l2(x.grad, dx_ref), da=rel_l2(layer.a.grad, da_ref))
        print(f"    rel L2 vs float64: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        for k, v in errs.items():
            expect(p, v <= BF16_BAR, f"{k} rel L2 {v:.2e} > {BF16_BAR}")


@case
def autocast_backward_inside_autocast(fake, p):
    """The same with backward also inside the autocast region (the function's
    backward must run with autocast off too)."""
    layer = make_layer(33, 65, 5, bias=False, seed=1)
    x = torch.randn(20, 33, requires_grad=True)
    g = torch.randn(20, 65)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y.backward(g.to(torch.bfloat16))
    codes_match(p, fake, _lib.DTYPE_BF16, "backward under autocast")
    expect(p, layer.a.grad is not None and layer.a.grad.dtype == torch.float32, "A.grad f32")
    if not p:
        _, dx_ref, da_ref = reference_linear(x, layer.base.weight, None, layer.a, f32(layer.scale), g)
        for k, v in dict(dx=rel_l2(x.grad, dx_ref), da=rel_l2(layer.a.grad, da_ref)).items():
            expect(p, v <= BF16_BAR, f"{k} rel L2 {v:.2e} > {BF16_BAR}")


@case
def autocast_adapter_and_base(fake, p):
    """singlora_adapter under autocast: x, a (and base) cast first."""
    torch.manual_seed(2)
    d_in, d_out, rank, s = 40, 24, 6, 1.5
    a = (torch.randn(max(d_in, d_out), rank) * 0.3).requires_grad_(True)
    x = torch.randn(9, d_in, requires_grad=True)
    g = torch.randn(9, d_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = singlora_adapter(x, a, s, d_out=d_out)
    y.backward(g.to(y.dtype))
    expect(p, y.dtype == torch.bfloat16, f"adapter y is {y.dtype}")
    codes_match(p, fake, _lib.DTYPE_BF16, "autocast adapter")
    expect(p, a.grad is not None and a.grad.dtype == torch.float32, "adapter A.grad f32")
    if not p:
        y_ref, dx_ref, da_ref = reference_adapter(x, a, f32(s), d_out, g)
        for k, v in dict(y=rel_l2(y, y_ref), dx=rel_l2(x.grad, dx_ref), da=rel_l2(a.grad, da_ref)).items():
            expect(p, v <= BF16_BAR, f"adapter {k} rel L2 {v:.2e} > {BF16_BAR}")
    # With an f32 base: cast to a new bf16 tensor, which is updated and
    # returned; the f32 base is left as it was.
    fake.calls.clear()
    a.grad = None
    base = torch.randn(9, d_out)
    base0 = base.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = singlora_adapter(x, a, s, base=base)
    y.backward(g.to(y.dtype))
    codes_match(p, fake, _lib.DTYPE_BF16, "autocast adapter with base")
    expect(p, y.dtype == torch.bfloat16 and torch.equal(base, base0), "f32 base must be left unchanged")
    if not p:
        y_ref, _, da_ref = reference_adapter(x, a, f32(s), d_out, g, base=base0)
        for k, v in dict(y=rel_l2(y, y_ref), da=rel_l2(a.grad, da_ref)).items():
            expect(p, v <= BF16_BAR, f"adapter+base {k} rel L2 {v:.2e} > {BF16_BAR}")


@case
def no_autocast_f32_exact(fake, p):
    """Without autocast nothing is cast: f32 launches, results at the f32 bar
    (checks the fakes and the autograd plumbing, strided x included)."""
    layer = make_layer(30, 50, 4, seed=3)
    xw = torch.randn(11, 37)
    x = xw[:, 7:].requires_grad_(False).clone()  # a plain tensor for the reference
    xs = xw.clone().requires_grad_(True)
    g = torch.randn(11, 50)
    y = layer(xs[:, 7:])
    y.backward(g)
    codes_match(p, fake, _lib.DTYPE_F32, "f32")
    fwd = fake.calls[0]
    expect(p, fwd["ptrs"]["x"] == xs[:, 7:].data_ptr(), "a column slice of x must be used in place")
    expect(p, all(c.get("scale_ptr") for c in fake.calls),
           "every launch reads the scale from a device tensor (scale_ptr)")
    expect(p, all(c["scale"] == f32(layer.scale) for c in fake.calls), "the launches' scale is f32(layer.scale)")
    y_ref, dx_ref, da_ref = reference_linear(x, layer.base.weight, layer.base.bias, layer.a, f32(layer.scale), g)
    for k, v in dict(y=rel_l2(y, y_ref), dx=rel_l2(xs.grad[:, 7:], dx_ref), da=rel_l2(layer.a.grad, da_ref)).items():
        expect(p, v <= F32_BAR, f"{k} rel L2 {v:.2e} > {F32_BAR}")
    expect(p, xs.grad[:, :7].abs().max().item() == 0.0, "grad outside the slice must be 0")


# ------------------------------------------------------------------ cases: dropout


@case
def dropout_reaches_the_launches(fake, p):
    """A layer with dropout 0.2: in training mode each forward launch gets
    (0.2, the layer's seed, the offset before it) and the offset advances by
    one; its backward launch the same triple, even after another forward;
    eval launches p = 0 (seed and offset 0, the undropped call) and leaves
    the offset; results against float64 with the library's mask."""
    layer = make_layer(24, 36, 4, seed=12)
    layer.dropout = 0.2
    layer.set_dropout_seed(2**64 - 3, 41)
    x = torch.randn(2, 5, 24)
    g = torch.randn(2, 5, 36)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [layer(xi) for xi in xs]
    expect(p, layer.dropout_offset == 43, f"offset {layer.dropout_offset} after two forwards (want 43)")
    fwd = [c for c in fake.calls if c["fn"] == "forward"]
    expect(p, [c["dropout"] for c in fwd] == [(0.2, 2**64 - 3, 41), (0.2, 2**64 - 3, 42)],
           f"forward launches' dropout {[c['dropout'] for c in fwd]}")
    fake.calls.clear()
    ys[1].backward(g)
    ys[0].backward(g)
    bwd = [c["dropout"] for c in fake.calls if c["fn"] == "backward"]
    expect(p, bwd == [(0.2, 2**64 - 3, 42), (0.2, 2**64 - 3, 41)], f"backward launches' dropout {bwd}")
    for i, off in enumerate((41, 42)):
        keep = keep_mask(0.2, 2**64 - 3, off, 10, 24)
        yr, dxr, _ = reference_linear(x, layer.base.weight, layer.base.bias, layer.a, f32(layer.scale), g,
                                      keep=keep, p=0.2)
        for k, v in dict(y=rel_l2(ys[i], yr), dx=rel_l2(xs[i].grad, dxr)).items():
            expect(p, v <= F32_BAR, f"offset {off}: {k} rel L2 {v:.2e} > {F32_BAR}")
    fake.calls.clear()
    layer.eval()
    layer(x.requires_grad_(True)).backward(g)
    expect(p, [c["dropout"] for c in fake.calls] == [(0.0, 0, 0), (0.0, 0, 0)] and layer.dropout_offset == 43,
           f"eval launches {[c['dropout'] for c in fake.calls]}, offset {layer.dropout_offset}")


# ------------------------------------------------------------------ cases: launch guards


@case
def launch_guards_name_the_buffer(fake, p):
    """_launch_forward/_launch_backward/_fold refuse a buffer whose dtype is not
    the launch's, naming it, before any library call."""
    T, di, do, r = 5, 8, 6, 2
    x = torch.randn(T, di)
    a = torch.randn(max(di, do), r)
    y = torch.zeros(T, do)
    s = torch.zeros(T, r)
    g = torch.randn(T, do)
    dx = torch.zeros(T, di)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    for what, args, needle in [
        ("forward y", (x, di, a, bf(y), do, s, 1.0, 1.0), "`y`"),
        ("forward a", (x, di, bf(a), y, do, s, 1.0, 1.0), "`a`"),
        ("forward s", (x, di, a, y, do, s.half(), 1.0, 1.0), "`s`"),
        ("forward s (bf16 launch)", (bf(x), di, bf(a), bf(y), do, bf(s), 1.0, 1.0), "`s`"),
    ]:
        raises(p, TypeError, [needle], lambda: snn._launch_forward(*args), what)
    for what, args, needle in [
        ("backward g", (x, di, bf(g), do, a, s, 1.0, dx, 1.0), "`g`"),
        ("backward dx", (x, di, g, do, a, s, 1.0, bf(dx), 1.0), "`dx`"),
        ("backward a", (bf(x), di, bf(g), do, a, None, 1.0, None, 0.0), "`a`"),
        ("backward s", (x, di, g, do, a, bf(s), 1.0, dx, 1.0), "`s`"),
    ]:
        raises(p, TypeError, [needle], lambda: snn._launch_backward(*args), what)
    w = torch.randn(do, di)
    raises(p, TypeError, ["`a`"], lambda: snn._fold(w, bf(a), 1.0, undo=False), "fold a")
    expect(p, not fake.calls, f"a refused launch reached the library: {[c['fn'] for c in fake.calls]}")
    # And the matching dtypes go through.
    snn._launch_forward(bf(x), di, bf(a), bf(y), do, s, 1.0, 0.0)
    expect(p, len(fake.calls) == 1 and fake.calls[0]["code"] == _lib.DTYPE_BF16, "bf16 forward launched")


@case
def real_device_check_refuses_cpu(fake, p):
    """Without the seam the launch path still refuses CPU tensors (the kernels
    take CUDA), and the entry points run CPU tensors on the ops' torch-op CPU
    kernels instead, launching nothing."""
    snn._device_check = snn._cuda_device
    x, w, a = torch.randn(2, 4), torch.randn(3, 4), torch.randn(4, 2)
    raises(p, ValueError, ["`x`", "CUDA"], lambda: snn._cuda_device(("x", x), ("a", a)), "launch check on CPU")
    raises(p, ValueError, ["`x`", "CUDA"], lambda: snn._linear_forward_launch(
        x, w, None, a, torch.tensor(1.0), False), "linear launch on CPU")
    raises(p, ValueError, ["`weight`", "CUDA"], lambda: snn._fold_launch(w, a, torch.tensor(1.0), undo=False),
           "fold launch on CPU")
    expect(p, not snn._launches(x.device), "CPU routes to the torch kernels without the seam")
    y = singlora_linear(x, w, None, a, 1.0)
    ref = x @ w.T + (x @ a[:4]) @ a[:3].T
    expect(p, rel_l2(y, ref) <= F32_BAR, "linear on CPU (torch kernel)")
    y = singlora_adapter(x, a, 1.0)
    expect(p, rel_l2(y, (x @ a[:4]) @ a[:4].T) <= F32_BAR, "adapter on CPU (torch kernel)")
    w0 = w.clone()
    snn._fold(w, a, 1.0, undo=False)
    expect(p, rel_l2(w, w0 + a[:3] @ a[:4].T) <= F32_BAR, "merge on CPU (torch kernel)")
    expect(p, not fake.calls, "nothing launched")


# ------------------------------------------------------------------ cases: layouts (one helper)


@case
def row_stride_layouts(fake, p):
    """The one "unit column stride, row stride >= cols" rule, in its three users."""
    wide = torch.randn(6, 20)
    t2, ld = snn._rows(wide[:, 4:14], 10, "x")
    expect(p, ld == 20 and t2.data_ptr() == wide[:, 4:].data_ptr(), f"column slice in place (ld {ld})")
    t2, ld = snn._rows(wide.t(), 6, "x")
    expect(p, ld == 6 and t2.is_contiguous(), "transposed input copied contiguous")
    t2, ld = snn._rows(wide[:1, :5], 5, "x")
    expect(p, ld == 5, "one row: ld = cols")
    x = torch.randn(4, 8)
    a = torch.randn(8, 2)
    base_t = torch.randn(8, 4).t()  # (4, 8), column stride 4
    raises(p, ValueError, ["`base`", "unit column stride"],
           lambda: singlora_adapter(x, a, 1.0, base=base_t), "transposed base")
    raises(p, ValueError, ["unit column stride"],
           lambda: snn._fold(torch.randn(8, 8).t(), a, 1.0, undo=False), "transposed weight")
    expect(p, not fake.calls, "nothing launched")


# ------------------------------------------------------------------ cases: base overlapping x


@case
def base_overlapping_x_refused(fake, p):
    a = torch.randn(16, 3)
    buf = torch.randn(10, 16)
    for what, x, base in [
        ("base is x", buf, buf),
        ("base a view of x", buf, buf.view(10, 16)),
        ("rows overlap", buf[:6], buf[4:]),
        ("base one row into x", buf[:5], buf[4:9]),
    ]:
        raises(p, ValueError, ["`base`", "`x`"], lambda: singlora_adapter(x, a, 1.0, base=base), what)
    # Conservative on purpose: column halves of one buffer have overlapping
    # extents (interleaved rows), so they are refused too.
    raises(p, ValueError, ["`base`", "`x`"],
           lambda: singlora_adapter(buf[:, :8], a[:8], 1.0, base=buf[:, 8:]), "interleaved column halves")
    expect(p, not fake.calls, "a refused call reached the library")
    # Adjacent, not overlapping: accepted, in place.
    out = singlora_adapter(buf[:5], a, 1.0, base=buf[5:])
    expect(p, out.data_ptr() == buf[5:].data_ptr() and len(fake.calls) == 1, "adjacent base accepted")


# ------------------------------------------------------------------ cases: merge state


def merged_layer(seed=5, d_in=24, d_out=40, rank=4):
    layer = make_layer(d_in, d_out, rank, seed=seed, alpha=6.0)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    wm = layer.base.weight.detach().clone()
    return layer, w0, wm


def merge_applied(p, layer, w0, wm):
    ref = w0.double() + f32(layer.merged_scale) * (layer.a[: layer.out_features].double()
                                                     @ layer.a[: layer.in_features].double().T)
    expect(p, rel_l2(wm, ref) <= F32_BAR, "merge did not apply s·A_out·A_inᵀ")


@case
def merge_then_reset_parameters(fake, p):
    layer, w0, wm = merged_layer()
    merge_applied(p, layer, w0, wm)
    layer.reset_parameters()
    unmerges_to_w0(p, layer, w0, wm, "after reset_parameters while merged, unmerge left")
    expect(p, not layer.merged, "unmerged")


@case
def merge_then_optimizer_step(fake, p):
    layer, w0, wm = merged_layer(seed=6)
    opt = torch.optim.SGD([layer.a], lr=0.5)
    layer.a.grad = torch.randn_like(layer.a)
    opt.step()  # in place on A while merged
    unmerges_to_w0(p, layer, w0, wm, "after an optimizer step while merged, unmerge left")


@case
def merge_then_load_state_dict_a(fake, p):
    layer, w0, wm = merged_layer(seed=7)
    other = torch.randn_like(layer.a)
    res = layer.load_state_dict({"a": other}, strict=False)
    expect(p, torch.equal(layer.a.detach(), other), f"A loaded ({res})")
    expect(p, layer.merged, "still merged (the extra state was not in the dict)")
    unmerges_to_w0(p, layer, w0, wm, "after loading A while merged, unmerge left")


@case
def merged_state_dict_round_trip(fake, p):
    layer, w0, wm = merged_layer(seed=8)
    sd = layer.state_dict()
    expect(p, set(sd) == {"a", "base.weight", "base.bias", "_extra_state"}, f"keys {sorted(sd)}")
    fresh = make_layer(24, 40, 4, seed=99, alpha=6.0)
    fresh.load_state_dict(sd)
    expect(p, fresh.merged and fresh.merged_scale == layer.merged_scale, "round trip stays merged")
    expect(p, fresh.merged_a is not None and torch.equal(fresh.merged_a, layer.merged_a)
           and fresh.merged_a.data_ptr() != layer.merged_a.data_ptr(), "merged_a restored (a copy)")
    # Step A of the loaded layer, then unmerge: the original W0.
    with torch.no_grad():
        fresh.a.add_(torch.randn_like(fresh.a))
    unmerges_to_w0(p, fresh, w0, wm, "round-tripped merged layer unmerged to")
    # An old extra state (no merged_a): the loaded A stands for the merged one.
    old = dict(sd)
    old["_extra_state"] = {"steps": sd["_extra_state"]["steps"], "merged_scale": sd["_extra_state"]["merged_scale"]}
    older = make_layer(24, 40, 4, seed=98, alpha=6.0)
    older.load_state_dict(old)
    expect(p, older.merged and older.merged_a is not None and torch.equal(older.merged_a, sd["a"]),
           "old extra state: merged_a taken from the loaded A")
    unmerges_to_w0(p, older, w0, wm, "old-format merged state unmerged to")
    # And an unmerged layer's state dict makes a merged layer unmerged.
    plain = make_layer(24, 40, 4, seed=97)
    layer.load_state_dict(plain.state_dict())
    expect(p, not layer.merged and layer.merged_a is None, "loading an unmerged state unmerges the record")


@case
def merge_twice_and_unmerge_unmerged_raise(fake, p):
    layer = make_layer(16, 12, 2, seed=9)
    raises(p, RuntimeError, ["not merged"], layer.unmerge, "unmerge of an unmerged layer")
    layer.merge()
    wm = layer.base.weight.detach().clone()
    n = len(fake.calls)
    raises(p, RuntimeError, ["already merged"], layer.merge, "merge of a merged layer")
    expect(p, len(fake.calls) == n and torch.equal(layer.base.weight, wm), "a refused merge touched W")
    layer.unmerge()
    raises(p, RuntimeError, ["not merged"], layer.unmerge, "second unmerge")
    expect(p, [c["fn"] for c in fake.calls] == ["merge", "unmerge"], f"calls {[c['fn'] for c in fake.calls]}")


@case
def merge_uses_the_remembered_copy(fake, p):
    """merge and unmerge hand the kernel the same (copied) A, never the live parameter."""
    layer, w0, wm = merged_layer(seed=10)
    with torch.no_grad():
        layer.a.mul_(3.0)
    layer.unmerge()
    m, u = fake.calls[0], fake.calls[1]
    expect(p, m["ptrs"]["a"] == u["ptrs"]["a"], "unmerge used the A merge used")
    expect(p, m["ptrs"]["a"] != layer.a.data_ptr(), "merge used a copy of A, not the parameter")
    expect(p, torch.equal(m["a_value"], u["a_value"]), "the same A values")


@case
def module_to_moves_merged_a(fake, p):
    layer, _, _ = merged_layer(seed=11)
    layer.to(torch.float16)
    expect(p, layer.merged_a.dtype == torch.float16 and layer.a.dtype == torch.float16,
           "merged_a follows .to() with A")
    layer.unmerge()
    expect(p, fake.calls[-1]["code"] == _lib.DTYPE_F16, "f16 unmerge")


# ------------------------------------------------------------------ summary

runner.finish()
