"""The temperature study: the grid of runs, their pairing, scheduling and ``results.csv``.

A study expands to Q1 ``hard``; Q2 ``soft`` x T; Q3 ``hard+soft`` x T; Q4
``hard+softgt`` x T; each x seeds. Layout of ``STUDY/``:

* ``study.toml``           the resolved config; a different config is refused without ``--force``
* ``teacher/``             the teacher run (unless ``teacher.run`` names one)
* ``teacher.json``         the teacher's path and accuracies
* ``teacher_test.npz``     the teacher's test logits, labels and class names (for the report)
* ``teacher_logits.pt``    the teacher's train logits, keyed by a fingerprint of checkpoint and data
* ``runs/<question>-<loss>-T<T>-s<seed>/``  one run directory per condition
* ``results.csv``          one row per run
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as configlib
from .atomic import atomic_write, atomic_write_text
from .errors import RunError, UserError
from .results import COLUMNS

QUESTION_LOSS = {"q1": "hard", "q2": "soft", "q3": "hard+soft", "q4": "hard+softgt"}
@dataclass
class Condition:
    """One run of the grid: its name, question, loss, temperature, c, seed and full config."""
    name: str
    question: str
    loss: str
    temperature: float
    c: float | None
    seed: int
    cfg: dict


def expand(cfg: dict) -> list[Condition]:
    """The study's runs, ordered by seed, then question, then temperature."""
    st = cfg["study"]
    out = []
    for seed in st["seeds"]:
        for q in configlib.QUESTIONS:
            if q not in st["questions"]:
                continue
            loss = QUESTION_LOSS[q]
            temps = [1.0] if q == "q1" else st["temperatures"]
            for T in temps:
                c = None if q in ("q1", "q2") else (float(st["c"]) if "c" in st else T * T)
                run_cfg = copy.deepcopy(cfg)
                del run_cfg["study"]
                run_cfg["run"]["role"] = "student"
                s = run_cfg["student"]
                s["loss"], s["temperature"] = loss, float(T)
                s.pop("c", None)
                if c is not None:
                    s["c"] = c
                run_cfg["train"]["seed"] = seed
                out.append(Condition(f"{q}-{loss}-T{T:g}-s{seed}", q, loss, float(T), c, seed, run_cfg))
    return out


def teacher_config(cfg: dict) -> dict:
    tcfg = copy.deepcopy(cfg)
    del tcfg["study"]
    tcfg["run"]["role"] = "teacher"
    # The teacher knows nothing of its students: a changed student must not retrain it.
    tcfg["student"] = copy.deepcopy(configlib.DEFAULTS["student"])
    if cfg["study"]["teacher_epochs"]:
        tcfg["train"]["epochs"] = cfg["study"]["teacher_epochs"]
    return tcfg


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(study: Path, cfg: dict, force: bool) -> None:
    """Create ``study`` or check it holds the same config; with ``force``, drop what a
    changed config made stale (runs and the teacher whose config differs, caches)."""
    text = configlib.dumps(cfg)
    path = study / "study.toml"
    if path.exists() and path.read_text() != text:
        if not force:
            raise RunError(f"{study} holds a study with a different config; use --force to redo it "
                           f"(runs whose own config is unchanged are kept)")
        for name in ("teacher_logits.pt", "teacher_test.npz", "teacher.json", "results.csv"):
            (study / name).unlink(missing_ok=True)
        wanted = {c.name: configlib.run_text(c.cfg) for c in expand(cfg)}
        wanted["teacher"] = configlib.run_text(teacher_config(cfg))
        for run in [study / "teacher", *sorted((study / "runs").glob("*"))]:
            stored = run / "config.toml"
            if run.is_dir() and (not stored.exists() or wanted.get(run.name) != stored.read_text()):
                shutil.rmtree(run)
    study.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def ensure_teacher(study: Path, cfg: dict, data, progress: bool) -> Path:
    """The teacher run: ``teacher.run`` if given, else trained (or resumed) in ``STUDY/teacher``."""
    from .runs import read_summary
    from .train import train
    if cfg["teacher"]["run"]:
        return Path(cfg["teacher"]["run"])
    run = study / "teacher"
    if read_summary(run) is None:
        train(teacher_config(cfg), run, data, resume=True, progress=progress)
    return run


