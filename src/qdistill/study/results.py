"""The results of a study: ``results.csv`` (its columns, writing and reading it), the
statistics over seeds, and the choice of one temperature per question.

Torch-free: the study writes these files, the report reads them. Every choice is made
on validation accuracy (mean ``val_best_acc`` over seeds, ties to the lower temperature);
test accuracy is reported, never used to choose.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import RunError
from ..nn import KD_TERMS
from . import QUESTIONS
from .racetests import constant_differences
from .studydir import RESULTS, StudyDir

COLUMNS = ["run", "question", "loss", "kd", "temperature", "c", "seed", "weight_bits", "act_bits",
           "grad_bits", "scheme", "epochs", "val_best_acc", "test_acc_at_val_best",
           "test_acc_last", "teacher_agreement", "kl_to_teacher", "wall_s", "img_per_s", "node",
           "test_ece", "test_nll", "grad_ratio_soft_hard", "grad_ratio_soft_hard_init", "omitted_class",
           "omitted_class_acc", "omitted_class_rank", "omitted_class_acc_bias_corrected", "race_dropped_after",
           "race_test", "race_statistic", "race_p", "status", "error"]
# the summary's fields each row copies (empty where a run has none)
SUMMARY_COLUMNS = ("val_best_acc", "test_acc_at_val_best", "test_acc_last", "teacher_agreement", "kl_to_teacher",
                   "wall_s", "img_per_s", "node", "test_ece", "test_nll", "grad_ratio_soft_hard",
                   "grad_ratio_soft_hard_init", "omitted_class", "omitted_class_acc", "omitted_class_rank",
                   "omitted_class_acc_bias_corrected")
# columns a results.csv written before they existed may lack (read as empty)
LATER_COLUMNS = ("kd", "node", "test_ece", "test_nll", "grad_ratio_soft_hard", "grad_ratio_soft_hard_init",
                 "omitted_class", "omitted_class_acc", "omitted_class_rank", "omitted_class_acc_bias_corrected",
                 "race_dropped_after", "race_test", "race_statistic", "race_p")
STATUSES = ("ok", "failed", "pending")
_FLOATS = ("temperature", "c", "val_best_acc", "test_acc_at_val_best", "test_acc_last",
           "teacher_agreement", "kl_to_teacher", "wall_s", "img_per_s", "test_ece", "test_nll",
           "grad_ratio_soft_hard", "grad_ratio_soft_hard_init", "omitted_class_acc", "omitted_class_rank",
           "omitted_class_acc_bias_corrected", "race_statistic", "race_p")
_INTS = ("seed", "weight_bits", "act_bits", "grad_bits", "epochs", "omitted_class", "race_dropped_after")

# ---------------------------------------------------------------- reading a study

def parse_row(raw: dict, where: str = "row") -> dict:
    """One results row with typed values: floats, ints, ``None`` for an empty cell.
    Idempotent, so `choose` accepts rows from `read_results` or straight from csv."""
    row = dict(raw)
    for key in _FLOATS + _INTS:
        v = row.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            row[key] = None
            continue
        try:
            row[key] = int(v) if key in _INTS else float(v)
        except (TypeError, ValueError):
            raise RunError(f"{where}: {key} must be a number, got {v!r}") from None
    if row.get("question") not in QUESTIONS:
        raise RunError(f"{where}: question must be one of {', '.join(QUESTIONS)}, "
                       f"got {row.get('question')!r}")
    if (row.get("kd") or "kl") not in KD_TERMS:
        raise RunError(f"{where}: kd must be one of {', '.join(KD_TERMS)}, got {row.get('kd')!r}")
    if row.get("status") not in STATUSES:
        raise RunError(f"{where}: status must be one of {', '.join(STATUSES)}, got {row.get('status')!r}")
    if row["temperature"] is None or row["seed"] is None:
        raise RunError(f"{where}: temperature and seed must not be empty")
    if row["status"] == "ok" and (row["val_best_acc"] is None or row["test_acc_at_val_best"] is None):
        raise RunError(f"{where}: a run with status ok needs val_best_acc and test_acc_at_val_best")
    row["error"] = " ".join(str(row.get("error") or "").split())  # one line, whatever was written
    return row


def read_results(path: str | Path) -> list[dict]:
    """The rows of ``results.csv``, typed by `parse_row`; its header must be `COLUMNS`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"not a study: {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        got = reader.fieldnames or []
        if got != [c for c in COLUMNS if c in got or c not in LATER_COLUMNS]:  # older files lack later columns
            missing = [c for c in COLUMNS if c not in got and c not in LATER_COLUMNS]
            extra = [c for c in got if c not in COLUMNS]
            raise RunError(f"{path}: columns differ from the study format"
                           f" (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'}"
                           f"{'; order differs' if not missing and not extra else ''})")
        return [parse_row({**dict.fromkeys(LATER_COLUMNS, ""), **r}, f"{path} line {i}")
                for i, r in enumerate(reader, start=2)]


