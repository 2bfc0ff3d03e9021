"""The losses of the task statement's four questions, with a choice of teacher term.

Notation: ``z`` student logits, ``t`` teacher logits, ``y`` labels, ``T`` temperature,
``p = softmax(z / T)``, ``q = softmax(t / T)``, ``N`` the batch size,
``CE(p, z) = -sum_i p_i * log_softmax(z)_i`` averaged over the batch.

Why ``c = T**2``: the gradient of ``CE(softmax(t/T), z/T)`` with respect to ``z`` is
``(softmax(z/T) - softmax(t/T)) / T``, and for large ``T`` the difference of the two
softmaxes itself shrinks like ``1/T`` (Hinton et al. 2015, section 2.1), so the soft
term's gradients scale as ``1/T**2``. Multiplying by ``T**2`` keeps their size
comparable to the hard term's as ``T`` changes. The teacher terms below never multiply
by ``T**2`` themselves: ``c`` does, for every one of them.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .. import config as configlib
from . import KD_DEFAULTS, KD_TERMS, LOSSES

__all__ = ["build_loss", "Loss", "LossError", "hard", "kl_term", "dkd_term", "ls_term", "dist_term",
           "soft_cross_entropy"]

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
NEEDS_TEACHER = dict(zip(LOSSES, (False, True, True, False)))
LS_EPS = 1e-7     # logit standardisation: added to the standard deviation
DIST_EPS = 1e-8   # DIST: added to the product of the norms


class LossError(ValueError):
    """A loss asked for by a name, temperature or option it does not take. The library's
    own error (the CLI prints it as one line, exit code 2)."""


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16 logits of autocast are upcast, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def soft_cross_entropy(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``CE(p, z) = mean_batch( -sum_i p_i * log_softmax(z)_i )``."""
    return -(p * F.log_softmax(_f(z), dim=-1)).sum(dim=-1).mean()


def hard(z, t, y):
    """Q1: ``CE(onehot(y), z)``."""
    return F.cross_entropy(_f(z), y)


# ---------------------------------------------------------------- teacher terms

def kl_term(z, t, y, T):
    """Hinton et al. 2015: ``CE(q, z / T)``, ``q = softmax(t / T)`` (the KL divergence
    ``KL(q || p)`` up to the teacher's entropy, which has no gradient)."""
    return soft_cross_entropy(F.softmax(_f(t) / T, dim=-1), _f(z) / T)  # upcast before dividing


def _binary_and_rest(v: torch.Tensor, y: torch.Tensor):
    """For logits ``v`` (already divided by ``T``): ``log b = [log s_y, log(1 - s_y)]`` and
    ``log s_hat`` (the log-softmax over the classes other than ``y``, 0 at ``y``), with
    ``s = softmax(v)``. ``log(1 - s_y)`` is ``logsumexp_{i != y} v_i - logsumexp v``, exact
    where ``1 - s_y`` would cancel."""
    target = F.one_hot(y, v.shape[-1]).bool()
    rest = v.masked_fill(target, -math.inf)
    lse = torch.logsumexp(v, dim=-1)
    log_b = torch.stack([v.gather(-1, y[:, None])[:, 0] - lse, torch.logsumexp(rest, dim=-1) - lse], dim=-1)
    # 0 (not -inf) at y: the where's gradient there is 0 and no inf ever meets a 0
    log_hat = torch.where(target, 0.0, F.log_softmax(rest, dim=-1))
    return log_b, log_hat


def dkd_parts(z, t, y, T):
    """Per image, the two parts of decoupled KD (Zhao et al., "Decoupled Knowledge
    Distillation", CVPR 2022, eqs. 1-6):

    ``TCKD = KL(b_q || b_p)``, ``b_p = [p_y, 1 - p_y]`` (``b_q`` likewise),
    ``NCKD = KL(q_hat || p_hat)``, ``p_hat = softmax`` of ``z / T`` over the classes other
    than ``y`` (``q_hat`` likewise); their eq. 6: ``KL(q || p) = TCKD + (1 - q_y) NCKD``.
    Returns ``(TCKD, NCKD)``, each of shape ``(N,)``."""
    lbp, lpp = _binary_and_rest(_f(z) / T, y)
    lbq, lqq = _binary_and_rest(_f(t) / T, y)
    tckd = (lbq.exp() * (lbq - lbp)).sum(-1)
    nckd = (lqq.exp() * (lqq - lpp)).sum(-1)  # exp(0) * (0 - 0) = 0 at y
    return tckd, nckd


def dkd_term(z, t, y, T, alpha, beta):
    """Decoupled KD (Zhao et al. CVPR 2022, eq. 7): ``alpha * TCKD + beta * NCKD``
    (`dkd_parts`), averaged over the batch."""
    tckd, nckd = dkd_parts(z, t, y, T)
    return (alpha * tckd + beta * nckd).mean()


def standardize(v: torch.Tensor) -> torch.Tensor:
    """Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024:
    ``S(v) = (v - mean(v)) / (std(v) + 1e-7)`` per image, ``std`` with Bessel's correction
    (``/(C - 1)``) as in the authors' code."""
    return (v - v.mean(dim=-1, keepdim=True)) / (v.std(dim=-1, keepdim=True) + LS_EPS)


def ls_term(z, t, y, T):
    """Logit standardisation (Sun et al. CVPR 2024): ``CE(softmax(S(t) / T), S(z) / T)``
    with `standardize` ``S``; unchanged (up to the 1e-7) when either logit vector is
    shifted by a constant or scaled by a positive factor."""
    return soft_cross_entropy(F.softmax(standardize(_f(t)) / T, dim=-1), standardize(_f(z)) / T)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation as DIST computes it: the cosine of the mean-centred
    rows, ``<a', b'> / (|a'| |b'| + 1e-8)``, ``a' = a - mean(a)``."""
    a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + DIST_EPS)


