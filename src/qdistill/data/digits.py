"""scikit-learn's bundled 8x8 handwritten digits (1797 images), as 32x32x3: real data offline.

Pixels 0..16 are scaled to 0..255, upsampled 8 -> 32 (bilinear), repeated to 3 channels.
The 80/20 train/test split is fixed and stratified: within each class a permutation from
``torch.Generator().manual_seed(SPLIT_SEED)`` sends ``round(0.2 * n_class)`` images to test
(1438 train / 359 test). Both splits keep the images' original order, which cycles through
the classes, so the first N of either split (``max_train``) stay nearly balanced.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset, tensor_digest
from .images import resize_to_uint8

SPLIT_SEED = 0
TEST_FRACTION = 0.2
SIZES = {"train": 1438, "test": 359}  # the split of the 1797 images below
DESCRIPTION = "scikit-learn's bundled 8x8 handwritten digits upsampled to 32x32x3, fixed stratified 80/20 split (offline)"


def split_indices(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, test_idx), sorted int64: the fixed stratified split described above."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = []
    for c in torch.unique(labels).tolist():  # ascending, so the draws are reproducible
        members = torch.nonzero(labels == c).flatten()
        k = round(TEST_FRACTION * len(members))
        test.append(members[torch.randperm(len(members), generator=g)[:k]])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def _bundled() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float64, labels)`` as ``sklearn.datasets.load_digits`` gives
    them. Read straight from the CSV file scikit-learn ships, found without importing
    scikit-learn (``sklearn.datasets`` takes about a second to import, a cost every run on
    digits would pay); `load_digits` itself where that file is not in its usual place."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits
        d = load_digits()
        return d.images, d.target
    data = np.loadtxt(csv, delimiter=",")  # 64 pixels and the label per row, as load_digits reads it
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load() -> Dataset:
    """The split, decoded once per process (`_decoded`); each call gets its own copies."""
    splits, digests = _decoded()
    return Dataset.from_tensors("digits", *(t.clone() for t in splits), [str(i) for i in range(10)],
                                digests=digests)


@functools.lru_cache(maxsize=1)
def _decoded() -> tuple[tuple[torch.Tensor, ...], dict[str, str]]:
    """``(x_train, y_train, x_test, y_test)`` and their digests: 60 ms of reading, resizing
    and hashing that a process running several commands (a test session) pays once."""
    images, labels = _bundled()
    grey = torch.from_numpy(images).to(torch.float32)[:, None] * (255.0 / 16.0)
    x = resize_to_uint8(grey).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(labels).to(torch.int64)
    tr, te = split_indices(y)
    splits = (x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous())
    keys = ("x_train", "y_train", "x_test", "y_test")
    return splits, {k: tensor_digest(t) for k, t in zip(keys, splits)}
