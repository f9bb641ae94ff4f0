"""ctypes over libsinglora.so (the C ABI of include/singlora.h). No torch here.

Finding the library, first hit wins:
  1. $SINGLORA_LIB: the .so itself, or a folder holding libsinglora.so
     (when set, nothing else is tried);
  2. $CARGO_TARGET_DIR/release/libsinglora.so, when that variable is set;
  3. <repo>/target/release/libsinglora.so   (``cargo build --release``;
     <repo> is the folder above python/);
  4. <repo>/target/gpu-bundle/lib/libsinglora.so   (scripts/bundle.sh);
  5. <bundle>/lib/libsinglora.so   (this package inside a GPU bundle).

The library is loaded on first use, so ``import singlora`` works on any
machine; calls then raise :class:`SingLoraError` with the library's message
(e.g. ``SINGLORA_ERROR_NO_DRIVER: no CUDA driver ...`` on a machine without
a GPU).

The functions here take plain integers (device pointers, strides) and follow
the header's contract: pointers must address what the dimensions describe,
on the device ``device``, until the work completes on ``stream``. The torch
layer (:mod:`singlora.nn`) checks shapes before calling them.
"""

import ctypes
import os
import threading
from pathlib import Path

#: The ABI version this module speaks (SINGLORA_ABI_VERSION in the header).
ABI_VERSION = 4

# Status codes (include/singlora.h).
OK = 0
ERROR_INVALID_ARGUMENT = 1
ERROR_UNKNOWN_DTYPE = 2
ERROR_NO_DRIVER = 3
ERROR_NO_DEVICE = 4
ERROR_UNSUPPORTED_DEVICE = 5
ERROR_SHARED_MEMORY = 6
ERROR_CUDA = 7
ERROR_NO_KERNELS = 8
ERROR_PANIC = 9

# Element type codes.
DTYPE_F32 = 0
DTYPE_F16 = 1
DTYPE_BF16 = 2

# The backward's kernels (singlora_backward's ``kernel``).
BACKWARD_SPLIT = 0
BACKWARD_FUSED = 1

_BACKWARD_KERNELS = {"split": BACKWARD_SPLIT, "fused": BACKWARD_FUSED}
_backward_kernel = BACKWARD_SPLIT


def set_backward_kernel(name):
    """Which kernels every later backward of this process asks for (the
    PyTorch ops' included): ``"split"`` (the default, every GPU and shape)
    or ``"fused"`` (one pass over G and X on compute capability 9.0 for
    bf16, rank <= 32, d_in and d_out <= 4096, tokens > 0, where the device
    holds its clusters; the split kernels elsewhere).
    Both meet the same error bars; dA's bits differ between them. Opt-in
    until a GPU run proves the fused one faster. Returns the previous name."""
    global _backward_kernel
    if name not in _BACKWARD_KERNELS:
        raise ValueError(f"backward kernel {name!r}: expected one of {sorted(_BACKWARD_KERNELS)}")
    previous = backward_kernel()
    _backward_kernel = _BACKWARD_KERNELS[name]
    return previous


def backward_kernel():
    """The name :func:`set_backward_kernel` last set (``"split"`` at start)."""
    return next(n for n, c in _BACKWARD_KERNELS.items() if c == _backward_kernel)

LIB_NAME = "libsinglora.so"
ENV_VAR = "SINGLORA_LIB"


class SingLoraError(RuntimeError):
    """A call into libsinglora failed, or the library could not be loaded.

    ``status`` is the C status code (None when the library was not found or
    could not be loaded), ``status_name`` its name, ``function`` the C
    function, ``message`` the library's message (which names the argument at
    fault, with what was expected and what was given).
    """

    def __init__(self, message, status=None, status_name=None, function=None):
        self.message = message
        self.status = status
        self.status_name = status_name
        self.function = function
        if function is not None:
            text = f"{function}: {status_name} ({status}): {message}"
        else:
            text = message
        super().__init__(text)


def _package_root():
    # python/singlora/_lib.py -> the folder holding python/ (the repository,
    # or the GPU bundle).
    return Path(__file__).resolve().parent.parent.parent


