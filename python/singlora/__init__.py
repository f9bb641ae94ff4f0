"""singlora: fused CUDA kernels for SingLoRA adapters, for PyTorch.

SingLoRA (Bensaïd et al., 2025) adapts a frozen ``nn.Linear`` weight ``W0``
(``d_out × d_in``) with one matrix ``A`` (``D × rank``, ``D = max(d_in, d_out)``)::

    y = x·W0ᵀ + s·(x·A[:d_in])·A[:d_out]ᵀ,    s = alpha / rank · min(t / T, 1)

and these kernels run the adapter path without forming the ``d_out × d_in``
update. Pure Python over ctypes: no build step here; the kernels live in
``libsinglora.so`` (``cargo build --release``; see :mod:`singlora._lib` for
where it is looked for, and ``$SINGLORA_LIB``).

``import singlora`` needs neither torch nor a GPU. The torch-facing names
(:class:`SingLoraLinear`, :func:`singlora_linear`, :func:`singlora_adapter`)
are imported from :mod:`singlora.nn` on first use, which needs PyTorch.
"""

from ._lib import (  # noqa: F401  (re-exports)
    ABI_VERSION,
    BACKWARD_FUSED,
    BACKWARD_SPLIT,
    DTYPE_BF16,
    DTYPE_F16,
    DTYPE_F32,
    SingLoraError,
    abi_version,
    backward_kernel,
    init,
    library_candidates,
    library_path,
    set_backward_kernel,
    version,
    workspace_size,
)

__version__ = "0.1.0"

_TORCH_NAMES = ("SingLoraLinear", "singlora_linear", "singlora_adapter")


def __getattr__(name):
    if name in _TORCH_NAMES:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ImportError(
                f"singlora.{name} needs PyTorch, which is not installed "
                f"(the ctypes layer, singlora._lib, works without it)"
            )
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module 'singlora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_TORCH_NAMES))