def read_teacher_logits(path: Path) -> tuple[np.ndarray, list[str]] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            logits = np.asarray(z["logits"], dtype=np.float64)
            names = [str(n) for n in z["class_names"]] if "class_names" in z else []
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"cannot read teacher logits {path}: {e}") from None
    if logits.ndim != 2:
        raise RunError(f"{path}: logits must be (M, K), got shape {logits.shape}")
    return logits, names or [str(k) for k in range(logits.shape[1])]


def write_results(study: StudyDir, conds, race=None) -> list[dict]:
    """One row per condition of the grid (or of those a race has run) from its run
    directory (ok, failed or pending), with the race's verdict on its arm (`race_columns`),
    written to ``STUDY/results.csv``; returns the rows."""
    rows = []
    for cond in conds:
        run = study.run(cond.name)
        row = {k: "" for k in COLUMNS}
        s = cond.cfg["student"]
        row.update(run=cond.name, question=cond.question, loss=cond.loss, kd=cond.kd, temperature=cond.temperature,
                   c="" if cond.c is None else cond.c, seed=cond.seed, weight_bits=s["weight_bits"],
                   act_bits=s["act_bits"], grad_bits=s["grad_bits"], scheme=s["scheme"],
                   epochs=cond.cfg["train"]["epochs"])
        summary, error = run.read_summary(), run.read_error()
        if summary is not None:
            for key in SUMMARY_COLUMNS:
                row[key] = summary.get(key, "")
            row["status"] = "ok"
        elif error is not None:
            row["status"], row["error"] = "failed", error
        else:
            row["status"] = "pending"
        row.update(race_columns(race, cond.arm))
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(study.results, buf.getvalue())
    return rows


def race_columns(race, arm: str) -> dict:
    """A race's verdict on ``arm`` (`race.RaceState`): the seed after which it was dropped
    (empty for a survivor), and the test, statistic and p-value that dropped it (a
    survivor: the last test it took). All empty outside a race or before its first test."""
    for r in (race.races.values() if race else ()):
        if arm in r.arms:
            info = r.dropped.get(arm) or r.last.get(arm)
            if info:
                return {"race_dropped_after": r.dropped[arm]["seed"] if arm in r.dropped else "",
                        "race_test": info["test"], "race_statistic": info["statistic"], "race_p": info["p"]}
    return {}


# ---------------------------------------------------------------- statistics

def mean_std(values) -> tuple[float, float]:
    """mean = sum(x)/n; std = sqrt(sum((x - mean)^2) / (n - 1)) (sample std, Bessel),
    ``nan`` when n < 2. Sums use `math.fsum` (exactly rounded), so equal multisets of
    values give equal means whatever their order: ties between conditions are exact."""
    xs = [float(v) for v in values]
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return mean, std


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict | None:
    """Paired difference over the seeds both dicts ({seed: value}) hold:
    d_s = a_s - b_s, mean d, and the Student-t interval
    mean ± t_{(1+level)/2, n-1} · sd(d) / sqrt(n), with sd the sample std.
    ``lo``/``hi`` are ``None`` for one pair, both ``mean`` where the differences are
    constant (`racetests.constant_differences`: equal numbers of images whose float32
    accuracies differ in the last bits); the result is ``None`` for no pair."""
    seeds = [s for s in a if s in b]
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = mean_std(d)
    out = {"n": len(d), "mean": mean, "lo": None, "hi": None, "seeds": seeds}
    if len(d) > 1 and constant_differences([a[s] for s in seeds], [b[s] for s in seeds]):
        out["lo"] = out["hi"] = mean
    elif len(d) > 1:
        from scipy import stats  # imported here: 0.6 s that only a report needs, not each run
        half = stats.t.ppf((1 + level) / 2, len(d) - 1) * sd / math.sqrt(len(d))
        out["lo"], out["hi"] = mean - half, mean + half
    return out


