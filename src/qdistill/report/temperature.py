"""The report's section "What temperature does": per question and T, the quantities that
move with T (accuracy, calibration, fidelity to the teacher, the softness of its
targets, the gradient ratio), Q3 - Q4 as what the teacher knows beyond label smoothing,
the unseen-class probe, and findings generated from these numbers. Torch-free.

Intervals: over seeds, mean ± t(0.975, n-1) · sd / √n (sd: Bessel); paired intervals
use the per-seed differences (`results.paired_difference`), whose seeds share their
initial weights, split and batch order.
"""
from __future__ import annotations

import math

from ..study.results import arms, mean_std, paired_difference
from .formatting import CI95, EQUAL_SEEDS, num, pct, plus_minus, pts
from .view import TITLES, StudyView

# (results.csv column, name, how a value is written, accuracy-like: in points)
QUANTITIES = (("test_acc_at_val_best", "test accuracy (%)", pct, True),
              ("test_ece", "ECE (%)", pct, True),
              ("test_nll", "NLL (nats)", lambda v: f"{v:.4f}", False),
              ("teacher_agreement", "agreement with the teacher (%)", pct, True),
              ("kl_to_teacher", "KL to the teacher (nats)", lambda v: f"{v:.4f}", False),
              ("grad_ratio_soft_hard", "gradient ratio soft/hard, best epoch", lambda v: f"{v:.3g}", False),
              ("grad_ratio_soft_hard_init", "gradient ratio soft/hard, at init", lambda v: f"{v:.3g}", False))
# Quantities fixed by the study's design rather than learned: every T of a seed starts from
# the same weights, so the ratio at initialisation is a function of T and c alone.
BY_DESIGN = {"grad_ratio_soft_hard_init": "the gradient ratio at initialisation, set by T and c by design "
                                          "(every T starts from the same weights)"}
Z_975, Z_80 = 1.959964, 0.841621  # standard normal quantiles: two-sided 5% level, 80% power
DETECT = 0.005                     # the accuracy difference to detect: 0.5 points


def t_interval(values) -> tuple[float, float | None]:
    """``(mean, half-width of the 95% interval)``; the half-width is ``None`` for one value."""
    values = list(values)
    mean, sd = mean_std(values)
    if len(values) < 2:
        return mean, None
    from scipy import stats
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


def _cell(values, fmt) -> str:
    if not values:
        return "n/a"
    mean, half = t_interval(values)
    return plus_minus(fmt(mean), half, CI95, fmt)


def seeds_needed(sd_diff: float) -> int:
    """Seeds to detect a 0.5-point accuracy difference with 80% power in a two-sided
    paired test at the 5% level (normal approximation): ``n = ceil(((z_0.975 + z_0.80)
    · sd_d / 0.005)^2)``, ``sd_d`` the seed-to-seed sd of paired accuracy differences."""
    return max(2, math.ceil(((Z_975 + Z_80) * sd_diff / DETECT) ** 2))


def section(v: StudyView) -> list:
    """The blocks of the section (nothing for a study that swept no temperature)."""
    swept = [a for a in arms(v.conds) if a != "q1"]
    if not swept:
        return []
    b = [("h", 2, "What temperature does"),
         ("p", "Each cell: mean ± the half-width of the 95% interval over seeds (t distribution), marked "
               "(95% CI). ECE: 15 equal-width bins of the "
               "top softmax probability (Guo et al. 2017); NLL: mean negative log-likelihood of the true class. "
               "The gradient ratio is ||d soft/dz|| / ||d hard/dz|| on a fixed batch of 1,024 training images, "
               "c included (a run without a hard term: against the one it would have); with c = T^2 it stays in a band as T grows "
               "(Hinton et al. 2015).")]
    for q in swept:
        b += [("h", 3, TITLES[q]), _question_table(v, q)]
    b += _dark_knowledge(v) + _probe(v)
    b += [("h", 3, "Findings"), ("ul", findings(v, swept))]
    return b


def _question_table(v: StudyView, q: str) -> tuple:
    conds = [c for c in v.conds if c.arm == q]
    entropy = dict(zip(v.entropy[0], v.entropy[1])) if v.entropy is not None else {}
    rows = []
    for c in conds:
        row = [num(c.temperature), len(c.rows)]
        row += [_cell(list(c.by_seed(key).values()), fmt) for key, _, fmt, _ in QUANTITIES]
        row.append(f"{entropy[c.temperature]:.4f}" if c.temperature in entropy else "n/a")
        rows.append(row)
    return ("table", ["T", "seeds"] + [name for _, name, _, _ in QUANTITIES] + ["teacher target entropy (nats)"],
            rows)


def _paired(a, b, key: str) -> dict | None:
    return paired_difference(a.by_seed(key), b.by_seed(key))


def _ci(d: dict | None, accuracy_like: bool) -> str:
    if d is None:
        return "n/a"
    f = pts if accuracy_like else (lambda x: f"{x:+.4f}")
    if d["lo"] is None:
        return f"{f(d['mean'])} (1 seed)"
    if d["lo"] == d["hi"]:
        return f"{f(d['mean'])} ({EQUAL_SEEDS})"
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def _dark_knowledge(v: StudyView) -> list:
    """Q3 - Q4 at each T: the same hard term and c, soft targets from the teacher against
    soft targets from the labels (Yuan et al. 2020: KD as learned label smoothing); one
    table per teacher term Q3 used."""
    q4 = {c.temperature: c for c in v.conds if c.arm == "q4"}
    b = []
    for a in (a for a in arms(v.conds) if a.startswith("q3")):
        q3 = {c.temperature: c for c in v.conds if c.arm == a}
        temps = sorted(set(q3) & set(q4))
        if not temps:
            continue
        rows = [[num(t)] + [_ci(_paired(q3[t], q4[t], key), acc) for key, _, _, acc in QUANTITIES[:3]]
                for t in temps]
        b += [("h", 3, f"Dark knowledge beyond label smoothing: {TITLES[a].split(' ')[0]}"
                       f"{a[2:].replace('-', ' ')} - Q4"),
              ("p", "Per seed, Q3 (soft targets from the teacher) minus Q4 (soft targets from the labels) at the "
                    "same T and c; mean [95% paired interval]; accuracy and ECE in points."),
              ("table", ["T", "test accuracy", "ECE", "NLL"], rows)]
    return b


