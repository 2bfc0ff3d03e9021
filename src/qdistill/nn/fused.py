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
layers pass ``members=K`` to the quantizers of `qdistill.nn.quantizers`, which then
reduce each member's block alone. LSQ's learned steps are per member too: a fused conv's
``step`` is ``(K,)``, a fused linear's ``(K, 1)``, a fused activation quantizer's
(`FusedQuantAct`) ``(K,)`` over its members' channel blocks. Gradient quantization takes
its per-sample max over one member's output channels, never over the fused ones. This
module holds no formula of its own.

Every parameter holds the members' slices as contiguous blocks along its first
dimension. Adam (with or without weight decay) is elementwise, so each member evolves
exactly as it would alone, up to float rounding of the grouped kernels (bit-identical
with one thread on the dev box; with several threads the grouped kernels split their
reductions differently and training amplifies those last-bit differences). Three things
never carry over bit for bit: random numbers (``Dropout`` masks and the noise of
``dorefa_gradient``) are drawn once for the fused tensor, so a fused member sees other
draws than a separate run with the same seed; anything that reduces over *all*
parameters (a global gradient-norm clip) would couple the members; and a quantizer's
input that lies exactly on one of its boundaries in exact arithmetic takes the side
float rounding gives it, which can differ between grouped and plain kernels (quantized
convolutions output a lattice, so a BatchNorm output equal to its shift is common: at a
shift of 0, PyTorch's init, that is the activation quantizer's lower bound).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from .layers import AbsAffine, Clip01, QuantAct, QuantConv2d, QuantLinear, Resize, _QuantWeight
from .quantizers import dorefa_gradient

# Layers that act on each channel (or element) alone: shared as they are.
_ELEMENTWISE = (QuantAct, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, Resize, Clip01)
# Of those, the ones that also work on the (K, N, features) tensor after Flatten.
_SHAPE_FREE = (QuantAct, nn.Dropout, Clip01)


# ---------------------------------------------------------------- fused layers

class FusedQuantConv2d(QuantConv2d):
    """K members' `QuantConv2d` as one convolution: ``groups=K`` over ``K * Cin`` input
    channels, or ``groups=1`` over the shared input when ``shared_input``; weight
    ``(K * Cout, Cin, kh, kw)``, member ``k`` in rows ``[k*Cout, (k+1)*Cout)``."""

    def __init__(self, cin: int, cout: int, kernel_size, *, k: int, shared_input: bool, **kwargs):
        groups = 1 if shared_input else k
        super().__init__(cin if shared_input else k * cin, k * cout, kernel_size, groups=groups, **kwargs)
        self.k = self.members = k
        self.shared_input = shared_input
        if self.step is not None:  # one LSQ step per member: (K,)
            self._init_quant(self.weight_bits, self.grad_bits, self.scheme)
            self.init_step()

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


