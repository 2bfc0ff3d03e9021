"""A study's runs as Ray tasks: joining (or starting) Ray, and the driver that hands out
units of work, writes what comes back and resubmits what a lost worker or node interrupted.

The driver is the only writer of the study folder; workers train in scratch folders
(`worker.py`) and send their folders' files back after every epoch, so
* a task whose worker or node died is resubmitted with those files and resumes from its
  last finished epoch wherever Ray puts it (the driver resubmits rather than Ray's
  ``max_retries``: a retry must start from the latest files, not the first arguments);
* a driver killed mid-study leaves run directories a rerun resumes, as a local study's;
* a finished unit's folders are each replaced as a whole (`RunDir.replace`).
Up to ``study.retries`` resubmissions per unit, then its runs are failed (``error.txt``)
and the study goes on. Each summary gets ``attempts``: per attempt its node, device (GPU
model or "cpu"), starting epoch, and the ``time.time()`` the driver submitted it, it
started (its first message) and it ended (its last message or its loss).
Ray's log lines stay out of the terminal unless ``QDISTILL_RAY_LOGS=1``; an address that
leads to no cluster, to one that refuses this driver's token, or to one Ray would dial
elsewhere is one line within seconds (`_probe`, `_probe_dialled`), before ``ray.init``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError, RunError
from .studydir import StudyDir
from .worker import Done, Epoch, Failed, Unit, run_unit

EXTRA = "pip install 'qdistill[ray]'"
LOGS = "QDISTILL_RAY_LOGS"
_ENDED = Failed("RunError: the task ended without a result", "", "")
AUTH_MODE = "RAY_AUTH_MODE"  # token | disabled (Ray 2.52+)
CONNECT_S, ANSWER_S = 3.0, 5.0   # a cluster's TCP port, then its first answer to the driver
JOIN_S = 30.0                    # the whole of ray.init joining a cluster that passed the probes
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


def _probe(address: str) -> None:
    """Fail fast, with one line, unless a Ray cluster answers at ``address`` and accepts
    this driver: a TCP connection, then one call to the head's GCS (``GetClusterId``, with
    the token Ray's own clients would send) that must answer within ``ANSWER_S``. Ray's
    own client, in ``ray.init``, would retry for minutes and write its log lines to the
    terminal's file descriptor: an address it would fail on never reaches it."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S).close()
    except OSError as e:
        raise RunError(f"nothing answers at the Ray address {address} ({e.strerror or e}); start the cluster "
                       f"with `ray start --head` or check the address") from None
    code, details = _ask_gcs(f"{host}:{port}")
    if code == "UNAUTHENTICATED":
        raise RunError(_refusal(address))
    client = address.startswith("ray://")  # a Ray Client server: it answers, but has no GCS calls
    port_hint = ("give the head's Ray Client port (10001 by default)" if client else
                 "give the head's GCS port (6379 unless `ray start --port` set another)")
    if code == "DEADLINE_EXCEEDED":
        raise RunError(f"no Ray cluster answers at {address}: the port takes connections but sent no reply "
                       f"within {ANSWER_S:g} s; {port_hint}")
    if code not in ({"OK", "UNIMPLEMENTED"} if client else {"OK"}):
        raise RunError(f"no Ray cluster answers at {address} ({code}: {' '.join(details.split())[:200]}); {port_hint}")


def _ask_gcs(target: str) -> tuple[str, str]:
    """The status (``OK``, ``UNAUTHENTICATED``, ...) and message of one ``GetClusterId``
    call to the GCS at ``target`` over a channel as Ray's Python clients open it (TLS,
    and the token when ``RAY_AUTH_MODE=token``: ``UNAUTHENTICATED`` too when this
    driver's token cannot be read); ``("OK", "")`` where this Ray has no such channel."""
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
        from ray.exceptions import AuthenticationError
    except ImportError:
        return "OK", ""
    channel = init_grpc_channel(target)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=ANSWER_S)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    except AuthenticationError as e:  # raised here, before any call: no token to send
        return "UNAUTHENTICATED", e.message
    finally:
        channel.close()


def _refusal(address: str) -> str:
    """The line for a cluster that refused this driver's token, or its lack of one.
    Ray reads the token from ``RAY_AUTH_TOKEN``, else from the file ``RAY_AUTH_TOKEN_PATH``
    names, else from ``~/.ray/auth_token``; only with ``RAY_AUTH_MODE=token`` does a
    driver given an address send it."""
    fix = "RAY_AUTH_TOKEN_PATH to a file that holds the cluster's token"
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        return f"the Ray cluster at {address} requires a token: set {AUTH_MODE}=token and {fix}"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return f"the Ray cluster at {address} refused the token in RAY_AUTH_TOKEN: unset it and set {fix}"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (path.is_file() and path.read_text(errors="replace").strip()):
        return f"this driver has no token for the Ray cluster at {address} ({path} holds none): set {fix}"
    return f"the Ray cluster at {address} refused the token in {path}: set {fix}"


