"""``qdistill bench --scaling``: the per-student rate of fused groups against K = 1, and
the step rate it is built on (`qdistill.bench.step_rate.measure_step_rate`)."""
import json
import itertools

import pytest

from qdistill.bench import step_rate
from qdistill.bench import training as bench
from qdistill.bench.step_rate import measure_step_rate


def test_scaling_takes_the_median_and_divides_by_k1(monkeypatch):
    calls = []
    spread = itertools.cycle([1.0, 3.0, 2.0])  # median 2.0 of each K's three runs

    def fake_rate(*, k, **kw):
        calls.append((k, kw["batch"]))
        return 100.0 * k * next(spread)

    monkeypatch.setattr(step_rate, "measure_step_rate", fake_rate)
    r = bench.scaling(ks=(1, 2, 5), batch=8, repeats=3, log=lambda *a: None)
    assert r["per_student_img_s"] == {"1": 200.0, "2": 400.0, "5": 1000.0}
    assert r["vs_k1"] == {"1": 1.0, "2": 2.0, "5": 5.0}
    assert calls == [(1, 8)] * 3 + [(2, 8)] * 3 + [(5, 8)] * 3
    assert r["fp32_matmul_gflop_s"] > 0 and 0 < r["conv_vs_matmul"]
    assert r["device"].startswith("cpu: ")
    assert set(r["first_activation_clamp_gb_s"]) == {"1", "2", "5"}


def test_scaling_runs_for_real_and_prints_a_table():
    r = bench.scaling(ks=(1, 2), batch=4, steps=2, repeats=1, log=lambda *a: None)
    rate = r["per_student_img_s"]
    assert r["vs_k1"] == {"1": 1.0, "2": rate["2"] / rate["1"]}
    table = bench.format_scaling(r)
    assert "vs K=1" in table and "GFLOP/s" in table and len(table.splitlines()) == 6


def test_measure_step_rate_is_student_images_over_the_timed_steps(monkeypatch):
    """k * batch * steps / seconds, timing only the steps after the warm-up: a clock that
    advances 0.5 s per reading makes every timed stretch 0.5 s long."""
    clock, steps = itertools.count(0.0, 0.5), []
    monkeypatch.setattr(step_rate.time, "perf_counter", lambda: next(clock))
    real = step_rate.train_step
    monkeypatch.setattr(step_rate, "train_step", lambda net, *a: steps.append(len(net.split())) or real(net, *a))
    assert measure_step_rate(k=2, batch=4, steps=3, warmup=1) == 2 * 4 * 3 / 0.5
    assert steps == [2] * 4  # warm-up and timed steps of a group of 2
    steps.clear()
    assert measure_step_rate(k=1, batch=4, steps=1, warmup=2, channels_last=False) == 1 * 4 * 1 / 0.5
    assert steps == [1] * 3


# issue 23, item 9: on a GPU, bench reports GPU memory, times enough steps at every K,
# compares the convolutions with a matmul in the same arithmetic, and runs in the
# precision training would use there (checked here with the CUDA calls intercepted)
@pytest.fixture
def tf32_flags():
    """torch's TF32 flags as they were, afterwards (monkeypatch cannot restore cuBLAS's)."""
    import torch
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_scaling_times_5_steps_at_every_k_in_the_default_precision_and_tf32_like_convs(monkeypatch, tf32_flags):
    import torch
    from qdistill.bench import machine
    calls, seen, tf32 = [], [], []
    monkeypatch.setattr(step_rate, "measure_step_rate", lambda *, k, **kw: calls.append((k, kw["steps"],
                                                                                       kw["precision"])) or 1.0)
    monkeypatch.setattr(bench, "precision_of", lambda dev, p: seen.append((dev.type, p)) or "bf16")
    monkeypatch.setattr(bench, "_giga_per_s", lambda fn, amount, dev, repeats=10: tf32.append(
        torch.backends.cuda.matmul.allow_tf32) or 1.0)
    # torch's defaults: convolutions in TF32, matmuls not
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    r = bench.scaling(ks=(1, 2, 5, 10), batch=8, steps=20, repeats=1, log=lambda *a: None)
    assert calls == [(1, 20, "bf16"), (2, 10, "bf16"), (5, 5, "bf16"), (10, 5, "bf16")]  # K=10: 5, not 2
    assert seen == [("cpu", "auto")] and r["precision"] == "bf16"
    assert tf32[0] is True and tf32[1:] == [False] * (len(tf32) - 1)  # the matmul only, then restored
    assert not torch.backends.cuda.matmul.allow_tf32 and r["tf32"] is False  # on the CPU: no TF32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
    with machine.matmul_tf32_like_convolutions() as on:
        assert not on and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32


