"""The race's tests: which arms of a question the seeds so far separate from the best.

Each test takes ``x``, an (n seeds, k arms) array of validation accuracies (higher is
better), its rows paired by seed, and ``alpha = 1 - confidence``. It returns a `Verdict`:
the test's name, a statistic and p-value per arm, and the arms (column indices) it drops.
The formulas are written from their definitions; scipy gives the distributions and the
ranks only (`tests/test_race.py` checks every statistic against `scipy.stats`).

The rules are irace's (López-Ibáñez et al., ``irace`` R package, ``aux.friedman`` and
``aux.ttest``), turned round for accuracy, where higher is better:

* ``friedman`` with three arms or more: Friedman's test blocked by seed; if it rejects,
  every arm whose rank sum is further from the best's than Conover's critical
  difference is dropped. With two arms: Wilcoxon's signed-rank test, and the worse arm
  goes if it rejects.
* ``t-holm``: a one-sided paired t test of the best arm (highest mean) against each
  other arm, p-values adjusted by Holm over all k arms (irace counts the best's own
  comparison, p = 1, among them), every arm below alpha dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Verdict:
    """One test over the arms alive: its name, per-arm statistic and p-value, and the
    arms it drops (column indices)."""
    test: str
    statistic: list[float]
    p: list[float]
    drop: list[int]


def _tie_sum(values: np.ndarray) -> float:
    """sum over groups of equal values of (t^3 - t), t the group's size."""
    _, counts = np.unique(values, return_counts=True)
    return float(np.sum(counts.astype(np.float64) ** 3 - counts))


def friedman(x: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Friedman's statistic with ties, ranks within each seed (rank 1 the highest, ties
    averaged), R_j the rank sum of arm j over n seeds:

        Q = 12 sum_j (R_j - n(k+1)/2)^2 / (n k (k+1) - sum_ties (t^3 - t) / (k - 1)),

    p = P(chi^2_{k-1} > Q). Returns (Q, p, ranks); Q is nan and p is 1 where every seed
    ties every arm."""
    from scipy import stats
    n, k = x.shape
    r = stats.rankdata(-x, axis=1)
    rank_sums = r.sum(axis=0)
    ties = sum(_tie_sum(row) for row in x)
    denom = n * k * (k + 1) - ties / (k - 1)
    if denom <= 0:
        return math.nan, 1.0, r
    q = 12.0 * float(np.sum((rank_sums - n * (k + 1) / 2.0) ** 2)) / denom
    return q, float(stats.chi2.sf(q, k - 1)), r


def conover_difference(r: np.ndarray, alpha: float) -> float:
    """Conover's critical difference of two rank sums (Practical Nonparametric
    Statistics, 1999, pp. 369-371), A the sum of all squared ranks:

        t_{1-alpha/2, (n-1)(k-1)} * sqrt(2 (n A - sum_j R_j^2) / ((n-1)(k-1)))."""
    from scipy import stats
    n, k = r.shape
    dof = (n - 1) * (k - 1)
    spread = 2.0 * (n * float(np.sum(r ** 2)) - float(np.sum(r.sum(axis=0) ** 2))) / dof
    return float(stats.t.ppf(1 - alpha / 2, dof)) * math.sqrt(max(spread, 0.0))


def wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Wilcoxon's paired signed-rank test, two-sided, normal approximation with ties and
    continuity correction (R's ``exact = FALSE``; zero differences dropped). With
    d = a - b (non-zero, m of them) ranked by |d|, W+ the rank sum of the positive ones:

        z = (W+ - m(m+1)/4 - sign * 1/2) / sqrt(m(m+1)(2m+1)/24 - sum_ties (t^3 - t)/48),

    p = 2 P(Z > |z|). Returns (min(W+, W-), p, W+ - W-): the statistic as scipy gives
    it, and which side wins."""
    from scipy import stats
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[d != 0]
    m = len(d)
    if m == 0:
        return 0.0, 1.0, 0.0
    r = stats.rankdata(np.abs(d))
    w_plus = float(r[d > 0].sum())
    w_minus = m * (m + 1) / 2.0 - w_plus
    var = m * (m + 1) * (2 * m + 1) / 24.0 - _tie_sum(np.abs(d)) / 48.0
    z = w_plus - m * (m + 1) / 4.0
    z = (z - math.copysign(0.5, z) if z else 0.0) / math.sqrt(var)
    return min(w_plus, w_minus), float(2 * stats.norm.sf(abs(z))), w_plus - w_minus


# Runs before 2026-12-07 stored accuracies as float32 values (a float32 mean of 0/1 per image),
# each rounded by up to 2**-24 of itself, so two differences a - b of the same number of images
# differ by up to 4 * 2**-24 = 2**-22 of the largest value (now correct / N in float64: 2**-51).
# A real difference is a multiple of 1/N (N images): above 2**-22 for any N below 4 million.
STORED_RESOLUTION = 2.0 ** -22


def constant_differences(a, b) -> bool:
    """Whether the paired differences ``a - b`` are all equal as far as the stored values
    tell: their spread within `STORED_RESOLUTION` of the largest value (which also covers R's
    ``t.test`` rule, a standard error below 10 machine epsilons of the mean). True for fewer
    than two pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    return len(d) < 2 or float(d.max() - d.min()) <= STORED_RESOLUTION * max(np.abs(a).max(), np.abs(b).max())


def paired_t(best: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """One-sided paired t test that ``best`` is higher: d = best - other,
    t = mean(d) / (sd(d) / sqrt(n)), p = P(T_{n-1} > t). Constant differences
    (`constant_differences`) cannot be tested: (nan, 1), as irace treats them."""
    from scipy import stats
    if constant_differences(best, other):
        return math.nan, 1.0
    d = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    n, mean = len(d), float(np.mean(d))
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    t = mean / se
    return t, float(stats.t.sf(t, n - 1))


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values: sorted ascending, the i-th (from 1)
    becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def race_test(x: np.ndarray, test: str, alpha: float) -> Verdict:
    """The race's test over the alive arms' columns of ``x`` (`RACE_TESTS`)."""
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[1]
    if test == "t-holm":
        best = int(np.argmax(x.mean(axis=0)))  # the first of equal means: the lower temperature
        tests = [(math.nan, 1.0) if j == best else paired_t(x[:, best], x[:, j]) for j in range(k)]
        p = holm([pj for _, pj in tests])
        return Verdict("t-holm", [t for t, _ in tests], p, [j for j in range(k) if p[j] < alpha])
    if k == 2:
        w, p, side = wilcoxon(x[:, 0], x[:, 1])
        drop = [] if p >= alpha or side == 0 else [1 if side > 0 else 0]
        return Verdict("wilcoxon", [w, w], [p, p], drop)
    q, p, r = friedman(x)
    drop = []
    if p < alpha:
        sums = r.sum(axis=0)  # rank 1 is the best: the lowest sum wins
        drop = [j for j in range(k) if sums[j] - sums.min() > conover_difference(r, alpha)]
    return Verdict("friedman", [q] * k, [p] * k, drop)
