"""A new user's first hour, each item as a user would hit it: the command through
``cli.main``, its exit code and the exact line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from qdistill import cli
from qdistill.cli.parser import build_parser
from qdistill.config import DEFAULTS
from qdistill.deploy import qdz
from qdistill.resolve import resolve
from qdistill.study import run as studylib
from qdistill.training import evaluate as evaluation
from qdistill.training.rundir import RunDir

from conftest import SMALL, interrupted_in_epoch_2

TINY = ["--epochs", "1", "--quiet"]


def run(argv, capsys):
    capsys.readouterr()  # what earlier commands printed
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def named_folder(tmp_path_factory):
    """An image folder whose classes are names ("eight", "five"), not digits."""
    root = tmp_path_factory.mktemp("named") / "imgs"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for name in ("eight", "five"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def named_run(named_folder, tmp_path_factory):
    """A W2A1 student of the named folder (ground truth only: it needs no teacher)."""
    out = tmp_path_factory.mktemp("named-run") / "s"
    assert cli.main(["student", "--loss", "hard", "--dataset", "imagefolder", "--data-dir", str(named_folder),
                     "--batch-size", "8", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small_student(tmp_path_factory):
    out = tmp_path_factory.mktemp("small-student") / "s"
    assert cli.main(["student", *SMALL, "--loss", "hard", "--epochs", "1", "--out", str(out)]) == 0
    return out


# 1. no silent wrong answer
def test_predict_and_eval_refuse_a_model_and_data_whose_classes_differ(named_run, tmp_path, capsys):
    qdz = tmp_path / "m.qdz"
    assert cli.main(["export", str(named_run), "--out", str(qdz)]) == 0
    capsys.readouterr()
    code, _, err = run(["predict", qdz, "--dataset", "digits"], capsys)
    assert code == 2 and one_line(err) == (
        "qdistill: error: the model's classes ['eight', 'five'] are not the digits dataset's "
        "['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']: give the data the model was trained on")
    code, _, err = run(["eval", named_run, "--set", "data.dataset=digits"], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: run {named_run} was trained on the classes ['eight', 'five'], but the data has "
        f"['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']: give the data the run was trained on")


# 2. a file is what its name says
def test_export_takes_the_format_from_the_extension(small_student, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    assert cli.main(["export", str(small_student), "--out", str(tmp_path / "s.onnx")]) == 0
    onnx.load(str(tmp_path / "s.onnx"))  # an ONNX model, not a .qdz named .onnx
    code, _, err = run(["export", small_student, "--out", tmp_path / "s.bin"], capsys)
    assert code == 2 and one_line(err).startswith(f"qdistill: error: --out {tmp_path / 's.bin'}: the format comes "
                                                  "from its extension, .qdz (packed) or .onnx")
    assert not (tmp_path / "s.bin").exists()


def test_export_format_overrides_the_extension(small_student, tmp_path, capsys):
    for name in ("s.bin", "s.onnx"):  # --format qdz writes a packed file whatever the name
        code, out, _ = run(["export", small_student, "--out", tmp_path / name, "--format", "qdz"], capsys)
        manifest, _ = qdz.read(tmp_path / name)
        assert code == 0 and manifest["class_names"] == [str(k) for k in range(10)]
        assert out.startswith(f"exported {small_student} (best.pt) to {tmp_path / name} (qdz, ")
    onnx = pytest.importorskip("onnx")
    assert cli.main(["export", str(small_student), "--out", str(tmp_path / "o.bin"), "--format", "onnx"]) == 0
    onnx.load(str(tmp_path / "o.bin"))


# 3. threads under control
def test_threads_is_a_key_and_every_run_records_its_threads(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["student", *SMALL, "--loss", "hard", *TINY, "--threads", "1", "--out", str(out)]) == 0
    assert RunDir(out).read_summary()["threads"] == 1 and "threads = 1" in (out / "config.toml").read_text()
    code, _, err = run(["student", *SMALL, "--loss", "hard", "--threads", "-1", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "train.threads must be >= 0" in one_line(err)


def test_threads_0_keeps_torchs_count_and_teacher_and_eval_take_threads(tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # below this machine's default, so that 0 taken as "all cores" shows
    try:
        out = tmp_path / "r"
        assert cli.main(["student", *SMALL, "--loss", "hard", *TINY, "--threads", "0", "--out", str(out)]) == 0
        assert torch.get_num_threads() == 1 and RunDir(out).read_summary()["threads"] == 1
        teacher = tmp_path / "t"
        assert cli.main(["teacher", *SMALL, *TINY, "--threads", "1", "--out", str(teacher)]) == 0
        assert RunDir(teacher).read_summary()["threads"] == 1 and RunDir(teacher).read_config()["train"]["threads"] == 1
        seen, real = [], evaluation.evaluate
        monkeypatch.setattr(evaluation, "evaluate",
                            lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
        code, _, _ = run(["eval", teacher, "--threads", "1"], capsys)
        assert code == 0 and seen == [1]
        code, _, _ = run(["eval", teacher, "--threads", "2"], capsys)  # the flag takes effect, and only meanwhile
        assert code == 0 and seen == [1, 2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_cpu_run_records_its_precision(small_student):
    summary = RunDir(small_student).read_summary()
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"


# 4. refusals that say why; resume from the stored config; extend
def test_a_resume_with_other_settings_names_the_keys_and_resume_alone_takes_the_runs_own(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["student", *SMALL, "--loss", "hard", "--epochs", "2", "--quiet"]
    assert cli.main([*args, "--out", str(out)]) == 0
    (out / "summary.json").unlink()  # as if killed before its end
    code, _, err = run([*args, "-T", "2", "--lr", "0.02", "--resume", "--out", out], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: run {out} was started with another config (student.temperature: 4.0 -> 2.0; "
        f"train.lr: 0.01 -> 0.02): resume with the same settings (--resume alone takes the run's own), or "
        f"--force to start over")
    assert cli.main(["student", "--resume", "--quiet", "--out", str(out)]) == 0  # nothing retyped
    assert RunDir(out).read_summary()["epochs"] == 2
    # finished: a changed setting is named before what to do, so --force is not taken blindly
    code, _, err = run([*args, "-T", "2", "--resume", "--out", out], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: run {out} already finished with another config (student.temperature: 4.0 -> 2.0); "
        f"give another --out to keep it, or --force to replace it")
    code, _, err = run([*args, "-T", "2", "--out", out], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: {out} already holds a finished run with another config (student.temperature: 4.0 -> "
        f"2.0); use --force to overwrite")
    code, _, err = run([*args, "--resume", "--out", out], capsys)
    assert code == 2 and "already finished; use --force to train it again, or --extend" in one_line(err)


def test_extend_trains_a_finished_run_on_exactly_when_its_schedule_allows(tmp_path, capsys):
    args = ["student", *SMALL, "--loss", "hard", "--quiet"]
    assert cli.main([*args, "--epochs", "3", "--out", str(tmp_path / "three")]) == 0
    assert cli.main([*args, "--epochs", "2", "--out", str(tmp_path / "two")]) == 0
    # course over 2 epochs: 1, 0.1; over 3: 1, 0.1, 0.05: the 2 epochs keep their rates
    assert cli.main(["student", "--epochs", "3", "--extend", "--quiet", "--out", str(tmp_path / "two")]) == 0
    timing = ("wall_s", "img_per_s")
    rows = lambda r: [{k: v for k, v in m.items() if k not in timing} for m in RunDir(r).read_metrics()]
    assert rows(tmp_path / "two") == rows(tmp_path / "three")
    # over 4 epochs the second epoch's rate would be 1: refused, and the line says why
    code, _, err = run(["student", "--epochs", "4", "--extend", "--quiet", "--out", tmp_path / "three"], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: run {tmp_path / 'three'} cannot go from 3 to 4 epochs as if it had been started so: "
        f"the course schedule's rates for its 3 epochs depend on the number of epochs (they are set by the "
        f"fraction of the run done); train a new run with --epochs 4")
    code, _, err = run(["student", "--epochs", "5", "--resume", "--quiet", "--out", tmp_path / "three"], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: run {tmp_path / 'three'} already finished with another config (train.epochs: 3 -> 5); "
        f"use --force to train it again, or --extend with a larger --epochs to train it on")


def test_extend_trains_an_unfinished_run_on_and_changes_nothing_else(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cut"
    assert interrupted_in_epoch_2(monkeypatch, ["student", *SMALL, "--loss", "hard", "--epochs", "2",
                                                "--out", str(out)]) == 130
    [first] = RunDir(out).read_metrics()
    assert RunDir(out).started and not RunDir(out).finished
    code, _, err = run(["student", "--epochs", "3", "--lr", "0.02", "--extend", "--quiet", "--out", out], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: --extend trains run {out} on to more epochs and changes nothing else, but these "
        f"differ: train.lr: 0.01 -> 0.02")
    assert RunDir(out).read_metrics() == [first]  # nothing trained
    # course over 2 epochs: 1, 0.1 (of lr 0.01); over 3: 1, 0.1, 0.05: its one epoch keeps its rate
    assert cli.main(["student", "--epochs", "3", "--extend", "--quiet", "--out", str(out)]) == 0
    metrics = RunDir(out).read_metrics()
    assert metrics[0] == first  # continued from its checkpoint, its wall_s and all, not trained again
    assert [m["lr"] for m in metrics] == pytest.approx([0.01, 0.001, 0.0005])
    assert RunDir(out).read_summary()["epochs"] == 3 and RunDir(out).read_config()["train"]["epochs"] == 3


def test_a_study_rerun_with_another_lr_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(studylib, "study_teacher", lambda s: pytest.fail("the changed study went on"))
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\ndataset = "digits"\nmax_train = 100\n[study]\nseeds = [0]\nallow_weak_teacher = true\n')
    s = tmp_path / "S"
    studylib.StudyDir(s).prepare(resolve(cfg), force=False)  # the study as first run
    code, _, err = run(["study", cfg, "--out", s, "--lr", "0.02", "--quiet"], capsys)
    assert code == 2 and one_line(err) == (
        f"qdistill: error: {s} holds a study with another config (train.lr: 0.01 -> 0.02); use --force to redo "
        f"what that changes (runs whose own config is unchanged are kept)")


# 5. paths as typed
def test_every_path_in_a_stored_config_is_absolute(named_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(named_folder.parent)
    out = tmp_path / "r"
    assert cli.main(["teacher", "--dataset", "imagefolder", "--data-dir", named_folder.name, "--batch-size", "8",
                     *TINY, "--out", str(out)]) == 0
    assert RunDir(out).read_config()["data"]["data_dir"] == str(named_folder)
    monkeypatch.chdir(tmp_path)  # another folder: the run still finds its images
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] >= 0


def test_a_relative_data_path_and_teacher_are_stored_absolute(small_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("d.npz", x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y_train=np.arange(40) % 10,
             x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_test=np.arange(20) % 10)
    teacher = os.path.relpath(small_teacher, tmp_path)  # ../small-teacher0/teacher
    assert not os.path.isabs(teacher)
    assert cli.main(["student", "--loss", "hard", "--dataset", "npz", "--data-path", "d.npz", "--teacher", teacher,
                     "--allow-weak-teacher", "--batch-size", "8", *TINY, "--out", "r"]) == 0
    cfg = RunDir(tmp_path / "r").read_config()
    assert cfg["data"]["data_path"] == str(tmp_path / "d.npz") and cfg["teacher"]["run"] == str(small_teacher)


# 7. one plain line for what was left out
def test_predict_on_a_folder_lists_bad_images_and_counts_other_files(small_student, tmp_path, capsys):
    qdz = tmp_path / "m.qdz"
    assert cli.main(["export", str(small_student), "--out", str(qdz)]) == 0
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    (folder / "notes.txt").write_text("not an image")
    capsys.readouterr()
    code, _, err = run(["predict", qdz, folder, "--out", tmp_path / "p.csv"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"cannot read image {folder / 'b.png'}" in err
    assert "give --skip-bad-images to list it in the CSV and go on" in err and not (tmp_path / "p.csv").exists()
    code, _, err = run(["predict", qdz, folder, "--out", tmp_path / "p.csv", "--skip-bad-images"], capsys)
    assert code == 0 and err.splitlines() == [
        f"qdistill: 1 file(s) under {folder} are not images (png, jpg, jpeg, bmp, webp) and were left out",
        "qdistill: 1 unreadable image(s), listed with their error in the CSV"]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,index,name,probability,error"
    assert rows[1].startswith("a.png,") and rows[1].endswith(",")
    assert rows[2].startswith("b.png,,,,") and "cannot read image" in rows[2]


# 8. output details
def test_output_details(named_run, small_teacher, tmp_path, capsys):
    code, out, _ = run(["eval", named_run], capsys)
    header = out.splitlines()[out.splitlines().index("confusion (rows: true, columns: predicted)") + 1]
    assert code == 0 and header.split() == ["eight", "five"]  # padded: the names do not run together
    code, _, err = run(["predict", small_teacher / "best.pt", tmp_path], capsys)
    assert code == 2 and "is a PyTorch checkpoint, not an exported model: run `qdistill export" in one_line(err)
    code, _, err = run(["predict", small_teacher, tmp_path], capsys)
    assert code == 2 and "not an exported model" in one_line(err)
    code, _, err = run(["predict", tmp_path / "m.qdz", tmp_path / "nope"], capsys)
    assert code == 2 and one_line(err) == f"qdistill: error: no such image file or folder: {tmp_path / 'nope'}"
    p = build_parser()
    for command in ("eval", "predict"):
        sub = p._subparsers._group_actions[0].choices[command]
        data_dir = next(a for a in sub._actions if "--data-dir" in a.option_strings)
        assert all(kind in data_dir.help for kind in ("svhn", "cifar10", "imagefolder")), (command, data_dir.help)
    # datasets looks for the official files of svhn, cifar10 and cifar100 in --data-dir, and says so
    sub = p._subparsers._group_actions[0].choices["datasets"]
    data_dir = next(a for a in sub._actions if "--data-dir" in a.option_strings)
    assert data_dir.help.startswith("svhn, cifar10, cifar100: ") and "imagefolder" not in data_dir.help
    code, out, _ = run(["datasets", "--data-dir", tmp_path], capsys)
    pad = " " * (len("imagefolder") + 1)  # one column for every name, the longest included
    for name in ("train_32x32.mat", "cifar-10-python.tar.gz", "cifar-100-python.tar.gz"):
        assert code == 0 and f"{pad}{tmp_path / name}: missing" in out.splitlines(), (name, out)
    rows = [line for line in out.splitlines() if not line.startswith(" ")]
    assert len(rows) == 7 and all(line[:len(pad)].rstrip() == line.split()[0] and line[len(pad)] != " "
                                  for line in rows), out
    assert "imagefolder sizes from your data: " in out


# 9. scale shown up front
def test_help_shows_every_default_from_the_schema():
    sub = build_parser()._subparsers._group_actions[0].choices["study"]
    for action in sub._actions:
        if "." in (action.dest or ""):
            section, key = action.dest.split(".")
            default = DEFAULTS[section].get(key)
            if default not in ("", [], None) and key != "c":
                assert f"{action.dest}, default {default}" in action.help, action.help


def test_a_study_without_a_config_or_of_many_runs_says_its_plan_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(studylib, "run_study", lambda cfg, out, **k: {"rows": [], "failed": []})
    monkeypatch.setattr("qdistill.report.report.write_report", lambda study: {"html": "r.html"})
    assert cli.main(["study", "--out", str(tmp_path / "S")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("plan: a vgg7 teacher of 60 epochs, then 48 student runs of 60 epochs (Q1 3, Q2 15, Q3 15, "
                      "Q4 15; T in 1, 2, 4, 8, 15; seeds 0, 1, 2)")
    assert out[1] == "      each on 1,366 training images: 3.9 million student images in all"  # digits
    cfg = tmp_path / "small.toml"
    cfg.write_text("[study]\nseeds = [0]\ntemperatures = [4.0]\n")  # 4 runs: no plan
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S")]) == 0
    assert not capsys.readouterr().out.startswith("plan:")
    cfg.write_text("[study]\nseeds = [0, 1]\ntemperatures = [1.0, 2.0, 4.0]\n")  # 2 + 3 x 3 x 2 = 20 runs: none
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S")]) == 0
    assert not capsys.readouterr().out.startswith("plan:")
    cfg.write_text("[study]\nseeds = [0, 1]\ntemperatures = [1.0, 2.0, 4.0, 8.0]\n")  # 2 + 4 x 3 x 2 = 26
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S")]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "plan: a vgg7 teacher of 60 epochs, then 26 student runs of 60 epochs (Q1 2, Q2 8, Q3 8, Q4 8; "
        "T in 1, 2, 4, 8; seeds 0, 1)",
        "      each on 1,366 training images: 2.1 million student images in all"]  # 26 x 60 x 1,366


def test_bars_only_on_a_terminal_and_quiet_keeps_one_line_per_run(tmp_path, capsys):
    assert cli.main(["student", *[a for a in SMALL if a != "--quiet"], "--loss", "hard", "--epochs", "1",
                     "--out", str(tmp_path / "r")]) == 0
    cap = capsys.readouterr()
    assert "\r" not in cap.err and "epoch 1/1" in cap.out  # no bar in a log, the epoch's line stays
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\ndataset = "digits"\nmax_train = 120\nmax_test = 40\n[train]\nepochs = 1\n'
                   '[study]\nseeds = [0]\ntemperatures = [4.0]\nquestions = ["q1", "q4"]\nteacher_epochs = 1\n'
                   'allow_weak_teacher = true\n')
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--quiet"]) in (0, 1)
    lines = capsys.readouterr().out.splitlines()
    for name in ("q1-hard-T1-s0", "q4-hard+softgt-T4-s0"):
        assert sum(line.startswith(f"{name}: val ") for line in lines) == 1, lines
    # the study's first line is its estimate; each run's line says the runs done and the time left
    assert lines[0].startswith("estimate: ") and "img/s measured, eager steps" in lines[0], lines
    runs = [line for line in lines if ": val " in line]
    assert "s; 1/2 runs, about " in runs[0] and runs[0].endswith(" left)") and runs[1].endswith("s; 2/2 runs)"), runs


# 10. thin evidence announced
@pytest.mark.parametrize("role, extra", [("student", ["--loss", "hard"]), ("teacher", [])])
def test_a_run_at_chance_ends_with_one_warning_and_exit_0(role, extra, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run([role, *SMALL, *extra, "--epochs", "1", "--lr", "1e-12", "--out", out], capsys)
    acc = RunDir(out).read_summary()["test_acc_at_val_best"]
    assert code == 0 and acc <= 0.15
    assert one_line(err) == (f"qdistill: warning: {role} {out} ends at {100 * acc:.1f}% test accuracy, within 5 "
                             f"points of chance (10.0% for 10 classes): train it longer, on more data, or with "
                             f"another learning rate")
