"""The PyTorch binding: autograd functions and ``SingLoraLinear`` over the C ABI.

* :func:`singlora_linear` ``(x, weight, bias, a, scale)``: the adapted layer,
  ``y = x·Wᵀ + b + s·(x·A[:d_in])·A[:d_out]ᵀ``. The frozen product is
  torch's (``F.linear``); our forward kernel adds the adapter onto it in one
  pass (beta = 1) and saves ``S = x·A[:d_in]`` (f32, tokens × rank) for the
  backward. The backward computes ``dX = G·W`` with torch and our kernel adds
  ``s·(G·A[:d_out])·A[:d_in]ᵀ`` onto it, with ``dA`` in the same call.
* :func:`singlora_adapter` ``(x, a, scale, base=None, d_out=None)``: the
  adapter alone, ``s·(x·A[:d_in])·A[:d_out]ᵀ``, written into a new tensor,
  or added in place onto ``base`` (a frozen layer's output) and returned.
* :class:`SingLoraLinear`: wraps a frozen ``nn.Linear`` and owns ``A``, alpha
  and the ramp ``u(t) = min(t / T, 1)``, where ``t`` counts **optimizer
  steps** (call :meth:`SingLoraLinear.step` after ``optimizer.step()``),
  never forward calls.

Kernels run on the tensors' CUDA device, on ``torch.cuda.current_stream()``,
for float32, float16 and bfloat16 (x, W and A of one dtype; every reduction
in f32). Any leading batch dimensions are flattened into tokens. Inputs
whose last dimension is contiguous (stride 1) are used in place with their
row stride (a column slice of a wider tensor included); anything else
(transposed, expanded rows) is copied with ``.contiguous()`` first. ``A`` is
used contiguous (a copy is made if it is not).

Autocast: under ``torch.autocast`` enabled for x's device type, the ops
behave like autocast's lower-precision ops: x, weight, bias, a (and base)
are cast to the autocast dtype *before* the autograd function (so A's
gradient flows back through the cast to an f32 parameter, in f32), and the
function's forward and backward then run with autocast disabled, so every
buffer handed to a kernel has the one dtype the launch names. Outside
autocast, pass tensors of one dtype. The launch helpers check every buffer
against the launch's dtype (TypeError naming it) before calling the library.
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _lib
from ._lib import SingLoraError

__all__ = ["SingLoraLinear", "singlora_linear", "singlora_adapter", "SingLoraError"]

# The one home of the dtype <-> code mapping.
_CODES = {
    torch.float32: _lib.DTYPE_F32,
    torch.float16: _lib.DTYPE_F16,
    torch.bfloat16: _lib.DTYPE_BF16,
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _dtype_code(t, name):
    code = _CODES.get(t.dtype)
    if code is None:
        raise TypeError(
            f"singlora: `{name}` is {t.dtype}; the kernels take float32, float16 or bfloat16"
        )
    return code


def _same_dtype(ref, ref_name, *named):
    for name, t in named:
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"singlora: `{name}` is {t.dtype} but `{ref_name}` is {ref.dtype}; "
                f"pass tensors of one dtype"
            )


def _checked(name, t, *named):
    """The checks every entry point opens with: ``t`` and the ``named``
    tensors (``(name, tensor or None)``) on one CUDA device, ``t`` of a
    kernel dtype and the others of ``t``'s. Returns (the device, its code)."""
    dev = _device_check((name, t), *named)
    code = _dtype_code(t, name)
    _same_dtype(t, name, *named)
    return dev, code


def _check_buffers(code, named, f32_named=()):
    """Every buffer handed to a launch of dtype ``code``: those in ``named``
    must be of that dtype, those in ``f32_named`` float32 (None: not passed).
    A mismatch would make the kernel read or write a different number of
    bytes than the tensor holds, so it is refused before the call."""
    want = _DTYPES[code]
    for expected, group in ((want, named), (torch.float32, f32_named)):
        for name, t in group:
            if t is not None and t.dtype != expected:
                raise TypeError(
                    f"singlora: buffer `{name}` is {t.dtype} but the kernel is launched for "
                    f"{expected} (dtype code {code}); refusing to launch"
                )


