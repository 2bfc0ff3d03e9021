"""The user's own data: one ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

Images: uint8 ``(N, H, W)`` or ``(N, H, W, C)`` with C in {1, 3}; resized to 32x32
(bilinear) when needed, grey repeated to 3 channels. Labels: integers ``0..K-1`` with
``K = max label + 1`` over train and test. An optional ``class_names`` array of K strings
names the classes (default ``"0"..."K-1"``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset
from .images import to_rgb32

def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


KEYS = ("x_train", "y_train", "x_test", "y_test")
DESCRIPTION = "your own FILE.npz (--data-path) with x_train, y_train, x_test, y_test; uint8 images, integer labels 0..K-1"


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not magic.startswith(b"PK") and magic != b"\x93NUMPY":  # numpy would read anything else as a pickle
        raise DataError(f"{path} is not a valid .npz file (not a zip archive of .npy arrays)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises many kinds for a file that is no npy/npz
        raise DataError(f"{path} is not a valid .npz file ({_one_line(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive with {', '.join(KEYS)}")
    with archive:
        missing = [k for k in KEYS if k not in archive.files]
        if missing:
            raise DataError(f"{path} lacks the array(s) {', '.join(missing)}; it holds: "
                            f"{', '.join(archive.files) or 'nothing'}")
        out = {}
        for key in KEYS + (("class_names",) if "class_names" in archive.files else ()):
            try:
                out[key] = archive[key]
            except Exception as e:  # a damaged member, or an object array (pickles refused)
                raise DataError(f"{path}: cannot read array {key} ({_one_line(e)})") from None
    return out


def _check_images(key: str, x: np.ndarray, path: Path) -> None:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        hint = ("; it looks channel-first, expected channel-last N x H x W x C"
                if x.ndim == 4 and x.shape[1] in (1, 3) else "")
        raise DataError(f"{path}: {key} must be N x H x W or N x H x W x C with C 1 or 3, "
                        f"got shape {x.shape}{hint}")
    if x.size == 0:
        raise DataError(f"{path}: {key} is empty (shape {x.shape})")


def _check_labels(key: str, y: np.ndarray, n: int, xkey: str, path: Path) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must hold integer labels, got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: {key} must have shape (N,), got {y.shape}")
    if len(y) != n:
        raise DataError(f"{path}: {xkey} has {n} images but {key} has {len(y)} labels")
    if y.min() < 0:
        raise DataError(f"{path}: {key} has negative labels (min {y.min()}); labels must be 0..K-1")
    return y.astype(np.int64)


def load(path: str | Path) -> Dataset:
    path = Path(path).expanduser()
    a = _read(path)
    ys = {}
    for split in ("train", "test"):
        xk, yk = f"x_{split}", f"y_{split}"
        _check_images(xk, a[xk], path)
        ys[split] = _check_labels(yk, a[yk], a[xk].shape[0], xk, path)
    k = int(max(ys["train"].max(), ys["test"].max())) + 1
    if k < 2:
        raise DataError(f"{path}: the labels name a single class; a classifier needs at least 2")
    names = [str(i) for i in range(k)]
    if "class_names" in a:
        cn = a["class_names"]
        if cn.ndim != 1 or len(cn) != k or cn.dtype.kind not in "US":
            raise DataError(f"{path}: class_names must be {k} strings (one per class 0..{k - 1}), "
                            f"got dtype {cn.dtype} shape {cn.shape}")
        names = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in cn.tolist()]
    return Dataset.from_tensors(
        "npz", to_rgb32(a["x_train"]), torch.from_numpy(ys["train"]),
        to_rgb32(a["x_test"]), torch.from_numpy(ys["test"]), names)
