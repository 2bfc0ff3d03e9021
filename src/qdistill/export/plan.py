"""The layer plan of an export: weight codes, blocks of the Sequential, and threshold folding.

Weights. Every quantized weight is affine in an integer code ``c`` in ``0..2**k - 1``:

* dorefa, k >= 2: ``w = (2c - n) / n``,         ``n = 2**k - 1``, ``alpha = 1 / n``
* dorefa, k = 1:  ``w = E * (2c - 1)``,          ``n = 1``,        ``alpha = E = mean|w|``
* homework:       ``w = s * (2c - n) / (2n)``,   ``n = 2**k - 1``, ``alpha = s / (2n)``
* lsq:            ``w = s * (c - 2**(k-1))``,    ``n = 2**k``,     ``alpha = s / 2``
  (LSQ's signed integer ``c - 2**(k-1)`` in ``-2**(k-1) .. 2**(k-1) - 1``, step ``s``)

so ``w = alpha * (2c - n)``, ``n`` the code offset. On input levels ``q`` (activation
``q * d``, ``d = 1 / m`` with ``m = 2**a - 1``, or the LSQ step ``d = s_a``) a conv gives
``conv = alpha * d * A + bias`` with the integer accumulator ``A = sum q * (2c - n)`` (see
`qdistill.deploy.kernels`): the steps are folded into the scale.

Thresholds. What follows the conv up to the activation quantizer (bias, BatchNorm with
running statistics, the homework block's ``(|a| + 1) * x + b`` and its ``0.1 *``) is affine
per channel, ``u = P * A + Q``, and the quantizer outputs level
``round(clamp(u, 0, 1) * m')``, i.e. the number of ``t`` in ``1..m'`` with
``u >= (t - 0.5) / m'`` (LSQ: ``round(clamp(u / s, 0, m'))``, the number of ``t`` with
``u >= (t - 0.5) * s``: its step is folded into the cuts). For ``P > 0`` that is
``A >= ceil((cut_t - Q) / P)``;
for ``P < 0`` the inequality flips (stored as ``-A >= ...``, the direction flag ``sign``);
for ``P = 0`` the level is constant. Max-pooling commutes with the (monotone) quantizer,
so it runs on the levels wherever it sits in the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportError
from ..nn.layers import AbsAffine, Clip01, QuantAct, QuantConv2d, QuantLinear, Resize

_INT_LIMIT = 2**31 - 1


# ---------------------------------------------------------------- weight codes

def weight_codes(conv: nn.Module) -> tuple[np.ndarray, int, float]:
    """``(codes, n, alpha)`` of a quantized conv, with ``quantized_weight() == alpha * (2c - n)``
    (see the module docstring). The codes are checked to reproduce torch's quantized
    weights bit for bit."""
    with torch.no_grad():
        wq = conv.quantized_weight().detach().float().cpu()
        step = _step(conv.step, "weight") if conv.quant.learned else None
        codes, n, alpha, rebuilt = conv.quant.codes(conv, wq, step)
    if codes.min() < 0 or codes.max() > max(n, 1) or not torch.equal(rebuilt, wq):
        raise ExportError(f"internal: weight codes do not reproduce the {conv.scheme} {conv.weight_bits}-bit weights")
    return codes.numpy(), n, alpha


def _step(step: torch.Tensor, what: str) -> torch.Tensor:
    """An LSQ step as a float32 ``(1,)`` tensor. Nothing keeps a learned step positive
    (Adam moves a small one by about the learning rate per step), and a negative one is
    still a quantizer: ``round(clamp(v / s, -Q_N, Q_P)) * s`` is LSQ with the range mirrored.
    Zero or non-finite steps give no levels."""
    s = step.detach().float().cpu().reshape(1)
    if not (torch.isfinite(s).all() and float(s) != 0):
        raise ExportError(f"the LSQ {what} step is {float(s)}: no levels to export")
    return s


def act_step(act: nn.Module | None) -> float | None:
    """The value of one level of an LSQ activation quantizer, its step ``s`` (``None`` for
    the other schemes, whose level ``q`` is ``q / m``). `ExportError` if the step was never
    initialised (no training batch seen), is zero or is not finite."""
    if not (isinstance(act, QuantAct) and act.quant.learned and act.step is not None):
        return None
    if not bool(act.initialized):
        raise ExportError("an LSQ activation step was never initialised: train the model at least one step")
    return float(_step(act.step, "activation"))


# ---------------------------------------------------------------- the plan: blocks of the Sequential

@dataclass
class Block:
    """A conv and what follows it up to its activation, or a single other layer."""
    kind: str                      # resize, conv, avgpool, flatten, linear
    first: int                     # index of its first module in the Sequential
    last: int                      # index of its last module
    module: nn.Module | None = None
    bn: nn.BatchNorm2d | None = None
    affine: AbsAffine | None = None
    act: nn.Module | None = None   # QuantAct or Clip01
    pool: int = 1
    name: str | None = None        # its first module's name in a graph (`qdistill.export.graph`)

    @property
    def where(self) -> str:
        """The block's first layer, as error messages name it."""
        return f"layer {self.first if self.name is None else self.name} ({type(self.module).__name__})"

    @property
    def key(self) -> str:
        """The prefix of its arrays' names in the file."""
        return f"l{self.first}" if self.name is None else self.name


