"""scikit-learn's bundled 8x8 handwritten digits (1797 images), as 32x32x3: real data offline.

Pixels 0..16 are scaled to 0..255, upsampled 8 -> 32 (bilinear), repeated to 3 channels.
The 80/20 train/test split is fixed and stratified: within each class a permutation from
``torch.Generator().manual_seed(SPLIT_SEED)`` sends ``round(0.2 * n_class)`` images to test
(1438 train / 359 test). Both splits keep the images' original order, which cycles through
the classes, so the first N of either split (``max_train``) stay nearly balanced.
"""
from __future__ import annotations

import torch

from .dataset import Dataset
from .images import resize_to_uint8

SPLIT_SEED = 0
TEST_FRACTION = 0.2
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


def load() -> Dataset:
    from sklearn.datasets import load_digits  # imported here: sklearn takes a second to import

    d = load_digits()
    grey = torch.from_numpy(d.images).to(torch.float32)[:, None] * (255.0 / 16.0)
    x = resize_to_uint8(grey).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).to(torch.int64)
    tr, te = split_indices(y)
    return Dataset.from_tensors("digits", x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(),
                                y[te].contiguous(), [str(i) for i in range(10)])
