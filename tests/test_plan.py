"""A study's cost before it starts: ``study --plan`` and the estimate's arithmetic."""
import json

import pytest

from qdistill import cli
from qdistill.resolve import resolve
from qdistill.study.plan import Rates, duration, estimate_lines


def test_plan_prints_the_runs_and_a_measured_estimate_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "S"
    # SVHN's files are not here: the plan needs only their known sizes
    assert cli.main(["study", "configs/homework.toml", "--out", str(out), "--plan", "--batch-size", "16",
                     "--data-dir", str(tmp_path / "nowhere"), "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan: a vgg7 teacher of 60 epochs, then 48 student runs of 60 epochs")
    assert lines[1] == "      each on 69,594 training images: 200.4 million student images in all"
    assert lines[2].startswith("estimate: ") and "img/s measured, eager steps, 1 thread)" in lines[2], lines
    assert not out.exists() and not (tmp_path / "nowhere").exists()


def test_estimate_is_images_over_measured_rates():
    cfg = resolve(sets=["study.seeds=[0]", "study.temperatures=[4.0]", "train.epochs=2"])  # 4 runs
    rates, one = Rates(teacher=100.0, student=50.0, compiled=False, threads=2), \
        Rates(teacher=60.0, student=40.0, compiled=False, threads=1)
    lines = estimate_lines(cfg, 1000, rates, one, cores=2)
    # teacher 2 x 1000 / 100 = 20 s; students 4 x 2 x 1000 / 50 = 160 s
    assert lines[0].startswith("estimate: 3 min of training here (teacher 100 img/s, student 50 img/s")
    # 2 workers of one thread: 20 s + 4 x 2 x 1000 / 40 / 2 = 120 s
    assert "with --workers 2 (1 thread each, student 40 img/s): 2 min;" in lines[1]
    left = estimate_lines(cfg, 1000, Rates(100.0, 50.0, True, 2, (7.0, 5.0)), left=(False, 1))
    assert left[0].startswith("estimate: 45 s of training")  # one run: 2 x 1000 / 50 + its 5 s compile
    assert [duration(s) for s in (89, 90, 5399, 5400)] == ["89 s", "2 min", "90 min", "1.5 h"]


def test_the_clock_says_runs_done_and_the_time_left_at_their_pace(monkeypatch):
    """Each line the study prints before a run and after it: 4 runs, the first done after
    100 s, so 3 more take about 300 s."""
    from qdistill.study import run as studyrun
    now = iter([1000.0, 1100.0, 1100.0])
    monkeypatch.setattr(studyrun.time, "perf_counter", lambda: next(now))
    clock = studyrun.Clock(4)                                 # t = 1000
    assert clock.left() == ""                                 # nothing done: no pace yet
    assert clock.tick() == "1/4 runs, about 5 min left"       # t = 1100: 3 x 100 s
    assert clock.left() == ", about 5 min left"               # t = 1100
    clock.done = 3
    assert clock.tick() == "4/4 runs"                         # the last: nothing left to say
    assert clock.left() == ""


def test_within_answers_in_time_or_stops_the_process_and_says_none():
    import time
    from qdistill.study.plan import _within
    assert _within(30, pow, 2, 10) == 1024             # in a fresh Python, through pickle
    assert _within(30, int, "not a number") is None    # it failed
    t0 = time.monotonic()
    assert _within(0.5, time.sleep, 60) is None        # too slow: stopped
    assert time.monotonic() - t0 < 10


def test_compiled_rates_that_miss_the_budget_give_eager_rates_and_say_so(monkeypatch, tmp_path):
    from qdistill.study import plan
    from qdistill.training import compiled
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "wanted", lambda *a: True)
    monkeypatch.setattr(plan, "_within", lambda seconds, fn, *args: None)  # as a cold compile does
    measured = []
    monkeypatch.setattr(plan, "measure_rates", lambda cfg, compiled_steps, threads: measured.append(compiled_steps)
                        or Rates(100.0, 50.0, compiled_steps, max(threads, 1)))
    lines = plan.measured_estimate(resolve("configs/homework.toml"))
    assert set(measured) == {False} and "eager steps" in lines[0]
    assert lines[-1] == "          (compiled rates not measured within 240 s: these are eager rates)"
    assert not (tmp_path / "rates.json").exists()  # nothing kept: the next plan measures again


