"""SingLoRA layers into any model of ``nn.Linear``s, and peft-singlora 0.2's layout both ways.

Three ways in:

* :class:`singlora.SingLoraLinear` by hand, around one ``nn.Linear``;
* :func:`inject` ``(model, target_modules, r, alpha, ramp_up_steps, dropout)``:
  every matching ``nn.Linear`` of ``model`` (a transformers model included)
  is replaced in place by a ``SingLoraLinear``;
* :func:`from_peft_singlora` ``(model)``: the layers of a model adapted with
  peft-singlora 0.2 (``peft_singlora.Linear``, e.g. SimpleTuner's
  ``peft_lora_mode=singlora``) are replaced in place by ours, keeping the
  frozen weight, ``A`` (the same Parameter object), the step and the
  hyperparameters; :func:`to_peft_singlora` is the way back.

State dicts: :func:`to_peft_singlora_state_dict` writes a model with our
layers in peft-singlora's layout (what ``PeftModel.state_dict()`` or, with
``adapter_only=True``, ``peft.get_peft_model_state_dict`` gives);
:func:`load_peft_singlora_state_dict` reads either into a model with our
layers. Every tensor moves bit for bit (the step: see below).

The mapping, per adapted layer at path ``P`` (peft-singlora adapter name
``N``, "default" unless named; a ``PeftModel``'s keys carry the prefix
``base_model.model.``)::

    ours (SingLoraLinear)         peft-singlora 0.2 (SingLoRALayer)
    P.base.weight / .bias         P.base_layer.weight / .bias
    P.a           (D × r)         P.lora_A.N    (D × r; adapter-only files: P.lora_A)
    step_count    (int64, in      P.training_step_N   (a float32 buffer, or the
      P._extra_state)               model's float dtype after model.to(dtype))
    rank, alpha                   lora_A.N.shape[1], scaling[N] = lora_alpha / r
    warmup_steps (T)              ramp_up_steps (default 1000)
    dropout (p, see below)        lora_dropout[N] (nn.Dropout(p) or Identity)

The math is the same: ``W = W0 + s·A[:d_out]·A[:d_in]ᵀ``, ``s = alpha / r ·
min(t / T, 1)``, D = max(d_in, d_out), in ``nn.Linear``'s orientation for
both d_in < d_out and d_in > d_out (peft-singlora 0.2 forms the full
d_out × d_in update every forward; we never form it). Where they differ:

* The step: peft-singlora never counts steps itself; its ``t`` is whatever
  ``update_singlora_global_step(model, t)`` last set (the trainer's global,
  i.e. optimizer, step), 0 if never called, and then ``u = 0`` forever and A
  gets no gradient. Ours counts optimizer steps with
  :meth:`SingLoraLinear.step` (or :func:`step` / :func:`set_step` here).
  Their step is a float buffer: exact to 2^24 in float32, but after
  ``model.to(torch.bfloat16)`` a bf16 buffer holds integers exactly only up
  to 256 (257 is stored as 256). Ours is int64. Converting, a step that is
  not a whole number, or (writing theirs) one its buffer cannot hold exactly
  (float32: above 2^24), is refused.
* T = 0: ours means u = 1 from the start; theirs computes 0 / 0 = NaN at
  t = 0 (NaN outputs). Writing theirs with T = 0 at t = 0 is refused.
* Their config is partly ignored: with peft 0.21, ``get_peft_model`` with a
  ``SingLoRAConfig(ramp_up_steps=..., lora_dropout=...)`` builds layers with
  ``ramp_up_steps = 1000`` and no dropout whatever the config says (peft
  passes those through ``config=``, which peft-singlora does not read). We
  read the values the layers really use.
* ``use_rslora`` (scaling alpha / √r) is carried as our alpha = scaling · r.
* Their A is created float32 whatever the base weight's dtype; we keep the
  tensor as it is (our kernels then want autocast, or the model cast to one
  dtype). Their init is kaiming-uniform over a fan-in of r (bound 1/√r),
  ours over D (bound 1/√D); this matters only for new adapters.

Dropout (peft's ``lora_dropout``: the adapter sees ``drop(x)``, the frozen
path ``x``) is carried in every conversion, as ``SingLoraLinear``'s
``dropout`` (the kernels' fused dropout, in training mode only). Its masks
come from our Philox stream (the layer's seed and offset), theirs from
torch's RNG: in training mode with p > 0 the two give different (equally
distributed) outputs; in eval mode, or with p = 0, they are equal. The
seed and offset are ours alone (peft-singlora has none): a conversion or a
peft-layout state dict neither reads nor writes them.

Only the peft-singlora functions import ``peft_singlora`` (lazily).
"""