def pool_size(m: nn.Module, where: str) -> int:
    k, s = m.kernel_size, m.stride
    k = k if isinstance(k, int) else k[0] if len(set(k)) == 1 else None
    s = s if isinstance(s, int) else s[0] if len(set(s)) == 1 else None
    pad = m.padding if isinstance(m.padding, int) else max(m.padding)
    dil = getattr(m, "dilation", 1)
    dil = dil if isinstance(dil, int) else max(dil)
    if k is None or s != k or pad != 0 or dil != 1 or m.ceil_mode:
        raise ExportError(f"{where}: unsupported pooling {m} (need square kernel == stride, no padding)")
    return k


def plan(model: nn.Module) -> list[Block]:
    """Group the flat ``nn.Sequential`` into blocks the engine runs; `ExportError` on a
    layer it cannot run."""
    if not isinstance(model, nn.Sequential):
        raise ExportError(f"export needs a qdistill model (a flat nn.Sequential), got {type(model).__name__}")
    mods = list(model)
    blocks: list[Block] = []
    i = 0
    while i < len(mods):
        if isinstance(mods[i], nn.Conv2d):
            blocks.append(_conv_block(mods, i))
            i = blocks[-1].last
        elif not isinstance(mods[i], nn.Dropout):
            blocks.append(_layer_block(mods, i))
        i += 1
    return blocks


def _conv_block(mods: list[nn.Module], i: int) -> Block:
    """The conv ``mods[i]`` with what follows it up to its activation quantizer, and a
    max-pool right after that quantizer (dropouts skipped)."""
    block = Block("conv", i, i, mods[i])
    j = i + 1
    while j < len(mods) and block.act is None and absorb(block, mods[j], j):
        j += 1
    if block.act is None:
        raise ExportError(f"{block.where}: a convolution must be followed by an activation "
                          f"quantizer (found {type(mods[j]).__name__ if j < len(mods) else 'the end'})")
    while j < len(mods) and isinstance(mods[j], nn.Dropout):
        j += 1
    if j < len(mods) and isinstance(mods[j], nn.MaxPool2d):
        if block.pool != 1 or isinstance(block.act, Clip01):
            raise ExportError(f"layer {j}: unsupported second max-pool in a block")
        block.pool = pool_size(mods[j], f"layer {j}")
        j += 1
    block.last = j - 1
    return block


def absorb(block: Block, m: nn.Module, j) -> bool:
    """Take ``m`` (module ``j``) into the conv block if it can stand there before the
    activation quantizer: BatchNorm, then the affine, with a max-pool anywhere after the
    conv. False if ``m`` ends the block."""
    if isinstance(m, nn.Dropout):
        pass
    elif isinstance(m, nn.BatchNorm2d) and block.bn is None and block.affine is None and block.pool == 1:
        block.bn = m
    elif isinstance(m, AbsAffine) and block.affine is None and block.pool == 1:
        block.affine = m
    elif isinstance(m, nn.MaxPool2d) and block.pool == 1:
        block.pool = pool_size(m, f"layer {j}")
    elif isinstance(m, (QuantAct, Clip01)):
        block.act = m
    else:
        return False
    return True