def _cuda_device(*named):
    """The one CUDA device every named tensor is on."""
    dev = None
    for name, t in named:
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(
                f"singlora: `{name}` is on {t.device}; the kernels run on CUDA tensors"
            )
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise ValueError(f"singlora: `{name}` is on {t.device}, the others on {dev}")
    return dev


#: The device check every entry point calls: ``_device_check(("x", x), ...)``
#: returns the one device of the named tensors (None entries skipped) or
#: raises. The real kernels take CUDA tensors only; this module attribute is
#: the test seam (python/tests/test_torch_cpu.py replaces it, together with
#: the ``_lib`` launch functions, to run the autograd/autocast/merge logic on
#: CPU tensors). Everything else keys on the tensors' own device type.
_device_check = _cuda_device


def _stream(dev):
    # 0 for a non-CUDA device, which only a replaced _device_check lets through.
    return torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0


def _autocast_dtype(device_type):
    """The autocast dtype in force for ``device_type``, or None when autocast
    is off there (newer torch: per-device-type API; older: cuda/cpu names)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device_type argument (the CUDA state)
        if device_type == "cuda":
            enabled = torch.is_autocast_enabled()
        elif device_type == "cpu":
            enabled = torch.is_autocast_cpu_enabled()
        else:
            enabled = False
    if not enabled:
        return None
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype()
    return torch.get_autocast_cpu_dtype()


def _no_autocast(device_type):
    """A context with autocast disabled for ``device_type`` (a no-op where
    it is already off)."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _autocast_off(forward):
    """An autograd function's ``forward(ctx, x, ...)``, run with autocast
    disabled for x's device type."""

    @functools.wraps(forward)
    def run(ctx, x, *args):
        with _no_autocast(x.device.type):
            return forward(ctx, x, *args)

    return run


def _autocast_inputs(x, *tensors):
    """``(x, *tensors)`` cast to the autocast dtype when autocast is on for
    x's device type (kernel dtypes only: float64 and others are left, and
    refused later, as autocast leaves float64); else unchanged. ``.to`` is
    differentiable, so gradients flow back to the originals in their dtype."""
    dt = _autocast_dtype(x.device.type)
    if dt is None:
        return (x, *tensors)
    return tuple(
        t if t is None or t.dtype == dt or t.dtype not in _CODES else t.to(dt)
        for t in (x, *tensors)
    )


def _row_stride(t2, rows, cols):
    """The row stride of the 2-D ``t2`` (rows × cols) when the kernels can
    use it in place (unit column stride, row stride >= cols), else None."""
    if not ((cols == 1 or t2.stride(1) == 1) and (rows <= 1 or t2.stride(0) >= cols)):
        return None
    return t2.stride(0) if rows > 1 else cols


def _rows(t, cols, name):
    """``t`` as a (rows × cols) matrix with unit column stride, and its row
    stride. A view when the layout allows (a column slice keeps its stride),
    else a contiguous copy."""
    if t.dim() == 0 or t.shape[-1] != cols:
        raise ValueError(f"singlora: `{name}` must end in a dimension of {cols}; got {tuple(t.shape)}")
    t2 = t.reshape(-1, cols)
    ld = _row_stride(t2, t2.shape[0], cols)
    if ld is None:
        t2 = t2.contiguous()
        ld = _row_stride(t2, t2.shape[0], cols)
    return t2, ld


def _extent(t):
    """The byte range [lo, hi) ``t``'s elements span (None when empty)."""
    if t.numel() == 0:
        return None
    lo = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


def _check_no_overlap(name, t, other_name, other):
    """Refuses ``t`` (written in place) when its memory extent overlaps
    ``other``'s (conservative: interleaved column slices of one buffer count
    as overlapping)."""
    if t is None or other is None or t.device != other.device:
        return
    e1, e2 = _extent(t), _extent(other)
    if e1 is not None and e2 is not None and e1[0] < e2[1] and e2[0] < e1[1]:
        raise ValueError(
            f"singlora: `{name}` (written in place) overlaps `{other_name}` in memory; the "
            f"kernel reads `{other_name}` rows while writing `{name}`: pass a separate tensor "
            f"(e.g. {name}.clone())"
        )


