"""Validation split and mini-batches sliced from in-memory uint8 tensors.

The data path copies airbench's: the whole set is one uint8 tensor (on the device when
training there); a batch is an index into it, converted to float on the fly. No DataLoader,
no worker processes, no per-sample Python.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DataError
from . import AUGMENTS
from .augment import augment_light


def split_val(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), int64, each sorted ascending, disjoint, together ``0..n-1``.

    ``val_idx`` is the first ``k = round(n * fraction)`` entries (Python's round, halves to
    even; at least 1 when ``fraction > 0``) of ``torch.randperm(n)`` drawn from
    ``torch.Generator().manual_seed(seed)``: the same seed always holds out the same images.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    k = round(n * fraction)
    if fraction > 0:
        k = max(k, 1)
    if k >= n:
        raise DataError(f"a validation fraction of {fraction} of {n} training images leaves none to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]: ``x / 255``."""
    return x_u8.to(torch.float32).div_(255.0)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator: torch.Generator | None = None,
            shuffle: bool = True, augment: str = "none", aug_generator: torch.Generator | None = None,
            device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of ``(xb, yb, idx)``: ``xb = x[idx] / 255`` (float32, augmented when
    ``augment="light"``), ``yb = y[idx]`` (int64), ``idx`` the int64 positions into ``x``.
    All three live on ``device`` (default: ``x``'s device).

    ``shuffle`` draws the epoch's order with ``torch.randperm(len(x), generator=generator)``
    on the CPU, so the order does not depend on the device; without it the order is
    ``0..n-1``. Every index comes exactly once; the last batch may be smaller.
    ``aug_generator`` drives the augmentation (see `augment_light`).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} images but y has {y.shape[0]} labels")
    device = torch.device(device) if device is not None else x.device
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    # one transfer of the permutation per epoch rather than one small copy per batch
    order_src = order.to(x.device)
    order_out = order_src.to(device)  # a no-op when x already lives on `device`
    for start in range(0, n, batch_size):
        i = order_src[start:start + batch_size]
        xb = to_float(x.index_select(0, i).to(device, non_blocking=True))
        yb = y.index_select(0, i.to(y.device)).to(device, non_blocking=True)
        if augment == "light":
            xb = augment_light(xb, aug_generator)
        yield xb, yb, order_out[start:start + batch_size]
