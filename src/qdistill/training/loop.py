"""The training loop: one function trains a teacher, one student, or a fused group of K
students into their run directories.

Read `train` top to bottom: set-up, resume, the epochs (train, evaluate, write), the
summaries. Each piece is a short function below it. K = 1 is the ordinary run
(`qdistill.nn.fused.Solo`); K > 1 trains the members as one `FusedStudents` network on
the same batches. Every write is atomic, so a killed run resumes from its last
checkpoint and reaches exactly the metrics of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import functools
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .. import config as configlib
from ..data.batching import batches
from ..errors import RunError
from ..lock import locked
from ..nn.fused import group
from ..nn import KD_DEFAULTS
from ..nn.losses import build_loss
from . import checkpoint
from .device import autocast_for, deterministic, pick_device, restore_rng, rng_state, sync, threads
from .evaluate import accuracy, predict
from . import compiled
from .averaging import Average
from .optim import make_optimizer, set_lr
from .rundir import RunDir
from .scalars import Scalars
from .probes import grad_ratio, probe_batch, split
from .step import train_step
from .summary import summarize
from .teacher import Teacher


class Diverged(RunError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    """One run the loop trains: its resolved config and its run directory."""
    cfg: dict
    out: RunDir

    def __post_init__(self):
        self.out = RunDir(self.out)

    @property
    def name(self) -> str:
        return self.out.name


@dataclass(frozen=True)
class Remote:
    """A run trained for someone else (a Ray worker): the node named in each epoch's
    metrics and the summary, and what to call once an epoch's files are all written."""
    node: str
    on_epoch: Callable[[], None]


@dataclass
class Member:
    """One model of the network being trained, and everything the loop tracks for it."""
    run: Run
    loss: Callable
    meta: dict                      # how to rebuild the model (`checkpoint.model_meta`)
    prints: dict                    # the pairing hashes: initial weights, split, batch order
    metrics: list = field(default_factory=list)  # one row per finished epoch
    best: dict = field(default_factory=lambda: {"val": -1.0, "epoch": 0, "test": float("nan")})
    grad_init: float | None = None  # the gradient ratio at initialisation (`probes.grad_ratio`)

    @property
    def name(self) -> str:
        return self.run.name

    def record(self) -> dict:
        """The member as its checkpoint stores it."""
        return {"name": self.name, "config": configlib.run_text(self.run.cfg), "meta": self.meta,
                "best": self.best, "metrics": self.metrics, "prints": self.prints, "grad_init": self.grad_init}


@dataclass(kw_only=True)
class Session:
    """Everything one call of `train` works with, each part named where it is built."""
    members: list[Member]
    state: RunDir                   # holds checkpoint.pt: the run's folder, or the group's
    resumes: bool                   # whether the checkpoint there is continued
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    average: Average | None         # the weight average (train.ema), or None
    data: object
    splits: dict                    # "train", "val", "test": (x, y), x on the device
    device: torch.device
    autocast: object                # the forward pass's precision context
    teacher: Teacher | None
    teacher_for: Callable           # (idx, xb) -> the batch's teacher logits or None
    rng: dict                       # generators: "order" (batch order), "aug" (augmentation)
    probe: tuple                    # (x, y, teacher logits or None): the gradient ratio's fixed batch
    step: Callable = train_step     # one optimizer step: eager, or a `compiled.CompiledStep`
    board: Scalars | None = None
    progress: bool = True
    remote: Remote = Remote("", lambda: None)

    @property
    def cfg(self) -> dict:
        return self.members[0].run.cfg

    @property
    def label(self) -> str:
        return self.members[0].name if len(self.members) == 1 else self.state.name


def train(runs, data, teacher: Teacher | None = None, *, group_dir: str | Path | None = None,
          existing: str = "new", progress: bool = True, remote: Remote | None = None) -> list[dict]:
    """Train ``runs`` (`Run` or ``(cfg, out)`` pairs) on ``data``; return their summaries.

    One run keeps its checkpoint in its run directory, with the rules of `RunDir.prepare`
    for a run already there (``existing``: new, resume, extend, force). Several runs (configs equal but for the loss, T and c)
    train as one fused group whose checkpoint lives in ``group_dir`` and is resumed when
    it holds the same members and configs. Distillation targets come from ``teacher``.
    """
    runs = [r if isinstance(r, Run) else Run(*r) for r in runs]
    state = RunDir(group_dir) if len(runs) > 1 else runs[0].out
    board = Scalars([r.out.path for r in runs], runs[0].cfg["train"]["tensorboard"])
    with contextlib.ExitStack() as held:  # one command at a time trains into a folder
        for folder in [r.out.path for r in runs] + ([state.path] if len(runs) > 1 else []):
            held.enter_context(locked(folder, "run directory"))
        held.enter_context(board)
        t = runs[0].cfg["train"]
        held.enter_context(threads(t["threads"]))
        device = pick_device(t["device"])
        held.enter_context(deterministic(device, t["deterministic"]))  # the global flags, restored at the end
        s = _set_up(runs, data, teacher, state, existing, device)
        s.board, s.progress, s.remote = board, progress, remote or Remote(platform.node(), lambda: None)
        start = _resume(s) if s.resumes else 0
        for m in s.members:  # set-up succeeded: now the run directories are written
            m.run.out.start(m.run.cfg, member=len(runs) > 1)
        wall0 = time.perf_counter() - sum(row["wall_s"] for row in s.members[0].metrics)
        for epoch in range(start, s.cfg["train"]["epochs"]):
            _epoch(s, epoch)
        return _finish(s, time.perf_counter() - wall0)


