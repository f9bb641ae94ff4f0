#!/usr/bin/env python3
"""Our kernels through the PyTorch binding, checked against PyTorch (GPU).

    SINGLORA_LIB=path/to/libsinglora.so python3 python/check.py

For every case (random shapes: non-square both ways, odd d, ranks 1..256,
tokens 1..4096; f32, f16, bf16), the output and the autograd gradients dX and
dA of

    singlora_linear(x, W0, None, A, s)   =  x·W0ᵀ + s·(x·A[:d_in])·A[:d_out]ᵀ
    singlora_adapter(x, A, s)            =         s·(x·A[:d_in])·A[:d_out]ᵀ

are compared with PyTorch autograd of the textbook formula in float64, on the
same (dtype-rounded) inputs, by relative L2 error against the design page's
bars: 1e-5 (f32), 2e-3 (f16), 1e-2 (bf16). A is scaled so that the adapter and
the frozen product have about the same size (so the adapter's error is not
hidden under the frozen product's). Also: strided inputs (a column slice and
3-D batches), a strided gradient, the in-place `base` form, tokens = 0, the
SingLoraLinear module (ramp, merge/unmerge; merging a merged layer and
unmerging an unmerged one raise), an f32 model under
torch.autocast("cuda", bfloat16) against float64 autograd of the formula on
the f32 values (bf16 bar; A's gradient f32), the merge state machine (an
optimizer step, reset_parameters or a state_dict round trip while merged,
then unmerge gives W0 back to within one rounding),
torch.autograd.gradcheck, torch.library.opcheck of the singlora:: ops on
CUDA, torch.compile(fullgraph=True) with zero graph breaks and one compile
over ramp steps 0..5 (aot_eager, and inductor where triton is present), and a
training step (capturable Adam, the ramp's step()) captured with
torch.cuda.graph, replayed against the same steps run eagerly.

Adapter dropout (p = 0.1 and 0.5, every dtype, odd d_in, a strided x): the
CUDA forward and gradients against float64 autograd of the formula with the
library's host mask (``_lib.dropout_mask``) and against the ops' CPU path on
the same inputs, at the bars; the mask itself bitwise: the adapter's dX is
exactly 0 where the host mask drops and nonzero where it keeps (up to the
odd exact zero). And a CUDA SingLoraLinear(dropout=0.1): its (seed, offset)
stays a CPU tensor, the offset advances once per training forward, eval
has none.

gradcheck, float64-upcast form: the kernels take no float64, so gradcheck runs
on f(x64, A64) = singlora_linear(x64.float(), W, b, A64.float(), s).double(),
i.e. it compares our f32 backward (analytical Jacobian) with central
differences of our f32 forward. f is linear in each x element and quadratic in
each A element, so central differences are exact up to the f32 rounding of the
outputs (about 1e-7·|y| / eps); with eps = 1e-2 and |y| ≈ 1 that is ~1e-5,
hence atol = 1e-4, rtol = 1e-3 (loose against f64's default, tight against
any real mistake, which is O(1)). It runs on small shapes (gradcheck does one
forward per input element).

Prints one PASS/FAIL line per case and a summary; exits 1 on any failure
(2 when there is no CUDA device or no torch).
"""

import math
import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_script import banner, start, torch_or_exit  # noqa: E402

torch = torch_or_exit("check.py")

import singlora  # noqa: E402
from singlora import _lib  # noqa: E402
from singlora.nn import SingLoraLinear, dropout_state, singlora_adapter, singlora_linear  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
failures = []
passes = 0


def f32(v):
    """v rounded to f32, as the kernels receive the scale."""
    return struct.unpack("f", struct.pack("f", v))[0]


def rel_l2(out, ref):
    out = out.detach().double()
    ref = ref.detach().double()
    if out.shape != ref.shape:
        return math.inf
    if not torch.isfinite(out).all():
        return math.inf
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def report(ok, line):
    global passes
    print(("PASS " if ok else "FAIL ") + line, flush=True)
    if ok:
        passes += 1
    else:
        failures.append(line)


def strict_fp():
    """IEEE f32 GEMMs and no reduced-precision reductions in torch's own
    products (the frozen x·W0ᵀ and G·W0 are torch's)."""
    m = torch.backends.cuda.matmul
    try:
        m.fp32_precision = "ieee"
    except (AttributeError, RuntimeError, TypeError):
        m.allow_tf32 = False
    for attr in ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
        try:
            setattr(m, attr, False)
        except (AttributeError, RuntimeError, TypeError):
            pass


