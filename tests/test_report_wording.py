"""The report reads as it means: a direction word with a positive size, no headline for a
quantity the design fixes, every ± labelled, and equal seeds said to give no interval.
Studies are synthetic folders (`test_report.make_study`) with extra columns set here."""
import csv
import math
import re

import pytest
from scipy import stats

from qdistill.report import report
from qdistill.study import results

from test_report import make_study

SEEDS = [0, 1, 2]


def set_columns(study, values):
    """Rewrite results.csv with ``values(row) -> {column: value}`` merged into each row."""
    path = study / "results.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update(values(r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=results.COLUMNS)
        w.writeheader()
        w.writerows(rows)


def study_with(tmp_path, values, seeds=SEEDS, acc=lambda q, t, s: 0.8 + 0.01 * s + 0.001 * t * (s + 1)):
    s = make_study(tmp_path / "S", ["q1", "q4"], [1, 8], seeds, acc, acc)
    set_columns(s, values)
    report.write_report(s)
    return (s / "report.md").read_text()


def ece(r):
    """Q4's ECE falls by about 3.95 points from T = 1 to T = 8, with seed noise."""
    s, t = int(r["seed"]), float(r["temperature"])
    return {"test_ece": round(0.08 - (0.0395 + 0.004 * (s - 1) ** 2) * (t == 8.0), 4)}


@pytest.fixture(scope="module")
def ece_report(tmp_path_factory):
    """The report of the study with `ece`'s column: read, never written, by two tests."""
    return study_with(tmp_path_factory.mktemp("ece"), ece)


def test_a_fall_is_a_direction_word_then_a_positive_size_and_its_flipped_interval(ece_report):
    md = ece_report
    d = [-(0.0395 + 0.004 * (s - 1) ** 2) for s in SEEDS]  # T = 8 minus T = 1, per seed
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    expected = (f"ECE (%) falls from T = 1 to T = 8 by {-100 * mean:.2f} [{-100 * (mean + half):.2f}, "
                f"{-100 * (mean - half):.2f}] points (paired, 95% CI).")
    assert expected in md, md.split("### Findings")[1]
    assert not re.search(r"(rises|falls) [^.]* by [-+]", md)


def test_the_headline_leaves_out_a_quantity_fixed_by_design(tmp_path):
    # the ratio at init moves by ~2440 with T at a tiny spread; the ECE moves less, relative to its spread
    def values(r):
        t, s = float(r["temperature"]), int(r["seed"])
        return {**ece(r), "grad_ratio_soft_hard_init": round(1 + 2440 * (t == 8.0) + 0.01 * s, 4)}
    md = study_with(tmp_path, values)
    headline = next(line for line in md.splitlines() if "moved most" in line)
    named, left_out = headline.split("Left out: ")
    assert "Q4 hard + soft (ground truth): ECE (%)" in named and "gradient ratio" not in named
    assert left_out.startswith("the gradient ratio at initialisation, set by T and c by design")


def test_every_plus_minus_is_labelled_sd_or_95_percent_interval(ece_report):
    md = ece_report
    spreads = re.findall(r"± (\d[\d.]*)( \((?:sd|95% CI)\))?", md)
    assert len(spreads) >= 10
    assert [x for x, label in spreads if not label] == []
    # the same mean carries an sd in one table and a 95% interval in another, each labelled
    q4_t8 = [line for line in md.splitlines() if line.startswith(("| Q4 hard + soft (ground truth) | hard+softgt | 8 ",
                                                                  "| 8 | 3 |"))]
    assert "(sd)" in q4_t8[0] and "(95% CI)" in q4_t8[1]


def test_equal_seeds_say_they_give_no_interval(tmp_path):
    md = study_with(tmp_path, lambda r: {}, seeds=[0, 1], acc=lambda q, t, s: 0.9638)
    assert "± 0.00" not in md and "[+0.00, +0.00]" not in md
    assert "Q1 hard labels: test accuracy 96.38% (equal seeds give no interval) over 2 seed(s)" in md
    assert "| 96.38 (equal seeds give no interval) |" in md  # the tables of means and of T
    assert "+0.00 points vs Q1 over 2 paired seeds, 95% CI n/a (equal seeds give no interval)" in md
