"""Your own images in class folders: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``.

* **Classes** are the sorted names of the folders in ``ROOT/train`` (torchvision's
  ``ImageFolder`` convention): class ``i`` is the i-th name, in train and in test alike.
  The two splits must hold the same class folders, none of them empty.
* **Images** are the files under a class folder (subfolders too) ending in `EXTENSIONS`
  (any case), decoded by Pillow (an optional dependency, ``pip install 'qdistill[deploy]'``),
  converted to RGB (alpha dropped, grey and palettes expanded) and resized to 32x32 with
  `qdistill.data.images.resize_to_uint8` (bilinear, antialiased when shrinking), so a
  32x32 image arrives unchanged. Other files, and any name starting with ``.``, are ignored.
* **Order**: round-robin over the classes (the first image of each class, then the
  second, ...; within a class by sorted path), so the first N of a split (``max_train``,
  ``max_test``) cover the classes evenly, as digits' do.

The decoded arrays are cached in ``ROOT/.qdistill-imagefolder.npz`` (uint8, written
atomically and only after every image decoded), so a second load reads one file. The
cache key is a sha256 over each image's relative path, size and ``mtime_ns`` (plus the
cache version and the 32x32 size), not over the images' bytes: listing and ``stat``-ing
50,000 files takes a fraction of a second where hashing their contents means reading
them all on every load. Any added, removed, renamed, rewritten or touched file changes the
key; a replacement with the same size *and* the same mtime (``cp -p``, ``rsync -t`` of
another file) would not, so delete the cache file after such a copy. A read-only ROOT
still loads, decoding on every load.

An unreadable image is a `DataError` naming it, unless ``skip_bad_images``: then it is
left out and counted (`Dataset.skipped`, ``skipped_images`` in a run's summary.json).
The cache remembers which files were unreadable, so it serves both settings.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write, atomic_write_text
from ..errors import DataError, WriteError
from .dataset import Dataset, tensor_digest
from .images import SIZE, resize_to_uint8

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "test")
CACHE_NAME = ".qdistill-imagefolder.npz"
SKIPPED_NAME = ".qdistill-imagefolder-skipped.txt"
CACHE_VERSION = 1
PILLOW_HINT = "pip install 'qdistill[deploy]' (or pip install pillow)"
DESCRIPTION = ("your own images (--data-dir ROOT): ROOT/train/<class>/*.png|jpg|bmp|webp and ROOT/test/<class>/*, "
               "resized to 32x32, cached after the first load")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _visible(name: str) -> bool:
    return not name.startswith(".")


def class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the (non-hidden) folders in ``split_dir``."""
    try:
        return sorted(e.name for e in os.scandir(split_dir) if _visible(e.name) and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot list {split_dir}: {e.strerror or e}") from None


def image_files(class_dir: Path) -> list[str]:
    """The images under ``class_dir`` (subfolders too, symlinks followed once), as sorted
    POSIX paths relative to it."""
    out, seen = [], set()
    for top, dirs, files in os.walk(class_dir, followlinks=True,
                                    onerror=lambda e: _raise(f"cannot list {e.filename}: {e.strerror}")):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if _visible(d)]
        rel = Path(top).relative_to(class_dir)
        out += [(rel / f).as_posix() for f in files if _visible(f) and f.lower().endswith(EXTENSIONS)]
    return sorted(out)


def _raise(message: str):
    raise DataError(message)


def scan(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(class names, {split: [(path relative to ROOT, label), ...] in load order}), after
    every check on the folder layout."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found (expected {root}/train/<class>/ and {root}/test/<class>/)")
    split_classes = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root} has no {split}/ folder; an image folder holds "
                            f"{root}/train/<class>/* and {root}/test/<class>/*")
        split_classes[split] = class_folders(d)
        if not split_classes[split]:
            raise DataError(f"{d} holds no class folders, so no images at all; put each class's images "
                            f"in {d}/<class>/")
    train, test = split_classes["train"], split_classes["test"]
    if train != test:
        only = [f"only in {s}: {', '.join(sorted(set(a) - set(b)))}"
                for s, a, b in (("train", train, test), ("test", test, train)) if set(a) - set(b)]
        raise DataError(f"the class folders of {root}/train and {root}/test differ ({'; '.join(only)})")
    if len(train) < 2:
        raise DataError(f"{root}/train has a single class folder ({train[0]}); a classifier needs at least 2")
    files = {}
    for split in SPLITS:
        per_class = []
        for label, name in enumerate(train):
            found = image_files(root / split / name)
            if not found:
                raise DataError(f"class folder {root / split / name} holds no images ({', '.join(EXTENSIONS)})")
            per_class.append([(f"{split}/{name}/{f}", label) for f in found])
        # round-robin: rank within the class first, then the class
        order = sorted((rank, label) for label, fs in enumerate(per_class) for rank in range(len(fs)))
        files[split] = [per_class[label][rank] for rank, label in order]
    return train, files