def dist_term(z, t, y, T, beta, gamma):
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
    eqs. 5-9): ``beta * (1 - mean_i rho(P_i, Q_i)) + gamma * (1 - mean_j rho(P_:j, Q_:j))``,
    ``P``, ``Q`` the ``N x C`` matrices of ``p`` and ``q``, ``rho`` = `pearson`. The second
    (intra-class) term correlates each class's column over the *whole batch*: it is not a
    mean of per-image terms, so a member of a fused group must see exactly the batch a
    separate run sees (the group shares one batch, so it does)."""
    P, Q = F.softmax(_f(z) / T, dim=-1), F.softmax(_f(t) / T, dim=-1)
    return beta * (1 - pearson(P, Q).mean()) + gamma * (1 - pearson(P.T, Q.T).mean())


# ---------------------------------------------------------------- the loss object

def _options(kd: str, kd_options: dict) -> dict:
    if kd not in KD_TERMS:
        raise LossError(f"unknown distillation term {kd!r}; choose one of {', '.join(KD_TERMS)}")
    unknown = set(kd_options) - set(KD_DEFAULTS)
    if unknown:
        raise LossError(f"unknown distillation option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(KD_DEFAULTS)}")
    out = {**KD_DEFAULTS, **kd_options}
    for key, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise LossError(f"{key} must be a finite number >= 0, got {v!r}")
    return {key: float(v) for key, v in out.items()}


class Loss:
    """One run's loss: ``loss(z, t, y, soft_weight=1.0)`` (see `build_loss`), and
    `terms` for measuring each term. Attributes: ``loss_name``, ``temperature``, ``c``,
    ``kd``, ``needs_teacher`` and ``options`` (the weights inside the teacher term)."""

    def __init__(self, name: str, T: float, c: float, kd: str, options: dict):
        self.loss_name, self.temperature, self.c, self.kd = name, T, c, kd
        self.options = options
        self.needs_teacher = NEEDS_TEACHER[name]

    def teacher_term(self, z, t, y):
        """The teacher term ``kd`` at this loss's ``T``, without ``c``."""
        T, o = self.temperature, self.options
        if self.kd == "dkd":
            return dkd_term(z, t, y, T, o["dkd_alpha"], o["dkd_beta"])
        if self.kd == "ls":
            return ls_term(z, t, y, T)
        if self.kd == "dist":
            return dist_term(z, t, y, T, o["dist_beta"], o["dist_gamma"])
        return kl_term(z, t, y, T)

    def _soft(self, z, t, y):
        """The soft term without its weight: the teacher term, or Q4's ``CE(onehot(y), z / T)``."""
        if self.loss_name == "hard+softgt":
            return F.cross_entropy(_f(z) / self.temperature, y)
        return self.teacher_term(z, t, y)

    def terms(self, z, t, y):
        """``(hard, soft)`` as they enter the loss with their weights (``soft_weight`` aside):
        Q1 ``(CE(onehot(y), z), None)``; Q2 ``(CE(onehot(y), z), term)``, whose hard part is
        not in the loss (it is what a hard term would be); Q3 ``(CE(onehot(y), z), c * term)``;
        Q4 ``(CE(onehot(y), z), c * CE(onehot(y), z / T))``."""
        if self.loss_name == "hard":
            return hard(z, t, y), None
        soft = self._soft(z, t, y)
        return hard(z, t, y), (soft if self.loss_name == "soft" else self.c * soft)

    def __call__(self, z, t, y, soft_weight=1.0):
        if self.loss_name == "hard":
            return hard(z, t, y)
        if self.loss_name == "soft":
            return soft_weight * self._soft(z, t, y)
        return hard(z, t, y) + (soft_weight * self.c) * self._soft(z, t, y)

    def __repr__(self):
        return (f"Loss({self.loss_name!r}, T={self.temperature}, c={self.c}, kd={self.kd!r}, "
                f"options={self.options})")


def build_loss(name: str, temperature: float = 1.0, c: float | None = None, *, kd: str = "kl",
               **kd_options) -> Loss:
    """The loss ``name`` as a `Loss`, called as ``loss(z, t, y, soft_weight=1.0)``:

    * ``hard`` (Q1): ``CE(onehot(y), z)``
    * ``soft`` (Q2): ``soft_weight * term``
    * ``hard+soft`` (Q3): ``CE(onehot(y), z) + soft_weight * c * term``
    * ``hard+softgt`` (Q4): ``CE(onehot(y), z) + soft_weight * c * CE(onehot(y), z / T)``

    ``term`` is the teacher term ``kd`` (`KD_TERMS`): ``kl`` ``CE(q, z / T)`` (`kl_term`),
    ``dkd`` (`dkd_term`, options ``dkd_alpha``, ``dkd_beta``), ``ls`` (`ls_term`), ``dist``
    (`dist_term`, options ``dist_beta``, ``dist_gamma``); defaults `KD_DEFAULTS`. ``kd``
    changes Q2 and Q3 only. ``soft_weight`` ramps the soft term in (a warm-up, as
    mdistiller's DKD does linearly from 0). ``c`` defaults to ``T**2`` (see the module
    docstring). ``T`` must be > 0; the task statement uses ``T >= 1``, ``T < 1`` is allowed
    with a warning.
    """
    if name not in LOSSES:
        raise LossError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    options = _options(kd, kd_options)
    T = float(temperature)
    if not T > 0:
        raise LossError(f"temperature must be > 0, got {temperature}")
    if T < 1:
        warnings.warn(f"temperature {T} < 1 sharpens the targets; the task statement uses T >= 1")
    return Loss(name, T, configlib.default_c(T) if c is None else float(c), kd, options)
