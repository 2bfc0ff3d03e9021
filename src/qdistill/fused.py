"""K students of one architecture trained as one grouped network, and split back.

A study trains the same small student many times on the same batches with different
losses. `FusedStudents` turns K such members into one flat ``nn.Sequential``:

* the first convolution sees the shared input and becomes one convolution with
  ``K * Cout`` outputs; every later convolution becomes one with ``groups=K``
  (``K * Cin -> K * Cout``), so member ``k`` owns channels ``[k*C, (k+1)*C)``;
* BatchNorm runs over ``K * C`` channels and `AbsAffine` over its concatenation;
  per-channel statistics never mix channels, so they never mix members;
* ``Flatten`` turns ``(N, K*C, h, w)`` into ``(K, N, C*h*w)`` and the linear layer is one
  batched matmul with a ``(K, out, in)`` weight, giving logits ``(K, N, classes)``;
* elementwise layers (activations, pooling, resize, dropout, clip) are unchanged.

Weight quantization is per member: DoReFa's ``max|tanh w|`` and ``mean|w|`` and the
homework scheme's ``mean|tanh w|`` are statistics of one member's tensor, so the fused
quantizers view the weight as ``(K, -1)`` and reduce each row (same formulas as
`qdistill.quant`). Gradient quantization takes its per-sample max over one member's
output channels, never over the fused ones.

Every parameter holds the members' slices as contiguous blocks along its first
dimension. Adam (with or without weight decay) is elementwise, so each member evolves
exactly as it would alone, up to float rounding of the grouped kernels (bit-identical
with one thread on the dev box; with several threads the grouped kernels split their
reductions differently and training amplifies those last-bit differences). Two things
never carry over bit for bit: random numbers (``Dropout`` masks and the noise of
``dorefa_gradient``) are drawn once for the fused tensor, so a fused member sees other
draws than a separate run with the same seed; and anything that reduces over *all*
parameters (a global gradient-norm clip) would couple the members.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import AbsAffine, Clip01, Resize, build
from .quant import FULL, QuantAct, QuantConv2d, QuantLinear, _signed_levels, dorefa_gradient

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]

# Layers that act on each channel (or element) alone: shared as they are.
_ELEMENTWISE = (QuantAct, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, Resize, Clip01)
# Of those, the ones that also work on the (K, N, features) tensor after Flatten.
_SHAPE_FREE = (QuantAct, nn.Dropout, Clip01)


# ---------------------------------------------------------------- per-member quantizers

class _SignScaledPerMember(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        e = w.abs().mean(dim=1, keepdim=True)
        return torch.where(w >= 0, e, -e)

    @staticmethod
    def backward(ctx, g):
        return g


def dorefa_weight_per_member(w: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """`qdistill.quant.dorefa_weight` applied to each of the ``k`` members' blocks of ``w``
    (``w`` viewed as ``(k, -1)``, one row per member):

    * ``bits >= 32``: ``w``;
    * ``bits == 1``: ``sign(w) * E_k``, ``E_k = mean(|w_k|)``, backward identity;
    * ``bits >= 2``: ``x = tanh(w_k)``, ``x = x / max(|x|) * 0.5 + 0.5`` (max over row k),
      output ``2 * q_bits(x) - 1``.
    """
    if bits >= FULL:
        return w
    rows = w.reshape(k, -1)
    if bits == 1:
        return _SignScaledPerMember.apply(rows).view_as(w)
    x = torch.tanh(rows)
    x = x / x.abs().amax(dim=1, keepdim=True) * 0.5 + 0.5
    return _signed_levels(x, bits).view_as(w)


def homework_weight_per_member(w: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """`qdistill.quant.homework_weight` per member: with ``t = tanh(w_k)`` (row k of
    ``w`` viewed as ``(k, -1)``) and ``s_k = 2 * mean(|t|)``, the output is
    ``(q_bits(clamp(t / s_k, -0.5, 0.5) + 0.5) - 0.5) * s_k``. ``bits >= 32``: ``w``."""
    if bits >= FULL:
        return w
    t = torch.tanh(w.reshape(k, -1))
    s = 2 * t.abs().mean(dim=1, keepdim=True)
    return (_signed_levels(torch.clamp(t / s, -0.5, 0.5) + 0.5, bits) * (0.5 * s)).view_as(w)


_WEIGHT_PER_MEMBER = {"dorefa": dorefa_weight_per_member, "homework": homework_weight_per_member}


class _GradQuantPerMember(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, k):
        ctx.n, ctx.k = n, k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        n = ctx.n
        # (N, K*C, H, W) -> (N, K, C, H, W): a view in NCHW and in channels_last alike.
        g5 = g.unflatten(1, (ctx.k, -1))
        m = g5.abs().amax(dim=tuple(range(2, g5.dim())), keepdim=True)
        safe = torch.where(m > 0, m, torch.ones_like(m))
        u = (torch.rand_like(g5) - 0.5) / n
        y = torch.clamp(g5 / (2 * safe) + 0.5 + u, 0.0, 1.0)
        return (2 * m * (torch.round(y * n) / n - 0.5)).flatten(1, 2), None, None


def gradient_per_member(x: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """`qdistill.quant.dorefa_gradient` on a fused ``(N, K*C, ...)`` output, with the
    per-sample max taken per member: ``m_{n,k} = max|g[n, k*C:(k+1)*C]|``,
    ``g_q = 2 m (q_bits(clamp(g / 2m + 0.5 + u, 0, 1)) - 0.5)``,
    ``u ~ Uniform(-0.5/n, 0.5/n)``. Identity in forward; ``bits >= 32``: identity."""
    if bits >= FULL:
        return x
    return _GradQuantPerMember.apply(x, float(2**bits - 1), k)


# ---------------------------------------------------------------- fused layers

class FusedQuantConv2d(QuantConv2d):
    """K members' `QuantConv2d` as one convolution: ``groups=K`` over ``K * Cin`` input
    channels, or ``groups=1`` over the shared input when ``shared_input``; weight
    ``(K * Cout, Cin, kh, kw)``, member ``k`` in rows ``[k*Cout, (k+1)*Cout)``."""

    def __init__(self, cin: int, cout: int, kernel_size, *, k: int, shared_input: bool, **kwargs):
        groups = 1 if shared_input else k
        super().__init__(cin if shared_input else k * cin, k * cout, kernel_size, groups=groups, **kwargs)
        self.k = k
        self.shared_input = shared_input

    def quantized_weight(self) -> torch.Tensor:
        return _WEIGHT_PER_MEMBER[self.scheme](self.weight, self.weight_bits, self.k)

    def forward(self, x):
        out = self._conv_forward(x, self.quantized_weight(), self.bias)
        return gradient_per_member(out, self.grad_bits, self.k)

    def extra_repr(self):
        return super().extra_repr() + f", members={self.k}"


class FusedFlatten(nn.Module):
    """``(N, K*C, h, w) -> (K, N, C*h*w)``: member k's features in its own order."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.reshape(x.shape[0], self.k, -1).transpose(0, 1)

    def extra_repr(self):
        return f"members={self.k}"