def _find(address: str, verbose: bool) -> str:
    """``address``, or for ``auto`` the cluster ``ray.init`` would join (``RAY_ADDRESS``,
    else the last one ``ray start`` started here), with token authentication turned on
    as ``ray.init`` turns it on for ``auto`` (a token exists, ``RAY_AUTH_MODE`` unset)."""
    if address != "auto":
        return address
    from ray._private import services
    from ray._private.authentication import authentication_token_setup as auth
    try:
        found = services.canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as e:  # none found; a malformed RAY_ADDRESS
        raise RunError(f"found no Ray cluster for --ray auto ({' '.join(str(e).split())[:200]})") from None
    logger = logging.getLogger(auth.__name__)
    level = logger.level
    logger.setLevel(logging.INFO if verbose else logging.ERROR)  # as ray.init's logging_level would
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)
    return found


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
    if address:
        found = _find(address, verbose)
        _probe(found)
        _probe_dialled(found)
    try:
        if address:
            _join(ray, address, common)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
    except RunError:  # the join hung (`_join`): its thread holds Ray's state, left alone
        raise
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


def _probe_dialled(address: str) -> None:
    """One line unless the address ``ray.init`` dials takes a connection: Ray dials a
    loopback host as this machine's own address, where a head started with
    ``--node-ip-address=127.0.0.1`` does not listen (and Ray would retry for ever)."""
    if address.startswith("ray://"):
        return
    from ray._private import services
    dialled = services.canonicalize_bootstrap_address(address)
    if not dialled or dialled == address:
        return
    host, port = dialled.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S).close()
    except OSError as e:
        raise RunError(f"the Ray cluster at {address} answers, but Ray dials a loopback address as this machine's "
                       f"own, {dialled}, where nothing answers ({e.strerror or e}): its nodes were likely started "
                       f"with --node-ip-address=127.0.0.1; start them on this machine's address") from None


def _join(ray, address: str, common: dict) -> None:
    """``ray.init(address=...)`` bounded by `JOIN_S` (Ray retries an unreachable GCS for
    ever): past it, one line; the hung call stays in a daemon thread."""
    done, failure = threading.Event(), []

    def join():
        try:
            ray.init(address=address, **common)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
        finally:
            done.set()
    threading.Thread(target=join, name="qdistill-ray-join", daemon=True).start()
    if not done.wait(JOIN_S):
        raise RunError(f"Ray did not join the cluster at {address} within {JOIN_S:g} s: the address it dials is "
                       f"likely not one its head listens on (a head started with --node-ip-address=127.0.0.1 "
                       f"listens on loopback only); set {LOGS}=1 to see Ray's own lines")
    if failure:
        raise failure[0]


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


