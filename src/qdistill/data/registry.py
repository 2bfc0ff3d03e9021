"""The dataset registry: `load` the dataset a ``[data]`` config section names, and
`describe` them all for ``qdistill datasets``."""
from __future__ import annotations

from pathlib import Path

from ..config import DEFAULTS
from ..errors import DataError
from . import DATASETS, cifar, digits, fake, imagefolder, npz, svhn
from .dataset import Dataset, limit


def load(data: dict) -> Dataset:
    """The dataset that the ``[data]`` config section names (keys ``dataset``,
    ``data_dir``, ``data_path``, ``extra``, ``verify``, ``skip_bad_images``, ``max_train``,
    ``max_test``; absent keys take the schema's defaults). ``max_train``/``max_test`` > 0 keep the
    first N images of each split. ``data_dir`` left at its default (SVHN's folder) means
    ``~/.cache/qdistill/cifar10`` (``cifar100``) for CIFAR, and is an error for
    imagefolder. Raises `DataError` on missing or malformed data."""
    data = {**DEFAULTS["data"], **data}
    name = data["dataset"]
    if name == "svhn":
        ds = svhn.load(data["data_dir"] or svhn.DEFAULT_DIR, extra=bool(data["extra"]), verify=bool(data["verify"]))
    elif name == "digits":
        ds = digits.load()
    elif name == "npz":
        if not data["data_path"]:
            raise DataError("dataset npz needs data_path (--data-path FILE.npz)")
        ds = npz.load(data["data_path"])
    elif name == "fake":
        ds = fake.load()
    elif name == "imagefolder":
        root = _own_dir(data)
        if root is None:
            raise DataError("dataset imagefolder needs data_dir (--data-dir ROOT, holding ROOT/train/<class>/ "
                            "and ROOT/test/<class>/)")
        ds = imagefolder.load(root, skip_bad_images=bool(data["skip_bad_images"]))
    elif name in cifar.SPECS:
        ds = cifar.load(name, _own_dir(data), verify=bool(data["verify"]))
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return limit(ds, int(data["max_train"]), int(data["max_test"]))


def train_size(data: dict) -> int | None:
    """How many images the training split (validation included) of the ``[data]`` section
    holds, known without its files for the fixed datasets; ``None`` for the user's own."""
    data = {**DEFAULTS["data"], **data}
    sizes = {"svhn": svhn.SIZES["train"] + (svhn.SIZES["extra"] if data["extra"] else 0), "digits": 1438,
             "fake": fake.N_TRAIN, **{name: cifar.SIZES["train"] for name in cifar.SPECS}}
    n = sizes.get(data["dataset"])
    return None if n is None else min(n, data["max_train"] or n)


def num_classes(data: dict) -> int | None:
    """The classes of the ``[data]`` section's dataset, known without its files for the
    fixed datasets; ``None`` for the user's own."""
    classes = {"svhn": 10, "digits": 10, "fake": 10, **{name: spec.classes for name, spec in cifar.SPECS.items()}}
    return classes.get(data["dataset"])


def _own_dir(data: dict) -> str | None:
    """``data_dir`` unless it is left empty or at its default, SVHN's folder."""
    d = data.get("data_dir")
    if not d or Path(d).expanduser() == Path(svhn.DEFAULT_DIR).expanduser():
        return None
    return d


def describe(data_dir: str | Path | None = None) -> list[dict]:
    """One dict per dataset for ``qdistill datasets``: name, description, train/test sizes
    where fixed; svhn and cifar add their data_dir and which files are present (svhn: and
    converted)."""
    svhn_dir = Path(data_dir or svhn.DEFAULT_DIR).expanduser()
    own = _own_dir({"data_dir": data_dir})
    return [
        {"name": "svhn", "description": svhn.DESCRIPTION, "train": svhn.SIZES["train"],
         "test": svhn.SIZES["test"], "extra": svhn.SIZES["extra"], "data_dir": str(svhn_dir),
         **svhn.present(svhn_dir)},
        {"name": "digits", "description": digits.DESCRIPTION, "train": 1438, "test": 359},
        {"name": "npz", "description": npz.DESCRIPTION, "train": None, "test": None},
        {"name": "fake", "description": fake.DESCRIPTION, "train": fake.N_TRAIN, "test": fake.N_TEST},
        {"name": "imagefolder", "description": imagefolder.DESCRIPTION, "train": None, "test": None},
        *({"name": n, "description": cifar.DESCRIPTION[n], **cifar.SIZES,
           "data_dir": str(cifar.archive_path(n, own).parent), **cifar.present(n, own)} for n in cifar.SPECS),
    ]
