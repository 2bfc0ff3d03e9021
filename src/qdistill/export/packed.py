"""The packed ``.qdz`` file of a trained student, the file the torch-free engine runs.

`model_arrays` walks the blocks of `plan` and turns each into an engine layer: integer
weight codes packed into bit-planes and per-channel thresholds folded from what follows
the conv (see `qdistill.export.plan` for the arithmetic); `export_model` writes them,
with the manifest, as a ``.qdz`` file; `export_run` exports a run's checkpoint as ``.qdz``
or ONNX.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.nn as nn

from .. import __version__
from ..atomic import atomic_write_bytes
from ..deploy import qdz
from ..deploy.engine import INPUT_SHAPE
from ..errors import ExportError
from ..nn.layers import Clip01, QuantAct, QuantConv2d, QuantLinear
from ..nn.quantizers import FULL
from .onnx import export_onnx
from .plan import Block, act_step, f32, fold, plan, thresholds, weight_codes, weight_f32

MAX_BITS = 4  # weight and activation bits the packed format supports: 1..MAX_BITS


def _is_quantized(model: nn.Module) -> bool:
    return any((isinstance(m, QuantAct) and m.bits < FULL)
               or (isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < FULL)
               for m in model.modules())


def _check_bits(bits: int, what: str, where: str) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ExportError(f"{where}: {bits}-bit {what} unsupported by the packed format "
                          f"(supported: 1..{MAX_BITS})")


def _act_bits(block: Block) -> int:
    act = block.act
    if isinstance(act, Clip01):
        raise ExportError(f"{block.where}: clip without quantization is only supported before the last layer")
    _check_bits(act.bits, "activations", block.where)
    return act.bits


@dataclass
class _Packing:
    """The engine's layers and arrays as they are built, block by block, and what flows into
    the next block: ``form`` is ``image`` (the float input), ``levels`` (quantized maps of
    ``bits`` bits, level ``q`` worth ``q / (2**bits - 1)``, or ``q * step`` after an LSQ
    quantizer), ``float`` (float maps), ``vector`` (flat features) or ``logits``, with
    ``c`` channels (or features) of ``h x w``."""
    layers: list[dict] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    form: str = "image"
    bits: int | None = None
    step: float | None = None
    c: int = INPUT_SHAPE[0]
    h: int = INPUT_SHAPE[1]
    w: int = INPUT_SHAPE[2]

    def put(self, block: Block, name: str, array: np.ndarray) -> str:
        """Store ``array`` under the block's name for it; returns that name."""
        key = f"l{block.first}.{name}"
        self.arrays[key] = array
        return key


def _weight_and_bias(pk: _Packing, b: Block) -> dict:
    m = b.module
    return {"weight": pk.put(b, "weight", weight_f32(m)),
            "bias": pk.put(b, "bias", f32(m.bias)) if m.bias is not None else None}


def _resize(pk: _Packing, b: Block) -> dict:
    if pk.form != "image" or pk.layers:
        raise ExportError(f"{b.where}: resize must come first")
    pk.h = pk.w = b.module.size
    return {"op": "resize", "size": int(b.module.size)}


def _conv(pk: _Packing, b: Block) -> dict:
    """A conv on the float input (`_conv_float`) or on levels (`_conv_packed`); its output
    is levels, or floats where the block ends in a clip."""
    conv = b.module
    if conv.groups != 1 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) \
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
            or conv.padding[0] != conv.padding[1]:
        raise ExportError(f"{b.where}: only stride-1, ungrouped convs with symmetric zero "
                          "padding are supported")
    if conv.in_channels != pk.c:
        raise ExportError(f"{b.where}: expects {conv.in_channels} channels, gets {pk.c}")
    pad = int(conv.padding[0])
    kh, kw = conv.kernel_size
    pk.h, pk.w = pk.h + 2 * pad - kh + 1, pk.w + 2 * pad - kw + 1
    spec = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, padding=pad,
                kernel_h=int(kh), kernel_w=int(kw), pool=b.pool)
    if pk.form == "image":
        spec.update(_conv_float(pk, b))
    elif pk.form == "levels":
        spec.update(_conv_packed(pk, b))
    else:
        raise ExportError(f"{b.where}: a convolution after pooling to floats is unsupported")
    pk.c = conv.out_channels
    pk.h, pk.w = pk.h // b.pool, pk.w // b.pool
    pk.form, pk.bits = ("float", None) if isinstance(b.act, Clip01) else ("levels", b.act.bits)
    pk.step = act_step(b.act)
    if pk.h < 1 or pk.w < 1:
        raise ExportError(f"{b.where}: the feature map vanishes ({pk.h}x{pk.w})")
    return spec


def _conv_float(pk: _Packing, b: Block) -> dict:
    """The first conv: float weights on the float image, thresholds on its float output."""
    out_bits = _act_bits(b)
    p, q = fold(b, np.ones(b.module.out_channels), np.zeros(b.module.out_channels))
    thr, sign = thresholds(p, q, out_bits, integer=False, step=act_step(b.act))
    return {"op": "conv_float", **_weight_and_bias(pk, b), "out_bits": out_bits,
            "thresholds": pk.put(b, "thresholds", thr), "sign": pk.put(b, "sign", sign)}


