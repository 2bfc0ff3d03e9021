"""The prepared GPU check: what can only be seen on a real GPU, in one short run that
prints one line per check (``scripts/gpu-check.sh``; ``--cpu`` runs its CPU-runnable
parts on small data, as CI does). Whoever gets a GPU runs it once and puts its lines in
the README with the device named.

Checks: the device and its compute capability; host synchronisations per training step
with augmentation none and light (CUDA's sync debug mode counts them there; on the CPU
qdistill's own ``item``-style calls); a rerun and a killed-then-resumed run give the
metrics of the first (deterministic settings on); a TorchScript teacher with
augmentation; a study and its export; ``qdistill bench --json`` at K = 16 with GPU
memory; the tests marked ``gpu``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..data.registry import load
from ..resolve import resolve
from ..training import loop
from ..training.device import pick_device
from ..training.rundir import RunDir
from ..bench.machine import device_name

TIMING = ("wall_s", "img_per_s", "node")


def _cfg(device: torch.device, *sets, role: str = "student") -> dict:
    """A small digits run on ``device`` (the whole of digits on a GPU)."""
    n = ["data.max_train=128", "data.max_test=32"] if device.type != "cuda" else []
    return resolve(None, None, [*n, "train.batch_size=32", "train.epochs=2", f"train.device={device}", *sets],
                   role=role)


def _cli(device: torch.device, *args) -> str:
    """``qdistill ARGS`` in this process (as a user types it); its output."""
    from .main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, f"exit {code}: {err.getvalue().strip()[-300:]}"
    return out.getvalue()


def _metrics(run) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in RunDir(run).read_metrics()]


@contextlib.contextmanager
def _counting_syncs(device: torch.device):
    """Counts host synchronisations: CUDA's sync debug mode warns on each; on the CPU
    (no device to wait for) qdistill's own calls of ``item``-style methods stand in."""
    count = {"n": 0}
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield count
        torch.cuda.set_sync_debug_mode("default")
        count["n"] = sum("synchroniz" in str(w.message) for w in caught)
        return
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    real = {n: getattr(torch.Tensor, n) for n in names}

    def counted(name):
        def f(self, *a, **k):
            count["n"] += sys._getframe(1).f_globals.get("__name__", "").startswith("qdistill")
            return real[name](self, *a, **k)
        return f
    for n in names:
        setattr(torch.Tensor, n, counted(n))
    try:
        yield count
    finally:
        for n, f in real.items():
            setattr(torch.Tensor, n, f)


def check_syncs(tmp: Path, device: torch.device) -> str:
    """Syncs of a 1-epoch run of 2 and of 8 steps must be equal: none per step."""
    out = []
    for augment in ("none", "light"):
        counts = []
        for n in (2, 8):
            cfg = _cfg(device, f"data.max_train={n * 32 + 32}", "data.max_test=32", "train.epochs=1",
                       f"data.augment={augment}")
            data = load(cfg["data"])
            with _counting_syncs(device) as c:
                loop.train([(cfg, tmp / f"sync-{augment}-{n}")], data, progress=False)
            counts.append(c["n"])
        assert counts[0] == counts[1], f"augment {augment}: {counts[0]} syncs at 2 steps, {counts[1]} at 8"
        out.append(f"augment {augment}: {counts[0]} per epoch at 2 and at 8 steps")
    return "; ".join(out)


class _Killed(Exception):
    pass


def check_rerun_and_resume(tmp: Path, device: torch.device) -> str:
    cfg = _cfg(device, "train.epochs=3")
    data = load(cfg["data"])
    loop.train([(cfg, tmp / "a")], data, progress=False)
    loop.train([(cfg, tmp / "b")], data, progress=False)
    assert _metrics(tmp / "a") == _metrics(tmp / "b"), "a rerun differs"
    real = loop._write

    def kill_after_two(s, evaluated, improved):
        real(s, evaluated, improved)
        if len(s.members[0].metrics) == 2:
            raise _Killed
    loop._write = kill_after_two
    try:
        loop.train([(cfg, tmp / "c")], data, progress=False)
    except _Killed:
        pass
    finally:
        loop._write = real
    loop.train([(cfg, tmp / "c")], data, existing="resume", progress=False)
    assert _metrics(tmp / "a") == _metrics(tmp / "c"), "a resumed run differs"
    return f"3 epochs: rerun and resume after epoch 2 equal to the first run ({len(data.x_train)} images)"


