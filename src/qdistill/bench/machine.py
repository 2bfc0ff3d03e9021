"""The machine a benchmark ran on, as its reports name it, and what it measures there
besides time: peak memory, and TF32 as the convolutions use it."""
from __future__ import annotations

import contextlib
import resource
import sys

import torch

from ..training.device import cpu_name  # noqa: F401  (the name reports use; it lives with the device)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or ``"cpu: "`` and `cpu_name` for anything else."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}"


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory in MB where the work ran: on CUDA the GPU memory torch
    allocated (``torch.cuda.max_memory_allocated``), elsewhere the host's resident set
    (``ru_maxrss``: torch, the data, the model, autograd's saved tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def memory_kind(device: torch.device) -> str:
    """What `peak_memory_mb` measures on ``device``: ``"gpu"`` or ``"rss"``."""
    return "gpu" if device.type == "cuda" else "rss"


@contextlib.contextmanager
def matmul_tf32_like_convolutions():
    """Meanwhile, fp32 matmuls use TF32 exactly when cuDNN's convolutions do
    (``torch.backends.cuda.matmul.allow_tf32`` set to ``torch.backends.cudnn.allow_tf32``;
    by default convolutions use TF32 and matmuls do not), so a matmul reference and the
    convolutions compared with it run in the same arithmetic. Yields that setting."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        yield torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
