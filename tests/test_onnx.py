"""ONNX export of the fake-quantized model, run with onnxruntime, against PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from qdistill.errors import ExportError
from qdistill.export import export_onnx
from qdistill.models import build

from qdz_students import CONFIGS, eval_images, student

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1:] in ((2, 1, "dorefa"), (2, 1, "homework"), (1, 2, "dorefa"))],
                         ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}-{c[3]}")
def test_onnx_matches_torch(cfg, tmp_path):
    """Logits within 1e-4 of PyTorch's: the graph holds the quantized weights and the
    quantizers as Clip, Mul, Round, Div."""
    model = student(*cfg)
    x = eval_images(cfg[0])[:100]
    info = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"Conv", "Round", "Clip", "Gemm"} <= ops and info["opset"] >= 13
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = _run(tmp_path / "m.onnx", x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
    # the stored conv weights take at most 2^k values: they are the quantized ones
    conv_w = [i for i in graph.initializer if i.name.endswith(".weight") and len(i.dims) == 4]
    assert len(np.unique(onnx.numpy_helper.to_array(conv_w[2]))) <= 2**cfg[1]


def test_full_precision_teacher_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = build("vgg7").eval()
    x = eval_images("vgg7")[:8]
    export_onnx(model, tmp_path / "t.onnx")
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(_run(tmp_path / "t.onnx", x) - want).max() < 1e-4


def test_onnx_refuses_unknown_layers(tmp_path):
    with pytest.raises(ExportError, match="Sigmoid"):
        export_onnx(nn.Sequential(nn.Flatten(), nn.Sigmoid()), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
