"""singlora.peft on CPU: inject, and peft-singlora 0.2's layers and state dicts both ways.

    SINGLORA_REQUIRE_TORCH=1 PYTHONPATH=.toolchain/torch:.toolchain/peft \\
        python3 python/tests/test_peft_cpu.py

Needs torch; the transformers cases need transformers, the peft-singlora
cases peft-singlora 0.2 (with peft and transformers). A case whose package
cannot be imported prints "skipped: <case> (<why>)" and is not counted,
unless SINGLORA_REQUIRE_PEFT=1, then the missing package is a failure.
SINGLORA_PEFT_DEVICE=cuda runs the same cases with our layers on the GPU
(the CUDA kernels; the GPU bundle does this).

  * inject into an nn.Sequential and into a small LLaMA built from a config
    (no download): the adapted modules (square and both non-square shapes)
    are ours, the others untouched; at step 0 (u(0) = 0) the outputs are the
    frozen model's; after scaling A and stepping into the ramp, outputs and
    dA equal float64 autograd of the formula (relative L2, f32 bar 1e-5).
  * from_peft_singlora on a peft-wrapped model (get_peft_model with a
    SingLoRAConfig), f32 and bf16, square, d_in < d_out and d_in > d_out:
    outputs, dX and dA equal peft-singlora's on the same weights within the
    dtype's bar (f32 1e-5, bf16 1e-2), the adapter term being a sizeable part
    of the output; to_peft_singlora back gives peft-singlora's outputs again.
    Dropout, rsLoRA scaling and the ramp length carried; in eval mode equal
    to peft-singlora's, in training mode our dropout (the library's Philox
    mask, not torch's RNG: not comparable to theirs) against float64
    autograd of the formula with that mask, the offset advancing per forward.
  * state dicts both ways, bit for bit: ours -> peft-singlora layout -> a
    PeftModel (load_state_dict strict) -> its state_dict -> ours; a
    PeftModel's state_dict and its adapter-only get_peft_model_state_dict ->
    ours -> back (same keys, dtypes and bits); peft's set_peft_model_state_dict
    reads what we write.
  * refusals: bad r / alpha / ramp_up_steps / dropout / target_modules, a
    Conv1D (GPT-2) target, merged layers, unrepresentable steps, bad state
    dict keys: typed errors naming the argument, nothing half-done.

Prints one line per case, then "N passed, M failed"; exits 1 on a failure.
"""

import copy
import importlib
import math
import os

from torch_harness import BF16_BAR, F32_BAR, Runner, expect, f32, keep_mask, reference_linear, rel_l2, torch

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from singlora import peft as sp  # noqa: E402

DEV = torch.device(os.environ.get("SINGLORA_PEFT_DEVICE", "cpu"))
BAR = {torch.float32: F32_BAR, torch.bfloat16: BF16_BAR}
runner = Runner()


def _optional(name):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a dependency failing to import
        return None, f"{name} cannot be imported: {type(e).__name__}: {e}"


transformers, NO_TRANSFORMERS = _optional("transformers")
peft_singlora, NO_PEFT_SINGLORA = _optional("peft_singlora")
if peft_singlora is not None:
    import peft  # noqa: E402  (peft-singlora imports it)
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402


def case(why_not=None):
    """``@case()`` runs the case; ``@case(reason)`` with a reason skips it
    (a failure under SINGLORA_REQUIRE_PEFT=1)."""

    def named(fn):
        if why_not is None:
            return runner.case(fn)
        if os.environ.get("SINGLORA_REQUIRE_PEFT") == "1":
            def missing(p):
                p.append(why_not + " (SINGLORA_REQUIRE_PEFT=1)")

            missing.__name__ = fn.__name__
            return runner.case(missing)
        print(f"skipped: {fn.__name__} ({why_not})", flush=True)
        return fn

    return named


# ------------------------------------------------------------------ helpers


def within(p, errs, bar, what):
    print(f"    {what}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (bar {bar:.0e})")
    for k, v in errs.items():
        expect(p, v <= bar, f"{what}: {k} rel L2 {v:.2e} > {bar:.0e}")