def make_inputs(gen, dev, dtype, lead, d_in, d_out, rank, s):
    """x, W0, A, G: f64 values rounded to dtype (kept as f64 for the reference)."""
    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64, device=dev) * std).to(dtype).double()

    d = max(d_in, d_out)
    # Adapter entries ≈ s·σ²·sqrt(d_in·rank) for x ~ N(0, 1), A ~ N(0, σ²):
    # σ makes them ≈ 1, like the frozen product's with W0 ~ N(0, 1/d_in).
    sigma = (s * math.sqrt(d_in * rank)) ** -0.5
    x = randn(*lead, d_in)
    w0 = randn(d_out, d_in, std=d_in ** -0.5)
    a = randn(d, rank, std=sigma)
    g = randn(*lead, d_out)
    return x, w0, a, g


def reference(x, w0, a, s, g):
    """PyTorch autograd of the textbook formula in float64: y, dX, dA."""
    d_out, d_in = (w0.shape if w0 is not None else (g.shape[-1], x.shape[-1]))
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    y = s * (x @ a[:d_in]) @ a[:d_out].T
    if w0 is not None:
        y = x @ w0.T + y
    y.backward(g)
    return y.detach(), x.grad, a.grad


def run_ours(fn, x, a, g, dtype):
    """fn(x, A) with autograd, in dtype; returns y, dX, dA."""
    xt = x.to(dtype).detach().requires_grad_(True)
    at = a.to(dtype).detach().requires_grad_(True)
    y = fn(xt, at)
    y.backward(g.to(dtype))
    return y.detach(), xt.grad, at.grad


def check_case(gen, dev, dtype, lead, d_in, d_out, rank, tag=""):
    s = f32(random.choice([0.5, 1.0, 2.0, 1.7, 16.0 / rank]))
    x, w0, a, g = make_inputs(gen, dev, dtype, lead, d_in, d_out, rank, s)
    w0t = w0.to(dtype)
    tol = TOL[dtype]
    desc = f"{NAME[dtype]:>4} tokens={math.prod(lead):<5} d_in={d_in:<5} d_out={d_out:<5} rank={rank:<3} s={s:g}{tag}"
    errs = {}
    # The layer: x·W0ᵀ + adapter.
    y_ref, dx_ref, da_ref = reference(x, w0, a, s, g)
    y, dx, da = run_ours(lambda xt, at: singlora_linear(xt, w0t, None, at, s), x, a, g, dtype)
    errs["y"], errs["dX"], errs["dA"] = rel_l2(y, y_ref), rel_l2(dx, dx_ref), rel_l2(da, da_ref)
    # The adapter alone (the kernels' own error, nothing of torch's).
    y_ref, dx_ref, da_ref = reference(x, None, a, s, g)
    y, dx, da = run_ours(lambda xt, at: singlora_adapter(xt, at, s, d_out=d_out), x, a, g, dtype)
    errs["adapter y"], errs["adapter dX"], errs["adapter dA"] = (
        rel_l2(y, y_ref), rel_l2(dx, dx_ref), rel_l2(da, da_ref))
    worst = max(errs.values())
    text = " ".join(f"{k} {v:.1e}" for k, v in errs.items())
    report(worst <= tol, f"{desc} | {text} | bar {tol:.0e}")


