"""The optimizer and the learning-rate scheduler of every run (the schedule's formula:
`schedule.lr_factor`)."""
from __future__ import annotations

import torch

from .schedule import lr_factor


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Adam (elementwise, so each member of a fused group evolves as it would alone)."""
    t = cfg["train"]
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def make_scheduler(opt, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg["train"]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, t["epochs"], t["schedule"]))