def test_measure_step_rate_runs_in_the_precision_it_is_given(monkeypatch):
    asked = []
    real = step_rate.autocast_for
    monkeypatch.setattr(step_rate, "autocast_for", lambda dev, p: asked.append(p) or real(dev, p))
    assert measure_step_rate(k=1, batch=2, steps=1, warmup=0, precision="bf16") > 0
    assert asked == ["bf16"]


def test_a_phase_on_cuda_reports_gpu_memory_and_compiles_in_its_precision(monkeypatch):
    import torch
    from qdistill.bench import machine
    modes, put = [], []
    monkeypatch.setattr(bench.fake, "load", lambda: None)
    monkeypatch.setattr(bench, "bench_qdistill", lambda *a: modes.append(a[-1]) or (100.0, 2.0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    queue = type("Q", (), {"put": lambda self, x: put.append(x)})()
    for compiled_step, mode in ((True, "compiled-bf16"), (False, "bf16")):
        bench._phase("qdistill", ("cuda", 0, 1, 2, True, "bf16", None, compiled_step), torch.get_num_threads(), queue)
        assert modes.pop() == mode and put.pop() == (100.0, 3.0, 2.0)  # GPU MB, not the host's RSS
    assert machine.memory_kind(torch.device("cuda")) == "gpu" and machine.memory_kind(torch.device("cpu")) == "rss"
    assert machine.peak_memory_mb(torch.device("cpu")) > 10  # this process's RSS: torch alone is more


def test_the_table_names_gpu_memory_and_the_precision():
    r = {"reference_img_s": 1.0, "single_img_s": 2.0, "fused_img_s": 3.0, "k": 4, "single_compiled": False,
         "single_vs_reference": 2.0, "fused_vs_reference": 3.0, "device": "NVIDIA H100", "torch_version": "x",
         "threads": 1, "batch": 256, "steps": 10, "reference_peak_rss_mb": 1, "single_peak_rss_mb": 2,
         "peak_rss_mb": 3, "precision": "bf16", "memory": "gpu", "teacher_cache_s": 1.0, "data_epoch_s": 1.0,
         "data_epoch_augment_s": 1.0, "train_epoch_s": 1.0, "data_vs_train_epoch": 1.0}
    lines = bench.format_table(r).splitlines()
    assert lines[1].endswith("peak GPU MB") and "(b) and (c) bf16 autocast" in lines[5]
    assert bench.format_table({**r, "memory": "rss", "precision": "fp32"}).splitlines()[1].endswith("peak RSS MB")


def test_bench_model_times_the_configured_student(monkeypatch, capsys):
    """``bench --model M --set ...``: the run_rate of M with that scheme, nothing else."""
    from qdistill import cli
    seen = []

    def fake_rate(cfg, role, compiled_steps, dev, min_seconds):
        seen.append((role, cfg["student"]["model"], cfg["student"]["scheme"]))
        return (123.0, 2.0) if compiled_steps else (100.0, 0.0)
    monkeypatch.setattr(step_rate, "run_rate", fake_rate)
    assert cli.main(["bench", "--model", "resnet20", "--set", "student.scheme=lsq", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(seen) == {("student", "resnet20", "lsq")}
    assert out["model"] == "resnet20" and out["default_eager_img_s"] == 100.0


def test_the_default_batch_rates_are_medians_of_alternating_turns(monkeypatch):
    """Eager and compiled take turns (a slow spell weighs on both); each rate is the median
    of its turns, the compile time the first compiled turn's."""
    calls, rates = [], {False: iter([100.0, 300.0, 200.0]), True: iter([(250.0, 9.0), (500.0, 1.0), (260.0, 1.0)])}

    def fake_rate(cfg, role, compiled_steps, dev, min_seconds):
        calls.append((role, cfg["student"]["model"], compiled_steps))
        r = next(rates[compiled_steps])
        return r if compiled_steps else (r, 0.0)
    monkeypatch.setattr(step_rate, "run_rate", fake_rate)
    got = step_rate.default_batch("cpu", True, lambda line: None)
    assert calls == [("student", "vgg7", False), ("student", "vgg7", True)] * step_rate.DEFAULT_REPEATS
    assert got == {"default_model": "vgg7", "default_batch": 64, "default_img_s": 260.0, "default_eager_img_s": 200.0,
                   "default_compile_s": 9.0, "default_compiled_vs_eager": 1.3}
