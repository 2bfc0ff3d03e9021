"""Each block of a plan as an engine op: its manifest entry and arrays.

A builder takes the `Packing` of its input (what flows in: ``form`` ``image``, ``levels``
of ``bits`` bits worth ``q / (2**bits - 1)`` or ``q * step`` after an LSQ quantizer,
``float`` maps, a ``vector`` of features or ``logits``; ``c`` channels of ``h x w``),
stores its arrays, turns the packing into its output's and returns its manifest entry.
The arithmetic (weight codes, folding, thresholds) is `qdistill.export.plan`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch.nn as nn

from ..deploy import qdz
from ..deploy.engine import INPUT_SHAPE
from ..errors import ExportError
from ..nn import PACKED_MAX_BITS
from ..nn.layers import Clip01, QuantConv2d
from ..nn.quantizers import FULL
from .plan import Block, act_step, f32, fold, thresholds, weight_codes, weight_f32

MAX_BITS = PACKED_MAX_BITS  # weight and activation bits the packed format supports: 1..MAX_BITS


@dataclass
class Packing:
    """What flows between blocks (see the module docstring), and the arrays stored so far
    (shared by every packing of one export)."""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    form: str = "image"
    bits: int | None = None
    step: float | None = None
    c: int = INPUT_SHAPE[0]
    h: int = INPUT_SHAPE[1]
    w: int = INPUT_SHAPE[2]

    def put(self, block: Block, name: str, array: np.ndarray) -> str:
        """Store ``array`` under the block's name for it; returns that name."""
        key = f"{block.key}.{name}"
        self.arrays[key] = array
        return key

    def copy(self) -> "Packing":
        """The same state, sharing the arrays (a graph's branches each get one)."""
        return replace(self)


def check_bits(bits: int, what: str, where: str) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ExportError(f"{where}: {bits}-bit {what} unsupported by the packed format "
                          f"(supported: 1..{MAX_BITS})")


def _act_bits(block: Block) -> int:
    act = block.act
    if isinstance(act, Clip01):
        raise ExportError(f"{block.where}: clip without quantization is only supported before the last layer")
    check_bits(act.bits, "activations", block.where)
    return act.bits


def _weight_and_bias(pk: Packing, b: Block) -> dict:
    m = b.module
    return {"weight": pk.put(b, "weight", weight_f32(m)),
            "bias": pk.put(b, "bias", f32(m.bias)) if m.bias is not None else None}


def resize(pk: Packing, b: Block) -> dict:
    if pk.form != "image" or (pk.h, pk.w) != INPUT_SHAPE[1:]:
        raise ExportError(f"{b.where}: resize must come first")
    pk.h = pk.w = b.module.size
    return {"op": "resize", "size": int(b.module.size)}


def _conv_geometry(conv: nn.Conv2d, where: str) -> tuple[int, int]:
    """``(padding, stride)`` of a conv the engine runs; `ExportError` naming what it cannot."""
    if conv.groups != 1:
        raise ExportError(f"{where}: grouped convolutions cannot be packed")
    if tuple(conv.dilation) != (1, 1):
        raise ExportError(f"{where}: dilated convolutions cannot be packed")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1]:
        raise ExportError(f"{where}: only symmetric zero padding can be packed")
    if conv.stride[0] != conv.stride[1]:
        raise ExportError(f"{where}: unequal strides cannot be packed")
    return int(conv.padding[0]), int(conv.stride[0])


