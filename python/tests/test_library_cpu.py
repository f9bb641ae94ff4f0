"""The torch.library custom ops (namespace ``singlora``) on CPU: needs torch, no GPU.

    SINGLORA_REQUIRE_TORCH=1 PYTHONPATH=.toolchain/torch python3 python/tests/test_library_cpu.py

Checks, on CPU tensors (the ops' CPU kernels are torch ops; no library call
is made, so no GPU is needed; libsinglora.so only for the dropout cases,
whose CPU kernels take the mask from ``singlora_dropout_mask``):

  * the ops are registered: CPU and CUDA kernels, fake (Meta) functions,
    autograd for the forwards, autocast rules for CPU and CUDA, and the
    mutated argument of merge/unmerge declared in the schema;
  * torch.library.opcheck passes for every op (small shapes, f32 and bf16,
    optional arguments present and absent);
  * torch._dynamo.explain shows zero graph breaks over an nn.Sequential with
    two SingLoraLinear layers, and torch.compile(fullgraph=True) runs it;
  * no recompiles over ramp steps 0..5 (a compile-counting aot_eager backend,
    forward + backward + step()), with the compiled outputs following the
    ramp (equal to eager at every step);
  * outputs and gradients against float64 autograd of the formula (relative
    L2; f32 bar 1e-5, bf16 1e-2), for the layer, the adapter (with and
    without base), merge/unmerge, and autocast (CPU, bf16) eager and compiled;
  * adapter dropout: opcheck with p > 0; forward and backward at p = 0.1 and
    0.5 against float64 autograd of the formula with the library's mask (f32
    and bf16 at their bars; S saved and recomputed); p = 0 bitwise the
    undropped call; explain with zero graph breaks in training mode and no
    recompiles over 5 training steps as the offset advances (compiled equal
    to eager at the same pair); eval mode without dropout; the offset
    advancing once per training forward (never in eval or at p = 0) and
    each backward using its own forward's pair; the pair in the extra state;
    refusals (p = 1, -0.1, nan; a missing or malformed state); a clear error
    when the library cannot be loaded (p = 0 then still runs).

Output, exit status and the skip without torch: torch_harness.py.
"""

import math

import copy

from torch_harness import (BF16_BAR, F32_BAR, Runner, expect, f32, keep_mask, reference_adapter, reference_linear,
                           rel_l2, torch)

import torch._dynamo  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch.library import opcheck  # noqa: E402

from singlora import _lib  # noqa: E402
from singlora import nn as snn  # noqa: E402
from singlora.nn import SingLoraLinear, singlora_adapter, singlora_linear  # noqa: E402

ops = torch.ops.singlora
BAR = {torch.float32: F32_BAR, torch.bfloat16: BF16_BAR}
runner = Runner()
case = runner.case


def within(p, errs, bar, what):
    print(f"    {what}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (bar {bar:.0e})")
    for k, v in errs.items():
        expect(p, v <= bar, f"{what}: {k} rel L2 {v:.2e} > {bar:.0e}")


def scale_t(v):
    return torch.tensor(v, dtype=torch.float32)


def make_model(seed=0, dtype=torch.float32, warmup=4, dropout=0.0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        SingLoraLinear(torch.nn.Linear(16, 24), rank=4, alpha=8.0, warmup_steps=warmup, dropout=dropout),
        torch.nn.GELU(),
        SingLoraLinear(torch.nn.Linear(24, 12, bias=False), rank=3, alpha=6.0, warmup_steps=warmup,
                       dropout=dropout),
    ).to(dtype)
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.a.mul_(4.0)  # an adapter about the frozen product's size
    return m


def layers(m):
    return [l for l in m.modules() if isinstance(l, SingLoraLinear)]


# ------------------------------------------------------------------ registration


@case
def ops_registered(p):
    for name in snn.OPS:
        q = f"singlora::{name}"
        expect(p, hasattr(ops, name), f"torch.ops.singlora.{name} missing")
        for key in ("CPU", "CUDA", "Meta", "AutocastCPU", "AutocastCUDA", "Autograd"):
            expect(p, torch._C._dispatch_has_kernel_for_dispatch_key(q, key), f"{q}: no {key} kernel")
        schema = getattr(ops, name).default._schema
        mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        want = ["weight"] if name in ("merge", "unmerge") else []
        expect(p, mutated == want, f"{q}: mutated args {mutated}, want {want}")
        expect(p, torch.Tag.pt2_compliant_tag in getattr(ops, name).default.tags, f"{q}: not pt2_compliant")
    print("    " + "; ".join(str(getattr(ops, n).default._schema) for n in snn.OPS))


