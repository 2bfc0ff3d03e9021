"""What temperature does: ECE, NLL and the gradient ratio against hand computations in
float64, the T^2 argument as a measurement, the unseen-class probe, and the report's
section recomputed from the files a study leaves."""
import math
import re

import numpy as np
import pytest
import torch

from qdistill import cli
from qdistill.nn.losses import build_loss
from qdistill.report.temperature import seeds_needed
from qdistill.training import calibration
from qdistill.training.probes import grad_ratio
from qdistill.training.rundir import RunDir

from conftest import SMALL


def test_ece_and_nll_by_hand():
    # 4 images, 3 classes; confidences 0.6, ~0.9, ~0.4, 0.8 land in bins 9, 14, 6 and 12 of 15
    p = np.array([[0.6, 0.3, 0.1], [0.05, 0.9, 0.05], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    labels = np.array([0, 2, 0, 2])  # right, wrong, right, right
    logits = np.log(p)
    # each bin holds one image: |acc - conf| = |1 - 0.6|, |0 - 0.9|, |1 - 0.4|, |1 - 0.8|, each weighted 1/4
    want = (0.4 + 0.9 + 0.6 + 0.2) / 4
    assert calibration.ece(logits, labels) == pytest.approx(want, rel=1e-12)
    # two images in one bin: conf 0.62 and 0.64 (bin 10: (9/15, 10/15]), one right -> |0.5 - 0.63|
    two = np.log(np.array([[0.62, 0.38], [0.64, 0.36]]))
    assert calibration.ece(two, np.array([0, 1])) == pytest.approx(0.13, rel=1e-12)
    assert calibration.nll(logits, labels) == pytest.approx(-np.mean(np.log([0.6, 0.05, 0.4, 0.8])), rel=1e-12)
    # shifting every logit of an image by a constant changes neither
    assert calibration.ece(logits + 3.0, labels) == pytest.approx(want, rel=1e-12)


def test_rank_and_bias_for_rate_by_hand():
    z = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.5, 0.4]])
    assert calibration.class_rank(z, 2).tolist() == [2, 2, 2]
    # margins max_{j != 2} z_j - z_2: 1.0, 2.0, 0.1 -> sorted 0.1, 1.0, 2.0
    assert calibration.bias_for_rate(z, 2, 2 / 3) == pytest.approx((1.0 + 2.0) / 2)
    assert calibration.bias_for_rate(z, 2, 1 / 3) == pytest.approx((0.1 + 1.0) / 2)
    assert calibration.bias_for_rate(z, 1, 0.2) == 0.0  # one of three already picks class 1


def _hand_ratio(z, t, y, T, c, question):
    """The gradients of each term w.r.t. z, written out: d CE(onehot(y), z)/dz =
    (softmax(z) - onehot(y)) / N; d CE(softmax(t/T), z/T)/dz = (softmax(z/T) - softmax(t/T)) / (N T)."""
    n, k = z.shape
    onehot = np.eye(k)[y]
    sm = lambda a: np.exp(a - a.max(1, keepdims=True)) / np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)
    g_hard = (sm(z) - onehot) / n
    target = sm(t / T) if question in ("q2", "q3") else onehot
    g_soft = (sm(z / T) - target) / (n * T) * (1.0 if question == "q2" else c)
    return np.linalg.norm(g_soft) / np.linalg.norm(g_hard)


@pytest.mark.parametrize("question,loss", [("q2", "soft"), ("q3", "hard+soft"), ("q4", "hard+softgt")])
def test_grad_ratio_by_hand(question, loss):
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(64, 10, generator=g, dtype=torch.float64), 3 * torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    for T in (1.0, 4.0):
        fn = build_loss(loss, T, 2.5 if question != "q2" else None)
        want = _hand_ratio(z.numpy(), t.numpy(), y.numpy(), T, 2.5, question)
        assert grad_ratio(fn, z, t, y) == pytest.approx(want, rel=1e-10)
    assert grad_ratio(build_loss("hard"), z, t, y) is None


