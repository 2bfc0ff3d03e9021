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
``"auto"`` fuses on CUDA only), or in worker processes (``--workers``).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
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
from .grid import Condition, expand, group_key, teacher_config
from .results import write_results

LOGITS_CACHE = "teacher_logits.pt"


def prepare(study: Path, cfg: dict, force: bool) -> None:
    """Create ``study`` or check it holds the same config; with ``force``, drop what a
    changed config made stale (runs and the teacher whose config differs, caches, and
    unfinished groups)."""
    text = configlib.dumps(cfg)
    path = study / "study.toml"
    if path.exists() and path.read_text() != text:
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
    atomic_write_text(path, text)


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


def run_groups(conds: list[Condition], study: Path, data, targets, *, progress: bool, on_done) -> None:
    """Train the grid's conditions as fused groups (`group_key`: one per seed), each with
    its checkpoint in ``STUDY/groups/``. A group with any unfinished member trains as the
    whole group, so it always matches its checkpoint (a kill between two members' summaries
    must not leave a smaller group to start over); finished groups are skipped."""
    groups: dict[str, list[Condition]] = {}
    for c in conds:
        groups.setdefault(group_key(c), []).append(c)
    one_per_seed = len(groups) == len({m[0].seed for m in groups.values()})
    for i, members in enumerate(groups.values()):
        if all(rundir.read_summary(study / "runs" / c.name) is not None for c in members):
            continue
        seed = members[0].seed
        gdir = study / "groups" / (f"s{seed}" if one_per_seed else f"s{seed}-{i}")
        if progress:
            print(f"[group {i + 1}/{len(groups)}] seed {seed}: {len(members)} students fused", flush=True)
        _train_recorded(members, study, data, targets, group_dir=gdir, progress=progress)
        on_done()


_WORKER = {}


def _init_worker(counter) -> None:
    """Give each worker process its own GPU (round robin) when there are several."""
    with counter.get_lock():
        _WORKER["id"] = counter.value
        counter.value += 1
    if torch.cuda.is_available():
        torch.cuda.set_device(_WORKER["id"] % torch.cuda.device_count())


def _worker(payload) -> str:
    cond, study, data_section, teacher_run, threads = payload
    torch.set_num_threads(threads)
    data = load(data_section)
    targets = TeacherTargets.from_path(teacher_run, data, cond.cfg["teacher"]).cached(study / LOGITS_CACHE)
    run_one(cond, study, data, targets, progress=False)
    return cond.name


def fuses(cfg: dict, device: torch.device) -> bool:
    """``study.fused``: ``"auto"`` fuses on CUDA only; on the 2-core CPU dev box a fused
    group trains slower per student than one model (``qdistill bench --scaling``)."""
    fused = cfg["study"]["fused"]
    return device.type == "cuda" if fused == "auto" else fused


def run_study(cfg: dict, study: str | Path, *, force: bool = False, workers: int | None = None,
              fused: bool | None = None, progress: bool = True, allow_weak_teacher: bool = False) -> dict:
    """Run every condition of the study (skipping finished runs, resuming unfinished
    ones) and write ``results.csv``. Returns ``{"rows", "failed"}``. The study folder is
    locked meanwhile; a teacher not clearly above chance stops it before any student
    trains, unless ``allow_weak_teacher`` or ``study.allow_weak_teacher``."""
    study = Path(study)
    if not cfg["teacher"]["run"] and not Preprocess(cfg["teacher"]).is_default:
        raise ConfigError("[teacher] input_range, mean, std, layout and input_size describe a teacher file given "
                          "as teacher.run; the teacher a study trains takes the data as it is")
    device = pick_device(cfg["train"]["device"])
    data = load(cfg["data"])
    given = given_teacher(study, cfg, data, device) if cfg["teacher"]["run"] else None
    if given:
        given.check_useful(allow_weak_teacher or cfg["study"]["allow_weak_teacher"])
    with locked(study, "study"):  # one study at a time on a folder
        return _run_study(cfg, study, data, device, given, force=force, workers=workers, fused=fused,
                          progress=progress, allow_weak_teacher=allow_weak_teacher)


def _run_study(cfg: dict, study: Path, data, device, given, *, force, workers, fused, progress,
               allow_weak_teacher) -> dict:
    prepare(study, cfg, force)
    teacher_run = ensure_teacher(study, cfg, data, progress)
    targets = study_targets(study, teacher_run, data, device, given)
    targets.check_useful(allow_weak_teacher or cfg["study"]["allow_weak_teacher"])
    conds = expand(cfg)
    (study / "runs").mkdir(exist_ok=True)
    write_results(study, conds)

    workers = workers or cfg["study"]["workers"] or (max(1, torch.cuda.device_count()) if device.type == "cuda"
                                                     else 1)
    todo = [c for c in conds if rundir.read_summary(study / "runs" / c.name) is None]
    if todo and (fuses(cfg, device) if fused is None else fused):
        run_groups(conds, study, data, targets, progress=progress, on_done=lambda: write_results(study, conds))
    elif todo and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        payloads = [(c, study, cfg["data"], teacher_run, threads) for c in todo]
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(ctx.Value("i", 0),)) as pool:
            for _ in pool.imap_unordered(_worker, payloads):
                write_results(study, conds)
    else:
        for i, cond in enumerate(todo):
            if progress:
                print(f"[{i + 1}/{len(todo)}] {cond.name}", flush=True)
            run_one(cond, study, data, targets, progress)
            write_results(study, conds)

    rows = write_results(study, conds)
    return {"rows": rows, "failed": [r["run"] for r in rows if r["status"] != "ok"]}