def conv(pk: Packing, b: Block) -> dict:
    """A conv on the float input (`_conv_float`) or on levels (`_conv_packed`); its output
    is levels, floats where the block ends in a clip, or (no activation: a residual
    branch) the float ``A * mul + add``. ``Ho = (H + 2p - k) // s + 1``, then the pool."""
    m = b.module
    pad, stride = _conv_geometry(m, b.where)
    if m.in_channels != pk.c:
        raise ExportError(f"{b.where}: expects {m.in_channels} channels, gets {pk.c}")
    kh, kw = m.kernel_size
    pk.h, pk.w = (pk.h + 2 * pad - kh) // stride + 1, (pk.w + 2 * pad - kw) // stride + 1
    spec = dict(in_channels=m.in_channels, out_channels=m.out_channels, padding=pad,
                kernel_h=int(kh), kernel_w=int(kw), pool=b.pool)
    if stride != 1:
        spec["stride"] = stride  # absent at 1, so chains keep the bytes of older files
    if pk.form == "image":
        spec.update(_conv_float(pk, b))
    elif pk.form == "levels":
        spec.update(_conv_packed(pk, b))
    else:
        raise ExportError(f"{b.where}: a convolution on {pk.form} values is unsupported")
    pk.c = m.out_channels
    pk.h, pk.w = pk.h // b.pool, pk.w // b.pool
    if b.act is None or isinstance(b.act, Clip01):
        pk.form, pk.bits, pk.step = "float", None, None
    else:
        pk.form, pk.bits, pk.step = "levels", b.act.bits, act_step(b.act)
    if pk.h < 1 or pk.w < 1:
        raise ExportError(f"{b.where}: the feature map vanishes ({pk.h}x{pk.w})")
    return spec


def _conv_float(pk: Packing, b: Block) -> dict:
    """The first conv: float weights on the float image, thresholds on its float output."""
    if b.act is None:
        raise ExportError(f"{b.where}: the first convolution must be followed by an activation quantizer")
    out_bits = _act_bits(b)
    p, q = fold(b, np.ones(b.module.out_channels), np.zeros(b.module.out_channels))
    thr, sign = thresholds(p, q, out_bits, integer=False, step=act_step(b.act))
    return {"op": "conv_float", **_weight_and_bias(pk, b), "out_bits": out_bits,
            "thresholds": pk.put(b, "thresholds", thr), "sign": pk.put(b, "sign", sign)}


def _conv_packed(pk: Packing, b: Block) -> dict:
    """A conv on levels: bit-planes of its weight codes and, from its integer accumulator,
    thresholds to the next levels (or the affine map before a clip, or with no activation)."""
    m = b.module
    if not isinstance(m, QuantConv2d) or m.weight_bits >= FULL:
        raise ExportError(f"{b.where}: a convolution on quantized activations needs "
                          f"1..{MAX_BITS}-bit weights, this one is full precision")
    check_bits(m.weight_bits, "weights", b.where)
    codes, n, alpha = weight_codes(m)
    scale = alpha / (2**pk.bits - 1) if pk.step is None else alpha * pk.step
    spec = {"op": "conv_packed", "in_bits": pk.bits, "weight_bits": m.weight_bits,
            "scheme": m.scheme, "code_offset": n, "scale": scale,
            "planes": pk.put(b, "planes", qdz.pack_codes(codes, max(m.weight_bits, 1)))}
    bias = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(m.out_channels)
    p, q = fold(b, np.full(m.out_channels, scale), bias)
    if b.act is None:
        if b.pool != 1:
            raise ExportError(f"{b.where}: a max-pool needs an activation quantizer before the next layer")
        spec.update(out="float", mul=pk.put(b, "mul", p), add=pk.put(b, "add", q))
    elif isinstance(b.act, Clip01):
        spec.update(out="float_clip", mul=pk.put(b, "mul", p), add=pk.put(b, "add", q), clip=[0.0, 1.0])
    else:
        out_bits = _act_bits(b)
        thr, sign = thresholds(p, q, out_bits, integer=True, step=act_step(b.act))
        spec.update(out="levels", out_bits=out_bits, thresholds=pk.put(b, "thresholds", thr),
                    sign=pk.put(b, "sign", sign))
    return spec


def _levels_in(pk: Packing, spec: dict) -> dict:
    """How a pooling op reads its input: ``in_bits`` (null for floats), LSQ's ``in_step``."""
    spec["in_bits"] = pk.bits
    if pk.step is not None:
        spec["in_step"] = pk.step  # LSQ levels: q * step, not q / (2**bits - 1)
    return spec


