"""The quantization schemes, one object each: ``dorefa``, ``homework`` and ``lsq``.

A scheme holds everything that differs between them, so nothing else compares scheme
names (`tests/test_layers.py` checks it):

* training: its weight and activation quantizers (`weight`, `activation`), whether their
  steps are learned parameters (`learned`), which activation quantizer replaces a bare
  ReLU (`plain_act`) and what a course block puts after a convolution (`norm_act`);
* export: a quantized weight as integer codes (`codes`: ``w = alpha * (2c - n)``, see
  `qdistill.export.plan`), the factor before an activation's clamp (`prescale`);
* ONNX: the activation quantizer in standard operators only (`onnx_activation`), the
  same float operations as training's forward, so both round alike.

`get(name)` returns the scheme; `SCHEMES` (torch-free, in `qdistill.nn`) lists the names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import SCHEMES
from .quantizers import (FULL, dorefa_activation, dorefa_weight, homework_activation, homework_weight,
                         lsq_activation, lsq_range, lsq_weight)

__all__ = ["get", "Scheme", "DoReFa", "Homework", "Lsq"]


class Scheme:
    """What every scheme answers; the three below fill it in."""

    name = "?"
    learned = False          # steps are parameters (LSQ), else fixed formulas
    quantizes_first_conv = False
    prescale = 1.0           # the activation quantizer's input is prescale * x
    plain_act = "dorefa"     # the activation quantizer that stands where a bare ReLU stood

    def weight(self, w: torch.Tensor, bits: int, members: int | None, step) -> torch.Tensor:
        raise NotImplementedError

    def activation(self, x: torch.Tensor, bits: int, members: int | None, step) -> torch.Tensor:
        raise NotImplementedError

    def codes(self, layer: nn.Module, wq: torch.Tensor, step) -> tuple[torch.Tensor, int, float, torch.Tensor]:
        """``(codes, n, alpha, rebuilt)`` of ``layer``'s quantized float32 weight ``wq``:
        ``wq == alpha * (2c - n)`` where ``rebuilt`` equals ``wq`` bit for bit."""
        raise NotImplementedError

    def onnx_activation(self, bits: int, step: float | None):
        """The activation quantizer as a function of standard operators (for export); at
        32 bits training's own (a ReLU, or the course's clamp)."""
        if bits >= FULL:
            return lambda x: self.activation(x, bits, None, None)
        n = float(2**bits - 1)
        p = self.prescale
        return lambda x: torch.round(torch.clamp(x * p if p != 1.0 else x, 0.0, 1.0) * n) / n

    def norm_act(self, channels: int, bits: int) -> list[nn.Module]:
        """BatchNorm and the activation quantizer after a convolution of a course network."""
        from .layers import QuantAct
        return [nn.BatchNorm2d(channels), QuantAct(bits, self.plain_act)]

    def norm(self, channels: int) -> list[nn.Module]:
        """BatchNorm without an activation after it."""
        return [nn.BatchNorm2d(channels)]

    def __repr__(self):
        return f"<scheme {self.name}>"


class DoReFa(Scheme):
    """DoReFa-Net (Zhou et al. 2016): `dorefa_weight`, `dorefa_activation`."""

    name = "dorefa"

    def weight(self, w, bits, members, step):
        return dorefa_weight(w, bits, members)

    def activation(self, x, bits, members, step):
        return dorefa_activation(x, bits)

    def codes(self, layer, wq, step):
        bits = layer.weight_bits
        if bits == 1:  # sign(w) * E: the code is the sign
            e = layer.weight.detach().float().abs().mean()
            codes = (layer.weight.detach() >= 0).to(torch.int64)
            return codes, 1, float(e), torch.where(codes == 1, e, -e)
        n = 2**bits - 1
        codes = torch.round((wq * n + n) / 2).to(torch.int64)
        return codes, n, 1.0 / n, (2 * codes - n).float() / n


class Homework(DoReFa):
    """The course baseline: `homework_weight`, `homework_activation` (``0.1 * y``) after its
    block ``BN(affine=False), (|a| + 1) x + b``; its first convolution is quantized too. A
    bare ReLU (outside that block) becomes DoReFa's activation quantizer: the course's
    ``0.1 *`` belongs to its learned affine, and on a BatchNorm output alone it would round
    nearly everything to 0."""

    name = "homework"
    quantizes_first_conv = True
    prescale = 0.1

    def weight(self, w, bits, members, step):
        return homework_weight(w, bits, members)

    def activation(self, x, bits, members, step):
        return homework_activation(x, bits)

    def codes(self, layer, wq, step):
        n = 2**layer.weight_bits - 1  # wq = ((2c - n) / n) * (0.5 * s), s = 2 mean|tanh w|
        half_s = 0.5 * (2 * torch.tanh(layer.weight.detach().float()).abs().mean())
        codes = torch.round((wq / half_s * n + n) / 2).to(torch.int64)
        return codes, n, float(half_s) / n, ((2 * codes - n).float() / n) * half_s

    def norm_act(self, channels, bits):
        from .layers import AbsAffine, QuantAct
        return [nn.BatchNorm2d(channels, affine=False), AbsAffine(channels), QuantAct(bits, self.name)]

    def norm(self, channels):
        from .layers import AbsAffine
        return [nn.BatchNorm2d(channels, affine=False), AbsAffine(channels)]


class Lsq(Scheme):
    """LSQ (Esser et al., ICLR 2020): `lsq_weight`, `lsq_activation`, learned steps."""

    name = "lsq"
    learned = True
    plain_act = "lsq"

    def weight(self, w, bits, members, step):
        return lsq_weight(w, step, bits, members)

    def activation(self, x, bits, members, step):
        return lsq_activation(x, step, bits, members)

    def codes(self, layer, wq, step):
        half = 2 ** (layer.weight_bits - 1)  # wq = (c - half) * s, one float32 product
        codes = torch.round(wq / step).to(torch.int64) + half
        return codes, 2 * half, float(step) / 2, (codes - half).float() * step

    def onnx_activation(self, bits, step):
        """``round(clamp(x / s, 0, Q_P)) * s``: torch's order (Div, Clip, Round, Mul)."""
        if bits >= FULL:
            return super().onnx_activation(bits, step)
        qp = float(lsq_range(bits, False)[1])
        s = torch.tensor(step, dtype=torch.float32)
        return lambda x: torch.round(torch.clamp(x / s, 0.0, qp)) * s


_ALL = {s.name: s for s in (DoReFa(), Homework(), Lsq())}
assert tuple(_ALL) == tuple(SCHEMES)


def get(name: str) -> Scheme:
    """The scheme called ``name``; `ValueError` naming the known ones otherwise."""
    if isinstance(name, Scheme):
        return name
    if name not in _ALL:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {tuple(SCHEMES)}")
    return _ALL[name]