def teacher_files(study: Path, run: Path, data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test logits of the teacher, cached under a fingerprint of the teacher's
    ``best.pt`` and of the data; a cache whose fingerprint differs is recomputed."""
    from .runs import load_teacher
    from .train import accuracy, predict
    from .runs import read_summary
    teacher = load_teacher(str(run), data).to(device)
    fingerprint = {"teacher": file_sha256(run / "best.pt"), "data": data.fingerprint}
    cache = study / "teacher_logits.pt"
    logits = None
    if cache.exists():
        try:
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if stored.get("fingerprint") == fingerprint:
                logits = stored["logits"]
        except Exception:
            logits = None  # unreadable: recompute
    if logits is None:
        logits = predict(teacher, data.x_train.to(device), device)
        test = predict(teacher, data.x_test.to(device), device)
        atomic_write(cache, lambda f: torch.save({"fingerprint": fingerprint, "logits": logits,
                                                  "test_logits": test}, f))
    else:
        test = stored["test_logits"]
    buf = io.BytesIO()
    np.savez(buf, logits=test.numpy(), labels=data.y_test.numpy(), class_names=np.array(data.class_names))
    atomic_write(study / "teacher_test.npz", lambda f: f.write(buf.getvalue()))
    summary = read_summary(run) or {}
    atomic_write_text(study / "teacher.json", json.dumps({
        "run": str(run), "model": teacher.arch if hasattr(teacher, "arch") else "",
        "val_best_acc": summary.get("val_best_acc"), "test_acc": accuracy(test, data.y_test),
    }, indent=2) + "\n")
    return logits, test


def run_one(cond: Condition, run_dir: Path, data, teacher_run: Path, train_logits, test_logits,
            progress: bool) -> None:
    """Train (or resume) one condition, recording a failure in ``error.txt``."""
    from .runs import load_teacher
    from .runs import read_summary
    from .train import train
    if read_summary(run_dir) is not None:
        return
    (run_dir / "error.txt").unlink(missing_ok=True)
    augment = cond.cfg["data"]["augment"] != "none"
    try:
        teacher = load_teacher(str(teacher_run), data) if augment else None
        train(cond.cfg, run_dir, data, teacher=teacher, teacher_logits=None if augment else train_logits,
              teacher_test_logits=test_logits, resume=True, progress=progress)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed run must not stop the others
        detail = "" if isinstance(e, UserError) else traceback.format_exc()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "error.txt", f"{type(e).__name__}: {e}\n{detail}")


_WORKER = {}


def _init_worker(counter) -> None:
    """Give each worker process its own GPU (round robin) when there are several."""
    with counter.get_lock():
        _WORKER["id"] = counter.value
        counter.value += 1
    if torch.cuda.is_available():
        torch.cuda.set_device(_WORKER["id"] % torch.cuda.device_count())


def _worker(payload) -> str:
    cond, run_dir, data_section, teacher_run, cache, threads = payload
    torch.set_num_threads(threads)
    from .data import load
    data = load(data_section)
    stored = torch.load(cache, map_location="cpu", weights_only=True)
    run_one(cond, run_dir, data, teacher_run, stored["logits"], stored["test_logits"], progress=False)
    return cond.name


def collect(study: Path, conds: list[Condition]) -> list[dict]:
    """One row per condition from its run directory; written to ``results.csv``."""
    rows = []
    for cond in conds:
        run = study / "runs" / cond.name
        row = {k: "" for k in COLUMNS}
        s = cond.cfg["student"]
        row.update(run=cond.name, question=cond.question, loss=cond.loss, temperature=cond.temperature,
                   c="" if cond.c is None else cond.c, seed=cond.seed, weight_bits=s["weight_bits"],
                   act_bits=s["act_bits"], grad_bits=s["grad_bits"], scheme=s["scheme"],
                   epochs=cond.cfg["train"]["epochs"])
        summary_path, error_path = run / "summary.json", run / "error.txt"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            for key in ("val_best_acc", "test_acc_at_val_best", "test_acc_last", "teacher_agreement",
                        "kl_to_teacher", "wall_s", "img_per_s"):
                row[key] = summary.get(key, "")
            row["status"] = "ok"
        elif error_path.exists():
            row["status"] = "failed"
            row["error"] = error_path.read_text().splitlines()[0]
        else:
            row["status"] = "pending"
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(study / "results.csv", buf.getvalue())
    return rows


def default_workers(device: torch.device) -> int:
    return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1


def run_study(cfg: dict, study: str | Path, *, force: bool = False, workers: int | None = None,
              fused: bool | None = None, progress: bool = True) -> dict:
    """Run every condition of the study (skipping finished runs, resuming unfinished
    ones) and write ``results.csv``. Returns ``{"rows", "failed"}``."""
    from .data import load
    from .train import pick_device
    study = Path(study)
    if study.exists() and not study.is_dir():
        raise RunError(f"study path {study} exists and is not a directory")
    prepare(study, cfg, force)
    device = pick_device(cfg["train"]["device"])
    data = load(cfg["data"])
    teacher_run = ensure_teacher(study, cfg, data, progress)
    train_logits, test_logits = teacher_files(study, teacher_run, data, device)
    conds = expand(cfg)
    (study / "runs").mkdir(exist_ok=True)
    collect(study, conds)

    workers = workers or cfg["study"]["workers"] or default_workers(device)
    fused = cfg["study"]["fused"] if fused is None else fused
    todo = [c for c in conds if not (study / "runs" / c.name / "summary.json").exists()]
    if fused and todo:
        from .fused_train import train_groups
        train_groups(todo, study, data, teacher_run, train_logits, test_logits, progress=progress,
                     on_done=lambda: collect(study, conds))
    elif workers > 1 and todo:
        threads = max(1, (os.cpu_count() or 1) // workers)
        payloads = [(c, study / "runs" / c.name, cfg["data"], teacher_run, study / "teacher_logits.pt", threads)
                    for c in todo]
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(ctx.Value("i", 0),)) as pool:
            for _ in pool.imap_unordered(_worker, payloads):
                collect(study, conds)
    else:
        for i, cond in enumerate(todo):
            if progress:
                print(f"[{i + 1}/{len(todo)}] {cond.name}", flush=True)
            run_one(cond, study / "runs" / cond.name, data, teacher_run, train_logits, test_logits, progress)
            collect(study, conds)

    rows = collect(study, conds)
    return {"rows": rows, "failed": [r["run"] for r in rows if r["status"] != "ok"]}

