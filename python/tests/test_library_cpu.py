"""The torch.library custom ops (namespace ``singlora``) on CPU: needs torch, no GPU.

    SINGLORA_REQUIRE_TORCH=1 PYTHONPATH=.toolchain/torch python3 python/tests/test_library_cpu.py

Checks, on CPU tensors (the ops' CPU kernels are torch ops; no library call
is made, so neither libsinglora.so nor a GPU is needed):

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
    without base), merge/unmerge, and autocast (CPU, bf16) eager and compiled.

Output, exit status and the skip without torch: torch_harness.py.
"""

import math

from torch_harness import BF16_BAR, F32_BAR, Runner, expect, f32, reference_adapter, reference_linear, rel_l2, torch

import torch._dynamo  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch.library import opcheck  # noqa: E402

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


def make_model(seed=0, dtype=torch.float32, warmup=4):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        SingLoraLinear(torch.nn.Linear(16, 24), rank=4, alpha=8.0, warmup_steps=warmup),
        torch.nn.GELU(),
        SingLoraLinear(torch.nn.Linear(24, 12, bias=False), rank=3, alpha=6.0, warmup_steps=warmup),
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
    n = 0
    for name, cases in samples.items():
        op = getattr(ops, name).default
        for args in cases:
            res = opcheck(op, args, raise_exception=False)
            bad = {k: v for k, v in res.items() if v != "SUCCESS"}
            expect(p, not bad, f"opcheck {name} {[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]}: {bad}")
            n += 1
    print(f"    {n} opcheck calls ({', '.join(sorted(res))})")


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


@case
def linear_vs_float64(p):
    for dtype in (torch.float32, torch.bfloat16):
        for d_in, d_out, rank, bias in [(40, 24, 6, True), (24, 40, 5, False), (33, 33, 8, True)]:
            torch.manual_seed(d_in + d_out)
            x = torch.randn(3, 7, d_in).to(dtype).requires_grad_(True)
            w = (torch.randn(d_out, d_in) / math.sqrt(d_in)).to(dtype)
            b = torch.randn(d_out).to(dtype) if bias else None
            a = (torch.randn(max(d_in, d_out), rank) * 0.3).to(dtype).requires_grad_(True)
            g = torch.randn(3, 7, d_out).to(dtype)
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


runner.finish()