def check_strided(gen, dev, dtype):
    """x a column slice of a wider tensor, G a column slice, 3-D batches, and
    the in-place base form."""
    tol = TOL[dtype]
    d_in, d_out, rank, tokens, pad = 300, 176, 24, 130, 37
    s = f32(1.25)
    x, w0, a, g = make_inputs(gen, dev, dtype, (tokens,), d_in, d_out, rank, s)
    y_ref, dx_ref, da_ref = reference(x, w0, a, s, g)
    w0t = w0.to(dtype)
    # x and G as column slices (row strides d_in + pad and d_out + 5), used
    # in place by the kernels.
    xw = torch.zeros(tokens, pad + d_in, dtype=dtype, device=dev)
    xw[:, pad:] = x.to(dtype)
    xw.requires_grad_(True)
    at = a.to(dtype).detach().requires_grad_(True)
    y = singlora_linear(xw[:, pad:], w0t, None, at, s)
    gw = torch.zeros(tokens, d_out + 5, dtype=dtype, device=dev)
    gw[:, :d_out] = g.to(dtype)
    y.backward(gw[:, :d_out])
    e = max(rel_l2(y, y_ref), rel_l2(xw.grad[:, pad:], dx_ref), rel_l2(at.grad, da_ref))
    pad_grad = xw.grad[:, :pad].abs().max().item()
    report(e <= tol and pad_grad == 0.0,
           f"{NAME[dtype]:>4} strided x and G (column slices) | worst {e:.1e}, "
           f"grad outside the slice {pad_grad} | bar {tol:.0e}")

    # 3-D batch (4, 33, d_in) and a transposed (non-unit column stride) input.
    lead = (4, 33)
    x, w0, a, g = make_inputs(gen, dev, dtype, lead, d_in, d_out, rank, s)
    y_ref, dx_ref, da_ref = reference(x, w0, a, s, g)
    xt = x.to(dtype).transpose(0, 1).contiguous().transpose(0, 1).detach().requires_grad_(True)
    at = a.to(dtype).detach().requires_grad_(True)
    y = singlora_linear(xt, w0.to(dtype), None, at, s)
    y.backward(g.to(dtype))
    e = max(rel_l2(y, y_ref), rel_l2(xt.grad, dx_ref), rel_l2(at.grad, da_ref))
    report(e <= tol and y.shape == (*lead, d_out),
           f"{NAME[dtype]:>4} 3-D batch {lead}, non-contiguous x | worst {e:.1e} | bar {tol:.0e}")

    # In place onto a frozen layer's output.
    x, w0, a, g = make_inputs(gen, dev, dtype, (tokens,), d_in, d_out, rank, s)
    y_ref, dx_ref, da_ref = reference(x, w0, a, s, g)
    xt = x.to(dtype).detach().requires_grad_(True)
    at = a.to(dtype).detach().requires_grad_(True)
    base = torch.nn.functional.linear(xt, w0.to(dtype))
    y = singlora_adapter(xt, at, s, base=base)
    same = y.data_ptr() == base.data_ptr()
    y.backward(g.to(dtype))
    e = max(rel_l2(y, y_ref), rel_l2(xt.grad, dx_ref), rel_l2(at.grad, da_ref))
    report(e <= tol and same, f"{NAME[dtype]:>4} adapter in place onto base | worst {e:.1e}, in place {same} | bar {tol:.0e}")


def check_zero_tokens(dev):
    x = torch.zeros(0, 64, device=dev, requires_grad=True)
    w = torch.randn(48, 64, device=dev)
    a = torch.randn(64, 8, device=dev, requires_grad=True)
    y = singlora_linear(x, w, None, a, 1.0)
    y.sum().backward()
    ok = y.shape == (0, 48) and a.grad is not None and a.grad.abs().max().item() == 0.0
    report(ok, f" f32 tokens=0 | y {tuple(y.shape)}, dA all zero {ok}")


def check_gradcheck(dev):
    for d_in, d_out, rank, bias in [(5, 7, 2, False), (7, 5, 3, True), (6, 6, 1, False)]:
        gen = torch.Generator(device=dev).manual_seed(1000 + d_in)
        w = torch.randn(d_out, d_in, generator=gen, device=dev) / math.sqrt(d_in)
        b = torch.randn(d_out, generator=gen, device=dev) if bias else None
        x = torch.randn(3, d_in, generator=gen, device=dev, dtype=torch.float64, requires_grad=True)
        a = torch.randn(max(d_in, d_out), rank, generator=gen, device=dev, dtype=torch.float64,
                        requires_grad=True)
        s = f32(0.75)

        def f(x64, a64):
            return singlora_linear(x64.float(), w, b, a64.float(), s).double()

        try:
            ok = torch.autograd.gradcheck(f, (x, a), eps=1e-2, atol=1e-4, rtol=1e-3)
            msg = ""
        except Exception as e:  # gradcheck raises GradcheckError with the Jacobians
            ok, msg = False, f" ({str(e).splitlines()[0][:200]})"
        report(ok, f" f32 gradcheck (float64-upcast) d_in={d_in} d_out={d_out} rank={rank} bias={bias}{msg}")


