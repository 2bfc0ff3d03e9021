"""The packed ``.qdz`` file of a trained student, the file the torch-free engine runs.

`model_arrays` walks the blocks of `plan` and turns each into an engine layer: integer
weight codes packed into bit-planes and per-channel thresholds folded from what follows
the conv (see `qdistill.export.plan` for the arithmetic); `export_model` writes them,
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
from ..nn.layers import Clip01, QuantAct, QuantConv2d, QuantLinear
from ..nn.quantizers import FULL
from .onnx import export_onnx
from .plan import Block, f32, fold, plan, thresholds, weight_codes

MAX_BITS = 4  # weight and activation bits the packed format supports: 1..MAX_BITS


def _is_quantized(model: nn.Module) -> bool:
    return any((isinstance(m, QuantAct) and m.bits < FULL)
               or (isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < FULL)
               for m in model.modules())


def _check_bits(bits: int, what: str, where: str) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ExportError(f"{where}: {bits}-bit {what} unsupported by the packed format "
                          f"(supported: 1..{MAX_BITS})")


def _act_bits(block: Block, where: str) -> int:
    act = block.act
    if isinstance(act, Clip01):
        raise ExportError(f"{where}: clip without quantization is only supported before the last layer")
    _check_bits(act.bits, "activations", where)
    return act.bits


def model_arrays(model: nn.Module) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The engine's layer list and arrays for ``model`` (see `qdistill.export.plan`)."""
    blocks = plan(model)
    if not _is_quantized(model):
        raise ExportError("the model is full precision (32-bit weights and activations); "
                          "export packs low-bit students only")
    layers: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    state = "image"          # image (float NCHW), levels, float maps, vector
    in_bits = None
    c, h, w = INPUT_SHAPE
    for b in blocks:
        where = f"layer {b.first} ({type(b.module).__name__})"
        key = f"l{b.first}"
        spec = {"op": None, "modules": [b.first, b.last]}
        if b.kind == "resize":
            if state != "image" or layers:
                raise ExportError(f"{where}: resize must come first")
            spec.update(op="resize", size=int(b.module.size))
            h = w = b.module.size
        elif b.kind == "conv":
            conv = b.module
            if conv.groups != 1 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) \
                    or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
                    or conv.padding[0] != conv.padding[1]:
                raise ExportError(f"{where}: only stride-1, ungrouped convs with symmetric zero "
                                  "padding are supported")
            if conv.in_channels != c:
                raise ExportError(f"{where}: expects {conv.in_channels} channels, gets {c}")
            pad = int(conv.padding[0])
            kh, kw = conv.kernel_size
            h, w = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
            bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(conv.out_channels)
            spec.update(in_channels=conv.in_channels, out_channels=conv.out_channels, padding=pad,
                        kernel_h=int(kh), kernel_w=int(kw), pool=b.pool)
            if state == "image":
                out_bits = _act_bits(b, where)
                weight = conv.quantized_weight() if isinstance(conv, QuantConv2d) else conv.weight
                p, q = fold(b, np.ones(conv.out_channels), np.zeros(conv.out_channels))
                thr, sign = thresholds(p, q, out_bits, integer=False)
                arrays[f"{key}.weight"] = f32(weight)
                if conv.bias is not None:
                    arrays[f"{key}.bias"] = f32(conv.bias)
                arrays[f"{key}.thresholds"], arrays[f"{key}.sign"] = thr, sign
                spec.update(op="conv_float", weight=f"{key}.weight",
                            bias=f"{key}.bias" if conv.bias is not None else None,
                            out_bits=out_bits, thresholds=f"{key}.thresholds", sign=f"{key}.sign")
            elif state == "levels":
                if not isinstance(conv, QuantConv2d) or conv.weight_bits >= FULL:
                    raise ExportError(f"{where}: a convolution on quantized activations needs "
                                      f"1..{MAX_BITS}-bit weights, this one is full precision")
                _check_bits(conv.weight_bits, "weights", where)
                codes, n, alpha = weight_codes(conv)
                scale = alpha / (2**in_bits - 1)
                arrays[f"{key}.planes"] = qdz.pack_codes(codes, max(conv.weight_bits, 1))
                spec.update(op="conv_packed", in_bits=in_bits, weight_bits=conv.weight_bits,
                            scheme=conv.scheme, code_offset=n, scale=scale, planes=f"{key}.planes")
                p, q = fold(b, np.full(conv.out_channels, scale), bias)
                if isinstance(b.act, Clip01):
                    arrays[f"{key}.mul"], arrays[f"{key}.add"] = p, q
                    spec.update(out="float_clip", mul=f"{key}.mul", add=f"{key}.add", clip=[0.0, 1.0])
                else:
                    out_bits = _act_bits(b, where)
                    thr, sign = thresholds(p, q, out_bits, integer=True)
                    arrays[f"{key}.thresholds"], arrays[f"{key}.sign"] = thr, sign
                    spec.update(out="levels", out_bits=out_bits, thresholds=f"{key}.thresholds",
                                sign=f"{key}.sign")
            else:
                raise ExportError(f"{where}: a convolution after pooling to floats is unsupported")
            c = conv.out_channels
            h, w = h // b.pool, w // b.pool
            state = "float" if isinstance(b.act, Clip01) else "levels"
            in_bits = None if state == "float" else b.act.bits
            if h < 1 or w < 1:
                raise ExportError(f"{where}: the feature map vanishes ({h}x{w})")
        elif b.kind == "avgpool":
            if state not in ("levels", "float"):
                raise ExportError(f"{where}: average pooling needs feature maps")
            spec.update(op="avgpool", kernel=b.pool, in_bits=in_bits)
            h, w, state, in_bits = h // b.pool, w // b.pool, "float", None
        elif b.kind == "flatten":
            if state == "levels":
                raise ExportError(f"{where}: flattening quantized levels is unsupported; pool first")
            spec.update(op="flatten")
            c, h, w, state = c * h * w, 1, 1, "vector"
        elif b.kind == "linear":
            lin = b.module
            if state != "vector" or lin.in_features != c:
                raise ExportError(f"{where}: expects {lin.in_features} features, gets {c} ({state})")
            weight = lin.quantized_weight() if isinstance(lin, QuantLinear) else lin.weight
            arrays[f"{key}.weight"] = f32(weight)
            if lin.bias is not None:
                arrays[f"{key}.bias"] = f32(lin.bias)
            spec.update(op="linear", weight=f"{key}.weight",
                        bias=f"{key}.bias" if lin.bias is not None else None)
            c, state = lin.out_features, "logits"
        layers.append(spec)
    if state != "logits":
        raise ExportError("the model must end in a linear layer")
    return layers, arrays


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
