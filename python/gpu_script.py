"""What the GPU scripts python/check.py and python/bench.py share: PyTorch or
exit 2, the CUDA device or exit 2, and the first line they print."""

import sys
import time


def torch_or_exit(script):
    """The ``torch`` module; without it, a FAIL line and exit 2."""
    try:
        import torch
    except ImportError as e:
        print(f"FAIL: {script} needs PyTorch ({e})")
        sys.exit(2)
    return torch


def start(script):
    """(the start time, CUDA device 0); without a CUDA device, a FAIL line
    and exit 2."""
    import torch

    started = time.time()
    if not torch.cuda.is_available():
        print(f"FAIL: no CUDA device (torch.cuda.is_available() is False); {script} needs a GPU")
        sys.exit(2)
    return started, torch.device("cuda", 0)


def banner(gpu):
    """The versions line: torch, the GPU's name, the library and its path."""
    import torch

    import singlora

    print(f"torch {torch.__version__}, {gpu}, singlora {singlora.version()} from "
          f"{singlora.library_path()}", flush=True)
