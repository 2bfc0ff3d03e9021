"""Checkpoints and weight files: one checkpoint format for a run of one model or a
fused group of K, and rebuilding a model from what a run saved.

``checkpoint.pt`` (written after every epoch, atomically)::

    {"epoch": finished epochs, "model": the network's state_dict (a plain model's for
     one member, the fused layout for K), "optimizer", "average" (the weight average or None),
     "rng": {"torch", "order", "aug", "cuda"},
     "members": [{"name", "config" (config.toml text), "meta", "best", "metrics", "prints"}]}

A group keeps its checkpoint in the study (``STUDY/groups/...``); when it finishes, each
member's run directory gets a one-member checkpoint of the same format, with its own
slice of the optimizer state. ``best.pt`` holds ``{"model": state_dict, "meta": meta}``,
where ``meta`` (`model_meta`) says how to rebuild the model.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes
from ..errors import RunError
from ..nn import reference
from ..nn.models import build
from .rundir import RunDir


def save(obj, path: str | Path) -> None:
    """``torch.save`` through a temp file and a rename, every tensor on the CPU (a plain
    ``torch.load`` on a machine without the GPU it trained on reads it). Serialised in
    memory first, so a failing disk surfaces as the OS error of a plain write
    (`WriteError`)."""
    buf = io.BytesIO()
    torch.save(on_cpu(obj), buf)
    atomic_write_bytes(path, buf.getbuffer())


def on_cpu(obj):
    """``obj`` with every tensor in it (in dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def load(path: str | Path) -> dict:
    """A checkpoint or weight file, tensors on the CPU, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise RunError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def model_meta(cfg: dict, num_classes: int, class_names: list[str]) -> dict:
    """How to rebuild the model of a run with ``cfg`` (its role picks the section). A
    model from code adds its ``model_args``; from a file, its sha256 and text, so the
    model rebuilds without the file."""
    sec = cfg["teacher"] if cfg["run"]["role"] == "teacher" else cfg["student"]
    kwargs = {} if cfg["run"]["role"] == "teacher" else {
        k: sec[k] for k in ("weight_bits", "act_bits", "grad_bits", "scheme", "quantize_first_last")}
    kwargs.update(num_classes=num_classes, in_channels=3)
    if sec.get("model_args"):
        kwargs["model_args"] = dict(sec["model_args"])
    meta = {"arch": sec["model"], "build": kwargs, "class_names": list(class_names), "role": cfg["run"]["role"]}
    if reference.is_file(sec["model"]):
        kwargs["sha256"] = sec.get("model_sha256", "")
        meta["source"] = reference.source(sec["model"], kwargs["sha256"])
    return meta


def build_from_meta(meta: dict) -> torch.nn.Module:
    """The model ``meta`` describes (a file's text from ``meta["source"]``)."""
    if meta.get("source"):
        reference.remember(meta["source"])
    return build(meta["arch"], **meta["build"])


def member_meta(ckpt: dict) -> dict:
    """The meta of a one-member checkpoint, or of a weight file."""
    if "members" in ckpt:
        if len(ckpt["members"]) != 1:
            raise RunError("a fused group's checkpoint holds several models; read a member's run")
        return ckpt["members"][0]["meta"]
    return ckpt["meta"]


def load_model(run: str | Path, which: str = "best") -> tuple[torch.nn.Module, dict]:
    """The model of a run in eval mode, with the weights of ``best.pt`` or
    ``checkpoint.pt`` (``which="last"``), and its meta."""
    if which not in ("best", "last"):
        raise RunError(f"checkpoint must be best or last, got {which!r}")
    ckpt = load(RunDir(run).weights(which))
    meta = member_meta(ckpt)
    model = build_from_meta(meta)
    model.load_state_dict(ckpt["model"])
    return model.eval(), meta


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def state_sha256(state: dict) -> str:
    """sha256 over a state_dict's names and bytes, whatever the tensors' memory format."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
