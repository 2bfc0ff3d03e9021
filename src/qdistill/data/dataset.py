"""The in-memory dataset every loader returns, and its fingerprint.

Images are uint8 ``(N, 3, 32, 32)`` (channel-first, contiguous, CPU), labels int64 ``(N,)``
in ``0..K-1``. Keeping uint8 costs a quarter of float32 memory, so the whole set fits on
the device as one tensor; batches are scaled to [0, 1] on the fly.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from ..errors import DataError

TENSORS = ("x_train", "y_train", "x_test", "y_test")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's dtype, shape and raw bytes (hex)."""
    t = t.contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def concat_digest(digests: list[str]) -> str:
    """Digest of a concatenation, from its parts' digests: svhn + extra (1.9 GB) then needs
    no second pass over the bytes. A concatenation therefore hashes differently from the
    same bytes loaded whole, which only costs a cache miss."""
    return hashlib.sha256(("concat|" + "|".join(digests)).encode()).hexdigest()


def fingerprint(digests: dict[str, str], class_names: list[str]) -> str:
    """sha256 over the four tensors' digests (in `TENSORS` order) and the class names:
    equal data gives an equal key for caches (teacher logits), any changed byte another."""
    h = hashlib.sha256(b"qdistill-data-v1\n")
    for name in TENSORS:
        h.update(f"{name}={digests[name]}\n".encode())
    h.update(json.dumps(list(class_names)).encode())
    return h.hexdigest()


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor = field(repr=False)   # uint8 (N, 3, 32, 32)
    y_train: torch.Tensor = field(repr=False)   # int64 (N,)
    x_test: torch.Tensor = field(repr=False)    # uint8 (M, 3, 32, 32)
    y_test: torch.Tensor = field(repr=False)    # int64 (M,)
    class_names: list[str]
    fingerprint: str
    # the per-tensor sha256 the fingerprint is made of, kept so a subset re-hashes only
    # the tensors it changes
    digests: dict = field(default_factory=dict, repr=False, compare=False)
    # unreadable images a loader left out (imagefolder with data.skip_bad_images)
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_tensors(cls, name: str, x_train, y_train, x_test, y_test, class_names,
                     digests: dict | None = None, skipped: int = 0) -> "Dataset":
        """Check the layout, then fingerprint. ``digests`` may hold precomputed
        `tensor_digest` values (a loader's cache) for some of the four tensors."""
        tensors = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        k = len(class_names)
        for split in ("train", "test"):
            x, y = tensors[f"x_{split}"], tensors[f"y_{split}"]
            # a wrong layout here is a loader bug, not user input
            if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
                raise ValueError(f"x_{split} must be uint8 (N, 3, 32, 32), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
            if x.device.type != "cpu" or not x.is_contiguous() or not y.is_contiguous():
                raise ValueError(f"x_{split} and y_{split} must be contiguous CPU tensors")
            if x.shape[0] == 0:
                raise DataError(f"dataset {name}: the {split} split is empty")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise DataError(f"dataset {name}: {split} labels span {lo}..{hi}, outside 0..{k - 1}")
        digests = dict(digests or {})
        for key, t in tensors.items():
            if key not in digests:
                digests[key] = tensor_digest(t)
        names = [str(c) for c in class_names]
        return cls(name, x_train, y_train, x_test, y_test, names, fingerprint(digests, names), digests, skipped)


def limit(ds: Dataset, max_train: int = 0, max_test: int = 0) -> Dataset:
    """Keep the first ``max_train`` train and ``max_test`` test images (0: all)."""
    kept, changed = dict(ds.digests), False
    tensors = dict(x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    for split, n in (("train", max_train), ("test", max_test)):
        if 0 < n < tensors[f"y_{split}"].shape[0]:
            for key in (f"x_{split}", f"y_{split}"):
                # clone, so the subset does not pin the full set's memory
                tensors[key] = tensors[key][:n].clone()
                kept.pop(key, None)
            changed = True
    if not changed:
        return ds
    return Dataset.from_tensors(ds.name, **tensors, class_names=ds.class_names, digests=kept, skipped=ds.skipped)
