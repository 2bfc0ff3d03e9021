"""The compiled training step (``train.compile``): `qdistill.training.step.train_step`
itself, with its forward and losses (`step.forward_losses`, checks included) through
``torch.compile`` (Inductor fuses the elementwise passes of BatchNorm, the quantizers and
pooling that dominate a student's step; the backward is compiled with them).

The optimizer's update stays eager (a few multi-tensor kernels over the weights):
compiled, torch's Adam keeps its step count in a float32 tensor, which moved every
weight by 2e-8 after one step at lr 3e-3 in float64, a change of the formula rather than
rounding.

* One graph for every batch: the batch dimension is marked dynamic on the first call, so
  neither the last, smaller batch nor a new epoch recompiles.
* Where compiling fails (no C++ compiler, an op Inductor lacks), the run goes on eager
  after one warning line; ``auto`` compiles only a run long enough to repay the compile
  time (`AUTO_IMAGES`, measured: README, "Compiled step").

Compiled and eager steps compute the same formulas in another order, so they agree to
rounding, not bit for bit; a resumed compiled run replays the uninterrupted one exactly.
"""
from __future__ import annotations

import shutil
import sys
import warnings

import torch

from .step import forward_losses, train_step

# Student images a run must train for `auto` to compile it: the compile time over the
# time a compiled image saves (README, "Compiled step"; 2-core Xeon, W2A1 vgg7).
AUTO_IMAGES = 400_000


def wanted(cfg: dict, images: int, device: torch.device) -> bool:
    """Whether the run compiles: ``train.compile``, or for ``auto`` a run training at
    least `AUTO_IMAGES` images on a device Inductor serves, with a C++ compiler on CPU."""
    setting = cfg["train"]["compile"]
    if setting != "auto":
        return bool(setting)
    return images >= AUTO_IMAGES and (device.type == "cuda" or (device.type == "cpu" and has_compiler()))


def has_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


class CompiledStep:
    """A drop-in for `train_step` that compiles on the first call and falls back to it
    for good, with one warning line, where compiling fails."""

    def __init__(self):
        self._loss_fn = torch.compile(forward_losses, dynamic=None)
        self._eager = False

    @property
    def compiled(self) -> bool:
        """Whether the steps run compiled (false once a failure fell back to eager)."""
        return not self._eager

    def __call__(self, net, opt, xb, yb, teacher_logits, losses, autocast):
        if self._eager:
            return train_step(net, opt, xb, yb, teacher_logits, losses, autocast)
        try:
            return self._compiled(net, opt, xb, yb, teacher_logits, losses, autocast)
        except Exception as e:  # noqa: BLE001 - any failure to compile means eager
            if not _compile_error(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"warning: torch.compile failed ({first[:160]}); training eager", file=sys.stderr)
            self._eager = True
            return train_step(net, opt, xb, yb, teacher_logits, losses, autocast)

    def _compiled(self, net, opt, xb, yb, teacher_logits, losses, autocast):
        torch._dynamo.mark_dynamic(xb, 0)
        torch._dynamo.mark_dynamic(yb, 0)
        if teacher_logits is not None:
            torch._dynamo.mark_dynamic(teacher_logits, 0)
        return train_step(net, opt, xb, yb, teacher_logits, losses, autocast, forward=self._loss_fn)


def _compile_error(e: Exception) -> bool:
    """Whether ``e`` comes from compiling rather than from the step's own arithmetic."""
    import torch._dynamo.exc as exc
    from torch._inductor.exc import InductorError
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError
    return isinstance(e, (exc.BackendCompilerFailed, exc.Unsupported, InductorError, ConstraintViolationError,
                          OSError))