def library_candidates():
    """The paths tried, in order (see the module docstring)."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        return [p / LIB_NAME if p.is_dir() else p]
    out = []
    target_dir = os.environ.get("CARGO_TARGET_DIR")
    if target_dir:
        out.append(Path(target_dir) / "release" / LIB_NAME)
    root = _package_root()
    out.append(root / "target" / "release" / LIB_NAME)
    out.append(root / "target" / "gpu-bundle" / "lib" / LIB_NAME)
    out.append(root / "lib" / LIB_NAME)
    return out


_lock = threading.Lock()
_lib = None
_lib_path = None

_i32, _i64, _u64, _f32, _f64 = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_double
_u8 = ctypes.c_uint8
_str, _ptr = ctypes.c_char_p, ctypes.c_void_p

# name: (restype, argtypes), as declared in include/singlora.h.
_SIGNATURES = {
    "singlora_version": (_str, []),
    "singlora_abi_version": (_i32, []),
    "singlora_last_error": (_str, []),
    "singlora_status_name": (_str, [_i32]),
    "singlora_init": (_i32, [_i32]),
    "singlora_backward_workspace_size": (
        _i32,
        [_i64, _i64, _i64, _i64, _i32, ctypes.POINTER(_u64)],
    ),
    "singlora_forward": (
        _i32,
        [
            _i32, _i32, _i64, _i64, _i64, _i64,  # dtype, device, tokens, d_in, d_out, rank
            _u64, _i64, _u64, _u64, _i64, _u64,  # x, ld_x, a, y, ld_y, s
            _f32, _u64, _f32,  # scale, scale_ptr, beta
            _f64, _u64, _u64, _ptr,  # dropout_p, dropout_seed, dropout_offset, stream
        ],
    ),
    "singlora_backward": (
        _i32,
        [
            _i32, _i32, _i64, _i64, _i64, _i64,  # dtype, device, tokens, d_in, d_out, rank
            _u64, _i64, _u64, _i64, _u64, _u64,  # x, ld_x, g, ld_g, a, saved_s
            _f32, _u64, _u64, _i64, _f32,  # scale, scale_ptr, dx, ld_dx, dx_beta
            _u64, _f32, _u64, _u64,  # da, da_beta, workspace, workspace_bytes
            _f64, _u64, _u64,  # dropout_p, dropout_seed, dropout_offset
            _i32, _ptr,  # kernel, stream
        ],
    ),
    "singlora_dropout_mask": (_i32, [_f64, _u64, _u64, _i64, _i64, ctypes.POINTER(_u8)]),
    "singlora_merge": (_i32, [_i32, _i32, _i64, _i64, _i64, _u64, _i64, _u64, _f32, _u64, _ptr]),
    "singlora_unmerge": (_i32, [_i32, _i32, _i64, _i64, _i64, _u64, _i64, _u64, _f32, _u64, _ptr]),
}


def lib():
    """The loaded library (loading it on first use); raises SingLoraError."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = library_candidates()
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            where = "\n  ".join(str(p) for p in tried)
            raise SingLoraError(
                f"{LIB_NAME} not found; tried:\n  {where}\n"
                f"Build it with `cargo build --release` in the repository, or set "
                f"{ENV_VAR} to the library file (or its folder)."
            )
        try:
            handle = ctypes.CDLL(str(path))
        except OSError as e:
            raise SingLoraError(f"could not load {path}: {e}") from e
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(handle, name)
            except AttributeError as e:
                raise SingLoraError(f"{path} does not export {name}: an older library?") from e
            fn.restype = restype
            fn.argtypes = argtypes
        abi = handle.singlora_abi_version()
        if abi != ABI_VERSION:
            raise SingLoraError(
                f"{path} speaks C ABI version {abi}; this package speaks {ABI_VERSION}: "
                f"rebuild the library or update the package"
            )
        _lib, _lib_path = handle, path
        return _lib


def library_path():
    """The path of the loaded library (loading it if needed)."""
    lib()
    return _lib_path


def version():
    """The library's version string, e.g. '0.1.0'."""
    return lib().singlora_version().decode()


def abi_version():
    return lib().singlora_abi_version()


def status_name(status):
    return lib().singlora_status_name(status).decode()


def _check(status, function):
    if status != OK:
        h = lib()
        # The message is thread-local in the library; this runs on the thread
        # that made the call, right after it.
        message = h.singlora_last_error().decode(errors="replace")
        raise SingLoraError(message, status, status_name(status), function)


