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

A run trained on another machine comes back as its files (`read_files`) and is written
as a whole (`replace`: a staging folder, then a rename).

A run trained in a fused group has the same files, so ``eval``, ``report`` and
``export`` cannot tell it from one trained alone. Every write is atomic. This module
imports no torch, so the report reads runs through it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import config as configlib
from ..atomic import atomic_write, atomic_write_text
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


def write_error(out: str | Path, error: BaseException | str, detail: str = "") -> None:
    """Record why a run failed: ``error.txt``'s first line is ``Type: message`` (``error``
    itself when it is that line already)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    line = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    atomic_write_text(Path(out) / ERROR, f"{line}\n{detail}")


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


# ---------------------------------------------------------------- a run directory as bytes

# The order a run directory's files are written in, so a kill between two writes leaves
# files that agree (`loop.py`: best.pt, event files, checkpoint.pt, then metrics.jsonl).
_ORDER = {CONFIG: 0, BEST: 1, CHECKPOINT: 3, METRICS: 4, SUMMARY: 5, ERROR: 6}


def write_order(name: str) -> int:
    return _ORDER.get(Path(name).name, 2)


def read_files(folder: str | Path) -> dict[str, bytes]:
    """The files of ``folder`` (no subfolders, no hidden files such as the lock) by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def replace(dest: str | Path, files: dict[str, bytes]) -> None:
    """Make ``dest`` hold exactly ``files``: written into ``.NAME.staging`` beside it,
    then renamed into place (the old folder is renamed ``.NAME.old`` first and removed
    after). `recover` undoes what a kill between the two renames leaves."""
    dest = Path(dest)
    stage, old = dest.parent / f".{dest.name}.staging", dest.parent / f".{dest.name}.old"
    shutil.rmtree(stage, ignore_errors=True)
    for name in sorted(files, key=write_order):
        atomic_write(stage / name, lambda f, data=files[name]: f.write(data))
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(stage, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover(parent: str | Path) -> None:
    """Finish or undo the `replace` calls a killed process left under ``parent``: a
    staging folder is dropped; an old folder whose new one is missing is put back."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in parent.glob(".*.staging"):
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(".*.old"):
        dest = parent / p.name[1:-len(".old")]
        if dest.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, dest)
