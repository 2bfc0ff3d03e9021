"""SVHN format 2 (cropped 32x32 digits) from the official ``.mat`` files.

A file holds ``X``: uint8 ``(32, 32, 3, N)`` (height, width, channel, image) and ``y``:
``(N, 1)`` labels 1..10, where 10 means the digit 0. Missing files are downloaded from
`BASE_URL` (resumable, md5-checked). Each file is converted once into a cache next to it:

* ``NAME.x.npy``  uint8 ``(N, 3, 32, 32)``, ``x[i, c, h, w] = X[h, w, c, i]``
* ``NAME.y.npy``  int64 ``(N,)``, 10 mapped to 0
* ``NAME.cache.json``  the ``.mat``'s size and mtime, its md5 once verified, the arrays'
  sha256; written last, so its presence means the two arrays are complete

A ``.mat`` whose size or mtime changed is converted again. With ``verify`` the md5 is
computed once per file version and remembered in the json, so later loads read the two
``.npy`` files only.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_text
from ..errors import DataError, WriteError
from .dataset import Dataset, concat_digest, tensor_digest
from .download import fetch, md5_file

BASE_URL = "http://ufldl.stanford.edu/housenumbers/"
DEFAULT_DIR = "~/.cache/qdistill/svhn"
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
MD5 = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
}
SIZES = {"train": 73_257, "test": 26_032, "extra": 531_131}
CACHE_VERSION = 1
DESCRIPTION = ("Street View House Numbers, official format-2 .mat files (73,257 train, 26,032 test, "
               "531,131 extra), downloaded when missing")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def cache_paths(mat: Path) -> tuple[Path, Path, Path]:
    """(x .npy, y .npy, meta .json) next to ``mat``."""
    stem = mat.name[:-4] if mat.name.endswith(".mat") else mat.name
    return (mat.with_name(f"{stem}.x.npy"), mat.with_name(f"{stem}.y.npy"),
            mat.with_name(f"{stem}.cache.json"))


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images as uint8 ``(N, 3, 32, 32)`` and the labels as int64 ``(N,)`` in 0..9."""
    import scipy.io  # imported here: only svhn needs it

    try:
        m = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # scipy raises many kinds for a truncated or foreign file
        raise DataError(f"{path} is not a readable .mat file (truncated or corrupt?): {_one_line(e)}") from None
    missing = [k for k in ("X", "y") if k not in m]
    if missing:
        raise DataError(f"{path} lacks the variable(s) {', '.join(missing)}; an SVHN format-2 .mat "
                        f"holds X (32x32x3xN uint8) and y (Nx1 labels)")
    X, y = m["X"], m["y"]
    if not isinstance(X, np.ndarray) or X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X must be uint8 of shape (32, 32, 3, N), got "
                        f"{getattr(X, 'dtype', type(X).__name__)} {getattr(X, 'shape', '')}")
    n = X.shape[3]
    if n == 0:
        raise DataError(f"{path} holds no images")
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iuf" or y.size != n or max(y.shape) != n:
        raise DataError(f"{path}: y must hold {n} numeric labels (shape ({n}, 1)), got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
    y = y.reshape(-1)
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"{path}: y holds non-integer labels")
    if y.min() < 0 or y.max() > 10:
        raise DataError(f"{path}: labels span {y.min():g}..{y.max():g}, outside SVHN's 1..10 (10 = digit 0)")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    # (h, w, c, i) -> (i, c, h, w)
    return np.ascontiguousarray(X.transpose(3, 2, 0, 1)), labels


def _stat_key(mat: Path) -> dict:
    st = mat.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(meta, dict) and meta.get("version") == CACHE_VERSION
          and all(k in meta for k in ("mat", "n", "x_sha256", "y_sha256")))
    return meta if ok else None


