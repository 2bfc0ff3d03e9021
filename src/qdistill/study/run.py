"""Running a study: its teacher, and the executors that train its runs. The folder's
layout and its rules belong to `studydir.StudyDir`.

Runs train one by one in this process, as fused groups (one per seed, ``study.fused``:
``"auto"`` fuses on CUDA only), or as Ray tasks (``--ray [ADDRESS]``, ``--workers N``:
`cluster.py`), where the teacher is a task too. Either way the study folder holds the
same files, so a study started one way can be resumed the other.
"""
from __future__ import annotations

import io
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_bytes, atomic_write_text
from ..data.registry import load, num_classes
from ..nn import FLAT_MODELS
from ..errors import ConfigError, RunError, UserError, WriteError
from ..lock import locked
from ..training.device import pick_device, threads
from ..training.loop import Run, train
from ..training.teacher import Teacher, open_teacher
from ..training.teacher_files import Preprocess
from . import cluster
from .grid import Condition, arms_by_question, check_grid, expand, group_key, study_seeds, teacher_config
from .plan import duration, estimate_lines, study_rates
from .race import RaceState, Rule, race_state
from .results import write_results
from .studydir import StudyDir
from .worker import Unit


class Clock:
    """Runs done out of those this session trains, and the time left at their pace."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def tick(self) -> str:
        """A run finished: ``"k/N runs, about X left"`` (no time left after the last)."""
        self.done += 1
        return f"{self.done}/{self.total} runs{self.left()}"

    def left(self) -> str:
        """``", about X left"`` at the pace so far; empty before the first run or after the last."""
        if not 0 < self.done < self.total:
            return ""
        return f", about {duration((self.total - self.done) * (time.perf_counter() - self.t0) / self.done)} left"


@dataclass
class Study:
    """One call of `run_study`: the config, the folder, the data, and where runs train."""
    cfg: dict
    dir: StudyDir
    data: object
    device: torch.device                 # where this process computes (the teacher's logits)
    given: Teacher | None                # ``teacher.run``, when the study does not train its own
    progress: bool
    ray: object = None                   # the ray module, connected, for a study on Ray
    tasks: cluster.Tasks | None = None   # what each Ray task asks for
    clock: "Clock | None" = None         # runs done and time left (`_say_done`)
    held: list[Condition] | None = None  # the runs results.csv holds: the grid, or those a race has run
    race: RaceState | None = None        # a race's state (`race.py`), as the runs have it

    def results(self) -> list[dict]:
        return write_results(self.dir, self.held, self.race)


def run_study(cfg: dict, study: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Run every condition of the study (skipping finished runs, resuming unfinished
    ones) and write ``results.csv``. Returns ``{"rows", "failed"}``. The study folder is
    locked meanwhile; a teacher not clearly above chance stops it before any student
    trains, unless ``study.allow_weak_teacher``. The runs train here or as Ray tasks
    (`on_ray`)."""
    study = StudyDir(study)
    if not cfg["teacher"]["run"] and not Preprocess(cfg["teacher"]).is_default:
        raise ConfigError("[teacher] input_range, mean, std, layout and input_size describe a teacher file given "
                          "as teacher.run; the teacher a study trains takes the data as it is")
    plan = _ray_plan(cfg) if on_ray(cfg) else None
    if plan:
        cluster.import_ray()
    data = load(cfg["data"])
    check_grid(cfg, data.num_classes)  # what a run would refuse stops the study before anything trains
    given = open_teacher(cfg, data, cache=study.logits_cache)  # a bad teacher stops the study here
    s = Study(cfg, study, data, pick_device(cfg["train"]["device"]), given, progress)
    with locked(study.path, "study"), (cluster.session(*plan[:2]) if plan else
                                       threads(cfg["study"]["cpus_per_run"])) as ray:
        if ray:  # a request no node can meet stops the study before its folder is written
            s.ray, s.tasks = ray, cluster.Tasks(*cluster.resources(ray, plan[2], cfg["study"]["gpus_per_run"],
                                                                  cfg["study"]["workers"]),
                                                retries=cfg["study"]["retries"], progress=progress)
        return _run_study(s, force)