def raises(p, what, exc, needle, fn):
    """``fn()`` must raise ``exc`` whose message contains ``needle``."""
    try:
        fn()
    except exc as e:
        expect(p, needle in str(e), f"{what}: {exc.__name__} without {needle!r}: {e}")
        return
    except Exception as e:
        p.append(f"{what}: {type(e).__name__} (want {exc.__name__}): {e}")
        return
    p.append(f"{what}: nothing raised")


class _RefLayer(nn.Module):
    """The formula in float64 autograd: x·W0ᵀ + b + s·(x·A[:d_in])·A[:d_out]ᵀ,
    s the f32 scale the kernels read."""

    def __init__(self, layer):
        super().__init__()
        self.weight = layer.base.weight.detach().double()
        self.bias = None if layer.base.bias is None else layer.base.bias.detach().double()
        self.a = nn.Parameter(layer.a.detach().double())
        self.s = f32(layer.scale)

    def forward(self, x):
        d_out, d_in = self.weight.shape
        return F.linear(x, self.weight, self.bias) + self.s * (x @ self.a[:d_in]) @ self.a[:d_out].T


def reference(model):
    """A float64 copy of ``model`` with each SingLoraLinear as _RefLayer."""
    ref = copy.deepcopy(model)
    for name, layer in sp.singlora_layers(ref):
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, _RefLayer(layer))
    return ref.double()


def grow_adapters(model, factor):
    """Scales every A so the adapter term is a sizeable part of the output."""
    with torch.no_grad():
        for _, layer in sp.singlora_layers(model):
            layer.a.mul_(factor)


def check_against_reference(p, model, inputs, g, frozen_out, what, a_names):
    """Outputs and the named layers' dA against float64 autograd."""
    ref = reference(model)
    y = model(*inputs)
    y = getattr(y, "logits", y)
    y.backward(g)
    ins64 = [t.double() if t.is_floating_point() else t for t in inputs]
    yr = ref(*ins64)
    yr = getattr(yr, "logits", yr)
    yr.backward(g.double())
    errs = {"y": rel_l2(y, yr)}
    for n in a_names:
        errs[f"dA {n}"] = rel_l2(model.get_submodule(n).a.grad, ref.get_submodule(n).a.grad)
    within(p, errs, F32_BAR, what)
    moved = rel_l2(frozen_out, y)
    print(f"    {what}: the adapter moves the output by {moved:.2f} (rel L2)")
    expect(p, moved > 0.05, f"{what}: the adapter term is too small ({moved:.3f}) for the check to mean much")


def tiny_llama(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).to(DEV).eval()


