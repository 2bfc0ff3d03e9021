"""The engine's node graph of any traceable student, from its ``torch.fx`` graph.

`model_nodes` walks `qdistill.nn.quantize.trace`'s graph in order. A convolution takes
what follows it into its node while each step is the only user of the one before: BatchNorm,
the course's affine, max-pools, then the activation quantizer (and a max-pool right after
it), folded as `qdistill.export.plan` does for a chain. A conv that ends before any
quantizer (its BatchNorm output feeds a residual add) gets a float output
``A * mul + add``. Other ops map one to one: ``add`` (``+``, ``torch.add``), ``quant`` (an
activation quantizer on a float map), ``maxpool``, ``avgpool``, ``global_avgpool``
(``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``), ``flatten``,
``linear``, ``resize``, ``clip``; dropout and identity pass their input on. Anything else
is refused in one line naming the layer or op.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ExportError
from ..nn.layers import Clip01, QuantAct, Resize
from ..nn.quantize import trace
from . import blocks
from .blocks import Packing
from .plan import Block, absorb, pool_size

_ADDS = {operator.add, torch.add}
_FLATTENS = {torch.flatten}
_PASSES = {F.dropout}


def model_nodes(model: nn.Module) -> tuple[list[dict], dict[str, np.ndarray], str]:
    """``(nodes, arrays, output name)`` of ``model`` (see the module docstring)."""
    gm = trace(model)
    if gm is None:
        raise ExportError(f"{type(model).__name__} cannot be traced by torch.fx; export needs a traceable network")
    walk = _Walk(gm)
    for node in gm.graph.nodes:
        if node not in walk.done:
            walk.visit(node)
    if walk.output is None:
        raise ExportError("the traced graph has no output")
    name, pk = walk.output
    if pk.form != "logits":
        raise ExportError("the model must end in a linear layer")
    return walk.nodes, walk.arrays, name


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target} ({type(gm.get_submodule(node.target)).__name__})"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"op {what} ({node.name})"


def _is_pool_1(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))


class _Walk:
    """The walk's state: each fx node's engine value ``(node name, Packing)``."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.arrays: dict[str, np.ndarray] = {}
        self.vals: dict[fx.Node, tuple[str, Packing]] = {}
        self.nodes: list[dict] = []
        self.done: set[fx.Node] = set()
        self.output = None

    def _name(self, base: str) -> str:
        taken = {n["name"] for n in self.nodes} | {"images"}
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        return name

    def _input(self, node: fx.Node, arg) -> tuple[str, Packing]:
        if not isinstance(arg, fx.Node) or arg not in self.vals:
            raise ExportError(f"{_where(self.gm, node)}: its input {arg!r} is not a tensor the engine computes")
        return self.vals[arg]

    def _emit(self, node: fx.Node, name: str, inputs: list[str], spec: dict, modules: list[str], pk) -> None:
        self.nodes.append({"name": name, "inputs": inputs, "modules": modules, **spec})
        self.vals[node] = (name, pk)

    def _apply(self, node: fx.Node, build, module=None, **kw) -> None:
        """A one-input op: ``build(packing, block)`` on a copy of its input's packing."""
        src, pk = self._input(node, node.args[0] if node.args else None)
        pk = pk.copy()
        name = self._name(node.target if node.op == "call_module" else node.name)
        block = Block(build.__name__, 0, 0, module, name=name, **kw)
        spec = build(pk, block)
        self._emit(node, name, [src], spec, [node.target] if node.op == "call_module" else [], pk)

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if any(n == "images" for n, _ in self.vals.values()):
                raise ExportError(f"export needs a network of one input; {node.name} is another")
            self.vals[node] = ("images", Packing(arrays=self.arrays))
        elif node.op == "output":
            self.output = self._input(node, node.args[0])
        elif node.op == "call_module":
            self._module(node, self.gm.get_submodule(node.target))
        elif node.op in ("call_function", "call_method"):
            self._function(node)
        else:
            raise ExportError(f"{_where(self.gm, node)}: cannot be packed")

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        where = _where(self.gm, node)
        if isinstance(m, nn.Conv2d):
            self._conv(node, m)
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            self.vals[node] = self._input(node, node.args[0])
        elif isinstance(m, QuantAct):
            self._apply(node, blocks.quant, m, act=m)
        elif isinstance(m, Clip01):
            self._apply(node, blocks.clip, m)
        elif isinstance(m, nn.MaxPool2d):
            self._apply(node, blocks.maxpool, m, pool=pool_size(m, where))
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise ExportError(f"{where}: divisor_override is not supported")
            self._apply(node, blocks.avgpool, m, pool=pool_size(m, where))
        elif isinstance(m, nn.AdaptiveAvgPool2d) and _is_pool_1(m.output_size):
            self._apply(node, lambda pk, b: blocks.global_avgpool(pk, b, flat=False), m)
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            self._apply(node, blocks.flatten, m)
        elif isinstance(m, nn.Linear):
            self._apply(node, blocks.linear, m)
        elif isinstance(m, Resize):
            self._apply(node, blocks.resize, m)
        elif isinstance(m, (nn.BatchNorm2d,)):
            raise ExportError(f"{where}: BatchNorm must follow a convolution (it is folded into it)")
        else:
            raise ExportError(f"{where}: unsupported layer for export")

    def _function(self, node: fx.Node) -> None:
        fn, args, kw = node.target, node.args, node.kwargs
        method = node.op == "call_method"
        if (fn in _ADDS or (method and fn == "add")) and len(args) == 2 and not kw:
            return self._add(node)
        if (fn in _PASSES and not kw.get("training")) or (method and fn == "contiguous"):
            self.vals[node] = self._input(node, args[0])
        elif (fn in _FLATTENS or (method and fn == "flatten")) and _flat_from_1(args, kw):
            self._apply(node, blocks.flatten)
        elif fn is F.adaptive_avg_pool2d and _is_pool_1(args[1] if len(args) > 1 else kw.get("output_size")):
            self._apply(node, lambda pk, b: blocks.global_avgpool(pk, b, flat=False))
        elif method and fn == "mean" and _spatial_mean(args, kw) is not None:
            keep = _spatial_mean(args, kw)
            self._apply(node, lambda pk, b: blocks.global_avgpool(pk, b, flat=not keep))
        else:
            raise ExportError(f"{_where(self.gm, node)}: the engine has no such op")

    def _add(self, node: fx.Node) -> None:
        (na, a), (nb, b) = self._input(node, node.args[0]), self._input(node, node.args[1])
        out, spec = blocks.add(a, b, _where(self.gm, node))
        self._emit(node, self._name(node.name), [na, nb], spec, [], out)

    def _conv(self, node: fx.Node, m: nn.Conv2d) -> None:
        """The conv and what it absorbs (module docstring); the last absorbed node's value
        is the engine node's output."""
        name = self._name(node.target)
        block, cur, modules = Block("conv", 0, 0, m, name=name), node, [node.target]
        while True:
            user = next(iter(cur.users)) if len(cur.users) == 1 else None
            um = self.gm.get_submodule(user.target) if user is not None and user.op == "call_module" else None
            if um is None or user.args[0] is not cur:
                break
            after_act = block.act is not None
            if after_act and not (isinstance(um, (nn.MaxPool2d, nn.Dropout)) and block.pool == 1
                                  and isinstance(block.act, QuantAct)):
                break
            if not after_act and not absorb(block, um, user.target):
                break
            if after_act and isinstance(um, nn.MaxPool2d):
                block.pool = pool_size(um, _where(self.gm, user))
            self.done.add(user)
            modules.append(user.target)
            cur = user
        src, pk = self._input(node, node.args[0])
        pk = pk.copy()
        spec = blocks.conv(pk, block)
        self._emit(cur, name, [src], spec, modules, pk)


def _flat_from_1(args, kw) -> bool:
    start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
    return start == 1 and end == -1


def _spatial_mean(args, kw):
    """``keepdim`` of ``x.mean((2, 3))`` (or ``(-2, -1)``), None for another mean."""
    dims = args[1] if len(args) > 1 else kw.get("dim")
    keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
    if isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3] and "dtype" not in kw:
        return bool(keep)
    return None
