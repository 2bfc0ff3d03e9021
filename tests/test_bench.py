"""``qdistill bench --scaling``: the per-student rate of fused groups against K = 1, and
the step rate it is built on (`qdistill.bench.step_rate.measure_step_rate`)."""
import itertools

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