# ------------------------------------------------------------------ opcheck


def opcheck_all(p, dtype):
    torch.manual_seed(1)
    d_in, d_out, rank = 12, 7, 3
    d = max(d_in, d_out)

    def t(*shape, grad=False, dt=dtype):
        return torch.randn(*shape, dtype=dt).requires_grad_(grad)

    s = scale_t(0.75)
    samples = {
        "linear_forward": [
            (t(5, d_in, grad=True), t(d_out, d_in), t(d_out), t(d, rank, grad=True), s, True),
            (t(2, 3, d_in, grad=True), t(d_out, d_in, grad=True), None, t(d, rank, grad=True), s, True),
            (t(4, d_out), t(d_in, d_out), t(d_in, grad=True), t(d, rank), s, False),
            (t(0, d_in, grad=True), t(d_out, d_in), None, t(d, rank, grad=True), s, True),
        ],
        "adapter_forward": [
            (t(5, d_in, grad=True), t(d, rank, grad=True), s, None, d_out, True),
            (t(2, 3, d_in, grad=True), t(d, rank, grad=True), s, t(2, 3, d_out, grad=True), d_out, True),
            (t(4, d_out), t(d, rank), s, t(4, d_in), d_in, False),
        ],
        "adapter_backward": [
            (t(5, d_in), t(5, d_out), t(d, rank), s, t(5, rank, dt=torch.float32), None, True),
            (t(5, d_in), t(5, d_out), t(d, rank), s, t(0, rank, dt=torch.float32), t(d_out, d_in), True),
            (t(2, 3, d_in), t(2, 3, d_out), t(d, rank), s, t(6, rank, dt=torch.float32), None, False),
        ],
        "merge": [(t(d_out, d_in), t(d, rank), s), (t(d_in, d_out), t(d, rank), s)],
        "unmerge": [(t(d_out, d_in), t(d, rank), s)],
    }
    expect(p, set(samples) == set(snn.OPS), f"samples for {sorted(samples)}, ops {sorted(snn.OPS)}")
    n, res = run_opchecks(p, samples, lambda name, args: [
        tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args])
    print(f"    {n} opcheck calls ({', '.join(sorted(res))})")


def run_opchecks(p, samples, describe):
    """opcheck over every ``{op name: [args, ...]}`` sample, each failure
    described by ``describe(name, args)``; (the number of calls, the last
    result)."""
    n, res = 0, {}
    for name, cases in samples.items():
        op = getattr(ops, name).default
        for args in cases:
            res = opcheck(op, args, raise_exception=False)
            bad = {k: v for k, v in res.items() if v != "SUCCESS"}
            expect(p, not bad, f"opcheck {name} {describe(name, args)}: {bad}")
            n += 1
    return n, res


@case
def opcheck_f32(p):
    opcheck_all(p, torch.float32)


@case
def opcheck_bf16(p):
    opcheck_all(p, torch.bfloat16)


# ------------------------------------------------------------------ dynamo


@case
def dynamo_zero_graph_breaks(p):
    torch._dynamo.reset()
    m = make_model(2)
    x = torch.randn(3, 5, 16, requires_grad=True)
    exp = torch._dynamo.explain(m)(x)
    print(f"    explain: {exp.graph_count} graph(s), {exp.graph_break_count} graph break(s), "
          f"{exp.op_count} ops")
    expect(p, exp.graph_break_count == 0, f"graph breaks: {exp.break_reasons}")
    expect(p, exp.graph_count == 1, f"{exp.graph_count} graphs")
    torch._dynamo.reset()
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = cm(x)
    y.square().mean().backward()
    ye = m(x)
    expect(p, torch.allclose(y, ye, rtol=1e-5, atol=1e-6), "compiled output differs from eager")


