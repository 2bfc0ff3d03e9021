"""A study that races (``study.search = "race"``): the driver trains seed by seed, stops
running dropped arms, writes the race's columns and ``race.json``, resumes mid-race with
the same decisions, and refuses bad race keys in one line. The runs' accuracies are
scripted (`scripted`) so the race's path is known; `test_a_real_race_*` trains."""
import contextlib
import csv
import io
import json

import pytest

from qdistill import cli
from qdistill.study import run as studylib
from qdistill.study.race import Rule
from qdistill.study.replay import grid_values
from qdistill.study.race import race_state
from qdistill.study.results import read_results

CONFIG = """
[data]
dataset = "digits"
max_train = 200
max_test = 60
[train]
epochs = 1
[study]
temperatures = [1.0, 4.0, 8.0]
questions = ["q1", "q2", "q3"]
seeds = [0, 1]
search = "race"
max_seeds = 8
first_test = 5
"""


def accuracy(name: str) -> float:
    """Scripted validation accuracy: T = 1 far behind in Q2 and Q3, T = 4 and T = 8 close
    (a 'wobble' by seed, so no test separates them)."""
    arm, seed = name.rsplit("-s", 1)
    wobble = [0.01, -0.01, 0.005, -0.004, 0.002, -0.003, 0.004, -0.002][int(seed) % 8]
    base = {"T1": 0.60, "T4": 0.90, "T8": 0.90 + wobble}[arm.rsplit("-", 1)[1]] if "q1" not in arm else 0.8
    return base + 0.001 * (int(seed) % 3)


def scripted(calls: list, stop_after: int | None = None):
    def fake_train(runs, *a, **k):
        for r in runs:
            if stop_after is not None and len(calls) == stop_after:
                raise KeyboardInterrupt  # Ctrl-C between two runs
            calls.append(r.name)
            r.out.path.mkdir(parents=True, exist_ok=True)
            v = accuracy(r.name)
            r.out.write_summary({"val_best_acc": v, "test_acc_at_val_best": v, "wall_s": 0.0})
    return fake_train


def study_args(cfg, out, *extra):
    return ["study", str(cfg), "--out", str(out), "--quiet", "--teacher", "TEACHER", *extra]


@pytest.fixture
def race_cfg(tmp_path, small_teacher):
    path = tmp_path / "race.toml"
    path.write_text(CONFIG)
    return path, str(small_teacher)


def run_race(monkeypatch, cfg, teacher, out, calls, stop_after=None):
    monkeypatch.setattr(studylib, "train", scripted(calls, stop_after))
    args = [a if a != "TEACHER" else teacher for a in study_args(cfg, out)]
    return cli.main(args)


@pytest.fixture(scope="module")
def whole_race(tmp_path_factory, small_teacher):
    """The race of `CONFIG` run once to its end, for the tests that read it (none writes
    into it): its folder, the runs it trained in their order, and what it printed."""
    root = tmp_path_factory.mktemp("race")
    cfg = root / "race.toml"
    cfg.write_text(CONFIG)
    calls: list[str] = []
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        assert run_race(mp, cfg, str(small_teacher), root / "S", calls) == 0
    return root / "S", calls, out.getvalue()