def check_torchscript_teacher(tmp: Path, device: torch.device) -> str:
    from ..training.checkpoint import load_model
    tcfg = _cfg(device, "train.epochs=1", role="teacher")
    data = load(tcfg["data"])
    loop.train([(tcfg, tmp / "teacher")], data, progress=False)
    model, _ = load_model(tmp / "teacher")
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 3, 32, 32)), str(tmp / "t.pt"))
    _cli(device, "student", "--teacher", tmp / "t.pt", "--dataset", "digits", "--max-train", "128", "--max-test",
         "32", "--augment", "light", "--loss", "hard+soft", "--epochs", "1", "--device", device,
         "--allow-weak-teacher", "--quiet", "--out", tmp / "ts-student")
    return f"TorchScript teacher, augment light: student on {RunDir(tmp / 'ts-student').read_summary()['device']}"


def check_study_and_export(tmp: Path, device: torch.device) -> str:
    """The demo study on a GPU (a small one on the CPU), then its Q3 student exported."""
    small = device.type != "cuda"
    args = ["study", "configs/demo.toml", "--out", tmp / "study", "--quiet", "--device", device]
    if small:
        args += ["--max-train", "128", "--max-test", "32", "--epochs", "1", "--set", "study.seeds=[0]",
                 "--set", "study.temperatures=[4.0]", "--set", "study.teacher_epochs=1",
                 "--set", "study.questions=['q3']", "--allow-weak-teacher"]
    t0 = time.perf_counter()
    _cli(device, *args)
    _cli(device, "export", tmp / "study" / "runs" / "q3-hard+soft-T4-s0", "--out", tmp / "s.qdz")
    return f"{'a small' if small else 'the demo'} study in {time.perf_counter() - t0:.0f} s, its Q3 student exported"


def check_bench(tmp: Path, device: torch.device) -> str:
    """``qdistill bench --json`` at K = 16: its figures, GPU memory included."""
    r = json.loads(_cli(device, "bench", "--json", "--k", "16", "--device", device).strip().splitlines()[-1])
    return json.dumps({k: v for k, v in r.items() if isinstance(v, (int, float, str))})


def check_gpu_tests(tmp: Path, device: torch.device) -> str:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True, env={**os.environ, "QDISTILL_TEST_GPU": "1"})
    assert proc.returncode in (0, 5), proc.stdout.strip()[-300:]  # 5: none collected
    return proc.stdout.strip().splitlines()[-1]


CHECKS = (("syncs", check_syncs, True), ("rerun and resume", check_rerun_and_resume, True),
          ("TorchScript teacher", check_torchscript_teacher, True), ("study and export", check_study_and_export, True),
          ("bench", check_bench, False), ("gpu tests", check_gpu_tests, False))


def main(argv=None) -> int:
    cpu = "--cpu" in (argv if argv is not None else sys.argv[1:])
    device = torch.device("cpu") if cpu else pick_device("auto")
    if device.type != "cuda" and not cpu:
        print("FAIL device: no CUDA GPU (run with --cpu for the CPU-runnable checks)")
        return 1
    capability = "" if device.type != "cuda" else f", compute capability {torch.cuda.get_device_capability(device)}"
    print(f"PASS device: {device_name(device)}{capability}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="qdistill-gpu-check-") as tmp:
        for name, check, on_cpu in CHECKS:
            if cpu and not on_cpu:
                print(f"SKIP {name}: GPU only")
                continue
            t0 = time.perf_counter()
            try:
                detail = check(Path(tmp), device)
                print(f"PASS {name} ({time.perf_counter() - t0:.0f} s): {detail}", flush=True)
            except Exception as e:  # each check reports and the next one runs
                failed += 1
                print(f"FAIL {name} ({time.perf_counter() - t0:.0f} s): {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
