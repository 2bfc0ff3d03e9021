"""The teacher of a run or a study: one `Teacher` object that knows what it is (kind,
file, fingerprint), how good it is (accuracy, usefulness), and where a batch's teacher
logits come from. The CLI, the study and a Ray worker use it and nothing else;
`open_teacher` is the one way in.

Per batch the logits come

* from a cache aligned with the training split, when the data is not augmented (the
  targets then never change, so one teacher pass serves every epoch); the cache can
  live in a file, keyed by the teacher's fingerprint (its file's sha256, its kind, its
  declared preprocessing and the data's fingerprint);
* from a live forward pass of the teacher on the augmented batch otherwise.

The teacher is a qdistill run directory or a file (`teacher_files`: TorchScript, a
``torch.export`` program, ONNX, or a file of logits for a teacher that cannot run here),
told apart by what the path is. For a Ray task it becomes a `bundle` of values (its
files and logits) and back (`from_bundle`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write, atomic_write_bytes
from ..errors import RunError, TeacherError
from . import near_chance
from .checkpoint import load_model
from .device import pick_device
from .evaluate import accuracy, predict
from .rundir import RunDir
from .teacher_files import Preprocess, check_logits, detect, file_sha256, open_file

BUNDLE_FOLDER = "teacher-in"  # where a Ray worker writes the teacher's files


def open_teacher(cfg: dict, data, *, cache: str | Path | None = None) -> Teacher | None:
    """The teacher ``teacher.run`` names (``None`` without one), checked now: opened, its
    logits computed (or read from ``cache`` when its fingerprint matches) and judged
    useful unless ``study.allow_weak_teacher``, so every problem with it shows before
    anything is written."""
    if not cfg["teacher"]["run"]:
        return None
    augment = cfg["data"]["augment"] != "none"
    teacher = Teacher.open(cfg["teacher"]["run"], data, cfg["teacher"], augment=augment)
    if not (cache and teacher.read_cache(cache)):
        teacher.evaluate(pick_device(cfg["train"]["device"]), train=not augment)
    teacher.check_useful(cfg["study"]["allow_weak_teacher"])
    return teacher


def _run_model(run: RunDir, data) -> tuple[torch.nn.Module, dict]:
    """The eval-mode teacher of a finished run, checked against ``data``'s classes, and its meta."""
    run.require_finished("teacher run")
    model, meta = load_model(run.path, "best")
    if meta["build"]["num_classes"] != data.num_classes or meta["class_names"] != list(data.class_names):
        raise RunError(f"teacher {run} was trained on {meta['build']['num_classes']} classes "
                       f"{meta['class_names']}, but the data has {data.num_classes} {list(data.class_names)}")
    return model, meta


