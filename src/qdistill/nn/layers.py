"""The layers models are built from: quantized convolution, linear and activation
layers (the quantizer is named by ``scheme`` and applied with the layer's bits; LSQ's
learned steps are their parameters ``step``), the
course block's learned affine, and a max-pool that saves less for backward.

A quantized layer's ``members`` is ``None`` for an ordinary model; a fused group of K
students (`qdistill.nn.fused`) sets it to K so the quantizers take their statistics per
member. ``repr`` shows every layer's bits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import scheme_bits_error, schemes
from .autograd import MaxPoolInt32
from .quantizers import FULL, check_bits, dorefa_gradient, lsq_activation_init, lsq_weight_init

__all__ = ["QuantConv2d", "QuantLinear", "QuantAct", "AbsAffine", "MaxPool2d", "Resize", "Clip01"]


class _QuantWeight:
    """What `QuantConv2d` and `QuantLinear` share: the scheme's weight quantizer on the
    weight, `dorefa_gradient` (DoReFa's ``fg``) on the output's gradient.

    LSQ below 32 bits: the learned step is the parameter ``step``, ``(1,)`` (``(K,)`` or
    ``(K, 1)`` in a fused group), registered after ``weight`` and ``bias`` and
    initialised from the weight (`init_step`); otherwise ``step`` is ``None``."""

    members: int | None = None

    def _init_quant(self, weight_bits: int, grad_bits: int, scheme: str) -> None:
        self.weight_bits = check_bits(weight_bits)
        self.grad_bits = check_bits(grad_bits)
        self.quant = schemes.get(scheme)
        self.scheme = self.quant.name
        learned = self.quant.learned and weight_bits < FULL
        if learned and scheme_bits_error(self.scheme, weight_bits, FULL):
            raise ValueError(scheme_bits_error(self.scheme, weight_bits, FULL))
        w = self.weight
        self.register_parameter("step", nn.Parameter(torch.ones(self._step_shape(), dtype=w.dtype, device=w.device))
                                if learned else None)

    def _step_shape(self) -> tuple[int, ...]:
        return (1,) if self.members is None else (self.members,)

    @torch.no_grad()
    def init_step(self) -> None:
        """LSQ: ``step = 2 * mean(|w|) / sqrt(Q_P)`` of the current weight (per member)."""
        self.step.copy_(lsq_weight_init(self.weight, self.weight_bits, self.members).view(self._step_shape()))

    def quantized_weight(self) -> torch.Tensor:
        return self.quant.weight(self.weight, self.weight_bits, self.members, self.step)

    def _bits_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, grad_bits={self.grad_bits}, scheme={self.scheme}"


class QuantConv2d(_QuantWeight, nn.Conv2d):
    """``nn.Conv2d`` with a quantized weight and a quantized output gradient (DoReFa's
    ``fg`` right after each convolution). At 32 bits it is exactly ``nn.Conv2d``."""

    def __init__(self, *args, weight_bits: int = FULL, grad_bits: int = FULL, scheme: str = "dorefa", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, grad_bits, scheme)
        if self.step is not None:
            self.init_step()

    def forward(self, x):
        out = self._conv_forward(x, self.quantized_weight(), self.bias)
        return dorefa_gradient(out, self.grad_bits, self.members)

    def extra_repr(self):
        return super().extra_repr() + ", " + self._bits_repr()


class QuantLinear(_QuantWeight, nn.Linear):
    """``nn.Linear`` with a quantized weight and output gradient. At 32 bits it is exactly
    ``nn.Linear``."""

    def __init__(self, *args, weight_bits: int = FULL, grad_bits: int = FULL, scheme: str = "dorefa", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, grad_bits, scheme)
        if self.step is not None:
            self.init_step()

    def forward(self, x):
        return dorefa_gradient(F.linear(x, self.quantized_weight(), self.bias), self.grad_bits)

    def extra_repr(self):
        return super().extra_repr() + ", " + self._bits_repr()


class QuantAct(nn.Module):
    """The scheme's activation quantizer as a module (``dorefa_activation``,
    ``homework_activation`` or ``lsq_activation``).

    LSQ below 32 bits: the learned step is the parameter ``step`` ``(1,)`` (``(K,)`` in a
    fused group) and the bool buffer ``initialized`` records that the first batch seen in
    training mode set it (``step = 2 * mean(|x|) / sqrt(Q_P)`` over that batch); both are
    in the ``state_dict``, so a resumed run does not initialise again and export can refuse
    a step never set. Until then (an untrained model in eval mode) the step is 1. The
    buffer alone decides, on the device (no host read per step, no state outside the
    ``state_dict``): a model behaves as its ``state_dict`` says, however it was made."""

    members: int | None = None

    def __init__(self, bits: int = FULL, scheme: str = "dorefa"):
        super().__init__()
        self.bits = check_bits(bits)
        self.quant = schemes.get(scheme)
        self.scheme = self.quant.name
        learned = self.quant.learned and bits < FULL
        self.register_parameter("step", nn.Parameter(torch.ones(1)) if learned else None)
        self.register_buffer("initialized", torch.tensor(False) if learned else None)

    def forward(self, x):
        step = self.step
        if step is not None and self.training:
            self._init_step(x)
            # what the quantizer saves for backward: a second call of this module in the
            # same forward writes the step again (the same value), which must not touch it
            step = step.clone()
        return self.quant.activation(x, self.bits, self.members, step)

    @torch.no_grad()
    def _init_step(self, x: torch.Tensor) -> None:
        """The step from ``x`` where ``initialized`` is false, else kept; then the flag set."""
        first = lsq_activation_init(x, self.bits, self.members, self.step.dtype)
        self.step.copy_(torch.where(self.initialized, self.step, first))
        self.initialized.fill_(True)

    def extra_repr(self):
        return f"bits={self.bits}, scheme={self.scheme}"


class AbsAffine(nn.Module):
    """The course block's learned per-channel affine: ``y = (|a| + 1) * x + b``,
    ``a`` initialised to 1 (initial scale 2) and ``b`` to 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Parameter(torch.ones(channels))
        self.b = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return (self.a.abs() + 1).view(1, -1, 1, 1) * x + self.b.view(1, -1, 1, 1)

    def extra_repr(self):
        return f"channels={self.a.numel()}"


def _pair(v) -> list[int]:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that saves less for backward in training (`MaxPoolInt32`);
    same outputs and gradients."""

    def forward(self, x):
        kernel_size, stride = _pair(self.kernel_size), _pair(self.stride or self.kernel_size)
        light = (torch.is_grad_enabled() and x.requires_grad and x.dim() == 4
                 and _pair(self.padding) == [0, 0] and _pair(self.dilation) == [1, 1]
                 and not self.ceil_mode and not self.return_indices
                 and x.shape[-2] * x.shape[-1] < 2**31
                 and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                 and not torch.onnx.is_in_onnx_export())
        if not light:
            return super().forward(x)
        return MaxPoolInt32.apply(x, kernel_size, stride)


class Resize(nn.Module):
    """Bilinear resize to ``size x size`` (``align_corners=False``)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self):
        return f"size={self.size}"


class Clip01(nn.Module):
    """``clamp(x, 0, 1)`` before the last layer of ``dorefa-svhn``."""

    def forward(self, x):
        return torch.clamp(x, 0.0, 1.0)
