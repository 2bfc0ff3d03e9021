"""The study report: tables, choice on validation, paired CIs, self-contained HTML, chosen
configs and diffs. Studies are synthetic directories written here with known numbers."""
import base64
import csv
import json
import math
import re
import statistics
import zlib

import numpy as np
import pytest
from scipy import stats

from qdistill.report import report
from qdistill.study import results
from qdistill.errors import RunError

LOSS = {"q1": "hard", "q2": "soft", "q3": "hard+soft", "q4": "hard+softgt"}
CLASSES = ["zero", "one", "two", "three"]


def run_name(q, t, seed):
    return f"{q}-{LOSS[q]}-T{t:g}-s{seed}"


def make_study(path, questions, temps, seeds, val, test, failed=(), pending=()):
    """A study directory in the runner's format. ``val(q, T, seed)`` and ``test(...)`` give the
    accuracies; runs in ``failed``/``pending`` ((q, T, seed) tuples) have empty metric cells."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "study.toml").write_text(
        f"[student]\nmodel = \"vgg7\"\nweight_bits = 2\nact_bits = 1\nscheme = \"dorefa\"\n\n"
        f"[study]\ntemperatures = {[float(t) for t in temps]}\nseeds = {list(seeds)}\n"
        f"questions = {json.dumps(list(questions))}\n")
    (path / "teacher.json").write_text(json.dumps(
        {"run": "/runs/teacher", "val_best_acc": 0.97, "test_acc": 0.9612, "model": "vgg7"}))
    rng = np.random.default_rng(0)
    np.savez(path / "teacher_test.npz", logits=rng.normal(0, 3, (40, 4)).astype(np.float32),
             labels=rng.integers(0, 4, 40), class_names=np.array(CLASSES))
    rows = []
    for q in questions:
        for t in ([1.0] if q == "q1" else temps):
            for s in seeds:
                name = run_name(q, t, s)
                c = "" if q in ("q1", "q2") else t * t
                cfg = (f"[student]\nmodel = \"vgg7\"\nloss = \"{LOSS[q]}\"\ntemperature = {float(t)}\n"
                       + (f"c = {float(c)}\n" if c != "" else "") + f"\n[train]\nseed = {s}\nepochs = 3\n")
                rd = path / "runs" / name
                rd.mkdir(parents=True)
                (rd / "config.toml").write_text(cfg)
                row = dict(run=name, question=q, loss=LOSS[q], temperature=t, c=c, seed=s, weight_bits=2,
                           act_bits=1, grad_bits=32, scheme="dorefa", epochs=3, status="ok", error="")
                if (q, t, s) in failed or (q, t, s) in pending:
                    row["status"] = "failed" if (q, t, s) in failed else "pending"
                    row["error"] = ("RuntimeError: CUDA out of memory | tried 2 GiB"
                                    if (q, t, s) in failed else "")
                    rows.append(row)
                    continue
                v, te = val(q, t, s), test(q, t, s)
                per_class = [round(te + 0.01 * (k - 1.5) + 0.001 * s, 4) for k in range(4)]
                row.update(val_best_acc=v, test_acc_at_val_best=te, test_acc_last=round(te - 0.001, 4),
                           teacher_agreement=round(0.8 + 0.01 * t, 4), kl_to_teacher=round(0.5 / t, 4),
                           wall_s=1.5, img_per_s=1000.0)
                (rd / "metrics.jsonl").write_text("".join(
                    json.dumps({"epoch": e, "train_loss": 1.0, "train_acc": 0.5,
                                "val_acc": v - 0.01 * (3 - e), "test_acc": te, "lr": 0.01,
                                "img_per_s": 1000.0, "wall_s": 0.5}) + "\n"
                    for e in (1, 2, 3)))
                (rd / "summary.json").write_text(json.dumps({
                    "val_best_acc": v, "test_acc_at_val_best": te, "test_acc_last": te, "best_epoch": 3,
                    "epochs": 3, "wall_s": 1.5, "img_per_s": 1000.0, "params": 10, "model_bytes_at_bits": 3,
                    "test_per_class_acc": per_class, "teacher_agreement": 0.8, "kl_to_teacher": 0.1}))
                rows.append(row)
    with open(path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=results.COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def noisy(base):
    """Accuracies base[q][T] plus a fixed per-(q, T, seed) jitter, 4 decimals like a real csv."""
    def f(q, t, s):
        jitter = ((zlib.crc32(f"{q} {t:g} {s}".encode()) % 1000) / 1000 - 0.5) * 0.02
        return round(base[q][float(t)] + jitter, 4)
    return f


# Q2: validation prefers T=2, test prefers T=8 (the report must follow validation).
VAL = {"q1": {1.0: 0.80}, "q2": {1.0: 0.82, 2.0: 0.88, 8.0: 0.84},
       "q3": {1.0: 0.82, 2.0: 0.85, 8.0: 0.89}, "q4": {1.0: 0.80, 2.0: 0.83, 8.0: 0.81}}
TEST = {"q1": {1.0: 0.79}, "q2": {1.0: 0.80, 2.0: 0.83, 8.0: 0.90},
        "q3": {1.0: 0.82, 2.0: 0.84, 8.0: 0.86}, "q4": {1.0: 0.80, 2.0: 0.81, 8.0: 0.812}}
SEEDS = [3, 1, 2]  # the study's first seed is 3, not the smallest


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    d = make_study(tmp_path_factory.mktemp("study") / "S", ["q1", "q2", "q3", "q4"], [1, 2, 8], SEEDS,
                   noisy(VAL), noisy(TEST), failed={("q4", 8.0, 2)}, pending={("q3", 1.0, 1)})
    out = report.write_report(d)
    return d, out, (d / "report.md").read_text()


def csv_rows(study):
    with open(study / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def md_table(md, column):
    """The Markdown table whose header has ``column``, as a list of {header: cell}."""
    for block in md.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("|") and f"| {column} |" in lines[0]:
            split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            head = split(lines[0])
            return [dict(zip(head, split(line))) for line in lines[2:]]
    raise AssertionError(f"no table with column {column!r}")


def test_table_values_equal_stats_of_the_rows(full):
    study, _, md = full
    table = md_table(md, "loss")
    groups = {}
    for r in csv_rows(study):
        if r["status"] == "ok":
            groups.setdefault((r["question"], float(r["temperature"])), []).append(r)
    assert len(table) == len(groups) == 10
    assert [(c["question"][:2], c["T"]) for c in table if c[""] == "**chosen**"] == \
        [("Q1", "–"), ("Q2", "2"), ("Q3", "8"), ("Q4", "2")]
    for cell in table:
        q = cell["question"].split()[0].lower()
        t = 1.0 if cell["T"] == "–" else float(cell["T"])
        rs = groups[(q, t)]
        tests = [float(r["test_acc_at_val_best"]) for r in rs]
        vals = [float(r["val_best_acc"]) for r in rs]
        assert cell["seeds"] == str(len(rs))
        assert cell["val best (mean)"] == f"{100 * statistics.mean(vals):.2f}"
        assert cell["test at val best (mean ± sd)"] == \
            f"{100 * statistics.mean(tests):.2f} ± {100 * statistics.stdev(tests):.2f} (sd)"
    # the failed and the pending run are not counted
    assert next(c for c in table if c["question"].startswith("Q4") and c["T"] == "8")["seeds"] == "2"
    assert next(c for c in table if c["question"].startswith("Q3") and c["T"] == "1")["seeds"] == "2"


def test_choice_follows_validation_even_when_test_prefers_another_t(full):
    study, _, md = full
    rows = results.read_results(study / "results.csv")
    chosen = results.choose(rows, SEEDS)
    assert [chosen[q]["temperature"] for q in ("q2", "q3", "q4")] == [2.0, 8.0, 2.0]
    assert chosen["q2"]["test_best_temperature"] == 8.0  # the data do disagree on test
    chosen_table = {c["question"].split()[0]: c for c in md_table(md, "CI excludes 0")}
    assert chosen_table["Q2"]["T"] == "2" and chosen_table["Q3"]["T"] == "8"
    assert "Test accuracy alone would have picked T = 8" in md


def test_tie_goes_to_the_lower_temperature():
    rows = [dict(run=f"r{t}{s}", question="q2", loss="soft", temperature=t, c="", seed=s, status="ok",
                 val_best_acc=v, test_acc_at_val_best=te, error="")
            # equal mean validation (same values, other seed order) at T=2 and T=4; test prefers 4
            for t, s, v, te in [(4, 0, 0.7, 0.9), (4, 1, 0.9, 0.9), (2, 0, 0.9, 0.5), (2, 1, 0.7, 0.5),
                                (1, 0, 0.6, 0.6), (1, 1, 0.6, 0.6)]]
    info = results.choose(rows)["q2"]
    assert info["temperature"] == 2.0 and info["run"] == "r20"


def test_paired_ci_over_three_seeds_matches_an_independent_computation(full):
    study, _, md = full
    by = {(r["question"], float(r["temperature"]), int(r["seed"])): float(r["test_acc_at_val_best"])
          for r in csv_rows(study) if r["status"] == "ok"}
    chosen_table = {c["question"].split()[0]: c for c in md_table(md, "CI excludes 0")}
    for q, t in (("q2", 2.0), ("q3", 8.0)):
        d = [by[(q, t, s)] - by[("q1", 1.0, s)] for s in SEEDS]
        m, sd = statistics.mean(d), statistics.stdev(d)
        half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
        cell = chosen_table[q.upper()]
        assert cell["paired diff vs Q1 (points)"] == f"{100 * m:+.2f}"
        assert cell["95% CI (points)"] == f"[{100 * (m - half):+.2f}, {100 * (m + half):+.2f}]"
        assert cell["CI excludes 0"] == ("yes" if (m - half > 0 or m + half < 0) else "no")
    # Q4's chosen T=2 has all 3 seeds; the words repeat the same numbers
    assert f"95% CI {chosen_table['Q2']['95% CI (points)']}" in md


def test_html_is_self_contained_with_embedded_pngs(full):
    study, out, _ = full
    page = out["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(out["plots"]) == 5
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attr.startswith("data:")
    assert "<link" not in page and "<script" not in page and "url(" not in page
    for p in out["plots"]:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_chosen_configs_are_the_first_seed_runs_and_diffs_show_the_change(full):
    study, out, _ = full
    expected = {"q1": run_name("q1", 1, 3), "q2": run_name("q2", 2, 3), "q3": run_name("q3", 8, 3),
                "q4": run_name("q4", 2, 3)}
    for q, run in expected.items():
        assert (study / "chosen" / f"{q}.toml").read_bytes() == \
            (study / "runs" / run / "config.toml").read_bytes()
    assert not (study / "chosen" / "q1.diff").exists()
    diff = (study / "chosen" / "q3.diff").read_text()
    assert diff.startswith("--- q1.toml\truns/q1-hard-T1-s3/config.toml\n"
                           "+++ q3.toml\truns/q3-hard+soft-T8-s3/config.toml\n")
    changed = {line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")}
    assert changed == {'-loss = "hard"', '+loss = "hard+soft"', "-temperature = 1.0", "+temperature = 8.0",
                       "+c = 64.0"}
    assert '+loss = "soft"' in (study / "chosen" / "q2.diff").read_text()
    assert sorted(p.name for p in out["chosen"]) == ["q1.toml", "q2.diff", "q2.toml", "q3.diff", "q3.toml",
                                                     "q4.diff", "q4.toml"]


def test_failed_and_pending_runs_are_listed_with_their_errors(full):
    _, _, md = full
    bad = md_table(md, "error")
    assert [(r["run"], r["status"]) for r in bad] == [("`q3-hard+soft-T1-s1`", "pending"),
                                                      ("`q4-hard+softgt-T8-s2`", "failed")]
    assert bad[1]["error"] == "RuntimeError: CUDA out of memory \\| tried 2 GiB"


def test_per_class_table_is_the_seed_mean_of_the_chosen_runs(full):
    study, _, md = full
    table = md_table(md, "class")
    per_seed = [json.loads((study / "runs" / run_name("q2", 2, s) / "summary.json").read_text())
                ["test_per_class_acc"] for s in SEEDS]
    assert [r["class"] for r in table] == CLASSES
    for k, row in enumerate(table):
        assert row["Q2 soft (teacher)"] == f"{100 * statistics.mean(p[k] for p in per_seed):.2f}"


def test_study_of_q1_and_q3_only_with_one_seed(tmp_path):
    d = make_study(tmp_path / "S", ["q1", "q3"], [1, 4], [0], noisy(VAL | {"q3": {1.0: 0.8, 4.0: 0.9}}),
                   noisy(TEST | {"q3": {1.0: 0.8, 4.0: 0.9}}))
    (d / "chosen").mkdir()
    (d / "chosen" / "q4.toml").write_text("stale")  # from an earlier study in the same place
    (d / "teacher_test.npz").unlink()
    out = report.write_report(d)
    md = out["md"].read_text()
    assert sorted(p.name for p in (d / "chosen").iterdir()) == ["q1.toml", "q3.diff", "q3.toml"]
    q3 = next(c for c in md_table(md, "CI excludes 0") if c["question"].startswith("Q3"))
    assert q3["T"] == "4" and q3["95% CI (points)"] == "n/a (1 seed)" and q3["CI excludes 0"] == "–"
    assert "Q2" not in md and "Q4" not in md
    assert "teacher_test.npz not found" in md
    assert len(out["plots"]) == 4  # no entropy plot without the teacher's logits


def test_soft_target_entropy_formula():
    z = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    for t in (1.0, 3.0):
        p = np.exp(z / t) / np.exp(z / t).sum(axis=1, keepdims=True)
        expected = np.mean(-(p * np.log(p)).sum(axis=1))
        assert results.soft_target_entropy(z, [t])[0] == pytest.approx(expected, rel=1e-12)
    # huge logits: no nan from log(0), and a confident teacher has ~0 entropy at T=1
    h = results.soft_target_entropy(np.array([[1000.0, 0.0, 0.0]]), [1.0, 1e6])
    assert h[0] == pytest.approx(0.0, abs=1e-12) and h[1] == pytest.approx(math.log(3), rel=1e-6)


def test_bad_studies_are_user_errors(tmp_path):
    with pytest.raises(RunError, match="study directory not found"):
        report.write_report(tmp_path / "nope")
    (tmp_path / "results.csv").write_text("run,question,seed\n")
    with pytest.raises(RunError, match="missing: loss, temperature"):
        report.write_report(tmp_path)
    (tmp_path / "results.csv").write_text(",".join(results.COLUMNS) + "\n" + "r,q2,soft,kl,x" + "," * (len(results.COLUMNS) - 5) + "\n")
    with pytest.raises(RunError, match="line 2: temperature must be a number"):
        report.write_report(tmp_path)


def test_study_whose_q1_has_not_finished(tmp_path):
    d = make_study(tmp_path / "S", ["q1", "q2"], [1, 4], [0], noisy(VAL), noisy(VAL),
                   pending={("q1", 1.0, 0), ("q2", 4.0, 0)})
    out = report.write_report(d)
    md = out["md"].read_text()
    q2 = md_table(md, "CI excludes 0")
    assert [(c["question"], c["T"], c["95% CI (points)"]) for c in q2] == \
        [("Q2 soft (teacher)", "1", "n/a (no Q1)")]
    assert "No finished run yet for Q1." in md
    assert [p.name for p in out["chosen"]] == ["q2.toml"]


@pytest.mark.slow
def test_report_layer_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, qdistill.report.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_identical_paired_differences_claim_nothing(tmp_path):
    # every seed: Q2 exactly 2 points above Q1, so the t-interval has zero width
    exact = lambda q, t, s: 0.80 + (0.02 if q == "q2" else 0.0) + 0.01 * s
    d = make_study(tmp_path / "S", ["q1", "q2"], [4], [0, 1], exact, exact)
    report.write_report(d)
    md = (d / "report.md").read_text()
    assert "+2.00 points vs Q1 over 2 paired seeds" in md
    assert "zero width" in md and "larger than its uncertainty" not in md


def test_differences_of_equal_image_counts_in_float32_accuracies_claim_nothing(tmp_path):
    # the demo's figures: Q1 354 and 353 of 359 images, Q2 352 and 351; as float32 the
    # per-seed differences disagree in the 8th digit, which gave a "CI" of [-0.56, -0.56]
    images = {("q1", 0): 354, ("q1", 1): 353, ("q2", 0): 352, ("q2", 1): 351}
    acc = lambda q, t, s: float(np.float32(images[q, s] / 359))
    d = make_study(tmp_path / "S", ["q1", "q2"], [4], [0, 1], acc, acc)
    report.write_report(d)
    md = (d / "report.md").read_text()
    assert "-0.56 points vs Q1 over 2 paired seeds" in md
    assert "zero width" in md and "larger than its uncertainty" not in md and "[-0.56, -0.56]" not in md


def test_report_marks_runs_that_end_at_chance(tmp_path):
    # 4 classes: chance is 25%, and "at chance" means at most 30% test accuracy.
    s = make_study(tmp_path / "S", ["q1", "q2"], [1.0, 4.0], [0],
                   val=lambda q, t, s: 0.9, test=lambda q, t, s: 0.3 if (q, t) == ("q2", 4.0) else 0.31)
    report.write_report(s)
    md = (s / "report.md").read_text()
    section = md.split("## Runs at chance")[1].split("\n## ")[0]
    assert "`q2-soft-T4-s0`" in section
    assert "q2-soft-T1-s0" not in section and "q1-hard-T1-s0" not in section  # 31% is above the line
    s2 = make_study(tmp_path / "S2", ["q1"], [1.0], [0], val=lambda *a: 0.9, test=lambda *a: 0.9)
    report.write_report(s2)
    assert "None: every finished run ends more than 5 points above chance (25.00% for 4 classes)" in \
        (s2 / "report.md").read_text()
