"""Timing the real training step (`qdistill.training.step.train_step`) of one student or
a fused group: the shared timer of ``qdistill bench`` and `measure_step_rate`, the rate
behind ``qdistill bench --scaling``; one student's eager and compiled rate at the default
batch (`model_rate`: ``qdistill bench --model``, and phase (b) of ``qdistill bench``)."""
from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Iterator

import torch

from .. import config as configlib
from ..nn.fused import group
from ..nn.losses import build_loss
from ..nn.models import build
from ..training import compiled
from ..training.device import autocast_for, pick_device, sync
from ..training.rate import run_rate
from ..training.step import train_step
from .machine import device_name


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


def model_rate(cfg: dict, device: str = "auto", log=print) -> dict:
    """``qdistill bench --model M``: phase (b)'s measurement alone for ``cfg``'s student
    (its model, arguments, scheme and bits), eager and, where ``auto`` compiles, compiled."""
    dev = pick_device(device)
    compiles = compiled.wanted({"train": {"compile": "auto"}}, compiled.AUTO_IMAGES, dev)
    s = cfg["student"]
    return {"model": s["model"], "scheme": s["scheme"], "weight_bits": s["weight_bits"], "act_bits": s["act_bits"],
            "device": device_name(dev), "threads": torch.get_num_threads(), **default_batch(dev, compiles, log, cfg)}


def format_model_rate(r: dict) -> str:
    line = (f"{r['model']} W{r['weight_bits']}A{r['act_bits']} {r['scheme']}, batch {r['default_batch']}, "
            f"{r['device']}, {r['threads']} threads: {r['default_eager_img_s']:.0f} img/s eager")
    if r["default_compiled_vs_eager"] != 1.0 or r["default_compile_s"]:
        line += f", {r['default_img_s']:.0f} compiled ({r['default_compiled_vs_eager']:.2f}x)"
    return line


DEFAULT_REPEATS = 3  # eager and compiled take turns; each rate is the median of its turns


def default_batch(dev, compiles: bool, log, cfg: dict | None = None) -> dict:
    """One student (``cfg``'s, by default vgg7 W2A1) at the default recipe's batch size
    (`qdistill.training.rate.run_rate`, hard loss, 3 s a turn), eager and, where ``auto``
    compiles, compiled, in this process: `DEFAULT_REPEATS` turns each, alternating, so
    that a slow spell of the machine weighs on both; the medians, and the compile time of
    the first compiled turn."""
    cfg = cfg or configlib.defaults()
    batch = cfg["train"]["batch_size"]
    log(f"(b) {cfg['student']['model']} at the default recipe's batch of {batch}, "
        f"eager{' and compiled' if compiles else ''}, {DEFAULT_REPEATS} turns each ...")
    eager, rate, compile_s = [], [], []
    for _ in range(DEFAULT_REPEATS):
        eager.append(run_rate(cfg, "student", False, dev, min_seconds=3.0)[0])
        if compiles:
            r, c = run_rate(cfg, "student", True, dev, min_seconds=3.0)
            rate.append(r), compile_s.append(c)
    eager_img_s = statistics.median(eager)
    img_s = statistics.median(rate) if compiles else eager_img_s
    return {"default_model": cfg["student"]["model"], "default_batch": batch, "default_img_s": img_s, "default_eager_img_s": eager_img_s,
            "default_compile_s": compile_s[0] if compiles else 0.0, "default_compiled_vs_eager": img_s / eager_img_s}