def _run_study(s: Study, force: bool) -> dict:
    s.dir.prepare(s.cfg, force)
    conds = expand(s.cfg)
    racing = s.cfg["study"]["search"] == "race"
    todo = [c for c in conds if not s.dir.run(c.name).finished]  # a race's: at most these
    _say_estimate(s, todo)
    teacher = study_teacher(s)
    s.held = _race_now(s, conds) if racing else conds
    s.results()
    if todo:
        s.clock = Clock(len(todo))
        _race(s, conds, teacher) if racing else _train_runs(s, conds, todo, teacher)
    rows = s.results()
    return {"rows": rows, "failed": [r["run"] for r in rows if r["status"] != "ok"]}


# ---------------------------------------------------------------- the race

def _race_now(s: Study, conds: list[Condition]) -> list[Condition]:
    """Replay the race on the finished runs (`race.race_state`), write ``race.json``,
    and return the runs it has run or runs next."""
    values = finished_values(s.dir, conds)
    s.race = race_state(arms_by_question(conds), values, study_seeds(s.cfg["study"]), Rule.of(s.cfg["study"]))
    atomic_write_text(s.dir.race, json.dumps(s.race.to_json(), indent=1) + "\n")
    return [c for c in conds if c.seed in s.race.seeds_of(c.arm)]


def finished_values(study: StudyDir, conds: list[Condition]) -> dict[str, dict[int, float]]:
    """{arm: {seed: val_best_acc}} of the finished runs of ``conds``: what a race reads."""
    values: dict[str, dict[int, float]] = {}
    for c in conds:
        summary = study.run(c.name).read_summary()
        if summary is not None:
            values.setdefault(c.arm, {})[c.seed] = summary["val_best_acc"]
    return values


def _race(s: Study, conds: list[Condition], teacher: Teacher) -> None:
    """Train the race seed by seed: the unfinished runs of the earliest seed, then the
    race replayed on them, until every question is decided. A run that fails stops the
    race there (its pairs are missing); a rerun retries it."""
    order = study_seeds(s.cfg["study"])
    while True:
        todo = [c for c in s.held if not s.dir.run(c.name).finished]
        if not todo:
            return
        seed = min((c.seed for c in todo), key=order.index)
        batch = [c for c in todo if c.seed == seed]
        if s.progress:
            alive = {q: len(r.alive) for q, r in s.race.races.items() if not r.decided}
            print(f"race: seed {seed}, {', '.join(f'{q.upper()} {k} arms' for q, k in alive.items()) or 'references'}",
                  flush=True)
        _train_runs(s, [c for c in s.held if c.seed == seed], batch, teacher)
        s.held = _race_now(s, conds)
        if any(not s.dir.run(c.name).finished for c in batch):
            return


# ---------------------------------------------------------------- the teacher

def study_teacher(s: Study) -> Teacher:
    """The study's teacher: ``teacher.run``, or the run ``STUDY/teacher`` trained (or
    resumed) here or as a Ray task; its logits cached in the study, and its test logits
    and description written for the report. A teacher the study trained is checked for
    usefulness here (a given one was, before the study's folder was touched)."""
    if s.given is None and not s.dir.teacher.finished:
        _train_teacher(s)
    teacher = s.given or Teacher.open(s.dir.teacher.path, s.data)
    teacher.cached(s.dir.logits_cache, s.device)
    _write_teacher_files(s, teacher)
    if s.given is None:
        teacher.check_useful(s.cfg["study"]["allow_weak_teacher"])
    return teacher


def _train_teacher(s: Study) -> None:
    run = s.dir.teacher
    if s.ray:
        unit = Unit.of("teacher", ((teacher_config(s.cfg), run.name),))
        cluster.run_units(s.ray, s.dir, [unit], s.data, None, s.tasks)
        if not run.finished:
            raise RunError(f"the study's teacher did not finish: {run.read_error()}")
    else:
        train([Run(teacher_config(s.cfg), run)], s.data, existing="resume", progress=s.progress)


