"""The race (``study.search = "race"``): seeds added until each question is decided.

The arms of a question are its (T, kd) conditions; Q1, and any question of one arm, is
a reference that runs every seed a race reaches. Seed by seed, in ``study.seeds``'
order, the surviving arms of every question still racing run that seed (paired, as in
the grid). From ``first_test`` seeds on, after each seed, the test (`racetests`) is
applied to their validation accuracy at the best epoch (the test set decides
nothing); the arms it drops keep their runs and run no more seeds. A question's race
ends when one arm is left, or at ``max_seeds`` seeds with the survivors undivided.

Every decision is a function of the finished runs' validation accuracies in seed
order, so the race is not stored to be resumed: `race_state` replays it from the runs
(a killed study resumes mid-race with the same decisions), and the replay of a
finished grid study (`replay.py`) applies the same function to its ``results.csv``.
``race.json`` records the outcome for the report. Torch-free.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .racetests import race_test


@dataclass(frozen=True)
class Rule:
    """The race's keys (``[study]``): the test, the seeds before the first test, the
    seed budget per arm, the confidence."""
    test: str = "friedman"
    first_test: int = 4
    max_seeds: int = 0
    confidence: float = 0.95

    @staticmethod
    def of(st: dict) -> "Rule":
        return Rule(st["race_test"], st["first_test"], st["max_seeds"] or len(st["seeds"]), st["confidence"])


@dataclass
class Race:
    """One question's race: its arms (in grid order), the seeds its survivors have all
    finished, the arms dropped ({arm: {seed, n, test, statistic, p}}), the last test
    each arm took part in, every test, and the seed the survivors run next (None: decided)."""
    question: str
    arms: list[str]
    seeds: list[int] = field(default_factory=list)
    dropped: dict[str, dict] = field(default_factory=dict)
    last: dict[str, dict] = field(default_factory=dict)
    tests: list[dict] = field(default_factory=list)
    next_seed: int | None = None

    @property
    def alive(self) -> list[str]:
        return [a for a in self.arms if a not in self.dropped]

    @property
    def decided(self) -> bool:
        return self.next_seed is None

    def arm_seeds(self, arm: str, order: list[int]) -> list[int]:
        """The seeds ``arm`` has run, with the one it runs next."""
        n = self.dropped[arm]["n"] if arm in self.dropped else len(self.seeds) + (not self.decided)
        return order[:n]


def race(question: str, arms: list[str], values: dict[str, dict[int, float]], order: list[int],
         rule: Rule) -> Race:
    """Replay one question's race over ``order`` (the seeds in the order they run) on
    ``values`` ({arm: {seed: validation accuracy}}): it stops at the first seed a
    surviving arm has not finished, the seed it runs next."""
    r, alpha = Race(question, list(arms)), 1.0 - rule.confidence
    for i, seed in enumerate(order[:rule.max_seeds]):
        alive = r.alive
        if len(alive) < 2:
            return r
        if any(seed not in values.get(a, {}) for a in alive):
            r.next_seed = seed
            return r
        r.seeds.append(seed)
        if i + 1 >= rule.first_test:
            x = np.array([[values[a][s] for a in alive] for s in r.seeds])
            v = race_test(x, rule.test, alpha)
            stat = [None if math.isnan(q) else q for q in v.statistic]  # nan (no test possible) as JSON's null
            for j, a in enumerate(alive):
                r.last[a] = {"test": v.test, "statistic": stat[j], "p": v.p[j]}
            r.tests.append({"seed": seed, "n": i + 1, "test": v.test, "alive": alive,
                            "statistic": stat, "p": v.p, "dropped": [alive[j] for j in v.drop]})
            for j in v.drop:
                r.dropped[alive[j]] = {"seed": seed, "n": i + 1, **r.last[alive[j]]}
    return r


@dataclass
class RaceState:
    """Every question's race, the references (arms of questions that do not race) and
    how many seeds of the order the references run (the furthest a race reached)."""
    rule: Rule
    order: list[int]
    races: dict[str, Race]
    references: list[str]

    @property
    def reach(self) -> int:
        return max((len(r.seeds) + (not r.decided) for r in self.races.values()), default=len(self.order))

    @property
    def decided(self) -> bool:
        return all(r.decided for r in self.races.values())

    def seeds_of(self, arm: str) -> list[int]:
        """The seeds an arm has run, with the one it runs next."""
        for r in self.races.values():
            if arm in r.arms:
                return r.arm_seeds(arm, self.order)
        return self.order[:self.reach]

    def runs(self) -> int:
        """Student runs the race trains (or has trained) in all."""
        arms = [a for r in self.races.values() for a in r.arms] + self.references
        return sum(len(self.seeds_of(a)) for a in arms)

    def grid_runs(self) -> int:
        """Student runs of the full grid of ``max_seeds`` seeds."""
        return (sum(len(r.arms) for r in self.races.values()) + len(self.references)) * len(self.order)

    def to_json(self) -> dict:
        return {"rule": asdict(self.rule), "order": self.order, "references": self.references,
                "reach": self.reach, "runs": self.runs(), "grid_runs": self.grid_runs(),
                "questions": {q: {**asdict(r), "alive": r.alive} for q, r in self.races.items()}}


def race_state(arms_by_question: dict[str, list[str]], values: dict[str, dict[int, float]],
               order: list[int], rule: Rule) -> RaceState:
    """The race of every question of two arms or more, replayed on ``values``; the
    arms of the others are references."""
    races = {q: race(q, arms, values, order, rule) for q, arms in arms_by_question.items() if len(arms) > 1}
    refs = [a for q, arms in arms_by_question.items() if len(arms) == 1 for a in arms]
    return RaceState(rule, list(order[:rule.max_seeds]), races, refs)


def arm_of(run: str) -> str:
    """A run's arm: its name without the seed (``q3-hard+soft-T4-s2`` -> ``q3-hard+soft-T4``)."""
    return run.rsplit("-s", 1)[0]
