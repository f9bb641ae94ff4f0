"""The PyTorch binding: ``torch.library`` custom ops and ``SingLoraLinear`` over the C ABI.

The work is done by custom ops in the ``singlora`` namespace
(``torch.ops.singlora.*``; see the "custom ops" section below for their
schemas): ``linear_forward``, ``adapter_forward``, ``adapter_backward``,
``merge`` and ``unmerge``. Each has a CUDA kernel over the C ABI (launched
on ``torch.cuda.current_stream()``, the scale read from a device float32
tensor by pointer, ``scale_ptr`` of the C launches), a CPU kernel made of torch ops
(f32 accumulation, cast back once, like the kernels: a model with our layers
also runs, slowly, on CPU), a fake (shape) function, autocast rules and, for
the forwards, an autograd formula (``register_autograd``, whose backward is
the ``adapter_backward`` op). So ``torch.compile(model, fullgraph=True)``
traces our layers without graph breaks, and a scale that changes (the ramp)
is tensor data, never a recompile. ``merge``/``unmerge`` declare the weight
they update in place (``mutates_args``).

* :func:`singlora_linear` ``(x, weight, bias, a, scale)``: the adapted layer,
  ``y = x·Wᵀ + b + s·(x·A[:d_in])·A[:d_out]ᵀ``. The frozen product is
  torch's (``F.linear``); our forward kernel adds the adapter onto it in one
  pass (beta = 1) and saves ``S = x·A[:d_in]`` (f32, tokens × rank) for the
  backward. The backward computes ``dX = G·W`` with torch and our kernel adds
  ``s·(G·A[:d_out])·A[:d_in]ᵀ`` onto it, with ``dA`` in the same call.
* :func:`singlora_adapter` ``(x, a, scale, base=None, d_out=None)``: the
  adapter alone, ``s·(x·A[:d_in])·A[:d_out]ᵀ``, written into a new tensor,
  or added onto ``base`` (a frozen layer's output), written back into it and
  returned.
* :class:`SingLoraLinear`: wraps a frozen ``nn.Linear`` and owns ``A``, alpha
  and the ramp ``u(t) = min(t / T, 1)``, where ``t`` counts **optimizer
  steps** (call :meth:`SingLoraLinear.step` after ``optimizer.step()``),
  never forward calls. ``t`` lives in a 0-dim int64 buffer (``step_count``)
  and the scale is computed from it with torch ops each forward.

``scale`` is a 0-dim float32 tensor on x's device (or a Python float, made
into one; under torch.compile a changing Python float recompiles, a tensor
does not).

Adapter dropout (PEFT's ``lora_dropout``; design page, section 2): the
adapter sees ``drop(x) = M ⊙ x / (1 − p)``, the frozen path ``x``; the
backward regenerates ``M`` (Philox4x32-10 keyed by (seed, offset, token,
column), include/singlora.h "Dropout"), never stores it. The ops take
``dropout_p`` (a float in [0, 1); 0, the default, is exactly the undropped
path: no mask work, bitwise today's outputs) and ``dropout_state``: a CPU
int64 tensor of shape (2,) holding (seed, offset), each the int64 bit
pattern of a u64 (:func:`dropout_state` makes one). The pair is tensor
*data*, read by the ops' implementations with ``.tolist()`` (a CPU tensor:
no GPU sync), so torch.compile sees the same graph whatever its values and
an offset advancing every step never recompiles; ``p`` is a graph constant
(it changes only when the user changes it). The CUDA kernels take (p, seed,
offset) by value; the CPU kernels apply the same mask, computed on the host
by ``singlora_dropout_mask`` (bitwise the kernels'), so CPU and CUDA drop
the same elements. Dropout on CPU therefore needs libsinglora.so (a
SingLoraError saying so when it cannot be loaded); p = 0 never does. Under
``torch.cuda.graph`` capture the pair is read once, at capture: every replay
reuses that mask (the C ABI takes seed and offset by value, not by device
pointer); for the same reason torch.compile's ``mode="reduce-overhead"`` is
expected to skip CUDA graphs for a graph with p > 0 (a CPU tensor in it;
not measured here). p = 0 graphs hold no such tensor. :class:`SingLoraLinear` owns the pair (see there). Kernels run for float32, float16 and bfloat16 (x, W and A of one
dtype; every reduction in f32). Any leading batch dimensions are flattened
into tokens. Inputs whose last dimension is contiguous (stride 1) are used
in place with their row stride (a column slice of a wider tensor included);
anything else (transposed, expanded rows) is copied with ``.contiguous()``
first. ``A`` is used contiguous (a copy is made if it is not).

Autocast: the forward ops carry an autocast rule (AutocastCPU and
AutocastCUDA kernels): under ``torch.autocast`` for the tensors' device
type, x, weight, bias, a (and base) are cast to the autocast dtype (float64
and other non-kernel dtypes are left, and refused, as autocast leaves
float64), the scale and S stay float32, and the op runs with autocast off;
the casts sit above autograd, so A's gradient flows back to an f32 parameter
in f32. The backward and merge/unmerge cast nothing and also run with
autocast off. So every buffer handed to a kernel has the one dtype the
launch names; the launch helpers check each buffer against it (TypeError
naming it) before calling the library. Outside autocast, pass tensors of one
dtype.

Test seam: ``_device_check`` (see below) — replacing it routes CPU tensors
through the launch path, so python/tests/test_torch_cpu.py can run it with
faked launches.
"""

import contextlib
import math
import struct
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _lib
from ._lib import SingLoraError

__all__ = ["SingLoraLinear", "singlora_linear", "singlora_adapter", "dropout_state", "SingLoraError", "OPS"]

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
#: CPU tensors; with the real check, CPU tensors take the ops' torch-op CPU
#: kernels instead). Everything else keys on the tensors' own device type.
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
    if not 1 <= a.shape[1] <= 256:
        raise ValueError(f"singlora: the rank (a.shape[1]) must be in 1..=256; got {a.shape[1]}")
    return a.contiguous()


