"""The optimizer of every run and each step's learning rate (the schedule's formula:
`schedule.lr_factor`)."""
from __future__ import annotations

import torch

from .schedule import lr_factor

MOMENTUM = 0.9  # sgd: Nesterov momentum, as airbench


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum: both elementwise, so each member of a fused
    group evolves as it would alone."""
    t = cfg["train"]
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=t["lr"], momentum=MOMENTUM, nesterov=True, weight_decay=t["weight_decay"])
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def set_lr(opt: torch.optim.Optimizer, cfg: dict, step: int, steps_per_epoch: int) -> float:
    """Set the rate of global 0-based ``step``: the peak ``train.lr`` times its factor."""
    t = cfg["train"]
    lr = t["lr"] * lr_factor(step, steps_per_epoch, t["epochs"], t["schedule"], t["warmup"])
    for g in opt.param_groups:
        g["lr"] = lr
    return lr