# ---------------------------------------------------------------- set-up and resume

def _loss(cfg: dict):
    if cfg["run"]["role"] == "teacher":
        return build_loss("hard")  # a teacher trains with plain cross-entropy
    s = cfg["student"]
    return build_loss(s["loss"], s["temperature"], configlib.loss_c(s), kd=s["kd"], **{k: s[k] for k in KD_DEFAULTS})


def _warmed(m: "Member", epoch: int):
    """The member's loss at 0-based ``epoch``: with ``student.kd_warmup = W`` its soft term
    weighs ``min(1, (epoch + 1) / W)`` (mdistiller's linear warm-up of DKD)."""
    w = m.run.cfg["student"]["kd_warmup"] if m.run.cfg["run"]["role"] == "student" else 0
    return m.loss if not w or epoch + 1 >= w else functools.partial(m.loss, soft_weight=(epoch + 1) / w)


def _members(runs: list[Run], data, teacher: Teacher | None) -> list[Member]:
    """One `Member` per run. Paired design: the seed alone fixes the initial weights (and,
    in `_set_up`, the validation split and the batch order), whatever the loss or T."""
    cfg = runs[0].cfg
    if any(configlib.without_loss(r.cfg) != configlib.without_loss(cfg) for r in runs):
        raise ValueError("fused members must share every setting but the loss, T and c")
    members = []
    for r in runs:
        fn = _loss(r.cfg)
        if fn.needs_teacher and teacher is None:
            raise RunError(f"loss {fn.loss_name} needs a teacher (--teacher RUN)")
        members.append(Member(r, fn, checkpoint.model_meta(r.cfg, data.num_classes, data.class_names), {}))
    return members


def _set_up(runs: list[Run], data, teacher: Teacher | None, state: RunDir, existing: str,
            device: torch.device) -> Session:
    """Check the folders, build the models, put the data on the device, make the
    optimizer; nothing is written yet."""
    cfg, t = runs[0].cfg, runs[0].cfg["train"]
    members = _members(runs, data, teacher)
    models = []  # built before the folder is checked: a model that fails to build deletes nothing
    for m in members:
        torch.manual_seed(t["seed"])
        models.append(checkpoint.build_from_meta(m.meta))
    resumes = (state.prepare(cfg, existing) if len(runs) == 1 else
               state.group_resumes([(r.name, configlib.run_text(r.cfg)) for r in runs]))
    train_idx, val_idx = split(data, cfg)
    # Recorded so a study can prove its pairing: same seed, same start, same split, same order.
    for m, model in zip(members, models):
        m.prints.update(init_sha256=checkpoint.state_sha256(model.state_dict()),
                        val_split_sha256=checkpoint.tensor_sha256(val_idx))
    # channels_last: faster convolutions on CPU (README, Performance) and on tensor cores.
    net = group(models).to(device).to_channels_last()
    # each split moved once, indexed on the CPU: no second copy of the training set on the device
    splits = {"train": (data.x_train[train_idx].to(device), data.y_train[train_idx].to(device)),
              "val": (data.x_train[val_idx].to(device), data.y_train[val_idx]),
              "test": (data.x_test.to(device), data.y_test)}
    autocast = autocast_for(device, t["precision"])
    opt = make_optimizer(net.parameters(), cfg)
    probe = probe_batch(data, teacher, train_idx, device)
    if not resumes:  # the gradient ratio at initialisation: an eval-mode pass draws no random numbers
        x, y, targets = probe
        for m, z in zip(members, predict(net, x, device)):
            m.grad_init = grad_ratio(m.loss, z, targets, y)
    average = Average(net, t["ema"]) if t["ema"] else None
    images = t["epochs"] * len(train_idx) * len(members)
    rng = {"order": torch.Generator().manual_seed(t["seed"] + 1), "aug": torch.Generator().manual_seed(t["seed"] + 2)}
    return Session(members=members, state=state, resumes=resumes, net=net, opt=opt, average=average, data=data,
                   splits=splits, device=device, autocast=autocast, teacher=teacher, rng=rng, probe=probe,
                   teacher_for=_teacher_for(members, teacher, train_idx, cfg, device),
                   step=compiled.CompiledStep() if compiled.wanted(cfg, images, device) else train_step)


