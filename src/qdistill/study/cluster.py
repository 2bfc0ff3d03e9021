"""A study's runs as Ray tasks: joining (or starting) Ray, and the driver that hands out
the units of work, writes what comes back and resubmits what a lost worker or node
interrupted.

The driver is the only writer of the study folder; workers train in scratch folders
(`worker.py`). After every epoch a task sends its folders' files back and the driver
writes them into the study, so

* a task whose worker or node died is resubmitted with those files and resumes from
  its last finished epoch on whichever node Ray picks (the driver resubmits, rather than
  Ray's own ``max_retries``, because a retry must start from the latest files, not from
  the arguments of the first attempt);
* a driver killed mid-study leaves run directories a rerun resumes, as a local study's;
* when a unit finishes, each of its folders is replaced as a whole (`rundir.replace`).

Up to ``study.retries`` resubmissions per unit; then its runs are recorded as failed
(``error.txt``), like a run whose training raised, and the study goes on. Each
finished summary gets ``attempts``: the node and starting epoch of every attempt.
Ray's own log lines stay out of the terminal unless ``QDISTILL_RAY_LOGS=1``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write_bytes, remove_temps
from ..errors import ConfigError, RunError
from ..training import rundir
from .worker import Unit, run_unit

EXTRA = "pip install 'qdistill[ray]'"
LOGS = "QDISTILL_RAY_LOGS"
_ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"studies on Ray (--ray, --workers N) need Ray: {EXTRA}") from None
    return ray


def check_address(address: str) -> str:
    """``""``/``"local"`` (start a local instance), ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``; anything else is a `ConfigError`."""
    address = address.strip()
    if address in ("", "local", "auto"):
        return "" if address == "local" else address
    m = _ADDRESS.match(address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ConfigError(f"study.ray_address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    return address


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when nothing listens at ``HOST:PORT`` (Ray itself would
    retry for minutes)."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RunError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}; start it with "
                       f"`ray start --head` or check the address") from None


@contextlib.contextmanager
def session(address: str, num_cpus: int | None = None):
    """Ray, connected: to ``address`` (`check_address`), or to a local instance with
    ``num_cpus`` started here and stopped afterwards. A connection the caller already
    made (``ray.init`` in a notebook or a test) is used as it is and left open."""
    ray = import_ray()
    address = check_address(address)
    verbose = os.environ.get(LOGS) == "1"
    if ray.is_initialized():
        if not verbose:
            _quiet(ray)
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    # ray.init makes SIGTERM a bare sys.exit; the CLI's handler says how to continue
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            if address != "auto":
                _reachable(address)
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
    except Exception as e:  # whatever Ray raises: a cluster that cannot be joined is one line
        ray.shutdown()
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RunError(f"cannot connect to {where}: {' '.join(str(e).split())[:300]}") from None
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    if not verbose:
        _quiet(ray)
    try:
        yield ray
    finally:
        ray.shutdown()


def _quiet(ray) -> None:
    """Drop the raylet's messages Ray prints on the driver (a dead worker, ...): the
    driver says in its own line what happened and what it does about it."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "quiet", False):
        return

    def quiet(data, *args, **kwargs):
        if data.get("pid") != "raylet":
            printer(data, *args, **kwargs)
    quiet.quiet = True
    worker.print_to_stdstream = quiet