def cache_key(root: Path, files: dict[str, list[tuple[str, int]]]) -> str:
    """sha256 over the cache version, the image size and each image's (relative path,
    label, size, mtime_ns) in load order."""
    h = hashlib.sha256(f"qdistill-imagefolder-v{CACHE_VERSION}|{SIZE}\n".encode())
    for split in SPLITS:
        for rel, label in files[split]:
            try:
                st = os.stat(root / rel)
            except OSError as e:
                raise DataError(f"cannot read {root / rel}: {e.strerror or e}") from None
            h.update(json.dumps([rel, label, st.st_size, st.st_mtime_ns]).encode() + b"\n")
    return h.hexdigest()


def decode(path: Path) -> np.ndarray:
    """One image file as uint8 ``(3, 32, 32)``: RGB, resized by `resize_to_uint8`. Raises
    whatever Pillow raises for a file it cannot read."""
    from PIL import Image

    with Image.open(path) as img:
        chw = np.array(img.convert("RGB")).transpose(2, 0, 1)
    if chw.shape[1:] == (SIZE, SIZE):
        return chw  # what resize_to_uint8 returns for it, without a torch call
    return resize_to_uint8(torch.from_numpy(np.ascontiguousarray(chw))[None].float())[0].numpy()


@contextlib.contextmanager
def _one_torch_thread():
    """Per-image resizes are tiny tensor ops: on a busy machine waking torch's intra-op
    threads for each costs milliseconds (measured 6 ms against 1 us on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise DataError(f"dataset imagefolder decodes images with Pillow, which is not installed: {PILLOW_HINT}") \
            from None


def _bad_line(root: Path, rel: str, reason: str) -> str:
    return (f"{root / rel}: not a readable image ({reason}); fix or remove it, or skip such files with "
            f"--set data.skip_bad_images=true")


def _decode_split(root: Path, split: str, files: list[tuple[str, int]], skip: bool,
                  bad: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(files), 3, SIZE, SIZE), np.uint8)
    y = np.empty(len(files), np.int64)
    n = 0
    for rel, label in tqdm(files, desc=f"decoding {root.name}/{split}", unit="img", disable=None, leave=False):
        try:
            x[n] = decode(root / rel)
        except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...)
            if not skip:
                raise DataError(_bad_line(root, rel, _one_line(e))) from None
            bad.append([rel, _one_line(e)])
            continue
        y[n] = label
        n += 1
    return x[:n].copy() if n < len(files) else x, y[:n]


def _check_classes_left(root: Path, classes: list[str], arrays: dict, bad: list[list[str]]) -> None:
    """With skipping, a class may lose every image of a split: name its folder."""
    for split in SPLITS:
        present = set(np.unique(arrays[f"y_{split}"]).tolist())
        for label, name in enumerate(classes):
            if label not in present:
                first = next(r for r, _ in bad if r.startswith(f"{split}/{name}/"))
                raise DataError(f"class folder {root / split / name}: none of its images is readable "
                                f"(first: {root / first})")


def _read_cache(path: Path, key: str) -> tuple[dict, dict] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if not (isinstance(meta, dict) and meta.get("version") == CACHE_VERSION and meta.get("key") == key):
                return None
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception:  # missing, damaged (zip CRC) or foreign: rebuilt, never trusted
        return None
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, SIZE, SIZE) \
                or y.dtype != np.int64 or y.shape != (x.shape[0],):
            return None
    return meta, arrays


def _write_cache(path: Path, meta: dict, arrays: dict) -> None:
    try:
        atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
    except (OSError, WriteError) as e:  # a read-only image folder still loads, only slower
        warnings.warn(f"cannot write the image cache {path} ({e}); the images are decoded on every load")


def skipped_list(root: str | Path) -> Path:
    """Where `load` lists the images ``skip_bad_images`` left out: one ``path: reason`` a line."""
    return Path(root).expanduser() / SKIPPED_NAME


def load(root: str | Path, *, skip_bad_images: bool = False) -> Dataset:
    """The image folder ``root`` as a `Dataset` named ``imagefolder``, from the cache when
    its key (see the module docstring) matches, else decoded and cached."""
    root = Path(root).expanduser()
    classes, files = scan(root)
    key = cache_key(root, files)
    cache = root / CACHE_NAME
    cached = _read_cache(cache, key)
    if cached is not None:
        meta, arrays = cached
        bad = meta.get("bad", [])
    else:
        _require_pillow()
        bad = []  # [relative path, reason] of each unreadable image
        arrays = {}
        with _one_torch_thread():
            for split in SPLITS:
                arrays[f"x_{split}"], arrays[f"y_{split}"] = _decode_split(root, split, files[split],
                                                                           skip_bad_images, bad)
        if bad:
            _check_classes_left(root, classes, arrays, bad)
        digests = {k: tensor_digest(torch.from_numpy(v)) for k, v in arrays.items()}
        meta = {"version": CACHE_VERSION, "key": key, "classes": classes, "bad": bad, "digests": digests}
        _write_cache(cache, meta, arrays)
    if bad and not skip_bad_images:
        rel, reason = bad[0]
        raise DataError(_bad_line(root, rel, reason))
    if bad:  # the list the command's one line points to
        try:
            atomic_write_text(skipped_list(root), "".join(f"{rel}: {reason}\n" for rel, reason in bad))
        except WriteError:
            pass  # a read-only image folder: the line says the count
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return Dataset.from_tensors("imagefolder", **tensors, class_names=classes,
                                digests=meta.get("digests"), skipped=len(bad))
