"""Running a study: its folder, its teacher, and the executors that train its runs.

Layout of ``STUDY/``:

* ``study.toml``           the resolved config; a different config is refused without ``--force``
* ``teacher/``             the teacher run (unless ``teacher.run`` names a run or a teacher file)
* ``teacher.json``         the teacher's path, kind, file, sha256 and accuracies
* ``teacher_test.npz``     the teacher's test logits, labels and class names (for the report)
* ``teacher_logits.pt``    the teacher's logits cache (`TeacherTargets.cached`)
* ``runs/<question>-<loss>-T<T>-s<seed>/``  one run directory per condition
* ``groups/s<seed>/checkpoint.pt``  a fused group's checkpoint while it trains
* ``results.csv``          one row per run (`qdistill.study.results`)

Runs train one by one in this process, as fused groups (one per seed, ``study.fused``:
``"auto"`` fuses on CUDA only), or as Ray tasks (``--ray [ADDRESS]``, ``--workers N``:
`cluster.py`), where the teacher is a task too. Either way the study folder holds the
same files, so a study started one way can be resumed the other.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import traceback
from pathlib import Path

import numpy as np
import torch

from .. import config as configlib
from ..atomic import atomic_write_bytes, atomic_write_text
from ..data.registry import load
from ..errors import ConfigError, RunError, UserError, WriteError
from ..lock import locked
from ..training import rundir
from ..training.device import pick_device
from ..training.loop import Run, train
from ..training.targets import TeacherTargets
from ..training.teachers import Preprocess
from . import cluster
from .grid import Condition, expand, group_key, teacher_config
from .results import write_results
from .worker import Unit

LOGITS_CACHE = "teacher_logits.pt"


def prepare(study: Path, cfg: dict, force: bool) -> None:
    """Create ``study`` or check it holds the same config; with ``force``, drop what a
    changed config made stale (runs and the teacher whose config differs, caches, and
    unfinished groups)."""
    text = configlib.dumps(cfg)
    path = study / "study.toml"
    if path.exists() and _what_runs(path.read_text()) != _what_runs(text):
        if not force:
            raise RunError(f"{study} holds a study with a different config; use --force to redo it "
                           f"(runs whose own config is unchanged are kept)")
        for name in (LOGITS_CACHE, "teacher_test.npz", "teacher.json", "results.csv"):
            (study / name).unlink(missing_ok=True)
        shutil.rmtree(study / "groups", ignore_errors=True)
        wanted = {c.name: configlib.run_text(c.cfg) for c in expand(cfg)}
        wanted["teacher"] = configlib.run_text(teacher_config(cfg))
        for run in [study / "teacher", *sorted((study / "runs").glob("*"))]:
            stored = run / rundir.CONFIG
            if run.is_dir() and (not stored.exists() or wanted.get(run.name) != stored.read_text()):
                shutil.rmtree(run)
    study.mkdir(parents=True, exist_ok=True)
    for folder in (study, study / "runs", study / "groups"):
        rundir.recover(folder)  # a driver killed while it replaced a run directory
    atomic_write_text(path, text)


# How a study's runs are scheduled, not what they are: a study started one way resumes
# another way (in this process, fused, on Ray) without --force.
EXECUTION_KEYS = ("fused", "workers", "executor", "ray_address", "cpus_per_run", "gpus_per_run", "retries")


def _what_runs(text: str) -> str | None:
    """A study config's text without the `EXECUTION_KEYS`, keys it lacks at their
    defaults; ``None`` for a config that no longer reads."""
    try:
        cfg = configlib.merge(configlib.defaults(), configlib.tomllib.loads(text))
    except (ConfigError, configlib.tomllib.TOMLDecodeError):
        return None
    for key in EXECUTION_KEYS:
        cfg["study"].pop(key, None)
    return configlib.dumps(cfg)


def ensure_teacher(study: Path, cfg: dict, data, progress: bool) -> Path:
    """The teacher run: ``teacher.run`` if given, else trained (or resumed) in ``STUDY/teacher``."""
    if cfg["teacher"]["run"]:
        return Path(cfg["teacher"]["run"])
    run = study / "teacher"
    if rundir.read_summary(run) is None:
        train([Run(teacher_config(cfg), run)], data, resume=True, progress=progress)
    return run


def given_teacher(study: Path, cfg: dict, data, device) -> TeacherTargets:
    """``teacher.run`` (a run or a teacher file), checked and its logits computed, or read
    from the study's cache when it matches: a bad teacher stops the study before its
    folder is touched."""
    targets = TeacherTargets.from_path(cfg["teacher"]["run"], data, cfg["teacher"],
                                       augment=cfg["data"]["augment"] != "none")
    if not targets.read_cache(study / LOGITS_CACHE):
        targets.evaluate(device)
    return targets


def study_targets(study: Path, run: Path, data, device, targets: TeacherTargets | None = None) -> TeacherTargets:
    """The study's teacher targets (``targets``, or the run ``run``'s), their logits cached
    in ``STUDY/teacher_logits.pt``; writes ``teacher_test.npz`` and ``teacher.json`` for
    the report."""
    targets = (TeacherTargets.from_path(run, data) if targets is None else targets).cached(study / LOGITS_CACHE,
                                                                                           device)
    test = targets.test_logits()
    buf = io.BytesIO()
    np.savez(buf, logits=test.numpy(), labels=data.y_test.numpy(), class_names=np.array(data.class_names))
    atomic_write_bytes(study / "teacher_test.npz", buf.getvalue())
    summary = (rundir.read_summary(run) if targets.kind == "run" else None) or {}
    atomic_write_text(study / "teacher.json", json.dumps({
        "run": str(run), "model": getattr(targets.model, "arch", ""),
        "val_best_acc": summary.get("val_best_acc"), **targets.describe(),
    }, indent=2) + "\n")
    return targets


def _train_recorded(conds: list[Condition], study: Path, data, targets, *, group_dir=None,
                    progress: bool) -> None:
    """Train ``conds`` (one run, or one fused group); a failure is written to each run's
    ``error.txt`` and does not stop the study."""
    runs = [Run(c.cfg, study / "runs" / c.name) for c in conds]
    try:
        train(runs, data, targets, group_dir=group_dir, resume=True, progress=progress)
    except (KeyboardInterrupt, WriteError):  # a failing disk stops the study
        raise
    except Exception as e:  # a failed run must not stop the others
        detail = "" if isinstance(e, UserError) else traceback.format_exc()
        for r in runs:
            rundir.write_error(r.out, e, detail)


def run_one(cond: Condition, study: Path, data, targets, progress: bool) -> None:
    """Train (or resume) one condition unless it finished."""
    out = study / "runs" / cond.name
    if rundir.read_summary(out) is None:
        (out / rundir.ERROR).unlink(missing_ok=True)
        _train_recorded([cond], study, data, targets, progress=progress)


def unfinished_groups(conds: list[Condition], study: Path) -> list[tuple[list[Condition], str]]:
    """The grid's fused groups (`group_key`: one per seed) with an unfinished member, each
    with its folder inside the study (``groups/s<seed>``). A group with any unfinished
    member trains as the whole group, so it always matches its checkpoint (a kill between
    two members' summaries must not leave a smaller group to start over)."""
    groups: dict[str, list[Condition]] = {}
    for c in conds:
        groups.setdefault(group_key(c), []).append(c)
    one_per_seed = len(groups) == len({m[0].seed for m in groups.values()})
    return [(members, f"groups/s{members[0].seed}" if one_per_seed else f"groups/s{members[0].seed}-{i}")
            for i, members in enumerate(groups.values())
            if any(rundir.read_summary(study / "runs" / c.name) is None for c in members)]


def run_groups(conds: list[Condition], study: Path, data, targets, *, progress: bool, on_done) -> None:
    """Train the grid's unfinished fused groups one after another in this process."""
    todo = unfinished_groups(conds, study)
    for i, (members, folder) in enumerate(todo):
        if progress:
            print(f"[group {i + 1}/{len(todo)}] seed {members[0].seed}: {len(members)} students fused", flush=True)
        _train_recorded(members, study, data, targets, group_dir=study / folder, progress=progress)
        on_done()


def fuses(cfg: dict, device: torch.device) -> bool:
    """``study.fused``: ``"auto"`` fuses on CUDA only (Ray tasks: those with GPUs); on
    the 2-core CPU dev box a fused group trains slower per student than one model
    (``qdistill bench --scaling``)."""
    fused = cfg["study"]["fused"]
    return device.type == "cuda" if fused == "auto" else fused


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


def _teacher_bundle(targets: TeacherTargets, cfg: dict, study: Path, given: bool) -> dict:
    """The teacher as values for Ray workers: its files, how it was opened, its cache."""
    path = Path(targets.source)
    files = ({name: (path / name).read_bytes() for name in (rundir.CONFIG, rundir.BEST, rundir.SUMMARY)}
             if path.is_dir() else {path.name: path.read_bytes()})
    return {"files": files, "is_run": path.is_dir(), "name": path.name or "teacher",
            "section": cfg["teacher"] if given else None, "augment": cfg["data"]["augment"] != "none",
            "source": targets.source, "file": targets.file, "cache": (study / LOGITS_CACHE).read_bytes()}


@contextlib.contextmanager
def _threads(n: int):
    """torch's CPU threads for an in-process study: ``study.cpus_per_run``, as a Ray task
    gets (0: leave them). Sums split across threads round differently, so equal threads
    are what makes a local study's metrics equal a Ray study's."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield None
    finally:
        torch.set_num_threads(before)


def run_study(cfg: dict, study: str | Path, *, force: bool = False, workers: int | None = None,
              fused: bool | None = None, progress: bool = True, allow_weak_teacher: bool = False) -> dict:
    """Run every condition of the study (skipping finished runs, resuming unfinished
    ones) and write ``results.csv``. Returns ``{"rows", "failed"}``. The study folder is
    locked meanwhile; a teacher not clearly above chance stops it before any student
    trains, unless ``allow_weak_teacher`` or ``study.allow_weak_teacher``. ``workers``
    overrides ``study.workers``; the runs train here or as Ray tasks (`on_ray`)."""
    study = Path(study)
    if workers is not None:
        cfg = {**cfg, "study": {**cfg["study"], "workers": workers}}
    if not cfg["teacher"]["run"] and not Preprocess(cfg["teacher"]).is_default:
        raise ConfigError("[teacher] input_range, mean, std, layout and input_size describe a teacher file given "
                          "as teacher.run; the teacher a study trains takes the data as it is")
    plan = _ray_plan(cfg) if on_ray(cfg) else None
    if plan:
        cluster.import_ray()
    device = pick_device(cfg["train"]["device"])
    data = load(cfg["data"])
    given = given_teacher(study, cfg, data, device) if cfg["teacher"]["run"] else None
    if given:
        given.check_useful(allow_weak_teacher or cfg["study"]["allow_weak_teacher"])
    threads = cfg["study"]["cpus_per_run"]
    with locked(study, "study"), (cluster.session(*plan[:2]) if plan else _threads(threads)) as ray:
        return _run_study(cfg, study, data, device, given, ray, plan, force=force, fused=fused,
                          progress=progress, allow_weak_teacher=allow_weak_teacher)


def _run_study(cfg: dict, study: Path, data, device, given, ray, plan, *, force, fused, progress,
               allow_weak_teacher) -> dict:
    if ray:  # a request no node can meet stops the study before its folder is written
        cpus, gpus = cluster.resources(ray, plan[2], cfg["study"]["gpus_per_run"])
        tasks = dict(cpus=cpus, gpus=gpus, retries=cfg["study"]["retries"], progress=progress)
    prepare(study, cfg, force)
    if ray and not cfg["teacher"]["run"] and rundir.read_summary(study / "teacher") is None:
        cluster.run_units(ray, study, [Unit("teacher", ((teacher_config(cfg), "teacher"),))], data, None, **tasks)
        if rundir.read_summary(study / "teacher") is None:
            raise RunError(f"the study's teacher did not finish: {rundir.read_error(study / 'teacher')}")
    teacher_run = ensure_teacher(study, cfg, data, progress)
    targets = study_targets(study, teacher_run, data, device, given)
    targets.check_useful(allow_weak_teacher or cfg["study"]["allow_weak_teacher"])
    conds = expand(cfg)
    (study / "runs").mkdir(exist_ok=True)
    write_results(study, conds)

    todo = [c for c in conds if rundir.read_summary(study / "runs" / c.name) is None]
    where = torch.device("cuda" if tasks["gpus"] > 0 else "cpu") if ray else device  # the tasks' device
    grouped = todo and (fuses(cfg, where) if fused is None else fused)
    if todo and ray:
        units = ([Unit(folder, tuple((c.cfg, f"runs/{c.name}") for c in members), folder)
                  for members, folder in unfinished_groups(conds, study)] if grouped else
                 [Unit(c.name, ((c.cfg, f"runs/{c.name}"),)) for c in todo])
        cluster.run_units(ray, study, units, data, _teacher_bundle(targets, cfg, study, given is not None),
                          on_done=lambda: write_results(study, conds), **tasks)
    elif grouped:
        run_groups(conds, study, data, targets, progress=progress, on_done=lambda: write_results(study, conds))
    else:
        for i, cond in enumerate(todo):
            if progress:
                print(f"[{i + 1}/{len(todo)}] {cond.name}", flush=True)
            run_one(cond, study, data, targets, progress)
            write_results(study, conds)

    rows = write_results(study, conds)
    return {"rows": rows, "failed": [r["run"] for r in rows if r["status"] != "ok"]}
