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
from pathlib import Path

import torch

from . import config as configlib
from .atomic import atomic_write
from .errors import RunError
from .models import build


def atomic_torch_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


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


def load_teacher(run: str | Path, data) -> torch.nn.Module:
    """The eval-mode teacher of a finished run, checked against ``data``'s classes."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"teacher run not found: {run}")
    if read_summary(run) is None:
        raise RunError(f"teacher run {run} has not finished (no summary.json)")
    model, meta = load_model(run, "best")
    if meta["build"]["num_classes"] != data.num_classes or meta["class_names"] != list(data.class_names):
        raise RunError(f"teacher {run} was trained on {meta['build']['num_classes']} classes "
                       f"{meta['class_names']}, but the data has {data.num_classes} {list(data.class_names)}")
    return model