def _check_scale(scale, ref=None):
    """The scale the ops take: a float32 tensor of one element (0-dim), on
    ``ref``'s device when ``ref`` is given (the kernels read it there)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"singlora: `scale` must be a float32 tensor here; got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"singlora: `scale` is {scale.dtype}; the kernels read a float32 scale")
    if scale.numel() != 1:
        raise ValueError(f"singlora: `scale` must hold one element; got shape {tuple(scale.shape)}")
    if ref is not None and scale.device != ref.device:
        raise ValueError(f"singlora: `scale` is on {scale.device} but `x` on {ref.device}")


def _as_scale(scale, x):
    """``scale`` as the ops' 0-dim float32 tensor on x's device. A tensor is
    used as is (cast / moved if needed); a Python number becomes a new tensor
    (under torch.compile a changing Python float is a new constant each time,
    and a recompile: pass a tensor to vary it)."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32 or scale.device != x.device:
            scale = scale.to(device=x.device, dtype=torch.float32)
        return scale.reshape(())
    return torch.tensor(float(scale), dtype=torch.float32, device=x.device)


def _launch_scale(scale):
    """(by-value float, device pointer) for a launch: a tensor scale goes by
    pointer (``scale_ptr``), a Python float by value (``scale_ptr`` 0)."""
    if isinstance(scale, torch.Tensor):
        _check_scale(scale)
        return 0.0, scale.data_ptr()
    return float(scale), 0


# ------------------------------------------------------------ dropout

_U64 = 1 << 64


def _as_i64(v):
    """A u64 (any int, taken mod 2^64) as the int64 with its bit pattern."""
    v = int(v) % _U64
    return v - _U64 if v >= 1 << 63 else v


def _as_u64(v):
    """The u64 an int64 bit pattern stands for."""
    return int(v) % _U64


def dropout_state(seed, offset=0):
    """(seed, offset) as the ops' ``dropout_state``: a new CPU int64 tensor of
    shape (2,) holding the int64 bit patterns of the two u64s (any int is
    taken mod 2^64)."""
    return torch.tensor([_as_i64(seed), _as_i64(offset)], dtype=torch.int64)


def _check_p(p, name="dropout_p"):
    """``p`` as a float in [0, 1); ValueError naming ``name`` otherwise."""
    try:
        v = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"singlora: `{name}` must be a number in [0, 1); got {p!r}") from None
    if isinstance(p, bool) or not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise ValueError(f"singlora: `{name}` must be a finite number in [0, 1); got {p!r}")
    return v


def _check_dropout(dropout_p, dropout_state):
    """The ops' dropout arguments (real and fake; no value is read): p in
    [0, 1), and, when p > 0 or given, the state a CPU int64 (2,) tensor."""
    p = _check_p(dropout_p)
    if dropout_state is None:
        if p > 0.0:
            raise ValueError(
                f"singlora: `dropout_state` is needed with dropout_p = {p}: a CPU int64 tensor "
                f"(seed, offset) of shape (2,) (singlora.nn.dropout_state(seed, offset))"
            )
        return p
    if not isinstance(dropout_state, torch.Tensor):
        raise TypeError(f"singlora: `dropout_state` must be a tensor; got {type(dropout_state).__name__}")
    if (dropout_state.dtype != torch.int64 or tuple(dropout_state.shape) != (2,)
            or dropout_state.device.type != "cpu"):
        raise ValueError(
            f"singlora: `dropout_state` must be a CPU int64 tensor (seed, offset) of shape (2,); got "
            f"{dropout_state.dtype} {tuple(dropout_state.shape)} on {dropout_state.device}"
        )
    return p


def _dropout_args(dropout_p, dropout_state):
    """(p, seed, offset) as the C launches take them ((0.0, 0, 0) when p = 0);
    reads the state's values (a CPU tensor: no GPU sync)."""
    p = _check_dropout(dropout_p, dropout_state)
    if p == 0.0:
        return 0.0, 0, 0
    seed, offset = dropout_state.tolist()
    return p, _as_u64(seed), _as_u64(offset)


def _keep_scale(p):
    """1 / (1 − p) rounded to f32 once, as the kernels apply it."""
    return f32_round(1.0 / (1.0 - p))