def _teacher_for(members, teacher, train_idx, cfg, device) -> Callable:
    """``targets(idx, xb)``: the teacher's logits for a batch, or ``None`` when no
    member's loss needs them."""
    if not any(m.loss.needs_teacher for m in members):
        return lambda idx, xb: None
    return teacher.batch_targets(train_idx, augment=cfg["data"]["augment"] != "none", device=device)


def _resume(s: Session) -> int:
    """Restore the state of the checkpoint; return the epoch to continue from."""
    ck = checkpoint.load(s.state.checkpoint)
    s.net.load_state_dict(ck["model"])
    s.opt.load_state_dict(ck["optimizer"])
    if s.average:
        s.average.load_state_dict(ck["average"])
    torch.set_rng_state(ck["rng"]["torch"])
    restore_rng(ck["rng"].get("cuda"), s.device)
    for key in ("order", "aug"):
        s.rng[key].set_state(ck["rng"][key])
    for m, stored in zip(s.members, ck["members"]):
        m.best, m.metrics, m.prints = stored["best"], stored["metrics"], stored["prints"]
        m.grad_init = stored.get("grad_init")
    return ck["epoch"]


def _checkpoint(s: Session, model_state: dict, opt_state: dict, members: list[Member], average=None) -> dict:
    return {"epoch": len(s.members[0].metrics), "model": model_state, "optimizer": opt_state,
            "average": average if average is not None else s.average and s.average.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "order": s.rng["order"].get_state(),
                    "aug": s.rng["aug"].get_state(),
                    "cuda": rng_state(s.device)},
            "members": [m.record() for m in members]}


# ---------------------------------------------------------------- one epoch

def _epoch(s: Session, epoch: int) -> None:
    """Train one epoch, evaluate, write every file, tell the caller."""
    t0 = time.perf_counter()
    lr = set_lr(s.opt, s.cfg, epoch * _steps_per_epoch(s), _steps_per_epoch(s))  # the epoch's first rate
    losses, correct, seen = _train_epoch(s, epoch)
    sync(s.device)
    train_s = time.perf_counter() - t0
    evaluated = s.average.network(s.net) if s.average else s.net
    improved = _evaluate(s, evaluated, epoch, {"loss": losses, "correct": correct, "seen": seen, "lr": lr,
                                               "train_s": train_s, "t0": t0})
    _write(s, evaluated, improved)
    s.remote.on_epoch()
    if s.progress:
        tqdm.write(_epoch_line(s, epoch, seen * len(s.members) / train_s))


