"""The figures of a study report, each returned as PNG bytes.

Figures are drawn on `matplotlib.figure.Figure`, which renders PNG through the Agg canvas
without pyplot: no display, no global backend switch (a user's notebook keeps its own),
no figure registry to leak. Callers pass plain numbers
(fractions for accuracies); this module knows nothing of files or studies.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORS = {"q1": "0.25", "q2": "C0", "q3": "C1", "q4": "C2"}
TEACHER_COLOR = "C3"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No timestamp in the metadata: the same study gives the same bytes.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _log_temperature_axis(ax, temperatures) -> None:
    ax.set_xscale("log")
    ts = sorted(set(temperatures))
    if ts:
        ax.set_xticks(ts)
        ax.set_xticklabels([f"{t:g}" for t in ts])
        ax.minorticks_off()
    ax.set_xlabel("temperature T (log scale)")


def _finish(ax, ylabel: str, title: str | None = None) -> None:
    """The y label, the title, a light grid and the legend every line plot ends with."""
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def accuracy_vs_temperature(series: dict, q1: tuple | None, teacher_acc: float | None,
                            chosen: dict | None = None) -> bytes:
    """``series``: {label: (temperatures, means, stds)} with accuracies as fractions and std
    ``nan`` where one seed gives none; ``q1``: (mean, std) of Q1 or None; ``chosen``:
    {label: T} ringed as the temperature chosen on validation."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    all_t = []
    for label, (ts, means, stds) in series.items():
        q = label.split()[0].lower()
        err = np.nan_to_num(100 * np.asarray(stds, float))
        ax.errorbar(ts, 100 * np.asarray(means, float), yerr=err, marker="o", capsize=3,
                    color=COLORS.get(q), label=label)
        if chosen and label in chosen and chosen[label] in list(ts):
            i = list(ts).index(chosen[label])
            ax.plot([ts[i]], [100 * means[i]], "o", ms=13, mfc="none", mec=COLORS.get(q), mew=1.5)
        all_t += list(ts)
    if chosen:
        ax.plot([], [], "o", ms=10, mfc="none", mec="0.3", label="chosen on validation")
    if q1 is not None:
        mean, std = q1
        ax.axhline(100 * mean, color=COLORS["q1"], ls="--", label="Q1 hard labels")
        if std == std and std > 0:  # not nan
            ax.axhspan(100 * (mean - std), 100 * (mean + std), color=COLORS["q1"], alpha=0.12)
    if teacher_acc is not None:
        ax.axhline(100 * teacher_acc, color=TEACHER_COLOR, ls=":", label="teacher (full precision)")
    _log_temperature_axis(ax, all_t)
    _finish(ax, "test accuracy at best val epoch (%)", "Student accuracy vs temperature (mean ± sd over seeds)")
    return _png(fig)


def entropy_vs_temperature(grid_t, grid_h, curve_t, curve_h, max_entropy: float) -> bytes:
    """Mean entropy (nats) of the teacher's soft targets; grid points and a smooth curve."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.plot(curve_t, curve_h, color=TEACHER_COLOR, lw=1.5, label="softmax(z/T), all T")
    ax.plot(grid_t, grid_h, "o", color="k", label="study temperatures")
    ax.axhline(max_entropy, color="0.5", ls="--", label=f"uniform: ln K = {max_entropy:.3f}")
    _log_temperature_axis(ax, grid_t)
    _finish(ax, "mean entropy of soft targets (nats)", "How soft the teacher's targets are (test set)")
    return _png(fig)


def agreement_kl_vs_temperature(agree: dict, kl: dict, q1_agree, q1_kl) -> bytes:
    """``agree``/``kl``: {label: (temperatures, means)}; ``q1_*``: a mean or None."""
    fig = Figure(figsize=(10.0, 4.0))
    ax_a, ax_k = fig.subplots(1, 2)
    all_t = []
    for ax, series, ref, ylabel, scale in (
            (ax_a, agree, q1_agree, "top-1 agreement with teacher (%)", 100.0),
            (ax_k, kl, q1_kl, "KL(teacher || student) at T=1 (nats)", 1.0)):
        for label, (ts, means) in series.items():
            ax.plot(ts, scale * np.asarray(means, float), marker="o",
                    color=COLORS.get(label.split()[0].lower()), label=label)
            all_t += list(ts)
        if ref is not None:
            ax.axhline(scale * ref, color=COLORS["q1"], ls="--", label="Q1 hard labels")
        _finish(ax, ylabel)
    for ax in (ax_a, ax_k):
        _log_temperature_axis(ax, all_t)
    fig.suptitle("What the student takes from the teacher (test set, mean over seeds)")
    return _png(fig)


def per_class_heatmap(class_names, columns, matrix, ref_col: int | None) -> bytes:
    """``matrix``: accuracies (classes x columns, fractions). With ``ref_col`` (Q1's column)
    a second panel shows each column minus the reference, in points."""
    m = 100 * np.asarray(matrix, float)
    panels = 2 if ref_col is not None and len(columns) > 1 else 1
    fig = Figure(figsize=(3.2 + 2.4 * panels * max(1, len(columns)) / 2, 0.38 * len(class_names) + 1.8))
    axes = fig.subplots(1, panels, squeeze=False)[0]

    def draw(ax, data, title, cmap, vmin, vmax, fmt):
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(class_names)))
        ax.set_yticklabels(class_names, fontsize=8)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if np.isfinite(data[i, j]):
                    # light text on the dark end of the colormap, dark text elsewhere
                    v = im.norm(data[i, j])
                    dark = v < 0.5 if cmap == "viridis" else abs(v - 0.5) > 0.35
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                            color="w" if dark else "k")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)

    cols = list(columns)
    lo = np.nanmin(m) if np.isfinite(m).any() else 0.0
    draw(axes[0], m, "per-class test accuracy (%)", "viridis", lo, 100.0, "{:.1f}")
    if panels == 2:
        cols = [c for j, c in enumerate(columns) if j != ref_col]
        d = np.delete(m, ref_col, axis=1) - m[:, [ref_col]]
        span = max(1e-9, float(np.nanmax(np.abs(d)))) if np.isfinite(d).any() else 1.0
        draw(axes[1], d, "minus Q1 (points)", "RdBu", -span, span, "{:+.1f}")
    fig.suptitle("Chosen student of each question, mean over seeds", fontsize=10)
    return _png(fig)


def training_curves(curves: dict) -> bytes:
    """``curves``: {label: (epochs, mean val accuracy as fractions)}."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for label, (epochs, acc) in curves.items():
        ax.plot(epochs, 100 * np.asarray(acc, float), marker=".", label=label,
                color=COLORS.get(label.split()[0].lower()))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(ax, "validation accuracy (%)", "Training curves of the chosen configurations (mean over seeds)")
    return _png(fig)
