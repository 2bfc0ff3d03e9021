"""Export of graphs (format 3: residual networks) and the engine on them, against PyTorch."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qdistill import deploy
from qdistill.deploy import kernels
from qdistill.errors import ExportError
from qdistill.export.packed import export_model
from qdistill.export.plan import weight_codes
from qdistill.nn.layers import QuantAct, QuantConv2d
from qdistill.nn.models import build
from qdistill.nn.quantizers import FULL

from bounds import U32, U64, gamma, nhwc, within
from qdz_students import CLASSES, eval_images, eval_labels, student

RESNET = ("resnet20", 2, 1, "dorefa")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "resnet.qdz"
    model = student(*RESNET)
    return model, path, export_model(model, path, class_names=CLASSES)


def test_resnet_manifest_is_a_graph_of_version_3(resnet):
    _, path, manifest = resnet
    assert manifest["format_version"] == 3 and "layers" not in manifest
    ops = [n["op"] for n in manifest["nodes"]]
    assert ops.count("add") == 9 and ops.count("quant") == 9 and ops[-3:] == ["global_avgpool", "flatten", "linear"]
    byname = {n["name"]: n for n in manifest["nodes"]}
    # the identity shortcut: one levels tensor read by a conv and an add
    assert byname["add"]["inputs"] == ["stages.0.conv2", "conv"] and byname["stages.0.conv1"]["inputs"] == ["conv"]
    short = byname["stages.3.shortcut.0"]
    assert (short["stride"], short["kernel_h"], short["padding"], short["out"]) == (2, 1, 0, "float")
    assert byname["stages.3.conv1"]["stride"] == 2 and byname["stages.3.conv2"]["out"] == "float"
    assert byname["stages.0.conv1"]["modules"] == ["stages.0.conv1", "stages.0.bn1", "stages.0.relu1"]


def _reference(model: nn.Module) -> nn.Module:
    """The student in float64 computing what the engine computes exactly: each quantized
    conv a plain conv holding ``alpha * (2c - n)`` (export's codes, float64), the first
    conv and the linear layer their float32 weights; BatchNorm, adds and quantizers as they
    are, in float64."""
    ref = copy.deepcopy(model).double().eval()
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                              bias=m.bias is not None)
            if m.bias is not None:
                plain.bias = nn.Parameter(m.bias.detach().double(), requires_grad=False)
            if m.weight_bits < FULL:
                codes, n, alpha = weight_codes(m)
                w = torch.from_numpy((2 * codes - n).astype(np.float64) * alpha)
            else:
                w = m.weight.detach().double()
            plain.weight = nn.Parameter(w, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, plain.double())
    return ref


def _magnitudes(ref: nn.Module, levels_out: dict) -> nn.Module:
    """The same network on absolute values (``|w|``, BatchNorm ``(|x| + |mean|) |scale| + |beta|``),
    each quantizer giving the reference's output: at each op, the sum of the absolute
    values of the terms the float computation rounds (the ``sum |t_i|`` of `bounds`)."""
    absm = copy.deepcopy(ref)
    with torch.no_grad():
        for name, m in absm.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.abs_()
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(-m.running_mean.abs())
                m.weight.abs_()
                m.bias.abs_()
            elif isinstance(m, QuantAct):
                m.register_forward_hook(lambda mod, a, out, name=name: levels_out[name])
    return absm


def _hooked(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """``(inputs, outputs, logits)`` of every activation quantizer, by module name."""
    ins, outs, hooks = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantAct):
            def hook(mod, args, out, name=name):
                ins[name], outs[name] = args[0].detach(), out.detach()
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs, logits


def _check_against_reference(model: nn.Module, path, manifest: dict, x: np.ndarray) -> int:
    """Levels at every quantizer and the logits against `_reference`; returns how many
    quantizers it checked. See `test_resnet_levels_and_logits_against_the_float64_reference`."""
    ref = _reference(model)
    images = torch.from_numpy(x).double()
    ins, outs, want = _hooked(ref, images)
    mag_ins, _, mags = _hooked(_magnitudes(ref, outs), images)
    got = dict(zip((n["name"] for n in manifest["nodes"]), deploy.load(path).trace(x)))
    flagged, checked = np.zeros(len(x), bool), 0
    for node in manifest["nodes"]:
        acts = [m for m in node["modules"] if isinstance(model.get_submodule(m), QuantAct)]
        if not acts:
            continue
        act = model.get_submodule(acts[-1])
        m, u, m_abs = 2**act.bits - 1, ins[acts[-1]], mag_ins[acts[-1]]
        bound = gamma(1100, U64) * (m_abs + 1)
        if node["op"] == "conv_float":
            conv = model.get_submodule(node["modules"][0])
            bound = bound + gamma(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]) * m_abs
        s = u * m + 0.5
        near = nhwc((s - torch.round(s).clamp(1, m)).abs() <= bound * m)
        diff = got[node["name"]] != nhwc(torch.round(outs[acts[-1]] * m)).astype(np.uint8)
        assert not (diff & ~near).any(), f"{node['name']}: a level is off away from a boundary"
        flagged |= diff.any(axis=(1, 2, 3))
        checked += 1
    assert flagged.sum() <= 0.01 * len(x), f"{flagged.sum()} of {len(x)} images flagged"
    fc = model.get_submodule(manifest["nodes"][-1]["modules"][0])
    bound = (gamma(fc.in_features + 2) + gamma(1100, U64)) * mags.numpy()
    within(got[manifest["nodes"][-1]["name"]][~flagged], want.numpy()[~flagged], bound[~flagged],
           f"{type(model).__name__} logits")
    assert np.abs(want.numpy()).max() > 0.1  # not trivially small logits
    return checked


@pytest.mark.parametrize("n", [48])
def test_resnet_levels_and_logits_against_the_float64_reference(resnet, n):
    """ResNet-20 W2A1 on digits. Reference: `_reference`, the same computation in float64.
    The engine's levels equal the reference's at every quantizer except where its input
    ``u`` lies within the derived bound of a level boundary ``(t - 0.5) / m``; such an
    image is flagged (rare: at most 1%). The bound, from `bounds`' gamma_n on ``M``, the
    float64 sum of absolute terms (`_magnitudes`): after the first conv, whose float32 sum
    of ``n = 27`` products moves ``u`` by at most ``gamma_27(u32) M``; everywhere, the
    float64 roundings of both sides, fewer than 1100 on any term (conv sums of up to 576
    terms in the reference, BatchNorm 6, the engine's fold and threshold 8, the add 1, a
    level's value 1, a mean of up to 1024 values): ``gamma_1100(u64) (M + 1)``. On
    unflagged images the levels are equal, so the logits differ by the float tail only:
    the mean (float64) cast to float32 (1 rounding), then ``n = 64`` products and their
    sum with the bias: ``(gamma_(n+2)(u32) + gamma_1100(u64)) M_logits``. Checked to fail
    with one packed weight bit flipped, one float conv's shifts moved by 1% of the largest, and the
    logits x (1 + 1e-5)."""
    model, path, manifest = resnet
    assert _check_against_reference(model, path, manifest, eval_images("resnet20")[:n]) == 19


@pytest.mark.parametrize("cfg", [RESNET, ("vgg7", 2, 1, "dorefa")], ids=lambda c: c[0])
def test_engine_accuracy_equals_torch(cfg, tmp_path):
    """On the same held-out digits, the engine classifies exactly as many images right as
    the PyTorch student (float32), for the residual graph and the chain, and gives the same
    label on all but 1% of the images (the students are barely trained: four steps)."""
    model = student(*cfg)
    x, y = eval_images(cfg[0])[:128], eval_labels(cfg[0])[:128]
    path = tmp_path / "m.qdz"
    export_model(model, path, class_names=CLASSES)
    with torch.no_grad():
        torch_labels = model(torch.from_numpy(x)).argmax(1).numpy()
    labels = deploy.load(path).classify(x)
    assert int((labels == y).sum()) == int((torch_labels == y).sum())
    assert (labels == torch_labels).mean() >= 0.99


def test_fused_unfused_numba_numpy_agree(resnet):
    """The fused residual kernel and the three unfused stages, numba and numpy, give the
    same levels and logits bit for bit (the same float64 operations in the same order)."""
    _, path, manifest = resnet
    x = eval_images("resnet20")[:6]
    runs = [deploy.load(path, b, fuse) for b in kernels.BACKENDS for fuse in (True, False)]
    assert any(type(s.stage).__name__ == "ConvAddQuant" for s in runs[0].steps)
    traces = [r.trace(x) for r in runs]
    for t in traces[1:]:
        for k, (a, b) in enumerate(zip(traces[0], t)):
            if a is not None and b is not None:
                np.testing.assert_array_equal(a, b, err_msg=manifest["nodes"][k]["name"])
    for r in runs:
        np.testing.assert_array_equal(r.predict(x), traces[0][-1])


def test_a_chain_written_as_a_graph_runs_the_same(tmp_path):
    """vgg7 (a Sequential) exported as nodes (format 3) gives the logits of its chain file
    (format 1) bit for bit: the same stages on the same arrays."""
    model = student("vgg7", 2, 1, "dorefa")
    chain = export_model(model, tmp_path / "c.qdz", class_names=CLASSES)
    nodes = export_model(model, tmp_path / "g.qdz", class_names=CLASSES, graph=True)
    assert chain["format_version"] == 1 and "nodes" not in chain
    assert nodes["format_version"] == 3 and [n["op"] for n in nodes["nodes"]] == [s["op"] for s in chain["layers"]]
    x = eval_images("vgg7")[:32]
    np.testing.assert_array_equal(deploy.load(tmp_path / "g.qdz").predict(x),
                                  deploy.load(tmp_path / "c.qdz").predict(x))


class _Net(nn.Module):
    """conv -> BN -> quantizer -> ``body`` -> global mean -> linear."""

    def __init__(self, body):
        super().__init__()
        self.conv = QuantConv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = QuantAct(1)
        self.body = body
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.body(self.act(self.bn(self.conv(x)))).mean((2, 3)))


class _Functional(_Net):
    def forward(self, x):
        return self.fc(torch.sigmoid(self.act(self.bn(self.conv(x)))).mean((2, 3)))


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("net,match", [
    (_Net(nn.Sequential(QuantConv2d(8, 8, 3, padding=1, groups=2, weight_bits=2), nn.BatchNorm2d(8), QuantAct(1))),
     r"layer body\.0 \(QuantConv2d\): grouped convolutions cannot be packed"),
    (_Net(nn.Sequential(QuantConv2d(8, 8, 3, padding=2, dilation=2, weight_bits=2), nn.BatchNorm2d(8),
                        QuantAct(1))), r"layer body\.0 \(QuantConv2d\): dilated"),
    (_Functional(nn.Identity()), r"op sigmoid \(sigmoid\): the engine has no such op"),
    (_Net(nn.Sequential(nn.BatchNorm2d(8))), r"layer body\.0 \(BatchNorm2d\): BatchNorm must follow a convolution"),
    (_Net(nn.Sequential(nn.Sigmoid())), r"layer body\.0 \(Sigmoid\): unsupported layer"),
    (_Net(_Branchy()), "cannot be traced by torch.fx"),
])
def test_unsupported_graph_ops_are_refused_by_name(net, match, tmp_path):
    with pytest.raises(ExportError, match=match) as e:
        export_model(net.eval(), tmp_path / "m.qdz", class_names=CLASSES)
    assert "\n" not in str(e.value) and not (tmp_path / "m.qdz").exists()


def test_a_small_graph_with_mean_and_functional_add(tmp_path):
    """``x.mean((2, 3))``, ``torch.add`` of a float branch (a 1x1 conv) and levels, and a
    float average into the linear layer: the engine against the float64 reference as above."""
    class Net(_Net):
        def forward(self, x):
            a = self.act(self.bn(self.conv(x)))
            return self.fc(torch.add(self.body(a), a).mean((2, 3)))

    torch.manual_seed(0)
    net = Net(nn.Sequential(QuantConv2d(8, 8, 1, weight_bits=2), nn.BatchNorm2d(8))).eval()
    manifest = export_model(net, tmp_path / "m.qdz", class_names=CLASSES)
    assert [n["op"] for n in manifest["nodes"]] == ["conv_float", "conv_packed", "add", "global_avgpool", "linear"]
    assert _check_against_reference(net, tmp_path / "m.qdz", manifest, eval_images("vgg7")[:64]) == 1


def test_a_version_2_reader_refuses_a_graph_and_chains_keep_their_version(resnet, monkeypatch, tmp_path):
    """A graph is format 3, which a reader of versions 1-2 refuses (it would not know the
    nodes); chains keep the version older readers run (1, or 2 with LSQ's in_step), and the
    engine still reads them as chains."""
    _, path, _ = resnet
    lsq = export_model(student("vgg7", 2, 2, "lsq"), tmp_path / "lsq.qdz", class_names=CLASSES)
    assert lsq["format_version"] == 2 and "layers" in lsq
    assert len(deploy.load(tmp_path / "lsq.qdz").steps) == len(lsq["layers"])
    from qdistill.deploy import qdz
    monkeypatch.setattr(qdz, "FORMAT_VERSION", 2)
    deploy.load(tmp_path / "lsq.qdz")
    with pytest.raises(qdz.QdzError, match="newer"):
        deploy.load(path)