@case
def no_recompiles_over_ramp(p):
    """Ramp steps 0..5 (T = 4: scale 0, 1/4, .., 1, 1): one compiled frame,
    forward + backward each step, the compiled output equal to eager at each."""
    torch._dynamo.reset()
    m = make_model(3, warmup=4)
    x = torch.randn(4, 16, requires_grad=True)
    cnt = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    opt = torch.optim.SGD([l.a for l in layers(m)], lr=1e-2)
    errs, scales = [], []
    for step in range(6):
        y = cm(x)
        with torch.no_grad():
            ye = m(x)
        errs.append(rel_l2(y, ye))
        scales.append(layers(m)[0].scale)
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
        for layer in layers(m):
            layer.step()
    recompiles = torch._dynamo.utils.counters["stats"].get("unique_graphs", None)
    print(f"    frames compiled {cnt.frame_count}, ops {cnt.op_count}, unique_graphs {recompiles}, "
          f"scales {[round(s, 3) for s in scales]}, worst compiled vs eager {max(errs):.1e}")
    expect(p, cnt.frame_count == 1, f"{cnt.frame_count} compiles over 6 ramp steps (want 1)")
    expect(p, max(errs) <= F32_BAR, f"compiled vs eager {max(errs):.2e}")
    expect(p, scales == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0], f"ramp scales {scales}")
    expect(p, layers(m)[0].steps == 6 and layers(m)[0].step_count.dtype == torch.int64, "steps counted")


@case
def compiled_grads_match_eager(p):
    torch._dynamo.reset()
    m = make_model(4, warmup=0)
    x = torch.randn(2, 3, 16, requires_grad=True)
    g = torch.randn(2, 3, 12)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = cm(x)
    y.backward(g)
    got = [x.grad.clone()] + [l.a.grad.clone() for l in layers(m)]
    x.grad = None
    for l in layers(m):
        l.a.grad = None
    m(x).backward(g)
    want = [x.grad] + [l.a.grad for l in layers(m)]
    errs = {f"grad{i}": rel_l2(a, b) for i, (a, b) in enumerate(zip(got, want))}
    within(p, errs, F32_BAR, "compiled vs eager grads")


# ------------------------------------------------------------------ numerics


def linear_inputs(dtype, d_in, d_out, rank, bias, seed):
    """Random inputs of a (3, 7)-token layer (never zeros): x and A requiring
    grad, W0, the bias (or None), and the upstream gradient."""
    torch.manual_seed(seed)
    x = torch.randn(3, 7, d_in).to(dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in) / math.sqrt(d_in)).to(dtype)
    b = torch.randn(d_out).to(dtype) if bias else None
    a = (torch.randn(max(d_in, d_out), rank) * 0.3).to(dtype).requires_grad_(True)
    g = torch.randn(3, 7, d_out).to(dtype)
    return x, w, b, a, g


@case
def linear_vs_float64(p):
    for dtype in (torch.float32, torch.bfloat16):
        for d_in, d_out, rank, bias in [(40, 24, 6, True), (24, 40, 5, False), (33, 33, 8, True)]:
            x, w, b, a, g = linear_inputs(dtype, d_in, d_out, rank, bias, seed=d_in + d_out)
            s = f32(1.3)
            y = singlora_linear(x, w, b, a, scale_t(s))
            y.backward(g)
            yr, dxr, dar = reference_linear(x, w, b, a, s, g)
            expect(p, y.dtype == dtype and a.grad.dtype == dtype, f"dtypes {y.dtype} {a.grad.dtype}")
            within(p, dict(y=rel_l2(y, yr), dx=rel_l2(x.grad, dxr), da=rel_l2(a.grad, dar)), BAR[dtype],
                   f"linear {dtype} {d_in}->{d_out} r{rank}")


@case
def adapter_vs_float64(p):
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(5)
        d_in, d_out, rank = 30, 18, 4
        a = (torch.randn(d_in, rank) * 0.4).to(dtype).requires_grad_(True)
        x = torch.randn(11, d_in).to(dtype).requires_grad_(True)
        g = torch.randn(11, d_out).to(dtype)
        s = f32(0.6)
        y = singlora_adapter(x, a, s, d_out=d_out)
        y.backward(g)
        yr, dxr, dar = reference_adapter(x, a, s, d_out, g)
        within(p, dict(y=rel_l2(y, yr), dx=rel_l2(x.grad, dxr), da=rel_l2(a.grad, dar)), BAR[dtype],
               f"adapter {dtype}")
        # In place onto base (a non-leaf that requires grad: its gradient passes through).
        x.grad = a.grad = None
        b0 = torch.randn(11, d_out).to(dtype).requires_grad_(True)
        base = b0 * 1.0
        out = singlora_adapter(x, a, scale_t(s), base=base)
        expect(p, out.data_ptr() == base.data_ptr(), "base updated in place and returned")
        out.backward(g)
        yr, dxr, dar = reference_adapter(x, a, s, d_out, g, base=b0.detach())
        within(p, dict(y=rel_l2(out, yr), dx=rel_l2(x.grad, dxr), da=rel_l2(a.grad, dar),
                       dbase=rel_l2(b0.grad, g)), BAR[dtype], f"adapter+base {dtype}")


