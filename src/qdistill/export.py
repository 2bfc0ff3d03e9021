"""Export a trained student: the packed ``.qdz`` file the torch-free engine runs, and ONNX.

Weights. Every quantized weight is affine in an integer code ``c`` in ``0..n``:

* dorefa, k >= 2: ``w = (2c - n) / n``,         ``n = 2**k - 1``, ``alpha = 1 / n``
* dorefa, k = 1:  ``w = E * (2c - 1)``,          ``n = 1``,        ``alpha = E = mean|w|``
* homework:       ``w = s * (2c - n) / (2n)``,   ``n = 2**k - 1``, ``alpha = s / (2n)``

so ``w = alpha * (2c - n)``. On input levels ``q`` (activation ``q / m``, ``m = 2**a - 1``)
a conv gives ``conv = (alpha / m) * A + bias`` with the integer accumulator
``A = sum q * (2c - n)`` (see `qdistill.deploy.kernels`).

Thresholds. What follows the conv up to the activation quantizer (bias, BatchNorm with
running statistics, the homework block's ``(|a| + 1) * x + b`` and its ``0.1 *``) is affine
per channel, ``u = P * A + Q``, and the quantizer outputs level
``round(clamp(u, 0, 1) * m')``, i.e. the number of ``t`` in ``1..m'`` with
``u >= (t - 0.5) / m'``. For ``P > 0`` that is ``A >= ceil(((t - 0.5) / m' - Q) / P)``;
for ``P < 0`` the inequality flips (stored as ``-A >= ...``, the direction flag ``sign``);
for ``P = 0`` the level is constant. Max-pooling commutes with the (monotone) quantizer,
so it runs on the levels wherever it sits in the block.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .atomic import atomic_write_bytes
from .deploy import qdz
from .errors import ExportError
from .models import AbsAffine, Clip01, Resize
from .quant import FULL, QuantAct, QuantConv2d, QuantLinear

MAX_BITS = 4  # weight and activation bits the packed format supports: 1..MAX_BITS
_INT_LIMIT = 2**31 - 1
INPUT_SHAPE = (3, 32, 32)


# ---------------------------------------------------------------- weight codes

def weight_codes(conv: nn.Module) -> tuple[np.ndarray, int, float]:
    """``(codes, n, alpha)`` of a quantized conv, with ``quantized_weight() == alpha * (2c - n)``
    (see the module docstring). The codes are checked to reproduce torch's quantized
    weights bit for bit."""
    bits, scheme = conv.weight_bits, conv.scheme
    with torch.no_grad():
        wq = conv.quantized_weight().detach().float().cpu()
        if scheme == "dorefa" and bits == 1:
            e = conv.weight.detach().float().abs().mean()
            codes = (conv.weight.detach() >= 0).to(torch.int64)
            n, alpha = 1, float(e)
            rebuilt = torch.where(codes == 1, e, -e)
        elif scheme == "dorefa":
            n = 2**bits - 1
            codes = torch.round((wq * n + n) / 2).to(torch.int64)
            alpha = 1.0 / n
            rebuilt = (2 * codes - n).float() / n
        else:  # homework: wq = ((2c - n) / n) * (0.5 * s)
            n = 2**bits - 1
            half_s = 0.5 * (2 * torch.tanh(conv.weight.detach().float()).abs().mean())
            codes = torch.round((wq / half_s * n + n) / 2).to(torch.int64)
            alpha = float(half_s) / n
            rebuilt = ((2 * codes - n).float() / n) * half_s
    if codes.min() < 0 or codes.max() > max(n, 1) or not torch.equal(rebuilt, wq):
        raise ExportError(f"internal: weight codes do not reproduce the {scheme} {bits}-bit weights")
    return codes.numpy(), n, alpha


# ---------------------------------------------------------------- the plan: blocks of the Sequential

@dataclass
class Block:
    """A conv and what follows it up to its activation, or a single other layer."""
    kind: str                      # resize, conv, avgpool, flatten, linear
    first: int                     # index of its first module in the Sequential
    last: int                      # index of its last module
    module: nn.Module | None = None
    bn: nn.BatchNorm2d | None = None
    affine: AbsAffine | None = None
    act: nn.Module | None = None   # QuantAct or Clip01
    pool: int = 1


def _pool_size(m: nn.Module, where: str) -> int:
    k, s = m.kernel_size, m.stride
    k = k if isinstance(k, int) else k[0] if len(set(k)) == 1 else None
    s = s if isinstance(s, int) else s[0] if len(set(s)) == 1 else None
    pad = m.padding if isinstance(m.padding, int) else max(m.padding)
    dil = getattr(m, "dilation", 1)
    dil = dil if isinstance(dil, int) else max(dil)
    if k is None or s != k or pad != 0 or dil != 1 or m.ceil_mode:
        raise ExportError(f"{where}: unsupported pooling {m} (need square kernel == stride, no padding)")
    return k


def plan(model: nn.Module) -> list[Block]:
    """Group the flat ``nn.Sequential`` into blocks the engine runs; `ExportError` on a
    layer it cannot run."""
    if not isinstance(model, nn.Sequential):
        raise ExportError(f"export needs a qdistill model (a flat nn.Sequential), got {type(model).__name__}")
    mods = list(model)
    blocks: list[Block] = []
    i = 0
    while i < len(mods):
        m = mods[i]
        where = f"layer {i} ({type(m).__name__})"
        if isinstance(m, nn.Dropout):
            i += 1
            continue
        if isinstance(m, Resize):
            blocks.append(Block("resize", i, i, m))
        elif isinstance(m, nn.Conv2d):
            block = Block("conv", i, i, m)
            j = i + 1
            while j < len(mods) and block.act is None:
                x = mods[j]
                if isinstance(x, nn.Dropout):
                    pass
                elif isinstance(x, nn.BatchNorm2d) and block.bn is None and block.affine is None \
                        and block.pool == 1:
                    block.bn = x
                elif isinstance(x, AbsAffine) and block.affine is None and block.pool == 1:
                    block.affine = x
                elif isinstance(x, nn.MaxPool2d) and block.pool == 1:
                    block.pool = _pool_size(x, f"layer {j}")
                elif isinstance(x, (QuantAct, Clip01)):
                    block.act = x
                else:
                    break
                j += 1
            if block.act is None:
                raise ExportError(f"{where}: a convolution must be followed by an activation "
                                  f"quantizer (found {type(mods[j]).__name__ if j < len(mods) else 'the end'})")
            while j < len(mods) and isinstance(mods[j], nn.Dropout):
                j += 1
            if j < len(mods) and isinstance(mods[j], nn.MaxPool2d):
                if block.pool != 1 or isinstance(block.act, Clip01):
                    raise ExportError(f"layer {j}: unsupported second max-pool in a block")
                block.pool = _pool_size(mods[j], f"layer {j}")
                j += 1
            block.last = j - 1
            blocks.append(block)
            i = j
            continue
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise ExportError(f"{where}: divisor_override is not supported")
            blocks.append(Block("avgpool", i, i, m, pool=_pool_size(m, where)))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ExportError(f"{where}: only Flatten(1, -1) is supported")
            blocks.append(Block("flatten", i, i, m))
        elif isinstance(m, nn.Linear):
            if i != len(mods) - 1:
                raise ExportError(f"{where}: a linear layer must be the last layer")
            blocks.append(Block("linear", i, i, m))
        else:
            raise ExportError(f"{where}: unsupported layer for export")
        i += 1
    return blocks


def _is_quantized(model: nn.Module) -> bool:
    return any((isinstance(m, QuantAct) and m.bits < FULL)
               or (isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < FULL)
               for m in model.modules())


# ---------------------------------------------------------------- folding

def _fold(block: Block, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compose ``u = p * v + q`` (``v`` the conv's accumulator or float output) with the
    block's BatchNorm (running stats), ``(|a| + 1) * x + b`` and homework's ``0.1 *``."""
    if block.bn is not None:
        bn = block.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ExportError(f"layer {block.first}: BatchNorm without running statistics")
        f64 = lambda t: t.detach().double().cpu().numpy()
        g = f64(bn.weight) if bn.weight is not None else 1.0
        beta = f64(bn.bias) if bn.bias is not None else 0.0
        scale = g / np.sqrt(f64(bn.running_var) + bn.eps)
        p, q = p * scale, (q - f64(bn.running_mean)) * scale + beta
    if block.affine is not None:
        c = block.affine.a.detach().double().abs().numpy() + 1
        p, q = p * c, q * c + block.affine.b.detach().double().numpy()
    if isinstance(block.act, QuantAct) and block.act.scheme == "homework":
        p, q = 0.1 * p, 0.1 * q
    return p, q


