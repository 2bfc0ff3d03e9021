"""What a race says, and the replay that judges the rule on a finished grid
(``qdistill report STUDY --replay-race``).

The replay applies `race.race_state` to a grid study's ``results.csv``, seed by seed, in
the study's seed order or in random orders, and compares each outcome with what the full
grid says: the grid's choice per question (highest mean validation accuracy, ties to the
first arm: the lower T), and the paired interval of each arm against that choice.
Torch-free.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import RunError
from .race import Race, RaceState, Rule, arm_of, race_state
from .results import paired_difference, parse_row


def label(arm: str) -> str:
    """An arm as a reader says it: ``T = 4``, or ``dkd T = 4`` for another teacher term."""
    parts = arm.split("-")
    t = f"T = {parts[-1][1:]}"
    return f"{parts[2]} {t}" if len(parts) == 4 else t


def sentence(q: str, r: Race, confidence: float) -> str:
    """One plain sentence on a question's race."""
    alive, n = [label(a) for a in r.alive], len(r.seeds)
    names = " and ".join([", ".join(alive[:-1]), alive[-1]] if len(alive) > 2 else alive)
    if not r.decided:
        return f"{q.upper()}: {names} still racing after {n} seeds; seed {r.next_seed} is next."
    if len(alive) == 1:
        return f"{q.upper()}: {names}, decided after {n} seeds."
    return (f"{q.upper()}: {names} remain after {n} seeds; no test separates them at {100 * confidence:g}%.")


def grid_values(rows) -> tuple[dict[str, list[str]], dict[str, dict[int, float]], list[int]]:
    """A study's ok rows as the race reads them: each question's arms in row order, each
    arm's validation accuracy by seed, and the seeds in the order the rows give them."""
    arms: dict[str, list[str]] = {}
    values: dict[str, dict[int, float]] = {}
    seeds: list[int] = []
    for row in (parse_row(r) for r in rows):
        arm = arm_of(row["run"])
        if arm not in arms.setdefault(row["question"], []):
            arms[row["question"]].append(arm)
        if row["seed"] not in seeds:
            seeds.append(row["seed"])
        if row["status"] == "ok":
            values.setdefault(arm, {})[row["seed"]] = row["val_best_acc"]
    return arms, values, seeds


def check_grid_complete(arms: dict, values: dict, seeds: list[int]) -> None:
    """The replay needs every arm at every seed: a `RunError` naming the first gap."""
    for q_arms in arms.values():
        for a in q_arms:
            missing = [s for s in seeds if s not in values.get(a, {})]
            if missing:
                raise RunError(f"the replay needs a finished grid: {a} has no ok run at seed {missing[0]}")


def grid_verdict(arms: list[str], values: dict, seeds: list[int], confidence: float) -> tuple[str, set[str]]:
    """The full grid's choice among ``arms`` (highest mean over ``seeds``, ties to the
    first) and the arms its paired interval at ``confidence`` puts below the choice."""
    means = [math.fsum(values[a][s] for s in seeds) / len(seeds) for a in arms]
    best = arms[int(np.argmax(means))]
    below = set()
    for a in arms:
        d = paired_difference({s: values[best][s] for s in seeds}, {s: values[a][s] for s in seeds}, confidence)
        if a != best and d["lo"] is not None and d["lo"] > 0:
            below.add(a)
    return best, below