def _read_cache(x_path: Path, y_path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        x = np.load(x_path, allow_pickle=False)
        y = np.load(y_path, allow_pickle=False)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    if x.dtype != np.uint8 or x.shape != (n, 3, 32, 32) or y.dtype != np.int64 or y.shape != (n,):
        return None
    return x, y


def _write_cache(mat: Path, x: np.ndarray, y: np.ndarray, meta: dict) -> None:
    x_path, y_path, meta_path = cache_paths(mat)
    try:
        # the json goes first and comes back last: arrays without it are never trusted
        meta_path.unlink(missing_ok=True)
        # streamed through the temp file, not built in memory first (extra is 1.6 GB)
        atomic_write(x_path, lambda f: np.save(f, x, allow_pickle=False))
        atomic_write(y_path, lambda f: np.save(f, y, allow_pickle=False))
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    except (OSError, WriteError) as e:  # a read-only data folder still loads, only slower
        warnings.warn(f"cannot write the SVHN cache next to {mat} ({e}); the .mat is read on every load")


def _write_cache_meta(path: Path, meta: dict) -> None:
    try:
        atomic_write_text(path, json.dumps(meta, indent=1) + "\n")
    except (OSError, WriteError):  # the md5 is computed again next time, nothing worse
        pass


def load_split(data_dir: Path, split: str, *, verify: bool = True,
               base_url: str = BASE_URL) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x uint8 (N, 3, 32, 32), y int64 (N,), {"x": sha256, "y": sha256}) of one split file,
    downloading it when missing and converting it when the cache is stale."""
    mat = Path(data_dir) / FILES[split]
    expected = MD5[mat.name]
    md5 = None  # the md5 of the .mat when known to be the official one
    if not mat.is_file():
        fetch(base_url.rstrip("/") + "/" + mat.name, mat, expected)
        md5 = expected
    x_path, y_path, meta_path = cache_paths(mat)
    key = _stat_key(mat)
    meta = _read_meta(meta_path)
    fresh = meta is not None and meta.get("mat") == key
    if fresh and meta.get("md5") == expected:
        md5 = expected
    if verify and md5 is None:
        got = md5_file(mat)
        if got != expected:
            raise DataError(f"{mat}: md5 {got} differs from the official {mat.name}'s {expected}: the file is "
                            f"truncated, corrupt or not the official one; delete it to download it again, "
                            f"or pass --no-verify to use it as it is")
        md5 = got
    if fresh:
        cached = _read_cache(x_path, y_path, meta["n"])
        if cached is not None:
            if md5 is not None and meta.get("md5") != md5:
                _write_cache_meta(meta_path, {**meta, "md5": md5})
            x, y = cached
            return torch.from_numpy(x), torch.from_numpy(y), {"x": meta["x_sha256"], "y": meta["y_sha256"]}
    x, y = read_mat(mat)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    digests = {"x": tensor_digest(tx), "y": tensor_digest(ty)}
    _write_cache(mat, x, y, {"version": CACHE_VERSION, "mat": key, "md5": md5, "n": len(y),
                             "x_sha256": digests["x"], "y_sha256": digests["y"]})
    return tx, ty, digests


def load(data_dir: str | Path = DEFAULT_DIR, *, extra: bool = False, verify: bool = True,
         base_url: str = BASE_URL) -> Dataset:
    """train (+ extra when ``extra``) and test. ``verify=False`` skips the md5 check of
    files already present, accepting any .mat in the same layout."""
    data_dir = Path(data_dir).expanduser()
    xtr, ytr, dtr = load_split(data_dir, "train", verify=verify, base_url=base_url)
    xte, yte, dte = load_split(data_dir, "test", verify=verify, base_url=base_url)
    digests = {"x_train": dtr["x"], "y_train": dtr["y"], "x_test": dte["x"], "y_test": dte["y"]}
    if extra:
        xex, yex, dex = load_split(data_dir, "extra", verify=verify, base_url=base_url)
        xtr, ytr = torch.cat([xtr, xex]), torch.cat([ytr, yex])
        digests["x_train"] = concat_digest([dtr["x"], dex["x"]])
        digests["y_train"] = concat_digest([dtr["y"], dex["y"]])
    return Dataset.from_tensors("svhn", xtr, ytr, xte, yte, [str(i) for i in range(10)], digests=digests)


def present(data_dir: str | Path = DEFAULT_DIR) -> dict:
    """Which official files lie in ``data_dir`` and which have a cache."""
    data_dir = Path(data_dir).expanduser()
    return {
        "files": {name: (data_dir / name).is_file() for name in FILES.values()},
        "cached": {name: cache_paths(data_dir / name)[2].is_file() for name in FILES.values()},
    }
