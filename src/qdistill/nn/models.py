"""Architectures and their registry: ``build(name, **kwargs)`` and ``names()``.

Every model is a flat ``nn.Sequential`` read top to bottom, so a reader (and export,
and fused training) walks it layer by layer. Inputs are 32x32 images in [0, 1].

Quantized models follow the DoReFa convention: the first and the last layer keep
full-precision weights unless ``quantize_first_last=True``; the ``"homework"`` scheme
quantizes the first convolution, as the course baseline did. The ``"lsq"`` scheme puts
LSQ's quantizers wherever DoReFa's are (weights of 2..8 bits, activations 1..8). ``grad_bits`` applies to
the hidden convolutions, where the reference applies ``fg``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .layers import AbsAffine, Clip01, MaxPool2d, QuantAct, QuantConv2d, QuantLinear, Resize
from .quantizers import FULL, check_scheme

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, *, weight_bits: int = FULL, act_bits: int = FULL, grad_bits: int = FULL,
          scheme: str = "dorefa", quantize_first_last: bool = False, num_classes: int = 10,
          in_channels: int = 3) -> nn.Module:
    """Build a registered model. Raises ``KeyError`` naming the known models."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}")
    spec = _Spec(weight_bits, act_bits, grad_bits, check_scheme(scheme), quantize_first_last)
    model = _REGISTRY[name](spec, num_classes=num_classes, in_channels=in_channels)
    model.arch = name
    return model


class _Spec:
    """The bit-widths of one model and the layer makers that apply them."""

    def __init__(self, weight_bits, act_bits, grad_bits, scheme, quantize_first_last):
        self.weight_bits, self.act_bits, self.grad_bits = weight_bits, act_bits, grad_bits
        self.scheme = scheme
        # DoReFa's activation quantizer in the plain [BN, act] pairs; LSQ's own there
        self.act_scheme = "lsq" if scheme == "lsq" else "dorefa"
        self.edge_bits = weight_bits if quantize_first_last else FULL

    def conv(self, cin, cout, k, padding, *, first=False, bias=False):
        quantize_edge = first and self.scheme == "homework"
        bits = self.weight_bits if (not first or quantize_edge) else self.edge_bits
        return QuantConv2d(cin, cout, k, padding=padding, bias=bias, weight_bits=bits,
                           grad_bits=FULL if first else self.grad_bits, scheme=self.scheme)

    def linear(self, cin, cout):
        return QuantLinear(cin, cout, weight_bits=self.edge_bits, scheme=self.scheme)

    def norm_act(self, channels):
        """BatchNorm then the activation; for the homework scheme BN has no affine
        parameters and is followed by the learned ``(|a| + 1) * x + b``."""
        if self.scheme == "homework":
            return [nn.BatchNorm2d(channels, affine=False), AbsAffine(channels),
                    QuantAct(self.act_bits, "homework")]
        return [nn.BatchNorm2d(channels), QuantAct(self.act_bits, self.act_scheme)]


def _vgg7(spec: _Spec, num_classes: int, in_channels: int, width: int) -> nn.Sequential:
    c1, c2, c3, c4 = (16 * width, 32 * width, 64 * width, 128 * width)
    layers: list[nn.Module] = [spec.conv(in_channels, c1, 3, 1, first=True), *spec.norm_act(c1),
                               MaxPool2d(2)]
    for cin, cout, pool in ((c1, c2, False), (c2, c2, True), (c2, c3, False), (c3, c3, True),
                            (c3, c4, False), (c4, c4, False)):
        layers += [spec.conv(cin, cout, 3, 1), *spec.norm_act(cout)]
        if pool:
            layers.append(MaxPool2d(2))
    layers += [nn.AvgPool2d(4), nn.Flatten(), spec.linear(c4, num_classes)]
    return nn.Sequential(*layers)


@register("vgg7")
def vgg7(spec, num_classes=10, in_channels=3):
    """conv3x3 16, maxpool 2, conv 32, conv 32, maxpool, conv 64, conv 64, maxpool,
    conv 128, conv 128, avgpool 4, linear: the course's teacher and student."""
    return _vgg7(spec, num_classes, in_channels, width=1)


@register("vgg7-wide")
def vgg7_wide(spec, num_classes=10, in_channels=3):
    """vgg7 with 4x the channels: the "large teacher" option."""
    return _vgg7(spec, num_classes, in_channels, width=4)


@register("dorefa-svhn")
def dorefa_svhn(spec, num_classes=10, in_channels=3):
    """The SVHN network of DoReFa-Net's reference implementation (40x40 input, so the
    32x32 image is resized first). Its last conv is followed by ``clamp(x, 0, 1)`` as
    this project's spec states; the reference uses ``min(1, |x|)`` there."""
    if spec.scheme == "homework":
        act = lambda c: [nn.BatchNorm2d(c, affine=False), AbsAffine(c), QuantAct(spec.act_bits, "homework")]
        bn = lambda c: [nn.BatchNorm2d(c, affine=False), AbsAffine(c)]
    else:
        act = lambda c: [nn.BatchNorm2d(c), QuantAct(spec.act_bits, spec.act_scheme)]
        bn = lambda c: [nn.BatchNorm2d(c)]
    return nn.Sequential(
        Resize(40),
        spec.conv(in_channels, 48, 5, 0, first=True, bias=True), MaxPool2d(2),
        QuantAct(spec.act_bits, spec.act_scheme),
        spec.conv(48, 64, 3, 1), *act(64),
        spec.conv(64, 64, 3, 1), *bn(64), MaxPool2d(2), QuantAct(spec.act_bits, spec.scheme),
        spec.conv(64, 128, 3, 0), *act(128),
        spec.conv(128, 128, 3, 1), *act(128),
        spec.conv(128, 128, 3, 0), *act(128),
        nn.Dropout(0.5),
        spec.conv(128, 512, 5, 0), *bn(512), Clip01(),
        nn.Flatten(), spec.linear(512, num_classes),
    )


def summary(model: nn.Module) -> dict:
    """Parameter count, the bits of every layer, and the model's size in bytes with
    quantized weights stored at their bit-width (plus one fp32 scale per quantized
    tensor; everything else fp32), next to its fp32 size."""
    layers = []
    params = sum(p.numel() for p in model.parameters())
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    fp32_bytes = sum(v.numel() * 4 for v in state.values())
    packed_bits = 0
    quantized = set()
    for name, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            wb = m.weight_bits
            layers.append({"name": name, "type": type(m).__name__, "weight_bits": wb,
                           "grad_bits": m.grad_bits, "params": m.weight.numel()})
            if wb < FULL:
                quantized.add(f"{name}.weight" if name else "weight")
                packed_bits += m.weight.numel() * wb + 32
        elif isinstance(m, QuantAct):
            layers.append({"name": name, "type": "QuantAct", "act_bits": m.bits})
    other = sum(v.numel() * 4 for k, v in state.items() if k not in quantized)
    bytes_at_bits = other + (packed_bits + 7) // 8
    return {"params": params, "fp32_bytes": fp32_bytes, "bytes_at_bits": bytes_at_bits,
            "compression": fp32_bytes / bytes_at_bits, "layers": layers}
