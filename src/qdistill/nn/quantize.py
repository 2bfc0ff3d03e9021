"""A user's float network made a quantized student by swapping its modules.

`quantize` reads the network's graph with ``torch.fx`` (`trace`) to find which ReLUs
feed a convolution or linear layer, and which quantized layers see activations that
nothing quantized. The same tracer, with qdistill's layers as leaves, gives export the
graph of a student (`qdistill.export.graph`).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import schemes
from .layers import AbsAffine, Clip01, MaxPool2d, QuantAct, QuantConv2d, QuantLinear, Resize
from .quantizers import FULL

__all__ = ["quantize", "trace"]

# Modules that move or pool values without changing what they are (levels stay levels).
PASS_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, nn.Identity)
PASS_FUNCTIONS = {torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout}
PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}
LEAVES = (QuantConv2d, QuantLinear, QuantAct, AbsAffine, MaxPool2d, Resize, Clip01)


class _Tracer(fx.Tracer):
    """torch's tracer, with qdistill's layers kept whole (their forward is a quantizer)."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, name)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """The graph of ``model`` (`torch.fx`), or ``None`` where it cannot be traced
    (Python control flow on tensor values, for example)."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception:  # fx raises many kinds (TraceError, TypeError, NotImplementedError)
        return None