def _write_teacher_files(s: Study, teacher: Teacher) -> None:
    """``teacher_test.npz`` (its test logits, labels, class names) and ``teacher.json``."""
    buf = io.BytesIO()
    np.savez(buf, logits=teacher.test_logits().numpy(), labels=s.data.y_test.numpy(),
             class_names=np.array(s.data.class_names))
    atomic_write_bytes(s.dir.teacher_test, buf.getvalue())
    atomic_write_text(s.dir.teacher_json, json.dumps({
        "run": str(Path(teacher.source)), "model": teacher.arch, "val_best_acc": teacher.val_acc,
        **teacher.describe(),
    }, indent=2) + "\n")


# ---------------------------------------------------------------- the students

def _train_runs(s: Study, conds: list[Condition], todo: list[Condition], teacher: Teacher) -> None:
    """Train the unfinished runs: as Ray tasks, as fused groups, or one by one."""
    where = torch.device("cuda" if s.tasks.gpus > 0 else "cpu") if s.ray else s.device  # the runs' device
    grouped = fuses(s.cfg, where)
    if s.ray:
        units = ([Unit.of(folder, tuple((c.cfg, StudyDir.run_folder(c.name)) for c in members), folder)
                  for members, folder in unfinished_groups(conds, s.dir)] if grouped else
                 [Unit.of(c.name, ((c.cfg, StudyDir.run_folder(c.name)),)) for c in todo])
        bundle = teacher.bundle(s.cfg["teacher"] if s.given else None, s.cfg["data"]["augment"] != "none")
        cluster.run_units(s.ray, s.dir, units, s.data, bundle, s.tasks, on_done=s.results)
    elif grouped:
        groups = unfinished_groups(conds, s.dir)
        for i, (members, folder) in enumerate(groups):
            if s.progress:
                print(f"[group {i + 1}/{len(groups)}{s.clock.left()}] seed {members[0].seed}: {len(members)} "
                      f"students fused", flush=True)
            _train_recorded(s, members, teacher, group=folder)
            s.results()
            for c in members:
                _say_done(s, c)
    else:
        for i, cond in enumerate(todo):
            if s.progress:
                print(f"[{i + 1}/{len(todo)}{s.clock.left()}] {cond.name}", flush=True)
            s.dir.run(cond.name).clear_error()
            _train_recorded(s, [cond], teacher)
            s.results()
            _say_done(s, cond)


def _say_estimate(s: Study, todo: list[Condition]) -> None:
    """The study's first line: the estimated time of what is left to train, from a few
    timed eager steps on this machine (`plan.study_rates`: kept from an earlier study)."""
    teacher_left = s.given is None and not s.dir.teacher.finished
    if todo or teacher_left:
        n, frac = len(s.data.y_train), s.cfg["data"]["val_fraction"]
        n -= max(1, round(n * frac)) if frac > 0 else 0
        rates = study_rates(s.cfg, s.cfg["train"]["threads"] or s.cfg["study"]["cpus_per_run"],
                            str(s.device) if not s.ray else "cpu")
        line = estimate_lines(s.cfg, n, rates, left=(teacher_left, len(todo)))[0]
        if s.cfg["study"]["search"] == "race":  # the full grid's runs: a race trains fewer
            line = line.replace("estimate: ", "estimate: at most ", 1)
        print(line, flush=True)


def _say_done(s: Study, cond: Condition) -> None:
    """One line per finished or failed run, --quiet or not, with the runs done and the
    time left at the pace of this session's runs."""
    run = s.dir.run(cond.name)
    summary = run.read_summary()
    pace = s.clock.tick()
    print(f"{cond.name}: val {summary['val_best_acc']:.4f} test {summary['test_acc_at_val_best']:.4f} "
          f"({summary['wall_s']:.0f} s; {pace})" if summary else f"{cond.name}: failed: {run.read_error()} ({pace})",
          flush=True)


