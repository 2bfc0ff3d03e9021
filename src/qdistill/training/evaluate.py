"""Evaluation: logits of a model or a fused group in eval mode, and the metrics every
command reports (accuracy, per-class accuracy, confusion matrix, agreement and KL to
the teacher)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batching import to_float

EVAL_BATCH = 1024


@torch.no_grad()
def predict(model, x_u8: torch.Tensor, device=None) -> torch.Tensor:
    """Logits (float32, CPU) of ``model`` in eval mode on uint8 images, in order: ``(N,
    classes)`` for a model, ``(K, N, classes)`` for a group of K."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x_u8), EVAL_BATCH):
        xb = to_float(x_u8[i:i + EVAL_BATCH].to(device, non_blocking=True))
        out.append(model(xb).float().cpu())
    model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out, dim=-2)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of images whose top logit is their label, ``correct / N`` in float64
    (a float32 mean is off in the 8th digit, so equal counts would not give equal
    differences: `study.racetests.constant_differences`)."""
    return (logits.argmax(1).cpu() == y.cpu()).sum().item() / len(y) if len(y) else float("nan")


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    pred, y = logits.argmax(1), y.cpu()
    return [((pred == y) & (y == k)).sum().item() / max(1, (y == k).sum().item()) for k in range(num_classes)]


def confusion(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C[i, j]``: images of true class ``i`` predicted as ``j``."""
    pred = logits.argmax(1)
    out = torch.zeros(num_classes, num_classes, dtype=torch.long)
    out.index_put_((y.cpu(), pred), torch.ones_like(pred), accumulate=True)
    return out


def teacher_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean ``KL(softmax(t) || softmax(z))`` at T = 1."""
    agree = accuracy(student_logits, teacher_logits.argmax(1))
    log_p_t = F.log_softmax(teacher_logits.float(), 1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(student_logits.float(), 1))).sum(1).mean().item()
    return agree, kl


def evaluate(model, data) -> dict:
    """What ``qdistill eval`` reports for ``model`` on ``data``'s test split."""
    logits = predict(model, data.x_test)
    k = data.num_classes
    return {"test_acc": accuracy(logits, data.y_test), "n": len(data.y_test),
            "per_class_acc": dict(zip(data.class_names, per_class_accuracy(logits, data.y_test, k))),
            "confusion": confusion(logits, data.y_test, k).tolist(), "class_names": data.class_names}
