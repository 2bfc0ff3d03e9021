"""``qdistill predict``: run an exported ``.qdz`` model on a dataset's test split or on one
image file, with the torch-free engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import deploy
from ..errors import DataError

BATCH = 256


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
    logits = engine.predict(load_image(image_path))[0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    name = engine.class_names[k] if k < len(engine.class_names) else str(k)
    return name, p
