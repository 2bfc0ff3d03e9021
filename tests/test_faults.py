"""Behaviour under faults, injected for real: SIGKILL at random moments, SIGTERM, two
commands on one folder, failing writes, useless teachers. Seeded; small enough for CI."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import fresh
from qdistill import atomic, cli
from qdistill.lock import locked
from qdistill.training.rundir import RunDir, recover
from qdistill.training.schedule import lr_factor

STUDY = """
[data]
dataset = "digits"
max_train = 240
max_test = 40
[train]
epochs = 2
batch_size = 32
[study]
temperatures = [4.0]
seeds = [0]
questions = ["q1", "q2", "q3"]
teacher_epochs = 1
allow_weak_teacher = true  # a 1-epoch teacher on 240 images is at chance; here that is fine
"""
TIMING = ("wall_s", "img_per_s")
pytestmark = pytest.mark.slow


def study_config(tmp_path, extra=""):
    path = tmp_path / "study.toml"
    path.write_text(STUDY + extra)
    return path


def results(study):
    """results.csv without the timing columns."""
    lines = (study / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, c in enumerate(header) if c not in TIMING]
    return [[row.split(",")[i] for i in keep] for row in lines]


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    """The commands below run in fresh processes (`fresh.Command`: as ``python -m
    qdistill.cli``, less its 5 s of imports); their fork server ends with the module."""
    yield
    fresh.stop()


def wait_for(path, timeout=60.0):
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: each study variant run once without faults, as a command in its own
    process like the interrupted ones (so nothing an earlier test left in this process,
    such as a thread count, can make it differ)."""
    out = {}
    for name, extra in (("separate", ""), ("fused", "fused = true\n")):
        root = tmp_path_factory.mktemp(name)
        proc = fresh.Command("study", study_config(root, extra), "--out", root / "S", "--quiet", err=root / "err")
        assert proc.wait() == 0, proc.err()
        out[name] = results(root / "S")
    return out


RUNS = ["q1-hard-T1-s0", "q2-soft-T4-s0", "q3-hard+soft-T4-s0"]


@pytest.mark.parametrize("variant,kills", [("separate", 3), ("fused", 2)])
def test_sigkill_at_random_moments_then_rerun_gives_the_same_results(tmp_path, uninterrupted, variant, kills):
    """Kill -9 a study `kills` times, then rerun the same command until it finishes. Each
    kill lands a random 0-0.2 s (seeded) after a randomly chosen run (the teacher or a
    student) has finished an epoch, so most kills interrupt a run that must resume from a
    checkpoint, not start over."""
    rng = random.Random(f"sigkill-{variant}")
    cfg = study_config(tmp_path, "fused = true\n" if variant == "fused" else "")
    study = tmp_path / "S"
    marks = [study / "teacher" / "metrics.jsonl"] + [study / "runs" / r / "metrics.jsonl" for r in RUNS]
    killed = 0
    for _ in range(kills):
        waiting = [m for m in marks if not m.exists()]
        mark = rng.choice(waiting[:2])  # the next epoch to finish, or the one after
        proc = fresh.Command("study", cfg, "--out", study, "--quiet")
        while not mark.exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
    assert killed >= 1  # (a kill that comes after the study finished lands on nothing)
    assert fresh.run("study", cfg, "--out", study, "--quiet") == 0
    assert results(study) == uninterrupted[variant]
    assert not list(study.rglob("*.tmp"))  # no half-written file survived


