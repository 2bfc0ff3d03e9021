"""One training step of one model or a fused group: what the loop runs and the
benchmark times. One step function; `qdistill.training.compiled` runs the same one with
its forward and losses through ``torch.compile``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def forward_losses(net, xb: torch.Tensor, yb: torch.Tensor, teacher_logits: torch.Tensor | None,
                   losses: tuple[LossFn, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = net(xb)`` (under autocast to ``dtype``; ``None``: none), shape ``(K, N,
    classes)``, and each member's loss ``losses[k](z[k], teacher_logits, yb)`` (outside
    autocast): ``(loss per member (K,), z)``, over the members that have a loss
    (`train_step` checks that each has one, outside the traced code)."""
    # one autocast expression, enabled or not: torch.compile traces it without a graph break
    with torch.autocast(xb.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        z = net(xb)
    return torch.stack([fn(zk, teacher_logits, yb) for zk, fn in zip(z.unbind(0), losses)]), z


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
    if len(losses) != z.shape[0]:
        raise ValueError(f"{len(losses)} losses for {z.shape[0]} members")
    opt.zero_grad(set_to_none=True)
    member_loss.sum().backward()
    opt.step()
    return member_loss.detach(), z.detach()