def _train_epoch(s: Session, epoch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The epoch's steps: per member the summed loss and the correct count, kept on the
    device (the loop never waits for the device within an epoch), and the images seen."""
    k, t = len(s.members), s.cfg["train"]
    loss_sum = torch.zeros(k, device=s.device)
    correct = torch.zeros(k, device=s.device, dtype=torch.long)
    # the first non-finite loss (step, value) per member, also on the device
    bad_step = torch.full((k,), -1, device=s.device, dtype=torch.long)
    bad_loss = torch.zeros(k, device=s.device)
    seen, first_order, t0 = 0, [], time.perf_counter()
    x, y = s.splits["train"]
    losses = [_warmed(m, epoch) for m in s.members]
    bar = tqdm(batches(x, y, t["batch_size"], generator=s.rng["order"], augment=s.cfg["data"]["augment"],
                       aug_generator=s.rng["aug"], device=s.device),
               total=_steps_per_epoch(s), desc=f"{s.label} {epoch + 1}/{t['epochs']}",
               disable=None if s.progress else True, leave=False, unit="batch")  # None: a terminal only
    steps = _steps_per_epoch(s)
    for step, (xb, yb, idx) in enumerate(bar):
        if epoch == 0:
            first_order.append(idx)
        set_lr(s.opt, s.cfg, epoch * steps + step, steps)
        member_loss, z = s.step(s.net, s.opt, xb, yb, s.teacher_for(idx, xb), losses, s.autocast)
        if s.average:
            s.average.update()
        new_bad = (bad_step < 0) & ~torch.isfinite(member_loss)
        bad_step = torch.where(new_bad, step, bad_step)
        bad_loss = torch.where(new_bad, member_loss, bad_loss)
        loss_sum += member_loss * len(yb)
        correct += (z.argmax(2) == yb).sum(1)
        seen += len(yb)
        if s.progress and step % 10 == 0:  # host-side figures only: no device sync
            bar.set_postfix(img_s=f"{k * seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    _check_finite(s, epoch, bad_step, bad_loss)
    if epoch == 0:
        for m in s.members:
            m.prints["batch_order_sha256"] = checkpoint.tensor_sha256(torch.cat(first_order))
    return loss_sum, correct, seen


def _check_finite(s: Session, epoch: int, bad_step: torch.Tensor, bad_loss: torch.Tensor) -> None:
    diverged = [(m.name, step, bad_loss[j].item()) for j, (m, step) in enumerate(zip(s.members, bad_step.tolist()))
                if step >= 0]
    if diverged:
        last = s.state.checkpoint if epoch else "none (no epoch finished)"
        raise Diverged(f"loss became {diverged[0][2]} for {', '.join(d[0] for d in diverged)} at epoch "
                       f"{epoch + 1}, step {diverged[0][1] + 1}; the last good checkpoint is {last}")


def _steps_per_epoch(s: Session) -> int:
    return math.ceil(len(s.splits["train"][1]) / s.cfg["train"]["batch_size"])


def _evaluate(s: Session, net, epoch: int, stats: dict) -> list[int]:
    """Append each member's metrics row (``net``: the live network or its average);
    return the members whose validation improved."""
    (x_val, y_val), (x_test, y_test) = s.splits["val"], s.splits["test"]
    val, test = predict(net, x_val, s.device), predict(net, x_test, s.device)
    k, seen, improved = len(s.members), stats["seen"], []
    for j, m in enumerate(s.members):
        row = {"epoch": epoch + 1, "train_loss": stats["loss"][j].item() / seen,
               "train_acc": stats["correct"][j].item() / seen, "val_acc": accuracy(val[j], y_val),
               "test_acc": accuracy(test[j], y_test), "lr": stats["lr"], "img_per_s": seen / stats["train_s"],
               "wall_s": time.perf_counter() - stats["t0"], "node": s.remote.node,
               **({"fused_k": k} if k > 1 else {})}
        m.metrics.append(row)
        # val_acc is NaN without a validation split: then the last epoch is "best".
        if not row["val_acc"] <= m.best["val"]:
            m.best = {"val": row["val_acc"], "epoch": epoch + 1, "test": row["test_acc"]}
            improved.append(j)
    return improved


def _write(s: Session, evaluated, improved: list[int]) -> None:
    """best.pt, the event files (a resume purges their points past the checkpoint), then
    the checkpoint that points at best.pt, then metrics.jsonl (which a resume rewrites
    from the checkpoint): whatever a kill interrupts, the files agree."""
    models = evaluated.split() if improved else []
    for j in improved:
        m = s.members[j]
        checkpoint.save({"model": models[j].state_dict(), "meta": m.meta}, m.run.out.best)
    for j, m in enumerate(s.members):
        s.board.write(j, m.metrics[-1])
    checkpoint.save(_checkpoint(s, s.net.state_dict(), s.opt.state_dict(), s.members), s.state.checkpoint)
    for m in s.members:
        m.run.out.write_metrics(m.metrics)


def _epoch_line(s: Session, epoch: int, student_img_s: float) -> str:
    head = f"{s.label} epoch {epoch + 1}/{s.cfg['train']['epochs']}: "
    if len(s.members) > 1:
        return head + "val " + " ".join(f"{m.metrics[-1]['val_acc']:.3f}" for m in s.members) + \
            f" ({student_img_s:.0f} student img/s)"
    r = s.members[0].metrics[-1]
    return head + (f"loss {r['train_loss']:.4f} train {r['train_acc']:.4f} val {r['val_acc']:.4f} "
                   f"test {r['test_acc']:.4f} ({r['img_per_s']:.0f} img/s)")


# ---------------------------------------------------------------- finish

def _finish(s: Session, wall_s: float) -> list[dict]:
    """Each member becomes an ordinary finished run: a one-member checkpoint (its own
    slice of the optimizer state), then its summary."""
    k, opt_state, summaries = len(s.members), s.opt.state_dict(), []
    averaged = s.average.network(s.net).split() if s.average else None
    for j, (m, model) in enumerate(zip(s.members, s.net.split())):
        if k > 1:
            average = averaged and {"updates": s.average.updates, "state": averaged[j].state_dict()}
            checkpoint.save(_checkpoint(s, model.state_dict(), s.net.split_optimizer_state(opt_state, j), [m],
                                        average), m.run.out.checkpoint)
        summaries.append(summarize(s, m, model, wall_s))
    return summaries
