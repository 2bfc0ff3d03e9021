"""A run directory, the unit every command exchanges: its layout, the rules for
starting, resuming and overwriting it, and its torch-free readers and writers.

Layout of ``RUN/``:

* ``config.toml``   the fully resolved config (``[run] role`` says teacher or student)
* ``metrics.jsonl`` one JSON object per finished epoch
* ``checkpoint.pt`` everything exact resume needs (`qdistill.training.checkpoint`)
* ``best.pt``       the best-validation weights, ``{"model": state_dict, "meta": meta}``
* ``summary.json``  written last: its presence means the run finished
* ``error.txt``     why the run failed, when a study recorded a failure
* ``events.out.tfevents.*``  with ``train.tensorboard``: the metrics as TensorBoard scalars (`scalars`)

A run trained in a fused group has the same files, so ``eval``, ``report`` and
``export`` cannot tell it from one trained alone. Every write is atomic. This module
imports no torch, so the report reads runs through it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import config as configlib
from ..atomic import atomic_write_text
from ..errors import RunError

CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY, ERROR = (
    "config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json", "error.txt")
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY)


def prepare(out: str | Path, cfg: dict, *, resume: bool, force: bool) -> bool:
    """Check ``out`` before a run trains into it; return whether to resume from its
    checkpoint. A finished run is never overwritten without ``force`` (which deletes its
    files); ``resume`` needs the same config. Writes nothing else: `start` does, once
    the run's set-up has succeeded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"output path {out} exists and is not a directory")
    finished, started = (out / SUMMARY).exists(), (out / CHECKPOINT).exists()
    text = configlib.run_text(cfg)
    if force:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    elif resume and finished:
        raise RunError(f"run {out} already finished; use --force to train it again")
    elif resume and started:
        stored = (out / CONFIG).read_text() if (out / CONFIG).exists() else ""
        if stored != text:
            raise RunError(f"run {out} was started with a different config; use --force to start over")
        return True
    elif not resume and (finished or started):
        what = "a finished run" if finished else "an unfinished run (use --resume to continue it)"
        raise RunError(f"{out} already holds {what}; use --force to overwrite")
    return False


def start(out: str | Path, cfg: dict, *, member: bool = False) -> None:
    """Create ``out`` and write its ``config.toml``. A member of a fused group keeps its
    place in the group's checkpoint, so its own checkpoint, summary and error are stale;
    its ``best.pt`` and ``metrics.jsonl`` stay (a resumed group rewrites them)."""
    out = Path(out)
    if member:
        for name in (CHECKPOINT, SUMMARY, ERROR):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG, configlib.run_text(cfg))


def write_metrics(out: str | Path, metrics: list[dict]) -> None:
    atomic_write_text(Path(out) / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))


def write_summary(out: str | Path, summary: dict) -> None:
    atomic_write_text(Path(out) / SUMMARY, json.dumps(summary, indent=2) + "\n")


def write_error(out: str | Path, error: BaseException, detail: str = "") -> None:
    """Record why a run failed: ``error.txt``'s first line is ``Type: message``."""
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / ERROR, f"{type(error).__name__}: {error}\n{detail}")


def read_config(run: str | Path) -> dict:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise RunError(f"{run} is not a qdistill run (no config.toml)")
    return configlib.read_toml(path)


def read_json(path: str | Path) -> dict | None:
    """A JSON file's object, ``None`` when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON: {e}") from None


def read_summary(run: str | Path) -> dict | None:
    """``summary.json`` of a run, ``None`` while it has not finished."""
    return read_json(Path(run) / SUMMARY)


def read_metrics(run: str | Path) -> list[dict]:
    """The epochs of ``metrics.jsonl`` (none when the run has not finished one)."""
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON lines: {e}") from None


def read_error(run: str | Path) -> str | None:
    """The first line of ``error.txt``, ``None`` without one."""
    path = Path(run) / ERROR
    return path.read_text().splitlines()[0] if path.is_file() else None
