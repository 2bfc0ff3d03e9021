"""The dataset registry: one `Record` per dataset (its loader, sizes, classes, default
folder and what it needs), in the spirit of timm's model registry; `load` the dataset a
``[data]`` config section names, `describe` them all for ``qdistill datasets``.

"No folder given" is ``None`` here: `given_dir` reads it off a config section, and each
record's ``default_dir`` (or its refusal, where it has none) takes over."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import DEFAULTS
from ..errors import DataError
from . import DATASETS, cifar, digits, fake, imagefolder, npz, svhn
from .dataset import Dataset, limit

# The data_dir that configs hold where the user gave none: the schema's default (SVHN's
# folder), also in the stored config of every run so far. `given_dir` alone reads it.
UNSET_DIR = "~/.cache/qdistill/svhn"


@dataclass(frozen=True)
class Record:
    """One dataset. ``load(section, folder)`` gives its `Dataset` (``folder``: the one
    given, else ``default_dir``, else ``None``); ``sizes``: its fixed splits (``None``: the
    user's own data); ``needs``: the key it cannot do without and the line refusing it
    missing; ``present(folder)``: which of its files lie there."""
    description: str
    load: Callable[[dict, str | None], Dataset]
    sizes: dict | None = None
    classes: int | None = None
    default_dir: str | None = None
    needs: tuple[str, str] | None = None
    present: Callable[[str], dict] | None = None


def _svhn(data: dict, folder: str) -> Dataset:
    return svhn.load(folder, extra=bool(data["extra"]), verify=bool(data["verify"]))


def _imagefolder(data: dict, folder: str) -> Dataset:
    return imagefolder.load(folder, skip_bad_images=bool(data["skip_bad_images"]))


def _cifar(name: str, data: dict, folder: str) -> Dataset:
    return cifar.load(name, folder, verify=bool(data["verify"]))


RECORDS: dict[str, Record] = {
    "svhn": Record(svhn.DESCRIPTION, _svhn, svhn.SIZES, 10, svhn.DEFAULT_DIR, present=svhn.present),
    "digits": Record(digits.DESCRIPTION, lambda data, folder: digits.load(), digits.SIZES, 10),
    "npz": Record(npz.DESCRIPTION, lambda data, folder: npz.load(data["data_path"]),
                  needs=("data_path", "dataset npz needs data_path (--data-path FILE.npz)")),
    "fake": Record(fake.DESCRIPTION, lambda data, folder: fake.load(), {"train": fake.N_TRAIN, "test": fake.N_TEST},
                   fake.NUM_CLASSES),
    "imagefolder": Record(imagefolder.DESCRIPTION, _imagefolder, needs=(
        "data_dir", "dataset imagefolder needs data_dir (--data-dir ROOT, holding ROOT/train/<class>/ and "
                    "ROOT/test/<class>/)")),
    **{name: Record(cifar.DESCRIPTION[name], functools.partial(_cifar, name), cifar.SIZES, spec.classes,
                    spec.default_dir, present=functools.partial(cifar.present, name))
       for name, spec in cifar.SPECS.items()},
}


def record(data: dict) -> Record:
    """The record of the dataset the ``[data]`` section names; `DataError` for no such one."""
    name = data.get("dataset", DEFAULTS["data"]["dataset"])
    if name not in RECORDS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return RECORDS[name]


def given_dir(data: dict) -> str | None:
    """The folder the ``[data]`` section gives, or ``None`` where it gives none (no
    ``data_dir``, an empty one, or `UNSET_DIR`)."""
    d = data.get("data_dir")
    if not d or Path(d).expanduser() == Path(UNSET_DIR).expanduser():
        return None
    return str(d)


def load(data: dict) -> Dataset:
    """The dataset that the ``[data]`` config section names (keys ``dataset``,
    ``data_dir``, ``data_path``, ``extra``, ``verify``, ``skip_bad_images``, ``max_train``,
    ``max_test``; absent keys take the schema's defaults). ``max_train``/``max_test`` > 0 keep the
    first N images of each split. No ``data_dir`` given (`given_dir`) means the dataset's
    own folder (``~/.cache/qdistill/svhn``, ``.../cifar10``, ``.../cifar100``), and is an
    error for imagefolder. Raises `DataError` on missing or malformed data."""
    data = {**DEFAULTS["data"], **data}
    rec = record(data)
    folder = given_dir(data) or rec.default_dir
    if rec.needs and not {"data_dir": folder, "data_path": data["data_path"]}[rec.needs[0]]:
        raise DataError(rec.needs[1])
    return limit(rec.load(data, folder), int(data["max_train"]), int(data["max_test"]))


def train_size(data: dict) -> int | None:
    """How many images the training split (validation included) of the ``[data]`` section
    holds, known without its files for the fixed datasets; ``None`` for the user's own."""
    data = {**DEFAULTS["data"], **data}
    sizes = record(data).sizes
    if sizes is None:
        return None
    n = sizes["train"] + (sizes.get("extra", 0) if data["extra"] else 0)
    return min(n, data["max_train"] or n)


def num_classes(data: dict) -> int | None:
    """The classes of the ``[data]`` section's dataset, known without its files for the
    fixed datasets; ``None`` for the user's own."""
    return record(data).classes


def describe(data_dir: str | Path | None = None) -> list[dict]:
    """One dict per dataset for ``qdistill datasets``: name, description, train/test sizes
    where fixed (svhn: and extra); those with a folder add it (``data_dir``, or their own
    where none is given) and which files are present (svhn: and converted)."""
    out = []
    for name, rec in RECORDS.items():
        d = {"name": name, "description": rec.description, **(rec.sizes or {"train": None, "test": None})}
        if rec.present:
            folder = given_dir({"data_dir": data_dir}) or rec.default_dir
            d.update(data_dir=str(Path(folder).expanduser()), **rec.present(folder))
        out.append(d)
    return out