def test_compiled_rates_are_measured_once_per_machine_and_models_and_kept(monkeypatch, tmp_path, capsys):
    """Issue 30, item 12: a 2-core machine reaches the compiled estimate. The first plan
    measures (as long as two cold compiles take), later ones read the kept rates; another
    student model is measured anew."""
    from qdistill.study import plan
    from qdistill.training import compiled
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "wanted", lambda *a: True)
    runs = []

    def within(seconds, fn, cfg, compiled_steps, cores):
        runs.append((seconds, cfg["student"]["model"]))
        return Rates(200.0, 80.0, True, 2, (30.0, 40.0)), Rates(120.0, 50.0, True, 1, (30.0, 40.0))
    monkeypatch.setattr(plan, "_within", within)
    monkeypatch.setattr(plan, "measure_rates", lambda *a: pytest.fail("no eager rates where compiled ones exist"))
    cfg = resolve("configs/homework.toml")
    first, again = plan.measured_estimate(cfg), plan.measured_estimate(cfg)
    assert runs == [(240.0, "vgg7")] and first[:-1] == again[:-1] and "compiled steps, 2 threads" in first[0]
    assert first[-1].endswith(f"40 s for a student here; measured now, kept in {tmp_path / 'rates.json'})")
    assert f"kept in {tmp_path / 'rates.json'})" in again[-1] and "measured now" not in again[-1]
    assert capsys.readouterr().err.count("measuring compiled rates once") == 1
    plan.measured_estimate(resolve("configs/homework.toml", sets=['student.model="resnet20"']))
    assert runs == [(240.0, "vgg7"), (240.0, "resnet20")]


def test_the_estimate_times_the_configured_models_and_scheme(monkeypatch):
    """The teacher's model and the student's own model, arguments, scheme and bits (not a
    DoReFa vgg7 whatever the config says)."""
    from qdistill.resolve import resolve
    from qdistill.study.plan import measure_rates
    from qdistill.training import rate
    built, real = [], rate.build_from_meta
    monkeypatch.setattr(rate, "build_from_meta", lambda meta: built.append(meta) or real(meta))
    monkeypatch.setattr(rate, "MIN_STEPS", 1)
    cfg = resolve(flags={"student": {"model": "resnet20", "scheme": "lsq", "weight_bits": 3, "act_bits": 2},
                         "teacher": {"model": "vgg7-wide"}, "train": {"batch_size": 4}})
    rates = measure_rates(cfg)
    assert [m["arch"] for m in built] == ["vgg7-wide", "resnet20"]
    assert {k: built[1]["build"][k] for k in ("scheme", "weight_bits", "act_bits")} == \
        {"scheme": "lsq", "weight_bits": 3, "act_bits": 2}
    assert rates.teacher > 0 and rates.student > 0


def test_a_studys_first_line_reads_eager_rates_kept_by_an_earlier_study(monkeypatch, tmp_path):
    """The eager rates behind a study's estimate are measured once per machine, models,
    batch, threads and device and kept beside the compiled ones; an edited model file,
    another thread count or another device is measured anew, and a kept compiled entry
    is not read as an eager one."""
    from qdistill.study import plan
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path))
    measured = []

    def measure(cfg, threads=0, device="cpu"):
        measured.append((threads, device, cfg["student"].get("model_sha256")))
        return Rates(100.0 + len(measured), 50.0, False, threads)
    monkeypatch.setattr(plan, "measure_rates", measure)
    cfg = resolve("configs/homework.toml")
    first = plan.study_rates(cfg, 1)
    assert plan.study_rates(cfg, 1) == first == Rates(101.0, 50.0, False, 1) and len(measured) == 1
    plan.study_rates(cfg, 2)
    plan.study_rates(cfg, 1, "cuda")
    edited = {**cfg, "student": {**cfg["student"], "model_sha256": "ab" * 32}}
    plan.study_rates(edited, 1)
    assert measured[1:] == [(2, "cpu", None), (1, "cuda", None), (1, "cpu", "ab" * 32)]
    plan._keep(plan._rates_key(cfg, plan._cores()), [Rates(9.0, 9.0, True, 2), None])  # a compiled entry
    assert plan.study_rates(cfg, 1) == first and len(measured) == 4
    kept = json.loads((tmp_path / "rates.json").read_text())
    key = plan._rates_key(cfg, plan._cores(), "eager, 1 threads, cpu")
    kept[key] = {"rates": [{"teacher": 1.0}]}  # not an entry this version writes: measured again
    (tmp_path / "rates.json").write_text(json.dumps(kept))
    assert plan.study_rates(cfg, 1) == Rates(105.0, 50.0, False, 1) and len(measured) == 5
