"""The analysis report of a temperature study: tables, plots, chosen configs and their diffs.

Reads only the files a study leaves (``results.csv``, ``study.toml``, ``teacher.json``,
``teacher_test.npz``, ``runs/<run>/{config.toml,metrics.jsonl,summary.json}``) and knows
nothing of training. Writes, each file atomically::

    STUDY/report.md, STUDY/report.html (self-contained: images as data URIs)
    STUDY/plots/*.png
    STUDY/chosen/q1.toml..q4.toml  byte copies of the chosen runs' configs (first seed)
    STUDY/chosen/q2.diff..q4.diff  unified diffs of each chosen config against q1.toml

Every choice is made on validation accuracy (mean ``val_best_acc`` over seeds, ties to the
lower temperature); test accuracy is reported, never used to choose.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import config as configlib
from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import RunError
from ..study import QUESTIONS
from ..study.results import (STATUSES, choose, condition_key, conditions, paired_difference, read_results,
                             read_teacher_logits, seed_order, soft_target_entropy)
from ..training.rundir import read_json, read_metrics, read_summary
from . import plots
from .chosen import write_chosen
from .document import to_html, to_markdown
from .formatting import ci_text, excludes_zero, mean_pm, num, pct, pts

TITLES = {"q1": "Q1 hard labels", "q2": "Q2 soft (teacher)", "q3": "Q3 hard + soft (teacher)",
          "q4": "Q4 hard + soft (ground truth)"}
PLOT_FILES = {"accuracy": "accuracy_vs_T.png", "entropy": "entropy_vs_T.png",
              "agreement": "agreement_kl_vs_T.png", "per_class": "per_class.png",
              "curves": "training_curves.png"}


# ---------------------------------------------------------------- writing a report

def _study_meta(study: Path) -> dict:
    path = study / "study.toml"
    return configlib.read_toml(path) if path.is_file() else {}


def _mean_by_epoch(runs_metrics: list[list[dict]]) -> tuple[list, list]:
    """Mean val_acc per epoch over the runs that reached that epoch."""
    per_epoch: dict[int, list[float]] = {}
    for metrics in runs_metrics:
        for m in metrics:
            if m.get("val_acc") is not None:
                per_epoch.setdefault(int(m["epoch"]), []).append(float(m["val_acc"]))
    epochs = sorted(per_epoch)
    return epochs, [math.fsum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]


def _per_run_data(study: Path, chosen: dict, notes: list) -> tuple[dict, dict]:
    """Per chosen question: per-class test accuracy (mean over seeds, from summary.json)
    and the mean validation curve (from metrics.jsonl)."""
    per_class, curves = {}, {}
    for q, info in chosen.items():
        summaries, metrics = [], []
        for run in info["runs"]:
            s = read_summary(study / "runs" / run)
            if s and s.get("test_per_class_acc"):
                summaries.append(np.asarray(s["test_per_class_acc"], dtype=np.float64))
            else:
                notes.append(f"runs/{run}/summary.json missing or without test_per_class_acc.")
            m = read_metrics(study / "runs" / run)
            if m:
                metrics.append(m)
            else:
                notes.append(f"runs/{run}/metrics.jsonl missing or empty.")
        if summaries and len({len(s) for s in summaries}) == 1:
            per_class[q] = np.mean(summaries, axis=0)
        if metrics:
            label = TITLES[q] + ("" if q == "q1" else f", T={num(info['temperature'])}")
            curves[label] = _mean_by_epoch(metrics)
    if len({len(v) for v in per_class.values()}) > 1:
        notes.append("chosen runs disagree on the number of classes: no per-class comparison.")
        per_class = {}
    return per_class, curves


def _figures(conds, chosen, swept, teacher, tlogits, entropy, per_class, class_names, curves) -> dict:
    """{plot key: PNG bytes} for every figure the study's files allow."""
    images: dict[str, bytes] = {}
    q1 = chosen["q1"]["condition"] if "q1" in chosen else None
    if swept:
        def col(q, key, i):
            return [c.stat(key)[i] for c in conds if c.question == q]
        series = {TITLES[q]: ([c.temperature for c in conds if c.question == q],
                              col(q, "test_acc_at_val_best", 0), col(q, "test_acc_at_val_best", 1))
                  for q in swept}
        images["accuracy"] = plots.accuracy_vs_temperature(
            series, q1.stat("test_acc_at_val_best") if q1 else None, teacher.get("test_acc"),
            {TITLES[q]: chosen[q]["temperature"] for q in swept})
    if entropy is not None:
        ts, hs, hmax = entropy
        lo, hi = math.log(min(ts + [1.0])) - 0.2, math.log(max(ts + [1.0])) + 0.2
        curve_t = np.exp(np.linspace(lo, hi, 120))
        images["entropy"] = plots.entropy_vs_temperature(
            ts, hs, curve_t, soft_target_entropy(tlogits[0], curve_t), hmax)
    agree, kl = {}, {}
    for q in swept:
        for key, dest in (("teacher_agreement", agree), ("kl_to_teacher", kl)):
            points = [(c.temperature, c.stat(key)[0]) for c in conds if c.question == q and c.stat(key)]
            if points:
                dest[TITLES[q]] = ([t for t, _ in points], [m for _, m in points])
    if agree or kl:
        ref = {key: q1.stat(key)[0] if q1 and q1.stat(key) else None
               for key in ("teacher_agreement", "kl_to_teacher")}
        images["agreement"] = plots.agreement_kl_vs_temperature(
            agree, kl, ref["teacher_agreement"], ref["kl_to_teacher"])
    if per_class:
        cols = list(per_class)
        k = len(per_class[cols[0]])
        images["per_class"] = plots.per_class_heatmap(
            class_names if len(class_names) == k else [str(i) for i in range(k)],
            [TITLES[q] for q in cols], np.stack([per_class[q] for q in cols], axis=1),
            cols.index("q1") if "q1" in cols else None)
    if curves:
        images["curves"] = plots.training_curves(curves)
    return images


