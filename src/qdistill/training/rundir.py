"""`RunDir`: one run's folder, the unit every command exchanges. It owns the layout, the
rules for starting, resuming and overwriting a run, and the torch-free readers and
writers of its files; no other module spells a file name of it.

Layout of ``RUN/``:

* ``config.toml``   the fully resolved config (``[run] role`` says teacher or student)
* ``metrics.jsonl`` one JSON object per finished epoch
* ``checkpoint.pt`` everything exact resume needs (`qdistill.training.checkpoint`)
* ``best.pt``       the best-validation weights, ``{"model": state_dict, "meta": meta}``
* ``test_logits.npy`` the best-validation model's float32 logits on the test split, in order
* ``summary.json``  written last: its presence means the run finished
* ``error.txt``     why the run failed, when a study recorded a failure
* ``events.out.tfevents.*``  with ``train.tensorboard``: the metrics as TensorBoard scalars (`scalars`)

A fused group's folder (``STUDY/groups/s<seed>/``) is a `RunDir` that holds only the
group's ``checkpoint.pt``; its members' folders hold the same files as a run trained
alone, so ``eval``, ``report`` and ``export`` cannot tell them apart.

A run trained on another machine comes back as its files (`files`) and is written as a
whole (`replace`: a staging folder, then a rename). Every write is atomic. This module
imports no torch, so the report reads runs through it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config as configlib
from ..atomic import atomic_write, atomic_write_bytes, atomic_write_text
from ..errors import RunError

CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY, ERROR, TEST_LOGITS = (
    "config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json", "error.txt", "test_logits.npy")
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, TEST_LOGITS, SUMMARY)
# what to do with a run already in the folder (`RunDir.prepare`): --resume, --extend, --force
EXISTING = ("new", "resume", "extend", "force")
# The order a run's files are written in, so a kill between two writes leaves files that
# agree (the loop writes best.pt, event files, checkpoint.pt, then metrics.jsonl; at the
# end test_logits.npy, then summary.json).
_ORDER = {CONFIG: 0, BEST: 1, CHECKPOINT: 3, METRICS: 4, TEST_LOGITS: 5, SUMMARY: 6, ERROR: 7}


def read_json(path: str | Path) -> dict | None:
    """A JSON file's object, ``None`` when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON: {e}") from None


def write_order(name: str) -> int:
    """Where a file of a run goes in the order its files are written (others: between)."""
    return _ORDER.get(Path(name).name, 2)