def _layer_block(mods: list[nn.Module], i: int) -> Block:
    """The block of the single layer ``mods[i]``: resize, average pool, flatten or the
    last (linear) layer."""
    m = mods[i]
    where = f"layer {i} ({type(m).__name__})"
    if isinstance(m, Resize):
        return Block("resize", i, i, m)
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override is not None:
            raise ExportError(f"{where}: divisor_override is not supported")
        return Block("avgpool", i, i, m, pool=pool_size(m, where))
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ExportError(f"{where}: only Flatten(1, -1) is supported")
        return Block("flatten", i, i, m)
    if isinstance(m, nn.Linear):
        if i != len(mods) - 1:
            raise ExportError(f"{where}: a linear layer must be the last layer")
        return Block("linear", i, i, m)
    raise ExportError(f"{where}: unsupported layer for export")


# ---------------------------------------------------------------- folding

def fold(block: Block, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compose ``u = p * v + q`` (``v`` the conv's accumulator or float output) with the
    block's BatchNorm (running stats), ``(|a| + 1) * x + b`` and homework's ``0.1 *``."""
    if block.bn is not None:
        bn = block.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ExportError(f"{block.where}: BatchNorm without running statistics")
        f64 = lambda t: t.detach().double().cpu().numpy()
        g = f64(bn.weight) if bn.weight is not None else 1.0
        beta = f64(bn.bias) if bn.bias is not None else 0.0
        scale = g / np.sqrt(f64(bn.running_var) + bn.eps)
        p, q = p * scale, (q - f64(bn.running_mean)) * scale + beta
    if block.affine is not None:
        c = block.affine.a.detach().double().abs().numpy() + 1
        p, q = p * c, q * c + block.affine.b.detach().double().numpy()
    if isinstance(block.act, QuantAct):  # the quantizer's own factor (the course's 0.1), exact at 1
        p, q = block.act.quant.prescale * p, block.act.quant.prescale * q
    return p, q


def thresholds(p: np.ndarray, q: np.ndarray, bits: int, integer: bool,
               step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(thr, sign)`` with ``level = #{t : sign * v >= thr[t]}`` equal to
    ``round(clamp(p * v + q, 0, 1) * m)``, ``m = 2**bits - 1``, per channel (rows); with an
    LSQ ``step`` ``s``: ``round(clamp((p * v + q) / s, 0, m))``.

    ``T_t = (cut_t - q) / p`` with ``cut_t = (t - 0.5) / m`` (LSQ: ``(t - 0.5) * s``);
    ``p > 0``: ``v >= T_t``; ``p < 0``: ``-v >= -T_t``; ``p = 0``: always or never. For
    integer ``v`` the bound becomes ``ceil``. A negative LSQ step counts
    ``(-u) / (-s) >= t - 0.5``: ``p``, ``q`` and ``s`` change sign."""
    if step is not None and step < 0:
        p, q, step = -p, -q, -step
    m = 2**bits - 1
    t = np.arange(1, m + 1) - 0.5
    cut = t / m if step is None else t * step                # (m,)
    sign = np.where(p < 0, -1, 1).astype(np.int8)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (cut[None, :] - q[:, None]) / p[:, None]        # (channels, m)
    t = t * sign[:, None]
    const = (p == 0)[:, None]
    always = q[:, None] >= cut[None, :]
    if integer:
        t = np.where(const, np.where(always, -_INT_LIMIT, _INT_LIMIT), np.ceil(np.nan_to_num(t)))
        return np.clip(t, -_INT_LIMIT, _INT_LIMIT).astype(np.int32), sign
    return np.where(const, np.where(always, -np.inf, np.inf), t).astype(np.float64), sign


def f32(t: torch.Tensor) -> np.ndarray:
    """A tensor as a float32 numpy array (detached, on the CPU)."""
    return t.detach().float().cpu().numpy().astype(np.float32)


def weight_f32(m: nn.Module) -> np.ndarray:
    """The weight of a conv or linear layer as float32: its quantized values if it is a
    quantized layer."""
    return f32(m.quantized_weight() if isinstance(m, (QuantConv2d, QuantLinear)) else m.weight)
