"""The losses of the task statement's four questions.

Notation: ``z`` student logits, ``t`` teacher logits, ``y`` labels, ``T`` temperature,
``CE(p, z) = -sum_i p_i * log_softmax(z)_i`` averaged over the batch.

Why ``c = T**2``: the gradient of ``CE(softmax(t/T), z/T)`` with respect to ``z`` is
``(softmax(z/T) - softmax(t/T)) / T``, and for large ``T`` the difference of the two
softmaxes itself shrinks like ``1/T`` (Hinton et al. 2015, section 2.1), so the soft
term's gradients scale as ``1/T**2``. Multiplying by ``T**2`` keeps their size
comparable to the hard term's as ``T`` changes.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import LOSSES

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
NEEDS_TEACHER = dict(zip(LOSSES, (False, True, True, False)))


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16 logits of autocast are upcast, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def soft_cross_entropy(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``CE(p, z) = mean_batch( -sum_i p_i * log_softmax(z)_i )``."""
    return -(p * F.log_softmax(_f(z), dim=-1)).sum(dim=-1).mean()


def hard(z, t, y):
    """Q1: ``CE(onehot(y), z)``."""
    return F.cross_entropy(_f(z), y)


def _soft(z, t, T):
    return soft_cross_entropy(F.softmax(_f(t) / T, dim=-1), z / T)


def build_loss(name: str, temperature: float = 1.0, c: float | None = None) -> LossFn:
    """The loss ``name`` as a callable ``(student_logits, teacher_logits, labels) -> loss``.

    * ``hard`` (Q1): ``CE(onehot(y), z)``
    * ``soft`` (Q2): ``CE(softmax(t / T), z / T)``
    * ``hard+soft`` (Q3): ``CE(onehot(y), z) + c * CE(softmax(t / T), z / T)``
    * ``hard+softgt`` (Q4): ``CE(onehot(y), z) + c * CE(onehot(y), z / T)``

    ``c`` defaults to ``T**2`` (see the module docstring). ``T`` must be > 0; the task
    statement uses ``T >= 1``, ``T < 1`` is allowed with a warning.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    T = float(temperature)
    if not T > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if T < 1:
        warnings.warn(f"temperature {T} < 1 sharpens the targets; the task statement uses T >= 1")
    c = T * T if c is None else float(c)

    if name == "hard":
        fn = hard
    elif name == "soft":
        def fn(z, t, y):
            return _soft(z, t, T)
    elif name == "hard+soft":
        def fn(z, t, y):
            return hard(z, t, y) + c * _soft(z, t, T)
    else:
        def fn(z, t, y):
            return hard(z, t, y) + c * F.cross_entropy(_f(z) / T, y)
    fn.loss_name, fn.temperature, fn.c = name, T, c
    fn.needs_teacher = NEEDS_TEACHER[name]
    return fn
