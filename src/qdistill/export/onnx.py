"""ONNX export of a trained student: the fake-quantized model as a standard ONNX graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..atomic import atomic_write_bytes
from ..deploy.engine import INPUT_SHAPE
from ..errors import ExportError
from ..nn.layers import AbsAffine, Clip01, QuantAct, Resize
from ..nn.quantizers import FULL
from .plan import act_step, f32, pool_size, weight_f32

ONNX_OPSET = 17


class _Graph:
    """The nodes and initializers of the graph being built: node ``k`` (from 1) is
    ``{op}_{k}`` with output ``t{k}``, the constants of layer ``i`` are ``l{i}.{name}``."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []

    def const(self, i: int, name: str, value) -> str:
        full = f"l{i}.{name}"
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=np.float32), full))
        return full

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        k = len(self.nodes) + 1
        self.nodes.append(self.helper.make_node(op, inputs, [f"t{k}"], name=f"{op}_{k}", **attrs))
        return f"t{k}"

    def clip01(self, x: str, i: int, hi: float = 1.0) -> str:
        return self.node("Clip", [x, self.const(i, "lo", 0.0), self.const(i, "hi", hi)])

    def quantize(self, x: str, i: int, bits: int) -> str:
        """``round(x * n) / n``, ``n = 2**bits - 1``."""
        x = self.node("Mul", [x, self.const(i, "n", float(2**bits - 1))])
        return self.node("Div", [self.node("Round", [x]), f"l{i}.n"])


def _weight_inputs(g: _Graph, m: nn.Module, i: int, x: str) -> list[str]:
    """The inputs of a Conv or Gemm: ``x``, the (quantized) weight, the bias if any."""
    ins = [x, g.const(i, "weight", weight_f32(m))]
    if m.bias is not None:
        ins.append(g.const(i, "bias", f32(m.bias)))
    return ins


def _resize(g: _Graph, m: Resize, i: int, x: str) -> str:
    if x != "images":
        raise ExportError(f"layer {i}: resize must come first")
    s = m.size / INPUT_SHAPE[1]
    return g.node("Resize", [x, "", g.const(i, "scales", [1.0, 1.0, s, s])], mode="linear",
                  coordinate_transformation_mode="pytorch_half_pixel")


def _conv(g: _Graph, m: nn.Conv2d, i: int, x: str) -> str:
    if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise ExportError(f"layer {i}: unsupported convolution for ONNX export")
    ins = _weight_inputs(g, m, i, x)
    ph, pw = m.padding
    return g.node("Conv", ins, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                  dilations=list(m.dilation), pads=[ph, pw, ph, pw])


def _batchnorm(g: _Graph, m: nn.BatchNorm2d, i: int, x: str) -> str:
    ch = m.num_features
    gamma = f32(m.weight) if m.weight is not None else np.ones(ch, np.float32)
    beta = f32(m.bias) if m.bias is not None else np.zeros(ch, np.float32)
    return g.node("BatchNormalization", [x, g.const(i, "scale", gamma), g.const(i, "b", beta),
                                         g.const(i, "mean", f32(m.running_mean)),
                                         g.const(i, "var", f32(m.running_var))],
                  epsilon=float(m.eps))


def _abs_affine(g: _Graph, m: AbsAffine, i: int, x: str) -> str:
    shape = (1, m.a.numel(), 1, 1)
    x = g.node("Mul", [x, g.const(i, "a", f32(m.a.abs() + 1).reshape(shape))])
    return g.node("Add", [x, g.const(i, "b", f32(m.b).reshape(shape))])


def _quant_act(g: _Graph, m: QuantAct, i: int, x: str) -> str:
    """``q(clamp(0.1 * x, 0, 1))`` (homework) or ``q(clamp(x, 0, 1))`` (dorefa), ``q`` the
    rounding to ``bits`` bits; LSQ's ``round(clamp(x / s, 0, 2**bits - 1)) * s`` (Div, Clip,
    Round, Mul: torch's order); at 32 bits homework's clamp without ``q``, dorefa's and
    LSQ's ReLU."""
    if m.scheme == "lsq" and m.bits < FULL:
        s = g.const(i, "step", act_step(m))
        x = g.node("Round", [g.clip01(g.node("Div", [x, s]), i, float(2**m.bits - 1))])
        return g.node("Mul", [x, s])
    if m.scheme == "homework":
        x = g.clip01(g.node("Mul", [x, g.const(i, "tenth", 0.1)]), i)
    elif m.bits < FULL:
        x = g.clip01(x, i)
    else:
        return g.node("Relu", [x])
    return g.quantize(x, i, m.bits) if m.bits < FULL else x


def _pool(g: _Graph, m: nn.Module, i: int, x: str) -> str:
    k = pool_size(m, f"layer {i}")
    return g.node("MaxPool" if isinstance(m, nn.MaxPool2d) else "AveragePool", [x],
                  kernel_shape=[k, k], strides=[k, k])


# Each layer's nodes, by the first type that matches: (g, layer, its index, input) -> output.
_LAYERS = [
    (nn.Dropout, lambda g, m, i, x: x),
    (Resize, _resize),
    (nn.Conv2d, _conv),
    (nn.BatchNorm2d, _batchnorm),
    (AbsAffine, _abs_affine),
    (QuantAct, _quant_act),
    (Clip01, lambda g, m, i, x: g.clip01(x, i)),
    (nn.ReLU, lambda g, m, i, x: g.node("Relu", [x])),
    ((nn.MaxPool2d, nn.AvgPool2d), _pool),
    (nn.Flatten, lambda g, m, i, x: g.node("Flatten", [x], axis=1)),
    (nn.Linear, lambda g, m, i, x: g.node("Gemm", _weight_inputs(g, m, i, x), transB=1)),
]


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
    g = _Graph(helper, numpy_helper)
    x = "images"
    with torch.no_grad():
        for i, m in enumerate(model):
            emit = next((emit for kinds, emit in _LAYERS if isinstance(m, kinds)), None)
            if emit is None:
                raise ExportError(f"layer {i} ({type(m).__name__}): unsupported for ONNX export")
            x = emit(g, m, i, x)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if not linears:
        raise ExportError("the model must end in a linear layer")
    g.nodes.append(helper.make_node("Identity", [x], ["logits"], name="output"))
    graph = helper.make_graph(
        g.nodes, "qdistill", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", linears[-1].out_features])], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="qdistill", producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 8)  # readable by older runtimes
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return {"format": "onnx", "opset": ONNX_OPSET, "nodes": len(g.nodes), "path": str(path)}
