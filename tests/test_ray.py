"""Studies on Ray: a local instance, a simulated cluster that loses a node, a worker that
dies, and addresses that lead nowhere.

Ray stays on this machine: local instances and `ray.cluster_utils.Cluster` on the
loopback address, its session files under a temp ``RAY_TMPDIR``, token authentication
off (`test_ray_auth.py` turns it on), nothing in ``$HOME``, and every process it
started is gone at the end (checked).
Metrics are compared with an in-process study that uses the same torch threads per run
(``study.cpus_per_run = 1``): the same computation, so equality is exact.
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Read when Ray is imported: every address Ray hands out is then the loopback one.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

from qdistill import cli  # noqa: E402
from qdistill.resolve import resolve  # noqa: E402
from qdistill.study.run import run_study  # noqa: E402
from qdistill.study import cluster, worker  # noqa: E402
from qdistill.training.rundir import RunDir  # noqa: E402

STUDY = """
[data]
dataset = "digits"
max_train = 240
max_test = 40
[train]
epochs = 4
batch_size = 32
[study]
temperatures = [4.0]
seeds = [0]
questions = ["q1", "q2"]
teacher_epochs = 1
cpus_per_run = 1
allow_weak_teacher = true  # a 1-epoch teacher on 240 images is at chance; here that is fine
"""
RUNS = ["q1-hard-T1-s0", "q2-soft-T4-s0"]
pytestmark = pytest.mark.slow
WHERE_AND_WHEN = ("wall_s", "img_per_s", "node")


@contextlib.contextmanager
def ray_here(**env):
    """Ray's files in a temp folder (TMPDIR too: the workers' scratch folders), loopback
    only, the variables ``env`` set; afterwards they are as before, ``~/.ray`` is as it
    was and no process of it is left. The folder sits right under the system's temp
    folder: Ray's socket paths inside it must stay under 108 bytes, which pytest's own
    temp folders (per xdist worker) can exceed. Ray's workers run at the priority of the
    rest of the suite (Ray's default, nice 15, left them a few percent of a core beside
    the other xdist worker on a busy machine: a task's epochs then took minutes)."""
    tmp = Path(tempfile.mkdtemp(prefix="qd-ray-"))
    env = {"RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
           **env}
    home_ray = Path.home() / ".ray"
    had_home_ray = home_ray.exists()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield tmp
    assert not ray.is_initialized()
    assert home_ray.exists() == had_home_ray, "Ray wrote to ~/.ray"
    deadline = time.monotonic() + 20
    while (left := _processes_under(tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes left running: {left}"
    # A worker killed while the next one started still held its lock then; the next
    # start on this node removes its folder, as this does.
    worker.remove_dead(tmp / worker.SCRATCH)
    assert not list((tmp / worker.SCRATCH).glob("*")), "scratch folders left"
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_env():
    """`ray_here` with token authentication off (`tests/test_ray_auth.py` turns it on)."""
    with ray_here(RAY_AUTH_MODE="disabled") as tmp:
        yield tmp


def _processes_under(folder: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(folder) in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(STUDY + extra)
    return path


def metrics(study: Path, teacher: bool = True) -> dict:
    """Every run's metrics (the teacher's too), without where and when they ran."""
    return {run.name: [{k: v for k, v in row.items() if k not in WHERE_AND_WHEN} for row in RunDir(run).read_metrics()]
            for run in [study / "teacher"] * teacher + sorted((study / "runs").iterdir())}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    assert not run_study(resolve(config(root)), root / "S", progress=False)["failed"]
    return root / "S"


def exits_after(run: str, epochs: int, marker: Path):
    """A Ray task that trains as `worker.run_unit` does, but whose first attempt at the
    unit that trains ``run`` (no ``marker`` yet) exits the worker as soon as the driver
    has taken its ``epochs``-th epoch: the one before is written, that one maybe not."""
    def task(unit, files, data, teacher, threads):
        first = run in {Path(folder).name for _, folder in unit.runs} and not marker.exists()
        if first:
            marker.touch()
        sent = 0
        for message in worker.run_unit(unit, files, data, teacher, threads):
            yield message  # returns once the driver has taken it
            sent += isinstance(message, worker.Epoch)
            if first and sent >= epochs:
                os._exit(1)
    return task


def _two_studies(s: Path, tmp_path: Path, marker: Path, capsys):
    first = cli.main(["study", str(config(tmp_path, "retries = 0\n")), "--out", str(s), "--workers", "2"])
    out = capsys.readouterr()
    # resumes from there, dies again after 2 more epochs: the retry keeps at least 1 of them
    snapshot = {"error": RunDir(s / "runs" / "q2-soft-T4-s0").read_error(),
                "rows": len(RunDir(s / "runs" / "q2-soft-T4-s0").read_metrics()),
                "results": (s / "results.csv").read_text(),
                "q1": RunDir(s / "runs" / "q1-hard-T1-s0").read_summary()}
    marker.unlink()  # the next study's first attempt exits too
    second = run_study(resolve(config(tmp_path), {"study": {"executor": "ray"}}), s, progress=False)
    return first, out, snapshot, second


@pytest.fixture(scope="class")
def local_instance(ray_env):
    """The instance, started by `cluster.session` as the CLI starts it; yields whether
    the caller's SIGTERM handler was still in place once it had started. ray.init
    installs its own (a bare exit, no line, code 15); the session puts the caller's
    back, so a Ray study stops with the CLI's line and code 143 (`tests/test_faults.py::
    test_sigterm_that_ray_turns_into_keyboard_interrupt_exits_143`)."""
    def mine(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with cluster.session("", num_cpus=2):
            kept = signal.getsignal(signal.SIGTERM) is mine
            signal.signal(signal.SIGTERM, previous)
            yield kept
    finally:
        signal.signal(signal.SIGTERM, previous)


class TestOnOneLocalInstance:
    """The studies of these tests run on one local instance (a study uses a connection its
    caller made), started as the CLI starts one, and stopped after the last of them."""

    def test_a_local_ray_instance_gives_the_in_process_metrics(self, local_instance, in_process, tmp_path,
                                                               monkeypatch, capsys):
        """--workers 2, where one run's worker dies and retries = 0: that run is recorded as
        failed and the other goes on. Rerun on Ray with retries, where the resumed run's
        worker dies again: it is retried and resumes from the last epoch that came back.
        Then every run's metrics (the teacher's, a Ray task too) equal the in-process study's."""
        s = tmp_path / "S"
        # dies once the driver has taken its 2nd epoch: the 1st is written, the 2nd may be
        marker = tmp_path / "exited"
        monkeypatch.setattr(cluster, "run_unit", exits_after("q2-soft-T4-s0", 2, marker))
        assert local_instance  # the caller's SIGTERM handler stayed (the class's fixture)
        first, out, snapshot, second = _two_studies(s, tmp_path, marker, capsys)
        _check_two_studies(s, first, out, snapshot, second, in_process)

    def test_a_model_file_trains_on_ray_workers_that_never_saw_it(self, local_instance, tmp_path):
        """The driver reads the model file once (the config check keeps its text); the file
        is then deleted, so the workers (none of which read it) can only build the model from the
        text the task carries. The teacher and the run finish."""
        net = tmp_path / "own.py"
        net.write_text(OWN_NET)
        cfg = resolve(config(tmp_path, f'[student]\nmodel = "{net}:net"\n[teacher]\nmodel = "{net}:net"\n'),
                      sets=["train.epochs=1", 'study.questions=["q1"]'])
        cfg["study"]["executor"] = "ray"
        net.unlink()
        with cluster.session("", num_cpus=2):  # the class's instance, as a caller's connection
            result = run_study(cfg, tmp_path / "S", progress=False)
        assert not result["failed"], result
        assert RunDir(tmp_path / "S" / "runs" / "q1-hard-T1-s0").finished


def _check_two_studies(s: Path, first, out, snapshot, second, in_process: Path):
    assert first == 1 and not second["failed"]
    assert snapshot["error"].startswith("WorkerCrashedError") and snapshot["rows"] in (1, 2)
    status = {line.split(",")[0]: line for line in snapshot["results"].splitlines()[1:]}
    assert ",failed,WorkerCrashedError" in status["q2-soft-T4-s0"] and ",ok," in status["q1-hard-T1-s0"]
    node = snapshot["q1"]["node"]
    assert node in status["q1-hard-T1-s0"]  # results.csv names the node
    lines = (out.out + out.err).splitlines()  # one line per finished run: name, node, accuracy, time
    assert "\r" not in out.err  # not --quiet, but stderr is no terminal: no bar
    assert any("q1-hard-T1-s0" in line and node in line and " val " in line for line in lines)
    assert "raylet" not in out.out + out.err  # Ray's own lines stay out of the terminal
    attempts = RunDir(s / "runs" / "q2-soft-T4-s0").read_summary()["attempts"]
    done = snapshot["rows"]
    assert attempts[0]["from_epoch"] == done and attempts[1]["from_epoch"] in (done + 1, done + 2), attempts
    assert metrics(s) == metrics(in_process)


@pytest.fixture(scope="class")
def loopback_cluster(ray_env):
    """A head without CPUs, listening on 127.0.0.1 only; without the autoscaler's monitor
    and the log monitor (no node is added on demand here, and no driver reads the logs)."""
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False, "no_monitor": True,
                                                      "include_log_monitor": False})
    try:
        yield c
    finally:
        c.shutdown()


class TestOnOneLoopbackCluster:
    """A simulated cluster on the loopback address, its head started once for these tests
    (each adds what it needs) and stopped after the last of them."""

    def test_a_head_on_loopback_that_ray_dials_elsewhere_is_one_line_and_a_hung_join_is_bounded(
            self, loopback_cluster, tmp_path, capfd, monkeypatch):
        """Issue 30, item 2. A head listening on 127.0.0.1 only answers the probe, but Ray
        dials a loopback address as the machine's own, where nothing listens, and retries for
        ever. On loopback only: this driver's "own address" is 127.0.0.2. Then a join that
        hangs for another reason is bounded (`cluster.JOIN_S`, shortened here)."""
        from ray._private import services
        c = loopback_cluster
        port = c.address.rsplit(":", 1)[1]
        with monkeypatch.context() as mp:
            mp.setattr(services, "get_node_ip_address", lambda *a, **k: "127.0.0.2")
            t0 = time.monotonic()
            code = cli.main(["study", str(config(tmp_path)), "--out", str(tmp_path / "S"), "--ray", c.address])
            elapsed = time.monotonic() - t0
        out, err = capfd.readouterr()
        assert code == 2 and out == "" and err == (
            f"qdistill: error: the Ray cluster at {c.address} answers, but Ray dials a loopback address as this "
            f"machine's own, 127.0.0.2:{port}, where nothing answers (Connection refused): its nodes were likely "
            f"started with --node-ip-address=127.0.0.1; start them on this machine's address\n")
        assert elapsed < 10 and not (tmp_path / "S").exists()
        release = threading.Event()
        monkeypatch.setattr(cluster, "JOIN_S", 0.5)
        monkeypatch.setattr(ray, "init", lambda **kw: release.wait(20))
        try:
            code = cli.main(["study", str(config(tmp_path)), "--out", str(tmp_path / "S"), "--ray", c.address])
        finally:
            release.set()
        out, err = capfd.readouterr()
        assert code == 2 and out == "" and err == (
            f"qdistill: error: Ray did not join the cluster at {c.address} within 0.5 s: the address it dials is "
            f"likely not one its head listens on (a head started with --node-ip-address=127.0.0.1 listens on "
            f"loopback only); set {cluster.LOGS}=1 to see Ray's own lines\n")
        assert not (tmp_path / "S").exists()

    def test_a_cluster_that_loses_a_node_mid_run_completes_with_the_same_metrics(self, loopback_cluster, in_process,
                                                                                  tmp_path):
        c = loopback_cluster
        try:
            nodes = [c.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
            ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
            s, codes = tmp_path / "S", []
            cfg = resolve(config(tmp_path), {"teacher": {"run": str(in_process / "teacher")},
                                             "study": {"executor": "ray", "ray_address": c.address}})
            driver = threading.Thread(target=lambda: codes.append(len(run_study(cfg, s, progress=False)["failed"])))
            driver.start()
            victim = None
            deadline = time.monotonic() + 60
            while victim is None and driver.is_alive() and time.monotonic() < deadline:
                for name in RUNS:  # a run with an epoch back at the driver and more to go
                    rows = RunDir(s / "runs" / name).read_metrics() if (s / "runs" / name).is_dir() else []
                    if 1 <= len(rows) < 4 and RunDir(s / "runs" / name).read_summary() is None:
                        victim = name, rows[-1]["node"], len(rows)
                        break
                time.sleep(0.01)
            assert victim, "no run was caught mid-way"
            name, node, done = victim
            c.remove_node(next(n for n in nodes if node.endswith(n.node_id[:8])))
            driver.join(120)
            assert codes == [0]
            rows = RunDir(s / "runs" / name).read_metrics()
            moved = [r["epoch"] for r in rows if r["node"] != node]
            assert moved and moved[0] > done and moved == list(range(moved[0], 5)), rows  # resumed, not restarted
            assert RunDir(s / "runs" / name).read_summary()["attempts"][1]["from_epoch"] >= done
            assert metrics(s, teacher=False) == metrics(in_process, teacher=False)
        finally:
            ray.shutdown()


    def test_auto_gpus_share_one_gpu_among_workers_and_quiet_keeps_a_line_per_run(
            self, loopback_cluster, in_process, tmp_path, capsys, monkeypatch):
        """A node declaring one GPU (a custom count: no real GPU needed) and ``--workers
        2``: ``gpus_per_run = "auto"`` asks half a GPU per task, so the two runs train at once
        (their attempts' times on the node overlap; a whole GPU each would serialise them).
        Each attempt records its device. ``--quiet``: no bar, one line per finished run. The
        teacher is the in-process study's (no teacher task to wait for); one epoch a run."""
        c = loopback_cluster
        cfg = config(tmp_path, f'workers = 2\nfused = false\n[teacher]\nrun = "{in_process / "teacher"}"\n')
        (tmp_path / "started").mkdir()
        monkeypatch.setattr(cluster, "run_unit", together(2, tmp_path / "started"))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # Ray refuses a GPU count the variable does not list
        node = c.add_node(num_cpus=2, num_gpus=1, node_ip_address="127.0.0.1")
        try:
            ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
            assert cluster.resources(ray, 1, "auto", 2) == (1.0, 0.5)
            assert cluster.resources(ray, 1, "auto", 1) == (1.0, 1.0)
            assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--quiet", "--set",
                             "train.epochs=1"]) == 0
        finally:
            ray.shutdown()
            c.remove_node(node)
        cap = capsys.readouterr()
        assert "\r" not in cap.out + cap.err
        assert sum(line.startswith(tuple(RUNS)) and " val " in line for line in cap.out.splitlines()) == 2
        a, b = (RunDir(tmp_path / "S" / "runs" / name).read_summary()["attempts"][0] for name in RUNS)
        assert a["submitted"] <= a["start"] < b["end"] and b["submitted"] <= b["start"] < a["end"], (a, b)
        assert a["device"] == b["device"] == worker.device_model()  # "cpu" here, a GPU's name on a GPU machine
        assert all(r["node"].endswith(node.node_id[:8]) for r in (a, b))  # the node with the GPU


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that takes every connection and never sends a byte; the
    connections it took."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    taken, stop = [], threading.Event()

    def take():
        while not stop.is_set():
            with contextlib.suppress(socket.timeout):
                taken.append(server.accept()[0])
    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}", taken
    stop.set()
    thread.join()
    for s in [server, *taken]:
        s.close()


FIX_PORT = "give the head's GCS port (6379 unless `ray start --port` set another)"


@pytest.mark.parametrize("address, line", [
    ("not an address", "study.ray_address must be auto, HOST:PORT or ray://HOST:PORT, got 'not an address'"),
    ("ray://host:99999", "study.ray_address must be auto, HOST:PORT or ray://HOST:PORT, got 'ray://host:99999'"),
    ("127.0.0.1:1", "nothing answers at the Ray address 127.0.0.1:1 (Connection refused); start the cluster "
                    "with `ray start --head` or check the address"),
    ("silent", "no Ray cluster answers at {}: the port takes connections but sent no reply within 5 s; " + FIX_PORT),
], ids=["not an address", "port out of range", "refused port", "silent port"])
def test_an_address_that_leads_to_no_cluster_exits_2_with_one_line_within_10_s(
        ray_env, tmp_path, capfd, silent_port, address, line):
    """Stderr (the file descriptor: Ray's C++ client writes there, not to sys.stderr)
    holds the one line and nothing else: a silent port used to take 20 s and 20 lines
    of `gcs_client.cc ... Failed to get cluster ID`."""
    if address == "silent":
        address, line = silent_port[0], line.format(silent_port[0])
    t0 = time.monotonic()
    assert cli.main(["study", str(config(tmp_path)), "--out", str(tmp_path / "S"), "--ray", address]) == 2
    elapsed = time.monotonic() - t0
    out, err = capfd.readouterr()
    assert err == f"qdistill: error: {line}\n" and out == ""
    assert elapsed < 10, elapsed
    assert bool(silent_port[1]) == (address == silent_port[0])  # the silent port was reached, and only it
    assert not (tmp_path / "S").exists()


def test_without_ray_the_line_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray fails
    for flags in (["--ray"], ["--workers", "2"]):
        assert cli.main(["study", str(config(tmp_path)), "--out", str(tmp_path / "S"), *flags]) == 2
        assert f"need Ray: {cluster.EXTRA}" in capsys.readouterr().err
    assert not (tmp_path / "S").exists()


def test_execution_settings_do_not_make_a_study_a_different_one(tmp_path):
    from qdistill.study.studydir import _what_runs
    from qdistill import config as configlib
    cfg = configlib.check(configlib.defaults())
    ray_cfg = json.loads(json.dumps(cfg))
    ray_cfg["study"].update(executor="ray", workers=4, cpus_per_run=2, ray_address="auto", fused=True)
    assert _what_runs(configlib.dumps(cfg)) == _what_runs(configlib.dumps(ray_cfg))
    other = json.loads(json.dumps(cfg))
    other["study"]["seeds"] = [0, 1]
    assert _what_runs(configlib.dumps(cfg)) != _what_runs(configlib.dumps(other))


def together(n: int, folder: Path):
    """A Ray task that trains as `worker.run_unit` does, but whose students' units first
    wait, up to 60 s, until ``n`` of them have started (a file each in ``folder``): run
    one at a time, the first waits in vain and ends before the next starts."""
    def task(unit, files, data, teacher, threads):
        if unit.label != "teacher":
            (folder / unit.label).touch()
            deadline = time.monotonic() + 60
            while len(list(folder.iterdir())) < n and time.monotonic() < deadline:
                time.sleep(0.05)
        yield from worker.run_unit(unit, files, data, teacher, threads)
    return task


def test_auto_gpus_are_a_share_ray_can_count(monkeypatch):
    """``min(1, GPUs / workers)``, rounded down to Ray's unit of 1e-4 (Ray rounds to the
    nearest: 3 tasks of 0.6667 would not fit on 2 GPUs); none without GPUs; one GPU
    each without ``--workers``; a request no node meets is one line."""
    from qdistill.errors import ConfigError
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}, {"Alive": False, "Resources": {"GPU": 8.0}}]
    fake = type("Ray", (), {"nodes": staticmethod(lambda: nodes)})
    assert [cluster.resources(fake, 1, "auto", w)[1] for w in (0, 1, 2, 3, 7)] == [1.0, 1.0, 1.0, 0.6666, 0.2857]
    assert cluster.resources(fake, 2, 0.5, 3) == (2.0, 0.5)  # a number is asked as it is
    nodes[0]["Resources"]["GPU"] = 0.0
    assert cluster.resources(fake, 1, "auto", 4) == (1.0, 0.0)
    with pytest.raises(ConfigError, match="no node of the Ray cluster has 1 CPUs and 1 GPUs"):
        cluster.resources(fake, 1, 1, 4)