def _check_a(a, d_in, d_out):
    d = max(d_in, d_out)
    if a.dim() != 2 or a.shape[0] != d:
        raise ValueError(
            f"singlora: `a` must be (max(d_in, d_out), rank) = ({d}, rank) for d_in = {d_in}, "
            f"d_out = {d_out}; got {tuple(a.shape)}"
        )
    return a.contiguous()


def _launch_forward(x2, ld_x, a, y2, ld_y, s, scale, beta):
    dev = x2.device
    code = _dtype_code(x2, "x")
    _check_buffers(code, (("x", x2), ("a", a), ("y", y2)), (("s", s),))
    _lib.forward(
        code, dev.index,
        x2.shape[0], x2.shape[1], y2.shape[1], a.shape[1],
        x2.data_ptr(), ld_x, a.data_ptr(), y2.data_ptr(), ld_y,
        0 if s is None else s.data_ptr(),
        scale, beta, _stream(dev),
    )


def _launch_backward(x2, ld_x, g2, ld_g, a, s, scale, dx2, dx_beta):
    """Runs the backward kernels; returns dA (f32). ``dx2`` (contiguous, or
    None) receives ``dx_beta·dx2 + s·Q·A[:d_in]ᵀ``."""
    dev = x2.device
    code = _dtype_code(x2, "x")
    _check_buffers(code, (("x", x2), ("g", g2), ("a", a), ("dx", dx2)), (("s", s),))
    tokens, d_in = x2.shape
    d_out = g2.shape[1]
    d, rank = a.shape
    da = torch.empty((d, rank), dtype=torch.float32, device=dev)
    _check_buffers(code, (), (("da", da),))
    nbytes = _lib.workspace_size(tokens, d_in, d_out, rank, saved_s=s is not None)
    # A fresh allocation of the caching allocator is 512-byte aligned (the
    # C ABI checks the 16 it needs), and is released only to later work on
    # this same stream, so freeing it on return is safe.
    ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    _lib.backward(
        code, dev.index, tokens, d_in, d_out, rank,
        x2.data_ptr(), ld_x, g2.data_ptr(), ld_g, a.data_ptr(),
        0 if s is None else s.data_ptr(), scale,
        0 if dx2 is None else dx2.data_ptr(), d_in, dx_beta,
        da.data_ptr(), 0.0, ws.data_ptr(), nbytes, _stream(dev),
    )
    return da


def _grad_a(da, a):
    # dA comes out in f32; autograd wants A's dtype.
    return da if da.dtype == a.dtype else da.to(a.dtype)


