"""How fast this machine trains one run: a few timed training steps of its model on
random images of its shape, as the run would train them (`study --plan`'s estimate)."""
from __future__ import annotations

import time

import torch

from ..nn.fused import group
from ..nn.losses import build_loss
from .checkpoint import build_from_meta, model_meta
from .compiled import CompiledStep
from .device import autocast_for, sync
from .optim import make_optimizer
from .step import train_step


MIN_STEPS, MIN_SECONDS = 3, 0.3


def run_rate(cfg: dict, role: str, compiled_steps: bool = False, device="cpu",
             min_seconds: float = MIN_SECONDS, num_classes: int = 10) -> tuple[float, float]:
    """``(images per second, compile seconds)`` of one run's training step as ``cfg``
    trains it (its batch size and optimizer, the hard loss) for the model of ``role``
    (``teacher`` or ``student``: its model, arguments, scheme and bits), on random
    images: timed over at least `MIN_STEPS` steps and ``min_seconds``, after one untimed
    step (the compile, when ``compiled_steps``). The random state of torch is left as it was."""
    cfg = {**cfg, "run": {**cfg["run"], "role": role}}
    meta = model_meta(cfg, num_classes, [str(i) for i in range(num_classes)])
    with torch.random.fork_rng(devices=[]):
        return _timed_run(cfg, meta, compiled_steps, torch.device(device), min_seconds)


def _timed_run(cfg, meta, compiled_steps, dev, min_seconds) -> tuple[float, float]:
    batch = cfg["train"]["batch_size"]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = group([build_from_meta(meta)]).to(dev).to_channels_last()
    x = torch.rand(batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last).to(dev)
    y = torch.randint(0, meta["build"]["num_classes"], (batch,), generator=gen).to(dev)
    opt, losses, autocast = make_optimizer(net.parameters(), cfg), [build_loss("hard")], autocast_for(dev, "auto")
    step = CompiledStep() if compiled_steps else train_step
    t0 = time.perf_counter()
    step(net, opt, x, y, None, losses, autocast)
    sync(dev)
    compile_s, steps, t0 = time.perf_counter() - t0 if compiled_steps else 0.0, 0, time.perf_counter()
    while steps < MIN_STEPS or time.perf_counter() - t0 < min_seconds:
        step(net, opt, x, y, None, losses, autocast)
        steps += 1
    sync(dev)
    return batch * steps / (time.perf_counter() - t0), compile_s
