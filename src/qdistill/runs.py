"""A run directory, the unit every command exchanges, and atomic file writes.

Layout of ``RUN/``:

* ``config.toml``   the fully resolved config (``[run] role`` says teacher or student)
* ``metrics.jsonl`` one JSON object per finished epoch
* ``checkpoint.pt`` model, optimizer, scheduler, RNG states, epoch (written every epoch)
* ``best.pt``       the best-validation weights
* ``summary.json``  written last: its presence means the run finished

``best.pt`` and ``checkpoint.pt`` hold ``{"model": state_dict, "meta": meta}`` where
``meta`` (`model_meta`) says how to rebuild the model: ``build(meta["arch"], **meta["build"])``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import config as configlib
from .errors import RunError
from .models import build


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a reader never sees a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def model_meta(cfg: dict, num_classes: int, class_names: list[str]) -> dict:
    """How to rebuild the model of a run with ``config`` (its role picks the section)."""
    if cfg["run"]["role"] == "teacher":
        arch, kwargs = cfg["teacher"]["model"], {}
    else:
        s = cfg["student"]
        arch = s["model"]
        kwargs = {k: s[k] for k in ("weight_bits", "act_bits", "grad_bits", "scheme", "quantize_first_last")}
    kwargs.update(num_classes=num_classes, in_channels=3)
    return {"arch": arch, "build": kwargs, "class_names": list(class_names),
            "role": cfg["run"]["role"]}


def build_from_meta(meta: dict) -> torch.nn.Module:
    return build(meta["arch"], **meta["build"])


def read_config(run: str | Path) -> dict:
    path = Path(run) / "config.toml"
    if not path.is_file():
        raise RunError(f"{run} is not a qdistill run (no config.toml)")
    return configlib.read_toml(path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise RunError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def load_model(run: str | Path, which: str = "best") -> tuple[torch.nn.Module, dict]:
    """The model of a run in eval mode, with the weights of ``best.pt`` or ``checkpoint.pt``
    (``which="last"``), and its meta."""
    if which not in ("best", "last"):
        raise RunError(f"checkpoint must be best or last, got {which!r}")
    ckpt = load_checkpoint(Path(run) / ("best.pt" if which == "best" else "checkpoint.pt"))
    model = build_from_meta(ckpt["meta"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["meta"]


def read_summary(run: str | Path) -> dict | None:
    path = Path(run) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
