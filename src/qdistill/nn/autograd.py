"""Autograd nodes behind the quantizers of `qdistill.nn.quantizers`.

Each is a ``torch.autograd.Function`` rather than the ``x + (q - x).detach()`` trick:
that trick can move a level by one ulp, and levels must be exact (export packs them into
integer codes). Two of them also save less for backward than autograd would
(`ClampRound`, `MaxPoolInt32`): training is memory-bound.
"""
from __future__ import annotations

import torch


class Round(torch.autograd.Function):
    """``round(x * n) / n``, or with ``signed`` the signed level ``(2 * round(x * n) - n) / n``;
    backward: straight-through, ``g`` (``2 * g`` when signed)."""

    @staticmethod
    def forward(ctx, x, n, signed=False):
        ctx.signed = signed
        if signed:
            return (2 * torch.round(x * n) - n) / n
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, g):
        return (2 * g if ctx.signed else g), None, None


class SignScaled(torch.autograd.Function):
    """``where(w >= 0, E, -E)`` for a given ``E`` (a constant); backward: identity."""

    @staticmethod
    def forward(ctx, w, e):
        return torch.where(w >= 0, e, -e)

    @staticmethod
    def backward(ctx, g):
        return g, None


class QuantizeBackward(torch.autograd.Function):
    """Identity in forward; backward replaces the incoming gradient by ``fn(g)``."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.fn(g), None


class ClampRound(torch.autograd.Function):
    """``round(clamp(x, 0, 1) * n) / n`` in one node that saves a 1-byte mask instead of ``x``.

    ``torch.clamp`` would keep its float input alive until backward only to recompute
    ``0 <= x <= 1``, so the mask is kept instead. ``c == x`` holds exactly where
    ``0 <= x <= 1`` (and is false for NaN), which is where ``torch.clamp``'s backward
    passes the gradient (bounds included)."""

    @staticmethod
    def forward(ctx, x, n):
        c = torch.clamp(x, 0.0, 1.0)
        ctx.save_for_backward(torch.eq(c, x))
        if n == 1.0:  # x * 1 and x / 1 are exact: skip two passes over the tensor
            return c.round_()
        return c.mul_(n).round_().div_(n)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return mask_grad(g, inside), None


class LsqRound(torch.autograd.Function):
    """LSQ's quantizer node (Esser et al., "Learned Step Size Quantization", ICLR 2020,
    eqs. 1-5): forward ``round(clamp(v / s, -qn, qp)) * s``, ``s`` broadcast to ``v``.
    Backward, with ``r = v / s`` and ``inside = -qn < r < qp`` (the paper's strict bounds):
    ``dL/dv = g`` inside, 0 outside (straight through the round); ``dL/ds = grad_scale *
    sum(g * d)`` over the elements sharing ``s``, ``d = round(r) - r`` inside, ``-qn`` for
    ``r <= -qn``, ``qp`` for ``r >= qp``. The level is ``code * s`` with ``code`` the exact
    integer, one product (no ``x + (q - x).detach()`` whose sum can move it an ulp)."""

    @staticmethod
    def forward(ctx, v, s, qn, qp, grad_scale):
        r = v / s
        code = torch.clamp(r, -qn, qp).round_()
        inside = (r > -qn) & (r < qp)
        ctx.save_for_backward(inside, torch.where(inside, code - r, code))
        ctx.grad_scale, ctx.s_shape, ctx.v_dtype, ctx.s_dtype = grad_scale, s.shape, v.dtype, s.dtype
        return code.mul_(s)

    @staticmethod
    def backward(ctx, g):
        inside, d = ctx.saved_tensors
        gv = mask_grad(g, inside).to(ctx.v_dtype) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = ((g * d).sum_to_size(ctx.s_shape) * ctx.grad_scale).to(ctx.s_dtype)
        return gv, gs, None, None, None


CHUNK = 1 << 18  # elements per product in `mask_grad`: 1 MiB of fp32, cache-sized


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """The storage of a dense contiguous or channels_last tensor as a 1-D view, else ``None``."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)  # the permuted tensor is contiguous
    return None


def mask_grad(g: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``g`` where ``inside``, else 0 (for finite ``g``; on CPU a non-finite ``g`` outside
    gives NaN).

    On CPU ``torch.where(inside, g, 0)`` runs an unvectorised loop (it was 15% of a W2A1
    vgg7 training step), and ``g * inside`` first converts the whole mask to a float
    temporary. So the product runs over the flat storage in cache-sized chunks, each
    converting only its own bytes of the mask: 2-5x faster than ``where``, and no
    temporary beyond one chunk (measured in the README's performance section). Under
    `torch.compile` it is ``where``, which inductor fuses; the chunk loop would fix the
    batch size into the graph."""
    fg, fm = _flat(g), _flat(inside)
    if (g.device.type != "cpu" or torch.compiler.is_compiling() or fg is None or fm is None
            or g.stride() != inside.stride()):
        return torch.where(inside, g, 0.0)
    out = torch.empty_like(g)  # same strides as g (preserve_format on a dense tensor)
    fo, fm = _flat(out), fm.view(torch.uint8)
    for a in range(0, fg.numel(), CHUNK):
        torch.mul(fg[a:a + CHUNK], fm[a:a + CHUNK], out=fo[a:a + CHUNK])
    return out


class MaxPoolInt32(torch.autograd.Function):
    """``max_pool2d`` that keeps only its argmax indices, as int32, for backward.

    Autograd's own max-pool node keeps the float input alive (4 bytes per input
    element) and int64 indices, although backward only scatters the gradient to the
    indices. This keeps 1 byte per input element instead; backward is the same native
    kernel (``max_pool2d_with_indices_backward``, which reads only the shape and memory
    format of its input), so gradients are identical."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride):
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride)
        ctx.save_for_backward(idx.to(torch.int32))
        ctx.args = (kernel_size, stride)
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        like = torch.empty(ctx.shape, dtype=g.dtype, device=ctx.device, memory_format=fmt)
        kernel_size, stride = ctx.args
        grad = torch.ops.aten.max_pool2d_with_indices_backward(g, like, kernel_size, stride, [0, 0], [1, 1],
                                                               False, idx.long())
        return grad, None, None