def write_report(study_dir: str | Path) -> dict:
    """Write the report of the study in ``study_dir``; returns the paths written:
    {"md": Path, "html": Path, "plots": [Path], "chosen": [Path]}."""
    study = Path(study_dir)
    if not study.is_dir():
        raise RunError(f"study directory not found: {study}")
    rows = read_results(study / "results.csv")
    meta = _study_meta(study)
    st = meta.get("study", {})
    seeds = seed_order(rows, st.get("seeds"))
    teacher = read_json(study / "teacher.json") or {}
    tlogits = read_teacher_logits(study / "teacher_test.npz")
    conds = conditions(rows, seeds)
    chosen = choose(rows, seeds)
    questions = [q for q in QUESTIONS
                 if q in st.get("questions", ()) or any(r["question"] == q for r in rows)]
    swept = [q for q in ("q2", "q3", "q4") if q in chosen]
    notes: list[str] = []

    q1 = chosen.get("q1")
    diffs = {q: paired_difference(chosen[q]["condition"].by_seed("test_acc_at_val_best"),
                                  q1["condition"].by_seed("test_acc_at_val_best")) if q1 else None
             for q in swept}
    class_names = tlogits[1] if tlogits is not None else []
    grid_t = sorted(set(st.get("temperatures", [])) | {c.temperature for c in conds if c.question != "q1"})
    entropy = None
    if tlogits is not None and grid_t:
        entropy = (grid_t, soft_target_entropy(tlogits[0], grid_t), math.log(tlogits[0].shape[1]))
    else:
        notes.append("teacher_test.npz not found: no soft-target entropy." if tlogits is None
                     else "no temperatures in this study: no soft-target entropy.")
    per_class, curves = _per_run_data(study, chosen, notes)
    images = _figures(conds, chosen, swept, teacher, tlogits, entropy, per_class, class_names, curves)
    chosen_paths, configs, diff_text = write_chosen(study, chosen, swept, notes)
    plot_paths = {key: f"plots/{PLOT_FILES[key]}" for key in images}
    for key, name in PLOT_FILES.items():
        if key in images:
            atomic_write_bytes(study / plot_paths[key], images[key])
        elif (study / "plots" / name).exists():  # from an earlier report of a different study
            (study / "plots" / name).unlink()

    blocks = _blocks(study, rows, meta, teacher, conds, chosen, questions, diffs, entropy,
                     per_class, class_names, images, configs, diff_text, notes)
    title = f"Temperature study report: {study.name}"
    atomic_write_text(study / "report.md", to_markdown(blocks, plot_paths))
    atomic_write_text(study / "report.html", to_html(blocks, images, title))
    return {"md": study / "report.md", "html": study / "report.html",
            "plots": [study / plot_paths[k] for k in images], "chosen": chosen_paths}


