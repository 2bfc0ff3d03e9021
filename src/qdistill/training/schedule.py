"""The learning-rate schedules, torch-free: the loop sets each step's rate to the peak
rate times `lr_factor`, and whether a run can be extended to more epochs
(`extends_exactly`) is a question about these factors alone."""
from __future__ import annotations

import math


def lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule: str, warmup: float = 0.0) -> float:
    """The learning-rate multiplier of 0-based ``step`` (of ``S = steps_per_epoch * E``).

    ``course`` and ``cosine`` change once per epoch ``e = step // steps_per_epoch``.
    ``course``: 1, then 0.1 from epoch ``first = max(1, round(0.25 E))``, then 0.05 from
    ``max(first + 1, round(0.67 E))`` (epochs 15 and 40 of 60), each relative to the peak
    rate; no drop happens before the second epoch, and a drop past the last epoch never
    happens. ``cosine``: ``0.5 * (1 + cos(pi * e / E))``.
    ``linear`` changes every step (airbench's shape): with ``W = round(warmup * S)`` it
    rises as ``(step + 1) / W`` for ``step < W``, then falls as ``(S - step) / (S - W)``,
    so the last step still learns (``1 / (S - W)``).
    """
    if schedule == "linear":
        total = steps_per_epoch * epochs
        warm = round(warmup * total)
        return (step + 1) / warm if step < warm else (total - step) / (total - warm)
    epoch = step // steps_per_epoch
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    first = max(1, round(0.25 * epochs))
    if epoch >= max(first + 1, round(0.67 * epochs)):
        return 0.05
    if epoch >= first:
        return 0.1
    return 1.0


def extends_exactly(done: int, epochs: int, more: int, schedule: str, warmup: float = 0.0,
                    steps_per_epoch: int = 1) -> bool:
    """Whether a run that finished ``done`` epochs of ``epochs`` can go on to ``more``
    epochs and be the run it would have been: every step it trained keeps its factor."""
    return more > epochs and all(
        lr_factor(i, steps_per_epoch, epochs, schedule, warmup) == lr_factor(i, steps_per_epoch, more, schedule, warmup)
        for i in range(done * steps_per_epoch))