@case
def module_ramp_and_merge(p):
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(6)
        layer = SingLoraLinear(torch.nn.Linear(20, 28).to(dtype), rank=4, alpha=8.0, warmup_steps=4)
        with torch.no_grad():
            layer.a.mul_(4.0)
        x = torch.randn(9, 20).to(dtype)
        with torch.no_grad():
            same = torch.equal(layer(x), layer.base(x))
        expect(p, same, "step 0: the layer equals the frozen one")
        layer.step(3)
        s = layer.scale
        expect(p, s == 8.0 / 4 * 0.75 and float(layer.scale_tensor()) == f32(s), f"scale {s}")
        xg = x.clone().requires_grad_(True)
        g = torch.randn(9, 28).to(dtype)
        y = layer(xg)
        y.backward(g)
        yr, dxr, dar = reference_linear(x, layer.base.weight, layer.base.bias, layer.a, f32(s), g)
        within(p, dict(y=rel_l2(y, yr), dx=rel_l2(xg.grad, dxr), da=rel_l2(layer.a.grad, dar)), BAR[dtype],
               f"SingLoraLinear {dtype} at t = 3")
        w0 = layer.base.weight.detach().clone()
        with torch.no_grad():
            y_un = layer(x)
            layer.merge()
            y_m = layer(x)
            wm = layer.base.weight.detach().clone()
            layer.unmerge()
        eps = torch.finfo(dtype).eps
        bound = eps * torch.maximum(w0.abs(), wm.abs()).double() + 1e-30
        ratio = ((layer.base.weight.double() - w0.double()).abs() / bound).max().item()
        expect(p, rel_l2(y_m, y_un) <= 2 * BAR[dtype], f"merged vs unmerged {rel_l2(y_m, y_un):.2e}")
        expect(p, ratio <= 2.0, f"unmerge: |W - W0| up to {ratio:.2f} roundings")
        expect(p, layer.get_extra_state()["steps"] == 3, "steps in the extra state")


