"""The engine's stages, one per manifest node (``op``), and the manifest readers they share.

Values between stages are channels-last: levels ``uint8 (N, H, W, C)`` (or packed for a
popcount conv, see `kernels`), float maps ``(N, H, W, C)``, vectors ``(N, F)``.

* ``resize``          bilinear resize (torch ``align_corners=False`` semantics)
* ``conv_float``      float conv (stride ``s``) on the image -> levels (float thresholds) -> max-pool
* ``conv_packed``     popcount conv (stride ``s``) on levels -> levels (integer thresholds) -> max-pool;
                      ``out == "float_clip"``: ``clip(A * mul + add, lo, hi)`` as float32;
                      ``out == "float"``: ``A * mul + add`` in float64 (format 3)
* ``avgpool``         levels (or floats) -> float mean over ``k x k`` windows (levels worth
                      ``level / (2**a - 1)``, or ``level * in_step`` after an LSQ quantizer)
* ``flatten``         channels-last maps -> vectors in torch's (C, H, W) order
* ``linear``          ``x @ W.T + b`` in float32
* format 3 (`qdistill.deploy.residual` holds ``add`` and ``quant``): ``maxpool`` (``k x k``,
  stride ``k``, levels or floats), ``global_avgpool`` (mean over the whole map, as
  ``avgpool``; ``flat``: ``(N, C)``, else ``(N, 1, 1, C)``), ``clip`` (floats).
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .qdz import QdzError


class Stage:
    """One node: ``run(*inputs)``. A stage whose output is levels may emit them packed
    for popcount convs (``out_pad``: their border; ``both``: levels too)."""
    name = "?"
    out_pad = None
    both = False
    packed_pad = None  # the border this stage wants its first input packed with (convs on levels)
    in_bits = None

    def run(self, *xs):
        raise NotImplementedError

    def prepare(self) -> None:
        """Called once the engine has set ``out_pad`` and ``both``: fix what ``run`` calls."""


class Resize(Stage):
    name = "resize"

    def __init__(self, spec, arrays, backend):
        self.size = spec_int(spec, "size")

    def run(self, x):
        return kernels.resize_bilinear(x, self.size)


def _stride(spec: dict) -> int:
    s = spec.get("stride", 1)
    if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        raise QdzError(f"layer {spec.get('op')}: bad stride {s!r}")
    return s


class ConvFloat(Stage):
    """Float conv on the (resized) image, then levels by float thresholds."""
    name = "conv_float"

    def __init__(self, spec, arrays, backend):
        self.backend = backend
        w = spec_array(arrays, spec, "weight", np.float32, ndim=4)
        o, c, kh, kw = w.shape
        self.cout = o
        self.wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))
        self.bias = (spec_array(arrays, spec, "bias", np.float32, shape=(o,)) if spec.get("bias")
                     else np.zeros(o, np.float32))
        self.pad = spec_int(spec, "padding")
        self.stride = _stride(spec)
        self.pool = max(1, spec_int(spec, "pool"))
        self.bits = spec_bits(spec, "out_bits")
        thr = spec_array(arrays, spec, "thresholds", np.float64, shape=(o, 2**self.bits - 1))
        self.sign = spec_array(arrays, spec, "sign", np.int8, shape=(o,)).astype(np.float64)
        self.thr = np.ascontiguousarray(thr.T)  # bounds on sign * v
        self.thr32 = kernels.float32_bounds(self.thr)

    def run(self, x):
        return kernels.conv_float(x, self.wt, self.bias, self.pad, self.thr, self.sign, self.pool,
                                  self.bits, self.out_pad, self.backend, self.thr32, self.stride, self.both)


def packed_input(x, cin: int, bits: int, pad: int) -> np.ndarray:
    """A conv's input as packed activations with a border of ``pad``: packs levels
    ``(N, H, W, C)``; takes packed ones (or the packed half of a ``(levels, packed)`` pair)
    as they are, cutting a wider border down to ``pad``."""
    if isinstance(x, tuple):
        x = x[1]
    if x.ndim == 4:
        if x.shape[-1] != cin:
            raise QdzError(f"conv expects {cin} input channels, got {x.shape[-1]}")
        return kernels.pack(x, bits, pad)
    if x.shape[3:] != (bits, kernels.words(cin)):
        raise QdzError(f"conv expects {bits}-bit planes of {cin} channels")
    return x


def cut_border(x: np.ndarray, border: int, pad: int) -> np.ndarray:
    """Packed activations bordered with ``border`` zeros, seen with ``pad <= border``."""
    d = border - pad
    return x if d == 0 else x[:, d:x.shape[1] - d, d:x.shape[2] - d]


class ConvPacked(Stage):
    """Popcount conv of packed levels with packed weight codes. Takes packed activations
    bordered with ``pad`` zeros (as the previous conv emits them) or plain levels."""
    name = "conv_packed"

    def __init__(self, spec, arrays, backend):
        self.backend = backend
        self.in_bits = spec_bits(spec, "in_bits")
        self.cin = spec_int(spec, "in_channels")
        self.cout = spec_int(spec, "out_channels")
        self.k = spec_bits(spec, "weight_bits")
        self.nw = spec_int(spec, "code_offset")
        self.kh, self.kw = spec_int(spec, "kernel_h"), spec_int(spec, "kernel_w")
        self.pad = self.packed_pad = spec_int(spec, "padding")
        self.stride = _stride(spec)
        self.pool = max(1, spec_int(spec, "pool"))
        planes = spec_array(arrays, spec, "planes", np.uint8,
                            shape=(self.k, self.cout, self.kh, self.kw, (self.cin + 7) // 8))
        self.wq = kernels.weight_rows(planes, self.cin)
        self.out = spec.get("out")
        if self.out == "levels":
            self.bits = spec_bits(spec, "out_bits")
            thr = spec_array(arrays, spec, "thresholds", np.int32, shape=(self.cout, 2**self.bits - 1))
            self.thr = np.ascontiguousarray(thr.T)
            self.sign = spec_array(arrays, spec, "sign", np.int8, shape=(self.cout,)).astype(np.int32)
        elif self.out in ("float_clip", "float"):
            self.mul = spec_array(arrays, spec, "mul", np.float64, shape=(self.cout,))
            self.add = spec_array(arrays, spec, "add", np.float64, shape=(self.cout,))
            self.lo, self.hi = (float(v) for v in spec["clip"]) if self.out == "float_clip" else (None, None)
            if self.pool != 1:
                raise QdzError("a conv with float output cannot be max-pooled")
        else:
            raise QdzError(f"unknown conv output kind {self.out!r}")

    def packed(self, x) -> np.ndarray:
        return packed_input(x, self.cin, self.in_bits, self.pad)

    def prepare(self):
        if self.out == "levels":
            self.call = kernels.conv_packed_fn(self.wq, self.nw, self.kh, self.kw, self.cin, self.thr, self.sign,
                                               self.pool, self.bits, self.out_pad, self.backend, self.stride,
                                               self.both)

    def run(self, x):
        x = self.packed(x)
        if self.out == "levels":
            return self.call(x)
        v = kernels.conv_affine(x, self.wq, self.nw, self.kh, self.kw, self.cin, self.mul, self.add, self.backend,
                                self.stride)
        return v if self.out == "float" else np.clip(v, self.lo, self.hi).astype(np.float32)


def level_values(spec: dict, bits, step, what: str = "in_step") -> np.ndarray | None:
    """``table[q]``, the float64 value of level ``q``: ``q / (2**bits - 1)``, or ``q * step``
    after an LSQ quantizer; None for float input (``bits`` None)."""
    if step is not None and not (isinstance(step, float) and np.isfinite(step) and step != 0):
        raise QdzError(f"layer {spec.get('op')}: {what} must be a finite nonzero float, got {step!r}")
    if bits is None:
        return None
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise QdzError(f"layer {spec.get('op')}: bad input bits {bits!r}")
    q = np.arange(2**bits, dtype=np.float64)
    return q * step if step is not None else q / (2**bits - 1)


def _mean(total: np.ndarray, count: int, spec_bits_, step) -> np.ndarray:
    """``total / count`` in float64, then ``* step`` or ``/ (2**a - 1)`` for levels, as float32."""
    mean = total / count
    if step is not None:
        mean = mean * step
    elif spec_bits_ is not None:
        mean = mean / (2**int(spec_bits_) - 1)
    return mean.astype(np.float32)


class AvgPool(Stage):
    """Mean over ``k x k`` windows of ``levels / (2**a - 1)``, of ``levels * in_step`` (LSQ's
    step, format version 2), or of floats."""
    name = "avgpool"

    def __init__(self, spec, arrays, backend):
        self.k = spec_int(spec, "kernel")
        self.in_bits = spec.get("in_bits")
        self.in_step = spec.get("in_step")
        level_values(spec, self.in_bits, self.in_step)

    def run(self, x):
        n, h, w, c = x.shape
        k = self.k
        win = x[:, :h // k * k, :w // k * k].reshape(n, h // k, k, w // k, k, c)
        return _mean(win.sum(axis=(2, 4), dtype=np.float64), k * k, self.in_bits, self.in_step)


class GlobalAvgPool(AvgPool):
    """The mean over the whole map (``AdaptiveAvgPool2d(1)``), as `AvgPool` computes it."""
    name = "global_avgpool"

    def __init__(self, spec, arrays, backend):
        self.in_bits = spec.get("in_bits")
        self.in_step = spec.get("in_step")
        self.flat = bool(spec.get("flat", False))
        level_values(spec, self.in_bits, self.in_step)

    def run(self, x):
        n, h, w, c = x.shape
        mean = _mean(x.sum(axis=(1, 2), dtype=np.float64), h * w, self.in_bits, self.in_step)
        return mean if self.flat else mean.reshape(n, 1, 1, c)


class MaxPool(Stage):
    """``k x k`` max-pool, stride ``k``, of levels or floats (floor mode)."""
    name = "maxpool"

    def __init__(self, spec, arrays, backend):
        self.k = max(1, spec_int(spec, "kernel"))

    def run(self, x):
        return kernels.maxpool(x, self.k)


class Clip(Stage):
    name = "clip"

    def __init__(self, spec, arrays, backend):
        self.lo, self.hi = (float(v) for v in spec["clip"])

    def run(self, x):
        return np.clip(x, self.lo, self.hi).astype(x.dtype, copy=False)


class Flatten(Stage):
    name = "flatten"

    def __init__(self, spec, arrays, backend):
        pass

    def run(self, x):
        if x.ndim == 2:
            return x.astype(np.float32, copy=False)
        n, h, w, c = x.shape
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, c * h * w).astype(np.float32)


class Linear(Stage):
    name = "linear"

    def __init__(self, spec, arrays, backend):
        self.w = spec_array(arrays, spec, "weight", np.float32, ndim=2)
        self.wt = np.ascontiguousarray(self.w.T)
        self.b = (spec_array(arrays, spec, "bias", np.float32, shape=(self.w.shape[0],)) if spec.get("bias")
                  else np.zeros(self.w.shape[0], np.float32))

    def run(self, x):
        if x.ndim != 2 or x.shape[1] != self.w.shape[1]:
            raise QdzError(f"linear expects {self.w.shape[1]} features, got shape {x.shape}")
        return x @ self.wt + self.b


# ---------------------------------------------------------------- manifest readers

def spec_int(spec: dict, key: str) -> int:
    v = spec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise QdzError(f"layer {spec.get('op')}: bad or missing {key!r}")
    return v


def spec_bits(spec: dict, key: str) -> int:
    v = spec_int(spec, key)
    if not 1 <= v <= 8:
        raise QdzError(f"layer {spec.get('op')}: {key} = {v} out of range 1..8")
    return v


def spec_array(arrays, spec, key, dtype, shape=None, ndim=None) -> np.ndarray:
    name = spec.get(key)
    if name not in arrays:
        raise QdzError(f"layer {spec.get('op')}: array {key!r} ({name!r}) missing")
    a = arrays[name]
    if a.dtype != np.dtype(dtype) or (shape is not None and tuple(a.shape) != tuple(shape)) \
            or (ndim is not None and a.ndim != ndim):
        raise QdzError(f"layer {spec.get('op')}: array {name!r} has dtype {a.dtype} shape {a.shape}")
    return a
