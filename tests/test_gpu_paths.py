"""The CUDA paths, checked on the CPU: each defect found by reading them has a test here
that fails without its fix, through spies and fake devices (``torch.device("cuda")``
can be named without a GPU; what would run on it is intercepted). The tests marked
``gpu`` run on a real GPU only (scripts/gpu-check.sh)."""
import os

import pytest
import torch

from qdistill.data import augment
from qdistill.data.registry import load
from qdistill.errors import ConfigError
from qdistill.training import checkpoint, device as devicelib
from qdistill.training.teacher import Teacher
from qdistill.training.teacher_files import Preprocess

from conftest import SMALL_DATA

CUDA = torch.device("cuda", 0)


def test_the_suite_runs_on_the_cpu_whatever_the_machine():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    assert devicelib.pick_device("auto").type == "cpu"


# 1. a teacher moved to the GPU is asked later for logits without a device
def test_a_teacher_keeps_computing_where_it_last_ran(small_teacher, monkeypatch):
    """open_teacher computes the test logits on the run's device, then the usefulness
    check asks for the training split's without one: they must come from that device too
    (a CUDA module fed CPU batches fails)."""
    from qdistill.training import teacher as teacherlib
    seen = []
    monkeypatch.setattr(teacherlib, "predict", lambda model, x, device: seen.append(device) or torch.zeros(len(x), 10))
    t = Teacher.open(small_teacher, load(SMALL_DATA))
    t.evaluate(torch.device("meta"), train=False)
    t.val_acc = float("nan")  # no validation split: the check computes the training split's logits
    with pytest.raises(Exception, match="not clearly above chance"):
        t.check_useful()  # all-zero logits: at chance
    assert seen == [torch.device("meta"), torch.device("meta")]


# 2. per-step host syncs
def test_augmentation_sends_its_random_numbers_through_pinned_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        calls.append(("to", str(a[0]) if a else str(k.get("device")), k.get("non_blocking", False)))
        return self if a and str(a[0]).startswith("cuda") else real_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", to)
    augment.to_device(torch.zeros(3), CUDA)
    assert calls == ["pin", ("to", "cuda:0", True)]
    calls.clear()
    augment.to_device(torch.zeros(3), torch.device("cpu"))
    assert "pin" not in calls