import math
import numbers
import re

import torch
from torch import nn

from .nn import SingLoraLinear

__all__ = [
    "PEFT_PREFIX",
    "inject",
    "singlora_layers",
    "step",
    "set_step",
    "from_peft_singlora",
    "to_peft_singlora",
    "to_peft_singlora_state_dict",
    "load_peft_singlora_state_dict",
]

#: The key prefix of a ``PeftModel``'s state dict.
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------- checks


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_hparams(r, alpha, ramp_up_steps, dropout):
    if not _is_int(r) or not 1 <= r <= 256:
        raise ValueError(f"singlora.peft: `r` must be an int in 1..=256; got {r!r}")
    if not _is_real(alpha) or not math.isfinite(alpha):
        raise ValueError(f"singlora.peft: `alpha` must be a finite number; got {alpha!r}")
    if not _is_int(ramp_up_steps) or ramp_up_steps < 0:
        raise ValueError(f"singlora.peft: `ramp_up_steps` must be an int >= 0; got {ramp_up_steps!r}")
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"singlora.peft: `dropout` must be a number in [0, 1); got {dropout!r}")


def _whole_step(value, where):
    """A step read from a float buffer as an int; ValueError unless it is a
    finite whole number >= 0."""
    v = float(value)
    if not math.isfinite(v) or v < 0 or v != math.floor(v):
        raise ValueError(f"singlora.peft: {where} is {v}; a step must be a whole number >= 0")
    return int(v)


def _step_tensor(layer, where, dtype=torch.float32):
    """The layer's step as peft-singlora's 0-dim float buffer (on A's device);
    ValueError unless ``dtype`` holds it exactly."""
    t = layer.steps
    v = torch.tensor(float(t), dtype=dtype, device=layer.a.device)
    if v.item() != t:
        raise ValueError(
            f"singlora.peft: {where}: step {t} is not exact in a {dtype} step buffer (float32 holds "
            f"integers up to 2^24, bfloat16 up to 256)"
        )
    return v


# ---------------------------------------------------------------- dropout


def _new_layer(base, r, alpha, ramp_up_steps, dropout):
    """A SingLoraLinear around ``base`` with adapter dropout ``dropout``."""
    return SingLoraLinear(base, r, alpha, warmup_steps=ramp_up_steps, dropout=float(dropout))


def _dropout_p(layer):
    """The adapter dropout probability of one of our layers."""
    return float(layer.dropout)


# ----------------------------------------------------------------- inject


def _set_module(root, name, module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _targets(target_modules):
    """``target_modules`` as (regex or None, list of names), peft's rules: a
    string is a regular expression the whole module name must match; a list
    holds names a module name must equal or end in (after a dot)."""
    if isinstance(target_modules, str):
        try:
            return re.compile(target_modules), []
        except re.error as e:
            raise ValueError(f"singlora.peft: `target_modules` {target_modules!r} is not a regex: {e}")
    if not isinstance(target_modules, (list, tuple, set)) or not all(
        isinstance(t, str) and t for t in target_modules
    ):
        raise TypeError(
            f"singlora.peft: `target_modules` must be a regex string or a list of module names; "
            f"got {target_modules!r}"
        )
    if not target_modules:
        raise ValueError("singlora.peft: `target_modules` is empty")
    return None, list(target_modules)


def inject(model, target_modules, r, alpha, ramp_up_steps=1000, dropout=0.0):
    """Replaces, in place, every ``nn.Linear`` of ``model`` that
    ``target_modules`` names by a :class:`SingLoraLinear` around it (rank
    ``r``, ``s = alpha / r · min(t / ramp_up_steps, 1)``, adapter dropout
    ``dropout``; peft-singlora's defaults for the last two). Returns ``model``.

    ``target_modules``: a list of names (a module matches when its dotted
    name equals one or ends in ``"." + name``, e.g. ``["q_proj", "v_proj"]``)
    or one regex string the whole name must match (peft's rules). Each name
    of a list must match at least one module, and every module matched must
    be an ``nn.Linear`` (transformers' GPT-2 ``Conv1D`` is not; the
    ``out_proj`` of an ``nn.MultiheadAttention`` is, but the attention never
    calls it) and not already adapted: otherwise ValueError / TypeError
    naming it, before anything is replaced.

    Only the adapted layers' frozen weights are frozen; to train the adapters
    alone, call ``model.requires_grad_(False)`` first (the new ``A``\\ s
    require grad). The new ``A`` is random (:meth:`SingLoraLinear.reset_parameters`);
    at step 0 (u(0) = 0) the model computes what it did before.
    """
    _check_hparams(r, alpha, ramp_up_steps, dropout)
    regex, names = _targets(target_modules)
    adapted = {n for n, m in model.named_modules() if isinstance(m, SingLoraLinear)}
    unmatched, chosen = set(names), []
    for name, module in model.named_modules():
        if not name:
            continue
        if regex is not None:
            hit = regex.fullmatch(name) is not None
        else:
            hits = [t for t in names if name == t or name.endswith("." + t)]
            unmatched.difference_update(hits)
            hit = bool(hits)
        if not hit or any(name.startswith(a + ".") for a in adapted):
            continue
        if isinstance(module, SingLoraLinear):
            raise ValueError(f"singlora.peft: `target_modules` matches {name!r}, already a SingLoraLinear")
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"singlora.peft: `target_modules` matches {name!r}, a {type(module).__module__}."
                f"{type(module).__name__}; SingLoraLinear adapts nn.Linear only"
            )
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(
                f"singlora.peft: `target_modules` matches {name!r}, the out_proj of an "
                f"nn.MultiheadAttention, which uses its weight directly (never calls it)"
            )
        chosen.append((name, module))
    if unmatched:
        raise ValueError(
            f"singlora.peft: `target_modules` names {sorted(unmatched)} match no module of the model"
        )
    if not chosen:
        raise ValueError(f"singlora.peft: `target_modules` {target_modules!r} matches no module of the model")
    for name, module in chosen:
        _set_module(model, name, _new_layer(module, r, alpha, ramp_up_steps, dropout))
    return model


