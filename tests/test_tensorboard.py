"""``train.tensorboard``: each epoch's metrics.jsonl row as TensorBoard scalars in the run
directory, one point per epoch after a resume, one event file per fused member, and one
line when the package is missing."""
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from qdistill import cli  # noqa: E402
from qdistill.data.registry import load  # noqa: E402
from qdistill.resolve import resolve  # noqa: E402
from qdistill.training import checkpoint, loop  # noqa: E402
from qdistill.training.rundir import CHECKPOINT, RunDir  # noqa: E402
from qdistill.training.scalars import FIELDS  # noqa: E402

ARGS = ["student", "--dataset", "digits", "--max-train", "96", "--max-test", "20", "--epochs", "2",
        "--batch-size", "32", "--loss", "hard", "--quiet"]


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads the run directory (every event
    file in it, points an earlier attempt left past a restart purged)."""
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_matches_metrics(run):
    """One point per epoch for each field, equal to metrics.jsonl's value as the event
    format stores it (float32: a point holds float32(value) exactly)."""
    metrics = RunDir(run).read_metrics()
    assert len(metrics) == 2
    got = scalars(run)
    assert set(got) == set(FIELDS)
    for tag in FIELDS:
        assert [s for s, _ in got[tag]] == [m["epoch"] for m in metrics], tag
        np.testing.assert_array_equal(np.array([v for _, v in got[tag]], np.float32),
                                      np.array([m[tag] for m in metrics], np.float32), err_msg=tag)


def test_a_run_writes_its_metrics_as_scalars(tmp_path):
    run = tmp_path / "s"
    assert cli.main([*ARGS, "--tensorboard", "--out", str(run)]) == 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert "tensorboard = true" in (run / "config.toml").read_text()
    assert_matches_metrics(run)


def test_off_by_default_writes_no_event_file(tmp_path):
    run = tmp_path / "s"
    assert cli.main([*ARGS, "--out", str(run)]) == 0
    assert not list(run.glob("events.out.tfevents.*"))


def test_a_resumed_run_has_one_point_per_epoch(tmp_path, monkeypatch, capsys):
    """Stopped where the events of epoch 2 are written but its checkpoint is not, the
    resume trains epoch 2 again: the stale point is purged (its img/s differs from the
    new one's, so a left-over point would fail the comparison)."""
    run = tmp_path / "s"
    real_save = checkpoint.save

    def stop_before_second_checkpoint(obj, path):
        if path.name == CHECKPOINT and obj.get("epoch") == 2:
            raise KeyboardInterrupt
        return real_save(obj, path)
    monkeypatch.setattr(checkpoint, "save", stop_before_second_checkpoint)
    assert cli.main([*ARGS, "--tensorboard", "--out", str(run)]) == 130
    assert [s for s, _ in scalars(run)["val_acc"]] == [1, 2]  # epoch 2's point, soon stale
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert checkpoint.load(run / CHECKPOINT)["epoch"] == 1
    assert cli.main([*ARGS, "--tensorboard", "--resume", "--out", str(run)]) == 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    assert_matches_metrics(run)


def test_each_fused_member_gets_its_own_event_file(tmp_path):
    sets = ["data.max_train=96", "data.max_test=20", "train.epochs=2", "train.batch_size=32",
            "train.tensorboard=true", "student.loss=hard"]
    runs = [(resolve(None, None, [*sets, f"student.temperature={t}"], role="student"), tmp_path / f"m{t}")
            for t in (1, 2)]
    loop.train(runs, load(runs[0][0]["data"]), group_dir=tmp_path / "g", progress=False)
    assert not list((tmp_path / "g").glob("events.out.tfevents.*"))
    for _, out in runs:
        assert len(list(out.glob("events.out.tfevents.*"))) == 1
        assert_matches_metrics(out)


@pytest.mark.parametrize("command", ["teacher", "student", "study"])
def test_without_the_package_one_line_before_training(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    out = tmp_path / "out"
    args = [command, "--dataset", "digits", "--max-train", "96", "--epochs", "1", "--tensorboard",
            "--quiet", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'qdistill[tensorboard]'" in err
    assert not out.exists()  # stopped before anything was written