def stack(d_in, d_out, seed):
    """Linear(d_in → d_out), Tanh, Linear(d_out → d_in): both orientations."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, d_in, bias=False))


def peft_wrap(base, r, alpha, targets, dtype):
    pm = get_peft_model(base, peft_singlora.SingLoRAConfig(r=r, lora_alpha=alpha, target_modules=targets))
    return pm.to(DEV, dtype)


def their_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft_singlora.SingLoRALayer)]


def same_tensors(p, got, want, what):
    """Same keys, and every tensor of the same dtype, shape and bits."""
    expect(p, list(got) == list(want) or set(got) == set(want),
           f"{what}: keys differ: extra {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}")
    bad = [k for k in want if k in got and isinstance(want[k], torch.Tensor) and not (
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    expect(p, not bad, f"{what}: tensors differ (dtype or bits): {bad}")
    print(f"    {what}: {len(want)} entries, bit for bit" if not bad else f"    {what}: {len(bad)} differ")


# ------------------------------------------------------------------- inject


@case()
def inject_sequential(p):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 12, bias=False), nn.GELU(),
                      nn.Linear(12, 16)).to(DEV)
    x = torch.randn(5, 16, device=DEV)
    with torch.no_grad():
        y0 = m(x)
    first, middle = m[0], m[2]
    out = sp.inject(m, ["0", "4"], r=4, alpha=8.0, ramp_up_steps=10)
    expect(p, out is m, "inject returns the model")
    expect(p, [n for n, _ in sp.singlora_layers(m)] == ["0", "4"], f"adapted: {sp.singlora_layers(m)}")
    expect(p, m[0].base is first and m[2] is middle, "the frozen layer is wrapped, the others untouched")
    expect(p, m[0].a.requires_grad and not m[0].base.weight.requires_grad, "A trains, W0 frozen")
    expect(p, (m[0].rank, m[0].alpha, m[0].warmup_steps, m[0].steps) == (4, 8.0, 10, 0), "hyperparameters")
    with torch.no_grad():
        y1 = m(x)
    print(f"    step 0: bitwise equal to the frozen model: {torch.equal(y1, y0)}")
    within(p, {"y": rel_l2(y1, y0)}, F32_BAR, "step 0 vs frozen")
    grow_adapters(m, 3.0)
    sp.set_step(m, 5)
    expect(p, all(l.steps == 5 and l.ramp() == 0.5 for _, l in sp.singlora_layers(m)), "set_step")
    x.requires_grad_(True)
    check_against_reference(p, m, [x], torch.randn(5, 16, device=DEV), y0, "step 5 of 10", ["0", "4"])
    sp.step(m, 2)
    expect(p, m[4].steps == 7, f"step(): {m[4].steps}")


@case(NO_TRANSFORMERS)
def inject_llama(p):
    model = tiny_llama(2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 96, (2, 10), device=DEV)
    with torch.no_grad():
        y0 = model(ids).logits
    sp.inject(model, targets, r=4, alpha=8.0, ramp_up_steps=100)
    names = [n for n, _ in sp.singlora_layers(model)]
    expect(p, len(names) == 14, f"{len(names)} layers adapted, want 2 × 7")
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    up = model.get_submodule("model.layers.1.mlp.up_proj")
    expect(p, (k.in_features, k.out_features, tuple(k.a.shape)) == (32, 16, (32, 4)), "k_proj: d_in > d_out")
    expect(p, (up.in_features, up.out_features, tuple(up.a.shape)) == (32, 48, (48, 4)), "up_proj: d_in < d_out")
    with torch.no_grad():
        y1 = model(ids).logits
    within(p, {"logits": rel_l2(y1, y0)}, F32_BAR, "step 0 vs frozen")
    grow_adapters(model, 4.0)
    sp.set_step(model, 60)
    g = torch.randn_like(y0)
    check_against_reference(p, model, [ids], g, y0, "step 60 of 100",
                            ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj",
                             "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])


@case(NO_TRANSFORMERS)
def inject_refuses_gpt2_conv1d(p):
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    raises(p, "GPT-2 c_attn (Conv1D)", TypeError, "Conv1D", lambda: sp.inject(model, ["c_attn"], r=4, alpha=4.0))
    expect(p, not sp.singlora_layers(model), "nothing replaced after the refusal")
    sp.inject(model, ["lm_head"], r=2, alpha=2.0)  # an nn.Linear of the same model is fine
    expect(p, [n for n, _ in sp.singlora_layers(model)] == ["lm_head"], "lm_head adapted")


# ------------------------------------------------------------ peft-singlora


@case(NO_PEFT_SINGLORA)
def from_peft_singlora_equals_theirs(p):
    for dtype in (torch.float32, torch.bfloat16):
        for d_in, d_out in ((16, 16), (12, 20), (20, 12)):
            what = f"{str(dtype)[6:]} {d_in}->{d_out}->{d_in}"
            pm = peft_wrap(stack(d_in, d_out, seed=d_in + d_out), 4, 8, ["0", "2"], dtype)
            with torch.no_grad():
                for _, layer in their_layers(pm):
                    layer.lora_A["default"].mul_(2.0)
            # 250 of peft-singlora's 1000: u = 0.25. A bf16 model keeps its step in bf16 (exact
            # to 256: 750 would be 752) and computes t / T in bf16, so both are chosen exact.
            peft_singlora.update_singlora_global_step(pm, 250)
            x = torch.randn(3, 5, d_in, device=DEV, dtype=dtype, requires_grad=True)
            g = torch.randn(3, 5, d_in, device=DEV, dtype=dtype)
            a_params = [layer.lora_A["default"] for _, layer in their_layers(pm)]

            def run(model):
                x.grad = None
                for a in a_params:
                    a.grad = None
                y = model(x)
                y.backward(g)
                return y.detach(), x.grad.clone(), [a.grad.clone() for a in a_params]

            with torch.no_grad(), pm.disable_adapter():
                frozen = pm(x)
            y_t, dx_t, da_t = run(pm)
            root = sp.from_peft_singlora(pm)
            ours = sp.singlora_layers(root)
            expect(p, not their_layers(root) and len(ours) == 2, f"{what}: layers not all replaced")
            expect(p, all(l.a is a for (_, l), a in zip(ours, a_params)), f"{what}: A is the same Parameter")
            expect(p, all((l.rank, l.alpha, l.warmup_steps, l.steps) == (4, 8.0, 1000, 250) for _, l in ours),
                   f"{what}: hyperparameters {[(l.rank, l.alpha, l.warmup_steps, l.steps) for _, l in ours]}")
            y_o, dx_o, da_o = run(root)
            # float64 autograd of the formula, for scale.
            ref = reference(root)
            x64 = x.detach().double().requires_grad_(True)
            y_r = ref(x64)
            y_r.backward(g.double())
            da_r = [m.a.grad for m in ref.modules() if isinstance(m, _RefLayer)]

            def errs(y, dx, da, y2, dx2, da2):
                e = {"y": rel_l2(y, y2), "dx": rel_l2(dx, dx2)}
                e.update({f"dA{i}": rel_l2(u, v) for i, (u, v) in enumerate(zip(da, da2))})
                return e

            print(f"    {what} peft-singlora vs float64: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in errs(y_t, dx_t, da_t, y_r, x64.grad, da_r).items()))
            within(p, errs(y_o, dx_o, da_o, y_r, x64.grad, da_r), BAR[dtype], f"{what} ours vs float64")
            within(p, errs(y_o, dx_o, da_o, y_t, dx_t, da_t), BAR[dtype], f"{what} ours vs peft-singlora")
            moved = rel_l2(frozen, y_t)
            expect(p, moved > 0.05, f"{what}: the adapter term is too small ({moved:.3f})")
            sp.to_peft_singlora(root)
            root.to(dtype)  # the step buffer as pm.to(dtype) left it (to_peft_singlora writes float32)
            expect(p, len(their_layers(root)) == 2 and not sp.singlora_layers(root), f"{what}: not converted back")
            back = errs(*run(root), y_t, dx_t, da_t)
            expect(p, all(v == 0.0 for v in back.values()), f"{what}: back in peft-singlora, not its outputs: {back}")


@case(NO_PEFT_SINGLORA)
def from_peft_singlora_dropout_rslora_ramp(p):
    torch.manual_seed(4)
    # What peft 0.21's get_peft_model does with the config's ramp and dropout (informational).
    pm = get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft_singlora.SingLoRAConfig(
        r=2, lora_alpha=2, target_modules=["0"], ramp_up_steps=50, lora_dropout=0.1))
    layer = their_layers(pm)[0][1]
    print(f"    peft {peft.__version__}: SingLoRAConfig(ramp_up_steps=50, lora_dropout=0.1) built a layer "
          f"with ramp_up_steps={layer.ramp_up_steps}, dropout {type(layer.lora_dropout['default']).__name__}")
    # Layers built directly hold what they were given.
    model = nn.Sequential(
        peft_singlora.Linear(nn.Linear(10, 14), "default", r=3, lora_alpha=6, lora_dropout=0.1, ramp_up_steps=10),
        nn.ReLU(),
        peft_singlora.Linear(nn.Linear(14, 10), "default", r=5, lora_alpha=4, use_rslora=True, ramp_up_steps=7),
    ).to(DEV).eval()
    peft_singlora.update_singlora_global_step(model, 4)
    x = torch.randn(6, 10, device=DEV)
    with torch.no_grad():
        y_t = model(x)
    sp.from_peft_singlora(model)
    a, b = model[0], model[2]
    expect(p, (a.rank, a.alpha, a.warmup_steps, a.steps, sp._dropout_p(a)) == (3, 6.0, 10, 4, 0.1),
           f"layer 0: {(a.rank, a.alpha, a.warmup_steps, a.steps, sp._dropout_p(a))}")
    expect(p, math.isclose(b.alpha / b.rank, 4 / math.sqrt(5), rel_tol=1e-15) and b.warmup_steps == 7,
           f"rsLoRA scaling {b.alpha / b.rank} (want 4/√5)")
    expect(p, not a.training, "eval mode kept")
    with torch.no_grad():
        y_o = model(x)
    within(p, {"y (eval)": rel_l2(y_o, y_t)}, F32_BAR, "dropout 0.1 in eval, rsLoRA, ramp 4 of 10 / 7")
    # Training mode: our dropout (the library's mask at the layer's (seed,
    # offset)), against float64 autograd of the formula with that mask.
    model.train()
    offset = a.dropout_offset
    xg = x.clone().requires_grad_(True)
    g = torch.randn(6, 14, device=DEV)
    y = a(xg)
    y.backward(g)
    keep = keep_mask(0.1, a.dropout_seed, offset, 6, 10).to(DEV)
    expect(p, 0 < keep.sum().item() < keep.numel(), "the mask drops some elements and keeps some")
    expect(p, a.dropout_offset == offset + 1, f"offset {offset} -> {a.dropout_offset} (want one step)")
    yr, dxr, dar = reference_linear(x, a.base.weight, a.base.bias, a.a, f32(a.scale), g, keep=keep, p=0.1)
    undropped, _, _ = reference_linear(x, a.base.weight, a.base.bias, a.a, f32(a.scale), g)
    within(p, {"y": rel_l2(y, yr), "dx": rel_l2(xg.grad, dxr), "da": rel_l2(a.a.grad, dar)}, F32_BAR,
           "training, dropout 0.1 vs float64 with the library's mask")
    expect(p, rel_l2(y, undropped) > 1e-3, "training output equals the undropped one")
    a.a.grad = None
    sp.to_peft_singlora(model)
    drop = model[0].lora_dropout["default"]
    expect(p, isinstance(drop, nn.Dropout) and drop.p == 0.1 and model[0].ramp_up_steps == 10,
           f"back: dropout {drop}, ramp {model[0].ramp_up_steps}")
    model.eval()
    with torch.no_grad():
        within(p, {"y": rel_l2(model(x), y_t)}, F32_BAR, "back in peft-singlora")


@case(NO_PEFT_SINGLORA)
def state_dict_ours_to_peft_and_back(p):
    targets = ["0", "2", "4"]
    for dtype in (torch.float32, torch.bfloat16):
        def base(seed):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 12))

        m = sp.inject(base(5), targets, r=3, alpha=5.0, ramp_up_steps=20).to(DEV, dtype)
        with torch.no_grad():
            for _, layer in sp.singlora_layers(m):
                layer.a.normal_()
        sp.set_step(m, 10)  # u = 0.5: exact in a bf16 step buffer
        sd_p = sp.to_peft_singlora_state_dict(m)
        pm = peft_wrap(base(6), 3, 5, targets, dtype)
        pm.load_state_dict(sd_p, strict=True)
        for _, layer in their_layers(pm):
            layer.ramp_up_steps = 20  # get_peft_model ignores the config's (see singlora.peft)
        x = torch.randn(4, 12, device=DEV, dtype=dtype)
        with torch.no_grad():
            within(p, {"y": rel_l2(m(x), pm(x))}, BAR[dtype], f"{str(dtype)[6:]} peft-singlora loaded ours")
        fresh = sp.inject(base(7), targets, r=3, alpha=5.0, ramp_up_steps=20).to(DEV, dtype)
        sp.load_peft_singlora_state_dict(fresh, pm.state_dict())
        got, want = fresh.state_dict(), m.state_dict()
        extra = [k for k in want if k.endswith("_extra_state")]
        # The dropout pair is ours alone: peft-singlora's layout does not carry it (fresh keeps its own).
        ours_only = ("dropout_seed", "dropout_offset")
        expect(p, all({n: v for n, v in got[k].items() if n not in ours_only}
                      == {n: v for n, v in want[k].items() if n not in ours_only} for k in extra),
               "extra state (steps) differs")
        same_tensors(p, {k: v for k, v in got.items() if k not in extra},
                     {k: v for k, v in want.items() if k not in extra}, f"{str(dtype)[6:]} ours -> peft -> ours")


@case(NO_PEFT_SINGLORA)
def state_dict_peft_to_ours_and_back(p):
    targets = ["0", "2"]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        pm = peft_wrap(stack(12, 20, seed=8), 4, 8, targets, dtype)
        with torch.no_grad():
            for _, layer in their_layers(pm):
                layer.lora_A["default"].normal_()
        peft_singlora.update_singlora_global_step(pm, 123)
        m = sp.inject(stack(12, 20, seed=9), targets, r=4, alpha=8.0).to(DEV, dtype)
        sp.load_peft_singlora_state_dict(m, pm.state_dict())
        expect(p, all(l.steps == 123 for _, l in sp.singlora_layers(m)), f"{name}: steps")
        # pm.to(bf16) turned its step buffers bf16: write them so to compare bit for bit.
        same_tensors(p, sp.to_peft_singlora_state_dict(m, step_dtype=dtype), pm.state_dict(),
                     f"{name} peft -> ours -> peft (full)")
        x = torch.randn(4, 12, device=DEV, dtype=dtype)
        with torch.no_grad():
            within(p, {"y": rel_l2(m(x), pm(x))}, BAR[dtype], f"{name} ours loaded peft-singlora's")
    # The adapter file's form (what PeftModel.save_pretrained writes).
    adapter = get_peft_model_state_dict(pm)
    print(f"    adapter-only keys: {sorted(adapter)}")
    m2 = sp.inject(stack(12, 20, seed=10), targets, r=4, alpha=8.0).to(DEV, torch.bfloat16)
    sp.load_peft_singlora_state_dict(m2, adapter)
    written = sp.to_peft_singlora_state_dict(m2, adapter_only=True, step_dtype=torch.bfloat16)
    same_tensors(p, written, adapter, "peft adapter -> ours -> peft adapter")
    pm2 = peft_wrap(stack(12, 20, seed=11), 4, 8, targets, torch.bfloat16)
    set_peft_model_state_dict(pm2, written)
    same_tensors(p, get_peft_model_state_dict(pm2), adapter, "ours -> peft's set_peft_model_state_dict")
    m2[0].steps = 257
    raises(p, "step 257 as bfloat16", ValueError, "not exact",
           lambda: sp.to_peft_singlora_state_dict(m2, step_dtype=torch.bfloat16))


# ---------------------------------------------------------------- refusals


@case()
def refusals(p):
    def model():
        torch.manual_seed(12)
        return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 6))

    for what, kw, needle in [
        ("r = 0", dict(r=0), "`r`"), ("r = 257", dict(r=257), "`r`"), ("r = 2.5", dict(r=2.5), "`r`"),
        ("alpha = nan", dict(alpha=float("nan")), "`alpha`"),
        ("ramp_up_steps = -1", dict(ramp_up_steps=-1), "`ramp_up_steps`"),
        ("ramp_up_steps = 1.5", dict(ramp_up_steps=1.5), "`ramp_up_steps`"),
        ("dropout = 1", dict(dropout=1.0), "`dropout`"), ("dropout = -0.1", dict(dropout=-0.1), "`dropout`"),
        ("target_modules = []", dict(target_modules=[]), "`target_modules`"),
        ("target_modules = ['0', 'nope']", dict(target_modules=["0", "nope"]), "'nope'"),
        ("target_modules = '('", dict(target_modules="("), "`target_modules`"),
    ]:
        args = dict(target_modules=["0"], r=4, alpha=4.0) | kw
        m = model()
        raises(p, what, ValueError, needle, lambda: sp.inject(m, **args))
        expect(p, not sp.singlora_layers(m), f"{what}: the model was changed")
    raises(p, "target_modules = 5", TypeError, "`target_modules`", lambda: sp.inject(model(), 5, r=4, alpha=4.0))
    raises(p, "a regex matching a GELU", TypeError, "'1'", lambda: sp.inject(model(), r"\d", r=4, alpha=4.0))
    twice = sp.inject(model(), ["0"], r=2, alpha=2.0)
    raises(p, "injecting twice", ValueError, "already", lambda: sp.inject(twice, ["0"], r=2, alpha=2.0))
    sp.inject(model(), r"[02]", r=2, alpha=2.0)  # a regex naming Linears only is fine
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    raises(p, "MultiheadAttention.out_proj", TypeError, "MultiheadAttention",
           lambda: sp.inject(mha, ["out_proj"], r=2, alpha=2.0))
    raises(p, "set_step(-1)", ValueError, "`t`", lambda: sp.set_step(twice, -1))
    raises(p, "state dict of a model without our layers", ValueError, "`model`",
           lambda: sp.to_peft_singlora_state_dict(model()))
    m = sp.inject(model(), ["0", "2"], r=2, alpha=2.0, ramp_up_steps=0)
    m[0].merge()
    raises(p, "state dict of a merged layer", ValueError, "merged", lambda: sp.to_peft_singlora_state_dict(m))
    m[0].unmerge()
    m[2].steps = 2**24 + 1
    raises(p, "a step of 2^24 + 1", ValueError, "2^24", lambda: sp.to_peft_singlora_state_dict(m))
    m[2].steps = 3
    sd = sp.to_peft_singlora_state_dict(m)
    a_before = m[0].a.detach().clone()
    for what, bad, needle in [
        ("an unknown key", sd | {"base_model.model.0.lora_B.default": torch.zeros(1)}, "lora_B"),
        ("a key no module has", sd | {"base_model.model.9.weight": torch.zeros(1)}, "9.weight"),
        ("no lora_A", {k: v for k, v in sd.items() if "0.lora_A" not in k}, "lora_A.default"),
        ("no step", {k: v for k, v in sd.items() if "0.training_step" not in k}, "training_step_default"),
        ("a fractional step", sd | {"base_model.model.0.training_step_default": torch.tensor(2.5)}, "2.5"),
        ("a negative step", sd | {"base_model.model.0.training_step_default": torch.tensor(-1.0)}, "-1.0"),
        ("another rank", sd | {"base_model.model.0.lora_A.default": torch.randn(8, 3)}, "rank"),
        ("a missing frozen weight", {k: v for k, v in sd.items() if "2.base_layer.bias" not in k}, "2.base.bias"),
        ("two adapters", sd | {"base_model.model.0.training_step_other": torch.tensor(1.0)}, "`adapter_name`"),
    ]:
        raises(p, f"loading {what}", ValueError, needle,
               lambda bad=bad: sp.load_peft_singlora_state_dict(m, {k: v.clone() for k, v in bad.items()}))
    expect(p, torch.equal(m[0].a, a_before) and m[2].steps == 3, "a refused load changed the model")
    if peft_singlora is None:
        print(f"    (peft-singlora refusals skipped: {NO_PEFT_SINGLORA})")
        return
    raises(p, "from_peft_singlora without peft-singlora layers", ValueError, "`model`",
           lambda: sp.from_peft_singlora(model()))
    fresh = sp.inject(model(), ["0"], r=2, alpha=2.0, ramp_up_steps=0)
    raises(p, "to_peft_singlora at T = 0, t = 0", ValueError, "NaN", lambda: sp.to_peft_singlora(fresh))
    expect(p, len(sp.singlora_layers(fresh)) == 1, "a refused to_peft_singlora changed the model")
    theirs = peft_wrap(model(), 2, 2, ["0"], torch.float32)
    their_layers(theirs)[0][1].training_step_default.fill_(1.5)
    raises(p, "from_peft_singlora with a fractional step", ValueError, "1.5", lambda: sp.from_peft_singlora(theirs))
    expect(p, len(their_layers(theirs)) == 1, "a refused from_peft_singlora changed the model")


runner.finish()