def test_the_t_squared_argument_measured():
    """For large T, softmax(z/T) - softmax(t/T) = ((z - t) - mean(z - t)) / (K T) + O(1/T^2),
    so the soft term's gradient is c (z - t - mean) / (N K T^2) + O(c / T^3): with c = T^2
    it tends to a constant, with c = 1 it falls like 1/T^2. The band: on random logits
    (N = 256, K = 10, unit-scale student and 3x teacher logits) the ratio with c = T^2 for T
    in 1..50 stays within 25% of its limit (0.74 at T = 1, 0.93-0.96 from T = 2 on: it
    moves only while T is comparable to the logits' spread, where the softmax is far from
    its linear expansion), and ratio(c = 1) * T^2 equals ratio(c = T^2)."""
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(256, 10, generator=g, dtype=torch.float64), 3 * torch.randn(256, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (256,), generator=g)
    temps = [1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 50.0]
    squared = [grad_ratio(build_loss("hard+soft", T, T * T), z, t, y) for T in temps]
    one = [grad_ratio(build_loss("hard+soft", T, 1.0), z, t, y) for T in temps]
    limit = squared[-1]
    first_order = float(((z - t) - (z - t).mean(1, keepdim=True)).norm()
                        / (10 * (torch.softmax(z, 1) - torch.nn.functional.one_hot(y, 10)).norm()))
    assert all(0.75 * first_order <= r <= 1.25 * first_order for r in squared), squared
    for T, r1, r2 in zip(temps, one, squared):
        assert r1 * T * T == pytest.approx(r2, rel=1e-12)
    assert one[-1] < one[0] / 100  # with c = 1 the soft term fades away
    # and T = 50 is at the first-order limit ||z - t - mean|| / (K ||softmax(z) - onehot||), up to O(1/T)
    assert limit == pytest.approx(first_order, rel=0.01)


def test_seeds_needed_formula():
    # sd of paired differences 1 point: ((1.96 + 0.84) * 1 / 0.5)^2 = 31.4 -> 32
    assert seeds_needed(0.01) == math.ceil(((1.959964 + 0.841621) * 0.01 / 0.005) ** 2) == 32
    assert seeds_needed(0.0) == 2


def test_the_omitted_class_is_absent_from_every_training_batch_and_present_in_test(tmp_path, monkeypatch):
    from qdistill.training import loop
    seen, real = [], loop.batches

    def spy(x, y, *a, **k):
        for xb, yb, idx in real(x, y, *a, **k):
            seen.append(yb.clone())
            yield xb, yb, idx
    monkeypatch.setattr(loop, "batches", spy)
    out = tmp_path / "probe"
    assert cli.main(["student", *SMALL, "--loss", "hard", "--epochs", "2", "--omit-class", "3",
                     "--out", str(out)]) == 0
    labels = torch.cat(seen)
    assert 3 not in labels.tolist() and set(labels.tolist()) == set(range(10)) - {3}
    summary = RunDir(out).read_summary()
    logits = RunDir(out).read_test_logits()
    from qdistill.data.registry import load
    from conftest import SMALL_DATA
    y = load(SMALL_DATA).y_test.numpy()
    assert (y == 3).sum() > 0 and logits.shape == (len(y), 10)
    assert summary["omitted_class"] == 3
    assert summary["omitted_class_acc"] == float((logits[y == 3].argmax(1) == 3).mean())
    assert summary["omitted_class_rank"] == float(calibration.class_rank(logits[y == 3], 3).mean())
    assert "omitted_class_acc_bias_corrected" not in summary  # no teacher: no bias chosen
    assert cli.main(["student", *SMALL, "--loss", "hard", "--omit-class", "10", "--out", str(tmp_path / "x")]) == 2


STUDY = """
[data]
dataset = "digits"
max_train = 160
max_test = 80
[train]
epochs = 1
batch_size = 64
[study]
temperatures = [1.0, 4.0]
seeds = [0, 1]
questions = ["q3", "q4"]
teacher_epochs = 2
allow_weak_teacher = true
"""


@pytest.mark.slow  # a whole study
def test_the_report_section_matches_what_the_run_files_give(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(STUDY)
    s = tmp_path / "S"
    assert cli.main(["study", str(cfg), "--out", str(s), "--quiet", "--omit-class", "3"]) == 0
    md = (s / "report.md").read_text()
    assert "## What temperature does" in md and "### Dark knowledge beyond label smoothing: Q3 - Q4" in md
    assert "### The unseen class: 3" in md and "seeds are needed" in md
    from qdistill.data.registry import load
    y = load({"dataset": "digits", "max_train": 160, "max_test": 80}).y_test.numpy()
    table = md.split("### Q3 hard + soft (teacher)")[1].split("\n\n")[1].splitlines()
    row_t4 = next(r for r in table if r.startswith("| 4 |")).split(" | ")
    eces = [calibration.ece(RunDir(s / "runs" / f"q3-hard+soft-T4-s{seed}").read_test_logits(), y)
            for seed in (0, 1)]
    summaries = [RunDir(s / "runs" / f"q3-hard+soft-T4-s{seed}").read_summary() for seed in (0, 1)]
    assert [x["test_ece"] for x in summaries] == pytest.approx(eces, rel=1e-6)  # float32 logits on disk
    assert row_t4[3] .startswith(f"{100 * (eces[0] + eces[1]) / 2:.2f} ± ")
    ratio = (summaries[0]["grad_ratio_soft_hard"] + summaries[1]["grad_ratio_soft_hard"]) / 2
    assert row_t4[7].startswith(f"{ratio:.3g} ± ")
    assert re.search(r"about \d+ seeds are needed", md)
