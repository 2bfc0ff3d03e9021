"""The study's grid: Q1 ``hard``; Q2 ``soft`` x T; Q3 ``hard+soft`` x T; Q4
``hard+softgt`` x T; each x seeds, and the teacher's own config.

Paired design: every condition of one seed shares the initial weights, the validation
split and the batch order (the seed alone fixes them), so the conditions of a seed
differ only in their loss and can train as one fused group.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from .. import config as configlib
from . import QUESTION_LOSS, QUESTIONS


@dataclass
class Condition:
    """One run of the grid: its name, question, loss, teacher term, temperature, c, seed
    and full config."""
    name: str
    question: str
    loss: str
    temperature: float
    c: float | None
    seed: int
    cfg: dict
    kd: str = "kl"

    @property
    def arm(self) -> str:
        """The run's name without its seed: one arm of a race (`race.arm_of`)."""
        return self.name.rsplit("-s", 1)[0]


def _terms(q: str, st: dict) -> list[str]:
    """The teacher terms a question sweeps: ``study.kd`` for Q2 and Q3, which learn from
    the teacher; Q1 and Q4 have none (their runs keep the default ``kl``)."""
    return list(st["kd"]) if q in ("q2", "q3") else ["kl"]


def expand(cfg: dict) -> list[Condition]:
    """The study's runs, ordered by seed, then question, then teacher term, then
    temperature. A run of a term other than ``kl`` has it in its name
    (``q3-hard+soft-dkd-T4-s0``)."""
    st = cfg["study"]
    out = []
    for seed in study_seeds(st):
        for q in (q for q in QUESTIONS if q in st["questions"]):
            for kd in _terms(q, st):
                for T in [1.0] if q == "q1" else st["temperatures"]:
                    out.append(_condition(cfg, q, kd, float(T), seed))
    return out


def study_seeds(st: dict) -> list[int]:
    """The seeds in the order they run: ``study.seeds``; for a race, ``max_seeds`` of
    them, counting on from the largest listed where it asks for more."""
    if st["search"] != "race" or not st["max_seeds"]:
        return list(st["seeds"])
    seeds = list(st["seeds"][:st["max_seeds"]])
    nxt = max(seeds) + 1
    while len(seeds) < st["max_seeds"]:
        seeds.append(nxt)
        nxt += 1
    return seeds


def arms_by_question(conds: list[Condition]) -> dict[str, list[str]]:
    """Each question's arms (its runs' names without the seed), in grid order."""
    out: dict[str, list[str]] = {}
    for c in conds:
        arms = out.setdefault(c.question, [])
        if c.arm not in arms:
            arms.append(c.arm)
    return out


def _condition(cfg: dict, q: str, kd: str, T: float, seed: int) -> Condition:
    st, loss = cfg["study"], QUESTION_LOSS[q]
    c = None if q in ("q1", "q2") else (float(st["c"]) if "c" in st else configlib.default_c(T))
    run_cfg = copy.deepcopy(cfg)
    del run_cfg["study"]
    run_cfg["run"]["role"] = "student"
    s = run_cfg["student"]
    s["loss"], s["temperature"], s["kd"] = loss, T, kd
    s.pop("c", None)
    if c is not None:
        s["c"] = c
    run_cfg["train"]["seed"] = seed
    name = f"{q}-{loss}" + (f"-{kd}" if kd != "kl" else "") + f"-T{T:g}-s{seed}"
    return Condition(name, q, loss, T, c, seed, run_cfg, kd)


def teacher_config(cfg: dict) -> dict:
    """The teacher's run config. It knows nothing of its students: a changed student
    must not retrain it."""
    tcfg = copy.deepcopy(cfg)
    del tcfg["study"]
    tcfg["run"]["role"] = "teacher"
    tcfg["student"] = copy.deepcopy(configlib.DEFAULTS["student"])
    if cfg["study"]["teacher_epochs"]:
        tcfg["train"]["epochs"] = cfg["study"]["teacher_epochs"]
    return tcfg


def group_key(cond: Condition) -> str:
    """Conditions that may share a fused network: the same config but for the loss, T
    and c (so the same seed)."""
    return json.dumps(configlib.without_loss(cond.cfg), sort_keys=True)


def check_grid(cfg: dict, num_classes: int | None) -> list[Condition]:
    """The grid, once every run's config passes the checks a run would apply (each run
    gets one line naming it), the runs' names are distinct (temperatures that print alike
    share one), and ``student.omit_class`` is a class of the data (``num_classes``; None:
    not known until the data is read). What a study refuses before it trains anything."""
    conds = expand(cfg)
    by_name: dict[str, Condition] = {}
    for c in conds:
        if c.name in by_name:
            raise configlib.ConfigError(f"study runs {c.name} twice: temperatures {by_name[c.name].temperature!r} and "
                                        f"{c.temperature!r} print alike; give temperatures that differ in 6 digits")
        by_name[c.name] = c
        try:
            configlib.check({**copy.deepcopy(c.cfg), "study": copy.deepcopy(cfg["study"])})
        except configlib.ConfigError as e:
            raise configlib.ConfigError(f"study run {c.name}: {e}") from None
    if cfg["study"]["search"] == "race" and all(len(a) < 2 for a in arms_by_question(conds).values()):
        raise configlib.ConfigError("study.search = \"race\" needs a question of two arms or more (temperatures or "
                                    "kd terms) to race; every question here has one")
    k = cfg["student"]["omit_class"]
    if num_classes is not None and k >= num_classes:
        raise configlib.ConfigError(f"student.omit_class {k} is not a class of the data (0..{num_classes - 1})")
    return conds