def singlora_layers(model):
    """``[(name, layer)]`` for every :class:`SingLoraLinear` of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SingLoraLinear)]


def _unmerged_layers(model, of=""):
    """``{name: layer}`` of ``model``'s SingLoraLinears; ValueError when it
    holds none or one is merged (``of``: words after the layer's name)."""
    layers = dict(singlora_layers(model))
    if not layers:
        raise ValueError(f"singlora.peft: `model` ({type(model).__name__}) holds no SingLoraLinear")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"singlora.peft: layer {name!r}{of} is merged; unmerge() it first")
    return layers


def step(model, n=1):
    """Counts ``n`` optimizer steps on every SingLoRA layer of ``model`` (call
    after ``optimizer.step()``)."""
    for _, layer in singlora_layers(model):
        layer.step(n)


def set_step(model, t):
    """Sets the step of every SingLoRA layer of ``model`` to ``t`` (what
    peft-singlora's ``update_singlora_global_step(model, t)`` does)."""
    if not _is_int(t) or t < 0:
        raise ValueError(f"singlora.peft: `t` must be an int >= 0; got {t!r}")
    for _, layer in singlora_layers(model):
        layer.steps = t


# ---------------------------------------------------------- peft-singlora


def _peft_singlora():
    try:
        import peft_singlora
    except ImportError as e:
        raise ImportError(
            f"singlora.peft: this needs peft-singlora 0.2 (pip install peft-singlora==0.2.0, "
            f"which needs peft and transformers): {e}"
        ) from e
    return peft_singlora