def _train_recorded(s: Study, conds: list[Condition], teacher: Teacher, group: str | None = None) -> None:
    """Train ``conds`` (one run, or one fused group); a failure is written to each run's
    ``error.txt`` and does not stop the study."""
    runs = [Run(c.cfg, s.dir.run(c.name)) for c in conds]
    try:
        train(runs, s.data, teacher, group_dir=s.dir.folder(group).path if group else None, existing="resume",
              progress=s.progress)
    except (KeyboardInterrupt, WriteError):  # a failing disk stops the study
        raise
    except Exception as e:  # a failed run must not stop the others
        detail = "" if isinstance(e, UserError) else traceback.format_exc()
        for r in runs:
            r.out.write_error(e, detail)


def unfinished_groups(conds: list[Condition], study: StudyDir) -> list[tuple[list[Condition], str]]:
    """The grid's fused groups (`group_key`: one per seed) with an unfinished member, each
    with its folder inside the study (``groups/s<seed>``). A group with any unfinished
    member trains as the whole group, so it always matches its checkpoint (a kill between
    two members' summaries must not leave a smaller group to start over)."""
    groups: dict[str, list[Condition]] = {}
    for c in conds:
        groups.setdefault(group_key(c), []).append(c)
    one_per_seed = len(groups) == len({m[0].seed for m in groups.values()})
    return [(members, StudyDir.group_folder(members[0].seed, None if one_per_seed else i))
            for i, members in enumerate(groups.values())
            if any(not study.run(c.name).finished for c in members)]


def fuses(cfg: dict, device: torch.device) -> bool:
    """``study.fused``: ``"auto"`` fuses on CUDA only (Ray tasks: those with GPUs), flat
    networks only (`qdistill.nn.FLAT_MODELS`; ``true`` with another is refused by the config check); on
    the 2-core CPU dev box a fused group trains slower per student than one model
    (``qdistill bench --scaling``)."""
    fused = cfg["study"]["fused"]
    return device.type == "cuda" and cfg["student"]["model"] in FLAT_MODELS if fused == "auto" else fused


# ---------------------------------------------------------------- where runs train

def check_plan(cfg: dict, out: str | Path | None, force: bool = False) -> tuple[bool, int] | None:
    """What `run_study` would refuse before it trains, asked without training or writing
    (``study --plan``): Ray missing or a bad address, the grid (`check_grid`; the classes
    where known without reading the data), a folder ``out`` holding another config.
    Returns what is left to train there, (the teacher, student runs), or None without ``out``."""
    if on_ray(cfg):
        _ray_plan(cfg)
        cluster.import_ray()
    conds = check_grid(cfg, num_classes(cfg["data"]))
    if out is None:
        return None
    study = StudyDir(out)
    if study.holds_another(cfg, force):
        return not cfg["teacher"]["run"], len(conds)
    return (not cfg["teacher"]["run"] and not study.teacher.finished,
            sum(not study.run(c.name).finished for c in conds))


def pilot_values(cfg: dict, out: str | Path | None) -> dict[str, dict[int, float]]:
    """What ``--plan`` knows of a race's pilot: the finished runs of the folder ``out``
    (none without one, or where it holds another config)."""
    if out is None or StudyDir(out).holds_another(cfg, force=True):
        return {}
    return finished_values(StudyDir(out), expand(cfg))


def on_ray(cfg: dict) -> bool:
    """Whether the study's runs are Ray tasks: ``study.executor = "ray"`` (``--ray``) or
    more than one worker (``--workers N``: a local Ray instance)."""
    return cfg["study"]["executor"] == "ray" or cfg["study"]["workers"] > 1


def _ray_plan(cfg: dict) -> tuple[str, int | None, int]:
    """Where Ray runs and what a task asks for: the address (``""``: a local instance),
    the CPUs of a local instance (``None``: all), and the CPUs per run."""
    st = cfg["study"]
    address, workers = cluster.check_address(st["ray_address"]), st["workers"]
    cpus = st["cpus_per_run"] or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 1)
    return address, (workers * cpus if workers > 1 and not address else None), cpus
