"""One unit of a study's work as a Ray task: the teacher, one run, or one fused group,
trained in a scratch folder on whichever node Ray picks.

A worker shares no filesystem with the driver. It gets everything as values: the unit
(configs and the run directories' paths inside the study), the files of those folders
as the driver last saw them (so a retry resumes from the last epoch that came back),
the dataset, and the teacher (its files and logits cache). It trains with the one loop
(`training/loop.py: train`) in a background thread and yields, as a Ray streaming
generator, one message after every epoch and one at the end:

* ``("epoch", files, node)``: every file of the unit's folders, by path inside the study;
* ``("done", files, node)``: the same once the runs finished (summaries included);
* ``("error", line, detail, node)``: training failed (the line is ``Type: message``).

Scratch folders live in ``$TMPDIR/qdistill-scratch/``, each held by a lock on a file
beside it; a starting worker removes those whose lock is free (their worker was
killed). Test hook: ``QDISTILL_TEST_EXIT="RUN:E"`` makes the first attempt of the unit
that trains ``RUN`` call ``os._exit(1)`` as soon as the driver has taken the E-th epoch
it sent (so the one before is written; the E-th is lost if the driver had not fetched it
yet): its retry must resume from one of those two.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import queue
import shutil
import tempfile
import threading
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes
from ..errors import UserError
from ..training import rundir
from ..training.loop import Run, train
from ..training.targets import TeacherTargets

SCRATCH = "qdistill-scratch"
TEST_EXIT = "QDISTILL_TEST_EXIT"


@dataclass(frozen=True)
class Unit:
    """What one task trains: ``runs`` as ``(config, folder)`` pairs, the folder a path
    inside the study (``runs/NAME`` or ``teacher``); ``group``: the fused group's folder
    (``groups/s<seed>``) when there are several runs."""
    label: str
    runs: tuple
    group: str = ""

    @property
    def folders(self) -> list[str]:
        return [folder for _, folder in self.runs] + ([self.group] if self.group else [])

    def files(self, root: Path) -> dict[str, bytes]:
        """Every file of the unit's folders under ``root``, by path inside the study."""
        return {f"{folder}/{name}": data for folder in self.folders
                for name, data in rundir.read_files(root / folder).items()}


def node_label() -> str:
    """The node a task runs on, as results.csv shows it: host name / Ray node id."""
    import ray
    return f"{platform.node()}/{ray.get_runtime_context().get_node_id()[:8]}"


@contextlib.contextmanager
def scratch():
    """A fresh scratch folder, removed afterwards; first removes those of dead workers."""
    root = Path(tempfile.gettempdir()) / SCRATCH
    root.mkdir(parents=True, exist_ok=True)
    for lock in root.glob("*.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live worker's
        finally:
            os.close(fd)
        shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
        lock.unlink(missing_ok=True)
    name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(root / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held before the folder exists: no one removes it under us
    folder = root / name
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        (root / f"{name}.lock").unlink(missing_ok=True)
        os.close(fd)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        atomic_write_bytes(root / rel, data)


def _teacher(root: Path, teacher: dict, data) -> TeacherTargets:
    """The study's teacher rebuilt from its files, named as on the driver, its logits
    read from the cache the driver computed."""
    path = root / "teacher-in" / teacher["name"]
    _write(path if teacher["is_run"] else path.parent, teacher["files"])
    targets = TeacherTargets.from_path(path, data, teacher["section"], augment=teacher["augment"])
    targets.source, targets.file = teacher["source"], teacher["file"]
    cache = root / "teacher-in" / "teacher_logits.pt"
    atomic_write_bytes(cache, teacher["cache"])
    targets.read_cache(cache)
    return targets


def _exit_after(unit: Unit, attempt: int) -> int | None:
    """The epoch after which `TEST_EXIT` stops this attempt, if it names this unit."""
    run, _, epoch = os.environ.get(TEST_EXIT, "").rpartition(":")
    names = {Path(folder).name for _, folder in unit.runs}
    return int(epoch) if attempt == 1 and run in names else None


def run_unit(unit: Unit, files: dict[str, bytes], data, teacher: dict | None, threads: int, attempt: int):
    """The Ray task (a generator, see the module docstring)."""
    torch.set_num_threads(max(1, int(threads)))
    node, exit_after, sent = node_label(), _exit_after(unit, attempt), 0
    with scratch() as root:
        _write(root, files)
        targets = _teacher(root, teacher, data) if teacher else None
        messages: queue.Queue = queue.Queue()

        def on_epoch():
            messages.put(("epoch", unit.files(root), node))

        def work():
            try:
                train([Run(cfg, root / folder) for cfg, folder in unit.runs], data, targets,
                      group_dir=root / unit.group if unit.group else None, resume=True, progress=False,
                      on_epoch=on_epoch, node=node)
                messages.put(("done", unit.files(root), node))
            except Exception as e:  # recorded by the driver like any failed run
                detail = "" if isinstance(e, UserError) else traceback.format_exc()
                messages.put(("error", f"{type(e).__name__}: {e}", detail, node))

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while True:
            message = messages.get()
            yield message  # returns once the driver has taken it (backpressure of one: `cluster.py`)
            if message[0] != "epoch":
                break
            sent += 1
            if exit_after is not None and sent >= exit_after:
                os._exit(1)
        thread.join()