@dataclass(frozen=True)
class RunDir:
    """The folder of one run (or of a fused group's checkpoint)."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # a path wherever one is taken
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST

    def weights(self, which: str = "best") -> Path:
        """``best.pt``, or ``checkpoint.pt`` for ``which="last"``; a `RunError` saying so
        where the run has its config but no finished epoch (killed before its first)."""
        path = self.best if which == "best" else self.checkpoint
        if not path.is_file() and (self.path / CONFIG).is_file() and not self.started:
            raise RunError(f"run {self.path} has not finished an epoch (no {path.name}): train it on with --resume")
        return path

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY).exists()

    @property
    def started(self) -> bool:
        return (self.path / CHECKPOINT).exists()

    # ------------------------------------------------------------ the rules

    def prepare(self, cfg: dict, existing: str = "new") -> bool:
        """Check the folder before a run trains into it; return whether to resume from its
        checkpoint. ``existing`` says what to do with a run already there (`EXISTING`):
        ``new`` refuses it, ``force`` deletes its files, ``resume`` continues a started
        run of the same config, ``extend`` continues a started or finished run to more
        epochs (`_extend`). A refusal names up to 3 keys that differ. Writes nothing but
        those deletions: `start` does, once the run's set-up has succeeded."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"output path {self.path} exists and is not a directory")
        if existing == "force":
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            return False
        if not (self.finished or self.started):
            return False
        stored = self.read_config() if (self.path / CONFIG).is_file() else {}
        diff = configlib.differences(stored, configlib.tomllib.loads(configlib.run_text(cfg)))
        differs = f" with another config ({'; '.join(diff)})" if diff else ""
        if existing == "new":
            what = "a finished run" if self.finished else "an unfinished run"
            hint = "" if self.finished or diff else " (use --resume to continue it)"
            raise RunError(f"{self.path} already holds {what}{differs}{hint}; use --force to overwrite")
        if existing == "extend":
            return self._extend(cfg, stored, diff)
        if self.finished:
            more = all(d.startswith("train.epochs:") for d in diff)  # only the epochs: --extend may do it
            raise RunError(f"run {self.path} already finished{differs}; "
                           + ("use --force to train it again, or --extend with a larger --epochs to train it on"
                              if more else "give another --out to keep it, or --force to replace it"))
        if diff:
            raise RunError(f"run {self.path} was started with another config ({'; '.join(diff)}): resume with "
                           f"the same settings (--resume alone takes the run's own), or --force to start over")
        return True

    def _extend(self, cfg: dict, stored: dict, diff: list[str]) -> bool:
        """A run trained on to more epochs is the run it would have been only if every
        epoch it trained keeps its learning rate (`schedule.extends_exactly`)."""
        from .schedule import extends_exactly
        other = [d for d in diff if not d.startswith("train.epochs:")]
        if other or not self.started:
            raise RunError(f"--extend trains run {self.path} on to more epochs and changes nothing else"
                           + (f", but these differ: {'; '.join(other)}" if other else ", but it has no checkpoint"))
        old, new, schedule = stored["train"]["epochs"], cfg["train"]["epochs"], cfg["train"]["schedule"]
        done = len(self.read_metrics())
        if not extends_exactly(done, old, new, schedule, cfg["train"]["warmup"]):
            raise RunError(f"run {self.path} cannot go from {old} to {new} epochs as if it had been started so: "
                           + ("give a larger --epochs" if new <= old else f"the {schedule} schedule's rates for its "
                              f"{done} epochs depend on the number of epochs (they are set by the fraction of the run done)")
                           + f"; train a new run with --epochs {new}")
        for name in (SUMMARY, TEST_LOGITS):
            (self.path / name).unlink(missing_ok=True)
        return True

    def group_resumes(self, members: list[tuple[str, str]]) -> bool:
        """A fused group resumes from its checkpoint when that holds the same members
        (name, config text), in order; otherwise it starts over."""
        if not self.started:
            return False
        from .checkpoint import load  # torch: only for a group that has a checkpoint
        return [(m["name"], m["config"]) for m in load(self.checkpoint)["members"]] == members

    def start(self, cfg: dict, *, member: bool = False) -> None:
        """Create the folder and write its ``config.toml``. A member of a fused group
        keeps its place in the group's checkpoint, so its own checkpoint, summary and
        error are stale; its ``best.pt`` and ``metrics.jsonl`` stay (a resumed group
        rewrites them)."""
        if member:
            for name in (CHECKPOINT, TEST_LOGITS, SUMMARY, ERROR):
                (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, configlib.run_text(cfg))

    # ------------------------------------------------------------ writers

    def write_metrics(self, metrics: list[dict]) -> None:
        atomic_write_text(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))

    def write_test_logits(self, logits: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(logits, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(self.path / TEST_LOGITS, buf.getvalue())

    def read_test_logits(self) -> np.ndarray | None:
        """``test_logits.npy`` as float32 (N, classes), ``None`` without one."""
        path = self.path / TEST_LOGITS
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read {path}: {e}") from None

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def write_error(self, error: BaseException | str, detail: str = "") -> None:
        """Record why a run failed: ``error.txt``'s first line is ``Type: message``
        (``error`` itself when it is that line already)."""
        self.path.mkdir(parents=True, exist_ok=True)
        line = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        atomic_write_text(self.path / ERROR, f"{line}\n{detail}")

    def clear_error(self) -> None:
        (self.path / ERROR).unlink(missing_ok=True)

    # ------------------------------------------------------------ readers

    def read_config(self) -> dict:
        if not (self.path / CONFIG).is_file():
            raise RunError(f"{self.path} is not a qdistill run (no {CONFIG})")
        return configlib.read_toml(self.path / CONFIG)

    def stored_config_text(self) -> str:
        path = self.path / CONFIG
        return path.read_text() if path.exists() else ""

    def read_summary(self) -> dict | None:
        """``summary.json``, ``None`` while the run has not finished."""
        return read_json(self.path / SUMMARY)

    def read_metrics(self) -> list[dict]:
        """The epochs of ``metrics.jsonl`` (none when the run has not finished one)."""
        path = self.path / METRICS
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path} is not valid JSON lines: {e}") from None

    def read_error(self) -> str | None:
        """The first line of ``error.txt``, ``None`` without one."""
        path = self.path / ERROR
        return path.read_text().splitlines()[0] if path.is_file() else None

    def require_finished(self, what: str = "run") -> None:
        if not self.path.is_dir():
            raise RunError(f"{what} not found: {self.path}")
        if not self.finished:
            raise RunError(f"{what} {self.path} has not finished (no {SUMMARY})")

    # ------------------------------------------------------------ a run as bytes

    def files(self, *, resumable: bool = False) -> dict[str, bytes]:
        """The folder's files (no subfolders, no hidden files such as the lock) by name;
        ``resumable``: only what a resumed run needs (no summary, no error)."""
        if not self.path.is_dir():
            return {}
        skip = (SUMMARY, ERROR) if resumable else ()
        return {p.name: p.read_bytes() for p in sorted(self.path.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name not in skip}

    def model_files(self) -> dict[str, bytes]:
        """What opening the run's model elsewhere needs: its config, best weights and summary."""
        return {name: (self.path / name).read_bytes() for name in (CONFIG, BEST, SUMMARY)}

    def keep_only(self, names) -> None:
        """Remove the files not in ``names`` (an epoch that came back from a Ray task
        without them: a group's member drops its old summary)."""
        for name in self.files():
            if name not in names:
                (self.path / name).unlink(missing_ok=True)

    def with_summary(self, files: dict[str, bytes], **extra) -> dict[str, bytes]:
        """``files`` with ``extra`` keys added to their ``summary.json``, if it has one."""
        if SUMMARY not in files:
            return files
        summary = {**json.loads(files[SUMMARY]), **extra}
        return {**files, SUMMARY: (json.dumps(summary, indent=2) + "\n").encode()}

    def replace(self, files: dict[str, bytes]) -> None:
        """Make the folder hold exactly ``files``: written into ``.NAME.staging`` beside
        it, then renamed into place (the old folder is renamed ``.NAME.old`` first and
        removed after). `recover` undoes what a kill between the two renames leaves."""
        dest = self.path
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
    """Finish or undo the `RunDir.replace` calls a killed process left under ``parent``:
    a staging folder is dropped; an old folder whose new one is missing is put back."""
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