def resources(ray, cpus: float, gpus, workers: int = 0) -> tuple[float, float]:
    """The request of one task: ``cpus``, and ``gpus``. ``"auto"``: none on a cluster
    without GPUs; with ``workers`` > 1 runs at once, a share of the largest node's GPUs,
    ``min(1, GPUs / workers)``, so that many runs train side by side; else one GPU. A
    request no live node can ever meet is a `ConfigError`."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if gpus == "auto":
        most = max((r.get("GPU", 0) for r in nodes), default=0)
        # Ray counts resources in steps of 1e-4, rounding to the nearest: round down, or 3
        # tasks of 2/3 (0.6667) would not fit on 2 GPUs
        gpus = 0.0 if most <= 0 else math.floor(min(1.0, most / workers) * 1e4 + 1e-6) / 1e4 if workers > 1 else 1.0
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no nodes"
        raise ConfigError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one run "
                          f"(nodes: {have}); lower study.cpus_per_run or study.gpus_per_run")
    return float(cpus), float(gpus)


def _retryable(ray, e: Exception) -> bool:
    """A lost worker, node or object: worth another attempt (not an error of the task's
    own code, an environment that cannot be set up, or a request no node can meet)."""
    x = ray.exceptions
    final = (x.RayTaskError, x.RuntimeEnvSetupError, x.TaskUnschedulableError, x.TaskCancelledError)
    return isinstance(e, x.RayError) and not isinstance(e, final)


@dataclass(frozen=True)
class Tasks:
    """What each task asks for (`resources`), how often a lost one is resubmitted, and
    whether the driver shows a bar and one line per finished, failed or retried run."""
    cpus: float
    gpus: float
    retries: int = 3
    progress: bool = True


@dataclass
class _Driver:
    """The driver's state while its units train: the live tasks and every unit's attempts."""
    ray: object
    study: StudyDir
    tasks: Tasks
    task: object           # the remote function
    refs: tuple            # (data, teacher) in the object store
    on_done: object
    live: dict = field(default_factory=dict)      # task -> (unit, attempt)
    attempts: dict = field(default_factory=dict)  # unit label -> [{"node", "device", "from_epoch", times...}]
    say: object = None     # one line to the terminal
    bar: object = None

    def submit(self, unit: Unit, attempt: int) -> None:
        """Start ``unit`` from the files its folders hold now (its last epoch back here)."""
        first = unit.runs[0][1]
        resumes = self.study.folder(unit.group or first).started
        files = self.study.resumable_files(unit.folders)
        self.attempts.setdefault(unit.label, []).append(
            {"node": "", "device": "", "from_epoch": len(self.study.folder(first).read_metrics()) if resumes else 0,
             "submitted": time.time(), "start": None, "end": None})  # wall-clock seconds (module docstring)
        self.live[self.task.remote(unit, files, *self.refs, self.tasks.cpus)] = (unit, attempt)

    def finish(self, unit: Unit) -> None:
        self.bar.update(len(unit.runs))
        self.on_done()

    def failed(self, unit: Unit, line: str, detail: str = "") -> None:
        for _, folder in unit.runs:
            self.study.folder(folder).write_error(line, detail)
        self.say(f"{unit.label}: failed: {line}")
        self.finish(unit)

    def lost(self, gen, e: Exception) -> None:
        """A task that raised: resubmit it when Ray lost it and retries are left."""
        unit, attempt = self.live.pop(gen)
        self.attempts[unit.label][-1]["end"] = time.time()
        if _retryable(self.ray, e) and attempt <= self.tasks.retries:
            self.submit(unit, attempt + 1)
            tried = self.attempts[unit.label]
            self.say(f"{unit.label}: {type(e).__name__} on {tried[-2]['node'] or 'a node'}; attempt {attempt + 1} "
                     f"of {self.tasks.retries + 1}, from epoch {tried[-1]['from_epoch']}")
        else:
            line = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            self.failed(unit, line + (f" (after {attempt} attempts)" if attempt > 1 else ""))

    def take(self, gen, message) -> None:
        """A message of a live task: write an epoch, a finished unit, or a failure."""
        unit, _ = self.live[gen]
        where = {"node": message.node, "device": message.device, "start": message.started}
        self.attempts[unit.label][-1].update({k: v for k, v in where.items() if v})  # `_ENDED` has none
        if isinstance(message, Epoch):
            self.study.write_epoch(unit.folders, message.files)
            return
        del self.live[gen]
        self.attempts[unit.label][-1]["end"] = time.time()
        if isinstance(message, Done):
            self.study.write_done(unit.folders, message.files, attempts=self.attempts[unit.label])
            for _, folder in unit.runs:
                s = self.study.folder(folder).read_summary()
                self.say(f"{self.study.folder(folder).name}  {message.node}  val {s['val_best_acc']:.4f}  "
                         f"test {s['test_acc_at_val_best']:.4f}  {s['wall_s']:.0f}s")
            self.finish(unit)
        else:
            self.failed(unit, message.line, message.detail)

    def wait(self) -> None:
        """Until every unit finished or failed: take each task's next message."""
        while self.live:
            ready, _ = self.ray.wait(list(self.live), num_returns=1, timeout=1.0)
            for gen in ready:
                try:
                    message = self.ray.get(next(gen))
                except StopIteration:
                    message = _ENDED
                except Exception as e:
                    self.lost(gen, e)
                    continue
                self.take(gen, message)


def _say(line: str) -> None:
    """One line on stdout, above the bar where there is one, flushed: a log gets it now."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def run_units(ray, study: StudyDir, units: list[Unit], data, teacher: dict | None, tasks: Tasks,
              on_done=lambda: None) -> None:
    """Train ``units`` as Ray tasks (see the module docstring); ``on_done()`` after each."""
    # A fresh worker per GPU task (its exit frees torch's cached GPU memory), an idle one may
    # serve a CPU task (torch imported: ~5 s saved); Ray's defaults, which `.options` skips.
    # A task's yield waits until the driver has taken the one before (one epoch ahead at most).
    task = ray.remote(max_calls=1 if tasks.gpus else 0, _generator_backpressure_num_objects=1)(run_unit).options(
        num_cpus=tasks.cpus, num_gpus=tasks.gpus, max_retries=0)
    refs = (ray.put(data), ray.put(teacher) if teacher is not None else None)
    driver = _Driver(ray, study, tasks, task, refs, on_done)
    # the bar on a terminal only, and not with --quiet; one line per finished, failed or retried run always
    driver.bar = tqdm(total=sum(len(u.runs) for u in units), desc="runs", unit="run",
                      disable=None if tasks.progress else True)
    driver.say = _say
    for unit in units:
        driver.submit(unit, 1)
    try:
        driver.wait()
    finally:
        driver.bar.close()
        for gen in driver.live:  # stopped early (Ctrl-C, a failing disk): stop the tasks too
            ray.cancel(gen, force=True)
