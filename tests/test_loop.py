"""The one training loop: no host round-trip per step, divergence named to the step and
member, and one checkpoint format for one model or a fused group."""
import sys

import pytest
import torch

from qdistill.data.registry import load
from qdistill.nn import losses as losslib
from qdistill.resolve import resolve
from qdistill.training import checkpoint, loop
from qdistill.training.checkpoint import load_model

SETS = ["data.max_test=40", "train.batch_size=32", "train.epochs=1", "student.weight_bits=2",
        "student.act_bits=1"]


def cfg_for(*sets):
    return resolve(None, None, [*SETS, *sets], role="student")


def data(n_train):
    return load({"dataset": "digits", "max_train": n_train, "max_test": 40})


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def count_syncs(monkeypatch, fn):
    """Calls, from qdistill's own code, of the Tensor methods that make the host wait for
    the device, during ``fn``. (torch's CPU Adam reads its step counters with ``item()``;
    those live on the host on every device, so they are not counted.)"""
    calls = {"n": 0}
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            calls["n"] += sys._getframe(1).f_globals.get("__name__", "").startswith("qdistill")
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    for name in SYNCS:
        monkeypatch.undo()
    return calls["n"]


@pytest.mark.parametrize("k", [1, 2])
def test_the_step_loop_never_waits_for_the_device(tmp_path, monkeypatch, k):
    """A run of 16 steps waits for the device as often as one of 4: the syncs are per
    epoch (metrics, checkpoint), none per step. The progress bar is on, as for a user."""
    counts = []
    for n in (128, 512):  # 4 and 16 training steps (val 5%, eval in one batch each)
        ds = data(n)
        runs = [(cfg_for(f"student.temperature={2 + j}", "student.loss=hard+softgt"), tmp_path / f"{n}-{j}")
                for j in range(k)]
        counts.append(count_syncs(monkeypatch, lambda: loop.train(
            runs, ds, group_dir=tmp_path / f"g{n}", progress=True)))
    assert counts[0] == counts[1] > 0


def test_divergence_names_the_epoch_step_and_member(tmp_path, monkeypatch):
    real = losslib.build_loss
    calls = {"n": 0}

    def nan_on_third_step_of_the_second_member(*a, **k):
        fn = real(*a, **k)
        if a[0] != "hard+softgt":
            return fn

        def wrapped(z, t, y):
            calls["n"] += 1
            out = fn(z, t, y)
            return out * float("nan") if calls["n"] >= 3 else out
        wrapped.needs_teacher, wrapped.loss_name, wrapped.terms = fn.needs_teacher, fn.loss_name, fn.terms
        return wrapped

    monkeypatch.setattr(loop, "build_loss", nan_on_third_step_of_the_second_member)
    runs = [(cfg_for("student.loss=hard"), tmp_path / "a"), (cfg_for("student.loss=hard+softgt"), tmp_path / "b")]
    with pytest.raises(loop.Diverged) as e:
        loop.train(runs, data(256), group_dir=tmp_path / "g", progress=False)
    msg = str(e.value)
    assert "for b at epoch 1, step 3" in msg and "nan" in msg and " a," not in msg
    assert not (tmp_path / "g" / "checkpoint.pt").exists()  # the bad epoch is never saved


def test_one_checkpoint_format_for_one_model_and_a_group(tmp_path):
    ds = data(200)
    [single] = loop.train([(cfg_for("student.loss=hard"), tmp_path / "one")], ds, progress=False)
    runs = [(cfg_for("student.loss=hard"), tmp_path / "m0"), (cfg_for("student.loss=hard+softgt"), tmp_path / "m1")]
    summaries = loop.train(runs, ds, group_dir=tmp_path / "g", progress=False)
    keys = {"epoch", "model", "optimizer", "average", "rng", "members"}
    member_keys = {"name", "config", "meta", "best", "metrics", "prints", "grad_init"}
    group = checkpoint.load(tmp_path / "g" / "checkpoint.pt")
    assert set(group) == keys and [m["name"] for m in group["members"]] == ["m0", "m1"]
    for run in ("one", "m0", "m1"):
        ck = checkpoint.load(tmp_path / run / "checkpoint.pt")
        assert set(ck) == keys and len(ck["members"]) == 1 and set(ck["members"][0]) == member_keys
        model, meta = load_model(tmp_path / run, "last")
        n_params = len(list(model.parameters()))
        assert len(ck["optimizer"]["state"]) == n_params  # the member's own slice of Adam
        assert ck["epoch"] == 1 and meta["build"]["weight_bits"] == 2
    # The group's member m0 trained like the single run "one": same config, loss and seed.
    assert summaries[0]["val_best_acc"] == pytest.approx(single["val_best_acc"], abs=1 / 10 + 1e-9)
    assert summaries[0]["init_sha256"] == single["init_sha256"]


def test_a_group_needs_configs_that_differ_only_in_the_loss(tmp_path):
    runs = [(cfg_for(), tmp_path / "a"), (cfg_for("train.lr=0.5"), tmp_path / "b")]
    with pytest.raises(ValueError, match="but the loss"):
        loop.train(runs, data(100), group_dir=tmp_path / "g", progress=False)
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "g"))  # nothing written


def test_a_session_is_built_from_named_parts_only():
    """`Session` holds 18 parts: each is passed by its name, none by its position, so no
    call can swap two of them silently (issue 30, item 5)."""
    import dataclasses
    fields = dataclasses.fields(loop.Session)
    assert len(fields) > 8 and all(f.kw_only for f in fields)
    with pytest.raises(TypeError, match="positional"):
        loop.Session(*[None] * len(fields))