def f32_round(v):
    """``v`` rounded to float32 (a Python float)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _keep_mask(p, seed, offset, tokens, cols, device):
    """The kernels' keep mask M of a tokens × cols input as a float32 (0/1)
    tensor on ``device``, from ``singlora_dropout_mask`` (the host copy of
    the kernels' Philox mapping, bit for bit)."""
    if tokens * cols == 0:
        return torch.ones((tokens, cols), dtype=torch.float32, device=device)
    try:
        keep = _lib.dropout_mask(p, seed, offset, tokens, cols)
    except SingLoraError as e:
        raise SingLoraError(
            f"singlora: adapter dropout (p = {p}) on CPU needs libsinglora.so for its mask (the "
            f"kernels' Philox mask, computed on the host by singlora_dropout_mask); p = 0 does not: {e}"
        ) from e
    m = torch.frombuffer(keep, dtype=torch.uint8).reshape(tokens, cols)
    return m.to(device=device, dtype=torch.float32)


def _as_dropout_state(state):
    """A (seed, offset) pair of ints as a state tensor; a tensor as is."""
    if state is None or isinstance(state, torch.Tensor):
        return state
    seed, offset = state
    return dropout_state(seed, offset)


_initialised = set()


def _ensure_init(dev):
    """singlora_init once per CUDA device: it loads the kernels and
    synchronises, which must happen before any CUDA graph capture, so do it
    on the first (eager) launch rather than inside one."""
    if dev.type == "cuda" and dev.index not in _initialised:
        _lib.init(dev.index)
        _initialised.add(dev.index)


def _launch_forward(x2, ld_x, a, y2, ld_y, s, scale, beta, dropout=(0.0, 0, 0)):
    """The forward kernel; ``scale`` a 0-dim f32 tensor on the device (read
    there when the kernel runs) or a Python float (by value); ``dropout``
    (p, seed, offset) as the C launch takes them."""
    dev = x2.device
    code = _dtype_code(x2, "x")
    by_value, scale_ptr = _launch_scale(scale)
    _check_buffers(code, (("x", x2), ("a", a), ("y", y2)),
                   (("s", s), ("scale", scale if scale_ptr else None)))
    _ensure_init(dev)
    common = (code, dev.index, x2.shape[0], x2.shape[1], y2.shape[1], a.shape[1],
              x2.data_ptr(), ld_x, a.data_ptr(), y2.data_ptr(), ld_y,
              0 if s is None else s.data_ptr())
    p, seed, offset = dropout
    _lib.forward(*common, by_value, scale_ptr, beta, dropout_p=p, dropout_seed=seed, dropout_offset=offset,
                 stream=_stream(dev))


def _launch_backward(x2, ld_x, g2, ld_g, a, s, scale, dx2, dx_beta, dropout=(0.0, 0, 0)):
    """Runs the backward kernels; returns dA (f32). ``dx2`` (contiguous, or
    None) receives ``dx_beta·dx2 + s·M⊙(Q·A[:d_in]ᵀ)/(1 − p)``; ``dropout``
    the forward's (p, seed, offset)."""
    dev = x2.device
    code = _dtype_code(x2, "x")
    by_value, scale_ptr = _launch_scale(scale)
    _check_buffers(code, (("x", x2), ("g", g2), ("a", a), ("dx", dx2)),
                   (("s", s), ("scale", scale if scale_ptr else None)))
    tokens, d_in = x2.shape
    d_out = g2.shape[1]
    d, rank = a.shape
    da = torch.empty((d, rank), dtype=torch.float32, device=dev)
    nbytes = _lib.workspace_size(tokens, d_in, d_out, rank, saved_s=s is not None)
    # A fresh allocation of the caching allocator is 512-byte aligned (the
    # C ABI checks the 16 it needs), and is released only to later work on
    # this same stream, so freeing it on return is safe (inside a CUDA graph
    # capture it comes from the graph's private pool).
    ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    _ensure_init(dev)
    head = (code, dev.index, tokens, d_in, d_out, rank,
            x2.data_ptr(), ld_x, g2.data_ptr(), ld_g, a.data_ptr(),
            0 if s is None else s.data_ptr())
    tail = (0 if dx2 is None else dx2.data_ptr(), d_in, dx_beta,
            da.data_ptr(), 0.0, ws.data_ptr(), nbytes)
    p, seed, offset = dropout
    _lib.backward(*head, by_value, scale_ptr, *tail, dropout_p=p, dropout_seed=seed, dropout_offset=offset,
                  stream=_stream(dev))
    return da


# ------------------------------------------------------------ custom ops
#
# The ops (namespace ``singlora``), each with a CUDA kernel over the C ABI
# (``scale_ptr``: the scale is a device f32 tensor, read when the
# kernel runs, so a changing ramp is data, not a new graph constant), a CPU
# kernel with torch ops (f32 accumulation, cast back once, like the kernels),
# a fake (shape) function, autocast rules and, for the two forwards, autograd:
#
#   linear_forward(x, weight, bias?, a, scale, save_s, dropout_p=0, dropout_state?) -> (y, s)
#       y = x·weightᵀ + bias + scale·S·A[:d_out]ᵀ,  S = drop(x)·A[:d_in] (f32)
#   adapter_forward(x, a, scale, base?, d_out, save_s, dropout_p=0, dropout_state?) -> (y, s)
#       y = base + scale·S·A[:d_out]ᵀ  (a new tensor; base only read)
#   adapter_backward(x, grad, a, scale, s, weight?, need_dx, dropout_p=0, dropout_state?) -> (dx, da)
#       dx = grad·weight + scale·M⊙(Q·A[:d_in]ᵀ)/(1 − p)  (Q = grad·A[:d_out];
#       empty when not need_dx), da = scale·(gradᵀS ⊕ drop(x)ᵀQ) in f32; s
#       with no rows (save_s False in the forward) is recomputed
#
# drop(x) = M ⊙ x / (1 − p); dropout_state a CPU int64 (2,) tensor (seed,
# offset), needed when dropout_p > 0 (see the module docstring); the
# backward takes its forward's p and state.
#   merge(weight!, a, scale), unmerge(weight!, a, scale)
#       weight ±= scale·A[:d_out]·A[:d_in]ᵀ in place (declared mutated)
#
# s is (tokens, rank) f32 when save_s, else (0, rank). x may have any
# leading dimensions (flattened into tokens); outputs are contiguous.

Tensor = torch.Tensor


def _launches(dev):
    """Whether an op on ``dev`` runs the C ABI launches: CUDA tensors always;
    CPU tensors only when the test seam has replaced ``_device_check``
    (python/tests/test_torch_cpu.py runs the launch path on CPU with faked
    launches). Otherwise CPU runs the torch-op implementation."""
    return dev.type == "cuda" or _device_check is not _cuda_device


def _lead_tokens(x, d_in, name="x"):
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"singlora: `{name}` must end in a dimension of {d_in}; got {tuple(x.shape)}")
    return math.prod(x.shape[:-1])