def test_a_gpu_task_gets_a_fresh_worker_and_a_cpu_task_may_reuse_one():
    """A worker that ran a GPU task exits (torch's allocator would keep its GPU memory); a
    CPU task may land on an idle worker and skip importing torch again. Ray applies the
    first of these itself only to ``@ray.remote(num_gpus=...)``, not to ``.options``."""
    asked = []

    class FakeRay:
        @staticmethod
        def remote(**kw):
            asked.append(kw["max_calls"])
            return lambda f: type("Remote", (), {"options": lambda self, **o: self})()

        put = staticmethod(lambda value: value)

    for gpus in (0.0, 0.5, 1.0):
        cluster.run_units(FakeRay, None, [], None, None, cluster.Tasks(1.0, gpus, progress=False))
    assert asked == [0, 1, 1]  # 0: no limit


class _FakeStudy:
    """What `cluster._Driver` asks of a `StudyDir`, for one run that never resumes."""
    def __init__(self):
        self.done = None

    def folder(self, rel):
        summary = {"val_best_acc": 0.5, "test_acc_at_val_best": 0.5, "wall_s": 1.0}
        return type("Folder", (), {"started": False, "name": rel, "read_metrics": lambda self: [],
                                   "read_summary": lambda self: summary})()

    def resumable_files(self, folders):
        return {}

    def write_epoch(self, folders, files):
        pass

    def write_done(self, folders, files, **extra):
        self.done = extra


