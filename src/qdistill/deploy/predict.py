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
CSV_HEADER = ("path", "label", "class", "confidence")


def predict_dataset(qdz_path: str | Path, data_section: dict) -> dict:
    """Accuracy of the model at ``qdz_path`` on the test split of the dataset that the
    ``[data]`` config section names: ``{"accuracy", "correct", "total", "dataset",
    "model", "backend"}``. Images are scaled as in training, ``x / 255``."""
    from ..data.registry import load  # the loaders hold torch tensors; the engine stays torch-free

    engine = deploy.load(qdz_path)
    ds = load(data_section)
    if ds.num_classes != len(engine.class_names):
        raise DataError(f"dataset {ds.name} has {ds.num_classes} classes, the model "
                        f"{len(engine.class_names)}")
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
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return (pixels.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255))


def predict_image(qdz_path: str | Path, image_path: str | Path) -> tuple[str, np.ndarray]:
    """``(label_name, probabilities)`` of one image file: softmax of the logits, float64."""
    engine = deploy.load(qdz_path)
    p = _softmax(engine.predict(load_image(image_path))[0])
    return _class_name(engine, int(p.argmax())), p


def _softmax(logits: np.ndarray) -> np.ndarray:
    """``p_i = exp(l_i - max l) / sum_j exp(l_j - max l)`` of one image's logits, in float64."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return p


def _class_name(engine, k: int) -> str:
    return engine.class_names[k] if k < len(engine.class_names) else str(k)


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder``, recursively: by suffix (PNG, JPEG, BMP, WebP, any
    case), hidden files and folders skipped, links to folders not followed; sorted by their
    path components relative to ``folder``, so the order is the same on every machine."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def predict_folder(qdz_path: str | Path, folder: str | Path) -> list[dict]:
    """One row per image under ``folder`` (`image_files`): ``{"path", "label", "class",
    "confidence"}``, the path relative to ``folder`` with ``/``, the class index and name,
    and the probability of that class as `predict_image` computes it. Images go through
    the engine ``BATCH`` at a time; in a batch the last linear layer's float32 sums may
    be rounded in another order than for one image alone (BLAS), so a confidence may differ
    from `predict_image`'s by that rounding. Any unreadable image stops it (`DataError`
    naming the file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    engine = deploy.load(qdz_path)
    paths = image_files(folder)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    rows = []
    for s in range(0, len(paths), BATCH):
        chunk = paths[s:s + BATCH]
        for path, logits in zip(chunk, engine.predict(np.concatenate([load_image(p) for p in chunk]))):
            p = _softmax(logits)
            k = int(p.argmax())
            rows.append({"path": path.relative_to(folder).as_posix(), "label": k,
                         "class": _class_name(engine, k), "confidence": float(p[k])})
    return rows


def predictions_csv(rows: list[dict]) -> str:
    """`predict_folder`'s rows as CSV text: header ``path,label,class,confidence``, the
    confidence written in full (``repr``: it reads back as the same float64)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows([row[key] for key in CSV_HEADER] for row in rows)
    return buf.getvalue()
