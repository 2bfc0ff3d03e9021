"""The integer inference engine: runs the node graph of a ``.qdz`` manifest.

Between the first and the last layer every value is an integer: activation levels
(``uint8``, channels last), packed into bit-planes for the popcount convolution, whose
integer accumulator ``A`` is turned into the next levels by per-channel integer
thresholds. The first convolution (float input) and the last linear layer run in
float32, as in training; average pooling turns the last levels back into floats
(``level / (2**a - 1)``). Residual networks add a branch's float output (``A * mul + add``
in float64) to the shortcut's levels or floats in float64 and quantize the sum by float64
thresholds (`residual`). The stages are in `stages` and `residual`, the graph and the
order it runs in (with a residual tail fused into one kernel) in `graph`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import graph, kernels, qdz
from . import numba_kernels as nb
from .qdz import QdzError
from .residual import Add, Quant
from .stages import AvgPool, Clip, ConvFloat, ConvPacked, Flatten, GlobalAvgPool, Linear, MaxPool, Resize, cut_border

INPUT_SHAPE = (3, 32, 32)

STAGES = {cls.name: cls for cls in (Resize, ConvFloat, ConvPacked, AvgPool, Flatten, Linear, MaxPool,
                                    GlobalAvgPool, Clip, Add, Quant)}


class Engine:
    """A loaded ``.qdz`` model. ``predict(images) -> logits``, ``classify(images) -> labels``.
    ``stages`` holds one stage per node (per layer of a chain), in the manifest's order;
    ``fuse=False`` runs every node on its own (the same values, more passes)."""

    def __init__(self, manifest: dict, arrays: dict[str, np.ndarray], backend: str = "auto", fuse: bool = True):
        if backend == "auto":
            backend = kernels.BACKENDS[0]
        if backend not in kernels.BACKENDS:
            raise QdzError(f"backend {backend!r} unavailable; choose one of {', '.join(kernels.BACKENDS)}"
                           + ("" if kernels.HAVE_NUMBA else " (install numba for the fast kernels)"))
        self.backend = backend
        self.manifest = manifest
        self.class_names = list(manifest.get("class_names", []))
        self.nodes, self.output = graph.manifest_nodes(manifest)
        self.stages = []
        for i, spec in enumerate(self.nodes):
            op = spec.get("op")
            if op not in STAGES:
                raise QdzError(f"layer {i}: unknown op {op!r}")
            self.stages.append(STAGES[op](spec, arrays, backend))
        self.steps = graph.schedule(self.nodes, self.stages, self.output, fuse)
        fused = [step.stage for step in self.steps if step.stage not in self.stages]
        for stage in self.stages + fused:
            stage.prepare()
        self._producer = {step.name: step.stage for step in self.steps}
        last_use = {}
        for i, step in enumerate(self.steps):
            for name in step.inputs:
                last_use[name] = i
        # per step: its inputs (with the border to cut from packed ones) and what it frees
        self._plan = [(step.stage, [(name, self._border(name, step.stage, k)) for k, name in enumerate(step.inputs)],
                       step.name, [n for n in set(step.inputs) if last_use[n] == i and n != self.output])
                      for i, step in enumerate(self.steps)]

    def _border(self, name: str, stage, k: int) -> tuple[int, int] | None:
        """``(border, pad)`` where input ``k`` of ``stage`` reads the packed output of
        ``name`` (bordered ``border``) with its own ``pad``; None where it reads the value as is."""
        producer = self._producer.get(name)
        if k == 0 and stage.packed_pad is not None and producer is not None and producer.out_pad is not None:
            return producer.out_pad, stage.packed_pad
        return None

    def _check(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise QdzError(f"images must have shape (N, 3, 32, 32), got {tuple(x.shape)}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _run(self, x: np.ndarray, keep: bool) -> dict:
        values = {graph.IMAGES: x}
        for stage, inputs, out, frees in self._plan:
            args = []
            for name, border in inputs:
                v = values[name]
                if border is not None:  # packed activations, seen with the border the stage reads
                    v = cut_border(v[1] if isinstance(v, tuple) else v, *border)
                args.append(v)
            values[out] = stage.run(*args)
            if not keep:
                for name in frees:
                    del values[name]
        return values

    def trace(self, images) -> list[np.ndarray | None]:
        """The output of every node, in the manifest's order (the output node's is the
        logits); levels as ``uint8 (N, H, W, C)``, packed or not; None for a node fused into
        another's step."""
        values = self._run(self._check(images), keep=True)
        out = []
        for node in self.nodes:
            v = values.get(node["name"])
            stage = self._producer.get(node["name"])
            if isinstance(v, tuple):
                v = v[0]
            elif v is not None and stage is not None and stage.out_pad is not None:
                v = kernels.unpack(v, stage.cout, stage.out_pad)
            out.append(v)
        return out

    def predict(self, images) -> np.ndarray:
        """Logits ``float32 (N, classes)`` of float32 images ``(N, 3, 32, 32)`` in [0, 1]."""
        logits = self._run(self._check(images), keep=False)[self.output]
        if not isinstance(logits, np.ndarray) or logits.ndim != 2:
            raise QdzError("the output node does not give logits (N, classes)")
        return logits.astype(np.float32, copy=False)

    def classify(self, images) -> np.ndarray:
        """Predicted class indices ``int64 (N,)``."""
        return self.predict(images).argmax(axis=1)


def load(path: str | Path, backend: str = "auto", fuse: bool = True) -> Engine:
    """Read, verify and load a ``.qdz`` file (see `qdz.read` for what is checked), then
    run an empty batch through it so inconsistent layer shapes fail here, not later (and
    numba compiles the kernels here, saying so on a terminal: `numba_kernels.compiling_notice`)."""
    manifest, arrays = qdz.read(path)
    try:
        engine = Engine(manifest, arrays, backend, fuse)
        with nb.compiling_notice(engine.backend == "numba"):
            logits = engine.predict(np.zeros((0,) + INPUT_SHAPE, np.float32))
        if logits.shape != (0, len(engine.class_names)):
            raise QdzError(f"the model has {logits.shape[1]} outputs for {len(engine.class_names)} class names")
    except QdzError as e:
        raise QdzError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise QdzError(f"{path}: malformed layer list ({type(e).__name__}: {e})") from None
    return engine
