"""Timing the real training step (`qdistill.training.step.train_step`) of one student or
a fused group: the shared timer of ``qdistill bench`` and `measure_step_rate`, the rate
behind ``qdistill bench --scaling``."""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator

import torch

from ..nn.fused import group
from ..nn.losses import build_loss
from ..nn.models import build
from ..training.device import autocast_for, sync
from ..training.step import train_step


def timed(step: Callable, items: Iterator, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step(next(items))`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(next(items))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(items))
    sync(device)
    return time.perf_counter() - t0


def students(k: int, device: torch.device, channels_last: bool, *, arch: str = "vgg7", weight_bits: int = 2,
             act_bits: int = 1, seed: int = 0) -> torch.nn.Module:
    """``k`` freshly built students (seeded with ``seed``) as the network the training loop
    trains: `qdistill.nn.fused.group` of them, on ``device``, in channels_last if asked."""
    torch.manual_seed(seed)
    members = [build(arch, weight_bits=weight_bits, act_bits=act_bits) for _ in range(k)]
    net = group(members).to(device)
    return net.to_channels_last() if channels_last else net


def measure_step_rate(k: int = 10, batch: int = 256, steps: int = 5, channels_last: bool = True,
                      warmup: int = 3, device: str | torch.device = "cpu", precision: str = "fp32") -> float:
    """Student images per second, ``k * batch * steps / seconds``, of training steps
    (forward, backward, Adam: `train_step` with each member's cross-entropy, in
    ``precision``: `autocast_for`) of vgg7 W2A1 students on random data (seed 0), after
    ``warmup`` untimed steps.

    ``k == 1`` times one ordinary model (as `Solo`); ``k > 1`` a `FusedStudents` of ``k``
    members. Uses the current ``torch.get_num_threads()``; no teacher, no data pipeline.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    net = students(k, device, channels_last)
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
    if channels_last:  # Solo leaves the input's layout as it comes
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = [build_loss("hard")] * k
    autocast = autocast_for(device, precision)
    net.train()
    seconds = timed(lambda _: train_step(net, opt, x, y, None, losses, autocast), itertools.repeat(None),
                    warmup, steps, device)
    return k * batch * steps / seconds
