"""How the report writes numbers: percentages, accuracy points, temperatures, CIs.

Every ``±`` the report writes is labelled: ``± x (sd)`` for the seed-to-seed standard
deviation, ``± x (95% CI)`` for the half-width of a 95% interval. Seeds whose values are
all equal give no interval: the report says so instead of writing ``± 0.00``."""
from __future__ import annotations

SD, CI95 = "sd", "95% CI"  # the two labels of a ±
EQUAL_SEEDS = "equal seeds give no interval"


def pct(x) -> str:
    """A fraction as a percentage with 2 decimals; ``n/a`` for none."""
    return "n/a" if x is None or x != x else f"{100 * x:.2f}"


def pts(x) -> str:
    """A difference of fractions in accuracy points, signed, 2 decimals."""
    return "n/a" if x is None else f"{100 * x:+.2f}"


def num(t) -> str:
    """A temperature (or any number) in its shortest ``%g`` form."""
    return f"{t:g}"


def ci_text(diff: dict | None) -> str:
    """The 95% CI of a paired difference in points, or why there is none."""
    if diff is None:
        return "n/a (no Q1)"
    if diff["n"] < 2:
        return "n/a (1 seed)"
    if diff["lo"] == diff["hi"]:
        return f"n/a ({EQUAL_SEEDS})"
    return f"[{pts(diff['lo'])}, {pts(diff['hi'])}]"


def excludes_zero(diff: dict | None) -> bool | None:
    """Whether the CI of a paired difference excludes 0; None when it measures nothing."""
    if diff is None or diff["n"] < 2 or diff["lo"] == diff["hi"]:
        return None
    return diff["lo"] > 0 or diff["hi"] < 0


def plus_minus(mean: str, spread, label: str, fmt=pct) -> str:
    """``mean ± spread (label)``, ``label`` one of `SD`, `CI95`; a spread of 0 (equal
    seeds) says that it gives no interval; none (one seed, ``nan``) gives ``mean`` alone."""
    if spread is None or spread != spread:
        return mean
    if spread == 0:
        return f"{mean} ({EQUAL_SEEDS})"
    return f"{mean} ± {fmt(spread)} ({label})"


def mean_pm(stat, unit: str = "") -> str:
    """A ``(mean, sd)`` of fractions as ``mean ± sd (sd)`` in percent (``unit`` after the
    mean); one seed: ``mean (1 seed)``."""
    if stat is None:
        return "n/a"
    mean, sd = stat
    if sd != sd:
        return f"{pct(mean)}{unit} (1 seed)"
    return plus_minus(pct(mean) + unit, sd, SD)