def resources(ray, cpus: float, gpus) -> tuple[float, float]:
    """The request of one task: ``cpus``, and ``gpus`` (``"auto"``: 1 when the cluster has
    GPUs, else 0). A request no live node can ever meet is a `ConfigError`."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if gpus == "auto":
        gpus = 1.0 if any(r.get("GPU", 0) > 0 for r in nodes) else 0.0
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no nodes"
        raise ConfigError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one run "
                          f"(nodes: {have}); lower study.cpus_per_run or study.gpus_per_run")
    return float(cpus), float(gpus)


def _write_epoch(study: Path, unit: Unit, files: dict[str, bytes]) -> None:
    """An epoch's files into the study: files gone from the worker's folders go first
    (a group's member drops its old summary), then the rest in `rundir.write_order`."""
    for folder in unit.folders:
        for name in rundir.read_files(study / folder):
            if f"{folder}/{name}" not in files:
                (study / folder / name).unlink(missing_ok=True)
    for rel in sorted(files, key=rundir.write_order):
        atomic_write_bytes(study / rel, files[rel])


def _write_done(study: Path, unit: Unit, files: dict[str, bytes], attempts: list[dict]) -> None:
    for folder in unit.folders:
        mine = {rel.rsplit("/", 1)[1]: data for rel, data in files.items() if rel.rsplit("/", 1)[0] == folder}
        if rundir.SUMMARY in mine:
            summary = json.loads(mine[rundir.SUMMARY])
            mine[rundir.SUMMARY] = (json.dumps({**summary, "attempts": attempts}, indent=2) + "\n").encode()
        rundir.replace(study / folder, mine)


def _retryable(ray, e: Exception) -> bool:
    """A lost worker, node or object: worth another attempt (not an error of the task's
    own code, an environment that cannot be set up, or a request no node can meet)."""
    x = ray.exceptions
    final = (x.RayTaskError, x.RuntimeEnvSetupError, x.TaskUnschedulableError, x.TaskCancelledError)
    return isinstance(e, x.RayError) and not isinstance(e, final)


def run_units(ray, study: Path, units: list[Unit], data, teacher: dict | None, *, cpus: float, gpus: float,
              retries: int, progress: bool, on_done=lambda: None) -> None:
    """Train ``units`` as Ray tasks (see the module docstring); ``on_done()`` after each."""
    # A fresh worker per task; a task's yield waits until the driver has taken the message
    # before (so a task never runs ahead of what the driver holds by more than one epoch).
    task = ray.remote(max_calls=1, _generator_backpressure_num_objects=1)(run_unit).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=0)
    data_ref = ray.put(data)
    teacher_ref = ray.put(teacher) if teacher is not None else None
    live, attempts = {}, {u.label: [] for u in units}

    def submit(unit: Unit, attempt: int) -> None:
        files = {}
        for folder in unit.folders:
            for name, blob in rundir.read_files(study / folder).items():
                if name not in (rundir.SUMMARY, rundir.ERROR):
                    files[f"{folder}/{name}"] = blob
            (study / folder / rundir.ERROR).unlink(missing_ok=True)
            remove_temps(study / folder)  # a driver killed mid-write left them
        first = unit.runs[0][1]
        resumes = f"{unit.group or first}/{rundir.CHECKPOINT}" in files
        attempts[unit.label].append({"node": "", "from_epoch": len(rundir.read_metrics(study / first)) if resumes
                                     else 0})
        live[task.remote(unit, files, data_ref, teacher_ref, cpus, attempt)] = (unit, attempt)

    def failed(unit: Unit, line: str, detail: str = "") -> None:
        for _, folder in unit.runs:
            rundir.write_error(study / folder, line, detail)
        say(f"{unit.label}: failed: {line}")

    for unit in units:
        submit(unit, 1)
    bar = tqdm(total=sum(len(u.runs) for u in units), desc="runs", unit="run", disable=not progress)
    say = bar.write if progress else (lambda line: None)  # one line per finished, failed or retried run
    try:
        while live:
            ready, _ = ray.wait(list(live), num_returns=1, timeout=1.0)
            for gen in ready:
                unit, attempt = live[gen]
                try:
                    message = ray.get(next(gen))
                except StopIteration:
                    message = ("error", "RunError: the task ended without a result", "", "")
                except Exception as e:
                    del live[gen]
                    line = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    if _retryable(ray, e) and attempt <= retries:
                        submit(unit, attempt + 1)
                        say(f"{unit.label}: {type(e).__name__} on {attempts[unit.label][-2]['node'] or 'a node'}"
                            f"; attempt {attempt + 1} of {retries + 1}, from epoch "
                            f"{attempts[unit.label][-1]['from_epoch']}")
                    else:
                        failed(unit, line + (f" (after {attempt} attempts)" if attempt > 1 else ""))
                        bar.update(len(unit.runs))
                        on_done()
                    continue
                kind, node = message[0], message[-1]
                attempts[unit.label][-1]["node"] = node
                if kind == "epoch":
                    _write_epoch(study, unit, message[1])
                    continue
                del live[gen]
                if kind == "done":
                    _write_done(study, unit, message[1], attempts[unit.label])
                    for _, folder in unit.runs:
                        s = rundir.read_summary(study / folder)
                        say(f"{Path(folder).name}  {node}  val {s['val_best_acc']:.4f}  "
                            f"test {s['test_acc_at_val_best']:.4f}  {s['wall_s']:.0f}s")
                else:
                    failed(unit, message[1], message[2])
                bar.update(len(unit.runs))
                on_done()
    finally:
        bar.close()
        for gen in live:  # stopped early (Ctrl-C, a failing disk): stop the tasks too
            ray.cancel(gen, force=True)