def soft_target_entropy(logits: np.ndarray, temperatures) -> np.ndarray:
    """For each T: H(T) = mean_i [ -sum_k p_ik ln p_ik ] with p_i = softmax(z_i / T),
    in nats, computed through log_softmax in float64 (no log of an underflowed 0)."""
    from scipy import special  # imported here: see `paired_difference`
    z = np.asarray(logits, dtype=np.float64)
    out = []
    for t in temperatures:
        logp = special.log_softmax(z / float(t), axis=1)
        out.append(float(np.mean(-np.sum(np.exp(logp) * logp, axis=1))))
    return np.asarray(out)


# ---------------------------------------------------------------- conditions and the choice

@dataclass
class Condition:
    """One cell of the grid: a question (with its teacher term) at one temperature (and
    c), over its ok seeds."""
    question: str
    loss: str
    temperature: float
    c: float | None
    rows: list = field(default_factory=list)  # status ok, in the study's seed order
    kd: str = "kl"

    @property
    def arm(self) -> str:
        """What the report compares and chooses within: `arm`."""
        return arm(self.question, self.kd)

    def by_seed(self, key: str) -> dict:
        return {r["seed"]: r[key] for r in self.rows if r[key] is not None}

    def stat(self, key: str) -> tuple[float, float] | None:
        values = list(self.by_seed(key).values())
        return mean_std(values) if values else None


def arm(question: str, kd: str) -> str:
    """A question with its teacher term: ``q3`` for Hinton's ``kl`` (the task's own
    questions keep their names), ``q3-dkd`` for another term."""
    return question if kd == "kl" else f"{question}-{kd}"


def arms(conds) -> list[str]:
    """The arms of ``conds`` in question, then term order."""
    return list(dict.fromkeys(c.arm for c in conds))


def condition_key(c: Condition) -> tuple:
    return (c.question, c.kd, c.temperature, c.c)


def seed_order(rows, seeds) -> list:
    order = list(seeds or [])
    for r in rows:
        if r["seed"] not in order:
            order.append(r["seed"])
    return order


def conditions(rows, seeds=None) -> list[Condition]:
    """The ok rows grouped by (question, temperature, c), in question then T order."""
    rows = [parse_row(r) for r in rows]
    order = seed_order(rows, seeds)
    groups: dict[tuple, Condition] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        kd = r.get("kd") or "kl"
        key = (r["question"], kd, r["temperature"], r["c"])
        cond = groups.setdefault(key, Condition(r["question"], r["loss"], r["temperature"], r["c"], kd=kd))
        if any(x["seed"] == r["seed"] for x in cond.rows):
            raise RunError(f"{RESULTS} has two ok rows for {r['question']} T={r['temperature']:g} "
                           f"seed {r['seed']} ({r['run']})")
        cond.rows.append(r)
    for cond in groups.values():
        cond.rows.sort(key=lambda r: order.index(r["seed"]))
    return sorted(groups.values(), key=lambda c: (QUESTIONS.index(c.question), KD_TERMS.index(c.kd),
                                                  c.temperature, -1.0 if c.c is None else c.c))


def choose(rows, seeds=None) -> dict:
    """Per question (per `arm`: each teacher term apart), the condition with the highest
    mean ``val_best_acc`` over its seeds, among the survivors of a race;
    an exact tie goes to the lower T (then lower c). Test accuracy plays no part.

    Returns {question: info} with info keys: question, loss, temperature, c, n, seeds,
    val_mean, test_mean, test_std, run (the run of the first seed of ``seeds`` that
    succeeded: its config is the deliverable), runs, condition, and test_best_temperature
    (the T that test accuracy would have picked, shown only to be transparent)."""
    chosen, every = {}, conditions(rows, seeds)
    for q in arms(every):
        conds = [c for c in every if c.arm == q]
        conds = [c for c in conds if c.rows[0]["race_dropped_after"] is None] or conds  # a race: its survivors
        best = conds[0]  # sorted by T: a strict > keeps the lower T on a tie
        for cond in conds[1:]:
            if cond.stat("val_best_acc")[0] > best.stat("val_best_acc")[0]:
                best = cond
        by_test = max(conds, key=lambda c: c.stat("test_acc_at_val_best")[0])
        test_mean, test_std = best.stat("test_acc_at_val_best")
        chosen[q] = {"question": best.question, "kd": best.kd, "loss": best.loss, "temperature": best.temperature,
                     "c": best.c, "n": len(best.rows), "seeds": [r["seed"] for r in best.rows],
                     "val_mean": best.stat("val_best_acc")[0], "test_mean": test_mean,
                     "test_std": test_std, "run": best.rows[0]["run"],
                     "runs": [r["run"] for r in best.rows], "condition": best,
                     "test_best_temperature": by_test.temperature}
    return chosen
