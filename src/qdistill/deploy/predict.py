"""``qdistill predict``: run an exported ``.qdz`` model on a dataset's test split, on one
image file or on a folder of them, with the torch-free engine."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from .. import deploy
from ..errors import DataError

BATCH = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CSV_HEADER = ("path", "index", "name", "probability")  # the same keys as predict --json


def predict_dataset(qdz_path: str | Path, data_section: dict) -> dict:
    """Accuracy of the model at ``qdz_path`` on the test split of the dataset that the
    ``[data]`` config section names: ``{"accuracy", "correct", "total", "dataset",
    "model", "backend"}``. Images are scaled as in training, ``x / 255``."""
    from ..data.registry import load  # the loaders hold torch tensors; the engine stays torch-free

    engine = deploy.load(qdz_path)
    ds = load(data_section)
    if list(ds.class_names) != list(engine.class_names):
        raise DataError(f"the model's classes {list(engine.class_names)} are not the {ds.name} dataset's "
                        f"{list(ds.class_names)}: give the data the model was trained on")
    x, y = ds.x_test.numpy(), ds.y_test.numpy()
    correct = 0
    for s in range(0, len(y), BATCH):
        images = x[s:s + BATCH].astype(np.float32) / np.float32(255)
        correct += int((engine.classify(images) == y[s:s + BATCH]).sum())
    return {"accuracy": correct / len(y), "correct": correct, "total": int(len(y)),
            "dataset": ds.name, "model": str(qdz_path), "backend": engine.backend}


def load_image(image_path: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, ... via Pillow) as float32 ``(1, 3, 32, 32)`` in [0, 1]:
    converted to RGB, resized to 32x32 (bilinear) when it is another size."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'qdistill[deploy]'") from None
    path = Path(image_path)
    if not path.is_file():
        raise DataError(f"image not found: {path}" if not path.exists() else f"not an image file: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return (pixels.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255))


def predict_image(qdz_path: str | Path, image_path: str | Path) -> tuple[dict, np.ndarray]:
    """One image file: ``{"index", "name", "probability"}`` of its top class, and every
    class's probability, the softmax of the logits in float64."""
    engine = deploy.load(qdz_path)
    logits = engine.predict(load_image(image_path))[0]
    return _top(engine, logits), _softmax(logits)


def _top(engine, logits: np.ndarray) -> dict:
    p = _softmax(logits)
    k = int(p.argmax())
    return {"index": k, "name": engine.class_names[k] if k < len(engine.class_names) else str(k),
            "probability": float(p[k])}


def _softmax(logits: np.ndarray) -> np.ndarray:
    """``p_i = exp(l_i - max l) / sum_j exp(l_j - max l)`` of one image's logits, in float64."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return p


def image_files(folder: str | Path) -> tuple[list[Path], int]:
    """The image files under ``folder``, recursively: by suffix (PNG, JPEG, BMP, WebP, any
    case), hidden files and folders skipped, links to folders not followed; sorted by their
    path components relative to ``folder``, so the order is the same on every machine.
    Also how many other (not hidden) files were left out."""
    folder = Path(folder)
    found, others = [], 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        visible = [f for f in files if not f.startswith(".")]
        images = [f for f in visible if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        found += [Path(root, f) for f in images]
        others += len(visible) - len(images)
    return sorted(found, key=lambda p: p.relative_to(folder).parts), others


def predict_folder(qdz_path: str | Path, folder: str | Path, skip_bad_images: bool = False) -> tuple[list[dict], int]:
    """One row per image under ``folder`` (`image_files`): ``{"path", "index", "name",
    "probability"}``, the path relative to ``folder`` with ``/``, as `predict_image`
    computes them; and how many non-image files were left out. Images go through the
    engine ``BATCH`` at a time; in a batch the last linear layer's float32 sums may be
    rounded in another order than for one image alone (BLAS), so a probability may differ
    from `predict_image`'s by that rounding. An unreadable image stops it (`DataError`
    naming the file), or with ``skip_bad_images`` gets a row of its own with an
    ``error`` and no prediction (every row then has ``error``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    engine = deploy.load(qdz_path)
    paths, others = image_files(folder)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    rows = []
    for s in range(0, len(paths), BATCH):
        chunk, images, errors = paths[s:s + BATCH], [], {}
        for p in chunk:
            try:
                images.append(load_image(p))
            except DataError as e:
                if not skip_bad_images:
                    raise DataError(f"{e}; fix or remove it, or give --skip-bad-images to list it in the CSV and "
                                    "go on") from None
                errors[p] = str(e)
        logits = iter(engine.predict(np.concatenate(images)) if images else [])
        for p in chunk:
            row = {"path": p.relative_to(folder).as_posix()}
            row.update({"index": "", "name": "", "probability": "", "error": errors[p]} if p in errors else
                       {**_top(engine, next(logits)), **({"error": ""} if skip_bad_images else {})})
            rows.append(row)
    return rows, others


def predictions_csv(rows: list[dict]) -> str:
    """`predict_folder`'s rows as CSV text: header ``path,index,name,probability`` (and
    ``error`` when bad images were skipped), the probability written in full (``repr``:
    it reads back as the same float64)."""
    header = CSV_HEADER + (("error",) if rows and "error" in rows[0] else ())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([row[key] for key in header] for row in rows)
    return buf.getvalue()
