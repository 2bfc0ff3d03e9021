"""The single-run path end to end: teacher, students, eval, resume, and bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qdistill import cli
from qdistill.training import loop as trainlib, schedule

from conftest import SMALL, interrupted_in_epoch_2


def run(args, capsys=None):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


@pytest.fixture
def teacher(small_teacher):
    return small_teacher


def test_teacher_run_files(teacher):
    for name in ("config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json"):
        assert (teacher / name).is_file(), name
    summary = json.loads((teacher / "summary.json").read_text())
    metrics = [json.loads(l) for l in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    best = max(metrics, key=lambda m: m["val_acc"])  # first of equals, as the loop keeps it
    assert summary["val_best_acc"] == best["val_acc"]
    assert summary["test_acc_at_val_best"] == best["test_acc"]
    assert summary["test_acc_last"] == metrics[-1]["test_acc"]
    assert summary["epochs"] == 2 and summary["params"] > 0
    assert 'role = "teacher"' in (teacher / "config.toml").read_text()
    # the course schedule over 2 epochs: the base rate, then x0.1 from the second epoch
    # (never in the first); each epoch's row records the rate it trained with
    assert [m["lr"] for m in metrics] == [0.01, 0.01 * 0.1]


def test_student_q3_inherits_teacher_data(teacher, tmp_path, capsys):
    out = tmp_path / "q3"
    # a 2-epoch teacher on 240 images is at chance: accepted on purpose (test_faults tests the refusal)
    code, cap = run(["student", "--teacher", teacher, "--loss", "hard+soft", "--temperature", "4",
                     "--epochs", "1", "--quiet", "--allow-weak-teacher", "--out", out], capsys)
    assert code == 0, cap.err
    text = (out / "config.toml").read_text()
    assert "max_train = 240" in text and 'loss = "hard+soft"' in text and "c = 16.0" in text
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["teacher_agreement"] <= 1.0 and summary["kl_to_teacher"] >= 0.0
    assert summary["model_bytes_at_bits"] * 10 < summary["fp32_bytes"]
    code, cap = run(["eval", out, "--json"], capsys)
    result = json.loads(cap.out)
    assert code == 0 and len(result["confusion"]) == 10
    assert sum(map(sum, result["confusion"])) == 80
    assert result["test_acc"] == pytest.approx(summary["test_acc_at_val_best"])


def test_schedule_factors():
    assert [schedule.lr_factor(e, 1, 60, "course") for e in (0, 14, 15, 39, 40, 59)] == [1, 1, 0.1, 0.1, 0.05, 0.05]
    assert schedule.lr_factor(0, 1, 10, "cosine") == 1.0
    assert schedule.lr_factor(5, 1, 10, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize("recipe", [[], ["--recipe", "fast", "--set", "train.ema=0.9"]], ids=["course", "fast+ema"])
def test_same_seed_same_metrics_and_resume_matches(tmp_path, monkeypatch, recipe):
    """Also with the per-step linear schedule and the weight average, both resumed from
    the checkpoint."""
    args = ["student", *SMALL, "--loss", "hard", "--epochs", "3", "--lr", "0.005", *recipe]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0

    # Crash run c during epoch 2's evaluation: epoch 1's checkpoint stays.
    assert interrupted_in_epoch_2(monkeypatch, [*args, "--out", str(tmp_path / "c")]) == 130
    assert not (tmp_path / "c" / "summary.json").exists()
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # without --resume the unfinished run is not touched
    assert cli.main([*args, "--out", str(tmp_path / "c")]) == 2
    assert cli.main([*args, "--resume", "--out", str(tmp_path / "c")]) == 0

    def metrics(name):
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")} for r in rows]

    assert metrics("a") == metrics("b")
    assert metrics("c") == metrics("a")
    state_a = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    state_c = torch.load(tmp_path / "c" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_non_finite_loss_stops_with_a_clear_line(tmp_path, monkeypatch, capsys):
    real = trainlib.build_loss

    def nan_loss(*a, **k):
        fn = real(*a, **k)
        wrapped = lambda z, t, y: fn(z, t, y) * float("nan")
        wrapped.needs_teacher, wrapped.terms = fn.needs_teacher, fn.terms
        return wrapped

    monkeypatch.setattr(trainlib, "build_loss", nan_loss)
    code, cap = run(["student", *SMALL, "--epochs", "1", "--out", tmp_path / "nan"], capsys)
    assert code == 2
    assert "epoch 1, step 1" in cap.err and "Traceback" not in cap.err


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def bad_inputs(tmp_path, teacher):
    ok = dict(x_train=np.zeros((8, 32, 32, 3), np.uint8), y_train=np.arange(8) % 3,
              x_test=np.zeros((4, 32, 32, 3), np.uint8), y_test=np.arange(4) % 3)
    three = _npz(tmp_path / "three.npz", **ok)
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    (finished / "checkpoint.pt").write_text("x")
    unstarted = tmp_path / "killed-before-its-first-epoch"
    unstarted.mkdir()
    (unstarted / "config.toml").write_text((teacher / "config.toml").read_text())
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nepohcs = 3\n")
    mat_dir = tmp_path / "svhn"
    mat_dir.mkdir()
    (mat_dir / "train_32x32.mat").write_bytes(b"not a mat file")
    (mat_dir / "test_32x32.mat").write_bytes(b"not a mat file")
    out = ["--out", tmp_path / "never"]
    return [
        (["teacher", "--config", cfg, *out], "unknown key train.epohcs"),
        (["teacher", "--config", tmp_path / "nope.toml", *out], "config file not found"),
        (["student", "--weight-bits", "9", *out], "1..8 or 32"),
        (["student", "--temperature", "0", *out], "temperature"),
        (["teacher", "--epochs", "0", *out], "train.epochs"),
        (["teacher", "--dataset", "npz", "--data-path", tmp_path / "missing.npz", *out], "missing.npz"),
        (["teacher", "--dataset", "npz", "--data-path",
          _npz(tmp_path / "partial.npz", x_train=ok["x_train"]), *out], "y_train"),
        (["teacher", "--dataset", "npz", "--data-path",
          _npz(tmp_path / "len.npz", **{**ok, "y_train": np.arange(5) % 3}), *out], "y_train"),
        (["teacher", "--dataset", "npz", "--data-path",
          _npz(tmp_path / "neg.npz", **{**ok, "y_test": np.array([0, 1, -1, 2])}), *out], "y_test"),
        (["teacher", "--dataset", "svhn", "--data-dir", mat_dir, *out], "md5"),
        (["teacher", "--dataset", "svhn", "--no-verify", "--data-dir", mat_dir, *out], "train_32x32.mat"),
        (["student", "--loss", "soft", "--teacher", tmp_path / "no-teacher", *out], "no-teacher"),
        (["student", "--loss", "soft", *SMALL, *out], "--teacher"),
        (["student", "--loss", "hard+softgt", *SMALL, *out], "--teacher"),
        (["student", "--loss", "soft", "--teacher", teacher, "--dataset", "npz", "--data-path", three, *out],
         "classes"),
        (["teacher", *SMALL, "--out", finished], "--force"),
        (["eval", tmp_path / "nothing"], "not a qdistill run"),
        (["eval", unstarted], f"run {unstarted} has not finished an epoch (no best.pt): train it on with --resume"),
        (["export", unstarted, "--out", tmp_path / "never.qdz"], "has not finished an epoch"),
        (["teacher", "--epochs", "x", *out], "invalid int"),
        (["teacher", "--set", "train.lr=-1", *out], "train.lr"),
        (["bench", "--deploy", "--scaling"], "--scaling"),
        (["bench", "--scaling", "--batch", "0"], "--batch"),
        (["teacher", *SMALL, "--out", three / "run"], "cannot create run directory"),  # under a file
        (["study", "--out", three / "study"], "cannot create study"),
        (["teacher", *SMALL, "--out", tmp_path / "new" / "deep" / ("x" * 300)], "File name too long"),
        (["study", "--out", tmp_path / "new" / ("x" * 300) / "s"], "File name too long"),
    ]


def test_bad_input_exits_2_with_one_line(tmp_path, teacher, capsys):
    for args, words in bad_inputs(tmp_path, teacher):
        with pytest.raises(SystemExit) if "invalid int" in words else _NoRaise() as e:
            code, cap = run(args, capsys)
        if "invalid int" in words:
            code, cap = e.value.code, capsys.readouterr()
        assert code == 2, (args, cap)
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, cap.err)
        assert "Traceback" not in cap.err
    assert not (tmp_path / "never").exists()
    assert not (tmp_path / "new").exists()  # the parents created for an --out that failed are gone
    assert (tmp_path / "finished" / "checkpoint.pt").read_text() == "x"  # untouched
    assert sorted(p.name for p in (tmp_path / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]


class _NoRaise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_console_script_reports_one_line():
    proc = subprocess.run([sys.executable, "-m", "qdistill.cli", "student", "--set", "student.act_bits=33",
                           "--out", "x"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "student.act_bits" in proc.stderr


def test_export_predict_round_trip(teacher, tmp_path, capsys):
    run_dir = tmp_path / "q1"
    assert cli.main(["student", *SMALL, "--epochs", "1", "--out", str(run_dir)]) == 0
    qdz = tmp_path / "s.qdz"
    code, cap = run(["export", run_dir, "--out", qdz], capsys)
    assert code == 0 and qdz.stat().st_size * 12 < json.loads((run_dir / "summary.json").read_text())["fp32_bytes"]
    code, cap = run(["eval", run_dir, "--json"], capsys)
    torch_acc = json.loads(cap.out)["test_acc"]
    code, cap = run(["predict", qdz, "--dataset", "digits", "--max-test", "80", "--json"], capsys)
    assert code == 0 and json.loads(cap.out)["accuracy"] == pytest.approx(torch_acc, abs=1.5 / 80)
    from PIL import Image
    from qdistill.data.registry import load
    image = load({"dataset": "digits", "max_test": 1}).x_test[0].permute(1, 2, 0).numpy()
    Image.fromarray(image).save(tmp_path / "digit.png")
    code, cap = run(["predict", qdz, tmp_path / "digit.png", "--json"], capsys)
    got = json.loads(cap.out)
    assert code == 0 and set(got) == {"image", "index", "name", "probability"} and got["name"] == str(got["index"])
    assert run(["export", run_dir, "--out", tmp_path / "s.onnx", "--format", "onnx"], capsys)[0] == 0
    # a full-precision run cannot be packed; a tampered file is refused; neither leaves output
    code, cap = run(["export", teacher, "--out", tmp_path / "t.qdz"], capsys)
    assert code == 2 and "full precision" in cap.err and not (tmp_path / "t.qdz").exists()
    raw = bytearray(qdz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad.qdz").write_bytes(bytes(raw))
    code, cap = run(["predict", tmp_path / "bad.qdz", tmp_path / "digit.png"], capsys)
    assert code == 2 and len(cap.err.strip().splitlines()) == 1 and "Traceback" not in cap.err


def test_eval_and_datasets_take_config_overrides(teacher, tmp_path, capsys):
    code, cap = run(["eval", teacher, "--set", "data.max_test=40", "--json"], capsys)
    assert code == 0 and sum(map(sum, json.loads(cap.out)["confusion"])) == 40
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndata_dir = "{tmp_path / "svhn-here"}"\n')
    code, cap = run(["datasets", "--config", cfg], capsys)
    assert code == 0 and str(tmp_path / "svhn-here" / "train_32x32.mat") in cap.out
