"""The training loop: one function trains any model with any loss into a run directory.

Read it top to bottom: set-up, resume, the epoch loop (train, evaluate, write), the
summary. Files follow `qdistill.runs`; every write is atomic, so a killed run resumes
from its last checkpoint and reaches exactly the metrics of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import config as configlib
from .data import Dataset, batches, split_val, to_float
from .errors import ConfigError, RunError
from .losses import build_loss
from .models import summary as model_summary
from .atomic import atomic_write_text
from .runs import atomic_torch_save, build_from_meta, load_checkpoint, model_meta

RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json")
EVAL_BATCH = 1024


class Diverged(RunError):
    """The loss became NaN or infinite."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available")
    return device


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    """The learning-rate multiplier for 0-based ``epoch``.

    ``course``: 1 before 25% of the epochs, 0.1 from 25%, 0.05 from 67% (epochs 15 and
    40 of 60), each relative to the base rate. ``cosine``: ``0.5 * (1 + cos(pi * e / E))``.
    """
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if epoch >= round(0.67 * epochs):
        return 0.05
    if epoch >= round(0.25 * epochs):
        return 0.1
    return 1.0


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    t = cfg["train"]
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def make_scheduler(opt, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg["train"]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, t["epochs"], t["schedule"]))


@torch.no_grad()
def predict(model, x_u8: torch.Tensor, device=None) -> torch.Tensor:
    """Logits (float32, CPU) of ``model`` in eval mode on uint8 images, in order."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x_u8), EVAL_BATCH):
        xb = to_float(x_u8[i:i + EVAL_BATCH].to(device, non_blocking=True))
        out.append(model(xb).float().cpu())
    model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y.cpu()).float().mean().item() if len(y) else float("nan")


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    pred, y = logits.argmax(1), y.cpu()
    return [((pred == y) & (y == k)).sum().item() / max(1, (y == k).sum().item()) for k in range(num_classes)]


def teacher_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean ``KL(softmax(t) || softmax(z))`` at T = 1."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    log_p_t = F.log_softmax(teacher_logits.float(), 1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(student_logits.float(), 1))).sum(1).mean().item()
    return agree, kl


def epoch_bar(x, y, cfg: dict, order, aug, device, desc: str, progress: bool):
    """One epoch of ``(xb, yb, idx)`` batches behind a tqdm bar."""
    t = cfg["train"]
    return tqdm(batches(x, y, t["batch_size"], generator=order, augment=cfg["data"]["augment"],
                        aug_generator=aug, device=device),
                total=math.ceil(len(x) / t["batch_size"]), desc=desc, disable=not progress, leave=False,
                unit="batch")


def teacher_targets(idx, xb, cached, teacher, autocast):
    """The teacher's logits for a batch: from the cache (rows ``idx``), else from running
    ``teacher`` on the batch, else ``None`` (a loss that needs no teacher)."""
    if cached is not None:
        return cached[idx]
    if teacher is None:
        return None
    with torch.no_grad(), autocast:
        return teacher(xb).float()


def prepare_dir(out: Path, cfg: dict, *, resume: bool, force: bool) -> bool:
    """Check ``out`` and return whether to resume from its checkpoint.

    A finished run is never overwritten without ``force``; ``resume`` needs the same config.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"output path {out} exists and is not a directory")
    finished = (out / "summary.json").exists()
    started = (out / "checkpoint.pt").exists()
    if force:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        return False
    if resume:
        if finished:
            raise RunError(f"run {out} already finished; use --force to train it again")
        if not started:
            return False  # nothing to resume: start fresh
        stored = (out / "config.toml").read_text() if (out / "config.toml").exists() else ""
        if stored != configlib.run_text(cfg):
            raise RunError(f"run {out} was started with a different config; use --force to start over")
        return True
    if finished or started:
        what = "a finished run" if finished else "an unfinished run (use --resume to continue it)"
        raise RunError(f"{out} already holds {what}; use --force to overwrite")
    return False