def _summary_words(chosen, diffs, teacher, entropy, conds) -> list[str]:
    items = []
    if teacher.get("test_acc") is not None:
        items.append(f"Teacher ({teacher.get('model') or teacher.get('kind') or 'full precision'}): "
                     f"test accuracy {pct(teacher['test_acc'])}%.")
    q1 = chosen.get("q1")
    if q1:
        items.append(f"{TITLES['q1']}: test accuracy {pct(q1['test_mean'])}% ± {pct(q1['test_std'])} "
                     f"over {q1['n']} seed(s); the reference of every paired difference.")
    for q, info in chosen.items():
        if q == "q1":
            continue
        s = (f"{TITLES[q]}: T = {num(info['temperature'])} won on validation "
             f"({pct(info['val_mean'])}%), test {pct(info['test_mean'])}% ± {pct(info['test_std'])}")
        d = diffs.get(q)
        if d is None:
            s += "; no Q1 runs with the same seeds to compare with."
        elif d["n"] < 2:
            s += (f"; {pts(d['mean'])} points vs Q1 on 1 seed: n/a (1 seed), "
                  "so this difference cannot be told apart from seed noise.")
        else:
            s += f"; {pts(d['mean'])} points vs Q1 over {d['n']} paired seeds, 95% CI {ci_text(d)}: "
            if d["lo"] == d["hi"]:
                # Identical per-seed differences (likely on a small test set) give a
                # zero-width interval: it measures nothing, so claim nothing from it.
                s += ("every seed gave the same difference, so the interval has zero width and "
                      "does not measure the uncertainty; more seeds are needed.")
            elif excludes_zero(d):
                s += "the CI excludes 0, so the difference is larger than its uncertainty."
            else:
                s += "the CI includes 0, so the difference is within its uncertainty."
        if info["test_best_temperature"] != info["temperature"]:
            s += (f" (Test accuracy alone would have picked T = {num(info['test_best_temperature'])};"
                  " the choice uses validation only.)")
        items.append(s)
        agree = [(c.temperature, c.stat("teacher_agreement")[0]) for c in conds
                 if c.question == q and c.stat("teacher_agreement")]
        hi, lo = max(agree, key=lambda x: x[1], default=None), min(agree, key=lambda x: x[1], default=None)
        if len(agree) > 1 and hi[1] == lo[1]:
            items.append(f"{TITLES[q]}: top-1 agreement with the teacher is {pct(hi[1])}% at every T.")
        elif len(agree) > 1:
            items.append(f"{TITLES[q]}: top-1 agreement with the teacher is highest at T = {num(hi[0])} "
                         f"({pct(hi[1])}%) and lowest at T = {num(lo[0])} ({pct(lo[1])}%).")
    if entropy is not None:
        ts, hs, hmax = entropy
        items.append(f"The teacher's soft targets carry {hs[0]:.3f} nats of entropy at T = {num(ts[0])} and "
                     f"{hs[-1]:.3f} nats at T = {num(ts[-1])} (uniform: ln K = {hmax:.3f}).")
    return items


def _chosen_table(chosen, diffs) -> tuple:
    table = []
    for q, info in chosen.items():
        d = diffs.get(q)
        excl = excludes_zero(d)
        table.append([TITLES[q], "–" if q == "q1" else num(info["temperature"]),
                      "–" if info["c"] is None else num(info["c"]), info["n"], pct(info["val_mean"]),
                      f"{pct(info['test_mean'])} ± {pct(info['test_std'])}",
                      "reference" if q == "q1" else pts(d["mean"]) if d else "n/a",
                      "–" if q == "q1" else ci_text(d),
                      "–" if q == "q1" or excl is None else ("yes" if excl else "no"),
                      f"`{info['run']}`"])
    return ("table", ["question", "T", "c", "seeds", "val best (mean)", "test (mean ± std)",
                      "paired diff vs Q1 (points)", "95% CI (points)", "CI excludes 0", "config from run"],
            table)