class FusedQuantLinear(nn.Module):
    """K members' `QuantLinear` as one batched matmul: ``(K, N, in) -> (K, N, out)``,
    ``y_k = x_k @ Q(W_k)^T + b_k`` with weight ``(K, out, in)`` and bias ``(K, out)``."""

    def __init__(self, in_features: int, out_features: int, *, k: int, bias: bool,
                 weight_bits: int, grad_bits: int, scheme: str):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight_bits, self.grad_bits, self.scheme = weight_bits, grad_bits, scheme
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k, out_features)) if bias else None

    def quantized_weight(self) -> torch.Tensor:
        return _WEIGHT_PER_MEMBER[self.scheme](self.weight, self.weight_bits, self.k)

    def forward(self, x):
        w = self.quantized_weight().transpose(1, 2)
        y = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, w)
        # (K, N, out) -> (K*N, out): one row per (member, sample), as dorefa_gradient wants.
        return dorefa_gradient(y.reshape(-1, y.shape[-1]), self.grad_bits).view_as(y)

    def extra_repr(self):
        return (f"members={self.k}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_bits={self.weight_bits}, "
                f"grad_bits={self.grad_bits}, scheme={self.scheme}")


def _cat(tensors, dim=0) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors], dim=dim).clone()


def _fuse_conv(group: list[QuantConv2d], k: int, shared_input: bool) -> FusedQuantConv2d:
    ref = group[0]
    if ref.groups != 1:
        raise ValueError("fused members' convolutions must have groups=1")
    fused = FusedQuantConv2d(ref.in_channels, ref.out_channels, ref.kernel_size, k=k,
                             shared_input=shared_input, stride=ref.stride, padding=ref.padding,
                             dilation=ref.dilation, bias=ref.bias is not None,
                             padding_mode=ref.padding_mode, weight_bits=ref.weight_bits,
                             grad_bits=ref.grad_bits, scheme=ref.scheme,
                             device=ref.weight.device, dtype=ref.weight.dtype)
    fused.weight = nn.Parameter(_cat(m.weight for m in group), ref.weight.requires_grad)
    if ref.bias is not None:
        fused.bias = nn.Parameter(_cat(m.bias for m in group), ref.bias.requires_grad)
    return fused


