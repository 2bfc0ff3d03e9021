"""The integer inference engine: runs the layer list of a ``.qdz`` manifest.

Between the first and the last layer every value is an integer: activation levels
(``uint8``, channels last), packed into bit-planes for the popcount convolution, whose
integer accumulator ``A`` is turned into the next levels by per-channel integer
thresholds. The first convolution (float input) and the last linear layer run in
float32, as in training; average pooling turns the last levels back into floats
(``level / (2**a - 1)``).

Stages, one per manifest layer:

* ``resize``       bilinear resize (torch ``align_corners=False`` semantics)
* ``conv_float``   float conv on the image -> levels (float thresholds) -> max-pool
* ``conv_packed``  popcount conv on levels -> levels (integer thresholds) -> max-pool,
                   or, ``out == "float_clip"``: ``clip(A * mul + add, lo, hi)`` in float
* ``avgpool``      levels (or floats) -> float mean over ``k x k`` windows (levels worth
                   ``level / (2**a - 1)``, or ``level * in_step`` after an LSQ quantizer)
* ``flatten``      channels-last maps -> vectors in torch's (C, H, W) order
* ``linear``       ``x @ W.T + b`` in float32
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import kernels, qdz
from .qdz import QdzError

INPUT_SHAPE = (3, 32, 32)


class _Stage:
    name = "?"

    def run(self, x):
        raise NotImplementedError


class Resize(_Stage):
    name = "resize"

    def __init__(self, spec, arrays, backend):
        self.size = _int(spec, "size")

    def run(self, x):
        return kernels.resize_bilinear(x, self.size)


class ConvFloat(_Stage):
    """Float conv on the (resized) image, then levels by float thresholds."""
    name = "conv_float"
    out_pad = None  # set by the Engine when a packed conv follows: output packed for it

    def __init__(self, spec, arrays, backend):
        self.backend = backend
        w = _array(arrays, spec, "weight", np.float32, ndim=4)
        o, c, kh, kw = w.shape
        self.cout = o
        self.wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))
        self.bias = (_array(arrays, spec, "bias", np.float32, shape=(o,)) if spec.get("bias")
                     else np.zeros(o, np.float32))
        self.pad = _int(spec, "padding")
        self.pool = max(1, _int(spec, "pool"))
        self.bits = _bits(spec, "out_bits")
        thr = _array(arrays, spec, "thresholds", np.float64, shape=(o, 2**self.bits - 1))
        self.sign = _array(arrays, spec, "sign", np.int8, shape=(o,)).astype(np.float64)
        self.thr = np.ascontiguousarray(thr.T)  # bounds on sign * v
        self.thr32 = kernels.float32_bounds(self.thr)

    def run(self, x):
        return kernels.conv_float(x, self.wt, self.bias, self.pad, self.thr, self.sign, self.pool,
                                  self.bits, self.out_pad, self.backend, self.thr32)


class ConvPacked(_Stage):
    """Popcount conv of packed levels with packed weight codes. Takes packed activations
    bordered with ``pad`` zeros (as the previous conv emits them) or plain levels."""
    name = "conv_packed"
    out_pad = None

    def __init__(self, spec, arrays, backend):
        self.backend = backend
        self.in_bits = _bits(spec, "in_bits")
        self.cin = _int(spec, "in_channels")
        self.cout = _int(spec, "out_channels")
        self.k = _bits(spec, "weight_bits")
        self.nw = _int(spec, "code_offset")
        self.kh, self.kw = _int(spec, "kernel_h"), _int(spec, "kernel_w")
        self.pad = _int(spec, "padding")
        self.pool = max(1, _int(spec, "pool"))
        planes = _array(arrays, spec, "planes", np.uint8,
                        shape=(self.k, self.cout, self.kh, self.kw, (self.cin + 7) // 8))
        self.wq = kernels.weight_rows(planes, self.cin)
        self.out = spec.get("out")
        if self.out == "levels":
            self.bits = _bits(spec, "out_bits")
            thr = _array(arrays, spec, "thresholds", np.int32, shape=(self.cout, 2**self.bits - 1))
            self.thr = np.ascontiguousarray(thr.T)
            self.sign = _array(arrays, spec, "sign", np.int8, shape=(self.cout,)).astype(np.int32)
        elif self.out == "float_clip":
            self.mul = _array(arrays, spec, "mul", np.float64, shape=(self.cout,))
            self.add = _array(arrays, spec, "add", np.float64, shape=(self.cout,))
            self.lo, self.hi = (float(v) for v in spec["clip"])
            if self.pool != 1:
                raise QdzError("float_clip conv output cannot be max-pooled")
        else:
            raise QdzError(f"unknown conv output kind {self.out!r}")

    def run(self, x):
        if x.ndim == 4:
            if x.shape[-1] != self.cin:
                raise QdzError(f"conv expects {self.cin} input channels, got {x.shape[-1]}")
            x = kernels.pack(x, self.in_bits, self.pad)
        if x.shape[3:] != (self.in_bits, kernels.words(self.cin)):
            raise QdzError(f"conv expects {self.in_bits}-bit planes of {self.cin} channels")
        if self.out == "levels":
            return kernels.conv_packed(x, self.wq, self.nw, self.kh, self.kw, self.cin, self.thr,
                                       self.sign, self.pool, self.bits, self.out_pad, self.backend)
        acc = kernels.accumulate(x, self.wq, self.nw, self.kh, self.kw, self.cin, self.backend)
        return np.clip(acc * self.mul + self.add, self.lo, self.hi).astype(np.float32)


class AvgPool(_Stage):
    """Mean over ``k x k`` windows of ``levels / (2**a - 1)``, of ``levels * in_step`` (LSQ's
    step, format version 2), or of floats."""
    name = "avgpool"

    def __init__(self, spec, arrays, backend):
        self.k = _int(spec, "kernel")
        self.in_bits = spec.get("in_bits")
        self.in_step = spec.get("in_step")
        if self.in_step is not None and not (isinstance(self.in_step, float) and np.isfinite(self.in_step)
                                             and self.in_step != 0):
            raise QdzError(f"layer avgpool: in_step must be a finite nonzero float, got {self.in_step!r}")

    def run(self, x):
        n, h, w, c = x.shape
        k = self.k
        win = x[:, :h // k * k, :w // k * k].reshape(n, h // k, k, w // k, k, c)
        mean = win.sum(axis=(2, 4), dtype=np.float64) / (k * k)
        if self.in_step is not None:
            mean = mean * self.in_step
        elif self.in_bits is not None:
            mean = mean / (2**int(self.in_bits) - 1)
        return mean.astype(np.float32)


class Flatten(_Stage):
    name = "flatten"

    def __init__(self, spec, arrays, backend):
        pass

    def run(self, x):
        n, h, w, c = x.shape
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, c * h * w).astype(np.float32)


class Linear(_Stage):
    name = "linear"

    def __init__(self, spec, arrays, backend):
        self.w = _array(arrays, spec, "weight", np.float32, ndim=2)
        self.wt = np.ascontiguousarray(self.w.T)
        self.b = (_array(arrays, spec, "bias", np.float32, shape=(self.w.shape[0],)) if spec.get("bias")
                  else np.zeros(self.w.shape[0], np.float32))

    def run(self, x):
        if x.shape[1] != self.w.shape[1]:
            raise QdzError(f"linear expects {self.w.shape[1]} features, got {x.shape[1]}")
        return x @ self.wt + self.b


STAGES = {cls.name: cls for cls in (Resize, ConvFloat, ConvPacked, AvgPool, Flatten, Linear)}


class Engine:
    """A loaded ``.qdz`` model. ``predict(images) -> logits``, ``classify(images) -> labels``."""

    def __init__(self, manifest: dict, arrays: dict[str, np.ndarray], backend: str = "auto"):
        if backend == "auto":
            backend = kernels.BACKENDS[0]
        if backend not in kernels.BACKENDS:
            raise QdzError(f"backend {backend!r} unavailable; choose one of {', '.join(kernels.BACKENDS)}"
                           + ("" if kernels.HAVE_NUMBA else " (install numba for the fast kernels)"))
        self.backend = backend
        self.manifest = manifest
        self.class_names = list(manifest.get("class_names", []))
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise QdzError("manifest has no layers")
        self.stages = []
        for i, spec in enumerate(layers):
            op = spec.get("op") if isinstance(spec, dict) else None
            if op not in STAGES:
                raise QdzError(f"layer {i}: unknown op {op!r}")
            self.stages.append(STAGES[op](spec, arrays, backend))
        # A conv feeding a packed conv emits its levels already packed and bordered.
        for stage, after in zip(self.stages, self.stages[1:]):
            if isinstance(stage, (ConvFloat, ConvPacked)) and isinstance(after, ConvPacked) \
                    and getattr(stage, "bits", None) == after.in_bits:
                stage.out_pad = after.pad

    def _check(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise QdzError(f"images must have shape (N, 3, 32, 32), got {tuple(x.shape)}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def trace(self, images) -> list[np.ndarray]:
        """The output of every stage, in order (the last one is the logits); packed
        activations are shown as their levels ``uint8 (N, H, W, C)``."""
        x = self._check(images)
        outs = []
        for stage in self.stages:
            x = stage.run(x)
            packed = getattr(stage, "out_pad", None) is not None
            outs.append(kernels.unpack(x, stage.cout, stage.out_pad) if packed else x)
        return outs

    def predict(self, images) -> np.ndarray:
        """Logits ``float32 (N, classes)`` of float32 images ``(N, 3, 32, 32)`` in [0, 1]."""
        x = self._check(images)
        for stage in self.stages:
            x = stage.run(x)
        return x.astype(np.float32, copy=False)

    def classify(self, images) -> np.ndarray:
        """Predicted class indices ``int64 (N,)``."""
        return self.predict(images).argmax(axis=1)


def load(path: str | Path, backend: str = "auto") -> Engine:
    """Read, verify and load a ``.qdz`` file (see `qdz.read` for what is checked), then
    run an empty batch through it so inconsistent layer shapes fail here, not later."""
    manifest, arrays = qdz.read(path)
    try:
        engine = Engine(manifest, arrays, backend)
        logits = engine.predict(np.zeros((0,) + INPUT_SHAPE, np.float32))
        if logits.shape != (0, len(engine.class_names)):
            raise QdzError(f"the model has {logits.shape[1]} outputs for {len(engine.class_names)} class names")
    except QdzError as e:
        raise QdzError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise QdzError(f"{path}: malformed layer list ({type(e).__name__}: {e})") from None
    return engine


def _int(spec: dict, key: str) -> int:
    v = spec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise QdzError(f"layer {spec.get('op')}: bad or missing {key!r}")
    return v


def _bits(spec: dict, key: str) -> int:
    v = _int(spec, key)
    if not 1 <= v <= 8:
        raise QdzError(f"layer {spec.get('op')}: {key} = {v} out of range 1..8")
    return v


def _array(arrays, spec, key, dtype, shape=None, ndim=None) -> np.ndarray:
    name = spec.get(key)
    if name not in arrays:
        raise QdzError(f"layer {spec.get('op')}: array {key!r} ({name!r}) missing")
    a = arrays[name]
    if a.dtype != np.dtype(dtype) or (shape is not None and tuple(a.shape) != tuple(shape)) \
            or (ndim is not None and a.ndim != ndim):
        raise QdzError(f"layer {spec.get('op')}: array {name!r} has dtype {a.dtype} shape {a.shape}")
    return a