def check_module(dev):
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(7)
        base = torch.nn.Linear(96, 160, bias=True).to(dev, dtype)
        layer = SingLoraLinear(base, rank=8, alpha=16.0, warmup_steps=4)
        x = torch.randn(2, 50, 96, device=dev, dtype=dtype)
        ok = layer.a.shape == (160, 8) and not base.weight.requires_grad
        # uniform in ±1/√D, rounded to the dtype (which may round up by half an ulp)
        bound_ok = layer.a.abs().max().item() <= (1.0 / math.sqrt(160)) * (1 + 2.0 ** -8)
        with torch.no_grad():
            # u(0) = 0: exactly the frozen layer (the same F.linear call on
            # the flattened tokens, plus 0 · adapter).
            y0 = layer(x)
            same = torch.equal(y0, base(x.reshape(-1, 96)).reshape(2, 50, 160))
        for _ in range(2):
            layer.step()
        s_ok = layer.scale == 16.0 / 8 * 0.5
        y = layer(x)
        y.square().mean().backward()
        grad_ok = layer.a.grad is not None and torch.isfinite(layer.a.grad).all().item()
        w_before = base.weight.detach().clone()
        with torch.no_grad():
            y_unmerged = layer(x)
            layer.merge()
            y_merged = layer(x)
            layer.unmerge()
        merge_err = rel_l2(y_merged, y_unmerged)
        w_back = (base.weight.detach().double() - w_before.double()).abs().max().item()
        never = raises_runtime(layer.unmerge)
        with torch.no_grad():
            layer.merge()
        twice = raises_runtime(layer.merge)
        layer.unmerge()
        w_ulp = w_before.abs().max().item() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23)
        ok = (ok and bound_ok and same and s_ok and grad_ok and merge_err <= 2 * TOL[dtype]
              and w_back <= 2 * w_ulp and twice and never)
        report(ok, f"{NAME[dtype]:>4} SingLoraLinear: init bound {bound_ok}, starts frozen {same}, ramp {s_ok}, "
                   f"grad {grad_ok}, merged vs unmerged {merge_err:.1e}, unmerge max |ΔW| {w_back:.1e} "
                   f"(≤ {2 * w_ulp:.1e}), merge twice raises {twice}, unmerge unmerged raises {never}")


def raises_runtime(fn):
    """fn() raises RuntimeError (the merge state machine's refusals)."""
    try:
        fn()
    except RuntimeError:
        return True
    return False


def w_back_within(w_after, w_before, w_merged, dtype):
    """The worst ratio of |W - W0| to one rounding of the merged value (the
    dtype's eps times max(|W0|, |W_merged|), per element), and whether it is
    within 2 (one rounding in merge, one in unmerge)."""
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23
    err = (w_after.detach().double() - w_before.double()).abs()
    unit = eps * torch.maximum(w_before.double().abs(), w_merged.double().abs()) + 1e-30
    ratio = (err / unit).max().item()
    return ratio, ratio <= 2.0