def thresholds(p: np.ndarray, q: np.ndarray, bits: int, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(thr, sign)`` with ``level = #{t : sign * v >= thr[t]}`` equal to
    ``round(clamp(p * v + q, 0, 1) * m)``, ``m = 2**bits - 1``, per channel (rows).

    ``T_t = ((t - 0.5) / m - q) / p``; ``p > 0``: ``v >= T_t``; ``p < 0``: ``-v >= -T_t``;
    ``p = 0``: always or never. For integer ``v`` the bound becomes ``ceil``."""
    m = 2**bits - 1
    cut = (np.arange(1, m + 1) - 0.5) / m                   # (m,)
    sign = np.where(p < 0, -1, 1).astype(np.int8)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (cut[None, :] - q[:, None]) / p[:, None]        # (channels, m)
    t = t * sign[:, None]
    const = (p == 0)[:, None]
    always = q[:, None] >= cut[None, :]
    if integer:
        t = np.where(const, np.where(always, -_INT_LIMIT, _INT_LIMIT), np.ceil(np.nan_to_num(t)))
        return np.clip(t, -_INT_LIMIT, _INT_LIMIT).astype(np.int32), sign
    return np.where(const, np.where(always, -np.inf, np.inf), t).astype(np.float64), sign


# ---------------------------------------------------------------- .qdz

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


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32)


def model_arrays(model: nn.Module) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The engine's layer list and arrays for ``model`` (see the module docstring)."""
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
                p, q = _fold(b, np.ones(conv.out_channels), np.zeros(conv.out_channels))
                thr, sign = thresholds(p, q, out_bits, integer=False)
                arrays[f"{key}.weight"] = _f32(weight)
                if conv.bias is not None:
                    arrays[f"{key}.bias"] = _f32(conv.bias)
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
                p, q = _fold(b, np.full(conv.out_channels, scale), bias)
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
            arrays[f"{key}.weight"] = _f32(weight)
            if lin.bias is not None:
                arrays[f"{key}.bias"] = _f32(lin.bias)
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
    """Write ``model`` (a quantized student from `qdistill.models.build`) as a ``.qdz`` file
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
    from .runs import load_model

    if fmt not in ("qdz", "onnx"):
        raise ExportError(f"unknown export format {fmt!r}; choose qdz or onnx")
    model, meta = load_model(run_dir, checkpoint)
    if fmt == "onnx":
        return export_onnx(model, out)
    info = {k: meta.get(k) for k in ("arch", "build", "role")}
    info.update(run=str(Path(run_dir).resolve().name), checkpoint=checkpoint)
    return export_model(model, out, class_names=meta["class_names"], meta=info)


# ---------------------------------------------------------------- ONNX

ONNX_OPSET = 17


def export_onnx(model: nn.Module, path: str | Path) -> dict:
    """Write the fake-quantized ``model`` as an ONNX graph (input ``images`` float32
    ``(N, 3, 32, 32)``, output ``logits``): weights as their quantized float values,
    activation quantizers as ``Clip``, ``Mul``, ``Round``, ``Div``; BatchNorm with its
    running statistics. Needs the ``onnx`` package (``pip install qdistill[export]``)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'qdistill[export]'") from None
    if not isinstance(model, nn.Sequential):
        raise ExportError(f"export needs a qdistill model (a flat nn.Sequential), got {type(model).__name__}")
    nodes, inits = [], []
    counter = [0]

    def const(name, value, dtype=np.float32):
        arr = np.asarray(value, dtype=dtype)
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op, inputs, **attrs):
        counter[0] += 1
        out = f"t{counter[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{counter[0]}", **attrs))
        return out

    def quantize(x, bits, key):
        n = float(2**bits - 1)
        x = node("Mul", [x, const(f"{key}.n", n)])
        return node("Div", [node("Round", [x]), f"{key}.n"])

    cur = "images"
    out_classes = None
    with torch.no_grad():
        for i, m in enumerate(model):
            key = f"l{i}"
            if isinstance(m, nn.Dropout):
                continue
            if isinstance(m, Resize):
                if cur != "images":
                    raise ExportError(f"layer {i}: resize must come first")
                s = m.size / INPUT_SHAPE[1]
                cur = node("Resize", [cur, "", const(f"{key}.scales", [1.0, 1.0, s, s])], mode="linear",
                           coordinate_transformation_mode="pytorch_half_pixel")
            elif isinstance(m, nn.Conv2d):
                if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
                    raise ExportError(f"layer {i}: unsupported convolution for ONNX export")
                weight = m.quantized_weight() if isinstance(m, QuantConv2d) else m.weight
                ins = [cur, const(f"{key}.weight", _f32(weight))]
                if m.bias is not None:
                    ins.append(const(f"{key}.bias", _f32(m.bias)))
                ph, pw = m.padding
                cur = node("Conv", ins, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                           dilations=list(m.dilation), pads=[ph, pw, ph, pw])
            elif isinstance(m, nn.BatchNorm2d):
                ch = m.num_features
                g = _f32(m.weight) if m.weight is not None else np.ones(ch, np.float32)
                b = _f32(m.bias) if m.bias is not None else np.zeros(ch, np.float32)
                cur = node("BatchNormalization", [cur, const(f"{key}.scale", g), const(f"{key}.b", b),
                                                  const(f"{key}.mean", _f32(m.running_mean)),
                                                  const(f"{key}.var", _f32(m.running_var))],
                           epsilon=float(m.eps))
            elif isinstance(m, AbsAffine):
                ch = m.a.numel()
                cur = node("Mul", [cur, const(f"{key}.a", _f32(m.a.abs() + 1).reshape(1, ch, 1, 1))])
                cur = node("Add", [cur, const(f"{key}.b", _f32(m.b).reshape(1, ch, 1, 1))])
            elif isinstance(m, QuantAct):
                if m.scheme == "homework":
                    cur = node("Mul", [cur, const(f"{key}.tenth", 0.1)])
                    cur = node("Clip", [cur, const(f"{key}.lo", 0.0), const(f"{key}.hi", 1.0)])
                    if m.bits < FULL:
                        cur = quantize(cur, m.bits, key)
                elif m.bits < FULL:
                    cur = node("Clip", [cur, const(f"{key}.lo", 0.0), const(f"{key}.hi", 1.0)])
                    cur = quantize(cur, m.bits, key)
                else:
                    cur = node("Relu", [cur])
            elif isinstance(m, Clip01):
                cur = node("Clip", [cur, const(f"{key}.lo", 0.0), const(f"{key}.hi", 1.0)])
            elif isinstance(m, nn.ReLU):
                cur = node("Relu", [cur])
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                k = _pool_size(m, f"layer {i}")
                cur = node("MaxPool" if isinstance(m, nn.MaxPool2d) else "AveragePool", [cur],
                           kernel_shape=[k, k], strides=[k, k])
            elif isinstance(m, nn.Flatten):
                cur = node("Flatten", [cur], axis=1)
            elif isinstance(m, nn.Linear):
                weight = m.quantized_weight() if isinstance(m, QuantLinear) else m.weight
                ins = [cur, const(f"{key}.weight", _f32(weight))]
                if m.bias is not None:
                    ins.append(const(f"{key}.bias", _f32(m.bias)))
                cur = node("Gemm", ins, transB=1)
                out_classes = m.out_features
            else:
                raise ExportError(f"layer {i} ({type(m).__name__}): unsupported for ONNX export")
    if out_classes is None:
        raise ExportError("the model must end in a linear layer")
    nodes.append(helper.make_node("Identity", [cur], ["logits"], name="output"))
    graph = helper.make_graph(
        nodes, "qdistill", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_classes])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="qdistill", producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 8)  # readable by older runtimes
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return {"format": "onnx", "opset": ONNX_OPSET, "nodes": len(nodes), "path": str(path)}