def _check_linear(x, weight, bias, a, scale):
    """Shape and dtype checks of linear_forward (real and fake): (d_out, d_in, A contiguous)."""
    _dtype_code(x, "x")
    _same_dtype(x, "x", ("weight", weight), ("bias", bias), ("a", a))
    _check_scale(scale)
    if weight.dim() != 2:
        raise ValueError(f"singlora: `weight` must be (d_out, d_in); got {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"singlora: `bias` must be ({d_out},); got {tuple(bias.shape)}")
    _lead_tokens(x, d_in)
    return d_out, d_in, _check_a(a, d_in, d_out)


def _check_adapter(x, a, scale, base, d_out):
    _dtype_code(x, "x")
    _same_dtype(x, "x", ("a", a), ("base", base))
    _check_scale(scale)
    d_in = x.shape[-1] if x.dim() else 0
    a_c = _check_a(a, d_in, d_out)
    if base is not None and tuple(base.shape) != tuple(x.shape[:-1]) + (d_out,):
        raise ValueError(
            f"singlora: `base` must be x's shape with d_out = {d_out} last: "
            f"{tuple(x.shape[:-1]) + (d_out,)}; got {tuple(base.shape)}"
        )
    return d_in, a_c


def _check_backward(x, grad, a, scale, s, weight):
    _dtype_code(x, "x")
    _same_dtype(x, "x", ("grad", grad), ("a", a), ("weight", weight))
    _check_scale(scale)
    d_in, d_out = x.shape[-1], grad.shape[-1]
    if tuple(grad.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"singlora: `grad` {tuple(grad.shape)} does not match `x` {tuple(x.shape)}")
    if weight is not None and tuple(weight.shape) != (d_out, d_in):
        raise ValueError(f"singlora: `weight` must be ({d_out}, {d_in}); got {tuple(weight.shape)}")
    a_c = _check_a(a, d_in, d_out)
    if s.dtype != torch.float32 or s.dim() != 2 or s.shape[1] != a_c.shape[1]:
        raise ValueError(f"singlora: `s` must be f32 (tokens or 0, rank); got {tuple(s.shape)} {s.dtype}")
    return d_in, d_out, a_c


def _s_out(x, tokens, rank, save_s):
    return torch.empty((tokens if save_s else 0, rank), dtype=torch.float32, device=x.device)


@torch.library.custom_op("singlora::linear_forward", mutates_args=(), device_types="cpu")
def linear_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, scale: Tensor, save_s: bool,
    dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The adapted layer ``x·Wᵀ + b + scale·(drop(x)·A[:d_in])·A[:d_out]ᵀ`` and S."""
    if _launches(x.device):
        return _linear_forward_launch(x, weight, bias, a, scale, save_s, dropout_p, dropout_state)
    d_out, d_in, a_c = _check_linear(x, weight, bias, a, scale)
    _device_same("x", x, ("weight", weight), ("bias", bias), ("a", a), ("scale", scale))
    x2 = x.reshape(-1, d_in)
    af = a_c.float()
    sf = _s_cpu(x2, af[:d_in], _dropout_args(dropout_p, dropout_state))
    y = (F.linear(x2, weight, bias).float() + scale * (sf @ af[:d_out].T)).to(x.dtype)
    s = sf if save_s else _s_out(x, 0, a_c.shape[1], False)
    return y.reshape(*x.shape[:-1], d_out).contiguous(), s.contiguous()


def _s_cpu(x2, a_in, dropout):
    """S = drop(x)·A[:d_in] in f32 on CPU (x2: tokens × d_in, a_in f32):
    the masked x times A, then 1/(1 − p) in f32, as the kernels."""
    p, seed, offset = dropout
    xf = x2.float()
    if p == 0.0:
        return xf @ a_in
    keep = _keep_mask(p, seed, offset, x2.shape[0], x2.shape[1], x2.device)
    return (xf * keep) @ a_in * _keep_scale(p)


def _device_same(name, t, *named):
    """The CPU kernels' device check: one device for every tensor."""
    for n, o in named:
        if o is not None and o.device != t.device:
            raise ValueError(f"singlora: `{n}` is on {o.device}, `{name}` on {t.device}")


@linear_forward.register_kernel("cuda")
def _linear_forward_launch(x, weight, bias, a, scale, save_s, dropout_p=0.0, dropout_state=None):
    _device_check(("x", x), ("weight", weight), ("bias", bias), ("a", a), ("scale", scale))
    d_out, d_in, a_c = _check_linear(x, weight, bias, a, scale)
    dropout = _dropout_args(dropout_p, dropout_state)
    x2, ld_x = _rows(x, d_in, "x")
    tokens, rank = x2.shape[0], a_c.shape[1]
    y2 = F.linear(x2, weight, bias)
    if not y2.is_contiguous():
        y2 = y2.contiguous()
    s = _s_out(x, tokens, rank, save_s)
    _launch_forward(x2, ld_x, a_c, y2, d_out, s if save_s else None, scale, 1.0, dropout)
    return y2.view(*x.shape[:-1], d_out), s


@linear_forward.register_fake
def _linear_forward_fake(x, weight, bias, a, scale, save_s, dropout_p=0.0, dropout_state=None):
    d_out, d_in, a_c = _check_linear(x, weight, bias, a, scale)
    _check_dropout(dropout_p, dropout_state)
    tokens = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], d_out)), _s_out(x, tokens, a_c.shape[1], save_s)


