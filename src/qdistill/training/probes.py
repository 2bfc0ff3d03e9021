"""What temperature does, measured on every run: how strongly the soft term pushes the
logits against the hard term (the gradient ratio), and what a student learns of a class
it never saw (the unseen-class probe, ``student.omit_class``).

The gradient ratio is the quantity behind Hinton et al.'s (2015) c = T^2: the soft
term's gradient with respect to the logits scales as 1/T^2 for large T, so with c = T^2
the ratio stays in a constant band while with c = 1 it falls like 1/T^2.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.batching import split_val
from ..errors import RunError
from .calibration import bias_for_rate, class_rank

PROBE_IMAGES = 1024  # the fixed batch of training images the gradient ratio is taken on


def grad_ratio(loss, z: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor) -> float | None:
    """``||d soft / dz|| / ||d hard / dz||``: L2 norms over the whole batch of the
    gradients, with respect to the logits ``z``, of the loss's two terms as they enter it
    (`Loss.terms`: the soft term with its weight c; for Q2, which has no hard term, the
    hard term it would have). Computed in float64; ``None`` for a loss without a soft
    term."""
    z = z.detach().double().requires_grad_(True)
    hard, soft = loss.terms(z, None if t is None else t.detach().double(), y)
    if soft is None:
        return None
    g_hard, = torch.autograd.grad(hard, z, retain_graph=True)
    g_soft, = torch.autograd.grad(soft, z)
    return float(g_soft.norm() / g_hard.norm())


def omitted_class(logits: torch.Tensor, data, k: int, train_logits=None, teacher_rate: float | None = None) -> dict:
    """The probe's fields for class ``k``, left out of the student's training batches:
    its test accuracy on the images of ``k`` and the mean rank of ``k`` among their logits
    (1 is best). With the student's logits on the training images (``train_logits``) and
    the fraction of training images the teacher puts in ``k`` (``teacher_rate``), also the
    accuracy after a bias shift chosen on the training images, never the test set: ``k``'s
    logit raised until the student picks ``k`` as often as the teacher does there
    (`calibration.bias_for_rate`). Reported beside the plain accuracy, never as it."""
    mask = (data.y_test == k).numpy()
    z = logits.numpy()[mask]
    out = {"omitted_class": k, "omitted_class_acc": float((z.argmax(1) == k).mean()) if len(z) else float("nan"),
           "omitted_class_rank": float(class_rank(z, k).mean()) if len(z) else float("nan")}
    if train_logits is not None and teacher_rate is not None:
        b = bias_for_rate(train_logits.numpy(), k, teacher_rate)
        shifted = z + b * np.eye(z.shape[1])[k]
        out.update(omitted_class_bias=b, omitted_class_acc_bias_corrected=float((shifted.argmax(1) == k).mean())
                   if len(z) else float("nan"))
    return out


def split(data, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation indices (the seed's split); with ``student.omit_class
    = K`` (the unseen-class probe) the images of K leave both: the student never trains or
    chooses on them. The test split keeps them."""
    train_idx, val_idx = split_val(len(data.x_train), cfg["data"]["val_fraction"], cfg["train"]["seed"])
    k = omitted(cfg)
    if k is None:
        return train_idx, val_idx
    if not 0 <= k < data.num_classes:
        raise RunError(f"student.omit_class {k} is not a class of the data (0..{data.num_classes - 1})")
    return train_idx[data.y_train[train_idx] != k], val_idx[data.y_train[val_idx] != k]


def omitted(cfg: dict) -> int | None:
    """The class a student leaves out of its training (``student.omit_class``), if any."""
    k = cfg["student"]["omit_class"]
    return k if cfg["run"]["role"] == "student" and k >= 0 else None


def probe_batch(data, teacher, train_idx: torch.Tensor, device) -> tuple:
    """The gradient ratio's fixed batch: the first `PROBE_IMAGES` training images (in the
    split's order), their labels and the teacher's logits on them."""
    idx = train_idx[:PROBE_IMAGES]
    return (data.x_train[idx].to(device), data.y_train[idx],
            None if teacher is None else teacher.train_rows(idx, device))