def test_each_attempt_records_its_gpu_model_and_times(monkeypatch, capsys):
    """Issue 23: a Ray retry may land on another GPU model, and identical metrics on CUDA
    need the same one, so each attempt records its own (CUDA faked here: the suite hides
    it). The driver keeps what each attempt's messages say: node, device, start."""
    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(worker.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(worker.torch.cuda, "get_device_name", lambda device=None: f"GPU model of {device}")
    assert worker.device_model("auto") == "GPU model of cuda:0" and worker.device_model("cpu") == "cpu"
    assert worker.device_model("cuda:5") == "cpu"  # no such GPU: the run itself fails with its line
    tasks = iter(["first", "second"])
    task = type("Task", (), {"remote": staticmethod(lambda *a: next(tasks))})
    study = _FakeStudy()
    driver = cluster._Driver(ray, study, cluster.Tasks(1.0, 0.5), task, (None, None), lambda: None,
                             say=print, bar=type("Bar", (), {"update": lambda self, n: None})())
    unit = worker.Unit("r", (({}, "runs/r"),))
    driver.submit(unit, 1)
    driver.take("first", worker.Epoch({}, "node-a", "NVIDIA A100-SXM4-80GB", 100.0))
    driver.lost("first", ray.exceptions.WorkerCrashedError())
    driver.take("second", worker.Epoch({}, "node-b", "Tesla V100-SXM2-16GB", 200.0))
    driver.take("second", worker.Done({}, "node-b", "Tesla V100-SXM2-16GB", 200.0))
    first, second = study.done["attempts"]
    assert (first["node"], first["device"], first["start"]) == ("node-a", "NVIDIA A100-SXM4-80GB", 100.0)
    assert (second["node"], second["device"], second["start"]) == ("node-b", "Tesla V100-SXM2-16GB", 200.0)
    assert first["submitted"] <= first["end"] <= second["submitted"] <= second["end"]
    assert "r: WorkerCrashedError on node-a; attempt 2 of 4" in capsys.readouterr().out


OWN_NET = '''
import torch.nn as nn


def net(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))
'''

