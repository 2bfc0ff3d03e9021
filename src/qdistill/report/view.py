"""What the report knows of a study: a `StudyView` read once from the study's folder
(through `StudyDir` and `RunDir`), so that every table, figure and sentence of the
report takes one argument. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import RunError
from ..study import QUESTIONS
from ..study.results import (choose, conditions, paired_difference, read_results, read_teacher_logits,
                             seed_order, soft_target_entropy)
from ..study.studydir import StudyDir
from ..training.rundir import METRICS, SUMMARY, read_json
from .formatting import num

class _Titles(dict):
    """A question's title; an arm of another teacher term (``q3-dkd``) adds it in brackets."""

    def __missing__(self, arm: str) -> str:
        question, _, kd = arm.partition("-")
        return f"{self[question]} [{kd}]"


TITLES = _Titles({"q1": "Q1 hard labels", "q2": "Q2 soft (teacher)", "q3": "Q3 hard + soft (teacher)",
                  "q4": "Q4 hard + soft (ground truth)"})


@dataclass
class StudyView:
    """A study as the report reads it."""
    dir: StudyDir
    rows: list                  # results.csv, typed
    meta: dict                  # study.toml as written ({} without one)
    teacher: dict               # teacher.json ({} without one)
    tlogits: tuple | None       # (the teacher's test logits, class names), from teacher_test.npz
    conds: list                 # `results.Condition` per question and T
    chosen: dict                # `results.choose`
    questions: list             # the questions the study asked
    swept: list                 # the chosen questions that sweep T (Q2-Q4)
    diffs: dict = field(default_factory=dict)   # question -> paired test difference to Q1
    entropy: tuple | None = None                # (temperatures, entropies, ln K)
    per_class: dict = field(default_factory=dict)  # question -> mean per-class test accuracy
    curves: dict = field(default_factory=dict)     # label -> (epochs, mean val accuracy)
    notes: list = field(default_factory=list)      # what the report could not show, and why
    val_images: int | None = None                  # the validation split every choice is made on

    @property
    def class_names(self) -> list:
        return self.tlogits[1] if self.tlogits is not None else []

    @property
    def q1(self):
        return self.chosen["q1"]["condition"] if "q1" in self.chosen else None


def read_view(study_dir) -> StudyView:
    """Read everything the report shows from ``study_dir``."""
    study = StudyDir(study_dir)
    if not study.path.is_dir():
        raise RunError(f"study directory not found: {study}")
    rows, meta = read_results(study.results), study.read_config()
    st = meta.get("study", {})
    seeds = seed_order(rows, st.get("seeds"))
    chosen = choose(rows, seeds)
    v = StudyView(study, rows, meta, read_json(study.teacher_json) or {}, read_teacher_logits(study.teacher_test),
                  conditions(rows, seeds), chosen,
                  [q for q in QUESTIONS if q in st.get("questions", ()) or any(r["question"] == q for r in rows)],
                  [q for q in chosen if q != "q1"])
    q1 = chosen.get("q1")
    v.diffs = {q: paired_difference(chosen[q]["condition"].by_seed("test_acc_at_val_best"),
                                    q1["condition"].by_seed("test_acc_at_val_best")) if q1 else None
               for q in v.swept}
    v.entropy = _entropy(v, st)
    _read_chosen_runs(v)
    return v


def _entropy(v: StudyView, st: dict) -> tuple | None:
    grid_t = sorted(set(st.get("temperatures", [])) | {c.temperature for c in v.conds if c.question != "q1"})
    if v.tlogits is not None and grid_t:
        return grid_t, soft_target_entropy(v.tlogits[0], grid_t), math.log(v.tlogits[0].shape[1])
    v.notes.append(f"{v.dir.teacher_test.name} not found: no soft-target entropy." if v.tlogits is None
                   else "no temperatures in this study: no soft-target entropy.")
    return None


def _mean_by_epoch(runs_metrics: list[list[dict]]) -> tuple[list, list]:
    """Mean val_acc per epoch over the runs that reached that epoch."""
    per_epoch: dict[int, list[float]] = {}
    for metrics in runs_metrics:
        for m in metrics:
            if m.get("val_acc") is not None:
                per_epoch.setdefault(int(m["epoch"]), []).append(float(m["val_acc"]))
    epochs = sorted(per_epoch)
    return epochs, [math.fsum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]


def _read_chosen_runs(v: StudyView) -> None:
    """Per chosen question: per-class test accuracy (mean over seeds, from summary.json)
    and the mean validation curve (from metrics.jsonl)."""
    for q, info in v.chosen.items():
        summaries, metrics = [], []
        for name in info["runs"]:
            run = v.dir.run(name)
            s = run.read_summary()
            v.val_images = v.val_images or (s or {}).get("val_images")
            if s and s.get("test_per_class_acc"):
                summaries.append(np.asarray(s["test_per_class_acc"], dtype=np.float64))
            else:
                v.notes.append(f"runs/{name}/{SUMMARY} missing or without test_per_class_acc.")
            m = run.read_metrics()
            if m:
                metrics.append(m)
            else:
                v.notes.append(f"runs/{name}/{METRICS} missing or empty.")
        if summaries and len({len(s) for s in summaries}) == 1:
            v.per_class[q] = np.mean(summaries, axis=0)
        if metrics:
            label = TITLES[q] + ("" if q == "q1" else f", T={num(info['temperature'])}")
            v.curves[label] = _mean_by_epoch(metrics)
    if len({len(x) for x in v.per_class.values()}) > 1:
        v.notes.append("chosen runs disagree on the number of classes: no per-class comparison.")
        v.per_class = {}
