"""Where a run trains and in which precision."""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; otherwise the device named."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available")
    return device


def autocast_for(device: torch.device, precision: str = "auto"):
    """The context the forward pass runs in: bfloat16 autocast for ``"bf16"``, and for
    ``"auto"`` on CUDA; nothing (fp32) otherwise. ``"auto"`` keeps fp32 on CPU, where the
    same config and seed must give identical metrics and bf16 would change them; on the
    2-core CPU dev box bf16 autocast (AMX) trains the fused K=10 vgg7 about 1.7x faster
    (``qdistill bench``, phase (d))."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing on CUDA); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
