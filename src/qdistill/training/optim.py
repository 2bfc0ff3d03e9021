"""The optimizer and the learning-rate schedule of every run."""
from __future__ import annotations

import math

import torch


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


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Adam (elementwise, so each member of a fused group evolves as it would alone)."""
    t = cfg["train"]
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def make_scheduler(opt, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg["train"]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, t["epochs"], t["schedule"]))
