"""One training step of one model or a fused group: what the loop runs and the
benchmark times."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def train_step(net, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               teacher_logits: torch.Tensor | None, losses: Sequence[LossFn],
               autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``sum_k losses[k](z[k], teacher_logits, yb)`` where
    ``z = net(xb)`` has shape ``(K, N, classes)``: each member's gradient comes from its
    own loss only, as in a separate run. Returns ``(loss per member (K,), z)``, both
    detached and still on the device (no host synchronisation)."""
    with autocast:
        z = net(xb)
    if len(losses) != z.shape[0]:
        raise ValueError(f"{len(losses)} losses for {z.shape[0]} members")
    member_loss = torch.stack([fn(z[k], teacher_logits, yb) for k, fn in enumerate(losses)])
    opt.zero_grad(set_to_none=True)
    member_loss.sum().backward()
    opt.step()
    return member_loss.detach(), z.detach()