@case
def autocast_cpu_bf16(p):
    """An f32 model under torch.autocast("cpu", bf16): the ops cast (their
    autocast rule), A's grad f32; eager and compiled, against float64."""
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(7)
        layer = SingLoraLinear(torch.nn.Linear(48, 40), rank=8, alpha=8.0)
        with torch.no_grad():
            layer.a.mul_(4.0)
        x = torch.randn(3, 7, 48, requires_grad=True)
        g = torch.randn(3, 7, 40)
        fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.backward(g.to(y.dtype))
        expect(p, y.dtype == torch.bfloat16, f"y is {y.dtype}")
        expect(p, layer.a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32, "grads f32")
        yr, dxr, dar = reference_linear(x, layer.base.weight, layer.base.bias, layer.a, f32(layer.scale), g)
        within(p, dict(y=rel_l2(y, yr), dx=rel_l2(x.grad, dxr), da=rel_l2(layer.a.grad, dar)), BF16_BAR,
               f"autocast {'compiled' if compiled else 'eager'}")
    # The op itself under autocast (no Python wrapper): casts x/weight/a, keeps the scale f32.
    a = torch.randn(48, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = ops.linear_forward(torch.randn(5, 48), torch.randn(40, 48), None, a, scale_t(0.5), True)
    y.float().sum().backward()
    expect(p, y.dtype == torch.bfloat16 and s.dtype == torch.float32 and a.grad.dtype == torch.float32,
           f"op under autocast: y {y.dtype}, s {s.dtype}, A.grad {a.grad.dtype}")


@case
def refusals(p):
    x, w, a = torch.randn(4, 8), torch.randn(6, 8), torch.randn(8, 2)
    for what, fn, exc in [
        ("float64 x", lambda: singlora_linear(x.double(), w.double(), None, a.double(), 1.0), TypeError),
        ("mixed dtypes", lambda: singlora_linear(x, w.bfloat16(), None, a, 1.0), TypeError),
        ("A of the wrong height", lambda: singlora_linear(x, w, None, torch.randn(7, 2), 1.0), ValueError),
        ("f64 scale tensor to the op", lambda: ops.linear_forward(x, w, None, a, torch.tensor(1.0, dtype=torch.float64), False), TypeError),
        ("base overlapping x", lambda: singlora_adapter(x, a, 1.0, base=x), ValueError),
    ]:
        try:
            fn()
            p.append(f"{what}: nothing raised")
        except exc:
            pass
        except Exception as e:
            p.append(f"{what}: {type(e).__name__} (want {exc.__name__}): {e}")


# ------------------------------------------------------------------ dropout


def state_of(seed, offset):
    return snn.dropout_state(seed, offset)


def raises_named(p, exc, needle, fn, what):
    try:
        fn()
        p.append(f"{what}: nothing raised")
    except exc as e:
        expect(p, needle in str(e), f"{what}: {exc.__name__} without {needle!r}: {e}")
    except Exception as e:
        p.append(f"{what}: {type(e).__name__} (want {exc.__name__}): {e}")


@case
def opcheck_dropout(p):
    torch.manual_seed(11)
    d_in, d_out, rank = 12, 7, 3
    d = max(d_in, d_out)
    n = 0
    for dtype in (torch.float32, torch.bfloat16):
        def t(*shape, grad=False, dt=dtype):
            return torch.randn(*shape, dtype=dt).requires_grad_(grad)

        s = scale_t(0.75)
        st = state_of(0xDEADBEEFCAFEF00D, 2**40 + 3)  # a seed above 2^63: a negative int64
        samples = {
            "linear_forward": [
                (t(5, d_in, grad=True), t(d_out, d_in), t(d_out), t(d, rank, grad=True), s, True, 0.1, st),
                (t(2, 3, d_in, grad=True), t(d_out, d_in), None, t(d, rank, grad=True), s, False, 0.5, st),
                (t(4, d_out, grad=True), t(d_in, d_out), None, t(d, rank, grad=True), s, True, 0.0, st),
            ],
            "adapter_forward": [
                (t(5, d_in, grad=True), t(d, rank, grad=True), s, None, d_out, True, 0.3, st),
                (t(2, 3, d_in, grad=True), t(d, rank, grad=True), s, t(2, 3, d_out, grad=True), d_out, True, 0.5,
                 st),
            ],
            "adapter_backward": [
                (t(5, d_in), t(5, d_out), t(d, rank), s, t(5, rank, dt=torch.float32), None, True, 0.2, st),
                (t(5, d_in), t(5, d_out), t(d, rank), s, t(0, rank, dt=torch.float32), t(d_out, d_in), True, 0.2,
                 st),
                (t(2, 3, d_in), t(2, 3, d_out), t(d, rank), s, t(0, rank, dt=torch.float32), None, False, 0.5,
                 st),
            ],
        }
        n += run_opchecks(p, samples, lambda name, args: f"{dtype} p={args[-2]}")[0]
    print(f"    {n} opcheck calls with dropout")


@case
def dropout_vs_float64(p):
    """Forward and backward at p = 0.1 and 0.5 against float64 autograd of
    the formula with the library's mask; S saved and recomputed."""
    for dtype in (torch.float32, torch.bfloat16):
        for drop_p in (0.1, 0.5):
            for d_in, d_out, rank, bias in [(40, 24, 6, True), (23, 37, 5, False)]:
                x, w, b, a, g = linear_inputs(dtype, d_in, d_out, rank, bias,
                                              seed=d_in + d_out + int(drop_p * 10))
                s = f32(1.3)
                seed, offset = 2**64 - 5, 17
                keep = keep_mask(drop_p, seed, offset, 21, d_in)
                rate = keep.mean().item()
                expect(p, abs(rate - (1 - drop_p)) < 0.15, f"keep rate {rate:.2f} at p = {drop_p}")
                y = singlora_linear(x, w, b, a, scale_t(s), drop_p, state_of(seed, offset))
                y.backward(g)
                yr, dxr, dar = reference_linear(x, w, b, a, s, g, keep=keep, p=drop_p)
                y0, _, _ = reference_linear(x, w, b, a, s, g)
                expect(p, rel_l2(yr, y0) > 1e-3, "the mask changed nothing")
                within(p, dict(y=rel_l2(y, yr), dx=rel_l2(x.grad, dxr), da=rel_l2(a.grad, dar)), BAR[dtype],
                       f"linear {dtype} p={drop_p} {d_in}->{d_out} r{rank}")
                # The backward op with S recomputed (none saved) and with the forward's S.
                x2, g2 = x.detach().reshape(-1, d_in), g.reshape(-1, d_out)
                for what, s_in in (("recomputed S", torch.empty(0, rank)),
                                   ("saved S", ops.linear_forward(x2, w, b, a.detach(), scale_t(s), True, drop_p,
                                                                  state_of(seed, offset))[1])):
                    dx, da = ops.adapter_backward(x2, g2, a.detach(), scale_t(s), s_in, w, True, drop_p,
                                                  state_of(seed, offset))
                    within(p, dict(dx=rel_l2(dx, dxr.reshape(-1, d_in)), da=rel_l2(da, dar)), BAR[dtype],
                           f"  backward op, {what}")
            # The adapter alone, onto base.
            torch.manual_seed(5)
            d_in, d_out, rank = 30, 18, 4
            a = (torch.randn(d_in, rank) * 0.4).to(dtype).requires_grad_(True)
            x = torch.randn(11, d_in).to(dtype).requires_grad_(True)
            g = torch.randn(11, d_out).to(dtype)
            b0 = torch.randn(11, d_out).to(dtype)
            keep = keep_mask(drop_p, 99, 3, 11, d_in)
            y = singlora_adapter(x, a, 0.6, base=b0.clone(), dropout_p=drop_p, dropout_state=(99, 3))
            y.backward(g)
            yr, dxr, dar = reference_adapter(x, a, f32(0.6), d_out, g, base=b0, keep=keep, p=drop_p)
            within(p, dict(y=rel_l2(y, yr), dx=rel_l2(x.grad, dxr), da=rel_l2(a.grad, dar)), BAR[dtype],
                   f"adapter+base {dtype} p={drop_p}")


@case
def dropout_zero_is_bitwise_undropped(p):
    torch.manual_seed(12)
    x = torch.randn(9, 20, requires_grad=True)
    w, b = torch.randn(28, 20), torch.randn(28)
    a = torch.randn(28, 4, requires_grad=True)
    g = torch.randn(9, 28)
    outs = []
    for kw in ({}, dict(dropout_p=0.0, dropout_state=state_of(7, 9))):
        x.grad = a.grad = None
        y = singlora_linear(x, w, b, a, 0.7, **kw)
        y.backward(g)
        outs.append((y.detach(), x.grad.clone(), a.grad.clone()))
    expect(p, all(torch.equal(u, v) for u, v in zip(*outs)), "p = 0 with a state differs from no dropout")
    # A layer with p = 0.3 in eval mode, and with p = 0 in training mode: the plain layer, bitwise.
    torch.manual_seed(13)
    plain = SingLoraLinear(torch.nn.Linear(20, 28), rank=4, alpha=8.0)
    drop = copy.deepcopy(plain)
    drop.dropout = 0.3
    with torch.no_grad():
        y_plain = plain(x)
        drop.eval()
        y_eval = drop(x)
    expect(p, torch.equal(y_plain, y_eval), "eval mode with dropout 0.3 differs from no dropout")
    expect(p, drop.dropout_offset == 0, "the offset moved in eval mode")
    drop.train()
    with torch.no_grad():
        y_train = drop(x)
    expect(p, not torch.equal(y_plain, y_train) and drop.dropout_offset == 1, "training mode: dropout applied")


@case
def dropout_compiled_no_breaks_no_recompiles(p):
    """explain in training mode with dropout: zero graph breaks; 5 training
    steps compiled once, each step's outputs and grads equal eager's at the
    same (seed, offset), the offsets advancing by one per step."""
    torch._dynamo.reset()
    m = make_model(21, warmup=0, dropout=0.25)
    x = torch.randn(3, 5, 16, requires_grad=True)
    exp = torch._dynamo.explain(m)(x)
    print(f"    explain (train, p = 0.25): {exp.graph_count} graph(s), {exp.graph_break_count} graph break(s)")
    expect(p, exp.graph_break_count == 0 and exp.graph_count == 1, f"graph breaks: {exp.break_reasons}")
    torch._dynamo.reset()
    ls = layers(m)
    cnt = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    twin = copy.deepcopy(m)  # eager, fed the same pairs
    errs, outs = [], []
    for step in range(5):
        before = [l.dropout_offset for l in ls]
        for l, t in zip(ls, layers(twin)):
            t.set_dropout_seed(l.dropout_seed, l.dropout_offset)
        y = cm(x)
        y.square().mean().backward()
        got = [x.grad.clone()] + [l.a.grad.clone() for l in ls]
        x.grad = None
        for l in ls:
            l.a.grad = None
        ye = twin(x)
        ye.square().mean().backward()
        want = [x.grad.clone()] + [l.a.grad.clone() for l in layers(twin)]
        x.grad = None
        for l in layers(twin):
            l.a.grad = None
        errs.append(max([rel_l2(y, ye)] + [rel_l2(u, v) for u, v in zip(got, want)]))
        outs.append(y.detach())
        after = [l.dropout_offset for l in ls]
        expect(p, after == [o + 1 for o in before], f"step {step}: offsets {before} -> {after}")
    print(f"    frames compiled {cnt.frame_count} over 5 steps, offsets {[l.dropout_offset for l in ls]}, "
          f"worst compiled vs eager {max(errs):.1e}")
    expect(p, cnt.frame_count == 1, f"{cnt.frame_count} compiles over 5 training steps (want 1)")
    expect(p, max(errs) <= F32_BAR, f"compiled vs eager {max(errs):.2e}")
    expect(p, not torch.equal(outs[0], outs[1]), "two steps drew the same mask")
    # Eval mode: no dropout (the compiled model, a mode switch: may compile once more).
    m.eval()
    offsets = [l.dropout_offset for l in ls]
    with torch.no_grad():
        ye = cm(x)
        for l in ls:
            l.dropout = 0.0
        y0 = m(x)
    expect(p, rel_l2(ye, y0) <= F32_BAR, f"compiled eval vs undropped {rel_l2(ye, y0):.2e}")
    expect(p, [l.dropout_offset for l in ls] == offsets, "eval advanced the offsets")


@case
def dropout_offset_and_backward_pair(p):
    """The offset advances once per training forward with p > 0 (not in eval,
    not at p = 0, not when merged); each backward uses its own forward's pair
    even after later forwards."""
    torch.manual_seed(14)
    layer = SingLoraLinear(torch.nn.Linear(20, 28), rank=4, alpha=8.0, dropout=0.4, dropout_seed=2**63 + 11)
    expect(p, layer.dropout_seed == 2**63 + 11 and layer.dropout_offset == 0, "seed and offset as given")
    expect(p, "dropout=0.4" in repr(layer), f"repr: {layer!r}")
    x = torch.randn(6, 20)
    g = torch.randn(6, 28)
    y1 = layer(x)
    y2 = layer(x)
    expect(p, layer.dropout_offset == 2, f"offset {layer.dropout_offset} after two forwards")
    y1.backward(g)  # the first forward's mask (offset 0), after the second forward ran
    da1 = layer.a.grad.clone()
    layer.a.grad = None
    y2.backward(g)
    da2 = layer.a.grad.clone()
    for off, y, da in ((0, y1, da1), (1, y2, da2)):
        keep = keep_mask(0.4, layer.dropout_seed, off, 6, 20)
        yr, _, dar = reference_linear(x, layer.base.weight, layer.base.bias, layer.a, f32(layer.scale), g,
                                      keep=keep, p=0.4)
        within(p, dict(y=rel_l2(y, yr), da=rel_l2(da, dar)), F32_BAR, f"forward/backward at offset {off}")
    layer.eval()
    layer(x)
    expect(p, layer.dropout_offset == 2, "eval advanced the offset")
    layer.train()
    layer.dropout = 0.0
    layer(x)
    expect(p, layer.dropout_offset == 2, "p = 0 advanced the offset")
    layer.dropout = 0.4
    with torch.no_grad():
        layer(x)
        layer.merge()
        layer(x)
        layer.unmerge()
    expect(p, layer.dropout_offset == 3, f"no_grad forward advances, merged does not: {layer.dropout_offset}")
    # The extra state carries the pair; a fresh layer continues the sequence.
    sd = layer.state_dict()
    fresh = SingLoraLinear(torch.nn.Linear(20, 28), rank=4, alpha=8.0, dropout=0.4)
    fresh.load_state_dict(sd)
    expect(p, (fresh.dropout_seed, fresh.dropout_offset) == (2**63 + 11, 3), "pair restored from the state")
    with torch.no_grad():
        expect(p, torch.equal(fresh(x), layer(x)), "restored layer draws the same next mask")
    old = dict(sd)
    old["_extra_state"] = {k: v for k, v in sd["_extra_state"].items() if not k.startswith("dropout")}
    keep_pair = (fresh.dropout_seed, fresh.dropout_offset)
    fresh.load_state_dict(old)
    expect(p, (fresh.dropout_seed, fresh.dropout_offset) == keep_pair, "an old state left the pair")
    # .to(dtype) leaves the pair a CPU int64 tensor.
    layer.to(torch.bfloat16)
    expect(p, layer.dropout_state.dtype == torch.int64 and layer.dropout_state.device.type == "cpu",
           "dropout_state after .to(bf16)")
    # Seeds drawn from torch's generator: reproducible, and distinct per layer.
    torch.manual_seed(3)
    s1 = [SingLoraLinear(torch.nn.Linear(4, 4), 2, 1.0).dropout_seed for _ in range(2)]
    torch.manual_seed(3)
    s2 = [SingLoraLinear(torch.nn.Linear(4, 4), 2, 1.0).dropout_seed for _ in range(2)]
    expect(p, s1 == s2 and s1[0] != s1[1], f"drawn seeds {s1} / {s2}")


@case
def dropout_refusals(p):
    base = torch.nn.Linear(8, 6)
    for bad in (1.0, -0.1, float("nan"), float("inf"), "x"):
        raises_named(p, ValueError, "`dropout`", lambda: SingLoraLinear(base, 2, 1.0, dropout=bad),
                     f"SingLoraLinear(dropout={bad!r})")
    layer = SingLoraLinear(base, 2, 1.0)
    raises_named(p, ValueError, "`dropout`", lambda: setattr(layer, "dropout", 1.0), "layer.dropout = 1")
    expect(p, layer.dropout == 0.0, "a refused p was stored")
    x, w, a = torch.randn(4, 8), torch.randn(6, 8), torch.randn(8, 2)
    st = state_of(1, 2)
    for what, fn, exc, needle in [
        ("p = 1", lambda: ops.linear_forward(x, w, None, a, scale_t(1.0), False, 1.0, st), ValueError, "dropout_p"),
        ("p = -0.1", lambda: ops.adapter_forward(x, a, scale_t(1.0), None, 8, False, -0.1, st), ValueError,
         "dropout_p"),
        ("p = nan", lambda: singlora_linear(x, w, None, a, 1.0, float("nan"), st), ValueError, "dropout_p"),
        ("p > 0, no state", lambda: singlora_linear(x, w, None, a, 1.0, 0.1), ValueError, "dropout_state"),
        ("int32 state", lambda: singlora_linear(x, w, None, a, 1.0, 0.1, st.int()), ValueError, "dropout_state"),
        ("state of 3", lambda: singlora_linear(x, w, None, a, 1.0, 0.1, torch.zeros(3, dtype=torch.int64)),
         ValueError, "dropout_state"),
        ("backward p = 1", lambda: ops.adapter_backward(x, torch.randn(4, 6), a, scale_t(1.0), torch.empty(0, 2),
                                                        None, True, 1.0, st), ValueError, "dropout_p"),
    ]:
        raises_named(p, exc, needle, fn, what)
    # Without the library: p > 0 on CPU says why; p = 0 runs as before.
    saved = _lib.lib

    def missing():
        raise _lib.SingLoraError("libsinglora.so not found; tried: (test)")

    _lib.lib = missing
    try:
        raises_named(p, _lib.SingLoraError, "needs libsinglora.so",
                     lambda: singlora_linear(x, w, None, a, 1.0, 0.1, st), "p > 0 without the library")
        y = singlora_linear(x, w, None, a, 1.0, 0.0, st)
        expect(p, rel_l2(y, x @ w.T + (x @ a[:8]) @ a[:6].T) <= F32_BAR, "p = 0 without the library")
    finally:
        _lib.lib = saved


runner.finish()