@torch.library.custom_op("singlora::adapter_forward", mutates_args=(), device_types="cpu")
def adapter_forward(
    x: Tensor, a: Tensor, scale: Tensor, base: Optional[Tensor], d_out: int, save_s: bool,
    dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The adapter ``base + scale·(drop(x)·A[:d_in])·A[:d_out]ᵀ`` (a new tensor) and S."""
    if _launches(x.device):
        return _adapter_forward_launch(x, a, scale, base, d_out, save_s, dropout_p, dropout_state)
    d_in, a_c = _check_adapter(x, a, scale, base, d_out)
    _device_same("x", x, ("a", a), ("base", base), ("scale", scale))
    x2 = x.reshape(-1, d_in)
    af = a_c.float()
    sf = _s_cpu(x2, af[:d_in], _dropout_args(dropout_p, dropout_state))
    y = scale * (sf @ af[:d_out].T)
    if base is not None:
        y = y + base.reshape(-1, d_out).float()
    s = sf if save_s else _s_out(x, 0, a_c.shape[1], False)
    return y.to(x.dtype).reshape(*x.shape[:-1], d_out).contiguous(), s.contiguous()


@adapter_forward.register_kernel("cuda")
def _adapter_forward_launch(x, a, scale, base, d_out, save_s, dropout_p=0.0, dropout_state=None):
    _device_check(("x", x), ("a", a), ("base", base), ("scale", scale))
    d_in, a_c = _check_adapter(x, a, scale, base, d_out)
    dropout = _dropout_args(dropout_p, dropout_state)
    x2, ld_x = _rows(x, d_in, "x")
    tokens, rank = x2.shape[0], a_c.shape[1]
    if base is not None:
        y2 = base.reshape(tokens, d_out).clone(memory_format=torch.contiguous_format)
        beta = 1.0
    else:
        y2 = torch.empty((tokens, d_out), dtype=x.dtype, device=x.device)
        beta = 0.0
    s = _s_out(x, tokens, rank, save_s)
    _launch_forward(x2, ld_x, a_c, y2, d_out, s if save_s else None, scale, beta, dropout)
    return y2.view(*x.shape[:-1], d_out), s


@adapter_forward.register_fake
def _adapter_forward_fake(x, a, scale, base, d_out, save_s, dropout_p=0.0, dropout_state=None):
    _, a_c = _check_adapter(x, a, scale, base, d_out)
    _check_dropout(dropout_p, dropout_state)
    tokens = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], d_out)), _s_out(x, tokens, a_c.shape[1], save_s)


@torch.library.custom_op("singlora::adapter_backward", mutates_args=(), device_types="cpu")
def adapter_backward(
    x: Tensor, grad: Tensor, a: Tensor, scale: Tensor, s: Tensor, weight: Optional[Tensor],
    need_dx: bool, dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(dx, da) of the adapter (plus ``grad·weight`` in dx when weight is given)."""
    if _launches(x.device):
        return _adapter_backward_launch(x, grad, a, scale, s, weight, need_dx, dropout_p, dropout_state)
    d_in, d_out, a_c = _check_backward(x, grad, a, scale, s, weight)
    _device_same("x", x, ("grad", grad), ("a", a), ("scale", scale), ("s", s), ("weight", weight))
    p, seed, offset = _dropout_args(dropout_p, dropout_state)
    x2, g2 = x.reshape(-1, d_in), grad.reshape(-1, d_out)
    af, xf, gf = a_c.float(), x2.float(), g2.float()
    keep = ks = None
    if p > 0.0:
        keep, ks = _keep_mask(p, seed, offset, x2.shape[0], d_in, x.device), _keep_scale(p)
        xf = xf * keep  # drop(x) = keep ⊙ x / (1 − p): the 1/(1 − p) applied to f32 results below
    sf = s if s.shape[0] == x2.shape[0] else (xf @ af[:d_in] if ks is None else xf @ af[:d_in] * ks)
    q = gf @ af[:d_out]
    if need_dx:
        dx = scale * (q @ af[:d_in].T)
        if keep is not None:
            dx = dx * ks * keep
        if weight is not None:
            dx = dx + torch.mm(g2, weight).float()
        dx = dx.to(x.dtype).reshape(x.shape).contiguous()
    else:
        dx = x.new_empty((0,))
    da = torch.zeros_like(af)
    da[:d_out] += gf.T @ sf
    da[:d_in] += xf.T @ q if ks is None else (xf.T @ q) * ks
    return dx, (scale * da).contiguous()


@adapter_backward.register_kernel("cuda")
def _adapter_backward_launch(x, grad, a, scale, s, weight, need_dx, dropout_p=0.0, dropout_state=None):
    _device_check(("x", x), ("grad", grad), ("a", a), ("scale", scale), ("s", s), ("weight", weight))
    d_in, d_out, a_c = _check_backward(x, grad, a, scale, s, weight)
    dropout = _dropout_args(dropout_p, dropout_state)
    x2, ld_x = _rows(x, d_in, "x")
    g2, ld_g = _rows(grad, d_out, "grad")
    tokens = x2.shape[0]
    saved = s if (s.shape[0] == tokens and tokens > 0) else None
    dx2, beta = None, 0.0
    if need_dx:
        if weight is not None:
            # The frozen path's dX = G·W (torch); the kernel adds the adapter's.
            dx2 = torch.mm(g2, weight)
            if not dx2.is_contiguous():
                dx2 = dx2.contiguous()
            beta = 1.0
        else:
            dx2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    da = _launch_backward(x2, ld_x, g2, ld_g, a_c, saved, scale, dx2, beta, dropout)
    dx = dx2.view(x.shape) if need_dx else x.new_empty((0,))
    return dx, da


@adapter_backward.register_fake
def _adapter_backward_fake(x, grad, a, scale, s, weight, need_dx, dropout_p=0.0, dropout_state=None):
    _, _, a_c = _check_backward(x, grad, a, scale, s, weight)
    _check_dropout(dropout_p, dropout_state)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, a_c.new_empty(a_c.shape, dtype=torch.float32)


def _check_fold(weight, a, scale):
    code = _dtype_code(weight, "weight")
    _same_dtype(weight, "weight", ("a", a))
    _check_scale(scale)
    if weight.dim() != 2:
        raise ValueError(f"singlora: `weight` must be (d_out, d_in); got {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    a_c = _check_a(a, d_in, d_out)
    ld_w = _row_stride(weight, d_out, d_in)
    if ld_w is None:
        raise ValueError("singlora: merge needs a weight with unit column stride (it is updated in place)")
    _check_buffers(code, (("w", weight), ("a", a_c)))
    return code, d_out, d_in, a_c, ld_w


def _fold_launch(weight, a, scale, undo):
    dev = _device_check(("weight", weight), ("a", a), ("scale", scale))
    code, d_out, d_in, a_c, ld_w = _check_fold(weight, a, scale)
    _ensure_init(dev)
    fn = _lib.unmerge if undo else _lib.merge
    fn(code, dev.index, d_in, d_out, a_c.shape[1], weight.data_ptr(), ld_w, a_c.data_ptr(),
       0.0, scale.data_ptr(), _stream(dev))


def _fold_impl(weight, a, scale, undo):
    if _launches(weight.device):
        return _fold_launch(weight, a, scale, undo)
    _, d_out, d_in, a_c, _ = _check_fold(weight, a, scale)
    _device_same("weight", weight, ("a", a), ("scale", scale))
    af = a_c.float()
    delta = scale * (af[:d_out] @ af[:d_in].T)
    weight.copy_((weight.float() - delta if undo else weight.float() + delta).to(weight.dtype))


@torch.library.custom_op("singlora::merge", mutates_args=("weight",), device_types=("cpu", "cuda"))
def merge(weight: Tensor, a: Tensor, scale: Tensor) -> None:
    """``weight += scale·A[:d_out]·A[:d_in]ᵀ`` in place."""
    _fold_impl(weight, a, scale, undo=False)


@torch.library.custom_op("singlora::unmerge", mutates_args=("weight",), device_types=("cpu", "cuda"))
def unmerge(weight: Tensor, a: Tensor, scale: Tensor) -> None:
    """``weight -= scale·A[:d_out]·A[:d_in]ᵀ`` in place (undoes merge)."""
    _fold_impl(weight, a, scale, undo=True)


@merge.register_fake
def _merge_fake(weight, a, scale):
    _check_fold(weight, a, scale)


@unmerge.register_fake
def _unmerge_fake(weight, a, scale):
    _check_fold(weight, a, scale)


# -- autograd


def _setup_dropout(ctx, dropout_p, dropout_state):
    # The backward takes its forward's p and (seed, offset): the state is
    # saved (a saved tensor: autograd refuses it if modified in place before
    # the backward; SingLoraLinear passes a fresh copy per forward).
    ctx.dropout_p = float(dropout_p)
    return dropout_state if ctx.dropout_p > 0.0 else None


def _linear_setup(ctx, inputs, output):
    x, weight, bias, a, scale, save_s, dropout_p, dropout_state = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(x, weight, a, scale, s, _setup_dropout(ctx, dropout_p, dropout_state))


def _linear_backward(ctx, gy, gs):
    x, weight, a, scale, s, state = ctx.saved_tensors
    need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
    gx = gw = gb = ga = None
    with _no_autocast(x.device.type):
        if need_x or need_a:
            dx, da = adapter_backward(x, gy, a, scale, s, weight if need_x else None, need_x,
                                      ctx.dropout_p, state)
            gx = dx if need_x else None
            ga = _grad_a(da, a) if need_a else None
        if need_w or need_b:
            g2 = gy.reshape(-1, weight.shape[0])
            if need_w:
                gw = torch.mm(g2.t(), x.reshape(-1, weight.shape[1]))
            if need_b:
                gb = g2.sum(0)
    return gx, gw, gb, ga, None, None, None, None


def _adapter_setup(ctx, inputs, output):
    x, a, scale, base, d_out, save_s, dropout_p, dropout_state = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(x, a, scale, s, _setup_dropout(ctx, dropout_p, dropout_state))


def _adapter_backward(ctx, gy, gs):
    x, a, scale, s, state = ctx.saved_tensors
    need_x, need_a, _, need_base = ctx.needs_input_grad[:4]
    gx = ga = None
    if need_x or need_a:
        with _no_autocast(x.device.type):
            dx, da = adapter_backward(x, gy, a, scale, s, None, need_x, ctx.dropout_p, state)
        gx = dx if need_x else None
        ga = _grad_a(da, a) if need_a else None
    return gx, ga, None, (gy if need_base else None), None, None, None, None


def _grad_a(da, a):
    # dA comes out in f32; autograd wants A's dtype.
    return da if da.dtype == a.dtype else da.to(a.dtype)


linear_forward.register_autograd(_linear_backward, setup_context=_linear_setup)
adapter_forward.register_autograd(_adapter_backward, setup_context=_adapter_setup)


# -- autocast: every buffer handed to a kernel has the launch's dtype.
#
# The forwards behave like autocast's lower-precision ops: under
# torch.autocast (for the tensors' device type) x, weight, bias, a and base
# are cast to the autocast dtype (kernel dtypes only: float64 and others are
# left, and refused, as autocast leaves float64), the scale and S stay f32,
# and the op then runs with autocast off. The casts are ordinary `.to`s
# above autograd, so A's gradient flows back to an f32 parameter in f32.
# The backward and merge/unmerge cast nothing (their buffers are saved
# forward tensors, or updated in place) and also run with autocast off.

_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))
_autocast_lib = torch.library.Library("singlora", "FRAGMENT")