def test_sigterm_mid_epoch_stops_like_ctrl_c_and_resume_gives_the_same_metrics(tmp_path):
    args = ["student", "--dataset", "digits", "--max-train", "320", "--max-test", "40", "--batch-size", "32",
            "--epochs", "3", "--loss", "hard", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    run = tmp_path / "b"
    proc = fresh.Command(*args, "--out", run, err=tmp_path / "err")
    wait_for(run / "metrics.jsonl")  # epoch 1 is done: epoch 2 is training
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = proc.err()
    assert proc.returncode == 143, err
    assert err.strip().count("\n") == 0 and "SIGTERM" in err and "--resume" in err
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < 3 and not (run / "summary.json").exists()
    assert cli.main([*args, "--resume", "--out", str(run)]) == 0

    def metrics(r):
        return [{k: v for k, v in m.items() if k not in TIMING} for m in RunDir(r).read_metrics()]
    assert metrics(run) == metrics(tmp_path / "a") and len(metrics(run)) == 3


def test_sigterm_that_ray_turns_into_keyboard_interrupt_exits_143(monkeypatch, capsys):
    """A handler's exception raised while Ray waits (ray.wait) comes back as a plain
    KeyboardInterrupt: the CLI still says SIGTERM and exits 143."""
    from qdistill.cli import commands
    from qdistill.cli.main import Terminated

    def study_waiting_in_ray(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except Terminated:
            raise KeyboardInterrupt from None  # what Ray hands back
        return 0
    monkeypatch.setattr(commands, "cmd_study", study_waiting_in_ray)
    assert cli.main(["study", "c.toml", "--out", "S"]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    monkeypatch.setattr(commands, "cmd_study", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["study", "c.toml", "--out", "S"]) == 130  # Ctrl-C stays Ctrl-C


def test_two_studies_on_one_folder_one_trains_the_other_exits_2(tmp_path, uninterrupted):
    cfg = study_config(tmp_path)
    study = tmp_path / "S"
    procs = [fresh.Command("study", cfg, "--out", study, "--quiet", err=tmp_path / f"err{i}") for i in range(2)]
    outcomes = sorted((p.wait(timeout=120), p.err()) for p in procs)
    (ok, _), (refused, err) = outcomes
    assert (ok, refused) == (0, 2), outcomes
    assert err.strip().count("\n") == 0 and "in use by pid" in err and "Traceback" not in err
    assert results(study) == uninterrupted["separate"]


def test_a_locked_run_directory_refuses_a_second_trainer(tmp_path, capsys):
    teacher = ["teacher", "--dataset", "digits", "--max-train", "64", "--max-test", "20", "--epochs", "1",
               "--quiet", "--out"]
    run = tmp_path / "new" / "run"
    with locked(run, "run directory"):
        code = cli.main([*teacher, str(run)])
        err = capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused one wrote nothing
    assert code == 2 and f"pid {os.getpid()}" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()  # a lock that guarded nothing leaves nothing, parents included
    assert cli.main([*teacher, str(tmp_path / "done")]) == 0
    with locked(tmp_path / "done", "run directory"):
        assert cli.main([*teacher, str(tmp_path / "done"), "--force"]) == 2  # a trainer needs the lock
        capsys.readouterr()
        assert cli.main(["eval", str(tmp_path / "done"), "--json"]) == 0  # a reader does not
    assert json.loads(capsys.readouterr().out)["test_acc"] >= 0


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = ("import sys, time; from qdistill.lock import locked\n"
            f"with locked({str(tmp_path / 'S')!r}, 'study'):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="in use by pid"):
        with locked(tmp_path / "S", "study"):
            pass
    proc.kill()
    proc.wait()
    with locked(tmp_path / "S", "study"):  # the kernel dropped the dead holder's lock
        pass


def fail_writes_to(monkeypatch, name, error, after=0):
    """Make the atomic write of files called ``name`` fail mid-way (after the data went
    to the temp file, at fsync) from its ``after``-th occurrence on."""
    real, seen = atomic.os.fsync, {"n": 0}

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{name}."):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(error, os.strerror(error))
        return real(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)


@pytest.mark.parametrize("name,error,after", [("checkpoint.pt", errno.ENOSPC, 1), ("summary.json", errno.EIO, 0),
                                              ("metrics.jsonl", errno.EACCES, 1)])
def test_a_failed_write_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch, capsys, name, error,
                                                                   after):
    run = tmp_path / "run"
    fail_writes_to(monkeypatch, name, error, after)
    code = cli.main(["student", "--dataset", "digits", "--max-train", "96", "--max-test", "20",
                     "--batch-size", "32", "--epochs", "2", "--loss", "hard", "--quiet", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(run / name) in err and os.strerror(error) in err
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert not (run / "summary.json").exists()
    if name == "checkpoint.pt":  # the previous epoch's file is intact and complete
        assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    if name == "metrics.jsonl":
        assert len(RunDir(run).read_metrics()) == 1


def test_a_write_under_a_file_names_the_file(tmp_path):
    """``--out file/x.qdz``: mkdir's own "File exists" would name neither the file nor what is wrong."""
    folder = tmp_path
    (folder / "afile").write_text("keep")
    want = f"cannot write {folder}/afile/x.qdz: {folder}/afile is not a folder"
    with pytest.raises(atomic.WriteError, match=re.escape(want)):
        atomic.atomic_write_text(folder / "afile" / "x.qdz", "x")
    assert [p.name for p in folder.iterdir()] == ["afile"] and (folder / "afile").read_text() == "keep"


def test_a_failed_results_write_stops_the_study_with_one_line(tmp_path, monkeypatch, capsys):
    fail_writes_to(monkeypatch, "results.csv", errno.ENOSPC, after=1)
    code = cli.main(["study", str(study_config(tmp_path)), "--out", str(tmp_path / "S"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "results.csv" in err and "No space left" in err
    assert (tmp_path / "S" / "results.csv").read_text().startswith("run,question")  # the first one, intact


def weak_teacher(tmp_path, acc=0.12):
    run = tmp_path / "teacher"
    assert cli.main(["teacher", "--dataset", "digits", "--max-train", "96", "--max-test", "20", "--epochs", "1",
                     "--quiet", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "val_best_acc": acc}))
    return run


def test_a_teacher_at_chance_is_refused_before_any_student_trains(tmp_path, capsys):
    teacher = weak_teacher(tmp_path)  # 12% on 10 classes: within 5 points of chance
    capsys.readouterr()  # (the teacher's own run ended with its warning)
    args = ["student", "--teacher", str(teacher), "--loss", "soft", "--epochs", "1", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "12.0% validation accuracy" in err and "more epochs" in err
    assert not (tmp_path / "s").exists()
    assert cli.main([*args, "--allow-weak-teacher", "--out", str(tmp_path / "s")]) == 0
    cfg = study_config(tmp_path, f'[teacher]\nrun = "{teacher}"\n')
    cfg.write_text(cfg.read_text().replace("allow_weak_teacher = true", "allow_weak_teacher = false"))
    code = cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--quiet"])
    assert code == 2 and "not clearly above chance" in capsys.readouterr().err
    assert not list((tmp_path / "S").glob("runs/*/summary.json"))
    # 15.1% is clearly above 10% + 5 points
    (teacher / "summary.json").write_text(json.dumps({**json.loads((teacher / "summary.json").read_text()),
                                                      "val_best_acc": 0.151}))
    assert cli.main([*args, "--out", str(tmp_path / "s2")]) == 0


def test_without_a_validation_split_the_teachers_training_accuracy_decides(tmp_path):
    from qdistill.data.registry import load
    from qdistill.training.teacher import Teacher
    from qdistill.training.teacher_files import Preprocess
    data = load({"dataset": "digits", "max_train": 200, "max_test": 20})

    class Constant(torch.nn.Module):  # always class 0: chance on balanced digits
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()
    targets = Teacher(data, Constant(), "torchscript", "const", "const", "", Preprocess(), val_acc=float("nan"))
    with pytest.raises(Exception, match="training-split accuracy"):
        targets.check_useful()
    targets.check_useful(allow=True)


def test_course_schedule_never_decays_before_the_second_epoch():
    for epochs in range(1, 80):
        factors = [lr_factor(e, 1, epochs, "course") for e in range(epochs)]
        assert factors[0] == 1.0, epochs
        if epochs >= 2:
            assert factors[1] == 0.1 or epochs >= 6, (epochs, factors)  # short runs drop at epoch 2
        assert factors == sorted(factors, reverse=True)
    assert [lr_factor(e, 1, 2, "course") for e in range(2)] == [1.0, 0.1]
    assert [lr_factor(e, 1, 3, "course") for e in range(3)] == [1.0, 0.1, 0.05]
    f60 = [lr_factor(e, 1, 60, "course") for e in range(60)]
    assert f60.index(0.1) == 15 and f60.index(0.05) == 40  # the homework config is unchanged


def test_a_truncated_checkpoint_is_refused_with_one_line(tmp_path, capsys):
    args = ["student", "--dataset", "digits", "--max-train", "64", "--max-test", "20", "--epochs", "1",
            "--loss", "hard", "--quiet", "--out", str(tmp_path / "r")]
    assert cli.main(args) == 0
    ck = tmp_path / "r" / "checkpoint.pt"
    (tmp_path / "r" / "summary.json").unlink()  # as if killed before the summary
    ck.write_bytes(ck.read_bytes()[:1000])
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read checkpoint" in err and str(ck) in err


def test_a_run_directory_replaced_as_a_whole_survives_a_kill_between_the_renames(tmp_path, monkeypatch):
    """`RunDir.replace` (how a Ray driver writes a finished run): killed after the old
    folder moved aside, `recover` puts it back; killed while staging, the staging goes."""
    run = tmp_path / "runs" / "r"
    RunDir(run).replace({"summary.json": b"{}", "config.toml": b"old"})
    assert RunDir(run).files() == {"config.toml": b"old", "summary.json": b"{}"}
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        RunDir(run).replace({"config.toml": b"new"})
    monkeypatch.setattr(os, "rename", real_rename)
    assert not run.exists()
    recover(run.parent)
    assert RunDir(run).files() == {"config.toml": b"old", "summary.json": b"{}"}
    assert sorted(p.name for p in run.parent.iterdir()) == ["r"]
    RunDir(run).replace({"config.toml": b"new"})  # and a whole replace leaves only the new files
    assert RunDir(run).files() == {"config.toml": b"new"} and sorted(p.name for p in run.parent.iterdir()) == ["r"]


def test_temp_files_of_a_writer_killed_mid_write_are_removed_when_the_folder_is_next_locked(tmp_path):
    """SIGKILL during `atomic_write` leaves its temp file; the next command that takes
    the folder's lock (a study, the loop for a run directory) removes it."""
    from qdistill import config as configlib
    from qdistill.study.studydir import StudyDir
    for name in (".results.csv.x1y2.tmp", ".study.toml.abc.tmp"):
        (tmp_path / name).write_text("half")
    (tmp_path / "keep.tmp").write_text("not ours")  # only atomic_write's hidden temp files go
    with locked(tmp_path, "study"):  # as run_study does
        StudyDir(tmp_path).prepare(configlib.check(configlib.defaults()), force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "keep.tmp", "study.toml"]
