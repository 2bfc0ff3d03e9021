"""The temperature study end to end on a small digits subset."""
import base64
import csv
import json
import os

import pytest
import torch

from qdistill import cli
from qdistill.data.registry import load
from qdistill.nn.fused import FusedStudents
from qdistill.resolve import resolve
from qdistill.study import run as studylib
from qdistill.study.results import COLUMNS
from qdistill.training import evaluate, loop as trainlib
from qdistill.training.teacher import Teacher

CONFIG = """
[data]
dataset = "digits"
max_train = 200
max_test = 60
[train]
epochs = 1
batch_size = 64
[study]
temperatures = [1.0, 4.0]
seeds = [0]
teacher_epochs = 1
# one epoch on 200 images: the teacher is at chance, which these tests of the machinery
# accept on purpose (tests/test_faults.py tests the refusal)
allow_weak_teacher = true
"""
RUNS = ["q1-hard-T1-s0", "q2-soft-T1-s0", "q2-soft-T4-s0", "q3-hard+soft-T1-s0", "q3-hard+soft-T4-s0",
        "q4-hard+softgt-T1-s0", "q4-hard+softgt-T4-s0"]


def write_config(path, extra=""):
    path.write_text(CONFIG + extra)
    return path


def rows_of(study):
    with open(study / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def fused_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = write_config(root / "study.toml", "fused = true\n")
    assert cli.main(["study", str(cfg), "--out", str(root / "S"), "--quiet"]) == 0
    return root / "S", cfg


def test_study_writes_every_run_results_report_and_chosen(fused_study):
    s, _ = fused_study
    assert sorted(p.name for p in (s / "runs").iterdir()) == sorted(RUNS)
    for name in RUNS:
        for f in ("config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json"):
            assert (s / "runs" / name / f).is_file(), (name, f)
    rows = rows_of(s)
    assert [r["run"] for r in rows] == RUNS and all(r["status"] == "ok" for r in rows)
    by = {r["run"]: r for r in rows}
    assert by["q3-hard+soft-T4-s0"]["c"] == "16.0" and by["q2-soft-T4-s0"]["c"] == ""
    for name in RUNS:
        summary = json.loads((s / "runs" / name / "summary.json").read_text())
        assert float(by[name]["test_acc_at_val_best"]) == summary["test_acc_at_val_best"]
        assert float(by[name]["teacher_agreement"]) == summary["teacher_agreement"]
    md = (s / "report.md").read_text()
    html = (s / "report.html").read_text()
    assert "Q3" in md and "data:image/png;base64," in html and "src=\"http" not in html
    # 200 training images, val_fraction 0.05: 10 validation images, 10 points each
    assert ("The validation split holds 10 images per run: one image is 10.00 points of validation accuracy, "
            "so differences of a few images decide.") in md
    png = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    for q in ("q1", "q2", "q3", "q4"):
        assert (s / "chosen" / f"{q}.toml").is_file()
    diff = (s / "chosen" / "q3.diff").read_text()
    assert '-loss = "hard"' in diff and '+loss = "hard+soft"' in diff


def test_fused_members_are_paired_and_split_back_like_runs(fused_study):
    s, _ = fused_study
    prints = [json.loads((s / "runs" / n / "summary.json").read_text()) for n in RUNS]
    for key in ("init_sha256", "val_split_sha256", "batch_order_sha256"):
        assert len({p[key] for p in prints}) == 1, key
    assert all(p["fused_k"] == len(RUNS) for p in prints)
    # a split-back member evaluates (eval command) to the accuracy the fused network reported
    for name in ("q2-soft-T4-s0", "q4-hard+softgt-T1-s0"):
        code = cli.main(["eval", str(s / "runs" / name), "--json"])
        assert code == 0
    from qdistill.training.checkpoint import load_model
    data = load(resolve(None, None, ["data.max_train=200", "data.max_test=60"])["data"])
    for name in RUNS:
        model, _ = load_model(s / "runs" / name)
        acc = evaluate.accuracy(evaluate.predict(model, data.x_test), data.y_test)
        summary = json.loads((s / "runs" / name / "summary.json").read_text())
        assert acc == pytest.approx(summary["test_acc_at_val_best"], abs=1e-9), name


def test_rerun_skips_finished_runs_and_changed_config_needs_force(fused_study, capsys):
    s, cfg = fused_study
    stamps = {n: os.stat(s / "runs" / n / "summary.json").st_mtime_ns for n in RUNS}
    assert cli.main(["study", str(cfg), "--out", str(s), "--quiet"]) == 0
    assert stamps == {n: os.stat(s / "runs" / n / "summary.json").st_mtime_ns for n in RUNS}
    capsys.readouterr()
    changed = write_config(cfg.parent / "changed.toml", "").read_text().replace("[1.0, 4.0]", "[1.0, 2.0]")
    (cfg.parent / "changed.toml").write_text(changed)
    assert cli.main(["study", str(cfg.parent / "changed.toml"), "--out", str(s), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (s / "runs" / "q2-soft-T4-s0" / "summary.json").exists()  # nothing destroyed


def test_paired_design_across_conditions_and_seeds_unfused(tmp_path):
    cfg = write_config(tmp_path / "c.toml", "questions = ['q1', 'q2']\n")
    text = cfg.read_text().replace("seeds = [0]", "seeds = [0, 1]").replace("temperatures = [1.0, 4.0]",
                                                                            "temperatures = [4.0]")
    cfg.write_text(text)
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--quiet", "--no-fused"]) == 0
    p = {n: json.loads((tmp_path / "S" / "runs" / n / "summary.json").read_text())
         for n in ("q1-hard-T1-s0", "q2-soft-T4-s0", "q1-hard-T1-s1", "q2-soft-T4-s1")}
    for key in ("init_sha256", "val_split_sha256", "batch_order_sha256"):
        assert p["q1-hard-T1-s0"][key] == p["q2-soft-T4-s0"][key]
        assert p["q1-hard-T1-s1"][key] == p["q2-soft-T4-s1"][key]
        assert p["q1-hard-T1-s0"][key] != p["q1-hard-T1-s1"][key]
    assert "fused_k" not in p["q1-hard-T1-s0"]


def test_stale_teacher_cache_is_recomputed(fused_study, tmp_path):
    s, _ = fused_study
    data = load(resolve(None, None, ["data.max_train=200", "data.max_test=60"])["data"])
    stored = torch.load(s / "teacher_logits.pt", weights_only=True)
    good = stored["logits"].clone()
    assert stored["fingerprint"]["data"] == data.fingerprint
    stale = {**stored, "logits": torch.zeros_like(good),
             "fingerprint": {**stored["fingerprint"], "teacher": "0" * 64}}
    torch.save(stale, s / "teacher_logits.pt")
    logits = Teacher.open(s / "teacher", data).cached(s / "teacher_logits.pt", torch.device("cpu")).train_logits()
    assert torch.allclose(logits, good) and not torch.equal(logits, torch.zeros_like(good))
    assert torch.load(s / "teacher_logits.pt", weights_only=True)["fingerprint"] == stored["fingerprint"]
    # a cache whose fingerprint matches is used as it is
    torch.save({**stored, "logits": good + 1}, s / "teacher_logits.pt")
    logits = Teacher.open(s / "teacher", data).cached(s / "teacher_logits.pt", torch.device("cpu")).train_logits()
    assert torch.allclose(logits, good + 1)
    torch.save(stored, s / "teacher_logits.pt")


@pytest.fixture(scope="module")
def failed_then_rerun(tmp_path_factory):
    """A study of Q1 and Q2 whose run q2-soft-T1-s0 crashes, then the same command again:
    what each left (exit code, results.csv, report.md). Both commands take the default
    `study.fused` (on this CPU: unfused, which `test_fused_auto_fuses_on_cuda_only` checks
    on this study). The study, every run finished, is then where
    `test_force_redoes_only_what_the_changed_config_touches` starts (its first study,
    trained once for these tests)."""
    root = tmp_path_factory.mktemp("failed-run")
    cfg = write_config(root / "c.toml", "questions = ['q1', 'q2']\n")
    s = root / "S"
    real = studylib.train

    def flaky(runs, *a, **k):
        if runs[0].name == "q2-soft-T1-s0":
            raise RuntimeError("simulated crash")
        return real(runs, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(studylib, "train", flaky)
        first = cli.main(["study", str(cfg), "--out", str(s), "--quiet"])
    after_first = {"rows": {r["run"]: r for r in rows_of(s)}, "report": (s / "report.md").read_text()}
    second = cli.main(["study", str(cfg), "--out", str(s), "--quiet"])
    return {"first": first, **after_first, "second": second, "rows_then": rows_of(s), "study": s, "config": cfg}


@pytest.mark.slow  # several studies in a row
def test_a_failed_run_does_not_stop_the_study(failed_then_rerun):
    f = failed_then_rerun
    assert f["first"] == 1
    rows = f["rows"]
    assert rows["q2-soft-T1-s0"]["status"] == "failed"
    assert "simulated crash" in rows["q2-soft-T1-s0"]["error"]
    assert rows["q1-hard-T1-s0"]["status"] == "ok" and rows["q2-soft-T4-s0"]["status"] == "ok"
    assert "simulated crash" in f["report"]
    assert f["second"] == 0
    assert all(r["status"] == "ok" for r in f["rows_then"])


@pytest.mark.slow  # several studies in a row
def test_interrupted_fused_group_resumes_as_a_group(tmp_path, monkeypatch):
    extra = "questions = ['q1', 'q2']\nfused = true\n"
    cfg = write_config(tmp_path / "c.toml", extra)
    cfg.write_text(cfg.read_text().replace("epochs = 1", "epochs = 2").replace("[1.0, 4.0]", "[4.0]"))
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "A"), "--quiet"]) == 0

    calls = {"n": 0}
    real = trainlib.predict

    def crash_in_epoch_2(model, *a, **k):
        calls["n"] += isinstance(model, FusedStudents)  # the group's evaluations only
        if calls["n"] == 4:  # the gradient-ratio probe; epoch 1: val, test; epoch 2: val -> interrupted
            raise KeyboardInterrupt
        return real(model, *a, **k)

    monkeypatch.setattr(trainlib, "predict", crash_in_epoch_2)
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "B"), "--quiet"]) == 130
    assert torch.load(tmp_path / "B" / "groups" / "s0" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(trainlib, "predict", real)
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "B"), "--quiet"]) == 0

    def metrics(study, name):
        rows = [json.loads(l) for l in (study / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")} for r in rows]

    for name in ("q1-hard-T1-s0", "q2-soft-T4-s0"):
        assert len(metrics(tmp_path / "B", name)) == 2
        assert metrics(tmp_path / "B", name) == metrics(tmp_path / "A", name)


@pytest.mark.slow  # several studies in a row
def test_force_redoes_only_what_the_changed_config_touches(failed_then_rerun):
    """From the finished study of `failed_then_rerun` (the same config and flags: every run
    ok), rerun with one temperature changed and --force."""
    cfg, s = failed_then_rerun["config"], failed_then_rerun["study"]
    assert failed_then_rerun["second"] == 0 and all(r["status"] == "ok" for r in rows_of(s))
    stamp = lambda run: os.stat(run / "summary.json").st_mtime_ns
    before = {"teacher": stamp(s / "teacher"), "q1": stamp(s / "runs" / "q1-hard-T1-s0"),
              "T1": stamp(s / "runs" / "q2-soft-T1-s0")}
    cfg.write_text(cfg.read_text().replace("[1.0, 4.0]", "[1.0, 2.0]"))
    assert cli.main(["study", str(cfg), "--out", str(s), "--quiet", "--force"]) == 0
    assert before == {"teacher": stamp(s / "teacher"), "q1": stamp(s / "runs" / "q1-hard-T1-s0"),
                      "T1": stamp(s / "runs" / "q2-soft-T1-s0")}
    assert [r["run"] for r in rows_of(s)] == ["q1-hard-T1-s0", "q2-soft-T1-s0", "q2-soft-T2-s0"]
    assert all(r["status"] == "ok" for r in rows_of(s))
    assert not (s / "runs" / "q2-soft-T4-s0").exists()


def test_fused_auto_fuses_on_cuda_only(failed_then_rerun):
    cfg = resolve()
    assert cfg["study"]["fused"] == "auto"
    assert studylib.fuses(cfg, torch.device("cuda")) and not studylib.fuses(cfg, torch.device("cpu"))
    for forced in (True, False):
        cfg["study"]["fused"] = forced
        assert all(studylib.fuses(cfg, torch.device(d)) is forced for d in ("cpu", "cuda"))
    # The default on this CPU: one run at a time, no group checkpoint, no fused_k (the
    # study of Q1 and Q2 that `failed_then_rerun` runs with the default)
    s = failed_then_rerun["study"]
    assert not (s / "groups").exists()
    assert "fused_k" not in json.loads((s / "runs" / "q1-hard-T1-s0" / "summary.json").read_text())
