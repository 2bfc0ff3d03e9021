"""The training loop: one function trains a teacher, one student, or a fused group of K
students into their run directories.

Read it top to bottom: set-up, resume, the epoch loop (train, evaluate, write), the
summaries. K = 1 is the ordinary run (`qdistill.nn.fused.Solo`); K > 1 trains the
members as one `FusedStudents` network on the same batches. Every write is atomic, so a
killed run resumes from its last checkpoint and reaches exactly the metrics of an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import config as configlib
from ..data.batching import batches, split_val
from ..errors import RunError
from ..lock import locked
from ..nn.fused import group
from ..nn.losses import build_loss
from ..nn.models import summary as model_summary
from . import checkpoint, rundir
from .device import autocast_for, pick_device, sync
from .evaluate import accuracy, per_class_accuracy, predict, teacher_agreement
from .optim import make_optimizer, make_scheduler
from .scalars import Scalars
from .step import train_step
from .targets import TeacherTargets


class Diverged(RunError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    """One run the loop trains: its resolved config and its run directory."""
    cfg: dict
    out: Path

    def __post_init__(self):
        self.out = Path(self.out)

    @property
    def name(self) -> str:
        return Path(self.out).name


def _loss(cfg: dict):
    if cfg["run"]["role"] == "teacher":
        return build_loss("hard")  # a teacher trains with plain cross-entropy
    s = cfg["student"]
    return build_loss(s["loss"], s["temperature"], configlib.loss_c(s))


def _epoch_bar(x, y, cfg: dict, order, aug, device, desc: str, progress: bool):
    """One epoch of ``(xb, yb, idx)`` batches behind a tqdm bar."""
    t = cfg["train"]
    return tqdm(batches(x, y, t["batch_size"], generator=order, augment=cfg["data"]["augment"],
                        aug_generator=aug, device=device),
                total=math.ceil(len(x) / t["batch_size"]), desc=desc, disable=not progress, leave=False,
                unit="batch")


def train(runs, data, targets: TeacherTargets | None = None, *, group_dir: str | Path | None = None,
          resume: bool = False, force: bool = False, progress: bool = True, on_epoch=None,
          node: str | None = None) -> list[dict]:
    """Train ``runs`` (`Run` or ``(cfg, out)`` pairs) on ``data``; return their summaries.

    One run keeps its checkpoint in its run directory, with the ``resume``/``force``
    rules of `rundir.prepare`. Several runs (configs equal but for the loss, T and c)
    train as one fused group whose checkpoint lives in ``group_dir`` and is resumed when
    it holds the same members and configs. Distillation targets come from ``targets``.
    ``on_epoch()`` is called once an epoch's files are all written (a Ray worker sends
    them to the driver then); ``node`` names the machine in each epoch's metrics and the
    summary (default: the host name).
    """
    runs = [r if isinstance(r, Run) else Run(*r) for r in runs]
    board = Scalars([r.out for r in runs], runs[0].cfg["train"].get("tensorboard", False))
    with contextlib.ExitStack() as held:  # one command at a time trains into a folder
        for folder in [r.out for r in runs] + ([Path(group_dir)] if len(runs) > 1 else []):
            held.enter_context(locked(folder, "run directory"))
        held.enter_context(board)
        return _train(runs, data, targets, board, group_dir=group_dir, resume=resume, force=force,
                      progress=progress, on_epoch=on_epoch or (lambda: None), node=node or platform.node())


def _train(runs: list[Run], data, targets, board: Scalars, *, group_dir, resume: bool, force: bool,
           progress: bool, on_epoch, node: str) -> list[dict]:
    k, cfg = len(runs), runs[0].cfg
    if any(configlib.without_loss(r.cfg) != configlib.without_loss(cfg) for r in runs):
        raise ValueError("fused members must share every setting but the loss, T and c")
    t, names, texts = cfg["train"], [r.name for r in runs], [configlib.run_text(r.cfg) for r in runs]
    targets = targets or TeacherTargets.none(data)
    losses = [_loss(r.cfg) for r in runs]
    for r, fn in zip(runs, losses):
        if fn.needs_teacher and not targets:
            raise RunError(f"loss {fn.loss_name} needs a teacher (--teacher RUN)")
    device = pick_device(t["device"])
    if k == 1:
        state = Path(runs[0].out)
        do_resume = rundir.prepare(state, cfg, resume=resume, force=force)
    else:
        state = Path(group_dir)
        ck = state / rundir.CHECKPOINT
        held = checkpoint.load(ck)["members"] if ck.exists() else []
        do_resume = [(m["name"], m["config"]) for m in held] == list(zip(names, texts))

    # Paired design: the seed alone fixes the initial weights, the validation split
    # and the batch order, whatever the loss or temperature.
    seed = t["seed"]
    metas, models = [], []
    for r in runs:
        torch.manual_seed(seed)
        metas.append(checkpoint.model_meta(r.cfg, data.num_classes, data.class_names))
        models.append(checkpoint.build_from_meta(metas[-1]))
    train_idx, val_idx = split_val(len(data.x_train), cfg["data"]["val_fraction"], seed)
    # Recorded so a study can prove its pairing: same seed, same start, same split, same order.
    prints = [{"init_sha256": checkpoint.state_sha256(m.state_dict()),
               "val_split_sha256": checkpoint.tensor_sha256(val_idx)} for m in models]
    # channels_last: faster convolutions on CPU (README, Performance) and on tensor cores.
    net = group(models).to(device).to_channels_last()
    x_all = data.x_train.to(device)
    x_tr, y_tr = x_all[train_idx.to(device)], data.y_train[train_idx].to(device)
    x_val, y_val = x_all[val_idx.to(device)], data.y_train[val_idx]
    x_test, y_test = data.x_test.to(device), data.y_test
    autocast = autocast_for(device, t.get("precision", "auto"))
    augment = cfg["data"]["augment"] != "none"
    teacher_for = targets.for_batches(train_idx, augment=augment, needed=any(f.needs_teacher for f in losses),
                                      device=device, autocast=autocast)
    order = torch.Generator().manual_seed(seed + 1)
    aug = torch.Generator().manual_seed(seed + 2)
    opt = make_optimizer(net.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    metrics = [[] for _ in runs]
    best = [{"val": -1.0, "epoch": 0, "test": float("nan")} for _ in runs]
    start_epoch = 0

    if do_resume:
        ck = checkpoint.load(state / rundir.CHECKPOINT)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        order.set_state(ck["rng"]["order"])
        aug.set_state(ck["rng"]["aug"])
        start_epoch = ck["epoch"]
        best, metrics, prints = ([m[key] for m in ck["members"]] for key in ("best", "metrics", "prints"))
    for r in runs:  # set-up succeeded: now the run directories are written
        if k > 1 or not do_resume:
            rundir.start(r.out, r.cfg, member=k > 1)

    def state_dict(model_state, opt_state, members) -> dict:
        return {"epoch": len(metrics[0]), "model": model_state, "optimizer": opt_state,
                "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "order": order.get_state(), "aug": aug.get_state(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                "members": [{"name": names[j], "config": texts[j], "meta": metas[j], "best": best[j],
                             "metrics": metrics[j], "prints": prints[j]} for j in members]}

    label = names[0] if k == 1 else state.name
    wall0 = time.perf_counter() - sum(m["wall_s"] for m in metrics[0])
    first_order = []
    for epoch in range(start_epoch, t["epochs"]):
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device, dtype=torch.long)
        # The first non-finite loss (step, value) per member, kept on the device: the
        # loop never waits for the device within an epoch.
        bad_step = torch.full((k,), -1, device=device, dtype=torch.long)
        bad_loss = torch.zeros(k, device=device)
        seen = 0
        bar = _epoch_bar(x_tr, y_tr, cfg, order, aug, device, f"{label} {epoch + 1}/{t['epochs']}", progress)
        for step, (xb, yb, idx) in enumerate(bar):
            if epoch == 0:
                first_order.append(idx)
            member_loss, z = train_step(net, opt, xb, yb, teacher_for(idx, xb), losses, autocast)
            new_bad = (bad_step < 0) & ~torch.isfinite(member_loss)
            bad_step = torch.where(new_bad, step, bad_step)
            bad_loss = torch.where(new_bad, member_loss, bad_loss)
            loss_sum += member_loss * len(yb)
            correct += (z.argmax(2) == yb).sum(1)
            seen += len(yb)
            if progress and step % 10 == 0:  # host-side figures only: no device sync
                bar.set_postfix(img_s=f"{k * seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        diverged = [(names[j], s, bad_loss[j].item()) for j, s in enumerate(bad_step.tolist()) if s >= 0]
        if diverged:
            last = state / rundir.CHECKPOINT if epoch else "none (no epoch finished)"
            raise Diverged(f"loss became {diverged[0][2]} for {', '.join(d[0] for d in diverged)} at epoch "
                           f"{epoch + 1}, step {diverged[0][1] + 1}; the last good checkpoint is {last}")
        sync(device)
        train_s = time.perf_counter() - t0
        if epoch == 0:
            for p in prints:
                p["batch_order_sha256"] = checkpoint.tensor_sha256(torch.cat(first_order))
        lr = opt.param_groups[0]["lr"]
        sched.step()

        val, test = predict(net, x_val, device), predict(net, x_test, device)
        improved = []
        for j in range(k):
            row = {"epoch": epoch + 1, "train_loss": loss_sum[j].item() / seen,
                   "train_acc": correct[j].item() / seen, "val_acc": accuracy(val[j], y_val),
                   "test_acc": accuracy(test[j], y_test), "lr": lr, "img_per_s": seen / train_s,
                   "wall_s": time.perf_counter() - t0, "node": node, **({"fused_k": k} if k > 1 else {})}
            metrics[j].append(row)
            # val_acc is NaN without a validation split: then the last epoch is "best".
            if not row["val_acc"] <= best[j]["val"]:
                best[j] = {"val": row["val_acc"], "epoch": epoch + 1, "test": row["test_acc"]}
                improved.append(j)
        members = net.split() if improved else []
        for j in improved:
            checkpoint.save({"model": members[j].state_dict(), "meta": metas[j]}, runs[j].out / rundir.BEST)
        # best.pt, the event files (a resume purges their points past the checkpoint), then
        # the checkpoint that points at best.pt, then metrics.jsonl (which a resume rewrites
        # from the checkpoint): whatever a kill interrupts, the files agree.
        for j in range(k):
            board.write(j, metrics[j][-1])
        checkpoint.save(state_dict(net.state_dict(), opt.state_dict(), range(k)), state / rundir.CHECKPOINT)
        for j in range(k):
            rundir.write_metrics(runs[j].out, metrics[j])
        on_epoch()
        if progress:
            m = metrics[0][-1]
            tqdm.write(f"{label} epoch {epoch + 1}/{t['epochs']}: " + (
                f"loss {m['train_loss']:.4f} train {m['train_acc']:.4f} val {m['val_acc']:.4f} "
                f"test {m['test_acc']:.4f} ({m['img_per_s']:.0f} img/s)" if k == 1 else
                "val " + " ".join(f"{ms[-1]['val_acc']:.3f}" for ms in metrics)
                + f" ({k * seen / train_s:.0f} student img/s)"))

    # Each member becomes an ordinary finished run: a one-member checkpoint, then its summary.
    wall_s = time.perf_counter() - wall0
    opt_state, summaries = opt.state_dict(), []
    for j, model in enumerate(net.split()):
        if k > 1:
            checkpoint.save(state_dict(model.state_dict(), net.split_optimizer_state(opt_state, j), [j]),
                            runs[j].out / rundir.CHECKPOINT)
        extra = {**prints[j], "node": node, **({"fused_k": k} if k > 1 else {})}
        summaries.append(_summarize(runs[j].out, model, metas[j], data, metrics[j], best[j], device,
                                    targets, wall_s, extra))
    return summaries


def _summarize(out: Path, model, meta: dict, data, metrics: list[dict], best: dict, device,
               targets: TeacherTargets, wall_s: float, extra: dict) -> dict:
    """Evaluate the best-validation weights once more and write ``summary.json`` last."""
    model.load_state_dict(checkpoint.load(Path(out) / rundir.BEST)["model"])
    logits = predict(model, data.x_test.to(device), device)
    size = model_summary(model)
    summary = {
        "val_best_acc": best["val"], "best_epoch": best["epoch"], "test_acc_at_val_best": best["test"],
        "test_acc_last": metrics[-1]["test_acc"], "epochs": len(metrics), "wall_s": wall_s,
        "img_per_s": sum(m["img_per_s"] for m in metrics) / len(metrics),
        "params": size["params"], "model_bytes_at_bits": size["bytes_at_bits"], "fp32_bytes": size["fp32_bytes"],
        "test_per_class_acc": per_class_accuracy(logits, data.y_test, data.num_classes),
    }
    teacher_test = targets.test_logits(device) if meta["role"] == "student" else None
    if teacher_test is not None:
        summary["teacher_agreement"], summary["kl_to_teacher"] = teacher_agreement(logits, teacher_test)
        # which teacher, exactly: kind, file, sha256, and its own test accuracy
        summary.update({f"teacher_{k}": v for k, v in targets.describe().items()})
    if getattr(data, "skipped", 0):
        summary["skipped_images"] = data.skipped
    summary.update(extra)
    rundir.write_summary(out, summary)
    return summary
