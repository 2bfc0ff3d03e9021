"""The report's race section (a study with ``study.search = "race"``): the survivors of
each question in a sentence, a table of arms by seeds showing when each was dropped, and
the runs saved against the full grid of ``max_seeds``. Torch-free."""
from __future__ import annotations

from .. import config as configlib
from ..study.grid import study_seeds
from ..study.race import RaceState, Rule, race_state
from ..study.replay import grid_values, label, sentence
from .formatting import pct

# why a race drops wrongly more often than one test would, and where that rate is measured
REPEATED_TESTS = ("The race tests again after every seed, so the chance that it drops an arm wrongly somewhere "
                  "along the way is higher than the {miss:g}% of one test: replayed on a 12-seed digits grid in 20 "
                  "seed orders, 1 to 3 orders per question dropped an arm the full grid does not separate from its "
                  "choice (README, Racing). `qdistill report STUDY --replay-race --orders 20` measures it on a "
                  "finished grid study.")


def section(meta: dict, rows: list) -> list:
    """The race section's blocks, the race replayed on the study's rows (none for a grid
    study: one whose config does not say ``search = "race"``)."""
    if meta.get("study", {}).get("search") != "race":
        return []
    cfg = configlib.merge(configlib.defaults(), meta, "the study's config")
    arms, values, _ = grid_values(rows)
    st = race_state(arms, values, study_seeds(cfg["study"]), Rule.of(cfg["study"]))
    rule = st.rule
    b = [("h", 2, "Race"),
         ("p", f"Seeds were added one by one until each question was decided: after {rule.first_test} seeds and "
               f"every seed after, a {_test_name(rule.test)} at {100 * rule.confidence:g}% on the arms' validation "
               f"accuracy (the test set decides nothing) dropped the arms it separated from the best; a dropped arm "
               f"keeps its runs and runs no more seeds. At most {rule.max_seeds} seeds per arm. "
               + REPEATED_TESTS.format(miss=100 * (1 - rule.confidence))),
         ("ul", [sentence(q, r, rule.confidence) for q, r in st.races.items()]),
         ("p", f"{st.runs()} student runs of the full grid's {st.grid_runs()} "
               f"({100 * (1 - st.runs() / st.grid_runs()):.0f}% saved)."),
         _table(st, values)]
    return b


def _test_name(test: str) -> str:
    return ("Friedman test blocked by seed with Conover's critical difference (Wilcoxon's signed-rank test "
            "with two arms left)" if test == "friedman" else "one-sided paired t test against the best, Holm-adjusted")


def _table(st: RaceState, values: dict) -> tuple:
    """Arms by seeds: each run's validation accuracy, ✗ on the seed after which the arm was
    dropped, · where it ran no more."""
    rows = []
    for q, r in st.races.items():
        for a in r.arms:
            ran = r.arm_seeds(a, st.order)
            cells = [(pct(values[a][s]) if s in values.get(a, {}) else "…") if s in ran else "·" for s in st.order]
            drop = r.dropped.get(a)
            if drop:
                cells[st.order.index(drop["seed"])] += " ✗"
            info = drop or r.last.get(a)
            rows.append([q.upper(), label(a)] + cells +
                         ["survives" if not drop else f"after seed {drop['seed']}",
                          f"{info['p']:.3g}" if info else "–"])
    return ("table", ["question", "arm"] + [f"s{s}" for s in st.order] + ["dropped", "p (the drop, or the last test)"], rows)