def check_merge_state(dev):
    """A changed while merged (an optimizer step, reset_parameters, a state
    dict round trip then a step): unmerge takes out exactly the merged A."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(11)
        base = torch.nn.Linear(200, 136, bias=False).to(dev, dtype)
        layer = SingLoraLinear(base, rank=16, alpha=32.0)
        with torch.no_grad():
            layer.a.mul_(8.0)  # an adapter the size of W0, so a wrong unmerge shows
        results = []

        def merged_copy():
            w0 = base.weight.detach().clone()
            layer.merge()
            return w0, base.weight.detach().clone()

        # 1. an optimizer step on A while merged
        w0, wm = merged_copy()
        opt = torch.optim.SGD([layer.a], lr=0.5)
        layer.a.grad = torch.randn_like(layer.a)
        opt.step()
        layer.unmerge()
        results.append(("optimizer step",) + w_back_within(base.weight, w0, wm, dtype))
        # 2. reset_parameters while merged
        w0, wm = merged_copy()
        layer.reset_parameters()
        layer.unmerge()
        results.append(("reset_parameters",) + w_back_within(base.weight, w0, wm, dtype))
        # 3. a merged layer's state dict into a fresh layer, then a step, then unmerge
        with torch.no_grad():
            layer.a.mul_(8.0)
        w0, wm = merged_copy()
        fresh = SingLoraLinear(torch.nn.Linear(200, 136, bias=False).to(dev, dtype), rank=16, alpha=32.0)
        fresh.load_state_dict(layer.state_dict())
        with torch.no_grad():
            fresh.a.add_(torch.randn_like(fresh.a))
        fresh.unmerge()
        layer.unmerge()
        r_fresh = w_back_within(fresh.base.weight, w0, wm, dtype)
        r_layer = w_back_within(base.weight, w0, wm, dtype)
        results.append(("state_dict round trip", max(r_fresh[0], r_layer[0]), r_fresh[1] and r_layer[1]))
        ok = all(r[2] for r in results)
        text = ", ".join(f"{name} {ratio:.2f}" for name, ratio, _ in results)
        report(ok, f"{NAME[dtype]:>4} merged, A changed, unmerge: max |ΔW| in roundings of the merged W: "
                   f"{text} (≤ 2)")


def check_autocast(dev):
    try:
        _check_autocast(dev)
    except Exception as e:  # e.g. a dtype mismatch inside the autograd function
        report(False, f" f32 model under autocast(cuda, bf16) | raised {type(e).__name__}: {e}")


def _check_autocast(dev):
    """An f32 model under torch.autocast("cuda", bfloat16): the layer and the
    adapter run in bf16 (one dtype per launch), A's gradient comes back f32,
    and y, dX, dA match float64 autograd of the formula on the f32 values at
    the bf16 bar."""
    torch.manual_seed(12)
    d_in, d_out, rank, tokens = 320, 208, 16, 96
    base = torch.nn.Linear(d_in, d_out, bias=True).to(dev)
    layer = SingLoraLinear(base, rank=rank, alpha=16.0)
    s = f32(layer.scale)
    sigma = (s * math.sqrt(d_in * rank)) ** -0.5
    with torch.no_grad():
        layer.a.copy_(torch.randn_like(layer.a) * sigma)
    x = torch.randn(2, tokens // 2, d_in, device=dev, requires_grad=True)
    g = torch.randn(2, tokens // 2, d_out, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g.to(y.dtype))
    xr = x.detach().double().requires_grad_(True)
    ar = layer.a.detach().double().requires_grad_(True)
    yr = xr @ base.weight.double().T + base.bias.double() + s * (xr @ ar[:d_in]) @ ar[:d_out].T
    yr.backward(g.double())
    errs = {"y": rel_l2(y, yr), "dX": rel_l2(x.grad, xr.grad), "dA": rel_l2(layer.a.grad, ar.grad)}
    dtypes_ok = y.dtype == torch.bfloat16 and layer.a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # The adapter alone, with an f32 base (cast, so base itself is untouched).
    a = layer.a.detach().clone().requires_grad_(True)
    xa = x.detach().clone().requires_grad_(True)
    base_t = torch.randn(2, tokens // 2, d_out, device=dev)
    base0 = base_t.clone()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ya = singlora_adapter(xa, a, s, base=base_t)
    ya.backward(g.to(ya.dtype))
    xr = xa.detach().double().requires_grad_(True)
    ar = a.detach().double().requires_grad_(True)
    yr = base0.double() + s * (xr @ ar[:d_in]) @ ar[:d_out].T
    yr.backward(g.double())
    errs.update({"adapter y": rel_l2(ya, yr), "adapter dX": rel_l2(xa.grad, xr.grad),
                 "adapter dA": rel_l2(a.grad, ar.grad)})
    dtypes_ok = dtypes_ok and a.grad.dtype == torch.float32 and torch.equal(base_t, base0)
    worst = max(errs.values())
    text = " ".join(f"{k} {v:.1e}" for k, v in errs.items())
    report(worst <= TOL[torch.bfloat16] and dtypes_ok,
           f" f32 model under autocast(cuda, bf16) | {text} | dtypes {dtypes_ok} | bar {TOL[torch.bfloat16]:.0e}")


def _small_model(dev, dtype=torch.float32, warmup=4, seed=21):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        SingLoraLinear(torch.nn.Linear(96, 160), rank=8, alpha=16.0, warmup_steps=warmup),
        torch.nn.GELU(),
        SingLoraLinear(torch.nn.Linear(160, 64, bias=False), rank=4, alpha=8.0, warmup_steps=warmup),
    ).to(dev, dtype)
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.a.mul_(4.0)
    return m


def _adapters(m):
    return [l for l in m.modules() if isinstance(l, SingLoraLinear)]


def check_library_ops(dev):
    """torch.library.opcheck of every singlora:: op on CUDA tensors (our kernels)."""
    from singlora import nn as snn
    from torch.library import opcheck

    for dtype in (torch.float32, torch.bfloat16):
        d_in, d_out, rank, d = 40, 24, 6, 40
        gen = torch.Generator(device=dev).manual_seed(77)

        def t(*shape, grad=False, dt=dtype):
            return torch.randn(*shape, generator=gen, device=dev, dtype=dt).requires_grad_(grad)

        sc = torch.tensor(0.75, device=dev)
        f32t = torch.float32
        samples = {
            "linear_forward": [(t(2, 9, d_in, grad=True), t(d_out, d_in), t(d_out), t(d, rank, grad=True), sc, True),
                               (t(9, d_out), t(d_in, d_out, grad=True), None, t(d, rank, grad=True), sc, False)],
            "adapter_forward": [(t(9, d_in, grad=True), t(d, rank, grad=True), sc, None, d_out, True),
                                (t(9, d_in, grad=True), t(d, rank, grad=True), sc, t(9, d_out, grad=True), d_out, True)],
            "adapter_backward": [(t(9, d_in), t(9, d_out), t(d, rank), sc, t(9, rank, dt=f32t), None, True),
                                 (t(9, d_in), t(9, d_out), t(d, rank), sc, t(0, rank, dt=f32t), t(d_out, d_in), True)],
            "merge": [(t(d_out, d_in), t(d, rank), sc)],
            "unmerge": [(t(d_out, d_in), t(d, rank), sc)],
        }
        bad = []
        for name in snn.OPS:
            for args in samples[name]:
                res = opcheck(getattr(torch.ops.singlora, name).default, args, raise_exception=False)
                bad += [f"{name}: {k} {str(v)[:160]}" for k, v in res.items() if v != "SUCCESS"]
        report(not bad, f"{NAME[dtype]:>4} opcheck of the singlora:: ops on CUDA"
                        + ("" if not bad else " | " + "; ".join(bad)))


def check_compile(dev):
    """torch.compile(fullgraph=True) over a model of our layers: zero graph
    breaks, one compile over ramp steps 0..5 (forward, backward, step), the
    compiled output equal to eager at every step (it follows the ramp)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    backends = ["aot_eager"]
    try:
        from torch.utils._triton import has_triton
        if has_triton():
            backends.append("inductor")
    except ImportError:
        pass
    for backend in backends:
        try:
            torch._dynamo.reset()
            m = _small_model(dev)
            x = torch.randn(4, 33, 96, device=dev, requires_grad=True)
            exp = torch._dynamo.explain(m)(x)
            torch._dynamo.reset()
            cnt = CompileCounterWithBackend(backend)
            cm = torch.compile(m, backend=cnt, fullgraph=True)
            opt = torch.optim.SGD([l.a for l in _adapters(m)], lr=1e-3)
            worst = 0.0
            for _ in range(6):
                y = cm(x)
                with torch.no_grad():
                    worst = max(worst, rel_l2(y, m(x)))
                opt.zero_grad()
                y.square().mean().backward()
                opt.step()
                for layer in _adapters(m):
                    layer.step()
            bar = 1e-5 if backend == "aot_eager" else 1e-4  # inductor may reorder the frozen GEMM's epilogue
            ok = exp.graph_break_count == 0 and cnt.frame_count == 1 and worst <= bar
            report(ok, f" f32 torch.compile(fullgraph, {backend}): graph breaks {exp.graph_break_count}, "
                       f"compiles over ramp 0..5 {cnt.frame_count}, compiled vs eager {worst:.1e} (bar {bar:.0e})")
        except Exception as e:
            report(False, f" f32 torch.compile(fullgraph, {backend}) | raised {type(e).__name__}: {str(e)[:300]}")