def test_the_race_drops_t1_and_runs_no_more_of_it(whole_race):
    study, calls, out = whole_race
    assert "estimate: at most " in out  # the full grid's time: the race may stop sooner
    rows = read_results(study / "results.csv")
    by_run = {r["run"]: r for r in rows}
    # seeds 0, 1 listed, then 2, 3, ... counted on; T = 1 dropped at the first test (5 seeds:
    # always last, Friedman's Q = 7.6, p = 0.022; Conover's difference 4.7 < 15 - 7)
    for q in ("q2-soft", "q3-hard+soft"):
        assert [r["seed"] for r in rows if r["run"].startswith(f"{q}-T1-")] == [0, 1, 2, 3, 4]
        assert by_run[f"{q}-T1-s4"]["race_dropped_after"] == 4
        assert by_run[f"{q}-T1-s4"]["race_test"] == "friedman"
        assert by_run[f"{q}-T1-s4"]["race_statistic"] == pytest.approx(7.6) and by_run[f"{q}-T1-s4"]["race_p"] < 0.05
        assert [r["seed"] for r in rows if r["run"].startswith(f"{q}-T4-")] == list(range(8))
        assert by_run[f"{q}-T4-s7"]["race_dropped_after"] is None and by_run[f"{q}-T4-s7"]["race_test"] == "wilcoxon"
    assert [r["seed"] for r in rows if r["question"] == "q1"] == list(range(8))  # the reference keeps pace
    assert sorted(calls) == sorted(r["run"] for r in rows)  # every run trained once, none beyond the race
    assert len(calls) == 8 + 2 * (5 + 8 + 8)
    state = json.loads((study / "race.json").read_text())
    assert state["runs"] == len(calls) and state["grid_runs"] == 7 * 8
    assert state["questions"]["q2"]["alive"] == ["q2-soft-T4", "q2-soft-T8"]
    # the written state is the replay of results.csv
    arms, values, _ = grid_values(rows)
    again = race_state(arms, values, list(range(8)), Rule("friedman", 5, 8, 0.95))
    assert again.to_json() == state
    report = (study / "report.md").read_text()
    assert "Q2: T = 4 and T = 8 remain after 8 seeds; no test separates them at 95%." in report
    assert f"{len(calls)} student runs of the full grid's 56" in report
    assert "| Q2 | T = 1 | 60.00 | 60.10 | 60.20 | 60.00 | 60.10 ✗ | · | · | · | after seed 4 | 0.0224 |" in report


def test_a_race_interrupted_mid_seed_resumes_with_the_same_decisions(race_cfg, whole_race, monkeypatch,
                                                                      tmp_path):
    cfg, teacher = race_cfg
    a, whole, _ = whole_race  # the same race, not interrupted
    first: list[str] = []
    assert run_race(monkeypatch, cfg, teacher, tmp_path / "B", first, stop_after=23) == 130  # within seed 3
    assert not (tmp_path / "B" / "race.json").read_text() == (a / "race.json").read_text()
    rest: list[str] = []
    assert run_race(monkeypatch, cfg, teacher, tmp_path / "B", rest) == 0
    assert first + rest == whole  # the same runs, in the same order, none twice
    for name in ("race.json", "results.csv"):
        assert (tmp_path / "B" / name).read_text() == (a / name).read_text()