class _AdapterFn(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, x, a, base, scale, d_out, save_s):
        dev, _ = _checked("x", x, ("a", a), ("base", base))
        d_in = x.shape[-1]
        a_c = _check_a(a, d_in, d_out)
        x2, ld_x = _rows(x, d_in, "x")
        tokens, rank = x2.shape[0], a_c.shape[1]
        if base is not None:
            if tuple(base.shape) != tuple(x.shape[:-1]) + (d_out,):
                raise ValueError(
                    f"singlora: `base` must be x's shape with d_out = {d_out} last: "
                    f"{tuple(x.shape[:-1]) + (d_out,)}; got {tuple(base.shape)}"
                )
            try:
                y2 = base.view(-1, d_out)
            except RuntimeError:
                y2 = None
            ld_y = None if y2 is None else _row_stride(y2, tokens, d_out)
            if ld_y is None:
                raise ValueError(
                    "singlora: `base` is updated in place, so it must be viewable as "
                    "(tokens, d_out) with unit column stride; pass base.contiguous()"
                )
            beta = 1.0
        else:
            y2 = torch.empty((tokens, d_out), dtype=x.dtype, device=dev)
            ld_y, beta = d_out, 0.0
        s = torch.empty((tokens, rank), dtype=torch.float32, device=dev) if save_s else None
        _launch_forward(x2, ld_x, a_c, y2, ld_y, s, scale, beta)
        ctx.save_for_backward(x2, a_c, s)
        ctx.ld_x, ctx.scale, ctx.x_shape = ld_x, scale, x.shape
        if base is not None:
            ctx.mark_dirty(base)
            return base
        return y2.view(*x.shape[:-1], d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, a, s = ctx.saved_tensors
        need_x, need_a, need_base = ctx.needs_input_grad[:3]
        gx = ga = None
        if need_x or need_a:
            with _no_autocast(x2.device.type):
                g2, ld_g = _rows(gy, gy.shape[-1], "grad")
                dx2 = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device) if need_x else None
                da = _launch_backward(x2, ctx.ld_x, g2, ld_g, a, s, ctx.scale, dx2, 0.0)
                if need_x:
                    gx = dx2.view(ctx.x_shape)
                if need_a:
                    ga = _grad_a(da, a)
        return gx, ga, (gy if need_base else None), None, None, None


