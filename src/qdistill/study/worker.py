"""One unit of a study's work as a Ray task: the teacher, one run, or one fused group,
trained in a scratch folder on whichever node Ray picks.

A worker shares no filesystem with the driver. It gets everything as values: the unit
(configs and the run directories' paths inside the study), the files of those folders
as the driver last saw them (so a retry resumes from the last epoch that came back),
the dataset, and the teacher (`Teacher.bundle`: its files and logits). It trains with
the one loop (`training/loop.py: train`) in a background thread and yields, as a Ray
streaming generator, one typed message after every epoch and one at the end: `Epoch`,
then `Done` or `Failed`. Each message names the node, the task's device (its GPU model, or
"cpu") and when the task started there (wall-clock seconds): the driver records them per
attempt.

Scratch folders live in ``$TMPDIR/qdistill-scratch/``, each held by a lock on a file
beside it; a starting worker removes those whose lock is free (their worker was
killed).
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
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..atomic import atomic_write_bytes
from ..errors import UserError
from ..nn import reference
from ..training.device import pick_device
from ..training.loop import Remote, Run, train
from ..training.rundir import RunDir
from ..training.teacher import Teacher

SCRATCH = "qdistill-scratch"


@dataclass(frozen=True)
class Unit:
    """What one task trains: ``runs`` as ``(config, folder)`` pairs, the folder a path
    inside the study (``runs/NAME`` or ``teacher``); ``group``: the fused group's folder
    (``groups/s<seed>``) when there are several runs."""
    label: str
    runs: tuple
    group: str = ""
    sources: tuple = ()  # the text of every model file the configs name: a worker needs no copy of it

    @classmethod
    def of(cls, label: str, runs: tuple, group: str = "") -> "Unit":
        """The unit with its model files' text (`qdistill.nn.reference`)."""
        sections = [sec for cfg, _ in runs for sec in (cfg["teacher"], cfg["student"])]
        texts = {reference.source(sec["model"], sec.get("model_sha256", "")) for sec in sections
                 if reference.is_file(sec["model"])}
        return cls(label, runs, group, tuple(sorted(texts)))

    @property
    def folders(self) -> list[str]:
        return [folder for _, folder in self.runs] + ([self.group] if self.group else [])

    def files(self, root: Path) -> dict[str, bytes]:
        """Every file of the unit's folders under ``root``, by path inside the study."""
        return {f"{folder}/{name}": data for folder in self.folders
                for name, data in RunDir(root / folder).files().items()}


class Epoch(NamedTuple):
    """An epoch finished: every file of the unit's folders, by path inside the study."""
    files: dict
    node: str
    device: str = "cpu"    # the worker's GPU model (`device_model`), or "cpu"
    started: float = 0.0   # when the task started on its node (``time.time()``)


class Done(NamedTuple):
    """The runs finished: their files, summaries included."""
    files: dict
    node: str
    device: str = "cpu"
    started: float = 0.0


class Failed(NamedTuple):
    """Training raised: ``line`` is ``Type: message``, ``detail`` the traceback of a bug."""
    line: str
    detail: str
    node: str
    device: str = ""
    started: float = 0.0


def device_model(name: str = "auto") -> str:
    """What a task's run trains on, as its attempts record it: the name of the CUDA GPU
    that ``train.device`` ``name`` picks (among those Ray gave the task), or "cpu" (also
    for a device that does not exist: the run fails with its own line)."""
    try:
        device = pick_device(name)
    except UserError:
        return "cpu"
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def node_label() -> str:
    """The node a task runs on, as results.csv shows it: host name / Ray node id."""
    import ray
    return f"{platform.node()}/{ray.get_runtime_context().get_node_id()[:8]}"


def remove_dead(root: Path) -> None:
    """Remove the scratch folders under ``root`` whose lock is free: their worker died
    (killed, or its node lost). A worker still dying holds its lock: the next start
    removes its folder."""
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


@contextlib.contextmanager
def scratch():
    """A fresh scratch folder, removed afterwards; first removes those of dead workers."""
    root = Path(tempfile.gettempdir()) / SCRATCH
    root.mkdir(parents=True, exist_ok=True)
    remove_dead(root)
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


def run_unit(unit: Unit, files: dict[str, bytes], data, teacher: dict | None, threads: int):
    """The Ray task (a generator of `Epoch`, then `Done` or `Failed`)."""
    torch.set_num_threads(max(1, int(threads)))
    for text in unit.sources:
        reference.remember(text)
    node = node_label()
    where = (node, device_model(unit.runs[0][0]["train"]["device"]), time.time())  # each message's last fields
    with scratch() as root:
        _write(root, files)
        messages: queue.Queue = queue.Queue()
        remote = Remote(node, lambda: messages.put(Epoch(unit.files(root), *where)))

        def work():
            try:
                opened = Teacher.from_bundle(teacher, data, root) if teacher else None
                train([Run(cfg, root / folder) for cfg, folder in unit.runs], data, opened,
                      group_dir=root / unit.group if unit.group else None, existing="resume", progress=False,
                      remote=remote)
                messages.put(Done(unit.files(root), *where))
            except Exception as e:  # recorded by the driver like any failed run
                messages.put(Failed(f"{type(e).__name__}: {e}", "" if isinstance(e, UserError) else
                                    traceback.format_exc(), *where))

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while True:
            message = messages.get()
            yield message  # returns once the driver has taken it (backpressure of one: `cluster.py`)
            if not isinstance(message, Epoch):
                break
        thread.join()