def _stream(stream):
    # An int (cudaStream_t / CUstream value; 0 = the legacy default stream)
    # or None.
    return None if not stream else ctypes.c_void_p(int(stream))


def init(device=0):
    """Opens ``device`` and loads the kernels (synchronises once). Optional;
    call it before capturing launches in a CUDA graph."""
    _check(lib().singlora_init(device), "singlora_init")


def workspace_size(tokens, d_in, d_out, rank, saved_s=True):
    """Bytes of workspace :func:`backward` needs. Needs no GPU."""
    out = ctypes.c_uint64(0)
    status = lib().singlora_backward_workspace_size(
        tokens, d_in, d_out, rank, 1 if saved_s else 0, ctypes.byref(out)
    )
    _check(status, "singlora_backward_workspace_size")
    return out.value


def _run(function, stream, *args):
    """Calls the launch function ``function`` with ``args`` and the stream,
    raising :class:`SingLoraError` on failure."""
    _check(getattr(lib(), function)(*args, _stream(stream)), function)


# The launches. ``scale`` and ``scale_ptr`` as the header's "The scale":
# the scale by value when ``scale_ptr`` is 0, else the device float there
# (read when the kernels run; ``scale`` is then ignored).


def forward(
    dtype, device, tokens, d_in, d_out, rank, x, ld_x, a, y, ld_y, s, scale, scale_ptr, beta,
    dropout_p=0.0, dropout_seed=0, dropout_offset=0, stream=0,
):
    """``S = drop(X)·A[:d_in]`` (f32, stored at ``s`` unless 0) and
    ``Y = beta·Y + scale·S·A[:d_out]ᵀ``; see include/singlora.h."""
    _run("singlora_forward", stream, dtype, device, tokens, d_in, d_out, rank, x, ld_x, a, y, ld_y, s, scale, scale_ptr,
         beta, dropout_p, dropout_seed, dropout_offset)


def backward(
    dtype, device, tokens, d_in, d_out, rank, x, ld_x, g, ld_g, a, saved_s, scale, scale_ptr,
    dx, ld_dx, dx_beta, da, da_beta, workspace, workspace_bytes,
    dropout_p=0.0, dropout_seed=0, dropout_offset=0, kernel=None, stream=0,
):
    """``Q = G·A[:d_out]``, ``dX = dx_beta·dX + scale·M⊙(Q·A[:d_in]ᵀ)/(1-p)``
    (unless ``dx`` is 0), ``dA = da_beta·dA + scale·(GᵀS ⊕ drop(X)ᵀQ)``, by
    ``kernel`` (``BACKWARD_SPLIT`` or ``BACKWARD_FUSED``; None: the one
    :func:`set_backward_kernel` chose); see the header."""
    if kernel is None:
        kernel = _backward_kernel
    _run("singlora_backward", stream, dtype, device, tokens, d_in, d_out, rank, x, ld_x, g, ld_g, a, saved_s, scale,
         scale_ptr, dx, ld_dx, dx_beta, da, da_beta, workspace, workspace_bytes, dropout_p, dropout_seed,
         dropout_offset, kernel)


def merge(dtype, device, d_in, d_out, rank, w, ld_w, a, scale, scale_ptr, stream=0):
    """``W += scale·A[:d_out]·A[:d_in]ᵀ`` in place."""
    _run("singlora_merge", stream, dtype, device, d_in, d_out, rank, w, ld_w, a, scale, scale_ptr)


def unmerge(dtype, device, d_in, d_out, rank, w, ld_w, a, scale, scale_ptr, stream=0):
    """``W -= scale·A[:d_out]·A[:d_in]ᵀ`` in place (undoes :func:`merge`)."""
    _run("singlora_unmerge", stream, dtype, device, d_in, d_out, rank, w, ld_w, a, scale, scale_ptr)


def dropout_mask(dropout_p, dropout_seed, dropout_offset, tokens, cols):
    """The dropout mask the kernels apply to a ``tokens × cols`` input, on
    the host: a ``bytearray`` of ``tokens·cols`` bytes, row-major, 1 where
    an element is kept (see the header's "Dropout")."""
    keep = (_u8 * max(tokens * cols, 1))()
    _check(lib().singlora_dropout_mask(dropout_p, dropout_seed, dropout_offset, tokens, cols, keep),
           "singlora_dropout_mask")
    return bytearray(keep)[: tokens * cols]
