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
from ..nn.layers import AbsAffine, Clip01, QuantAct, QuantConv2d, QuantLinear, Resize
from ..nn.quantizers import FULL
from .plan import f32, pool_size

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
                ins = [cur, const(f"{key}.weight", f32(weight))]
                if m.bias is not None:
                    ins.append(const(f"{key}.bias", f32(m.bias)))
                ph, pw = m.padding
                cur = node("Conv", ins, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                           dilations=list(m.dilation), pads=[ph, pw, ph, pw])
            elif isinstance(m, nn.BatchNorm2d):
                ch = m.num_features
                g = f32(m.weight) if m.weight is not None else np.ones(ch, np.float32)
                b = f32(m.bias) if m.bias is not None else np.zeros(ch, np.float32)
                cur = node("BatchNormalization", [cur, const(f"{key}.scale", g), const(f"{key}.b", b),
                                                  const(f"{key}.mean", f32(m.running_mean)),
                                                  const(f"{key}.var", f32(m.running_var))],
                           epsilon=float(m.eps))
            elif isinstance(m, AbsAffine):
                ch = m.a.numel()
                cur = node("Mul", [cur, const(f"{key}.a", f32(m.a.abs() + 1).reshape(1, ch, 1, 1))])
                cur = node("Add", [cur, const(f"{key}.b", f32(m.b).reshape(1, ch, 1, 1))])
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
                k = pool_size(m, f"layer {i}")
                cur = node("MaxPool" if isinstance(m, nn.MaxPool2d) else "AveragePool", [cur],
                           kernel_shape=[k, k], strides=[k, k])
            elif isinstance(m, nn.Flatten):
                cur = node("Flatten", [cur], axis=1)
            elif isinstance(m, nn.Linear):
                weight = m.quantized_weight() if isinstance(m, QuantLinear) else m.weight
                ins = [cur, const(f"{key}.weight", f32(weight))]
                if m.bias is not None:
                    ins.append(const(f"{key}.bias", f32(m.bias)))
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
