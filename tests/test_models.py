"""Tests of qdistill.nn.models: every registered model builds, trains a step and is
quantized where (and only where) the model docstrings say; the 32-bit models equal plain torch
networks written here from the documented topology; summary() matches a count by hand."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qdistill.nn import models
from qdistill.nn.layers import QuantAct, QuantConv2d, QuantLinear
from qdistill.nn.quantizers import homework_weight

CONFIGS = [(32, 32, 32), (2, 1, 32), (1, 2, 4)]  # (weight, act, grad) bits
COURSE = [n for n in models.names() if n != "resnet20"]  # the flat course networks: 7 convolutions, 1 linear


def layers_of(model):
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    acts = [m for m in model.modules() if isinstance(m, QuantAct)]
    return convs, linears, acts


def images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_names():
    assert {"vgg7", "vgg7-wide", "dorefa-svhn", "resnet20"} <= set(models.names())


def test_unknown_model_raises_key_error():
    with pytest.raises(KeyError, match="nope"):
        models.build("nope")


def test_unknown_scheme_raises():
    with pytest.raises(ValueError):
        models.build("vgg7", scheme="nope")


@pytest.mark.parametrize("bits", CONFIGS, ids=lambda b: "w{}a{}g{}".format(*b))
@pytest.mark.parametrize("name", COURSE)
def test_build_forward_backward_and_quantized_layers(name, bits):
    wb, ab, gb = bits
    torch.manual_seed(0)
    model = models.build(name, weight_bits=wb, act_bits=ab, grad_bits=gb)
    convs, linears, acts = layers_of(model)
    assert len(convs) == 7 and len(linears) == 1
    # first and last layer stay full precision (DoReFa convention), the rest carry the bits
    assert convs[0].weight_bits == 32 and linears[0].weight_bits == 32
    assert all(c.weight_bits == wb for c in convs[1:])
    assert all(c.grad_bits == gb for c in convs[1:])
    assert all(a.bits == ab for a in acts) and len(acts) >= 6

    act_values = []
    hooks = [a.register_forward_hook(lambda m, i, o: act_values.append(o.detach())) for a in acts]
    out = model(images())
    for h in hooks:
        h.remove()
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    if ab < 32:
        for v in act_values:  # activations lie on the k-bit grid {0, 1/n, ..., 1}
            n = 2**ab - 1
            assert torch.equal(torch.round(v * n) / n, v) and v.min() >= 0 and v.max() <= 1

    F.cross_entropy(out, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # the straight-through estimators carry gradient all the way to the first layer
    assert convs[0].weight.grad.abs().sum() > 0

    for c in convs[1:]:
        wq = c.quantized_weight().detach()
        distinct = torch.unique(wq)
        if wb == 32:
            assert torch.equal(wq, c.weight.detach())
        else:
            assert distinct.numel() <= 2**wb
        if wb == 2:
            assert set(distinct.tolist()) <= set(torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]).tolist())
        if wb == 1:  # +-E with E = mean|w| of the layer
            e = c.weight.detach().abs().mean()
            assert torch.allclose(distinct.abs(), e.expand_as(distinct))
    # the full-precision first layer really is not quantized
    assert torch.unique(convs[0].quantized_weight()).numel() > 2**8


@pytest.mark.parametrize("name", models.names())
def test_quantize_first_last(name):
    model = models.build(name, weight_bits=2, act_bits=2, quantize_first_last=True)
    convs, linears, _ = layers_of(model)
    assert all(m.weight_bits == 2 for m in convs + linears)
    for m in (convs[0], linears[0]):
        assert torch.unique(m.quantized_weight()).numel() <= 4


def test_homework_scheme_vgg7_block_and_first_conv():
    torch.manual_seed(0)
    model = models.build("vgg7", weight_bits=2, act_bits=1, scheme="homework")
    convs, linears, acts = layers_of(model)
    # the course quantizes the first conv too; the classifier stays full precision
    assert [c.weight_bits for c in convs] == [2] * 7 and linears[0].weight_bits == 32
    assert all(c.scheme == "homework" for c in convs)
    first = convs[0]
    assert torch.equal(first.quantized_weight(), homework_weight(first.weight, 2))
    assert torch.unique(first.quantized_weight()).numel() <= 4
    # block: conv, BN without affine, (|a| + 1) x + b, homework activation quantizer
    seq = list(model)
    bn, affine, act = seq[1], seq[2], seq[3]
    assert isinstance(bn, nn.BatchNorm2d) and not bn.affine
    assert isinstance(act, QuantAct) and act.scheme == "homework" and act.bits == 1
    x = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(affine(x), 2 * x)  # a = 1, b = 0 at init: initial scale 2
    with torch.no_grad():
        affine.a.fill_(-0.5)
        affine.b.fill_(0.25)
    assert torch.allclose(affine(x), 1.5 * x + 0.25)
    out = model(images())
    F.cross_entropy(out, torch.arange(4)).backward()
    assert affine.a.grad is not None and torch.isfinite(affine.a.grad).all()


def test_homework_scheme_dorefa_svhn_runs():
    model = models.build("dorefa-svhn", weight_bits=2, act_bits=2, grad_bits=4, scheme="homework")
    convs, linears, _ = layers_of(model)
    assert convs[0].weight_bits == 2 and linears[0].weight_bits == 32
    out = model(images())
    assert out.shape == (4, 10)
    out.sum().backward()


# ---------------------------------------------------------------------------
# 32-bit models equal plain torch networks written from the documented topology
# ---------------------------------------------------------------------------
def plain_vgg7(width):
    c1, c2, c3, c4 = 16 * width, 32 * width, 64 * width, 128 * width

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(
        *block(3, c1), nn.MaxPool2d(2), *block(c1, c2), *block(c2, c2), nn.MaxPool2d(2),
        *block(c2, c3), *block(c3, c3), nn.MaxPool2d(2), *block(c3, c4), *block(c4, c4),
        nn.AvgPool2d(4), nn.Flatten(), nn.Linear(c4, 10))


class _To40(nn.Module):
    def forward(self, x):
        return F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False)


def plain_dorefa_svhn():
    def conv(cin, cout, k, pad):
        return nn.Conv2d(cin, cout, k, padding=pad, bias=False)
    return nn.Sequential(
        _To40(), nn.Conv2d(3, 48, 5, bias=True), nn.MaxPool2d(2), nn.ReLU(),      # 36 -> 18
        conv(48, 64, 3, 1), nn.BatchNorm2d(64), nn.ReLU(),
        conv(64, 64, 3, 1), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU(),      # 9
        conv(64, 128, 3, 0), nn.BatchNorm2d(128), nn.ReLU(),                     # 7
        conv(128, 128, 3, 1), nn.BatchNorm2d(128), nn.ReLU(),
        conv(128, 128, 3, 0), nn.BatchNorm2d(128), nn.ReLU(),                    # 5
        nn.Dropout(0.5),
        conv(128, 512, 5, 0), nn.BatchNorm2d(512), nn.Hardtanh(0.0, 1.0),        # 1
        nn.Flatten(), nn.Linear(512, 10))


@pytest.mark.parametrize("name,plain", [("vgg7", lambda: plain_vgg7(1)),
                                        ("vgg7-wide", lambda: plain_vgg7(4)),
                                        ("dorefa-svhn", plain_dorefa_svhn)])
def test_full_precision_model_equals_plain_network(name, plain):
    torch.manual_seed(0)
    model = models.build(name)
    with torch.no_grad():  # non-trivial BN statistics so eval mode exercises them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ref = plain()
    ref.load_state_dict(model.state_dict())  # strict: same layers at the same positions
    model.eval()
    ref.eval()
    x = images(seed=3)
    assert torch.allclose(model(x), ref(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------
def vgg7_counts(width, wb):
    """Parameter count, fp32 bytes and packed bytes of vgg7 from its topology."""
    chans = [3] + [c * width for c in (16, 32, 32, 64, 64, 128, 128)]
    conv_w = [cin * cout * 9 for cin, cout in zip(chans[:-1], chans[1:])]
    bn_params = 2 * sum(chans[1:])        # gamma, beta
    bn_buffers = 2 * sum(chans[1:])       # running mean, running var (float)
    fc = chans[-1] * 10 + 10
    params = sum(conv_w) + bn_params + fc
    fp32_bytes = 4 * (params + bn_buffers)
    if wb >= 32:
        return params, fp32_bytes, fp32_bytes
    hidden = conv_w[1:]                   # first conv and fc stay fp32
    packed_bits = sum(hidden) * wb + 32 * len(hidden)  # plus one fp32 scale per tensor
    fp32_rest = conv_w[0] + bn_params + bn_buffers + fc
    return params, fp32_bytes, 4 * fp32_rest + math.ceil(packed_bits / 8)


@pytest.mark.parametrize("name,width", [("vgg7", 1), ("vgg7-wide", 4)])
@pytest.mark.parametrize("wb", [32, 2, 1])
def test_summary_matches_count_by_hand(name, width, wb):
    s = models.summary(models.build(name, weight_bits=wb, act_bits=1 if wb < 32 else 32))
    params, fp32_bytes, packed = vgg7_counts(width, wb)
    assert s["params"] == params
    assert s["fp32_bytes"] == fp32_bytes
    assert s["bytes_at_bits"] == packed
    assert s["compression"] == pytest.approx(fp32_bytes / packed)


def test_summary_vgg7_w2a1_numbers():
    s = models.summary(models.build("vgg7", weight_bits=2, act_bits=1))
    # 432 + 4608 + 9216 + 18432 + 36864 + 73728 + 147456 conv weights, 928 BN, 1290 fc
    assert s["params"] == 292_954
    assert s["fp32_bytes"] == 4 * (292_954 + 928)
    # 290304 hidden weights at 2 bits + 6 scales; first conv, BN and fc in fp32
    assert s["bytes_at_bits"] == (290_304 * 2 + 6 * 32) // 8 + 4 * (432 + 928 + 928 + 1290)
    assert s["bytes_at_bits"] < s["fp32_bytes"] and s["compression"] > 10
    bits = [(l["type"], l.get("weight_bits"), l.get("act_bits")) for l in s["layers"]]
    assert [b[1] for b in bits if b[0] != "QuantAct"] == [32, 2, 2, 2, 2, 2, 2, 32]
    assert [b[2] for b in bits if b[0] == "QuantAct"] == [1] * 7


def test_summary_dorefa_svhn_params():
    s = models.summary(models.build("dorefa-svhn"))
    conv = (3 * 48 * 25 + 48) + 48 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * 128 * 128 * 9 \
        + 128 * 512 * 25
    bn = 2 * (64 + 64 + 128 + 128 + 128 + 512)
    assert s["params"] == conv + bn + 512 * 10 + 10


def test_summary_rounds_packed_bits_up_to_whole_bytes():
    # 9 weights at 3 bits + one 32-bit scale = 59 bits -> 8 bytes; the bias stays fp32
    model = nn.Sequential(QuantConv2d(1, 1, 3, bias=True, weight_bits=3))
    s = models.summary(model)
    assert s["params"] == 10
    assert s["fp32_bytes"] == 40
    assert s["bytes_at_bits"] == 4 + 8
