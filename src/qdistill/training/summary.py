"""A finished run's summary: the best-validation weights evaluated once more on the test
split, and everything a report needs of the run without training it again. Written
last, after ``test_logits.npy``: its presence means the run finished."""
from __future__ import annotations

import torch

from ..nn.models import summary as model_summary
from . import checkpoint
from .calibration import ece, nll
from .device import precision_of
from .evaluate import per_class_accuracy, predict, teacher_agreement
from .probes import grad_ratio, omitted, omitted_class


def summarize(s, m, model, wall_s: float) -> dict:
    """Write and return member ``m``'s ``summary.json`` (``s``: the loop's `Session`)."""
    model.load_state_dict(checkpoint.load(m.run.out.best)["model"])
    data, metrics = s.data, m.metrics
    logits = predict(model, data.x_test.to(s.device), s.device)
    m.run.out.write_test_logits(logits.numpy())
    size = model_summary(model)
    summary = {
        "val_best_acc": m.best["val"], "best_epoch": m.best["epoch"], "test_acc_at_val_best": m.best["test"],
        "test_acc_last": metrics[-1]["test_acc"], "epochs": len(metrics), "wall_s": wall_s,
        "img_per_s": sum(r["img_per_s"] for r in metrics) / len(metrics),
        "params": size["params"], "model_bytes_at_bits": size["bytes_at_bits"], "fp32_bytes": size["fp32_bytes"],
        "test_per_class_acc": per_class_accuracy(logits, data.y_test, data.num_classes),
        "test_nll": nll(logits.numpy(), data.y_test.numpy()), "test_ece": ece(logits.numpy(), data.y_test.numpy()),
        "threads": torch.get_num_threads(), "val_images": len(s.splits["val"][1]),
        "precision": precision_of(s.device, m.run.cfg["train"]["precision"]), "device": str(s.device),
        "compiled": getattr(s.step, "compiled", False),
    }
    summary.update(_gradient_ratios(s, m, model))
    if m.meta["role"] == "student" and s.teacher is not None:
        summary["teacher_agreement"], summary["kl_to_teacher"] = teacher_agreement(
            logits, s.teacher.test_logits(s.device))
        # which teacher, exactly: kind, file, sha256, and its own test accuracy
        summary.update({f"teacher_{key}": v for key, v in s.teacher.describe().items()})
    k = omitted(m.run.cfg)
    if k is not None:
        summary.update(_probe_omitted(s, model, logits, k))
    if getattr(data, "skipped", 0):
        summary["skipped_images"] = data.skipped
    summary.update({**m.prints, "node": s.remote.node, **({"fused_k": len(s.members)} if len(s.members) > 1 else {})})
    m.run.out.write_summary(summary)
    return summary


def _gradient_ratios(s, m, model) -> dict:
    """``grad_ratio_soft_hard`` at the best epoch and ``grad_ratio_soft_hard_init`` at
    initialisation, on the loop's fixed batch (runs with a soft term only)."""
    x, y, t = s.probe
    ratio = grad_ratio(m.loss, predict(model, x, s.device), t, y)
    return {} if ratio is None else {"grad_ratio_soft_hard": ratio, "grad_ratio_soft_hard_init": m.grad_init}


def _probe_omitted(s, model, logits: torch.Tensor, k: int) -> dict:
    """The unseen-class probe's fields; the bias correction is chosen on the training
    images (the student's logits there and how often the teacher picks ``k``)."""
    if s.teacher is None:
        return omitted_class(logits, s.data, k)
    rate = float((s.teacher.train_logits(s.device).argmax(1) == k).float().mean())
    return omitted_class(logits, s.data, k, predict(model, s.data.x_train.to(s.device), s.device), rate)
