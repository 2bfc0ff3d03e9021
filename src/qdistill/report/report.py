"""The analysis report of a temperature study: tables, plots, chosen configs and their diffs.

Reads only the files a study leaves (through `view.read_view`) and knows nothing of
training. Writes, each file atomically::

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

from ..atomic import atomic_write_bytes, atomic_write_text
from ..study.results import soft_target_entropy
from . import plots, sections
from .chosen import write_chosen
from .document import to_html, to_markdown
from .view import TITLES, StudyView, read_view

PLOT_FILES = {"accuracy": "accuracy_vs_T.png", "entropy": "entropy_vs_T.png",
              "agreement": "agreement_kl_vs_T.png", "per_class": "per_class.png",
              "curves": "training_curves.png"}


# ---------------------------------------------------------------- writing a report

def _figures(v: StudyView) -> dict:
    """{plot key: PNG bytes} for every figure the study's files allow."""
    images: dict[str, bytes] = {}
    if v.swept:
        images["accuracy"] = _accuracy_plot(v)
    if v.entropy is not None:
        ts, hs, hmax = v.entropy
        lo, hi = math.log(min(ts + [1.0])) - 0.2, math.log(max(ts + [1.0])) + 0.2
        curve_t = np.exp(np.linspace(lo, hi, 120))
        images["entropy"] = plots.entropy_vs_temperature(
            ts, hs, curve_t, soft_target_entropy(v.tlogits[0], curve_t), hmax)
    agree, kl = {}, {}
    for q in v.swept:
        for key, dest in (("teacher_agreement", agree), ("kl_to_teacher", kl)):
            points = [(c.temperature, c.stat(key)[0]) for c in v.conds if c.arm == q and c.stat(key)]
            if points:
                dest[TITLES[q]] = ([t for t, _ in points], [m for _, m in points])
    if agree or kl:
        ref = {key: v.q1.stat(key)[0] if v.q1 and v.q1.stat(key) else None
               for key in ("teacher_agreement", "kl_to_teacher")}
        images["agreement"] = plots.agreement_kl_vs_temperature(
            agree, kl, ref["teacher_agreement"], ref["kl_to_teacher"])
    if v.per_class:
        cols = list(v.per_class)
        images["per_class"] = plots.per_class_heatmap(
            _class_labels(v), [TITLES[q] for q in cols], np.stack([v.per_class[q] for q in cols], axis=1),
            cols.index("q1") if "q1" in cols else None)
    if v.curves:
        images["curves"] = plots.training_curves(v.curves)
    return images


def _accuracy_plot(v: StudyView) -> bytes:
    def col(q, key, i):
        return [c.stat(key)[i] for c in v.conds if c.arm == q]
    series = {TITLES[q]: ([c.temperature for c in v.conds if c.arm == q],
                          col(q, "test_acc_at_val_best", 0), col(q, "test_acc_at_val_best", 1))
              for q in v.swept}
    return plots.accuracy_vs_temperature(
        series, v.q1.stat("test_acc_at_val_best") if v.q1 else None, v.teacher.get("test_acc"),
        {TITLES[q]: v.chosen[q]["temperature"] for q in v.swept})


def _class_labels(v: StudyView) -> list[str]:
    """The class names, or their indices when the teacher's names do not fit."""
    k = len(next(iter(v.per_class.values())))
    return v.class_names if len(v.class_names) == k else [str(i) for i in range(k)]


def write_report(study_dir: str | Path) -> dict:
    """Write the report of the study in ``study_dir``; returns the paths written:
    {"md": Path, "html": Path, "plots": [Path], "chosen": [Path]}."""
    v = read_view(study_dir)
    study = v.dir
    images = _figures(v)
    chosen_paths, configs, diff_text = write_chosen(study, v.chosen, v.swept, v.notes)
    plot_paths = {key: f"{study.plots.name}/{PLOT_FILES[key]}" for key in images}
    for key, name in PLOT_FILES.items():
        if key in images:
            atomic_write_bytes(study.path / plot_paths[key], images[key])
        elif (study.plots / name).exists():  # from an earlier report of a different study
            (study.plots / name).unlink()
    blocks = sections.blocks(v, images, configs, diff_text)
    atomic_write_text(study.report_md, to_markdown(blocks, plot_paths))
    atomic_write_text(study.report_html, to_html(blocks, images, f"Temperature study report: {study.path.name}"))
    return {"md": study.report_md, "html": study.report_html,
            "plots": [study.path / plot_paths[k] for k in images], "chosen": chosen_paths}