def _unwrap(model):
    """The model inside a PeftModel (its LoraModel's model), else ``model``."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if type(model).__name__.startswith("PeftModel") and isinstance(inner, nn.Module):
        return inner
    return model


def _adapter_name(layer, where, adapter_name):
    names = list(layer.lora_A.keys())
    if adapter_name is None:
        if len(names) != 1:
            raise ValueError(
                f"singlora.peft: {where} holds adapters {names}; pass `adapter_name` to pick one"
            )
        return names[0]
    if adapter_name not in names:
        raise ValueError(f"singlora.peft: `adapter_name` {adapter_name!r} is not in {where} (it has {names})")
    return adapter_name


def from_peft_singlora(model, adapter_name=None):
    """Replaces, in place, every peft-singlora 0.2 layer of ``model`` (a
    ``PeftModel`` or any module holding ``peft_singlora.Linear`` layers) by a
    :class:`SingLoraLinear` with the same frozen layer, the same ``A``
    Parameter (so an optimizer holding it keeps working), step, rank, scale,
    ramp length and dropout, in the same train/eval mode. Returns the plain
    model (for a PeftModel, the model it wrapped, now holding our layers).

    ``adapter_name``: which adapter of a layer to take (needed only when a
    layer holds several). A merged or adapters-disabled layer, a base that is
    not an ``nn.Linear``, or a step that is not a whole number is refused
    (ValueError / TypeError) before anything is replaced.
    """
    ps = _peft_singlora()
    root = _unwrap(model)
    found = [(n, m) for n, m in root.named_modules() if isinstance(m, ps.SingLoRALayer)]
    if not found:
        raise ValueError(f"singlora.peft: `model` ({type(model).__name__}) holds no peft-singlora layer")
    plans = []
    for name, layer in found:
        where = f"layer {name!r}"
        if not isinstance(layer.base_layer, nn.Linear):
            raise TypeError(f"singlora.peft: {where} adapts a {type(layer.base_layer).__name__}, not an nn.Linear")
        if layer.merged_adapters:
            raise ValueError(f"singlora.peft: {where} is merged ({layer.merged_adapters}); unmerge() it first")
        if layer.disable_adapters:
            raise ValueError(f"singlora.peft: {where} has its adapters disabled")
        key = _adapter_name(layer, where, adapter_name)
        a = layer.lora_A[key]
        rank = a.shape[1]
        scaling = float(layer.scaling[key])
        alpha = layer.lora_alpha  # peft-singlora 0.2 sets a number (peft's own LoraLayer: a dict)
        alpha = float(alpha[key] if isinstance(alpha, dict) else alpha)
        if alpha / rank != scaling:  # use_rslora (alpha / sqrt(r)), or a hand-set scaling
            alpha = scaling * rank
        ramp = layer.ramp_up_steps
        if not _is_int(ramp) or ramp < 0:
            raise ValueError(f"singlora.peft: {where} has ramp_up_steps {ramp!r}; want an int >= 0")
        t = _whole_step(getattr(layer, f"training_step_{key}"), f"{where}'s training_step_{key}")
        drop = layer.lora_dropout[key]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        plans.append((name, layer, a, rank, alpha, ramp, t, p))
    for name, layer, a, rank, alpha, ramp, t, p in plans:
        new = _new_layer(layer.base_layer, rank, alpha, ramp, p)
        new.a = a
        new.steps = t
        new.train(layer.training)
        _set_module(root, name, new)
    return root


def to_peft_singlora(model, adapter_name="default"):
    """The way back: replaces, in place, every :class:`SingLoraLinear` of
    ``model`` by a ``peft_singlora.Linear`` (adapter ``adapter_name``) with
    the same frozen layer, ``A`` Parameter, step (in its float32 buffer, on
    A's device), ``lora_alpha``, ``r``, ``ramp_up_steps`` and
    ``lora_dropout``. Returns ``model``. Refused (ValueError): a merged layer,
    a step float32 cannot hold (above 2^24), T = 0 at step 0 (peft-singlora computes NaN
    there)."""
    ps = _peft_singlora()
    plans = []
    for name, layer in _unmerged_layers(model).items():
        where = f"layer {name!r}"
        t = _step_tensor(layer, where)
        if layer.warmup_steps == 0 and layer.steps == 0:
            raise ValueError(
                f"singlora.peft: {where} has warmup_steps = 0 at step 0; peft-singlora computes "
                f"u = 0 / 0 = NaN there (step the layer first, or use a ramp of >= 1 step)"
            )
        plans.append((name, layer, t))
    for name, layer, t in plans:
        theirs = ps.Linear(
            layer.base, adapter_name, r=layer.rank, lora_alpha=layer.alpha,
            lora_dropout=_dropout_p(layer), ramp_up_steps=layer.warmup_steps,
        )
        theirs.lora_A[adapter_name] = layer.a
        setattr(theirs, f"training_step_{adapter_name}", t)
        theirs.train(layer.training)
        _set_module(model, name, theirs)
    return model


# ------------------------------------------------------------ state dicts


def _owner(key, names):
    """(layer name, rest of the key) when ``key`` is inside one of the layers
    named (``""`` for the root), else (None, key)."""
    for n in names:
        if n == "":
            return n, key
        if key.startswith(n + "."):
            return n, key[len(n) + 1:]
    return None, key


def _join(*parts):
    return ".".join(p for p in parts if p)


def to_peft_singlora_state_dict(model, adapter_name="default", prefix=PEFT_PREFIX, adapter_only=False,
                                step_dtype=torch.float32):
    """``model``'s state dict (a model with our layers) in peft-singlora 0.2's
    layout: the ``state_dict()`` of the same model adapted with peft-singlora
    and wrapped in a PeftModel (keys prefixed ``prefix``), or, with
    ``adapter_only``, what ``peft.get_peft_model_state_dict`` gives (only
    ``lora_A`` without the adapter name, and the step). The tensors are
    ``model``'s own (not copies); each step is a new 0-dim ``step_dtype``
    tensor on A's device (float32, peft-singlora's own; a PeftModel cast with
    ``.to(torch.bfloat16)`` holds bfloat16 steps). A merged layer, or a step
    ``step_dtype`` cannot hold exactly (float32: above 2^24), is refused
    (ValueError)."""
    layers = _unmerged_layers(model)
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner, rest = _owner(key, layers)
        if owner is None:
            if not adapter_only:
                out[prefix + key] = value.detach()
            continue
        layer = layers[owner]
        if rest == "a":
            a_key = "lora_A" if adapter_only else f"lora_A.{adapter_name}"
            out[prefix + _join(owner, a_key)] = value.detach()
            out[prefix + _join(owner, f"training_step_{adapter_name}")] = _step_tensor(
                layer, f"layer {owner!r}", step_dtype
            )
        elif rest.startswith("base.") and not adapter_only:
            out[prefix + _join(owner, "base_layer." + rest[len("base."):])] = value.detach()
    return out


def load_peft_singlora_state_dict(model, state_dict, adapter_name=None, prefix=PEFT_PREFIX):
    """Loads a state dict in peft-singlora 0.2's layout into ``model`` (a
    model with our layers at the same paths, e.g. built with :func:`inject`
    with the same rank): a PeftModel's ``state_dict()`` (the frozen weights
    are loaded too, and every key of ``model`` must be there) or an adapter
    file's ``get_peft_model_state_dict`` form (``lora_A`` and the step of
    every layer). Keys with ``prefix`` have it removed first. Tensors are
    copied into ``model``'s (``load_state_dict``: cast to their dtype).

    ``adapter_name``: which adapter's keys to read (None: the one adapter
    the dict holds). Everything is checked before anything is loaded: a key
    that maps to nothing in ``model``, a layer without its A or step, a
    missing frozen weight (full layout), a step that is not a whole number,
    a merged layer of ``model``: ValueError naming it."""
    layers = _unmerged_layers(model, " of `model`")
    ours, a_of, step_of, full = {}, {}, {}, False  # a_of / step_of: {(layer, adapter or None): value}
    for key, value in state_dict.items():
        k = key[len(prefix):] if prefix and key.startswith(prefix) else key
        owner, rest = _owner(k, layers)
        if owner is None:
            ours[k] = value
            full = True
        elif rest.startswith("base_layer."):
            ours[_join(owner, "base." + rest[len("base_layer."):])] = value
            full = True
        elif rest == "lora_A" or rest.startswith("lora_A."):
            a_of[(owner, rest[len("lora_A."):] or None)] = value
        elif rest.startswith("training_step_"):
            step_of[(owner, rest[len("training_step_"):])] = value
        else:
            raise ValueError(f"singlora.peft: `state_dict` key {key!r} maps to nothing in `model`")
    names = {n for _, n in list(a_of) + list(step_of) if n is not None}
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"singlora.peft: `state_dict` holds adapters {sorted(names)}; pass `adapter_name`")
        adapter_name = next(iter(names), None)
    steps = {}
    for owner in layers:
        a = a_of.get((owner, adapter_name), a_of.get((owner, None)))
        if a is None:
            raise ValueError(f"singlora.peft: `state_dict` has no lora_A.{adapter_name} for layer {owner!r}")
        ours[_join(owner, "a")] = a
        t = step_of.get((owner, adapter_name))
        if t is None:
            raise ValueError(
                f"singlora.peft: `state_dict` has no training_step_{adapter_name} for layer {owner!r}"
            )
        steps[owner] = _whole_step(t, f"`state_dict`'s training_step_{adapter_name} of {owner!r}")
    own = model.state_dict()
    unknown = sorted(k for k in ours if k not in own)
    if unknown:
        raise ValueError(f"singlora.peft: `state_dict` keys {unknown} map to nothing in `model`")
    if full:
        missing = sorted(k for k in own if k not in ours and not k.endswith("_extra_state"))
        if missing:
            raise ValueError(f"singlora.peft: `state_dict` lacks {missing} (a full state dict must hold every key)")
    for k, v in ours.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"singlora.peft: `state_dict` entry for {k!r} is {tuple(v.shape)}, `model` has "
                f"{tuple(own[k].shape)} (a different rank?)"
            )
    model.load_state_dict(ours, strict=False)
    for owner, t in steps.items():
        layers[owner].steps = t