def check_cuda_graph_training(dev):
    """A training step (forward, backward, capturable Adam, ramp step()) captured
    with torch.cuda.graph and replayed: equal to the same steps run eagerly,
    and the ramp advancing inside the graph (the scale is read on the device)."""
    import copy

    try:
        torch.manual_seed(31)
        m = _small_model(dev, warmup=6)
        params = [l.a for l in _adapters(m)]
        opt = torch.optim.Adam(params, lr=1e-3, capturable=True)
        static_x = torch.randn(64, 96, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up (also loads the kernels: singlora_init)
                opt.zero_grad(set_to_none=True)
                m(static_x).square().mean().backward()
                opt.step()
                for layer in _adapters(m):
                    layer.step()
        torch.cuda.current_stream().wait_stream(s)
        # The eager twin, from the state after the warm-up.
        ref = copy.deepcopy(m)
        ref_opt = torch.optim.Adam([l.a for l in _adapters(ref)], lr=1e-3, capturable=True)
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared state tensors
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            static_loss = m(static_x).square().mean()
            static_loss.backward()
            opt.step()
            for layer in _adapters(m):
                layer.step()
        losses, ref_losses = [], []
        gen = torch.Generator(device=dev).manual_seed(5)
        for _ in range(5):
            xk = torch.randn(64, 96, device=dev, generator=gen)
            static_x.copy_(xk)
            g.replay()
            losses.append(static_loss.item())
            ref_opt.zero_grad(set_to_none=True)
            loss = ref(xk).square().mean()
            loss.backward()
            ref_opt.step()
            for layer in _adapters(ref):
                layer.step()
            ref_losses.append(loss.item())
        torch.cuda.synchronize()
        loss_err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, ref_losses))
        a_err = max(rel_l2(a, b) for a, b in zip(params, [l.a for l in _adapters(ref)]))
        steps = [l.steps for l in _adapters(m)]
        ref_steps = [l.steps for l in _adapters(ref)]
        ok = loss_err <= 1e-4 and a_err <= 1e-4 and steps == ref_steps == [8, 8]
        report(ok, f" f32 CUDA graph of a training step (capturable Adam, ramp): replayed loss vs eager "
                   f"{loss_err:.1e}, A vs eager {a_err:.1e}, steps {steps} (eager {ref_steps})")
    except Exception as e:
        report(False, f" f32 CUDA graph of a training step | raised {type(e).__name__}: {str(e)[:300]}")


