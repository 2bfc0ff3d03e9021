"""Where a run trains and in which precision."""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from ..errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; otherwise the device named, which must
    exist (``cuda:N`` with N below the number of GPUs)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is {name!r} but no CUDA device is available")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ConfigError(f"train.device is {name!r} but this machine has {count} GPU(s): cuda:0"
                              + (f" to cuda:{count - 1}" if count > 1 else ""))
    return device


def precision_of(device: torch.device, precision: str = "auto") -> str:
    """``bf16`` or ``fp32``: what ``precision`` means on ``device``. ``auto`` is bf16 on a
    GPU that computes it natively (compute capability 8.0 or higher: A100, H100, RTX 30xx
    and later; older ones such as T4 and V100 report bf16 as supported but emulate it) and
    fp32 elsewhere. ``auto`` keeps fp32 on CPU, where the same config and seed must give
    identical metrics and bf16 would change them."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16"
    return "fp32"


def autocast_for(device: torch.device, precision: str = "auto"):
    """The context the forward pass runs in: bfloat16 autocast where `precision_of` says
    bf16, nothing (fp32) otherwise. On the 2-core CPU dev box bf16 autocast (AMX) trains
    the fused K=10 vgg7 about 1.7x faster (``qdistill bench``, phase (d))."""
    if precision_of(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def deterministic(device: torch.device, on: bool):
    """Meanwhile, on CUDA with ``on`` (``train.deterministic``): cuDNN's deterministic
    kernels, no benchmarking, deterministic algorithms where PyTorch has them (a warning
    where it has none) and cuBLAS's deterministic workspace; every flag and the variable
    are as before afterwards. Identical metrics on CUDA then need the same GPU model and
    driver too (README). Nothing elsewhere: CPU kernels are."""
    if device.type != "cuda" or not on:
        yield None
        return
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield None
    finally:
        cudnn.deterministic, cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
        if before[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def rng_state(device: torch.device) -> torch.Tensor | None:
    """The RNG state of ``device`` itself (not of the current CUDA device), for a checkpoint."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_rng(state, device: torch.device) -> None:
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op CPU threads set to ``n`` meanwhile (0: left as they are). Sums
    split across threads round differently, so a run records how many it had; and two
    processes whose threads outnumber the cores slow each other far more than twice
    (README, "One teacher, one student": 2.5x on 2 cores)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield None
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing on CUDA); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one) and its logical CPUs."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"
