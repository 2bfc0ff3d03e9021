"""Train a study's conditions as fused groups: one grouped network per seed.

All conditions of one seed share the student architecture, the initial weights, the
validation split and the batch order (the study's paired design), so they can train as
one `FusedStudents` network on the same batches: the data path and the teacher run once
per batch for the whole group. The loop mirrors `qdistill.train.train`; each member is
split back into its own run directory, in the format of a separately trained run.

A group keeps its own checkpoint in ``STUDY/groups/s<seed>/checkpoint.pt`` and resumes
from it as a group.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from . import config as configlib
from .atomic import atomic_write_text
from .data import split_val, to_float
from .errors import UserError
from .fused import FusedStudents
from .losses import build_loss
from .runs import atomic_torch_save, build_from_meta, load_checkpoint, load_teacher, model_meta
from .train import (EVAL_BATCH, Diverged, accuracy, autocast_for, epoch_bar, make_optimizer, make_scheduler,
                    pick_device, state_sha256, tensor_sha256, teacher_targets, write_summary)


@torch.no_grad()
def predict_members(fused, x_u8: torch.Tensor, device) -> torch.Tensor:
    """Logits ``(K, N, classes)`` (float32, CPU) of every member in eval mode."""
    was_training = fused.training
    fused.eval()
    out = [fused(to_float(x_u8[i:i + EVAL_BATCH].to(device))).float().cpu()
           for i in range(0, len(x_u8), EVAL_BATCH)]
    fused.train(was_training)
    return torch.cat(out, dim=1)


def group_key(cond) -> tuple:
    """Conditions that may share a fused network: same seed, same everything but the loss."""
    cfg = json.loads(json.dumps(cond.cfg))
    cfg["student"].pop("loss"), cfg["student"].pop("temperature"), cfg["student"].pop("c", None)
    return (cond.seed, json.dumps(cfg, sort_keys=True))


def train_groups(conds, study: Path, data, teacher_run: Path, train_logits, test_logits, *,
                 progress: bool = True, on_done=None) -> None:
    """Train ``conds`` grouped by `group_key`; a failed group records its error in each
    member's ``error.txt`` and the next group goes on."""
    groups: dict[tuple, list] = {}
    for c in conds:
        groups.setdefault(group_key(c), []).append(c)
    for i, members in enumerate(groups.values()):
        seed = members[0].seed
        gdir = study / "groups" / f"s{seed}" if len(groups) == len({k[0] for k in groups}) \
            else study / "groups" / f"s{seed}-{i}"
        if progress:
            print(f"[group {i + 1}/{len(groups)}] seed {seed}: {len(members)} students fused", flush=True)
        try:
            train_group(members, gdir, study, data, teacher_run, train_logits, test_logits, progress=progress)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            detail = "" if isinstance(e, UserError) else traceback.format_exc()
            for c in members:
                run = study / "runs" / c.name
                run.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run / "error.txt", f"{type(e).__name__}: {e}\n{detail}")
        if on_done:
            on_done()