@dataclass
class Teacher:
    """The teacher of ``data``: ``model`` (an eval-mode module, a `teacher_files.Runner`,
    or ``None`` for a file of logits), what it is, and its logits on the ``train`` and
    ``test`` splits (computed once, on first use, or read from a cache file)."""
    data: object
    model: object | None
    kind: str             # one of qdistill.training.TEACHER_KINDS
    source: str           # the path the user gave
    file: str             # the file the weights come from (a run's best.pt)
    sha256: str
    preprocess: Preprocess
    val_acc: float | None = None  # the teacher's own validation accuracy, when known
    logits: dict = field(default_factory=dict)  # split -> (N, K) float32 on the CPU
    device: object = None         # where it last ran: later logits are computed there too
    arch: str = ""                # a run teacher's model as its meta names it; "" for a file

    @classmethod
    def open(cls, path: str | Path, data, section: dict | None = None, *, augment: bool = False) -> "Teacher":
        """The teacher at ``path``, whatever its kind (`teacher_files.detect`), taking its
        input as the config section ``[teacher]`` (``section``) declares; ``augment``:
        the student's batches are augmented, so the teacher must run on them."""
        prep, kind = Preprocess(section), detect(path)
        if kind == "run":
            if not prep.is_default:
                raise TeacherError(f"teacher {path} is a qdistill run, which takes the data as it is: [teacher] "
                                   f"input_range, mean, std, layout and input_size are for teacher files")
            run = RunDir(path)
            model, meta = _run_model(run, data)
            return cls(data, model, "run", str(path), str(run.best), file_sha256(run.best), prep,
                       val_acc=run.read_summary().get("val_best_acc"), arch=meta["arch"])
        if kind == "logits" and augment:
            raise TeacherError(f"teacher {path} is a file of logits, fixed per image, but augmentation is on: "
                               f"set data.augment = \"none\" or give a teacher that runs here")
        runner, logits, sha = open_file(path, kind, data, prep)
        return cls(data, runner, kind, str(path), str(path), sha, prep,
                   logits=dict(zip(("train", "test"), logits)) if logits else {})

    @property
    def fingerprint(self) -> dict:
        """What the teacher's logits depend on: the key of its cache."""
        return {"teacher": self.sha256, "kind": self.kind, "preprocess": self.preprocess.key(),
                "data": self.data.fingerprint}

    # ------------------------------------------------------------ logits and accuracy

    def train_logits(self, device=None) -> torch.Tensor:
        """Logits on ``data.x_train``, in order (float32, CPU)."""
        return self._logits("train", device)

    def test_logits(self, device=None) -> torch.Tensor:
        """Logits on ``data.x_test``, in order (float32, CPU)."""
        return self._logits("test", device)

    def evaluate(self, device=None, *, train: bool = True) -> "Teacher":
        """Compute the test logits (and, with ``train``, the training split's) now: every
        problem with the teacher shows before anything is written. Returns ``self``."""
        self.test_logits(device)
        if train:
            self.train_logits(device)
        return self

    def train_rows(self, idx: torch.Tensor, device=None) -> torch.Tensor:
        """Logits on the training images ``idx`` (float32, CPU): from the training split's
        logits when they are at hand, else by running the teacher on those images only."""
        if "train" in self.logits or self.model is None:
            return self.train_logits(device)[idx]
        x_u8 = self.data.x_train[idx]
        return check_logits(self._run(x_u8, device), len(x_u8), self.data, self.source, "train")

    def _logits(self, split: str, device) -> torch.Tensor:
        if split not in self.logits:
            x_u8 = getattr(self.data, f"x_{split}")
            self.logits[split] = check_logits(self._run(x_u8, device), len(x_u8), self.data, self.source, split)
        return self.logits[split]

    def _run(self, x_u8: torch.Tensor, device) -> torch.Tensor:
        """The teacher's logits on ``x_u8``, on ``device`` or, when none is given, where the
        teacher last ran (its module may already live on a GPU: CPU batches would not fit)."""
        device = self.device = device if device is not None else self.device
        if isinstance(self.model, torch.nn.Module):
            return predict(self.model.to(device), x_u8.to(device), device)
        return self.model.predict(x_u8, device)

    def describe(self) -> dict:
        """What the teacher is and how it does: ``kind``, ``file``, ``sha256``, ``test_acc``."""
        return {"kind": self.kind, "file": self.file, "sha256": self.sha256,
                "test_acc": accuracy(self.test_logits(), self.data.y_test)}

    def check_useful(self, allow: bool = False) -> None:
        """Refuse a teacher not clearly above chance (`near_chance` on its validation
        accuracy). Without a validation split the teacher's eval-mode accuracy on the
        training split stands in (the test split chooses nothing)."""
        if allow:
            return
        acc, where = self.val_acc, "validation"
        if acc is None or not math.isfinite(acc):
            acc, where = accuracy(self.train_logits(), self.data.y_train), "training-split"
        k = self.data.num_classes
        if near_chance(acc, k):
            raise RunError(f"teacher {self.source} reaches {100 * acc:.1f}% {where} accuracy, not clearly above "
                           f"chance ({100 / k:.1f}% for {k} classes): train it for more epochs, or pass "
                           f"--allow-weak-teacher to use it anyway")

    # ------------------------------------------------------------ the cache

    def cached(self, path: str | Path, device=None) -> "Teacher":
        """Read both splits' logits from ``path`` when its fingerprint matches, else
        compute them and write ``path`` (atomically). Returns ``self``."""
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
        self.logits.update(train=stored["logits"], test=stored["test_logits"])
        return True

    # ------------------------------------------------------------ per batch

    def batch_targets(self, train_idx: torch.Tensor, *, augment: bool,
                      device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``targets(idx, xb)``: the teacher's logits for a training batch, where ``idx``
        are positions into ``data.x_train[train_idx]`` and ``xb`` the batch itself."""
        if not augment:
            rows = self.train_logits(device)[train_idx].to(device)
            return lambda idx, xb: rows[idx]
        if self.model is None:
            raise TeacherError(f"teacher {self.source} is a file of logits: it cannot run on augmented batches")
        teacher = self.model.to(device).eval() if isinstance(self.model, torch.nn.Module) else self.model.to(device)

        def live(idx, xb):  # in float32, as the cached logits are, whatever precision the student trains in
            with torch.no_grad(), torch.autocast(xb.device.type, enabled=False):
                return teacher(xb).float()
        return live

    # ------------------------------------------------------------ to a Ray worker and back

    def bundle(self, section: dict | None, augment: bool) -> dict:
        """The teacher as values: its files, how it was opened, its logits."""
        path = Path(self.source)
        files = RunDir(path).model_files() if self.kind == "run" else {path.name: path.read_bytes()}
        return {"files": files, "name": path.name or "teacher", "kind": self.kind, "section": section,
                "augment": augment, "source": self.source, "file": self.file,
                "logits": {k: self.logits[k] for k in ("train", "test") if k in self.logits}}

    @classmethod
    def from_bundle(cls, bundle: dict, data, root: Path) -> "Teacher":
        """The teacher rebuilt from its `bundle` under ``root``, named as where it came from."""
        path = root / BUNDLE_FOLDER / bundle["name"]
        folder = path if bundle["kind"] == "run" else path.parent
        for name, blob in bundle["files"].items():
            atomic_write_bytes(folder / name, blob)
        teacher = cls.open(path, data, bundle["section"], augment=bundle["augment"])
        teacher.source, teacher.file = bundle["source"], bundle["file"]
        teacher.logits.update(bundle["logits"])
        return teacher
