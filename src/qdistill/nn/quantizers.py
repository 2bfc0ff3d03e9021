"""DoReFa-Net quantizers and the course baseline's, each formula written once.

Notation: ``q_k(x) = round(x * n) / n`` with ``n = 2**k - 1``; its backward is the
identity (the straight-through estimator, STE). ``round`` is round-half-to-even, as
``tf.round`` in DoReFa-Net's reference implementation (tensorpack
``examples/DoReFa-Net/dorefa.py``) and ``torch.round``. ``bits >= 32`` means full
precision. The autograd nodes that realise the STEs live in `qdistill.nn.autograd`.

Member axis: a fused group of K students (`qdistill.nn.fused`) stores member ``k``'s
tensor as block ``k`` along the first dimension. With ``members=K`` each statistic
(``max|tanh w|``, ``mean|w|``, the per-sample gradient maximum) is taken per member,
so the group quantizes exactly as K separate models; ``members=None`` takes it over the
whole tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import SCHEMES
from .autograd import ClampRound, QuantizeBackward, Round, SignScaled

FULL = 32  # bits at and above which a quantizer is the identity


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return bits


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    return scheme


def _n(bits: int) -> float:
    return float(2 ** check_bits(bits) - 1)


def _rows(w: torch.Tensor, members: int | None) -> torch.Tensor:
    """``w`` itself, or viewed as one row per member."""
    return w if members is None else w.reshape(members, -1)


def _max_abs(x: torch.Tensor, members: int | None) -> torch.Tensor:
    return x.abs().max() if members is None else x.abs().amax(dim=1, keepdim=True)


def _mean_abs(x: torch.Tensor, members: int | None) -> torch.Tensor:
    return x.abs().mean() if members is None else x.abs().mean(dim=1, keepdim=True)


def quantize_k(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``q_k(x) = round(x * n) / n``; backward: identity. For ``x`` in [0, 1] the output
    lies on the grid ``{0, 1/n, ..., 1}``."""
    return Round.apply(x, _n(bits))


def signed_levels(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``2 * q_k(x) - 1``, computed as ``(2c - n) / n`` from the integer code
    ``c = round(x * n)``, so every level is the correctly rounded float of its exact value
    (``-1/3`` is ``-(1/3)``, not ``2 * (1/3) - 1``); backward ``2 * g`` (STE)."""
    return Round.apply(x, _n(bits), True)


def dorefa_weight(w: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """DoReFa weight quantizer.

    * ``bits >= 32``: ``w`` (identity).
    * ``bits == 1``: ``sign(w) * E`` with ``E = mean(|w|)`` and ``sign(0) := +1``; ``E`` is
      a constant in backward and the backward is the identity, ``dL/dw = dL/dout`` (the
      reference's ``lambda dy: dy``).
    * ``bits >= 2``: ``x = tanh(w)``; ``x = x / max(|x|) * 0.5 + 0.5`` (the gradient flows
      through the max); output ``2 * q_k(x) - 1``. At 2 bits the levels are exactly
      ``{-1, -1/3, 1/3, 1}``.
    """
    check_bits(bits)
    if bits >= FULL:
        return w
    x = _rows(w, members)
    if bits == 1:
        out = SignScaled.apply(x, _mean_abs(x.detach(), members))
    else:
        x = torch.tanh(x)
        out = signed_levels(x / _max_abs(x, members) * 0.5 + 0.5, bits)
    return out if members is None else out.view_as(w)


def homework_weight(w: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """The course baseline's weight quantizer: ``t = tanh(w)``, ``s = 2 * mean(|t|)``,
    output ``(q_k(clamp(t / s, -0.5, 0.5) + 0.5) - 0.5) * s``; gradients flow through
    ``tanh``, ``s`` and the clamp, ``q_k`` is straight-through. ``bits >= 32``: identity.
    The levels are ``s * (2c - n) / (2n)`` for integer codes ``c`` in ``0..n``."""
    check_bits(bits)
    if bits >= FULL:
        return w
    t = torch.tanh(_rows(w, members))
    s = 2 * _mean_abs(t, members)
    # (q_k(v) - 0.5) * s == s * (2c - n) / (2n), computed from the integer code c.
    out = signed_levels(torch.clamp(t / s, -0.5, 0.5) + 0.5, bits) * (0.5 * s)
    return out if members is None else out.view_as(w)


def dorefa_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa activation quantizer: ``relu(x)`` at ``bits >= 32``, else
    ``q_k(clamp(x, 0, 1))`` with gradient 1 inside [0, 1], 0 outside. At 1 bit the levels
    are ``{0, 1}``."""
    check_bits(bits)
    if bits >= FULL:
        return F.relu(x)
    return ClampRound.apply(x, _n(bits))


def homework_activation(y: torch.Tensor, bits: int) -> torch.Tensor:
    """The course baseline's activation quantizer, applied to ``y = (|a| + 1) * BN(x) + b``:
    ``q_k(clamp(0.1 * y, 0, 1))``; ``bits >= 32``: ``clamp(0.1 * y, 0, 1)`` (no rounding)."""
    check_bits(bits)
    if bits >= FULL:
        return torch.clamp(0.1 * y, 0.0, 1.0)
    return ClampRound.apply(0.1 * y, _n(bits))


def quantize_gradient(g: torch.Tensor, n: float, members: int | None = None) -> torch.Tensor:
    """The DoReFa gradient formula (``n = 2**k - 1``):

    ``m = max|g|`` per sample (every dim but the first; per member: over member ``k``'s
    channels ``[k*C, (k+1)*C)`` of dim 1);
    ``y = clamp(g / (2m) + 0.5 + u, 0, 1)`` with ``u ~ Uniform(-0.5/n, 0.5/n)`` per element;
    ``g_q = 2m * (q_k(y) - 0.5)``. Samples whose gradient is all zero stay zero."""
    gm = g if members is None else g.unflatten(1, (members, -1))  # a view in NCHW and NHWC
    dims = tuple(range(1 if members is None else 2, gm.dim()))
    m = gm.abs().amax(dim=dims, keepdim=True) if dims else gm.abs()
    safe = torch.where(m > 0, m, torch.ones_like(m))
    u = (torch.rand_like(gm) - 0.5) / n
    y = torch.clamp(gm / (2 * safe) + 0.5 + u, 0.0, 1.0)
    out = 2 * m * (torch.round(y * n) / n - 0.5)
    return out if members is None else out.flatten(1, 2)


def dorefa_gradient(x: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """DoReFa gradient quantizer: identity in forward; in backward the incoming gradient
    is replaced by `quantize_gradient` (stochastic rounding, so ``E[g_q] = g``).
    ``bits >= 32``: identity both ways."""
    check_bits(bits)
    if bits >= FULL:
        return x
    n = _n(bits)
    return QuantizeBackward.apply(x, lambda g: quantize_gradient(g, n, members))


WEIGHT_QUANTIZERS = {"dorefa": dorefa_weight, "homework": homework_weight}
ACTIVATION_QUANTIZERS = {"dorefa": dorefa_activation, "homework": homework_activation}