#: op name -> the positions of the arguments autocast casts.
AUTOCAST_CAST_ARGS = {
    "linear_forward": (0, 1, 2, 3),
    "adapter_forward": (0, 1, 3),
    "adapter_backward": (),
    "merge": (),
    "unmerge": (),
}


def _register_autocast(name, cast_idx):
    op = getattr(torch.ops.singlora, name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def kernel(*args, _device_type=device_type):
            if cast_idx:
                dt = torch.get_autocast_dtype(_device_type)
                args = tuple(
                    t.to(dt) if i in cast_idx and isinstance(t, torch.Tensor)
                    and t.device.type == _device_type and t.dtype in _CODES and t.dtype != dt
                    else t
                    for i, t in enumerate(args)
                )
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
                return op(*args)

        _autocast_lib.impl(name, kernel, key)


for _name, _idx in AUTOCAST_CAST_ARGS.items():
    _register_autocast(_name, _idx)

#: The ops, by name (torch.ops.singlora.<name>).
OPS = tuple(AUTOCAST_CAST_ARGS)


# ------------------------------------------------------------ functional API


def _needs_s(*tensors):
    """S is saved only when a backward can follow (no_grad / inference skip it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def singlora_linear(x, weight, bias, a, scale, dropout_p=0.0, dropout_state=None):
    """``x·weightᵀ + bias + scale·(drop(x)·a[:d_in])·a[:d_out]ᵀ`` with autograd.

    ``weight`` is (d_out, d_in) (usually frozen), ``bias`` (d_out) or None,
    ``a`` (max(d_in, d_out), rank), ``scale`` a 0-dim tensor (float32, on
    x's device; read by the kernels on the device, so changing its value
    never recompiles a torch.compile'd model nor invalidates a captured CUDA
    graph) or a Python float. Gradients flow to x, a, and to weight/bias if
    they require it. Under autocast (for x's device type) the inputs are cast
    to its dtype first, and the result is of that dtype.

    ``dropout_p`` in [0, 1) (0: none) with ``dropout_state`` (seed, offset):
    a CPU int64 (2,) tensor (:func:`dropout_state`; data, so a changing
    offset never recompiles) or a pair of ints (a new tensor each call).
    drop(x) = M ⊙ x / (1 − p) with the kernels' Philox mask M; the backward
    reuses the pair. Advancing the offset between steps is the caller's job
    (:class:`SingLoraLinear` does it).
    """
    y, _ = linear_forward(x, weight, bias, a, _as_scale(scale, x), _needs_s(x, weight, bias, a),
                          float(dropout_p), _as_dropout_state(dropout_state))
    return y


def singlora_adapter(x, a, scale, base=None, d_out=None, dropout_p=0.0, dropout_state=None):
    """The adapter alone, ``scale·(drop(x)·a[:d_in])·a[:d_out]ᵀ``, with autograd.

    With ``base`` (x's shape with d_out last, e.g. a frozen layer's output)
    the adapter is added onto it **in place** and ``base`` is returned (its
    gradient passes through unchanged); without, a new tensor is returned.
    ``base`` must not overlap ``x`` in memory (ValueError). ``d_out``
    defaults to base's last dimension, else to a.shape[0] (square). Under
    autocast (for x's device type) x, a and base are cast to its dtype
    first; a base of another dtype is then cast to a new tensor, which is
    updated and returned instead (``base`` itself is left unchanged).
    ``scale``, ``dropout_p`` and ``dropout_state`` as in :func:`singlora_linear`.
    """
    if d_out is None:
        d_out = base.shape[-1] if base is not None else a.shape[0]
    elif base is not None and base.shape[-1] != d_out:
        raise ValueError(f"singlora: d_out = {d_out} but `base` ends in {base.shape[-1]}")
    scale = _as_scale(scale, x)
    dropout_p, dropout_state = float(dropout_p), _as_dropout_state(dropout_state)
    if base is None:
        y, _ = adapter_forward(x, a, scale, None, int(d_out), _needs_s(x, a), dropout_p, dropout_state)
        return y
    if not torch.compiler.is_compiling():
        _check_no_overlap("base", base, "x", x)
    ac = _autocast_dtype(x.device.type)
    in_place = ac is None or base.dtype == ac or base.dtype not in _CODES
    if in_place and tuple(base.shape) == tuple(x.shape[:-1]) + (int(d_out),):
        # Updated in place, so it must be a (tokens, d_out) view with unit
        # column stride (as the kernels' in-place output always was).
        tokens = math.prod(x.shape[:-1])
        try:
            b2 = base.view(tokens, int(d_out))
        except RuntimeError:
            b2 = None
        if b2 is None or _row_stride(b2, tokens, int(d_out)) is None:
            raise ValueError(
                "singlora: `base` is updated in place, so it must be viewable as "
                "(tokens, d_out) with unit column stride; pass base.contiguous()"
            )
    y, _ = adapter_forward(x, a, scale, base, int(d_out), _needs_s(x, a, base), dropout_p, dropout_state)
    if not in_place:
        return y
    # y = base + adapter (the op is functional); written back into base, the
    # gradient of base's old value passes through y unchanged.
    return base.copy_(y)


def _fold(weight, a, scale, undo):
    """merge (undo False) or unmerge ``a`` at ``scale`` into ``weight`` in place."""
    (unmerge if undo else merge)(weight, a, _as_scale(scale, weight))


class SingLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` adapted by SingLoRA: ``W = W0 + s·A[:d_out]·A[:d_in]ᵀ``.

    Args:
        base: the ``nn.Linear`` to adapt (its weight and bias are frozen:
            ``requires_grad_(False)``), on a CUDA device, float32/float16/bfloat16.
        rank: the adapter rank r, 1..256.
        alpha: the scale numerator: ``s = alpha / rank · u(t)``.
        warmup_steps: T, the ramp ``u(t) = min(t / T, 1)`` over optimizer
            steps t (0: u = 1 from the start).
        dropout: adapter dropout p in [0, 1) (PEFT's ``lora_dropout``; 0:
            none): in training mode (``module.train()``, the default) the
            adapter sees ``drop(x) = M ⊙ x / (1 − p)``, the frozen layer
            ``x``; eval mode (``module.eval()``) has no dropout.
        dropout_seed: the u64 Philox seed of the masks; None (the default)
            draws one from torch's default CPU generator at construction
            (after A's init, so ``torch.manual_seed`` makes it reproducible
            and A is what it was without dropout).

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

    Dropout masks: each training-mode forward with p > 0 uses the pair
    (seed, offset) and then advances the offset by one (a new mask per
    forward; eval-mode forwards, p = 0 and merged layers use none and leave
    it), and its backward regenerates the same mask from that pair. The pair
    lives in ``dropout_state``, a CPU int64 tensor (seed, offset) of shape
    (2,) (u64 bit patterns), a plain attribute, not a buffer: ``.to()`` /
    ``.cuda()`` leave it on CPU (the ops read it there without a GPU sync)
    and DDP does not broadcast it; the forward's copy-and-advance are tensor
    ops, so torch.compile neither breaks the graph nor recompiles as it
    advances. It is saved in the extra state (``dropout_seed``,
    ``dropout_offset``): resuming from a state dict continues the masks'
    sequence; a state dict without them (older, or peft-singlora's layout)
    leaves the layer's own pair. p itself is a hyperparameter, like alpha
    (``dropout``, settable; not in the state dict). Unlike the Rust layer,
    a training forward at p = 0 leaves the offset (so a p = 0 graph holds no
    CPU op). Activation checkpointing re-runs the forward, and the rerun
    takes the next offset, i.e. a different mask from the one the loss saw
    (torch's RNG-state restore does not cover it): do not checkpoint layers
    with p > 0.
    """

    def __init__(self, base, rank, alpha, warmup_steps=0, dropout=0.0, dropout_seed=None):
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
        self.merged_scale = None
        # The optimizer-step count t, a 0-dim int64 tensor on A's device (not
        # a Python int): forward computes the scale from it with torch ops, so
        # stepping it never recompiles a torch.compile'd model and a captured
        # CUDA graph follows it. Not a state_dict entry of its own (int64:
        # .half() / .to(dtype) leave it alone); saved through the extra state.
        self.register_buffer(
            "step_count", torch.zeros((), dtype=torch.int64, device=base.weight.device),
            persistent=False,
        )
        # The A merged into base.weight (None when unmerged): a buffer so that
        # .to() / .half() move it with A and the weight; saved through the
        # extra state, not as a state_dict entry of its own.
        self.register_buffer("merged_a", None, persistent=False)
        d = max(base.in_features, base.out_features)
        w = base.weight
        self.a = nn.Parameter(torch.empty((d, rank), dtype=w.dtype, device=w.device))
        self.reset_parameters()
        self.dropout = dropout
        if dropout_seed is None:
            lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
            dropout_seed = (hi << 32) | lo
        # Plain attribute (see the class docstring): stays a CPU tensor.
        self.dropout_state = dropout_state(dropout_seed, 0)

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

    @property
    def dropout(self):
        """The adapter dropout probability p (0: none)."""
        return self._dropout

    @dropout.setter
    def dropout(self, p):
        self._dropout = _check_p(p, "dropout")

    @property
    def dropout_seed(self):
        """The masks' Philox seed (a u64)."""
        return _as_u64(self.dropout_state[0].item())

    @property
    def dropout_offset(self):
        """The offset the next training-mode forward with p > 0 uses (a u64)."""
        return _as_u64(self.dropout_state[1].item())

    def set_dropout_seed(self, seed, offset=0):
        """Sets the masks' seed and restarts their offset at ``offset`` (e.g.
        to resume a run: the same seed, the offset reached)."""
        with torch.no_grad():
            self.dropout_state.copy_(dropout_state(seed, offset))

    def _next_dropout(self):
        """(p, state) of this forward: (0, None) in eval mode or with p = 0;
        in training mode a copy of the (seed, offset) pair, then the offset
        advanced by one (int64 add: wraps as the u64 would)."""
        if not self.training or self._dropout == 0.0:
            return 0.0, None
        state = self.dropout_state.clone()
        with torch.no_grad():
            self.dropout_state[1:].add_(1)
        return self._dropout, state

    @property
    def steps(self):
        """t, the optimizer steps counted so far (reads ``step_count``: a
        device sync on CUDA; forward never reads it)."""
        return int(self.step_count.item())

    @steps.setter
    def steps(self, value):
        with torch.no_grad():
            self.step_count.fill_(int(value))

    def ramp(self):
        """u(t) = min(t / T, 1); 1 when T = 0 (a Python float)."""
        if self.warmup_steps == 0:
            return 1.0
        return min(self.steps / self.warmup_steps, 1.0)

    @property
    def scale(self):
        """s = alpha / rank · u(t), in Python float (f64); the kernels see
        :meth:`scale_tensor`, this rounded to f32 once."""
        return self.alpha / self.rank * self.ramp()

    def scale_tensor(self):
        """s as the kernels read it: a 0-dim float32 tensor on the module's
        device, computed with torch ops from ``step_count`` (in f64, rounded
        to f32 once), so no Python number of the step enters a compiled graph."""
        base = self.alpha / self.rank
        dev = self.step_count.device
        if self.warmup_steps == 0:
            return torch.full((), base, dtype=torch.float32, device=dev)
        u = (self.step_count.to(torch.float64) / self.warmup_steps).clamp(max=1.0)
        return (u * base).to(torch.float32)

    def step(self, n=1):
        """Counts ``n`` optimizer steps (call after ``optimizer.step()``): an
        in-place add on ``step_count`` (capturable in a CUDA graph)."""
        with torch.no_grad():
            self.step_count.add_(int(n))

    def forward(self, x):
        if self.merged:
            if torch.is_grad_enabled() and self.a.requires_grad:
                raise RuntimeError(
                    "SingLoraLinear is merged: call unmerge() before training "
                    "(or run under torch.no_grad())"
                )
            return self.base(x)
        p, state = self._next_dropout()
        return singlora_linear(x, self.base.weight, self.base.bias, self.a, self.scale_tensor(), p, state)

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
        s = self.scale_tensor().to(self.base.weight.device)
        a = self.a.detach().clone(memory_format=torch.contiguous_format)
        _fold(self.base.weight, a, s, undo=False)
        self.merged_a = a
        self.merged_scale = float(s)  # f32-exact: unmerge passes the same f32

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
        return {"steps": self.steps, "merged_scale": self.merged_scale, "merged_a": self.merged_a,
                "dropout_seed": self.dropout_seed, "dropout_offset": self.dropout_offset}

    def set_extra_state(self, state):
        # Runs after this module's own parameters (A) are loaded, before its
        # children's (base.weight).
        self.steps = int(state.get("steps", 0))
        if "dropout_seed" in state:
            self.set_dropout_seed(state["dropout_seed"], state.get("dropout_offset", 0))
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
            f"dropout={self.dropout}, steps={self.steps}, merged={self.merged}"
        )
