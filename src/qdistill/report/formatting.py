"""How the report writes numbers: percentages, accuracy points, temperatures, CIs."""
from __future__ import annotations


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
    return f"[{pts(diff['lo'])}, {pts(diff['hi'])}]"


def excludes_zero(diff: dict | None) -> bool | None:
    """Whether the CI of a paired difference excludes 0; None when it measures nothing."""
    if diff is None or diff["n"] < 2 or diff["lo"] == diff["hi"]:
        return None
    return diff["lo"] > 0 or diff["hi"] < 0


def mean_pm(stat) -> str:
    """A ``(mean, std)`` of fractions as ``mean ± std`` in percent."""
    if stat is None:
        return "n/a"
    mean, std = stat
    return f"{pct(mean)} ± {pct(std)}"