def _probe(v: StudyView) -> list:
    """The unseen-class probe, when the study ran it (``student.omit_class``)."""
    probed = [c for c in v.conds if c.by_seed("omitted_class_acc")]
    if not probed:
        return []
    k = probed[0].rows[0]["omitted_class"]
    rows = [[TITLES[c.arm], "–" if c.question == "q1" else num(c.temperature),
             _cell(list(c.by_seed("omitted_class_acc").values()), pct),
             _cell(list(c.by_seed("omitted_class_rank").values()), lambda x: f"{x:.2f}"),
             _cell(list(c.by_seed("omitted_class_acc_bias_corrected").values()), pct)] for c in probed]
    return [("h", 3, f"The unseen class: {k}"),
            ("p", f"Class {k} was left out of every student's training and validation images (the teacher saw it). "
                  f"Accuracy on its test images, the mean rank of {k} among their logits (1 is best), and, apart, "
                  f"the accuracy after raising {k}'s logit until the student picks it on the training images as "
                  f"often as the teacher does (chosen without the test set)."),
            ("table", ["question", "T", "accuracy on the unseen class (%)", "mean rank", "bias-corrected (%)"],
             rows)]


def findings(v: StudyView, swept: list) -> list[str]:
    """Directions claimed only where the paired interval excludes zero and has a width
    (lowest against highest T); the learned quantity that moved most with T relative to its
    seed-to-seed spread (`BY_DESIGN` left out); the seeds a 0.5-point accuracy difference needs."""
    items, moves, sds = [], [], []
    for q in swept:
        conds = sorted((c for c in v.conds if c.arm == q), key=lambda c: c.temperature)
        if len(conds) < 2:
            continue
        lo, hi = conds[0], conds[-1]
        sds += [_diff_sd(c, lo, "test_acc_at_val_best") for c in conds[1:]]
        for key, name, _, acc in QUANTITIES:
            d, sd = _paired(hi, lo, key), _diff_sd(hi, lo, key)
            if d is None or d["lo"] is None or d["lo"] == d["hi"]:
                continue
            if sd > 0 and key not in BY_DESIGN:
                moves.append((abs(d["mean"]) / sd, f"{TITLES[q]}: {name}"))
            if d["lo"] > 0 or d["hi"] < 0:
                items.append(f"{TITLES[q]}: {name} {'rises' if d['mean'] > 0 else 'falls'} from T = "
                             f"{num(lo.temperature)} to T = {num(hi.temperature)} by {_size(d, acc)}.")
    if not items:
        items.append("No quantity differs between the lowest and the highest T by more than its 95% paired interval.")
    if moves:
        size, what = max(moves)
        items.append(f"The learned quantity that moved most with T, relative to its seed-to-seed spread: {what} "
                     f"(|mean paired difference| / its sd = {size:.2f}, lowest against highest T). Left out: "
                     f"{'; '.join(BY_DESIGN.values())}.")
    items.append(_seeds_words([x for x in sds if x == x]))
    return items


def _size(d: dict, accuracy_like: bool) -> str:
    """A paired change after a direction word: its size, positive, and the 95% interval of
    the size (flipped with it for a fall), ``by 3.95 [2.54, 5.36] points (paired, 95% CI)``."""
    sign = 1 if d["mean"] > 0 else -1
    lo, hi = sorted((sign * d["lo"], sign * d["hi"]))
    f = (lambda x: f"{100 * x:.2f}") if accuracy_like else (lambda x: f"{x:.4f}")
    unit = " points" if accuracy_like else ""
    return f"{f(sign * d['mean'])} [{f(lo)}, {f(hi)}]{unit} (paired, 95% CI)"


def _diff_sd(a, b, key: str) -> float:
    """The sd over seeds of ``a - b`` (``nan`` with fewer than two paired seeds)."""
    pairs = _pairs(a, b, key)
    return mean_std([x - y for x, y in pairs])[1] if len(pairs) > 1 else math.nan


def _pairs(a, b, key: str) -> list[tuple[float, float]]:
    x, y = a.by_seed(key), b.by_seed(key)
    return [(x[s], y[s]) for s in x if s in y]


def _seeds_words(sds: list[float]) -> str:
    if not sds:
        return "Seeds needed to detect a 0.5-point accuracy difference: n/a (fewer than 2 paired seeds)."
    sd = math.sqrt(math.fsum(s * s for s in sds) / len(sds))
    return (f"To detect a 0.5-point accuracy difference between two temperatures with 80% power (two-sided, 5%), "
            f"about {seeds_needed(sd)} seeds are needed: n = ((1.96 + 0.84) · sd / 0.5 points)^2, with sd = "
            f"{100 * sd:.2f} points the observed seed-to-seed sd of paired accuracy differences (root mean square "
            f"over each question's temperatures against its lowest).")
