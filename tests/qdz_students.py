"""Small trained students and a hooked PyTorch reference, shared by the export, deploy and
ONNX tests (each configuration trained once per session: `student`)."""
from __future__ import annotations

import fcntl
import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bounds import nhwc
from qdistill.data import digits
from qdistill.nn.layers import QuantAct
from qdistill.nn.models import build

# (arch, weight_bits, act_bits, scheme): the exported configurations. LSQ: one vgg7 (its
# average pool of LSQ levels is the engine's in_step) and three of the cheaper
# dorefa-svhn, 2..4-bit weights; at lr 1e-2 some of their weight steps turn negative
# within the four steps of `student`, so export's mirrored range is exercised too.
LSQ_CONFIGS = [("vgg7", 2, 2, "lsq"), ("dorefa-svhn", 2, 1, "lsq"), ("dorefa-svhn", 3, 2, "lsq"),
               ("dorefa-svhn", 4, 3, "lsq")]
CONFIGS = [(arch, wb, ab, scheme) for arch in ("vgg7", "dorefa-svhn")
           for wb, ab, scheme in ((2, 1, "dorefa"), (1, 1, "dorefa"), (1, 2, "dorefa"),
                                  (2, 2, "dorefa"), (2, 1, "homework"))] + LSQ_CONFIGS
N_EVAL = {"vgg7": 768, "dorefa-svhn": 100,  # dorefa-svhn costs ~4x vgg7 per image; 6 x 768 + 8 x 100 >= 5000
          "resnet20": 256}
CLASSES = [str(i) for i in range(10)]


@functools.lru_cache(maxsize=None)
def digits_data() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(64 train images, their labels, the other 1733 images as float32 numpy, test split
    first), in [0, 1]."""
    ds = digits.load()
    x_train = ds.x_train[:64].float() / 255
    rest = torch.cat([ds.x_test, ds.x_train[64:]]).numpy()
    return x_train, ds.y_train[:64], rest.astype(np.float32) / np.float32(255)


@functools.lru_cache(maxsize=None)
def student(arch: str, wb: int, ab: int, scheme: str, steps: int = 4) -> nn.Module:
    """A student after ``steps`` Adam steps on 64 digits images, so weights and BN are not at
    their init. Every student gets every third BN scale negated, so export's direction flag
    (thresholds on -A) is exercised; running statistics are then re-estimated on the 64
    images (train-mode passes, cumulative average). Trained once per session: the first
    process to ask keeps its weights in the session's shared folder, the others load them."""
    torch.manual_seed(0)  # the initial weights
    model = build(arch, weight_bits=wb, act_bits=ab, scheme=scheme)
    kept = Path(os.environ["QD_TEST_SHARED"]) / f"student-{arch}-W{wb}A{ab}-{scheme}-{steps}.pt"
    with open(kept.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if kept.exists():
            model.load_state_dict(torch.load(kept, weights_only=True))
        else:
            _train(model, steps)
            torch.save(model.state_dict(), kept.with_suffix(".tmp"))
            os.replace(kept.with_suffix(".tmp"), kept)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # as `_train` leaves it: a cumulative average, should anything train on
    return model.eval()


def _train(model: nn.Module, steps: int) -> None:
    x, y, _ = digits_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for s in range(steps):
        xb, yb = x[32 * (s % 2):32 * (s % 2) + 32], y[32 * (s % 2):32 * (s % 2) + 32]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight[::3] *= -1
                m.reset_running_stats()
                m.momentum = None
        model(x[:32])
        model(x[32:])


def eval_images(arch: str) -> np.ndarray:
    """Images the student was not trained on: `N_EVAL` of them."""
    return digits_data()[2][:N_EVAL[arch]]


@functools.lru_cache(maxsize=None)
def _rest_labels() -> np.ndarray:
    ds = digits.load()
    return torch.cat([ds.y_test, ds.y_train[64:]]).numpy()


def eval_labels(arch: str) -> np.ndarray:
    """The labels of `eval_images`."""
    return _rest_labels()[:N_EVAL[arch]]


def torch_trace(model: nn.Sequential, x: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """``(inputs, outputs, logits)``: every module's input and output by its index in the
    Sequential (eval mode, float32)."""
    inputs, outputs, hooks = {}, {}, []
    for i, m in enumerate(model):
        def hook(mod, args, out, i=i):
            inputs[i], outputs[i] = args[0].detach(), out.detach()
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).numpy()
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs, logits


def levels(t: torch.Tensor, act: QuantAct) -> np.ndarray:
    """Torch activation values of the quantizer ``act`` as integer levels ``q``, channels
    last: ``q / m`` (DoReFa, homework) or ``q * s`` (LSQ's step ``s``; both are one
    correctly rounded operation, so the inverse rounds back to ``q``)."""
    q = torch.round(t / act.step.detach()) if act.scheme == "lsq" else torch.round(t * (2**act.bits - 1))
    return nhwc(q).astype(np.uint8)


def act_before(model: nn.Sequential, i: int) -> QuantAct:
    """The last activation quantizer at or before module ``i``: the one whose levels a
    block's output (``i`` its last module) or a stage's input (``i`` = its first - 1) holds."""
    return next(model[j] for j in range(i, -1, -1) if isinstance(model[j], QuantAct))
