"""One training step of one model or a fused group: what the loop runs and the
benchmark times. One step function; `qdistill.training.compiled` runs the same one with
its forward and losses through ``torch.compile``."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def forward_losses(net, xb: torch.Tensor, yb: torch.Tensor, teacher_logits: torch.Tensor | None,
                   losses: tuple[LossFn, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = net(xb)`` (under autocast to ``dtype``; ``None``: none), shape ``(K, N,
    classes)``, and each member's loss ``losses[k](z[k], teacher_logits, yb)`` (outside
    autocast): ``(loss per member (K,), z)``. One loss per member, else `ValueError`."""
    with torch.autocast(xb.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        z = net(xb)
    if len(losses) != z.shape[0]:
        raise ValueError(f"{len(losses)} losses for {z.shape[0]} members")
    return torch.stack([fn(z[k], teacher_logits, yb) for k, fn in enumerate(losses)]), z


def train_step(net, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               teacher_logits: torch.Tensor | None, losses: Sequence[LossFn],
               autocast, forward: Callable = forward_losses) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``sum_k losses[k](z[k], teacher_logits, yb)`` (`forward_losses`,
    or ``forward``: the same function compiled): each member's gradient comes from its own
    loss only, as in a separate run. ``autocast``: the forward's context (`device.autocast_for`).
    Returns ``(loss per member (K,), z)``, both detached and still on the device (no host
    synchronisation)."""
    dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else None
    member_loss, z = forward(net, xb, yb, teacher_logits, tuple(losses), dtype)
    opt.zero_grad(set_to_none=True)
    member_loss.sum().backward()
    opt.step()
    return member_loss.detach(), z.detach()
