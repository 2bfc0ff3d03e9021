"""Datasets, validation split, batching and augmentation.

Every dataset arrives as a `Dataset` of uint8 ``(N, 3, 32, 32)`` images and int64 labels
held in memory; `batches` slices them and scales to [0, 1] on the fly.

* ``svhn``   official format-2 .mat files in ``data_dir`` (downloaded when missing)
* ``digits`` scikit-learn's bundled 8x8 digits at 32x32x3 (offline)
* ``npz``    the user's ``data_path`` .npz
* ``fake``   random images with SVHN's sizes, for benchmarks
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from . import digits, fake, npz, svhn
from .augment import augment_light
from .batching import batches, split_val, to_float
from .dataset import Dataset, limit

__all__ = ["Dataset", "load", "describe", "split_val", "to_float", "batches", "augment_light", "NAMES"]

NAMES = ("svhn", "digits", "npz", "fake")


def load(data: dict) -> Dataset:
    """The dataset that the ``[data]`` config section names (keys ``dataset``,
    ``data_dir``, ``data_path``, ``extra``, ``verify``, ``max_train``, ``max_test``;
    absent keys take their defaults). ``max_train``/``max_test`` > 0 keep the first N
    images of each split. Raises `DataError` on missing or malformed data."""
    name = data.get("dataset", "digits")
    if name == "svhn":
        ds = svhn.load(data.get("data_dir") or svhn.DEFAULT_DIR, extra=bool(data.get("extra", False)),
                       verify=bool(data.get("verify", True)))
    elif name == "digits":
        ds = digits.load()
    elif name == "npz":
        if not data.get("data_path"):
            raise DataError("dataset npz needs data_path (--data-path FILE.npz)")
        ds = npz.load(data["data_path"])
    elif name == "fake":
        ds = fake.load()
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    return limit(ds, int(data.get("max_train", 0)), int(data.get("max_test", 0)))


def describe(data_dir: str | Path | None = None) -> list[dict]:
    """One dict per dataset for ``qdistill datasets``: name, description, train/test sizes
    where fixed; svhn adds its data_dir and which files are present and converted."""
    svhn_dir = Path(data_dir or svhn.DEFAULT_DIR).expanduser()
    return [
        {"name": "svhn", "description": svhn.DESCRIPTION, "train": svhn.SIZES["train"],
         "test": svhn.SIZES["test"], "extra": svhn.SIZES["extra"], "data_dir": str(svhn_dir),
         **svhn.present(svhn_dir)},
        {"name": "digits", "description": digits.DESCRIPTION, "train": 1438, "test": 359},
        {"name": "npz", "description": npz.DESCRIPTION, "train": None, "test": None},
        {"name": "fake", "description": fake.DESCRIPTION, "train": fake.N_TRAIN, "test": fake.N_TEST},
    ]
