"""DoReFa-Net quantizers, the course baseline's and LSQ's, each formula written once.

Notation: ``q_k(x) = round(x * n) / n`` with ``n = 2**k - 1``; its backward is the
identity (the straight-through estimator, STE). ``round`` is round-half-to-even, as
``tf.round`` in DoReFa-Net's reference implementation (tensorpack
``examples/DoReFa-Net/dorefa.py``) and ``torch.round``. ``bits >= 32`` means full
precision. The autograd nodes that realise the STEs live in `qdistill.nn.autograd`.

Member axis: a fused group of K students (`qdistill.nn.fused`) stores member ``k``'s
tensor as block ``k`` along the first dimension. With ``members=K`` each statistic
(``max|tanh w|``, ``mean|w|``, the per-sample gradient maximum) is taken per member,
so the group quantizes exactly as K separate models; ``members=None`` takes it over the
whole tensor. LSQ's learned steps hold one value per member there (`lsq_weight`,
`lsq_activation`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import scheme_bits_error
from .autograd import ClampRound, LsqRound, QuantizeBackward, Round, SignScaled

__all__ = ["dorefa_weight", "dorefa_activation", "dorefa_gradient", "homework_weight", "homework_activation",
           "lsq_weight", "lsq_activation", "quantize_k", "FULL"]

FULL = 32  # bits at and above which a quantizer is the identity


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return bits


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
    ``g_q = 2m * (q_k(y) - 0.5)``. Samples whose gradient is all zero stay zero.
    Computed in at least float32 and returned in ``g``'s dtype: bf16 gradients of
    autocast (8 significant bits) would bias the rounding itself."""
    wide = g.to(torch.promote_types(g.dtype, torch.float32))
    gm = wide if members is None else wide.unflatten(1, (members, -1))  # a view in NCHW and NHWC
    dims = tuple(range(1 if members is None else 2, gm.dim()))
    m = gm.abs().amax(dim=dims, keepdim=True) if dims else gm.abs()
    safe = torch.where(m > 0, m, torch.ones_like(m))
    u = (torch.rand_like(gm) - 0.5) / n
    y = torch.clamp(gm / (2 * safe) + 0.5 + u, 0.0, 1.0)
    out = 2 * m * (torch.round(y * n) / n - 0.5)
    return (out if members is None else out.flatten(1, 2)).to(g.dtype)


def dorefa_gradient(x: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """DoReFa gradient quantizer: identity in forward; in backward the incoming gradient
    is replaced by `quantize_gradient` (stochastic rounding, so ``E[g_q] = g``).
    ``bits >= 32``: identity both ways."""
    check_bits(bits)
    if bits >= FULL:
        return x
    n = _n(bits)
    return QuantizeBackward.apply(x, lambda g: quantize_gradient(g, n, members))


# ---------------------------------------------------------------- LSQ (Esser et al., ICLR 2020)

def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: ``(2**(b-1), 2**(b-1) - 1)`` signed (weights), ``(0, 2**b - 1)``
    unsigned (activations after a ReLU-like layer)."""
    if signed and check_bits(bits) < 2:
        raise ValueError(scheme_bits_error("lsq", bits, bits))
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** check_bits(bits) - 1)


def lsq(v: torch.Tensor, s: torch.Tensor, bits: int, signed: bool, grad_scale: float) -> torch.Tensor:
    """LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020, eqs. 1-5):
    ``v_hat = round(clamp(v / s, -Q_N, Q_P)) * s`` (`lsq_range`), ``s`` broadcast to ``v``.

    Gradients (the paper's, strict bounds): ``dv_hat/dv = 1`` if ``-Q_N < v/s < Q_P``
    else 0 (straight through the round); ``dv_hat/ds = -v/s + round(v/s)`` inside,
    ``-Q_N`` if ``v/s <= -Q_N``, ``Q_P`` if ``v/s >= Q_P``; the step's gradient is
    multiplied by ``grad_scale`` (the paper's ``g = 1 / sqrt(N Q_P)``, section 2.2) and
    summed over the elements sharing a step. The autograd node is `LsqRound`."""
    qn, qp = lsq_range(bits, signed)
    return LsqRound.apply(v, s, float(qn), float(qp), float(grad_scale))


def lsq_init(mean_abs: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The paper's initial step: ``s = 2 * mean(|v|) / sqrt(Q_P)``."""
    return 2 * mean_abs / math.sqrt(lsq_range(bits, signed)[1])


def _member_view(x: torch.Tensor, members: int | None) -> tuple[torch.Tensor, tuple, int]:
    """Activations ``(N, K*C, ...)`` as ``(N, K, C, ...)`` (a view in NCHW and NHWC), the
    shape a step of ``K`` values takes to broadcast over it, and ``N``, the activations
    per image of one member; ``members=None``: ``x`` itself, shape ``(1,)``."""
    if members is None:
        return x, (1,), x[0].numel()
    xm = x.unflatten(1, (members, -1))
    return xm, (1, members) + (1,) * (xm.dim() - 2), xm[0, 0].numel()


def lsq_weight(w: torch.Tensor, s: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """LSQ weight quantizer: `lsq` signed, one step per layer (per member: ``s`` holds K
    values, member ``k``'s block its own), ``grad_scale = 1 / sqrt(N Q_P)`` with ``N``
    the number of weights of the layer (of one member). ``bits >= 32``: ``w``."""
    check_bits(bits)
    if bits >= FULL:
        return w
    rows = _rows(w, members)
    n = rows.numel() if members is None else rows.shape[1]
    step = s if members is None else s.reshape(members, 1)
    out = lsq(rows, step, bits, True, 1 / math.sqrt(n * lsq_range(bits, True)[1]))
    return out if members is None else out.view_as(w)


def lsq_activation(x: torch.Tensor, s: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """LSQ activation quantizer: `lsq` unsigned, ``grad_scale = 1 / sqrt(N Q_P)`` with
    ``N`` the number of activations per image (of one member: ``s`` holds K values, member
    ``k`` owns channels ``[k*C, (k+1)*C)``). ``bits >= 32``: ``relu(x)``, as DoReFa's."""
    check_bits(bits)
    if bits >= FULL:
        return F.relu(x)
    xm, shape, n = _member_view(x, members)
    out = lsq(xm, s.reshape(shape), bits, False, 1 / math.sqrt(n * lsq_range(bits, False)[1]))
    return out if members is None else out.flatten(1, 2)


@torch.no_grad()
def lsq_weight_init(w: torch.Tensor, bits: int, members: int | None = None) -> torch.Tensor:
    """`lsq_init` of a weight: ``(1,)``, or ``(K,)`` per member."""
    return lsq_init(_mean_abs(_rows(w, members), members).reshape(-1), bits, True)


@torch.no_grad()
def lsq_activation_init(x: torch.Tensor, bits: int, members: int | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """`lsq_init` of activations, the mean taken over the batch (per member): ``(1,)`` or
    ``(K,)``, accumulated in ``dtype`` (the step's: bf16 activations give a float32 step)."""
    xm, _, _ = _member_view(x, members)
    dims = tuple(d for d in range(xm.dim()) if members is None or d != 1)
    return lsq_init(torch.mean(xm.abs(), dim=dims, dtype=dtype or x.dtype).reshape(-1), bits, False)