def train_group(members, gdir: Path, study: Path, data, teacher_run: Path, train_logits, test_logits,
                *, progress: bool = True) -> None:
    cfg = members[0].cfg
    t = cfg["train"]
    k = len(members)
    names = [c.name for c in members]
    runs = [study / "runs" / n for n in names]
    device = pick_device(t["device"])
    losses = [build_loss(c.loss, c.temperature, c.c) for c in members]
    augment = cfg["data"]["augment"] != "none"
    teacher = load_teacher(teacher_run, data).to(device) if augment and any(f.needs_teacher for f in losses) \
        else None

    # Same seed, same start, split and order as a separate run of each member.
    seed = t["seed"]
    metas, models = [], []
    for c in members:
        torch.manual_seed(seed)
        meta = model_meta(c.cfg, data.num_classes, data.class_names)
        metas.append(meta)
        models.append(build_from_meta(meta))
    prints = [{"init_sha256": state_sha256(m.state_dict())} for m in models]
    fused = FusedStudents(models).to(device).to_channels_last()
    train_idx, val_idx = split_val(len(data.x_train), cfg["data"]["val_fraction"], seed)
    for p in prints:
        p["val_split_sha256"] = tensor_sha256(val_idx)
    x_all = data.x_train.to(device)
    x_tr, y_tr = x_all[train_idx.to(device)], data.y_train[train_idx].to(device)
    x_val, y_val = x_all[val_idx.to(device)], data.y_train[val_idx]
    x_test, y_test = data.x_test.to(device), data.y_test
    cached = None if augment else train_logits[train_idx].to(device)
    order = torch.Generator().manual_seed(seed + 1)
    aug = torch.Generator().manual_seed(seed + 2)
    opt = make_optimizer(fused.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    autocast = autocast_for(device, cfg["train"].get("precision", "auto"))
    metrics = [[] for _ in members]
    best = [{"val": -1.0, "epoch": 0, "test": float("nan")} for _ in members]
    start_epoch = 0

    ck_path = gdir / "checkpoint.pt"
    if ck_path.exists():
        ck = load_checkpoint(ck_path)
        if ck["members"] == names and ck["config"] == [configlib.run_text(c.cfg) for c in members]:
            fused.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["rng"]["torch"])
            order.set_state(ck["rng"]["order"])
            aug.set_state(ck["rng"]["aug"])
            start_epoch, best, metrics, prints = ck["epoch"], ck["best"], ck["metrics"], ck["prints"]
    for c, run in zip(members, runs):
        for stale in ("checkpoint.pt", "summary.json", "error.txt"):
            (run / stale).unlink(missing_ok=True)
        atomic_write_text(run / "config.toml", configlib.run_text(c.cfg))

    wall0 = time.perf_counter() - sum(m["wall_s"] for m in metrics[0])
    first_order = []
    for epoch in range(start_epoch, t["epochs"]):
        fused.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device, dtype=torch.long)
        seen = 0
        bar = epoch_bar(x_tr, y_tr, cfg, order, aug, device, f"{gdir.name} {epoch + 1}/{t['epochs']}", progress)
        for step, (xb, yb, idx) in enumerate(bar):
            if epoch == 0:
                first_order.append(idx)
            tl = teacher_targets(idx, xb, cached, teacher, autocast)
            with autocast:
                z = fused(xb)
            member_loss = torch.stack([f(z[j], tl, yb) for j, f in enumerate(losses)])
            if not torch.isfinite(member_loss).all():
                bad = [names[j] for j in range(k) if not torch.isfinite(member_loss[j])]
                raise Diverged(f"loss became non-finite for {', '.join(bad)} at epoch {epoch + 1}, "
                               f"step {step + 1}; the group's last good checkpoint is {ck_path}")
            opt.zero_grad(set_to_none=True)
            member_loss.sum().backward()
            opt.step()
            loss_sum += member_loss.detach() * len(yb)
            correct += (z.argmax(2) == yb).sum(1)
            seen += len(yb)
            if progress and step % 10 == 0:
                bar.set_postfix(img_s=f"{k * seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        train_s = time.perf_counter() - t0
        if epoch == 0:
            for p in prints:
                p["batch_order_sha256"] = tensor_sha256(torch.cat(first_order))
        lr = opt.param_groups[0]["lr"]
        sched.step()

        val = predict_members(fused, x_val, device)
        test = predict_members(fused, x_test, device)
        improved = []
        for j in range(k):
            row = {"epoch": epoch + 1, "train_loss": loss_sum[j].item() / seen,
                   "train_acc": correct[j].item() / seen, "val_acc": accuracy(val[j], y_val),
                   "test_acc": accuracy(test[j], y_test), "lr": lr, "img_per_s": seen / train_s,
                   "wall_s": time.perf_counter() - t0, "fused_k": k}
            metrics[j].append(row)
            if not row["val_acc"] <= best[j]["val"]:
                best[j] = {"val": row["val_acc"], "epoch": epoch + 1, "test": row["test_acc"]}
                improved.append(j)
        if improved:
            split = fused.split()
            for j in improved:
                atomic_torch_save({"model": split[j].state_dict(), "meta": metas[j]}, runs[j] / "best.pt")
        for j in range(k):
            atomic_write_text(runs[j] / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics[j]))
        atomic_torch_save({
            "model": fused.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch + 1, "best": best, "metrics": metrics, "prints": prints, "members": names,
            "config": [configlib.run_text(c.cfg) for c in members],
            "rng": {"torch": torch.get_rng_state(), "order": order.get_state(), "aug": aug.get_state()},
        }, ck_path)
        if progress:
            accs = " ".join(f"{m[-1]['val_acc']:.3f}" for m in metrics)
            tqdm.write(f"{gdir.name} epoch {epoch + 1}/{t['epochs']}: val {accs} "
                       f"({k * seen / train_s:.0f} student img/s)")

    # Split back: each member becomes an ordinary finished run.
    wall = time.perf_counter() - wall0
    for j, model in enumerate(fused.split()):
        atomic_torch_save({"model": model.state_dict(), "meta": metas[j], "epoch": t["epochs"],
                           "best": best[j], "metrics": metrics[j], "prints": prints[j]},
                          runs[j] / "checkpoint.pt")
        write_summary(runs[j], model.to(device), metas[j], data, metrics[j], best[j], device,
                      teacher_test_logits=test_logits, wall_s=wall, extra={**prints[j], "fused_k": k})