def _blocks(study, rows, meta, teacher, conds, chosen, questions, diffs, entropy, per_class,
            class_names, images, configs, diff_text, notes) -> list:
    st, student = meta.get("study", {}), meta.get("student", {})
    n_status = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    b = [("h", 1, f"Temperature study report: {study.name}")]
    desc = (f"Student {student.get('model', '?')} "
            f"W{student.get('weight_bits', '?')}A{student.get('act_bits', '?')} "
            f"({student.get('scheme', '?')}), questions {', '.join(q.upper() for q in questions)}")
    if st.get("temperatures"):
        desc += f", temperatures {', '.join(num(t) for t in st['temperatures'])}"
    if st.get("seeds"):
        desc += f", seeds {', '.join(str(s) for s in st['seeds'])}"
    b.append(("p", desc + f"; {len(rows)} runs: {n_status['ok']} ok, {n_status['failed']} failed, "
                          f"{n_status['pending']} pending. Accuracies are in percent."))
    b.append(("p", "Every choice is made on validation accuracy (mean `val_best_acc` over seeds, "
                   "ties to the lower T); test accuracy (`test_acc_at_val_best`: the test accuracy at the "
                   "epoch of best validation) is reported, never used to choose."))
    b += [("h", 2, "Summary"), ("ul", _summary_words(chosen, diffs, teacher, entropy, conds))]

    b.append(("h", 2, "Teacher"))
    code = lambda key: f"`{teacher[key]}`" if teacher.get(key) else "n/a"
    b.append(("table", ["model", "kind", "val best acc", "test acc", "run", "file", "sha256"],
              [[teacher.get("model") or "n/a", teacher.get("kind") or "n/a", pct(teacher.get("val_best_acc")),
                pct(teacher.get("test_acc")), code("run"), code("file"), code("sha256")]]))

    b.append(("h", 2, "Results by question and temperature"))
    table = []
    for c in conds:
        info = chosen.get(c.question)
        agr, klv = c.stat("teacher_agreement"), c.stat("kl_to_teacher")
        table.append([TITLES[c.question], c.loss, "–" if c.question == "q1" else num(c.temperature),
                      "–" if c.c is None else num(c.c), len(c.rows), pct(c.stat("val_best_acc")[0]),
                      mean_pm(c.stat("test_acc_at_val_best")),
                      pct(c.stat("test_acc_last")[0]) if c.stat("test_acc_last") else "n/a",
                      pct(agr[0]) if agr else "n/a", f"{klv[0]:.4f}" if klv else "n/a",
                      "**chosen**" if info and condition_key(info["condition"]) == condition_key(c) else ""])
    b.append(("table", ["question", "loss", "T", "c", "seeds", "val best (mean)",
                        "test at val best (mean ± std)", "test last (mean)", "agreement (mean)",
                        "KL to teacher (mean)", ""], table) if table
             else ("p", "No finished run yet: nothing to tabulate or choose."))
    missing = [q for q in questions if q not in chosen]
    if missing and chosen:
        b.append(("p", f"No finished run yet for {', '.join(q.upper() for q in missing)}."))

    if chosen:
        b += [("h", 2, "Chosen temperature per question"), _chosen_table(chosen, diffs),
              ("p", "Paired difference: for each seed, the chosen condition's test accuracy minus Q1's "
                    "(same seed: same initial weights and batch order), "
                    "then mean ± t(0.975, n-1)·sd/√n.")]
    if "accuracy" in images:
        b += [("h", 2, "Accuracy vs temperature"), ("img", "accuracy", "accuracy vs temperature")]
    b.append(("h", 2, "How temperature changes what the student learns"))
    if entropy is not None:
        ts, hs, hmax = entropy
        b += [("h", 3, "Softness of the teacher's targets"), ("img", "entropy", "soft-target entropy vs T"),
              ("table", ["T", "mean entropy (nats)", "fraction of ln K"],
               [[num(t), f"{h:.4f}", f"{h / hmax:.3f}"] for t, h in zip(ts, hs)])]
    if "agreement" in images:
        b += [("h", 3, "Agreement with the teacher and KL"), ("img", "agreement", "agreement and KL vs T")]
    if per_class:
        cols = list(per_class)
        k = len(per_class[cols[0]])
        names = class_names if len(class_names) == k else [str(i) for i in range(k)]
        b += [("h", 3, "Per-class test accuracy of the chosen students"),
              ("img", "per_class", "per-class accuracy"),
              ("table", ["class"] + [TITLES[q] for q in cols],
               [[names[i]] + [pct(per_class[q][i]) for q in cols] for i in range(k)])]
    if "curves" in images:
        b += [("h", 2, "Training curves of the chosen configurations"), ("img", "curves", "training curves")]

    b.append(("h", 2, "Deliverables"))
    b.append(("ul", [f"`chosen/{q}.toml`: config of `{chosen[q]['run']}`" for q in configs]
              + [f"`chosen/{q}.diff`: {q}.toml against q1.toml" for q in diff_text]
              or ["none (no chosen run has a config)"]))
    for q, text in diff_text.items():
        b += [("h", 3, f"{q}.diff"), ("pre", "diff", text or "(identical configs)\n")]

    b.append(("h", 2, "Failed and pending runs"))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        b.append(("table", ["run", "question", "T", "seed", "status", "error"],
                  [[f"`{r['run']}`", r["question"].upper(), num(r["temperature"]), r["seed"], r["status"],
                    r["error"] or "–"] for r in bad]))
    else:
        b.append(("p", "None: every run finished."))
    if class_names:  # a run that ends within 5 points of chance learned nothing usable
        k = len(class_names)
        at_chance = [r for r in rows if r["status"] == "ok" and r["test_acc_at_val_best"] <= 1 / k + 0.05]
        b.append(("h", 2, "Runs at chance"))
        b.append(("table", ["run", "question", "T", "seed", "test acc"],
                  [[f"`{r['run']}`", r["question"].upper(), num(r["temperature"]), r["seed"],
                    pct(r["test_acc_at_val_best"])] for r in at_chance]) if at_chance else
                 ("p", f"None: every finished run ends more than 5 points above chance "
                       f"({pct(1 / k)}% for {k} classes)."))
    if notes:
        b += [("h", 2, "Notes"), ("ul", notes)]
    return b
