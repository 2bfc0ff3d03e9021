"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5``
(train, 10,000 images each), ``test_batch`` and ``batches.meta``;
``cifar-100-python.tar.gz`` holds ``cifar-100-python/train``, ``test`` and ``meta``. Each
is a Python 2 pickle of a dict with bytes keys: ``b"data"`` uint8 ``(N, 3072)``, one row an
image in CHW order (1024 red, then green, then blue; each 32 rows of 32), so
``x = data.reshape(N, 3, 32, 32)``; the labels ``b"labels"`` (cifar10) or
``b"fine_labels"`` (cifar100, 100 classes; the 20 coarse labels are not used); the class
names in the meta file's ``b"label_names"`` / ``b"fine_label_names"``.

Missing archives are downloaded from `BASE_URL` (resumable, md5-checked, like SVHN's
files) to ``data_dir``, by default ``~/.cache/qdistill/cifar10`` or ``.../cifar100``. With
``verify`` (the default) an archive already there must have the official md5. The
archive is read in one pass without extracting it (the images stay in memory only).

Pickles can run code, so they are read by `_Unpickler`, which builds only numpy arrays
(``_reconstruct``, ``_frombuffer``, ``ndarray``, ``dtype``) and bytes, and refuses any other object: a
foreign archive (accepted with ``--no-verify``) gets a `DataError`, not a code path.
``encoding="bytes"`` is what the format requires: Python 2 ``str`` values (keys, names,
the arrays' raw data) arrive as ``bytes``.
"""
from __future__ import annotations

import codecs
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset
from .download import fetch, md5_file

BASE_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class Spec:
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels: bytes
    names: bytes
    classes: int
    default_dir: str


SPECS = {
    "cifar10": Spec("cifar-10-python.tar.gz", "cifar-10-batches-py",
                    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                    b"labels", b"label_names", 10, "~/.cache/qdistill/cifar10"),
    "cifar100": Spec("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta",
                     b"fine_labels", b"fine_label_names", 100, "~/.cache/qdistill/cifar100"),
}
MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}
SIZES = {"train": 50_000, "test": 10_000}
DESCRIPTION = {
    "cifar10": "CIFAR-10, the official python archive (50,000 train, 10,000 test, 10 classes), downloaded when missing",
    "cifar100": ("CIFAR-100, the official python archive (50,000 train, 10,000 test, 100 fine classes), "
                 "downloaded when missing"),
}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _reconstruct():
    try:  # numpy 2 renamed numpy.core (the name the official pickles use) to numpy._core
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:
        from numpy.core.numeric import _frombuffer
    return _frombuffer


class _Unpickler(pickle.Unpickler):
    """Builds only what the CIFAR pickles hold: dicts, lists, numbers, bytes, numpy arrays.
    The names are resolved here, never imported from the pickle's text."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # a numpy-2 re-pickle
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,        # arrays at pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,  # bytes as Python 3 pickles them at protocol 2
    }

    def find_class(self, module, name):
        get = self.ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR format")
        return get()


def _read_members(path: Path, spec: Spec) -> dict[str, dict]:
    """{member name: its unpickled dict} for the members ``spec`` needs, in one pass over
    the gzip stream (a tar.gz cannot seek back without decompressing again)."""
    wanted = {f"{spec.folder}/{m}": m for m in (*spec.train, spec.test, spec.meta)}
    out = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for info in tar:
                name = wanted.get(info.name.removeprefix("./"))
                if name is None or not info.isfile():
                    continue
                f = tar.extractfile(info)
                try:
                    obj = _Unpickler(f, encoding="bytes").load()
                except (tarfile.TarError, EOFError, zlib.error, OSError):
                    raise  # the archive itself, reported below
                except Exception as e:  # a pickle error of any kind
                    raise DataError(f"{path}: {info.name} is not a CIFAR batch ({_one_line(e)})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: {info.name} holds a {type(obj).__name__}, not a CIFAR batch dict")
                out[name] = obj
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is not a readable tar.gz archive (truncated or corrupt?): {_one_line(e)}") from None
    missing = [f"{spec.folder}/{m}" for m in wanted.values() if m not in out]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; is it the official {spec.archive}?")
    return out


def _batch(batch: dict, spec: Spec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, 3, 32, 32), y int64 (N,)) of one unpickled batch."""
    data, labels = batch.get(b"data"), batch.get(spec.labels)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: b'data' must be uint8 of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    y = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    if y is None or y.dtype.kind not in "iu" or y.shape != (len(data),):
        raise DataError(f"{where}: {spec.labels!r} must be {len(data)} integer labels, got "
                        f"{type(labels).__name__} {getattr(y, 'dtype', '')} {getattr(y, 'shape', '')}")
    if len(y) and (y.min() < 0 or y.max() >= spec.classes):
        raise DataError(f"{where}: labels span {y.min()}..{y.max()}, outside 0..{spec.classes - 1}")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _class_names(meta: dict, spec: Spec, where: str) -> list[str]:
    names = meta.get(spec.names)
    if not isinstance(names, list) or len(names) != spec.classes or not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{where}: {spec.names!r} must list {spec.classes} class names")
    return [n.decode("utf-8", "replace") for n in names]


def read_archive(path: Path, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(x_train, y_train, x_test, y_test, class names) of an archive in the official
    layout; x uint8 ``(N, 3, 32, 32)``, y int64."""
    members = _read_members(path, spec)
    train = [_batch(members[m], spec, f"{path}: {spec.folder}/{m}") for m in spec.train]
    x_test, y_test = _batch(members[spec.test], spec, f"{path}: {spec.folder}/{spec.test}")
    names = _class_names(members[spec.meta], spec, f"{path}: {spec.folder}/{spec.meta}")
    x_train = np.concatenate([x for x, _ in train]) if len(train) > 1 else train[0][0]
    y_train = np.concatenate([y for _, y in train])
    return np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test, names


def archive_path(name: str, data_dir: str | Path | None = None) -> Path:
    spec = SPECS[name]
    return Path(data_dir or spec.default_dir).expanduser() / spec.archive


def load(name: str, data_dir: str | Path | None = None, *, verify: bool = True,
         base_url: str = BASE_URL) -> Dataset:
    """``cifar10`` or ``cifar100`` from ``data_dir`` (default: the spec's folder),
    downloading the archive when missing. ``verify=False`` skips the md5 check of an
    archive already present, accepting any archive in the same layout."""
    spec = SPECS[name]
    path = archive_path(name, data_dir)
    expected = MD5[spec.archive]
    if not path.is_file():
        fetch(base_url.rstrip("/") + "/" + spec.archive, path, expected)
    elif verify:
        got = md5_file(path)
        if got != expected:
            raise DataError(f"{path}: md5 {got} differs from the official {spec.archive}'s {expected}: the file is "
                            f"truncated, corrupt or not the official one; delete it to download it again, "
                            f"or pass --no-verify to use it as it is")
    x_train, y_train, x_test, y_test, names = read_archive(path, spec)
    return Dataset.from_tensors(name, torch.from_numpy(x_train), torch.from_numpy(y_train),
                                torch.from_numpy(x_test), torch.from_numpy(y_test), names)


def present(name: str, data_dir: str | Path | None = None) -> dict:
    """Whether the archive lies in ``data_dir`` (``qdistill datasets``)."""
    path = archive_path(name, data_dir)
    return {"files": {path.name: path.is_file()}, "cached": {}}