class FusedQuantLinear(_QuantWeight, nn.Module):
    """K members' `QuantLinear` as one batched matmul: ``(K, N, in) -> (K, N, out)``,
    ``y_k = x_k @ Q(W_k)^T + b_k`` with weight ``(K, out, in)`` and bias ``(K, out)``."""

    def __init__(self, in_features: int, out_features: int, *, k: int, bias: bool,
                 weight_bits: int, grad_bits: int, scheme: str):
        super().__init__()
        self.k = self.members = k
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k, out_features)) if bias else None
        self._init_quant(weight_bits, grad_bits, scheme)  # LSQ's step after them, as in QuantLinear

    def _step_shape(self) -> tuple[int, ...]:
        return (self.k, 1)  # the members' (1,) steps stacked, like the weight

    def forward(self, x):
        w = self.quantized_weight().transpose(1, 2)
        y = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, w)
        # (K, N, out) -> (K*N, out): one row per (member, sample), as dorefa_gradient wants.
        return dorefa_gradient(y.reshape(-1, y.shape[-1]), self.grad_bits).view_as(y)

    def extra_repr(self):
        return (f"members={self.k}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self._bits_repr())


class FusedQuantAct(QuantAct):
    """K members' LSQ `QuantAct`: ``step`` ``(K,)``, member ``k``'s channels
    ``[k*C, (k+1)*C)`` quantized with step ``k`` (and, on the first training batch,
    initialised from those channels alone); ``initialized`` is one flag for the group."""

    def __init__(self, bits: int, k: int):
        super().__init__(bits, "lsq")
        self.k = self.members = k
        self.step = nn.Parameter(torch.ones(k))

    def extra_repr(self):
        return f"members={self.k}, " + super().extra_repr()


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
    if ref.step is not None:
        fused.step = nn.Parameter(_cat(m.step for m in group), ref.step.requires_grad)
    return fused


def _fuse_linear(group: list[QuantLinear], k: int) -> FusedQuantLinear:
    ref = group[0]
    fused = FusedQuantLinear(ref.in_features, ref.out_features, k=k, bias=ref.bias is not None,
                             weight_bits=ref.weight_bits, grad_bits=ref.grad_bits, scheme=ref.scheme)
    fused.weight = nn.Parameter(torch.stack([m.weight.detach() for m in group]), ref.weight.requires_grad)
    if ref.bias is not None:
        fused.bias = nn.Parameter(torch.stack([m.bias.detach() for m in group]), ref.bias.requires_grad)
    if ref.step is not None:
        fused.step = nn.Parameter(torch.stack([m.step.detach() for m in group]), ref.step.requires_grad)
    return fused


def _fuse_act(group: list[QuantAct], k: int) -> FusedQuantAct:
    """LSQ activation quantizers: their steps side by side; their flags must agree."""
    ref = group[0]
    if len({bool(m.initialized) for m in group}) > 1:
        raise ValueError("fused members' LSQ activation steps are initialised in some members only")
    fused = FusedQuantAct(ref.bits, k).to(ref.step.device)
    fused.step = nn.Parameter(_cat(m.step for m in group), ref.step.requires_grad)
    fused.initialized.copy_(ref.initialized)
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
        if len(m) != len(ref):
            raise ValueError(f"member {i} has another architecture than member 0")
        for j, (a, b) in enumerate(zip(ref, m)):
            if _signature(a) != _signature(b):
                raise ValueError(f"member {i} differs from member 0 at layer {j}: "
                                 f"{type(b).__name__}({b.extra_repr()}) vs {type(a).__name__}({a.extra_repr()})")
    return members


class FusedStudents(nn.Module):
    """K members built by `qdistill.nn.models.build` with one architecture and one set of
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
            elif isinstance(ref, QuantAct) and ref.step is not None:
                if not seen_conv or flattened:
                    raise ValueError(f"{where}: an LSQ activation quantizer can be fused only between convolutions")
                layer = _fuse_act(group, k)
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
        faster than in NCHW (`qdistill.bench.step_rate.measure_step_rate`)."""
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

    def split_optimizer_state(self, state: dict, i: int) -> dict:
        """Member ``i``'s part of an optimizer ``state_dict`` over this network's
        parameters: per-parameter states of the parameter's shape (Adam's moments, which
        are elementwise) are sliced like the parameter; scalars (Adam's step) are copied.
        The result loads into the same optimizer built over the member's parameters."""
        params = [(layer, p) for layer in self.net for p in layer.parameters(recurse=False)]
        out = {}
        for idx, per_param in state["state"].items():
            layer, p = params[idx]
            out[idx] = {key: (_member_block(layer, v, i, self.k) if v.shape == p.shape else v).clone()
                        if torch.is_tensor(v) else v for key, v in per_param.items()}
        return {"state": out, "param_groups": copy.deepcopy(state["param_groups"])}


_SPLIT = (FusedQuantLinear, FusedQuantConv2d, nn.BatchNorm2d, AbsAffine, FusedQuantAct)


def _member_block(fused: nn.Module, t: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """Member ``i``'s block of a tensor of ``fused``: a parameter, a buffer, or an
    optimizer state of a parameter's shape."""
    if isinstance(fused, FusedQuantLinear):
        return t[i]
    if t.dim() == 0:  # num_batches_tracked, LSQ's initialized: one value shared by every member
        return t
    c = t.shape[0] // k
    return t[i * c:(i + 1) * c]


def _copy_member(fused: nn.Module, layer: nn.Module, i: int, k: int) -> None:
    """Copy member ``i``'s block of every tensor of ``fused`` into ``layer``."""
    if not isinstance(fused, _SPLIT):
        return
    for name, t in list(fused.named_parameters(recurse=False)) + list(fused.named_buffers(recurse=False)):
        if t is not None:
            getattr(layer, name).copy_(_member_block(fused, t, i, k))


class Solo(nn.Module):
    """One model as a group of one, so one loop trains one model or K: ``forward`` gives
    logits ``(1, N, classes)``, `split` the model itself, and ``state_dict`` is the
    model's own (a run's checkpoint holds the plain model)."""

    k = 1

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(0)

    def split(self) -> list[nn.Module]:
        return [self.model]

    def to_channels_last(self) -> "Solo":
        """Store 4-d weights in channels_last; the input is left as it comes."""
        self.model.to(memory_format=torch.channels_last)
        return self

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def split_optimizer_state(self, state: dict, i: int) -> dict:
        return state


def group(models: Sequence[nn.Module]) -> nn.Module:
    """The network that trains ``models`` at once: `Solo` for one, `FusedStudents` for more."""
    return Solo(models[0]) if len(models) == 1 else FusedStudents(models)