class _LinearFn(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, x, weight, bias, a, scale, save_s):
        dev, _ = _checked("x", x, ("weight", weight), ("bias", bias), ("a", a))
        if weight.dim() != 2:
            raise ValueError(f"singlora: `weight` must be (d_out, d_in); got {tuple(weight.shape)}")
        d_out, d_in = weight.shape
        a_c = _check_a(a, d_in, d_out)
        x2, ld_x = _rows(x, d_in, "x")
        tokens, rank = x2.shape[0], a_c.shape[1]
        y2 = F.linear(x2, weight, bias)
        if not y2.is_contiguous():
            y2 = y2.contiguous()
        s = torch.empty((tokens, rank), dtype=torch.float32, device=dev) if save_s else None
        _launch_forward(x2, ld_x, a_c, y2, d_out, s, scale, 1.0)
        ctx.save_for_backward(x2, weight, a_c, s)
        ctx.ld_x, ctx.scale, ctx.x_shape = ld_x, scale, x.shape
        return y2.view(*x.shape[:-1], d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, weight, a, s = ctx.saved_tensors
        with _no_autocast(x2.device.type):
            return _LinearFn._backward(ctx, gy, x2, weight, a, s)

    @staticmethod
    def _backward(ctx, gy, x2, weight, a, s):
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        gx = gw = gb = ga = None
        g2, ld_g = _rows(gy, weight.shape[0], "grad")
        dx2 = None
        if need_x:
            # The frozen path's dX = G·W (torch); the kernel adds the adapter's.
            dx2 = torch.mm(g2, weight)
            if not dx2.is_contiguous():
                dx2 = dx2.contiguous()
        if need_x or need_a:
            da = _launch_backward(x2, ctx.ld_x, g2, ld_g, a, s, ctx.scale, dx2, 1.0)
            if need_x:
                gx = dx2.view(ctx.x_shape)
            if need_a:
                ga = _grad_a(da, a)
        if need_w:
            gw = torch.mm(g2.t(), x2)
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb, ga, None, None


def _needs_s(*tensors):
    """S is saved only when a backward can follow (no_grad / inference skip it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def singlora_linear(x, weight, bias, a, scale):
    """``x·weightᵀ + bias + scale·(x·a[:d_in])·a[:d_out]ᵀ`` with autograd.

    ``weight`` is (d_out, d_in) (usually frozen), ``bias`` (d_out) or None,
    ``a`` (max(d_in, d_out), rank), ``scale`` a Python float (the kernels take
    it as f32). Gradients flow to x, a, and to weight/bias if they require it.
    Under autocast (for x's device type) the inputs are cast to its dtype
    first, and the result is of that dtype.
    """
    x, weight, bias, a = _autocast_inputs(x, weight, bias, a)
    return _LinearFn.apply(x, weight, bias, a, float(scale), _needs_s(x, weight, bias, a))


def singlora_adapter(x, a, scale, base=None, d_out=None):
    """The adapter alone, ``scale·(x·a[:d_in])·a[:d_out]ᵀ``, with autograd.

    With ``base`` (x's shape with d_out last, e.g. a frozen layer's output)
    the adapter is added onto it **in place** and ``base`` is returned (its
    gradient passes through unchanged); without, a new tensor is returned.
    ``base`` must not overlap ``x`` in memory (ValueError). ``d_out``
    defaults to base's last dimension, else to a.shape[0] (square). Under
    autocast (for x's device type) x, a and base are cast to its dtype
    first; a base of another dtype is then cast to a new tensor, which is
    updated and returned instead (``base`` itself is left unchanged).
    """
    if d_out is None:
        d_out = base.shape[-1] if base is not None else a.shape[0]
    elif base is not None and base.shape[-1] != d_out:
        raise ValueError(f"singlora: d_out = {d_out} but `base` ends in {base.shape[-1]}")
    _check_no_overlap("base", base, "x", x)
    x, a, base = _autocast_inputs(x, a, base)
    return _AdapterFn.apply(x, a, base, float(scale), int(d_out), _needs_s(x, a, base))


def _fold(weight, a, scale, undo):
    dev, code = _checked("weight", weight, ("a", a))
    d_out, d_in = weight.shape
    a_c = _check_a(a, d_in, d_out)
    ld_w = _row_stride(weight, d_out, d_in)
    if ld_w is None:
        raise ValueError("singlora: merge needs a weight with unit column stride (it is updated in place)")
    _check_buffers(code, (("w", weight), ("a", a_c)))
    fn = _lib.unmerge if undo else _lib.merge
    fn(code, dev.index, d_in, d_out, a_c.shape[1], weight.data_ptr(), ld_w, a_c.data_ptr(),
       scale, _stream(dev))
    # The kernel wrote through a raw pointer: tell autograd the weight changed
    # (a graph that saved it will then refuse to backward instead of using
    # the new values).
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(weight)


class SingLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` adapted by SingLoRA: ``W = W0 + s·A[:d_out]·A[:d_in]ᵀ``.

    Args:
        base: the ``nn.Linear`` to adapt (its weight and bias are frozen:
            ``requires_grad_(False)``), on a CUDA device, float32/float16/bfloat16.
        rank: the adapter rank r, 1..256.
        alpha: the scale numerator: ``s = alpha / rank · u(t)``.
        warmup_steps: T, the ramp ``u(t) = min(t / T, 1)`` over optimizer
            steps t (0: u = 1 from the start).

    ``A`` (``max(d_in, d_out) × rank``, the weight's dtype and device) is a
    Parameter initialised uniform in ``±1/√D`` (``kaiming_uniform_(a=√5)``
    with fan-in D, as the Rust layer does): never zero, since ``u(0) = 0``
    already makes the layer start equal to the frozen one.

    Call :meth:`step` once per optimizer step (not per forward: with gradient
    accumulation several forwards share a step). :meth:`merge` folds the
    adapter into ``base.weight`` in place for inference (forward is then the
    plain ``base``), :meth:`unmerge` takes it back out with exactly the
    ``A`` and scale it was merged with (a detached copy of ``A`` taken at
    merge time, ``merged_a``), so re-initialising, loading or stepping ``A``
    while merged cannot leave ``W0`` wrong. Merging a merged layer and
    unmerging an unmerged one raise RuntimeError (as in the Rust layer).
    ``state_dict`` carries the step count, the merged scale and ``merged_a``
    (extra state), so a merged layer round-trips merged.
    """

    def __init__(self, base, rank, alpha, warmup_steps=0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SingLoraLinear wraps an nn.Linear; got {type(base).__name__}")
        rank = int(rank)
        if not 1 <= rank <= 256:
            raise ValueError(f"rank must be in 1..=256; got {rank}")
        if not math.isfinite(float(alpha)):
            raise ValueError(f"alpha must be finite; got {alpha}")
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.warmup_steps = int(warmup_steps)
        self.steps = 0
        self.merged_scale = None
        # The A merged into base.weight (None when unmerged): a buffer so that
        # .to() / .half() move it with A and the weight; saved through the
        # extra state, not as a state_dict entry of its own.
        self.register_buffer("merged_a", None, persistent=False)
        d = max(base.in_features, base.out_features)
        w = base.weight
        self.a = nn.Parameter(torch.empty((d, rank), dtype=w.dtype, device=w.device))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.a.shape[0])
        with torch.no_grad():
            self.a.uniform_(-bound, bound)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def merged(self):
        return self.merged_scale is not None

    def ramp(self):
        """u(t) = min(t / T, 1); 1 when T = 0."""
        if self.warmup_steps == 0:
            return 1.0
        return min(self.steps / self.warmup_steps, 1.0)

    @property
    def scale(self):
        """s = alpha / rank · u(t), in Python float (f64); the kernels round it
        to f32 once."""
        return self.alpha / self.rank * self.ramp()

    def step(self, n=1):
        """Counts ``n`` optimizer steps (call after ``optimizer.step()``)."""
        self.steps += int(n)

    def forward(self, x):
        if self.merged:
            if torch.is_grad_enabled() and self.a.requires_grad:
                raise RuntimeError(
                    "SingLoraLinear is merged: call unmerge() before training "
                    "(or run under torch.no_grad())"
                )
            return self.base(x)
        return singlora_linear(x, self.base.weight, self.base.bias, self.a, self.scale)

    @torch.no_grad()
    def merge(self):
        """``base.weight += s·A[:d_out]·A[:d_in]ᵀ`` in place (s at the current
        step); remembers that A (a copy) and s for :meth:`unmerge`.
        RuntimeError if already merged."""
        if self.merged:
            raise RuntimeError(
                f"SingLoraLinear.merge: the layer is already merged (scale {self.merged_scale}); "
                f"call unmerge() first"
            )
        s = self.scale
        a = self.a.detach().clone(memory_format=torch.contiguous_format)
        _fold(self.base.weight, a, s, undo=False)
        self.merged_a = a
        self.merged_scale = s

    @torch.no_grad()
    def unmerge(self):
        """Takes the merged adapter back out of ``base.weight`` with the A and
        scale it was merged with (to within one rounding per element).
        RuntimeError if not merged."""
        if not self.merged:
            raise RuntimeError("SingLoraLinear.unmerge: the layer is not merged; nothing to unmerge")
        if self.merged_a is None:
            raise RuntimeError(
                "SingLoraLinear.unmerge: merged_scale is set but merged_a is missing "
                "(the merged state was changed by hand); cannot unmerge exactly"
            )
        _fold(self.base.weight, self.merged_a, self.merged_scale, undo=True)
        self.merged_a = None
        self.merged_scale = None

    def get_extra_state(self):
        return {"steps": self.steps, "merged_scale": self.merged_scale, "merged_a": self.merged_a}

    def set_extra_state(self, state):
        # Runs after this module's own parameters (A) are loaded, before its
        # children's (base.weight).
        self.steps = int(state.get("steps", 0))
        scale = state.get("merged_scale")
        self.merged_scale = None if scale is None else float(scale)
        if self.merged_scale is None:
            self.merged_a = None
            return
        merged_a = state.get("merged_a")
        if merged_a is None:
            # An extra state saved before merged_a existed: the A saved with
            # it (just loaded) is the best record of the merged one.
            merged_a = self.a
        if tuple(merged_a.shape) != tuple(self.a.shape):
            raise ValueError(
                f"SingLoraLinear: the state's merged_a is {tuple(merged_a.shape)}, "
                f"but A is {tuple(self.a.shape)}"
            )
        self.merged_a = merged_a.detach().to(device=self.a.device, dtype=self.a.dtype).clone(
            memory_format=torch.contiguous_format
        )

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, warmup_steps={self.warmup_steps}, "
            f"steps={self.steps}, merged={self.merged}"
        )
