"""The node graph of a manifest and the order the engine runs it in.

Format version 3 stores ``"nodes"``: ``{"name", "op", "inputs": [names or "images"], ...}``
in an order where every input comes before its user; the output is ``"output"`` or the
last node. Versions 1 and 2 store a chain, ``"layers"``, each layer's input the previous
one's output: `manifest_nodes` reads it as nodes named ``"0"``, ``"1"``, ...

`schedule` turns the nodes into steps: a residual tail (popcount conv with float output
-> add -> quant, each the only user of the one before) becomes one `ConvAddQuant` step
when ``fuse``; and every stage that outputs levels is told how its users want them
(`_route`): packed with the widest border its popcount-conv users read (a narrower one is
cut from it), plain levels for any other user, or both.
"""
from __future__ import annotations

from dataclasses import dataclass

from .qdz import QdzError
from .residual import Add, ConvAddQuant, Quant
from .stages import ConvFloat, ConvPacked, Stage

IMAGES = "images"


@dataclass
class Step:
    """One stage run: its inputs (node names), the node whose value it makes, and the
    nodes it stands for (more than one when fused)."""
    stage: Stage
    inputs: list[str]
    name: str
    covers: list[str]


def manifest_nodes(manifest: dict) -> tuple[list[dict], str]:
    """``(nodes, output name)`` of a manifest, a chain read as nodes; `QdzError` if the
    nodes do not form a graph in order."""
    if "nodes" in manifest:
        nodes = manifest["nodes"]
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) for n in nodes):
            raise QdzError("manifest has no nodes")
    else:
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise QdzError("manifest has no layers")
        nodes = [dict(spec, name=str(i), inputs=[str(i - 1) if i else IMAGES]) if isinstance(spec, dict) else spec
                 for i, spec in enumerate(layers)]
    seen = {IMAGES}
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise QdzError(f"layer {i}: not an object")
        name, inputs = node.get("name"), node.get("inputs")
        if not isinstance(name, str) or name in seen:
            raise QdzError(f"node {i}: missing or repeated name {name!r}")
        if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) and s in seen for s in inputs):
            raise QdzError(f"node {name}: inputs {inputs!r} are not earlier nodes")
        seen.add(name)
    output = manifest.get("output", nodes[-1]["name"])
    if output not in seen or output == IMAGES:
        raise QdzError(f"manifest output {output!r} is no node")
    return nodes, output


def _users(nodes: list[dict]) -> dict[str, list[str]]:
    users = {n["name"]: [] for n in nodes}
    for n in nodes:
        for s in n["inputs"]:
            if s != IMAGES:
                users[s].append(n["name"])
    return users


def _fusions(nodes, stages, output: str) -> dict[str, tuple[str, str, int]]:
    """``{add: (conv, quant, side)}`` for each residual tail: the conv (float output, input
    ``side`` of the add) and the add each have one user, neither is the output."""
    by_name = {n["name"]: (n, s) for n, s in zip(nodes, stages)}
    users = _users(nodes)
    found = {}
    for node, stage in zip(nodes, stages):
        name = node["name"]
        if not (isinstance(stage, ConvPacked) and stage.out == "float" and len(users[name]) == 1):
            continue
        add_node, add = by_name[users[name][0]]
        if not isinstance(add, Add) or len(users[add_node["name"]]) != 1 or output in (name, add_node["name"]):
            continue
        quant_node, quant = by_name[users[add_node["name"]][0]]
        if isinstance(quant, Quant) and add_node["inputs"].count(name) == 1:
            found[add_node["name"]] = (name, quant_node["name"], add_node["inputs"].index(name))
    return found


def schedule(nodes: list[dict], stages: list[Stage], output: str, fuse: bool = True) -> list[Step]:
    """The steps that compute ``output`` (see the module docstring)."""
    fusions = _fusions(nodes, stages, output) if fuse else {}
    stage_of = {n["name"]: s for n, s in zip(nodes, stages)}
    skipped = {name for conv, quant, _ in fusions.values() for name in (conv, quant)}
    steps = []
    for node, stage in zip(nodes, stages):
        name = node["name"]
        if name in fusions:
            conv, quant, side = fusions[name]
            fused = ConvAddQuant(stage_of[conv], stage, stage_of[quant], side, stage_of[conv].backend)
            conv_input = next(n["inputs"][0] for n in nodes if n["name"] == conv)
            steps.append(Step(fused, [conv_input, node["inputs"][1 - side]], quant, [conv, name, quant]))
        elif name not in skipped:
            steps.append(Step(stage, list(node["inputs"]), name, [name]))
    _route(steps, output)
    return steps


def _route(steps: list[Step], output: str) -> None:
    """Tell each levels-making stage how its users read its output (module docstring)."""
    for step in steps:
        stage = step.stage
        if not (isinstance(stage, (ConvFloat, Quant, ConvAddQuant))
                or (isinstance(stage, ConvPacked) and stage.out == "levels")):
            continue
        pads, plain = [], step.name == output
        for user in steps:
            for k, src in enumerate(user.inputs):
                if src != step.name:
                    continue
                if k == 0 and user.stage.packed_pad is not None and user.stage.in_bits == stage.bits:
                    pads.append(user.stage.packed_pad)
                else:
                    plain = True
        stage.out_pad = max(pads) if pads else None
        stage.both = bool(pads) and plain
