"""The study on a simulated Ray cluster: does a second node halve the wall time, and
what does Ray cost per run? (A benchmark, not a test.)

One machine plays the cluster (`ray.cluster_utils.Cluster`, on the loopback address,
its files in a temp folder): a head with no CPUs, then 1 node x 1 CPU, then 2 nodes x 1
CPU. Each runs the same study of 4 student runs (Q1-Q4 at one temperature, one seed)
with a teacher trained once beforehand, so only the students are timed.

* wall: `run_study`'s time, driver set-up (data, the teacher's cache) included;
* speed-up = wall(1 node) / wall(2 nodes);
* Ray's cost per run, from the 1-node study, where runs take turns:
  (wall - sum of the runs' training time (``summary.json: wall_s``)) / runs: the fresh
  worker's start (Python, torch), sending data, teacher and files, and writing them back.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from .. import config as configlib
from ..data.registry import load
from ..study.cluster import import_ray
from ..study.run import run_study
from ..study.studydir import StudyDir
from ..training.loop import Run, train
from .machine import cpu_name

RUNS = 4


def _config(teacher: str, epochs: int, max_train: int) -> dict:
    cfg = configlib.defaults()
    configlib.merge(cfg, {
        "data": {"dataset": "digits", "max_train": max_train},
        "train": {"epochs": epochs, "batch_size": 64},
        "teacher": {"run": teacher},
        "study": {"temperatures": [4.0], "seeds": [0], "questions": ["q1", "q2", "q3", "q4"],
                  "executor": "ray", "cpus_per_run": 1, "allow_weak_teacher": True},
    })
    return configlib.check(cfg)


@contextlib.contextmanager
def _cluster(nodes: int, tmp: Path):
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    try:
        for _ in range(nodes):
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def run(epochs: int = 8, max_train: int = 0, log=print) -> dict:
    """Time the 4-run study on 1 then 2 nodes of 1 CPU; see the module docstring."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read on import: loopback addresses
    import_ray()
    with tempfile.TemporaryDirectory(prefix="qdistill-bench-") as tmp:
        tmp = Path(tmp)
        # Ray reads these when it starts: its files here, loopback addresses only
        for k, v in {"RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}.items():
            os.environ.setdefault(k, v)
        teacher = tmp / "teacher"
        tcfg = _config("", 3, max_train)
        tcfg["run"]["role"] = "teacher"
        log("training the teacher (3 epochs) ...")
        train([Run(tcfg, teacher)], load(tcfg["data"]), progress=False)
        result = {"machine": cpu_name(), "runs": RUNS, "epochs": epochs, "dataset": "digits", "nodes": {}}
        for nodes in (1, 2):
            study = tmp / f"study-{nodes}"
            with _cluster(nodes, tmp):
                log(f"{nodes} node(s) x 1 CPU: {RUNS} runs ...")
                t0 = time.perf_counter()
                out = run_study(_config(str(teacher), epochs, max_train), study, progress=False)
                wall = time.perf_counter() - t0
            if out["failed"]:
                raise RuntimeError(f"benchmark runs failed: {out['failed']}")
            train_s = [StudyDir(study).run(r["run"]).read_summary()["wall_s"] for r in out["rows"]]
            result["nodes"][nodes] = {"wall_s": wall, "train_s": sum(train_s), "run_train_s": train_s,
                                      "nodes_used": sorted({r["node"] for r in out["rows"]})}
        one, two = result["nodes"][1], result["nodes"][2]
        result["speedup"] = one["wall_s"] / two["wall_s"]
        result["overhead_per_run_s"] = (one["wall_s"] - one["train_s"]) / RUNS
        result["train_per_run_s"] = one["train_s"] / RUNS
    return result


def format_table(r: dict) -> str:
    one, two = r["nodes"][1], r["nodes"][2]
    return "\n".join([
        f"Study of {r['runs']} student runs ({r['dataset']}, {r['epochs']} epochs) on a simulated Ray cluster; "
        f"machine: {r['machine']}",
        "| cluster | wall time | runs' training time (sum) | speed-up |",
        "|---|---|---|---|",
        f"| 1 node x 1 CPU | {one['wall_s']:.1f} s | {one['train_s']:.1f} s | 1.00x |",
        f"| 2 nodes x 1 CPU | {two['wall_s']:.1f} s | {two['train_s']:.1f} s | {r['speedup']:.2f}x |",
        f"Ray's cost per run (1 node): {r['overhead_per_run_s']:.1f} s against {r['train_per_run_s']:.1f} s "
        f"of training ({100 * r['overhead_per_run_s'] / r['train_per_run_s']:.0f}%)",
    ])