def test_a_declared_mean_and_std_are_made_once_not_per_batch(monkeypatch):
    prep = Preprocess({"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]})
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    x = torch.rand(4, 3, 32, 32)
    first = prep(x)
    for _ in range(5):
        assert torch.equal(prep(x), first)
    assert len(made) == 2  # mean and std, once each


# 3. (the conftest above) and 4. determinism on CUDA
def test_deterministic_settings_on_cuda_only_and_restored_afterwards(monkeypatch):
    """Set while a run trains, on CUDA only; afterwards every global flag and the variable
    are as they were, also when the run raises (issue 30, item 4)."""
    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.setattr(cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with devicelib.deterministic(torch.device("cpu"), True):
        assert cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    try:
        with pytest.raises(RuntimeError, match="inside"), devicelib.deterministic(CUDA, True):
            assert cudnn.deterministic and not cudnn.benchmark
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            raise RuntimeError("inside")
        assert not cudnn.deterministic and cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.use_deterministic_algorithms(False)


# 5. bf16 only where the hardware has it
@pytest.mark.parametrize("capability,want", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_from_compute_capability_8(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert devicelib.precision_of(CUDA, "auto") == want
    assert devicelib.precision_of(torch.device("cpu"), "auto") == "fp32"
    assert devicelib.precision_of(CUDA, "fp32") == "fp32"


# 8. the configured device's RNG, and devices that do not exist
def test_the_rng_of_the_configured_gpu_not_the_current_one(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": seen.append(("get", str(device))) or 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": seen.append(("set", str(device))))
    state = devicelib.rng_state(torch.device("cuda:1"))
    devicelib.restore_rng(state, torch.device("cuda:1"))
    assert seen == [("get", "cuda:1"), ("set", "cuda:1")]
    assert devicelib.rng_state(torch.device("cpu")) is None


def test_a_gpu_index_beyond_the_machines_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device is 'cuda:3' but this machine has 1 GPU\(s\): cuda:0$"):
        devicelib.pick_device("cuda:3")


# 6. fractional GPUs
def test_gpus_per_run_is_a_fraction_or_whole_gpus():
    from qdistill.resolve import resolve
    for ok in ("0.5", "1", "2", "auto"):
        resolve(None, None, [f"study.gpus_per_run={ok}"])
    with pytest.raises(ConfigError, match="a fraction of one GPU"):
        resolve(None, None, ["study.gpus_per_run=1.5"])


# 10. minor
def test_checkpoints_hold_cpu_tensors(monkeypatch, tmp_path):
    moved = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: moved.append(tuple(self.shape)) or real(self))
    checkpoint.save({"model": {"w": torch.zeros(2, 3)}, "rng": [torch.zeros(4)], "epoch": 1}, tmp_path / "c.pt")
    assert sorted(moved) == [(2, 3), (4,)]


def test_live_teacher_logits_are_float32_whatever_the_students_precision(small_teacher):
    data = load(SMALL_DATA)
    t = Teacher.open(small_teacher, data)
    idx = torch.arange(8)
    xb = data.x_train[:8].float() / 255
    live = t.batch_targets(idx, augment=True, device=torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = live(idx, xb)
    with torch.no_grad():
        want = t.model(xb)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_the_loop_keeps_one_copy_of_each_split_on_the_device(monkeypatch, tmp_path):
    """The training set is indexed on the host and each split moved once: no whole-set copy."""
    from qdistill.resolve import resolve
    from qdistill.training import loop
    data = load({"dataset": "digits", "max_train": 100, "max_test": 20})
    moved = []
    real = torch.Tensor.to

    def to(self, *a, **k):
        moved.append(self.shape[0] if self.dim() == 4 else None)
        return real(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", to)
    cfg = resolve(None, None, ["data.max_train=100", "data.max_test=20", "train.epochs=1", "train.batch_size=50"],
                  role="student")
    loop.train([(cfg, tmp_path / "r")], data, progress=False)
    assert len(data.x_train) not in [n for n in moved if n is not None]  # never the whole set


@pytest.mark.slow  # four small runs, a study and its export, in subprocesses too
def test_the_gpu_checks_cpu_runnable_parts_pass():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu-check.sh"), "--cpu"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, cwd=root)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(":")[0].split(" (")[0] for line in lines] == [
        "PASS device", "PASS syncs", "PASS rerun and resume", "PASS TorchScript teacher", "PASS study and export",
        "SKIP bench", "SKIP gpu tests"]


@pytest.mark.gpu
def test_on_a_gpu_a_rerun_gives_the_same_metrics_in_the_precision_its_capability_allows(tmp_path):
    from qdistill.resolve import resolve
    from qdistill.training import loop
    from qdistill.training.rundir import RunDir
    cfg = resolve(None, None, ["data.max_train=512", "data.max_test=128", "train.epochs=2", "train.device=cuda"],
                  role="student")
    data = load(cfg["data"])
    for name in ("a", "b"):
        loop.train([(cfg, tmp_path / name)], data, progress=False)
    rows = [[{k: v for k, v in m.items() if k not in ("wall_s", "img_per_s")} for m in RunDir(tmp_path / n).read_metrics()]
            for n in ("a", "b")]
    assert rows[0] == rows[1]
    want = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp32"
    assert RunDir(tmp_path / "a").read_summary()["precision"] == want


def test_the_gradient_quantizer_computes_bf16_gradients_in_float32():
    """Issue 23, item 7: a bf16 gradient is quantized as its float32 value would be (the
    same noise draws), then rounded to bf16 once; computed in bf16, the scaling by 2m and
    the noise lose bits and the result differs."""
    from qdistill.nn.quantizers import quantize_gradient
    g = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    torch.manual_seed(1)
    got = quantize_gradient(g, 2 ** 8 - 1)
    torch.manual_seed(1)
    want = quantize_gradient(g.float(), 2 ** 8 - 1).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("kd", ["kl", "dkd", "ls", "dist"])
@pytest.mark.parametrize("loss", ["hard", "soft", "hard+soft", "hard+softgt"])
def test_losses_of_bf16_logits_are_the_losses_of_their_float32_values(loss, kd):
    """Issue 23, item 10: bf16 logits are upcast before any division by T."""
    from qdistill.nn.losses import build_loss
    gen = torch.Generator().manual_seed(0)
    z, t = (3 * torch.randn(16, 10, generator=gen)).bfloat16(), 3 * torch.randn(16, 10, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    fn = build_loss(loss, 3.0, 9.0, kd=kd)
    assert torch.equal(fn(z, t, y), fn(z.float(), t, y))
