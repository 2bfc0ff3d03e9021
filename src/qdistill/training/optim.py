"""The optimizer and the learning-rate schedule of every run."""
from __future__ import annotations

import math

import torch


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    """The learning-rate multiplier for 0-based ``epoch``.

    ``course``: 1 before 25% of the epochs, 0.1 from 25%, 0.05 from 67% (epochs 15 and
    40 of 60), each relative to the base rate. ``cosine``: ``0.5 * (1 + cos(pi * e / E))``.
    """
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if epoch >= round(0.67 * epochs):
        return 0.05
    if epoch >= round(0.25 * epochs):
        return 0.1
    return 1.0


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Adam (elementwise, so each member of a fused group evolves as it would alone)."""
    t = cfg["train"]
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def make_scheduler(opt, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg["train"]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, t["epochs"], t["schedule"]))
