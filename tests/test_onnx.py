"""ONNX export of the fake-quantized model, run with onnxruntime, against PyTorch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from qdistill.errors import ExportError
from qdistill.export.onnx import export_onnx
from qdistill.export.plan import plan
from qdistill.nn.layers import Clip01, QuantAct
from qdistill.nn.models import build

from bounds import Ref, block_ref, first_differences, nhwc, within
from qdz_students import CONFIGS, eval_images, levels, student, torch_trace

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run(path, x, extra=()):
    """ONNX Runtime's outputs: the logits, then the tensors named in ``extra``."""
    model = onnx.load(str(path))
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})


def _outputs_of(model, nodes, kinds) -> list[tuple[int, str]]:
    """``(module index, tensor name)``: the ``nodes`` (graph order) matched in order with
    the modules of types ``kinds`` (module order)."""
    mods = [i for i, m in enumerate(model) if isinstance(m, kinds)]
    assert len(mods) == len(nodes)
    return [(i, n.output[0]) for i, n in zip(mods, nodes)]


def _check_segments(model, start, x, values, logits, what):
    """Float layers checked one segment at a time: ``values`` lists ``(module index,
    output)`` at nonlinear steps (ReLU, max-pool, clip), ``logits`` is the last module's
    output, ``x`` the output of module ``start``. Each output is within the derived
    float32 bound (`bounds.Ref`) of the float64 run of the modules since the previous
    one, on the implementation's own previous output. (Bounding a whole deep network at
    once compounds the worst case layer over layer into a bound too loose to test.)"""
    for i, v in [*values, (len(model) - 1, logits)]:
        want, bound = Ref(x).run(model[start + 1:i + 1]).value("f32")
        within(v, want, bound, what)
        start, x = i, v


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1:] in ((2, 1, "dorefa"), (2, 1, "homework"), (1, 2, "dorefa"),
                                                                (2, 2, "lsq"), (3, 2, "lsq"))],
                         ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}-{c[3]}")
def test_onnx_matches_torch(cfg, tmp_path):
    """The graph holds the quantized weights and the quantizers as Clip, Mul, Round, Div
    (LSQ: Div, Clip, Round, Mul), and computes PyTorch's function. Every quantizer's
    levels (the Round outputs) equal PyTorch's, on an image until its first difference,
    except where the pre-activation
    is within the derived float32 bound (`bounds.Ref`, any float32 implementation: ONNX
    Runtime and PyTorch alike) of a threshold; such images are flagged. On the others
    (at least 90%) the float layers after the last quantizer are within the derived
    bound of their float64 PyTorch run (`_check_segments`), ONNX Runtime's as PyTorch's.
    Checked to fail when the exported graph scales one conv weight or the linear bias
    by 1.01."""
    model = student(*cfg)
    x = eval_images(cfg[0])[:100]
    info = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"Conv", "Round", "Clip", "Gemm"} <= ops and info["opset"] >= 13
    inputs, outputs, want = torch_trace(model, x)
    nodes = list(graph.node)
    rounds = [k for k, n in enumerate(nodes) if n.op_type == "Round"]
    acts = _outputs_of(model, [nodes[k] for k in rounds], QuantAct)
    clips = _outputs_of(model, [n for n in nodes[rounds[-1]:] if n.op_type == "Clip"], Clip01)
    got, *ort_out = _run(tmp_path / "m.onnx", x, [name for _, name in acts + clips])
    ort_levels, ort_clips = ort_out[:len(acts)], ort_out[len(acts):]
    assert got.shape == want.shape
    images = torch.from_numpy(x)
    blocks = plan(model)
    resize = next((b.first for b in blocks if b.kind == "resize"), None)
    flagged = np.zeros(len(x), bool)
    for (qi, _), lv in zip(acts, ort_levels):
        block = next(b for b in blocks if b.kind == "conv" and b.first <= qi <= b.last)
        flagged = first_differences(
            nhwc(torch.from_numpy(lv)) != levels(outputs[qi], model[qi]), flagged,
            lambda rows: block_ref(model, block.first, qi, images, inputs, ("f32",), resize, rows).near(
                ("f32",), spread=False), f"layer {qi}")
    ok = ~flagged
    assert ok.mean() >= 0.9  # not vacuous (here at most 1 of 100 is flagged)
    last = acts[-1][0]
    start = outputs[last][ok]  # the levels q / m, ONNX Runtime's on these images
    _check_segments(model, last, start, [(i, v[ok]) for (i, _), v in zip(clips, ort_clips)], got[ok], "onnx")
    _check_segments(model, last, start, [(i, outputs[i][ok]) for i, _ in clips], want[ok], "onnx: torch")
    # the stored conv weights take at most 2^k values: they are the quantized ones
    conv_w = [i for i in graph.initializer if i.name.endswith(".weight") and len(i.dims) == 4]
    assert len(np.unique(onnx.numpy_helper.to_array(conv_w[2]))) <= 2**cfg[1]