def _fuse_linear(group: list[QuantLinear], k: int) -> FusedQuantLinear:
    ref = group[0]
    fused = FusedQuantLinear(ref.in_features, ref.out_features, k=k, bias=ref.bias is not None,
                             weight_bits=ref.weight_bits, grad_bits=ref.grad_bits, scheme=ref.scheme)
    fused.weight = nn.Parameter(torch.stack([m.weight.detach() for m in group]), ref.weight.requires_grad)
    if ref.bias is not None:
        fused.bias = nn.Parameter(torch.stack([m.bias.detach() for m in group]), ref.bias.requires_grad)
    return fused


def _fuse_bn(group: list[nn.BatchNorm2d], k: int) -> nn.BatchNorm2d:
    ref = group[0]
    if len({int(m.num_batches_tracked) for m in group if m.num_batches_tracked is not None}) > 1:
        raise ValueError("fused members' BatchNorm layers have seen different numbers of batches")
    fused = nn.BatchNorm2d(k * ref.num_features, eps=ref.eps, momentum=ref.momentum, affine=ref.affine,
                           track_running_stats=ref.track_running_stats,
                           device=ref.running_mean.device if ref.running_mean is not None else None)
    if ref.affine:
        fused.weight = nn.Parameter(_cat(m.weight for m in group))
        fused.bias = nn.Parameter(_cat(m.bias for m in group))
    if ref.track_running_stats:
        fused.running_mean = _cat(m.running_mean for m in group)
        fused.running_var = _cat(m.running_var for m in group)
        fused.num_batches_tracked = ref.num_batches_tracked.detach().clone()
    return fused


def _fuse_abs_affine(group: list[AbsAffine], k: int) -> AbsAffine:
    fused = AbsAffine(k * group[0].a.numel())
    fused.a = nn.Parameter(_cat(m.a for m in group))
    fused.b = nn.Parameter(_cat(m.b for m in group))
    return fused


def _signature(layer: nn.Module) -> tuple:
    """What two members' layers must share to be fused: type, hyper-parameters, shapes."""
    shapes = tuple((name, tuple(t.shape)) for name, t in layer.state_dict().items())
    extra = (layer.momentum,) if isinstance(layer, nn.BatchNorm2d) else ()
    return (type(layer), layer.extra_repr(), shapes, extra)


def _check_members(members) -> list[nn.Sequential]:
    members = list(members)
    if not members:
        raise ValueError("FusedStudents needs at least one member")
    for m in members:
        if not isinstance(m, nn.Sequential):
            raise ValueError(f"fused members must be flat nn.Sequential models, got {type(m).__name__}")
    ref = members[0]
    for i, m in enumerate(members[1:], 1):
        if getattr(m, "arch", None) != getattr(ref, "arch", None) or len(m) != len(ref):
            raise ValueError(f"member {i} has another architecture than member 0")
        for j, (a, b) in enumerate(zip(ref, m)):
            if _signature(a) != _signature(b):
                raise ValueError(f"member {i} differs from member 0 at layer {j}: "
                                 f"{type(b).__name__}({b.extra_repr()}) vs {type(a).__name__}({a.extra_repr()})")
    return members


class FusedStudents(nn.Module):
    """K members built by `qdistill.models.build` with one architecture and one set of
    bit-widths, as one network: ``forward(x)`` maps a shared ``(N, 3, H, W)`` batch to
    logits ``(K, N, classes)``; `split` gives the K ordinary models back.

    The members' weights, BatchNorm statistics and train/eval mode are copied in; the
    members themselves are left untouched.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = _check_members(members)
        self.k = k = len(members)
        layers: list[nn.Module] = []
        seen_conv = flattened = False
        for j, group in enumerate(zip(*members)):
            group = list(group)
            ref = group[0]
            where = f"layer {j} ({type(ref).__name__})"
            if isinstance(ref, QuantConv2d) and not flattened:
                layer = _fuse_conv(group, k, shared_input=not seen_conv)
                seen_conv = True
            elif isinstance(ref, nn.BatchNorm2d) and seen_conv and not flattened:
                layer = _fuse_bn(group, k)
            elif isinstance(ref, AbsAffine) and seen_conv and not flattened:
                layer = _fuse_abs_affine(group, k)
            elif isinstance(ref, nn.Flatten) and seen_conv and not flattened:
                if (ref.start_dim, ref.end_dim) != (1, -1):
                    raise ValueError(f"{where}: only Flatten(1, -1) can be fused")
                layer, flattened = FusedFlatten(k), True
            elif isinstance(ref, QuantLinear) and flattened:
                layer = _fuse_linear(group, k)
            elif isinstance(ref, _SHAPE_FREE if flattened else _ELEMENTWISE):
                layer = copy.deepcopy(ref)
            else:
                raise ValueError(f"{where} cannot be fused at this position")
            layer.train(ref.training)
            layers.append(layer)
        if not flattened or not isinstance(layers[-1], FusedQuantLinear):
            raise ValueError("fused members must end with Flatten and a linear layer")
        self.net = nn.Sequential(*layers)
        # Not self.train(): that would overwrite the per-layer modes copied above.
        self.training = self.net.training = members[0].training
        self.channels_last = False
        # A plain list, so the template's parameters are not registered as ours.
        self._template = [copy.deepcopy(members[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def to_channels_last(self) -> "FusedStudents":
        """Store 4-d weights and feed inputs in channels_last (NHWC) memory format:
        on the 2-core CPU dev box a training step of the fused K=10 vgg7 runs about 1.25x
        faster than in NCHW (`measure_step_rate`)."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    @torch.no_grad()
    def split(self) -> list[nn.Module]:
        """The K members as ordinary models (the class and attributes of the members
        given), with this network's weights, BatchNorm statistics and per-layer
        train/eval mode, on this network's device."""
        device = next(self.parameters()).device
        out = []
        for i in range(self.k):
            model = copy.deepcopy(self._template[0]).to(device)
            for fused, layer in zip(self.net, model):
                _copy_member(fused, layer, i, self.k)
                layer.train(fused.training)
            model.training = self.training
            out.append(model)
        return out