def train(cfg: dict, out: str | Path, data: Dataset, *, teacher=None,
          teacher_logits: torch.Tensor | None = None, teacher_test_logits: torch.Tensor | None = None,
          resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train the model ``cfg`` describes on ``data`` into the run directory ``out``.

    The role (``cfg["run"]["role"]``) picks the model: the teacher's full-precision model
    or the quantized student, trained with ``student.loss``. Distillation targets come
    from ``teacher_logits`` (aligned with ``data.x_train``, used when augmentation is off)
    or from running ``teacher`` on each batch. ``teacher_test_logits`` (or ``teacher``)
    gives the student-teacher agreement and KL in the summary. Returns the summary.
    """
    out = Path(out)
    t, role = cfg["train"], cfg["run"]["role"]
    do_resume = prepare_dir(out, cfg, resume=resume, force=force)
    device = pick_device(t["device"])

    # The loss. A teacher trains with plain cross-entropy.
    if role == "teacher":
        loss_fn = build_loss("hard")
    else:
        s = cfg["student"]
        loss_fn = build_loss(s["loss"], s["temperature"], configlib.loss_c(s))
        if loss_fn.needs_teacher and teacher is None and teacher_logits is None:
            raise RunError(f"loss {s['loss']} needs a teacher (--teacher RUN)")
    if cfg["data"]["augment"] != "none":
        teacher_logits = None  # the teacher must see each augmented batch
    elif teacher is not None and teacher_logits is None and role == "student" and loss_fn.needs_teacher:
        # Without augmentation the targets never change: one teacher pass serves every epoch.
        teacher_logits = predict(teacher.to(device), data.x_train.to(device), device)

    # Paired design: the seed alone fixes the initial weights, the validation split
    # and the batch order, whatever the loss or temperature.
    seed = t["seed"]
    torch.manual_seed(seed)
    meta = model_meta(cfg, data.num_classes, data.class_names)
    # channels_last: faster convolutions on CPU (README, Performance) and on tensor cores.
    model = build_from_meta(meta).to(device, memory_format=torch.channels_last)
    train_idx, val_idx = split_val(len(data.x_train), cfg["data"]["val_fraction"], seed)
    x_all = data.x_train.to(device)
    x_tr, y_tr = x_all[train_idx.to(device)], data.y_train[train_idx].to(device)
    x_val, y_val = x_all[val_idx.to(device)], data.y_train[val_idx]
    x_test, y_test = data.x_test.to(device), data.y_test
    cached = teacher_logits[train_idx].to(device) if teacher_logits is not None else None
    if teacher is not None:
        teacher = teacher.to(device).eval()
    order = torch.Generator().manual_seed(seed + 1)
    aug = torch.Generator().manual_seed(seed + 2)

    # Recorded so a study can prove its pairing: same seed, same start, same split, same order.
    prints = {"init_sha256": state_sha256(model.state_dict()), "val_split_sha256": tensor_sha256(val_idx)}
    first_order = []

    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    autocast = autocast_for(device, t.get("precision", "auto"))
    metrics, start_epoch, best = [], 0, {"val": -1.0, "epoch": 0, "test": float("nan")}

    if do_resume:
        ck = load_checkpoint(out / "checkpoint.pt")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        order.set_state(ck["rng"]["order"])
        aug.set_state(ck["rng"]["aug"])
        start_epoch, best, metrics, prints = ck["epoch"], ck["best"], ck["metrics"], ck["prints"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", configlib.run_text(cfg))

    wall0 = time.perf_counter() - sum(m["wall_s"] for m in metrics)
    for epoch in range(start_epoch, t["epochs"]):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = epoch_bar(x_tr, y_tr, cfg, order, aug, device, f"{out.name} {epoch + 1}/{t['epochs']}", progress)
        for step, (xb, yb, idx) in enumerate(bar):
            if epoch == 0:
                first_order.append(idx)
            tl = teacher_targets(idx, xb, cached, teacher if loss_fn.needs_teacher else None, autocast)
            with autocast:
                z = model(xb)
            loss = loss_fn(z, tl, yb)
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                               f"the last good checkpoint is {out / 'checkpoint.pt'}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(yb)
            correct += (z.argmax(1) == yb).sum()
            seen += len(yb)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        train_s = time.perf_counter() - t0
        if epoch == 0:
            prints["batch_order_sha256"] = tensor_sha256(torch.cat(first_order))
        lr = opt.param_groups[0]["lr"]
        sched.step()

        val_acc = accuracy(predict(model, x_val, device), y_val)
        test_acc = accuracy(predict(model, x_test, device), y_test)
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
               "val_acc": val_acc, "test_acc": test_acc, "lr": lr, "img_per_s": seen / train_s,
               "wall_s": time.perf_counter() - t0}
        metrics.append(row)
        # val_acc is NaN without a validation split: then the last epoch is "best".
        if not val_acc <= best["val"]:
            best = {"val": val_acc, "epoch": epoch + 1, "test": test_acc}
            atomic_torch_save({"model": model.state_dict(), "meta": meta}, out / "best.pt")
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch + 1, "best": best, "metrics": metrics, "meta": meta, "prints": prints,
            "rng": {"torch": torch.get_rng_state(), "order": order.get_state(), "aug": aug.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        }, out / "checkpoint.pt")
        if progress:
            tqdm.write(f"{out.name} epoch {epoch + 1}/{t['epochs']}: loss {row['train_loss']:.4f} "
                       f"train {row['train_acc']:.4f} val {val_acc:.4f} test {test_acc:.4f} "
                       f"({row['img_per_s']:.0f} img/s)")

    return write_summary(out, model, meta, data, metrics, best, device, teacher=teacher,
                         teacher_test_logits=teacher_test_logits, wall_s=time.perf_counter() - wall0,
                         extra=prints)


def write_summary(out: Path, model, meta: dict, data: Dataset, metrics: list[dict], best: dict, device,
                  *, teacher=None, teacher_test_logits=None, wall_s: float, extra=None) -> dict:
    """Evaluate the best-validation weights once more and write ``summary.json`` last."""
    best_state = load_checkpoint(out / "best.pt")["model"]
    model.load_state_dict(best_state)
    logits = predict(model, data.x_test.to(device), device)
    size = model_summary(model)
    summary = {
        "val_best_acc": best["val"], "best_epoch": best["epoch"], "test_acc_at_val_best": best["test"],
        "test_acc_last": metrics[-1]["test_acc"], "epochs": len(metrics), "wall_s": wall_s,
        "img_per_s": sum(m["img_per_s"] for m in metrics) / len(metrics),
        "params": size["params"], "model_bytes_at_bits": size["bytes_at_bits"], "fp32_bytes": size["fp32_bytes"],
        "test_per_class_acc": per_class_accuracy(logits, data.y_test, data.num_classes),
    }
    if teacher_test_logits is None and teacher is not None:
        teacher_test_logits = predict(teacher, data.x_test.to(device), device)
    if teacher_test_logits is not None and meta["role"] == "student":
        summary["teacher_agreement"], summary["kl_to_teacher"] = teacher_agreement(logits, teacher_test_logits)
    summary.update(extra or {})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def state_sha256(state: dict) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def autocast_for(device: torch.device, precision: str = "auto"):
    """The context the forward pass runs in: bfloat16 autocast for ``"bf16"``, and for
    ``"auto"`` on CUDA; nothing (fp32) otherwise. ``"auto"`` keeps fp32 on CPU, where the
    same config and seed must give identical metrics and bf16 would change them; on the
    2-core CPU dev box bf16 autocast (AMX) trains the fused K=10 vgg7 about 1.7x faster
    (``qdistill bench``, phase (d))."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