@pytest.mark.slow
def test_onnx_runtime_and_matplotlib_write_nothing_in_home(tmp_path):
    """A process with a fresh $HOME opens an ONNX Runtime session and finds a font. Without the
    suite's variables (`conftest`) it writes into $HOME (matplotlib always: ~/.cache/matplotlib/;
    ONNX Runtime where its telemetry is on: ~/.cache/Microsoft/); with them $HOME stays empty and
    matplotlib's font list is in the session's temp folder."""
    import subprocess
    import sys
    code = ("import sys, onnxruntime, matplotlib.font_manager as fm; fm.findfont('DejaVu Sans'); "
            "onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
    model = tmp_path / "identity.onnx"
    x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(model))

    def home_after(env):
        home = tmp_path / f"home{len(list(tmp_path.glob('home*')))}"
        home.mkdir()
        proc = subprocess.run([sys.executable, "-c", code, str(model)], env={**env, "HOME": str(home)},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return sorted(str(p.relative_to(home)) for p in home.rglob("*"))

    plain = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "MPLCONFIGDIR")}
    assert ".cache/matplotlib" in home_after(plain)  # the control: this check can fail
    assert home_after(dict(os.environ)) == []
    assert list((Path(os.environ["QD_TEST_SHARED"]) / "matplotlib").glob("fontlist-*.json"))


def test_full_precision_teacher_exports_to_onnx(tmp_path):
    """A full-precision model: segment by segment (`_check_segments`, split at every ReLU
    and max-pool), ONNX Runtime's and PyTorch's outputs within the derived float32 bound
    of the float64 run on their own previous outputs. Checked to fail when the exported
    graph scales one conv weight by 1.01."""
    torch.manual_seed(0)
    model = build("vgg7").eval()
    x = eval_images("vgg7")[:8]
    export_onnx(model, tmp_path / "t.onnx")
    inputs, outputs, want = torch_trace(model, x)
    nodes = [n for n in onnx.load(str(tmp_path / "t.onnx")).graph.node if n.op_type in ("Relu", "MaxPool")]
    bounds_at = [i for i, m in enumerate(model) if isinstance(m, (QuantAct, nn.MaxPool2d))]
    assert [n.op_type for n in nodes] == ["Relu" if isinstance(model[i], QuantAct) else "MaxPool" for i in bounds_at]
    got, *ort_out = _run(tmp_path / "t.onnx", x, [n.output[0] for n in nodes])
    _check_segments(model, -1, x, list(zip(bounds_at, ort_out)), got, "onnx teacher")
    _check_segments(model, -1, x, [(i, outputs[i]) for i in bounds_at], want, "onnx teacher: torch")


class _Bessel(nn.Module):
    """An op that ONNX lacks: the modified Bessel function I0."""

    def forward(self, x):
        return torch.special.i0(x).mean((2, 3)).repeat(1, 4)[:, :10]


def test_onnx_refuses_what_torch_cannot_export(tmp_path):
    """One ExportError line naming the op; nothing written."""
    with pytest.raises(ExportError, match="aten::i0") as e:
        export_onnx(_Bessel(), tmp_path / "x.onnx")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.onnx").exists()