def _copy_member(fused: nn.Module, layer: nn.Module, i: int, k: int) -> None:
    """Copy member ``i``'s block of every tensor of ``fused`` into ``layer``."""
    if isinstance(fused, FusedQuantLinear):
        pairs = [(layer.weight, fused.weight[i]), (layer.bias, None if fused.bias is None else fused.bias[i])]
    elif isinstance(fused, (FusedQuantConv2d, nn.BatchNorm2d, AbsAffine)):
        pairs = []
        for name, t in list(fused.named_parameters(recurse=False)) + list(fused.named_buffers(recurse=False)):
            if t is None:
                continue
            mine = getattr(layer, name)
            if t.dim() == 0:  # num_batches_tracked: one count shared by every member
                pairs.append((mine, t))
            else:
                c = t.shape[0] // k
                pairs.append((mine, t[i * c:(i + 1) * c]))
    else:
        return
    for dst, src in pairs:
        if dst is not None:
            dst.copy_(src)


# ---------------------------------------------------------------- loss and step

def fused_loss(logits_k: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
               losses: Sequence[LossFn]) -> torch.Tensor:
    """``sum_k losses[k](logits_k[k], teacher_logits, labels)``: each member's gradient
    comes from its own loss only, as in a separate run."""
    if len(losses) != logits_k.shape[0]:
        raise ValueError(f"{len(losses)} losses for {logits_k.shape[0]} fused members")
    return _member_losses(logits_k, teacher_logits, labels, losses).sum()


def _member_losses(logits_k, teacher_logits, labels, losses) -> torch.Tensor:
    return torch.stack([fn(z, teacher_logits, labels) for fn, z in zip(losses, logits_k)])


def train_step(fused: FusedStudents, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               teacher_logits: torch.Tensor | None, labels: torch.Tensor,
               losses: Sequence[LossFn]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the sum of the members' losses (`fused_loss`).

    Returns ``(loss per member (K,), logits (K, N, classes))``, both detached.
    """
    if len(losses) != fused.k:
        raise ValueError(f"{len(losses)} losses for {fused.k} fused members")
    optimizer.zero_grad(set_to_none=True)
    logits = fused(x)
    per_member = _member_losses(logits, teacher_logits, labels, losses)
    per_member.sum().backward()
    optimizer.step()
    return per_member.detach(), logits.detach()


# ---------------------------------------------------------------- measurement

def measure_step_rate(arch: str = "vgg7", k: int = 10, batch: int = 256, steps: int = 5,
                      channels_last: bool = True, warmup: int = 3, weight_bits: int = 2,
                      act_bits: int = 1, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Student images per second, ``k * batch * steps / seconds``, of training steps
    (forward, backward, Adam) on random data, after ``warmup`` untimed steps.

    ``k == 1`` times one ordinary model; ``k > 1`` a `FusedStudents` of ``k`` members.
    Uses the current ``torch.get_num_threads()``; no teacher, no data pipeline.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    members = [build(arch, weight_bits=weight_bits, act_bits=act_bits).to(device) for _ in range(k)]
    model = members[0] if k == 1 else FusedStudents(members)
    if channels_last:
        if k == 1:
            model.to(memory_format=torch.channels_last)
        else:
            model.to_channels_last()
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(k)) * k if k > 1 \
            else F.cross_entropy(out, y)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return k * batch * steps / (time.perf_counter() - t0)
