"""Teacher targets: where a batch's teacher logits come from.

One `TeacherTargets` object stands for the teacher of a run or a study and is what the
CLI, the study and the loop pass around. Per batch the logits come

* from a cache aligned with the training split, when the data is not augmented (the
  targets then never change, so one teacher pass serves every epoch); the cache can
  live in a file, keyed by a fingerprint of the teacher's weights and of the data;
* from a live forward pass of the teacher on the augmented batch otherwise;
* from nowhere (``None``) for losses that need no teacher, or without a teacher.

The teacher is a qdistill run directory or a file (`teachers`: TorchScript, a
``torch.export`` program, ONNX, or a file of logits for a teacher that cannot run here);
`from_path` tells them apart. The teacher's test logits give its accuracy and the
agreement and KL of a student to it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write
from ..errors import RunError, TeacherError
from . import checkpoint, rundir
from .evaluate import accuracy, predict
from .teachers import Preprocess, check_logits, detect, file_sha256, open_file


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
    """The teacher of ``data``: ``model`` (an eval-mode module, a `teachers.Runner`, or
    ``None`` for no teacher or a file of ``logits``), its logits on the train and test
    splits (computed once, on first use, or read from a cache file), the ``fingerprint``
    that keys that cache, and what it is: ``kind``, ``file``, ``sha256``."""

    def __init__(self, data, model=None, *, fingerprint: dict | None = None, source: str = "",
                 val_acc: float | None = None, kind: str = "", file: str = "", sha256: str = "",
                 logits: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.data, self.model, self.fingerprint, self.source = data, model, fingerprint, source
        self.val_acc = val_acc  # the teacher's own validation accuracy, when known
        self.kind, self.file, self.sha256 = kind, file, sha256
        self._train: torch.Tensor | None = logits[0] if logits else None
        self._test: torch.Tensor | None = logits[1] if logits else None

    @classmethod
    def none(cls, data=None) -> "TeacherTargets":
        return cls(data)

    @classmethod
    def from_run(cls, run: str | Path, data) -> "TeacherTargets":
        """The teacher of a finished qdistill run; its fingerprint is the sha256 of its
        ``best.pt``, its kind, the (default) preprocessing and the data's fingerprint."""
        model = load_teacher(run, data)
        best = Path(run) / rundir.BEST
        sha = file_sha256(best)
        fingerprint = {"teacher": sha, "kind": "run", "preprocess": Preprocess().key(), "data": data.fingerprint}
        return cls(data, model, fingerprint=fingerprint, source=str(run), kind="run", file=str(best), sha256=sha,
                   val_acc=rundir.read_summary(run).get("val_best_acc"))

    @classmethod
    def from_path(cls, path: str | Path, data, section: dict | None = None, *,
                  augment: bool = False) -> "TeacherTargets":
        """The teacher at ``path``, whatever its kind (`teachers.detect`), taking its input
        as the config section ``[teacher]`` (``section``) declares; ``augment``: the
        student's batches are augmented, so the teacher must run on them. Its
        fingerprint: the file's sha256, its kind, the preprocessing and the data's."""
        prep, kind = Preprocess(section), detect(path)
        if kind == "run":
            if not prep.is_default:
                raise TeacherError(f"teacher {path} is a qdistill run, which takes the data as it is: [teacher] "
                                   f"input_range, mean, std, layout and input_size are for teacher files")
            return cls.from_run(path, data)
        if kind == "logits" and augment:
            raise TeacherError(f"teacher {path} is a file of logits, fixed per image, but augmentation is on: "
                               f"set data.augment = \"none\" or give a teacher that runs here")
        runner, logits, sha = open_file(path, kind, data, prep)
        fingerprint = {"teacher": sha, "kind": kind, "preprocess": prep.key(), "data": data.fingerprint}
        return cls(data, runner, fingerprint=fingerprint, source=str(path), kind=kind, file=str(path), sha256=sha,
                   logits=logits)

    def __bool__(self) -> bool:
        return self.model is not None or self._train is not None

    def evaluate(self, device=None, *, train: bool = True) -> "TeacherTargets":
        """Compute the test logits (and, with ``train``, the training split's) now: every
        problem with the teacher shows before anything is written. Returns ``self``."""
        self.test_logits(device)
        if train:
            self.train_logits(device)
        return self

    def describe(self) -> dict:
        """What the teacher is and how it does: ``kind``, ``file``, ``sha256``, ``test_acc``."""
        return {"kind": self.kind, "file": self.file, "sha256": self.sha256,
                "test_acc": accuracy(self.test_logits(), self.data.y_test)}

    def train_logits(self, device=None) -> torch.Tensor:
        """Logits on ``data.x_train``, in order (float32, CPU)."""
        if self._train is None:
            self._train = self._predict("train", device)
        return self._train

    def test_logits(self, device=None) -> torch.Tensor | None:
        """Logits on ``data.x_test`` (float32, CPU); ``None`` without a teacher."""
        if self._test is None and self:
            self._test = self._predict("test", device)
        return self._test

    def _predict(self, split: str, device) -> torch.Tensor:
        x_u8 = getattr(self.data, f"x_{split}")
        if self.model is None:
            raise RunError("no teacher: this needs --teacher RUN")
        if isinstance(self.model, torch.nn.Module):
            self.model.to(device)
            out = predict(self.model, x_u8.to(device), device)
        else:
            out = self.model.predict(x_u8, device)
        return check_logits(out, len(x_u8), self.data, self.source, split)

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
        if self.read_cache(path):
            return self
        train, test = self.train_logits(device), self.test_logits(device)
        atomic_write(path, lambda f: torch.save({"fingerprint": self.fingerprint, "logits": train,
                                                 "test_logits": test}, f))
        return self

    def read_cache(self, path: str | Path) -> bool:
        """Take both splits' logits from the cache file ``path`` if its fingerprint matches."""
        path = Path(path)
        if not path.exists():
            return False
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return False  # unreadable: recompute
        if not isinstance(stored, dict) or stored.get("fingerprint") != self.fingerprint:
            return False
        self._train, self._test = stored["logits"], stored["test_logits"]
        return True

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
        if self.model is None:
            raise TeacherError(f"teacher {self.source} is a file of logits: it cannot run on augmented batches")
        teacher = self.model.to(device).eval() if isinstance(self.model, torch.nn.Module) else self.model.to(device)

        def live(idx, xb):
            with torch.no_grad(), autocast:
                return teacher(xb).float()
        return live
