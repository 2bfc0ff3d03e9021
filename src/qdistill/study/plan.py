"""A study's plan, said before it starts: its runs per question, the epochs and images
each trains, in all. Needs no dataset files: the fixed datasets' sizes are known."""
from __future__ import annotations

from ..data.registry import train_size
from . import QUESTIONS
from .grid import expand

ANNOUNCE_ABOVE = 20  # a study of more runs says its plan first, even from a config file


def trained_images(cfg: dict) -> int | None:
    """Images one run trains on per epoch: the training split less the validation images."""
    n = train_size(cfg["data"])
    if n is None:
        return None
    frac = cfg["data"]["val_fraction"]
    return n - (max(1, round(n * frac)) if frac > 0 else 0)


def plan_lines(cfg: dict) -> list[str]:
    """The plan in a few lines."""
    conds, st, epochs = expand(cfg), cfg["study"], cfg["train"]["epochs"]
    per_q = {q: sum(c.question == q for c in conds) for q in QUESTIONS if q in st["questions"]}
    n = trained_images(cfg)
    teacher = "teacher.run, already trained" if cfg["teacher"]["run"] else \
        f"a {cfg['teacher']['model']} teacher of {st['teacher_epochs'] or epochs} epochs"
    lines = [f"plan: {teacher}, then {len(conds)} student runs of {epochs} epochs "
             f"({', '.join(f'{q.upper()} {k}' for q, k in per_q.items())}; "
             f"T in {', '.join(f'{t:g}' for t in st['temperatures'])}; seeds {', '.join(map(str, st['seeds']))})"]
    if n is not None:
        lines.append(f"      each on {n:,} training images: {len(conds) * epochs * n / 1e6:,.1f} million student "
                     f"images in all")
    return lines


def announces(cfg: dict, from_file: bool) -> bool:
    """Whether a study says its plan before it starts: without a config file (the defaults
    are the full homework study), or with more than `ANNOUNCE_ABOVE` runs."""
    return not from_file or len(expand(cfg)) > ANNOUNCE_ABOVE
