"""ONNX export of any student (or teacher): the fake-quantized model through
``torch.onnx.export``.

The model is copied with its quantized layers made plain (`plain`): a `QuantConv2d` or
`QuantLinear` becomes ``nn.Conv2d`` / ``nn.Linear`` holding its quantized weights, a
`QuantAct` the scheme's ONNX form (`qdistill.nn.schemes.Scheme.onnx_activation`:
``Clip``, ``Mul``, ``Round``, ``Div``, or LSQ's ``Div``, ``Clip``, ``Round``, ``Mul``), the
same float operations as training's forward. Everything else (residual adds, pooling,
BatchNorm with its running statistics, a user's own modules) is exported by torch as it
is. torch's TorchScript-based exporter (``dynamo=False``) is used: it exports these
networks in about 0.1 s where the ``torch.export`` one takes 3-7 s and needs onnxscript.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..atomic import atomic_write_bytes
from ..errors import ExportError
from ..nn.layers import QuantAct, QuantConv2d, QuantLinear
from .plan import act_step

ONNX_OPSET = 17


class OnnxAct(nn.Module):
    """An activation quantizer in standard operators (`Scheme.onnx_activation`)."""

    def __init__(self, act: QuantAct):
        super().__init__()
        self.fn = act.quant.onnx_activation(act.bits, act_step(act))
        self.describe = f"bits={act.bits}, scheme={act.scheme}"

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.describe


def _plain_layer(m: nn.Module) -> nn.Module:
    """A quantized conv or linear layer as torch's own, holding the quantized weights."""
    with torch.no_grad():
        if isinstance(m, QuantConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups, m.bias is not None, m.padding_mode)
        else:
            new = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        new.weight.copy_(m.quantized_weight())
        if m.bias is not None:
            new.bias.copy_(m.bias)
    return new


def plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every quantized layer made plain (see the
    module docstring); ``model`` is unchanged."""
    model = copy.deepcopy(model).cpu().float().eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            new = _plain_layer(m)
        elif isinstance(m, QuantAct):
            new = OnnxAct(m)
        else:
            continue
        parent, _, child = name.rpartition(".")
        if not name:
            return new
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _to_onnx(model: nn.Module) -> bytes:
    """The ONNX bytes of ``model`` (input ``images`` ``(N, 3, 32, 32)``, output ``logits``)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notice that it is not the default
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    return buf.getvalue()


def export_onnx(model: nn.Module, path: str | Path) -> dict:
    """Write the fake-quantized ``model`` as an ONNX graph (input ``images`` float32
    ``(N, 3, 32, 32)``, output ``logits``): weights as their quantized float values, the
    activation quantizers as standard operators, BatchNorm with its running statistics
    (``PRESERVE`` mode keeps it a node rather than folding it into the convolutions'
    weights). Needs the ``onnx`` package (``pip install qdistill[export]``)."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'qdistill[export]'") from None
    try:
        data = _to_onnx(plain(model))
    except ExportError:
        raise
    except Exception as e:  # torch's exporter raises many kinds on a layer it cannot express
        raise ExportError(f"torch.onnx.export cannot export this model: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    proto = onnx.load_from_string(data)
    proto.producer_name, proto.producer_version = "qdistill", __version__
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return {"format": "onnx", "opset": ONNX_OPSET, "nodes": len(proto.graph.node), "path": str(path)}