def _conv_packed(pk: _Packing, b: Block) -> dict:
    """A conv on levels: bit-planes of its weight codes and, from its integer accumulator,
    thresholds to the next levels (or the affine map before a clip)."""
    conv = b.module
    if not isinstance(conv, QuantConv2d) or conv.weight_bits >= FULL:
        raise ExportError(f"{b.where}: a convolution on quantized activations needs "
                          f"1..{MAX_BITS}-bit weights, this one is full precision")
    _check_bits(conv.weight_bits, "weights", b.where)
    codes, n, alpha = weight_codes(conv)
    scale = alpha / (2**pk.bits - 1) if pk.step is None else alpha * pk.step
    spec = {"op": "conv_packed", "in_bits": pk.bits, "weight_bits": conv.weight_bits,
            "scheme": conv.scheme, "code_offset": n, "scale": scale,
            "planes": pk.put(b, "planes", qdz.pack_codes(codes, max(conv.weight_bits, 1)))}
    bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(conv.out_channels)
    p, q = fold(b, np.full(conv.out_channels, scale), bias)
    if isinstance(b.act, Clip01):
        spec.update(out="float_clip", mul=pk.put(b, "mul", p), add=pk.put(b, "add", q), clip=[0.0, 1.0])
    else:
        out_bits = _act_bits(b)
        thr, sign = thresholds(p, q, out_bits, integer=True, step=act_step(b.act))
        spec.update(out="levels", out_bits=out_bits, thresholds=pk.put(b, "thresholds", thr),
                    sign=pk.put(b, "sign", sign))
    return spec


def _avgpool(pk: _Packing, b: Block) -> dict:
    if pk.form not in ("levels", "float"):
        raise ExportError(f"{b.where}: average pooling needs feature maps")
    spec = {"op": "avgpool", "kernel": b.pool, "in_bits": pk.bits}
    if pk.step is not None:
        spec["in_step"] = pk.step  # LSQ levels: q * step, not q / (2**bits - 1)
    pk.h, pk.w, pk.form, pk.bits, pk.step = pk.h // b.pool, pk.w // b.pool, "float", None, None
    return spec


def _flatten(pk: _Packing, b: Block) -> dict:
    if pk.form == "levels":
        raise ExportError(f"{b.where}: flattening quantized levels is unsupported; pool first")
    pk.c, pk.h, pk.w, pk.form = pk.c * pk.h * pk.w, 1, 1, "vector"
    return {"op": "flatten"}


def _linear(pk: _Packing, b: Block) -> dict:
    lin = b.module
    if pk.form != "vector" or lin.in_features != pk.c:
        raise ExportError(f"{b.where}: expects {lin.in_features} features, gets {pk.c} ({pk.form})")
    spec = {"op": "linear", **_weight_and_bias(pk, b)}
    pk.c, pk.form = lin.out_features, "logits"
    return spec


_BLOCKS = {"resize": _resize, "conv": _conv, "avgpool": _avgpool, "flatten": _flatten, "linear": _linear}


def model_arrays(model: nn.Module) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The engine's layer list and arrays for ``model`` (see `qdistill.export.plan`)."""
    blocks = plan(model)
    if not _is_quantized(model):
        raise ExportError("the model is full precision (32-bit weights and activations); "
                          "export packs low-bit students only")
    pk = _Packing()
    for b in blocks:
        pk.layers.append({"op": None, "modules": [b.first, b.last], **_BLOCKS[b.kind](pk, b)})
    if pk.form != "logits":
        raise ExportError("the model must end in a linear layer")
    return pk.layers, pk.arrays


def _model_bits(model: nn.Module) -> dict:
    convs = [m for m in model if isinstance(m, QuantConv2d)][1:]
    acts = [m for m in model if isinstance(m, QuantAct)]
    schemes = sorted({m.scheme for m in model if isinstance(m, (QuantConv2d, QuantAct))})
    return {"weight_bits": sorted({m.weight_bits for m in convs}),
            "act_bits": sorted({m.bits for m in acts}), "schemes": schemes}


def export_model(model: nn.Module, path: str | Path, *, class_names, meta: dict | None = None) -> dict:
    """Write ``model`` (a quantized student from `qdistill.nn.models.build`) as a ``.qdz`` file
    at ``path`` (atomically) and return its manifest. `ExportError` if it cannot be
    exported."""
    layers, arrays = model_arrays(model)
    num_classes = arrays[layers[-1]["weight"]].shape[0]
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for a model with {num_classes} outputs")
    meta = dict(meta or {})
    manifest = {
        "qdistill_version": __version__,
        "arch": meta.get("arch", getattr(model, "arch", None)),
        "build": meta.get("build"),
        "bits": _model_bits(model),
        "class_names": class_names,
        "num_classes": int(num_classes),
        "input": {"shape": list(INPUT_SHAPE), "dtype": "float32", "range": [0.0, 1.0]},
        "layers": layers,
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
