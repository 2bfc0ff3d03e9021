"""The learning-rate schedules, torch-free: the loop's scheduler multiplies the base rate
by `lr_factor`, and whether a run can be extended to more epochs (`extends_exactly`) is a
question about these factors alone."""
from __future__ import annotations

import math


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    """The learning-rate multiplier for 0-based ``epoch`` of ``epochs`` (E).

    ``course``: 1, then 0.1 from epoch ``first = max(1, round(0.25 E))``, then 0.05 from
    ``max(first + 1, round(0.67 E))`` (epochs 15 and 40 of 60), each relative to the base
    rate; no drop happens before the second epoch, and a drop past the last epoch never
    happens. ``cosine``: ``0.5 * (1 + cos(pi * e / E))``.
    """
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    first = max(1, round(0.25 * epochs))
    if epoch >= max(first + 1, round(0.67 * epochs)):
        return 0.05
    if epoch >= first:
        return 0.1
    return 1.0


def extends_exactly(done: int, epochs: int, more: int, schedule: str) -> bool:
    """Whether a run that finished ``done`` epochs of ``epochs`` can go on to ``more``
    epochs and be the run it would have been: every epoch it trained keeps its factor."""
    return more > epochs and all(lr_factor(e, epochs, schedule) == lr_factor(e, more, schedule)
                                 for e in range(done))
