"""The packed ``.qdz`` file of a trained student, the file the torch-free engine runs.

`model_arrays` walks the blocks of `plan` (a flat ``nn.Sequential``) and turns each into an
engine layer (`qdistill.export.blocks`): integer weight codes packed into bit-planes and
per-channel thresholds folded from what follows the conv (see `qdistill.export.plan` for
the arithmetic); `model_graph` does the same for the fx graph of any other network
(`qdistill.export.graph`: residual adds, strides); `export_model` writes them,
with the manifest, as a ``.qdz`` file; `export_run` exports a run's checkpoint as ``.qdz``
or ONNX.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch.nn as nn

from .. import __version__
from ..atomic import atomic_write_bytes
from ..deploy import qdz
from ..deploy.engine import INPUT_SHAPE
from ..errors import ExportError
from ..nn.layers import QuantAct, QuantConv2d, QuantLinear
from ..nn.quantizers import FULL
from . import blocks
from .graph import model_nodes
from .onnx import export_onnx
from .plan import plan


def _is_quantized(model: nn.Module) -> bool:
    return any((isinstance(m, QuantAct) and m.bits < FULL)
               or (isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < FULL)
               for m in model.modules())


_BLOCKS = {"resize": blocks.resize, "conv": blocks.conv, "avgpool": blocks.avgpool, "flatten": blocks.flatten,
           "linear": blocks.linear}


def _check_quantized(model: nn.Module) -> None:
    if not _is_quantized(model):
        raise ExportError("the model is full precision (32-bit weights and activations); "
                          "export packs low-bit students only")


def model_arrays(model: nn.Module) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The engine's layer chain and arrays for a flat ``nn.Sequential`` ``model`` (see
    `qdistill.export.plan`)."""
    chain = plan(model)
    _check_quantized(model)
    pk, layers = blocks.Packing(), []
    for b in chain:
        layers.append({"op": None, "modules": [b.first, b.last], **_BLOCKS[b.kind](pk, b)})
    if pk.form != "logits":
        raise ExportError("the model must end in a linear layer")
    return layers, pk.arrays


def model_graph(model: nn.Module) -> tuple[dict, dict[str, np.ndarray]]:
    """``({"nodes": ..., "output": ...}, arrays)``: the engine's node graph of any traceable
    student (`qdistill.export.graph`)."""
    _check_quantized(model)
    nodes, arrays, output = model_nodes(model)
    return {"nodes": nodes, **({"output": output} if output != nodes[-1]["name"] else {})}, arrays


def _model_bits(model: nn.Module) -> dict:
    mods = list(model.modules())
    convs = [m for m in mods if isinstance(m, QuantConv2d)][1:]
    acts = [m for m in mods if isinstance(m, QuantAct)]
    schemes = sorted({m.scheme for m in mods if isinstance(m, (QuantConv2d, QuantAct))})
    return {"weight_bits": sorted({m.weight_bits for m in convs}),
            "act_bits": sorted({m.bits for m in acts}), "schemes": schemes}


def export_model(model: nn.Module, path: str | Path, *, class_names, meta: dict | None = None,
                 graph: bool | None = None) -> dict:
    """Write ``model`` (a quantized student from `qdistill.nn.models.build`) as a ``.qdz`` file
    at ``path`` (atomically) and return its manifest. A flat ``nn.Sequential`` is written as
    a chain of layers (format 1 or 2, what older readers run), any other network (a
    Sequential holding blocks of its own too) as its node graph (format 3); ``graph=True``
    writes a flat Sequential as a graph too. The manifest's ``arch`` and ``build`` are
    ``meta``'s (a run's checkpoint meta), ``None`` without. `ExportError` if it cannot be
    exported."""
    if graph is None:
        graph = not (isinstance(model, nn.Sequential) and all(not list(m.children()) for m in model))
    if graph:
        body, arrays = model_graph(model)
        out = next(n for n in body["nodes"] if n["name"] == body.get("output", body["nodes"][-1]["name"]))
    else:
        layers, arrays = model_arrays(model)
        body, out = {"layers": layers}, layers[-1]
    num_classes = arrays[out["weight"]].shape[0]
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for a model with {num_classes} outputs")
    meta = dict(meta or {})
    manifest = {
        "qdistill_version": __version__,
        "arch": meta.get("arch"),
        "build": meta.get("build"),
        "bits": _model_bits(model),
        "class_names": class_names,
        "num_classes": int(num_classes),
        "input": {"shape": list(INPUT_SHAPE), "dtype": "float32", "range": [0.0, 1.0]},
        **body,
        "meta": meta,
    }
    try:
        json.dumps(manifest)
    except TypeError as e:
        raise ExportError(f"meta is not JSON-serialisable: {e}") from None
    data, full = qdz.build(manifest, arrays)
    atomic_write_bytes(path, data)
    return full


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str = "best", fmt: str = "qdz") -> dict:
    """Export the model of a run (``best.pt``, or ``checkpoint.pt`` for ``checkpoint="last"``)
    to ``out`` as ``.qdz`` (``fmt="qdz"``) or ONNX (``fmt="onnx"``). Returns the ``.qdz``
    manifest, or for ONNX a small description of the written graph."""
    from ..training.checkpoint import load_model

    if fmt not in ("qdz", "onnx"):
        raise ExportError(f"unknown export format {fmt!r}; choose qdz or onnx")
    model, meta = load_model(run_dir, checkpoint)
    if fmt == "onnx":
        return export_onnx(model, out)
    info = {k: meta.get(k) for k in ("arch", "build", "role")}
    info.update(run=str(Path(run_dir).resolve().name), checkpoint=checkpoint)
    return export_model(model, out, class_names=meta["class_names"], meta=info)