def avgpool(pk: Packing, b: Block) -> dict:
    if pk.form not in ("levels", "float"):
        raise ExportError(f"{b.where}: average pooling needs feature maps")
    spec = _levels_in(pk, {"op": "avgpool", "kernel": b.pool})
    pk.h, pk.w, pk.form, pk.bits, pk.step = pk.h // b.pool, pk.w // b.pool, "float", None, None
    return spec


def global_avgpool(pk: Packing, b: Block, flat: bool) -> dict:
    """The mean over the whole map (``AdaptiveAvgPool2d(1)``; ``flat``: ``x.mean((2, 3))``)."""
    if pk.form not in ("levels", "float"):
        raise ExportError(f"{b.where}: average pooling needs feature maps")
    spec = _levels_in(pk, {"op": "global_avgpool", "flat": flat})
    pk.h, pk.w, pk.bits, pk.step = 1, 1, None, None
    pk.form = "vector" if flat else "float"
    return spec


def maxpool(pk: Packing, b: Block) -> dict:
    if pk.form not in ("levels", "float"):
        raise ExportError(f"{b.where}: max pooling needs feature maps")
    pk.h, pk.w = pk.h // b.pool, pk.w // b.pool
    return {"op": "maxpool", "kernel": b.pool}


def clip(pk: Packing, b: Block) -> dict:
    if pk.form != "float":
        raise ExportError(f"{b.where}: clip needs float maps (it stands before the last layer)")
    return {"op": "clip", "clip": [0.0, 1.0]}


def quant(pk: Packing, b: Block) -> dict:
    """The activation quantizer on a float map (after a residual add): float64 thresholds
    of ``plan.thresholds`` with ``p = prescale``, ``q = 0`` (`plan.fold` of nothing)."""
    if pk.form != "float":
        raise ExportError(f"{b.where}: an activation quantizer on {pk.form} values is unsupported")
    bits = _act_bits(b)
    p, q = fold(b, np.ones(pk.c), np.zeros(pk.c))
    thr, sign = thresholds(p, q, bits, integer=False, step=act_step(b.act))
    pk.form, pk.bits, pk.step = "levels", bits, act_step(b.act)
    return {"op": "quant", "channels": pk.c, "out_bits": bits, "thresholds": pk.put(b, "thresholds", thr),
            "sign": pk.put(b, "sign", sign)}


def add(a: Packing, b: Packing, where: str) -> tuple[Packing, dict]:
    """``a + b`` in full precision: float maps, or levels at their value."""
    for pk in (a, b):
        if pk.form not in ("levels", "float"):
            raise ExportError(f"{where}: adding {pk.form} values is unsupported")
    if (a.c, a.h, a.w) != (b.c, b.h, b.w):
        raise ExportError(f"{where}: adds {a.c}x{a.h}x{a.w} to {b.c}x{b.h}x{b.w}")
    spec = {"op": "add", "in_bits": [a.bits, b.bits], "in_step": [a.step, b.step]}
    out = a.copy()
    out.form, out.bits, out.step = "float", None, None
    return out, spec


def flatten(pk: Packing, b: Block) -> dict:
    if pk.form == "levels":
        raise ExportError(f"{b.where}: flattening quantized levels is unsupported; pool first")
    pk.c, pk.h, pk.w, pk.form = pk.c * pk.h * pk.w, 1, 1, "vector"
    return {"op": "flatten"}


def linear(pk: Packing, b: Block) -> dict:
    lin = b.module
    if pk.form != "vector" or lin.in_features != pk.c:
        raise ExportError(f"{b.where}: expects {lin.in_features} features, gets {pk.c} ({pk.form})")
    spec = {"op": "linear", **_weight_and_bias(pk, b)}
    pk.c, pk.form = lin.out_features, "logits"
    return spec
