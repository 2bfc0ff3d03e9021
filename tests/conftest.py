"""What the tests share: the suite's settings, a small teacher, and study helpers.

* ``make test`` runs the suite on two pytest-xdist workers. Each worker, and every
  command it starts in a subprocess, gets one torch thread and one numba thread
  (``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS``, read when they load; numba's must be set
  too, since starting its OpenMP layer raises the thread count torch shares with it), so
  two processes never oversubscribe the 2-core machine; torch.compile compiles in the
  worker, without inductor's pool of compile processes. Tests that compare two runs for
  equality run both with the same threads either way.
* ``slow`` marks the tests that start subprocesses or Ray, inject faults, run several
  studies, or check the engine over thousands of images; ``make test-fast`` skips them.
"""
import atexit
import os
import shutil
import tempfile

# The suite runs on the CPU in fp32 whatever the machine: with a GPU visible, "auto" would
# train on it in bf16 and the exact-equality tests assume CPU arithmetic. The GPU check
# (scripts/gpu-check.sh) sets QDISTILL_TEST_GPU=1 to run the tests marked `gpu` there.
if os.environ.get("QDISTILL_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
# torch.compile in the worker itself, not in a pool of compile subprocesses: with inductor's
# cache warm, a compiled vgg7 step took 5.7 s against 13.2 s with the pool (2 cores; cold:
# 36 s against 33 s)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# What the session's processes share, made by its first one (pytest's controller under
# xdist; its workers and their commands inherit the variable), removed as it exits: the
# kept rates (never the user's ~/.cache) and the trained students of `qdz_students`.
if "QD_TEST_SHARED" not in os.environ:
    os.environ["QD_TEST_SHARED"] = tempfile.mkdtemp(prefix="qd-tests-")
    atexit.register(shutil.rmtree, os.environ["QD_TEST_SHARED"], True)
os.environ.setdefault("QDISTILL_CACHE", os.path.join(os.environ["QD_TEST_SHARED"], "cache"))
# ... and what libraries keep in $HOME: ONNX Runtime's device id and usage database (under
# ~/.cache), matplotlib's config folder and font list (tests/test_onnx.py checks both)
os.environ["XDG_CACHE_HOME"] = os.path.join(os.environ["QD_TEST_SHARED"], "xdg-cache")
os.environ["MPLCONFIGDIR"] = os.path.join(os.environ["QD_TEST_SHARED"], "matplotlib")

import pytest  # noqa: E402

from qdistill import cli  # noqa: E402

# the small digits data every shared run uses: 240 training images, 80 test images, with
# the course's recipe (its per-epoch rates are what many tests check; studies in the suite
# and tests/test_recipes.py train with the default, fast)
SMALL = ["--dataset", "digits", "--max-train", "240", "--max-test", "80", "--batch-size", "64", "--recipe", "course",
         "--quiet"]
SMALL_DATA = {"dataset": "digits", "max_train": 240, "max_test": 80}


# The longest files first: pytest-xdist hands files out in collection order, so the
# longest ones start first and the short ones fill in around them (measured here: the
# two workers then end within seconds of each other, not 25 s apart). By CPU seconds
# here, AMD EPYC, 2026-12-07, evening (the Ray files with their Ray processes: 133 both),
# test_faults 68, test_export 66, test_study 42, test_recipes 39, test_teachers 26.
LONGEST_FIRST = ("test_ray.py", "test_export.py", "test_faults.py", "test_study.py", "test_ray_auth.py",
                 "test_recipes.py", "test_teachers.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
    import torch
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (QDISTILL_TEST_GPU=1, scripts/gpu-check.sh)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """A vgg7 teacher run, 2 epochs on `SMALL`, trained once per session: in the session's
    temp folder, which its xdist workers share, by the first worker that asks (the other
    waits on the lock, then reads the finished run). Tests read it and must not write into it."""
    import fcntl
    from qdistill.training.rundir import RunDir
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, not a worker's
    out = root / "small-teacher" / "teacher"
    with open(root / "small-teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if not RunDir(out).finished:
            assert cli.main(["teacher", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    return out


def interrupted_in_epoch_2(monkeypatch, argv: list[str]) -> int:
    """``qdistill ARGV`` stopped by Ctrl-C during epoch 2's evaluation (the 4th prediction:
    the gradient-ratio probe at set-up; epoch 1: val, test; epoch 2: val), so epoch 1's
    checkpoint stays as after a kill -9 there. Returns the exit code (130)."""
    from qdistill.training import loop
    calls, real = {"n": 0}, loop.predict

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(loop, "predict", crashing)
    try:
        return cli.main(argv)
    finally:
        monkeypatch.setattr(loop, "predict", real)


def write_study(path, text: str, extra: str = ""):
    """A study config at ``path``: ``text`` with ``extra`` lines appended to its last section."""
    path.write_text(text + extra)
    return path