def passes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` only moves or pools its first input (see `PASS_MODULES`)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), PASS_MODULES)
    if node.op == "call_function":
        return node.target in PASS_FUNCTIONS
    return node.op == "call_method" and node.target in PASS_METHODS


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _feeds(gm: fx.GraphModule, node: fx.Node, kinds) -> bool:
    """Whether ``node``'s output reaches a module of ``kinds`` through pass-through ops."""
    for user in node.users:
        if isinstance(_module(gm, user), kinds) or (passes(gm, user) and _feeds(gm, user, kinds)):
            return True
    return False


def _source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node whose value reaches ``node``'s first input through pass-through ops."""
    src = node.args[0] if node.args else node
    while isinstance(src, fx.Node) and passes(gm, src) and src.args:
        src = src.args[0]
    return src


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _quant_layer(old: nn.Module, weight_bits: int, grad_bits: int, scheme: str) -> nn.Module:
    """``old`` (``nn.Conv2d`` or ``nn.Linear``) as its quantized layer, with its weights.
    Made on the meta device, as `torch.nn.utils.skip_init` does: no random numbers are
    drawn, so a seeded run's later draws do not depend on how many layers were swapped."""
    w = old.weight
    common = dict(bias=old.bias is not None, weight_bits=weight_bits, grad_bits=grad_bits, scheme=scheme,
                  device="meta", dtype=w.dtype)
    if isinstance(old, nn.Conv2d):
        new = QuantConv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                          padding=old.padding, dilation=old.dilation, groups=old.groups,
                          padding_mode=old.padding_mode, **common)
    else:
        new = QuantLinear(old.in_features, old.out_features, **common)
    new = new.to_empty(device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(w.requires_grad)
    if new.step is not None:
        new.init_step()
    return new.train(old.training)


def _layers_in_order(model: nn.Module, gm: fx.GraphModule | None) -> list[str]:
    """Names of the convolutions and linear layers, in the order the forward calls them
    (registration order where the graph is unknown)."""
    kinds = (nn.Conv2d, nn.Linear)
    registered = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    called = [] if gm is None else [n.target for n in gm.graph.nodes if isinstance(_module(gm, n), kinds)]
    return list(dict.fromkeys(called + registered))


def _relus_to_quantize(model: nn.Module, gm: fx.GraphModule | None) -> set[str]:
    relus = {n for n, m in model.named_modules() if type(m) is nn.ReLU}
    if gm is None:
        return relus
    return {n.target for n in gm.graph.nodes if n.target in relus and _feeds(gm, n, (nn.Conv2d, nn.Linear))}


def _called_more_than_once(gm: fx.GraphModule | None, names: set[str]) -> list[str]:
    """``"relu (2 places)"`` for each module of ``names`` that the forward calls more than once."""
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in names] if gm else []
    return [f"{name} ({calls.count(name)} places)" for name in dict.fromkeys(calls) if calls.count(name) > 1]


def _unquantized_inputs(model: nn.Module, gm: fx.GraphModule | None) -> list[str]:
    """The quantized layers of ``model`` (swapped) whose input no activation quantizer
    (or the image) gives, each with what feeds it (``"conv2 (fed by GELU)"``), read off
    the graph traced before the swap (names are kept)."""
    if gm is None:
        return []
    acts = {n for n, m in model.named_modules() if isinstance(m, QuantAct)}
    out = []
    for node in gm.graph.nodes:
        m = model.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < FULL:
            src = _source(gm, node)
            if not (isinstance(src, fx.Node) and (src.op == "placeholder" or src.target in acts)):
                out.append(f"{node.target} (fed by {_kind(gm, src)})")
    return out


def _kind(gm: fx.GraphModule, src) -> str:
    """What ``src`` is, for a message: a module's class name, or the function's or method's."""
    m = _module(gm, src) if isinstance(src, fx.Node) else None
    target = type(m) if m is not None else getattr(src, "target", src)
    return getattr(target, "__name__", str(target))


def quantize(model: nn.Module, *, scheme: str = "dorefa", weight_bits: int = 2, act_bits: int = 1,
             grad_bits: int = 32, quantize_first_last: bool = False) -> nn.Module:
    """A quantized copy of the float network ``model`` (``model`` itself is unchanged).

    * Every ``nn.Conv2d`` and ``nn.Linear`` becomes the scheme's `QuantConv2d` /
      `QuantLinear` with the same weights: ``weight_bits`` weights; ``grad_bits``
      gradients (DoReFa's ``fg``) after every convolution but the first.
    * The first convolution and the last linear layer (in the order the forward calls
      them) keep full-precision weights unless ``quantize_first_last`` (the homework
      scheme quantizes its first convolution, as the course did).
    * Every ``nn.ReLU`` whose output reaches a convolution or linear layer (through
      pooling, flatten, dropout) becomes the scheme's activation quantizer (`QuantAct`,
      ``act_bits``): DoReFa's ``q(clamp(x, 0, 1))`` or LSQ's; the homework scheme puts
      DoReFa's there (`qdistill.nn.schemes.Homework`).
    * Residual adds and concatenations stay full precision: a branch's float output is
      added to the shortcut's levels, and the sum is quantized where the next ReLU stood,
      as larq's guide for binary networks advises (the shortcut carries what the branch
      cannot).

    A quantized layer whose input no quantizer gives (a functional ``F.relu``, a GELU, an
    add feeding it directly) is named, with what feeds it, in one warning line; so is a
    network with no quantized weight (only a first convolution and a last linear layer), and,
    for a learned scheme (LSQ), an ``nn.ReLU`` the forward calls at several places (as
    torchvision's ResNet blocks do): its one quantizer would learn one step for all of them.
    Where ``torch.fx`` cannot trace the network, every ``nn.ReLU`` is quantized and the
    warning says so.
    """
    quant = schemes.get(scheme)
    model = copy.deepcopy(model)
    gm = trace(model)
    if gm is None:
        warnings.warn(f"{type(model).__name__} cannot be traced by torch.fx: every nn.ReLU is quantized")
    order = _layers_in_order(model, gm)
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    linears = [n for n in order if isinstance(model.get_submodule(n), nn.Linear)]
    edges = {convs[0]} if convs and not (quantize_first_last or quant.quantizes_first_conv) else set()
    edges |= {linears[-1]} if linears and not quantize_first_last else set()
    relus = _relus_to_quantize(model, gm)
    for name in relus:
        _swap(model, name, QuantAct(act_bits, quant.plain_act))
    shared = _called_more_than_once(gm, relus) if quant.learned and act_bits < FULL else []
    if shared:
        warnings.warn(f"{', '.join(shared)}: one nn.ReLU called at several places becomes one {quant.name} quantizer, "
                      "with one learned step for all of them; give each place its own nn.ReLU")
    for name in order:
        old = model.get_submodule(name)
        if isinstance(old, (QuantConv2d, QuantLinear)):
            continue  # already quantized: kept as it is
        first = bool(convs) and name == convs[0]
        _swap(model, name, _quant_layer(old, FULL if name in edges else weight_bits,
                                        FULL if first or isinstance(old, nn.Linear) else grad_bits, quant.name))
    bare = _unquantized_inputs(model, gm) if act_bits < FULL else []
    if bare:
        warnings.warn(f"nothing quantizes the input of {', '.join(bare)}: it sees full-precision activations "
                      "(only an nn.ReLU module becomes an activation quantizer)")
    if weight_bits < FULL and not any(n not in edges for n in order):
        warnings.warn(f"{type(model).__name__} has no layer but its first convolution and last linear layer, "
                      f"which keep full precision: no weight is quantized (quantize_first_last=True quantizes them)")
    return model