def judge(arms: dict, values: dict, seeds: list[int], rule: Rule, orders: list[list[int]]) -> dict:
    """The race replayed in each of ``orders``, per question: how often its survivors hold
    the grid's choice, how often they hold an arm the grid puts below its choice, how
    often it dropped an arm the grid does not separate from its choice, the mean seeds
    to decide, and the mean fraction of the grid's runs it saved (over all questions)."""
    verdicts = {q: grid_verdict(a, values, seeds[:rule.max_seeds], rule.confidence)
                for q, a in arms.items() if len(a) > 1}
    out = {q: {"holds_choice": 0, "keeps_below": 0, "drops_unseparated": 0, "seeds": 0.0} for q in verdicts}
    saved = []
    for order in orders:
        st = race_state(arms, values, order, rule)
        saved.append(1 - st.runs() / st.grid_runs())
        for q, (best, below) in verdicts.items():
            r, o = st.races[q], out[q]
            o["holds_choice"] += best in r.alive
            o["keeps_below"] += bool(below & set(r.alive))
            o["drops_unseparated"] += any(a not in below for a in r.dropped)  # the choice itself too
            o["seeds"] += len(r.seeds) / len(orders)
    return {"orders": len(orders), "saved": float(np.mean(saved)), "questions": out,
            "choice": {q: v[0] for q, v in verdicts.items()},
            "separated": {q: f"{len(v[1])} of {len(arms[q]) - 1}" for q, v in verdicts.items()}}


def expected_runs(arms: dict, values: dict, order: list[int], rule: Rule, draws: int = 200,
                  rng_seed: int = 0) -> float | None:
    """The race's expected student runs from a pilot, the first ``first_test`` seeds of
    ``order`` run by every arm: their accuracies as they are, every later seed a pilot
    seed drawn with replacement (all arms' accuracies at it, so pairs stay paired); the
    race replayed on each of ``draws`` such studies; the mean. None without the pilot."""
    pilot = order[:rule.first_test]
    every = [a for q in arms.values() for a in q]
    if any(s not in values.get(a, {}) for a in every for s in pilot):
        return None
    rng, total = np.random.default_rng(rng_seed), 0
    n = min(rule.max_seeds, len(order))
    for _ in range(draws):
        picks = pilot + [pilot[i] for i in rng.integers(len(pilot), size=n - len(pilot))]
        drawn = {a: {i: values[a][s] for i, s in enumerate(picks)} for a in every}
        total += race_state(arms, drawn, list(range(n)), rule).runs()
    return total / draws


def replay_lines(rows, rule: Rule, n_orders: int = 1, rng_seed: int = 0) -> list[str]:
    """What ``report --replay-race`` prints: the race in the study's seed order, then,
    with ``n_orders`` > 1, the judgement over that many random orders."""
    arms, values, seeds = grid_values(rows)
    seeds = seeds[:rule.max_seeds]
    check_grid_complete(arms, values, seeds)
    if all(len(a) < 2 for a in arms.values()):
        raise RunError("the replay needs a question of two arms or more; every question here has one")
    st = race_state(arms, values, seeds, rule)
    lines = [f"race replayed on {len(seeds)} seeds ({rule.test}, first test after {rule.first_test} seeds, "
             f"{100 * rule.confidence:g}%), in the study's seed order:"]
    lines += [f"  {sentence(q, r, rule.confidence)}" for q, r in st.races.items()]
    lines.append(f"  {st.runs()} of the grid's {st.grid_runs()} student runs "
                 f"({100 * (1 - st.runs() / st.grid_runs()):.0f}% saved)")
    if n_orders > 1:
        rng = np.random.default_rng(rng_seed)
        orders = [list(rng.permutation(seeds).tolist()) for _ in range(n_orders)]
        lines += _judgement_lines(judge(arms, values, seeds, rule, orders))
    return lines


def _judgement_lines(j: dict) -> list[str]:
    n = j["orders"]
    lines = [f"in {n} random seed orders: {100 * j['saved']:.0f}% of the runs saved on average",
             "  question | grid's choice | arms the grid separates from it | survivors hold it | "
             "keep an arm the grid separates | drop an arm the grid does not | mean seeds"]
    for q, o in j["questions"].items():
        lines.append(f"  {q.upper()} | {label(j['choice'][q])} | {j['separated'][q]} | {o['holds_choice']}/{n} | "
                     f"{o['keeps_below']}/{n} | {o['drops_unseparated']}/{n} | {o['seeds']:.1f}")
    return lines