@pytest.mark.parametrize("setting, message", [
    ("study.first_test=1", "study.first_test must be >= 2"),
    ("study.confidence=1.0", "study.confidence in (0, 1)"),
    ("study.max_seeds=2", "study.max_seeds 2 is below study.first_test 5"),
    ('study.race_test="anova"', "study.race_test must be one of friedman, t-holm"),
    ('study.search="bandit"', "study.search must be one of grid, race"),
    ("study.temperatures=[4.0]", "needs a question of two arms or more"),
])
def test_bad_race_keys_are_one_line_and_exit_2(tmp_path, capsys, setting, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    for plan in ([], ["--plan"]):
        assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--set", setting, *plan]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "S").exists()


def test_plan_says_the_worst_case_and_the_expected_runs_after_a_pilot(race_cfg, monkeypatch, tmp_path, capsys):
    cfg, teacher = race_cfg
    args = [a if a != "TEACHER" else teacher for a in study_args(cfg, tmp_path / "S")]
    monkeypatch.setattr("qdistill.study.plan.measured_estimate", lambda *a, **k: [])
    assert cli.main([*args, "--plan"]) == 0
    out = capsys.readouterr().out
    assert "at most 56 student runs (the grid of 8 seeds), at least 35" in out and "unknown until" in out
    assert run_race(monkeypatch, cfg, teacher, tmp_path / "S", [], stop_after=35) == 130  # the pilot: 5 seeds
    capsys.readouterr()
    assert cli.main([*args, "--plan"]) == 0
    out = capsys.readouterr().out
    expected = float(out.split("; about ")[1].split(" expected")[0])
    assert 35 <= expected <= 56 - 2 * 3  # T = 1 goes at the pilot's own test in every draw


def test_replay_race_on_a_finished_grid(race_cfg, monkeypatch, tmp_path, capsys):
    cfg, teacher = race_cfg
    grid = tmp_path / "grid.toml"
    grid.write_text(CONFIG.replace('search = "race"', 'search = "grid"').replace("seeds = [0, 1]",
                                                                                 "seeds = [0, 1, 2, 3, 4, 5, 6, 7]"))
    calls: list[str] = []
    assert run_race(monkeypatch, grid, teacher, tmp_path / "G", calls) == 0 and len(calls) == 56
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "G"), "--replay-race", "--orders", "5"]) == 0
    out = capsys.readouterr().out
    # as the race above: T = 1 goes after 5 seeds in both questions; 50 of 56 runs
    assert "Q2: T = 4 and T = 8 remain after 8 seeds; no test separates them at 95%." in out
    assert "50 of the grid's 56 student runs (11% saved)" in out
    # T = 1 is last at every seed, so it goes at the first test in every order; T = 8 - T = 4 is the wobble
    # (4 seeds each way: no 6, 7 or 8 of them reject), so every order decides alike
    assert "in 5 random seed orders: 11% of the runs saved on average" in out
    assert "  Q2 | T = 8 | 1 of 2 | 5/5 | 0/5 | 0/5 | 8.0" in out and "  Q3 | T = 8 | 1 of 2 | 5/5 | 0/5 | 0/5 | 8.0" in out
    assert cli.main(["report", str(tmp_path / "G"), "--replay-race", "--set", "study.first_test=9"]) == 2
    assert "study.max_seeds 8 is below study.first_test 9" in capsys.readouterr().err
    assert not (tmp_path / "G" / "race.json").exists()  # the replay writes nothing


def test_replay_race_needs_a_finished_grid(whole_race, capsys):
    assert cli.main(["report", str(whole_race[0]), "--replay-race"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qdistill: error: the replay needs a finished grid: q2-soft-T1 has no ok run at seed 5"


def test_on_ray_each_seeds_surviving_arms_go_out_together(race_cfg, monkeypatch, tmp_path):
    """With ``--workers 2`` the driver hands Ray one batch per seed: every surviving arm's
    run of that seed at once (`cluster.run_units` runs a batch's units side by side,
    tests/test_ray.py). Ray itself is replaced here by a stand-in that writes the
    scripted summaries, so only the driver's scheduling is under test."""
    from contextlib import contextmanager
    from qdistill.study import cluster
    cfg, teacher = race_cfg
    batches: list[list[str]] = []

    @contextmanager
    def session(address, num_cpus=None):
        yield object()

    def run_units(ray, study, units, data, bundle, tasks, on_done=lambda: None):
        batches.append([u.label for u in units])
        for u in units:
            for _, folder in u.runs:
                run = study.folder(folder)
                run.path.mkdir(parents=True, exist_ok=True)
                run.write_summary({"val_best_acc": accuracy(run.name), "test_acc_at_val_best": 0.5, "wall_s": 0.0})
            on_done()

    monkeypatch.setattr(cluster, "import_ray", lambda: None)
    monkeypatch.setattr(cluster, "session", session)
    monkeypatch.setattr(cluster, "resources", lambda *a: (1.0, 0.0))
    monkeypatch.setattr(cluster, "run_units", run_units)
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--quiet", "--teacher", teacher,
                     "--workers", "2"]) == 0
    arms = ["q1-hard-T1", "q2-soft-T1", "q2-soft-T4", "q2-soft-T8", "q3-hard+soft-T1", "q3-hard+soft-T4",
            "q3-hard+soft-T8"]
    assert batches == [[f"{a}-s{s}" for a in arms] for s in range(5)] + \
        [[f"{a}-s{s}" for a in arms if "-T1" not in a or a.startswith("q1")] for s in range(5, 8)]