def _dropout_ref(x, w0, a, s, g, keep, p):
    """float64 autograd with the adapter on drop(x) = keep ⊙ x / (1 − p)."""
    d_out, d_in = (w0.shape if w0 is not None else (g.shape[-1], x.shape[-1]))
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    xd = (x.reshape(-1, d_in) * keep / (1.0 - p)).reshape(x.shape)
    y = s * (xd @ a[:d_in]) @ a[:d_out].T
    if w0 is not None:
        y = x @ w0.T + y
    y.backward(g)
    return y.detach(), x.grad, a.grad


def check_dropout(gen, dev):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for p, (tokens, d_in, d_out, rank), strided in [
            (0.1, (333, 1001, 640, 16), False), (0.5, (64, 4096, 4096, 64), False), (0.1, (77, 257, 513, 8), True),
        ]:
            seed, offset = 0x9E3779B97F4A7C15, 12345
            s = f32(1.0)
            x, w0, a, g = make_inputs(gen, dev, dtype, (tokens,), d_in, d_out, rank, s)
            keep = torch.frombuffer(_lib.dropout_mask(p, seed, offset, tokens, d_in), dtype=torch.uint8)
            keep = keep.reshape(tokens, d_in).to(device=dev, dtype=torch.float64)
            w0t = w0.to(dtype)
            desc = f"{NAME[dtype]:>4} dropout p={p} tokens={tokens} d_in={d_in} d_out={d_out} rank={rank}"
            if strided:
                desc += " strided x"
            errs = {}
            try:
                st = dropout_state(seed, offset)
                y_ref, dx_ref, da_ref = _dropout_ref(x, w0, a, s, g, keep, p)
                y, dx, da = run_ours(lambda xt, at: singlora_linear(xt, w0t, None, at, s, p, st), x, a, g, dtype)
                errs.update(y=rel_l2(y, y_ref), dX=rel_l2(dx, dx_ref), dA=rel_l2(da, da_ref))
                # The ops' CPU path on the same inputs and pair.
                yc, dxc, dac = run_ours(lambda xt, at: singlora_linear(xt, w0t.cpu(), None, at, s, p, st),
                                        x.cpu(), a.cpu(), g.cpu(), dtype)
                errs.update({"y vs CPU": rel_l2(y.cpu(), yc), "dX vs CPU": rel_l2(dx.cpu(), dxc),
                             "dA vs CPU": rel_l2(da.cpu(), dac)})
                # The adapter alone: dX = M ⊙ (...) exactly 0 where the mask drops.
                yr, dxr, dar = _dropout_ref(x, None, a, s, g, keep, p)
                if strided:  # a column slice of a wider tensor, used in place
                    wide = torch.randn(tokens, d_in + 9, device=dev).to(dtype)
                    wide[:, 5:5 + d_in] = x.to(dtype)
                    wide.requires_grad_(True)
                    xs = wide[:, 5:5 + d_in]
                else:
                    wide = xs = x.to(dtype).requires_grad_(True)
                at = a.to(dtype).requires_grad_(True)
                ya = singlora_adapter(xs, at, s, d_out=d_out, dropout_p=p, dropout_state=st)
                ya.backward(g.to(dtype))
                dxa = wide.grad[:, 5:5 + d_in] if strided else wide.grad
                errs.update({"adapter y": rel_l2(ya, yr), "adapter dX": rel_l2(dxa, dxr),
                             "adapter dA": rel_l2(at.grad, dar)})
                dropped_nonzero = int((dxa[keep == 0] != 0).sum())
                kept_zero = int((dxa[keep == 1] == 0).sum())
            except Exception as e:
                report(False, f"{desc} | raised {type(e).__name__}: {str(e)[:300]}")
                continue
            tol = TOL[dtype]
            worst = max(errs.values())
            mask_ok = dropped_nonzero == 0 and kept_zero <= max(2, keep.sum().item() // 10000)
            text = " ".join(f"{k} {v:.1e}" for k, v in errs.items())
            report(worst <= tol and mask_ok,
                   f"{desc} | {text} | bar {tol:.0e} | dX nonzero where dropped {dropped_nonzero}, "
                   f"zero where kept {kept_zero}")
    # The module on CUDA.
    try:
        torch.manual_seed(5)
        layer = SingLoraLinear(torch.nn.Linear(96, 80), rank=8, alpha=8.0, dropout=0.1).to(dev)
        x = torch.randn(12, 96, device=dev)
        o0 = layer.dropout_offset
        y1, y2 = layer(x), layer(x)
        layer.eval()
        y3 = layer(x)
        layer.dropout = 0.0
        y4 = layer(x)
        ok = (layer.dropout_state.device.type == "cpu" and layer.dropout_offset == o0 + 2
              and not torch.equal(y1, y2) and torch.equal(y3, y4))
        report(ok, f" f32 SingLoraLinear(dropout=0.1) on CUDA | state on {layer.dropout_state.device}, "
                   f"offset {o0} -> {layer.dropout_offset}, masks differ {not torch.equal(y1, y2)}, "
                   f"eval undropped {torch.equal(y3, y4)}")
    except Exception as e:
        report(False, f" f32 SingLoraLinear(dropout=0.1) on CUDA | raised {type(e).__name__}: {str(e)[:300]}")


def check_fused_backward(gen, dev):
    """The one-pass backward (singlora.set_backward_kernel("fused"); it runs
    on compute capability 9.0 for bf16, rank <= 32, d <= 4096, the split one
    elsewhere) through the ops: the bf16 cases it applies to, against
    float64 at the bf16 bar."""
    previous = singlora.set_backward_kernel("fused")
    try:
        for tokens, d_in, d_out, rank in [(4096, 4096, 4096, 16), (333, 1001, 4000, 32), (77, 4096, 96, 8),
                                          (1300, 512, 512, 1)]:
            check_case(gen, dev, torch.bfloat16, (tokens,), d_in, d_out, rank, tag=" fused backward")
    finally:
        singlora.set_backward_kernel(previous)


def shapes(rng):
    """The shape grid: fixed corner cases, then random draws."""
    fixed = [  # (tokens, d_in, d_out, rank)
        (1, 4096, 4096, 16), (16, 4096, 4096, 64), (4096, 1024, 1024, 256), (333, 3424, 1000, 33),
        (77, 1001, 4097, 1), (4096, 4097, 513, 8), (64, 11008, 4096, 16), (7, 11, 13, 5),
    ]
    drawn = []
    for _ in range(6):
        tokens = int(round(math.exp(rng.uniform(0, math.log(4096)))))
        d1 = int(round(math.exp(rng.uniform(math.log(8), math.log(5000)))))
        d2 = int(round(math.exp(rng.uniform(math.log(8), math.log(5000)))))
        rank = int(round(math.exp(rng.uniform(0, math.log(256)))))
        drawn.append((max(tokens, 1), d1 | 1, d2, max(1, min(rank, 256))))
    return fixed + drawn


def main():
    started, dev = start("check.py")
    strict_fp()
    banner(torch.cuda.get_device_name(dev))
    singlora.init(0)
    rng = random.Random(2025)
    random.seed(7)
    gen = torch.Generator(device=dev).manual_seed(1234)
    grid = shapes(rng)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for tokens, d_in, d_out, rank in grid:
            check_case(gen, dev, dtype, (tokens,), d_in, d_out, rank)
        check_strided(gen, dev, dtype)
    check_dropout(gen, dev)
    check_fused_backward(gen, dev)
    check_zero_tokens(dev)
    check_gradcheck(dev)
    check_module(dev)
    check_merge_state(dev)
    check_autocast(dev)
    check_library_ops(dev)
    check_compile(dev)
    check_cuda_graph_training(dev)
    torch.cuda.synchronize()
    took = time.time() - started
    print(f"\ncheck.py: {passes} passed, {len(failures)} failed ({took:.1f} s)")
    for f in failures:
        print(f"  FAILED: {f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
