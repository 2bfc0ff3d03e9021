"""Architectures and their registry: ``build(name, **kwargs)`` and ``names()``.

Two kinds of record. The course networks (``vgg7``, ``vgg7-wide``, ``dorefa-svhn``) are
flat ``nn.Sequential`` stacks built layer by layer for a scheme (`_Spec`): the homework
scheme's blocks differ from the others'. Float networks (``resnet20``, and a user's own
through `qdistill.nn.reference`) are built in float and quantized by
`qdistill.nn.quantize.quantize`. Inputs are 32x32 images in [0, 1].

Quantized models follow the DoReFa convention: the first and the last layer keep
full-precision weights unless ``quantize_first_last=True``; the ``"homework"`` scheme
quantizes the first convolution, as the course baseline did. The ``"lsq"`` scheme puts
LSQ's quantizers wherever DoReFa's are (weights of 2..8 bits, activations 1..8). ``grad_bits`` applies to
the hidden convolutions, where the reference applies ``fg``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from . import reference, schemes
from .layers import Clip01, MaxPool2d, QuantAct, QuantConv2d, QuantLinear, Resize
from .quantize import quantize
from .quantizers import FULL


@dataclass(frozen=True)
class Record:
    """One registered model: ``make(spec, num_classes, in_channels)`` for a course network,
    or ``make(num_classes, in_channels)`` giving a float network to quantize."""
    make: Callable[..., nn.Module]
    course: bool


_REGISTRY: dict[str, Record] = {}


def register(name: str, course: bool = True):
    def deco(fn):
        _REGISTRY[name] = Record(fn, course)
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


QUANT_KEYS = ("weight_bits", "act_bits", "grad_bits", "scheme", "quantize_first_last")


def build(name: str, *, num_classes: int = 10, in_channels: int = 3, model_args: dict | None = None,
          sha256: str = "", **quant) -> nn.Module:
    """Build a registered model, or the network of a code reference (``FILE.py:FUNCTION``,
    ``package.module:FUNCTION``: `qdistill.nn.reference`, called with ``model_args``; a
    file's text is checked against ``sha256``), quantized by ``quant``: ``weight_bits``,
    ``act_bits``, ``grad_bits`` (default 32: full precision), ``scheme`` (``"dorefa"``),
    ``quantize_first_last`` (False). Raises ``KeyError`` naming the known models for an
    unknown name, `reference.ModelError` for code that gives no usable network."""
    if set(quant) - set(QUANT_KEYS):
        raise TypeError(f"build() got unexpected keyword arguments {sorted(set(quant) - set(QUANT_KEYS))}")
    quant = {"weight_bits": FULL, "act_bits": FULL, "grad_bits": FULL, "scheme": "dorefa",
             "quantize_first_last": False, **quant}
    if reference.is_code(name):
        model = quantize(reference.build_float(name, sha256, model_args or {}, num_classes), **quant)
    elif name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}")
    elif _REGISTRY[name].course:
        spec = _Spec(**{**quant, "scheme": schemes.get(quant["scheme"])})
        model = _REGISTRY[name].make(spec, num_classes=num_classes, in_channels=in_channels)
    else:
        model = quantize(_REGISTRY[name].make(num_classes=num_classes, in_channels=in_channels, **(model_args or {})),
                         **quant)
    return model


class _Spec:
    """The bit-widths and scheme of one course network, and the layer makers that apply them."""

    def __init__(self, weight_bits, act_bits, grad_bits, scheme: schemes.Scheme, quantize_first_last):
        self.weight_bits, self.act_bits, self.grad_bits = weight_bits, act_bits, grad_bits
        self.scheme = scheme
        self.edge_bits = weight_bits if quantize_first_last else FULL

    def conv(self, cin, cout, k, padding, *, first=False, bias=False):
        bits = self.weight_bits if (not first or self.scheme.quantizes_first_conv) else self.edge_bits
        return QuantConv2d(cin, cout, k, padding=padding, bias=bias, weight_bits=bits,
                           grad_bits=FULL if first else self.grad_bits, scheme=self.scheme.name)

    def linear(self, cin, cout):
        return QuantLinear(cin, cout, weight_bits=self.edge_bits, scheme=self.scheme.name)

    def norm_act(self, channels):
        """BatchNorm then the activation (`qdistill.nn.schemes.Scheme.norm_act`)."""
        return self.scheme.norm_act(channels, self.act_bits)

    def act(self, own: bool = False):
        """The activation quantizer alone: the scheme's plain one, or with ``own`` its own."""
        return QuantAct(self.act_bits, self.scheme.name if own else self.scheme.plain_act)


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
    act, bn = spec.norm_act, spec.scheme.norm
    return nn.Sequential(
        Resize(40),
        spec.conv(in_channels, 48, 5, 0, first=True, bias=True), MaxPool2d(2),
        spec.act(),
        spec.conv(48, 64, 3, 1), *act(64),
        spec.conv(64, 64, 3, 1), *bn(64), MaxPool2d(2), spec.act(own=True),
        spec.conv(64, 128, 3, 0), *act(128),
        spec.conv(128, 128, 3, 1), *act(128),
        spec.conv(128, 128, 3, 0), *act(128),
        nn.Dropout(0.5),
        spec.conv(128, 512, 5, 0), *bn(512), Clip01(),
        nn.Flatten(), spec.linear(512, num_classes),
    )


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``,
    the shortcut a 1x1 convolution with BatchNorm where the shape changes, else ``x``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), section 4.2: a 3x3 convolution of 16 channels,
    three stages of ``blocks`` basic blocks (16, 32, 64 channels; the second and third
    start with stride 2), global average pooling and a linear layer. ``6 * blocks + 2``
    weight layers: 20 for ``blocks = 3``. PyTorch's default initialisation."""

    def __init__(self, blocks: int = 3, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stages(self.relu(self.bn(self.conv(x)))))))


@register("resnet20", course=False)
def resnet20(num_classes=10, in_channels=3):
    """ResNet-20 for 32x32 images (He et al. 2016): 0.27M parameters; quantized by
    `quantize` (residual adds in full precision)."""
    return ResNet(3, num_classes, in_channels)


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
