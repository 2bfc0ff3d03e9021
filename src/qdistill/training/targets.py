"""Teacher targets: where a batch's teacher logits come from.

One `TeacherTargets` object stands for the teacher of a run or a study and is what the
CLI, the study and the loop pass around. Per batch the logits come

* from a cache aligned with the training split, when the data is not augmented (the
  targets then never change, so one teacher pass serves every epoch); the cache can
  live in a file, keyed by a fingerprint of the teacher's weights and of the data;
* from a live forward pass of the teacher on the augmented batch otherwise;
* from nowhere (``None``) for losses that need no teacher, or without a teacher.

The teacher's test logits give the agreement and KL of a student to its teacher.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write
from ..errors import RunError
from . import checkpoint, rundir
from .evaluate import accuracy, predict


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_teacher(run: str | Path, data) -> torch.nn.Module:
    """The eval-mode teacher of a finished run, checked against ``data``'s classes."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"teacher run not found: {run}")
    if rundir.read_summary(run) is None:
        raise RunError(f"teacher run {run} has not finished (no summary.json)")
    model, meta = checkpoint.load_model(run, "best")
    if meta["build"]["num_classes"] != data.num_classes or meta["class_names"] != list(data.class_names):
        raise RunError(f"teacher {run} was trained on {meta['build']['num_classes']} classes "
                       f"{meta['class_names']}, but the data has {data.num_classes} {list(data.class_names)}")
    return model


class TeacherTargets:
    """The teacher of ``data``: ``model`` (an eval-mode module, or ``None`` for no
    teacher), its logits on the train and test splits (computed once, on first use, or
    read from a cache file), and the ``fingerprint`` that keys that cache."""

    def __init__(self, data, model: torch.nn.Module | None = None, *, fingerprint: dict | None = None,
                 source: str = "", val_acc: float | None = None):
        self.data, self.model, self.fingerprint, self.source = data, model, fingerprint, source
        self.val_acc = val_acc  # the teacher's own validation accuracy, when known
        self._train: torch.Tensor | None = None
        self._test: torch.Tensor | None = None

    @classmethod
    def none(cls, data=None) -> "TeacherTargets":
        return cls(data)

    @classmethod
    def from_run(cls, run: str | Path, data) -> "TeacherTargets":
        """The teacher of a finished qdistill run; its fingerprint is the sha256 of its
        ``best.pt`` and the data's fingerprint."""
        model = load_teacher(run, data)
        fingerprint = {"teacher": file_sha256(Path(run) / rundir.BEST), "data": data.fingerprint}
        return cls(data, model, fingerprint=fingerprint, source=str(run),
                   val_acc=rundir.read_summary(run).get("val_best_acc"))

    def __bool__(self) -> bool:
        return self.model is not None

    def train_logits(self, device=None) -> torch.Tensor:
        """Logits on ``data.x_train``, in order (float32, CPU)."""
        if self._train is None:
            self._train = self._predict(self.data.x_train, device)
        return self._train

    def test_logits(self, device=None) -> torch.Tensor | None:
        """Logits on ``data.x_test`` (float32, CPU); ``None`` without a teacher."""
        if self._test is None and self:
            self._test = self._predict(self.data.x_test, device)
        return self._test

    def _predict(self, x_u8: torch.Tensor, device) -> torch.Tensor:
        if not self:
            raise RunError("no teacher: this needs --teacher RUN")
        self.model.to(device)
        return predict(self.model, x_u8.to(device), device)

    def check_useful(self, allow: bool = False) -> None:
        """Refuse a teacher not clearly above chance: validation accuracy at most ``1/K``
        plus 5 points (K classes). Without a validation split the teacher's eval-mode
        accuracy on the training split stands in (the test split chooses nothing)."""
        if not self or allow:
            return
        acc, where = self.val_acc, "validation"
        if acc is None or not math.isfinite(acc):
            acc, where = accuracy(self.train_logits(), self.data.y_train), "training-split"
        k = self.data.num_classes
        if acc <= 1 / k + 0.05:
            raise RunError(f"teacher {self.source} reaches {100 * acc:.1f}% {where} accuracy, not clearly above "
                           f"chance ({100 / k:.1f}% for {k} classes): train it for more epochs, or pass "
                           f"--allow-weak-teacher to use it anyway")

    def cached(self, path: str | Path, device=None) -> "TeacherTargets":
        """Read both splits' logits from ``path`` when its fingerprint matches, else
        compute them and write ``path`` (atomically). Returns ``self``."""
        path = Path(path)
        if path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                stored = {}  # unreadable: recompute
            if stored.get("fingerprint") == self.fingerprint:
                self._train, self._test = stored["logits"], stored["test_logits"]
                return self
        train, test = self.train_logits(device), self.test_logits(device)
        atomic_write(path, lambda f: torch.save({"fingerprint": self.fingerprint, "logits": train,
                                                 "test_logits": test}, f))
        return self

    def for_batches(self, train_idx: torch.Tensor, *, augment: bool, needed: bool, device,
                    autocast) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """``targets(idx, xb)``: the teacher's logits for a training batch, where ``idx``
        are positions into ``data.x_train[train_idx]`` and ``xb`` the batch itself."""
        if not needed:
            return lambda idx, xb: None
        if not self:
            raise RunError("this loss needs a teacher (--teacher RUN)")
        if not augment:
            rows = self.train_logits(device)[train_idx].to(device)
            return lambda idx, xb: rows[idx]
        teacher = self.model.to(device).eval()

        def live(idx, xb):
            with torch.no_grad(), autocast:
                return teacher(xb).float()
        return live
