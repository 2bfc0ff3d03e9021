"""A study's plan, said before it starts: its runs per question, the epochs and images
each trains, in all. Needs no dataset files: the fixed datasets' sizes are known."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..data.registry import train_size
from . import QUESTIONS
from .grid import arms_by_question, expand, study_seeds

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
    race = "at most " if st["search"] == "race" else ""
    lines = [f"plan: {teacher}, then {race}{len(conds)} student runs of {epochs} epochs "
             f"({', '.join(f'{q.upper()} {k}' for q, k in per_q.items())}; "
             f"T in {', '.join(f'{t:g}' for t in st['temperatures'])}; seeds {', '.join(map(str, study_seeds(st)))})"]
    if n is not None:
        lines.append(f"      each on {n:,} training images: {len(conds) * epochs * n / 1e6:,.1f} million student "
                     f"images in all")
    return lines


def race_lines(cfg: dict, values: dict) -> list[str]:
    """A race's plan: at most the full grid, at least every arm's first test, and the
    runs expected from a pilot (``values``: {arm: {seed: val_best_acc}} of the finished
    runs, `replay.expected_runs`), or that it cannot know them yet."""
    from .race import Rule
    from .replay import expected_runs
    st, conds = cfg["study"], expand(cfg)
    arms, rule, order = arms_by_question(conds), Rule.of(cfg["study"]), study_seeds(cfg["study"])
    least = sum(len(a) for a in arms.values()) * rule.first_test
    expected = expected_runs(arms, values, order, rule)
    head = f"race: at most {len(conds)} student runs (the grid of {len(order)} seeds), at least {least}"
    if expected is None:
        return [f"{head}; how many it needs is unknown until every arm has run the first {rule.first_test} seeds "
                f"(a pilot: this study with study.max_seeds = {rule.first_test})"]
    return [f"{head}; about {expected:.0f} expected (the race replayed on the pilot's {rule.first_test} seeds, "
            f"each later seed drawn from them, 200 draws)"]


def announces(cfg: dict, from_file: bool) -> bool:
    """Whether a study says its plan before it starts: without a config file (the defaults
    are the full homework study), or with more than `ANNOUNCE_ABOVE` runs."""
    return not from_file or len(expand(cfg)) > ANNOUNCE_ABOVE


# ---------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class Rates:
    """Measured training images per second of the study's two models on this machine,
    and what it took: compiled or eager, threads, and the compile time."""
    teacher: float
    student: float
    compiled: bool
    threads: int
    compile_s: tuple[float, float] = (0.0, 0.0)  # one compile of the teacher's step, of a student's


def measure_rates(cfg: dict, compiled_steps: bool = False, threads: int = 0, device="cpu") -> Rates:
    """A few timed training steps of the teacher's and the student's model on random
    data of the run's shape, with the configured batch size and optimizer: the rates
    behind the estimate (at least `MIN_STEPS` steps and `MIN_SECONDS` per model)."""
    from ..training.rate import run_rate
    from ..training.device import threads as torch_threads
    with torch_threads(threads):
        import torch
        teacher, t_compile = (run_rate(cfg, "teacher", compiled_steps, device)
                              if not cfg["teacher"]["run"] else (0.0, 0.0))
        student, s_compile = run_rate(cfg, "student", compiled_steps, device)
        return Rates(teacher, student, compiled_steps, torch.get_num_threads(), (t_compile, s_compile))


def estimate_lines(cfg: dict, n_train: int | None, rates: Rates, one_thread: Rates | None = None,
                   cores: int = 1, left: tuple[bool, int] | None = None) -> list[str]:
    """The estimated wall time of the training steps (evaluation adds about a tenth):
    here, and given the rates at one thread, with ``--workers`` = ``cores`` runs at once
    and per added Ray node like this one. ``left``: (the teacher still trains, student
    runs still to train); the whole study by default."""
    if n_train is None:
        return ["estimate: the training images are counted once the data is read"]
    st, epochs = cfg["study"], cfg["train"]["epochs"]
    teacher_left, runs = left or (not cfg["teacher"]["run"], len(expand(cfg)))
    teacher_s = (st["teacher_epochs"] or epochs) * n_train / rates.teacher + rates.compile_s[0] if teacher_left else 0.0
    students_s = runs * (epochs * n_train / rates.student + rates.compile_s[1])
    how = f"{'compiled' if rates.compiled else 'eager'} steps, {rates.threads} thread{'s' * (rates.threads > 1)}"
    lines = [f"estimate: {duration(teacher_s + students_s)} of training here (teacher {rates.teacher:,.0f} img/s, "
             f"student {rates.student:,.0f} img/s measured, {how})"]
    if one_thread and cores > 1:
        per_worker = runs * (epochs * n_train / one_thread.student + one_thread.compile_s[1])
        lines.append(f"          with --workers {cores} (1 thread each, student {one_thread.student:,.0f} img/s): "
                     f"{duration(teacher_s + per_worker / cores)}; with each added Ray node like this one the "
                     f"students' {duration(per_worker / cores)} shrink as 1/nodes")
    return lines


def duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


COMPILED_BUDGET_S = 240.0  # a first measurement of compiled rates: two cold Inductor compiles on 2 cores


def measured_estimate(cfg: dict, left: tuple[bool, int] | None = None) -> list[str]:
    """``study --plan``'s estimate: the rates measured as the runs will train (compiled
    where `compiled.wanted`), then at one thread each for ``--workers``. Compiled rates
    are measured once per machine, torch version, models and batch (in a fresh process,
    given `COMPILED_BUDGET_S`: Inductor's first compiles take a minute or two on 2 cores)
    and kept in the user's cache (`rates_file`); the eager ones take a few seconds each
    time. ``left``: what a rerun still trains (`estimate_lines`); nothing is measured
    when nothing is."""
    if left == (False, 0):
        return ["estimate: every run of this study is finished; a rerun trains nothing"]
    import torch
    from ..training.compiled import wanted
    n = trained_images(cfg)
    compiled_steps = wanted(cfg, cfg["train"]["epochs"] * (n or 0), torch.device("cpu"))
    cores = _cores()
    measured, kept = _compiled_rates(cfg, cores) if compiled_steps else (None, "")
    rates, one = measured or _rates(cfg, False, cores)
    lines = estimate_lines(cfg, n, rates, one, cores, left)
    if measured:
        lines.append(f"          (each run first compiles its step, included: {rates.compile_s[1]:.0f} s for a "
                     f"student here; {kept})")
    elif compiled_steps:
        lines.append(f"          (compiled rates not measured within {COMPILED_BUDGET_S:.0f} s: these are eager "
                     f"rates)")
    return lines


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rates_file() -> Path:
    """Where measured rates are kept: ``$QDISTILL_CACHE/rates.json`` (default
    ``~/.cache/qdistill``)."""
    import os
    return Path(os.environ.get("QDISTILL_CACHE") or "~/.cache/qdistill").expanduser() / "rates.json"


def _rates_key(cfg: dict, cores: int, how: str = "compiled") -> str:
    """What the rates depend on: the machine, torch, the models, their bits and the batch,
    and ``how`` they were measured (compiled, or eager at a thread count on a device)."""
    import torch
    from ..training.device import cpu_name
    t, s = cfg["teacher"], cfg["student"]
    return json.dumps({"cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
                       "teacher": None if t["run"] else [t["model"], t.get("model_args", {}), t.get("model_sha256")],
                       "student": [s["model"], s.get("model_args", {}), s.get("model_sha256"), s["scheme"],
                                   s["weight_bits"], s["act_bits"], s["grad_bits"], s["quantize_first_last"]],
                       "train": [cfg["train"][k] for k in ("batch_size", "optimizer", "threads", "precision")],
                       **({} if how == "compiled" else {"how": how})},
                      sort_keys=True)


def _read_kept() -> dict:
    try:
        kept = json.loads(rates_file().read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _keep(key: str, rates: list[Rates | None]) -> None:
    """Add ``rates`` under ``key`` to the kept ones (the file replaced whole: a reader never
    sees half of it; of two writers at once, one's entry may be lost and measured again)."""
    kept, path = _read_kept(), rates_file()
    kept[key] = {"date": time.strftime("%Y-%m-%d"), "rates": [None if r is None else asdict(r) for r in rates]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(kept, indent=1))
    except OSError:
        pass  # a cache that cannot be written costs the next plan the measurement, nothing else


def _kept_entry(key: str) -> tuple[list[Rates | None], str] | None:
    """The rates kept under ``key`` and their date; None where there are none (or the entry
    is not one this version wrote: it is measured again and replaced)."""
    entry = _read_kept().get(key)
    try:
        return ([None if r is None else Rates(**{**r, "compile_s": tuple(r["compile_s"])}) for r in entry["rates"]],
                str(entry["date"]))
    except (KeyError, TypeError, ValueError):
        return None


def study_rates(cfg: dict, threads: int, device: str = "cpu") -> Rates:
    """The eager rates behind a study's first line: kept from an earlier study on this
    machine with these models, batch, threads and device (`rates_file`), or measured now
    (`measure_rates`, about a second) and kept."""
    key = _rates_key(cfg, _cores(), f"eager, {threads} threads, {device}")
    kept = _kept_entry(key)
    if kept is not None:
        return kept[0][0]
    rates = measure_rates(cfg, threads=threads, device=device)
    _keep(key, [rates])
    return rates


def _compiled_rates(cfg: dict, cores: int) -> tuple[tuple[Rates, Rates | None] | None, str]:
    """The compiled rates and where they come from: kept from an earlier plan on this
    machine, or measured now (then kept); None where they could not be measured."""
    key = _rates_key(cfg, cores)
    kept = _kept_entry(key)
    if kept is not None:
        return tuple(kept[0]), f"measured {kept[1]}, kept in {rates_file()}"
    print(f"measuring compiled rates once for this machine and these models (up to {COMPILED_BUDGET_S:.0f} s); "
          f"later plans read them from {rates_file()}", file=sys.stderr, flush=True)
    measured = _within(COMPILED_BUDGET_S, _rates, cfg, True, cores)
    if measured is None:
        return None, ""
    _keep(key, list(measured))
    return measured, f"measured now, kept in {rates_file()}"


def _rates(cfg: dict, compiled_steps: bool, cores: int) -> tuple[Rates, Rates | None]:
    """The rates with the configured threads, and at one thread where ``cores`` > 1."""
    return (measure_rates(cfg, compiled_steps, cfg["train"]["threads"]),
            measure_rates(cfg, compiled_steps, 1) if cores > 1 else None)


def _within(seconds: float, fn, *args):
    """``fn(*args)`` (picklable, ``fn`` a module-level function) in a fresh Python, or None
    where it takes longer than ``seconds`` or fails; its process group is killed then,
    its messages (a killed compile's included) go nowhere."""
    import os
    import pickle
    import signal
    import subprocess
    import sys
    code = "import pickle, sys; fn, args = pickle.load(sys.stdin.buffer); pickle.dump(fn(*args), sys.stdout.buffer)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(pickle.dumps((fn, args)), timeout=seconds)
        return pickle.loads(out) if proc.returncode == 0 else None
    except subprocess.TimeoutExpired:
        return None
    finally:  # also on Ctrl-C, which a process in its own session does not see
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # with whatever it started
        except ProcessLookupError:
            pass
        proc.communicate()
