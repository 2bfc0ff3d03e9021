"""Residual adds in full precision and the quantizer after them (format version 3).

* ``add``    ``a + b`` in float64, each input a float map or levels worth ``table[q]``
             (``q / (2**a - 1)``, or ``q * step`` after an LSQ quantizer; ``in_bits``
             and ``in_step`` per input, null for a float input)
* ``quant``  float map -> levels: ``level = #{t : sign * v >= thr[t]}`` per channel, float64
             thresholds folded from the activation quantizer (`qdistill.export.plan.thresholds`
             with ``p = prescale``, ``q = 0``)

`ConvAddQuant` is what the engine runs instead of a popcount conv with float output whose
only user is an add whose only user is a quant (a residual block's tail): one pass of
`kernels.conv_add_quant`, the same float64 operations in the same order as the three
stages, so the same levels.
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .qdz import QdzError
from .stages import ConvPacked, Stage, level_values, spec_array, spec_bits, spec_int


class Add(Stage):
    name = "add"

    def __init__(self, spec, arrays, backend):
        bits, steps = spec.get("in_bits"), spec.get("in_step")
        if not (isinstance(bits, list) and isinstance(steps, list) and len(bits) == len(steps) == 2):
            raise QdzError("layer add: in_bits and in_step must be lists of two")
        self.tables = [level_values(spec, b, s) for b, s in zip(bits, steps)]

    def value(self, x, k: int) -> np.ndarray:
        """Input ``k`` as float64 values."""
        if isinstance(x, tuple):
            x = x[0]
        table = self.tables[k]
        if table is None:
            return np.asarray(x, np.float64)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise QdzError(f"layer add: input {k} should be levels, got {x.dtype} {x.shape}")
        return table[x]

    def run(self, a, b):
        a, b = self.value(a, 0), self.value(b, 1)
        if a.shape != b.shape:
            raise QdzError(f"layer add: shapes {a.shape} and {b.shape} differ")
        return a + b


class Quant(Stage):
    name = "quant"

    def __init__(self, spec, arrays, backend):
        self.cout = spec_int(spec, "channels")
        self.bits = spec_bits(spec, "out_bits")
        thr = spec_array(arrays, spec, "thresholds", np.float64, shape=(self.cout, 2**self.bits - 1))
        self.thr = np.ascontiguousarray(thr.T)
        self.sign = spec_array(arrays, spec, "sign", np.int8, shape=(self.cout,)).astype(np.float64)

    def run(self, x):
        if x.ndim != 4 or x.shape[-1] != self.cout:
            raise QdzError(f"layer quant: expects {self.cout} channels, got shape {x.shape}")
        levels = kernels._threshold_np(x, self.thr, self.sign)
        return kernels._emit_np(levels, self.bits, self.out_pad, self.both)


class ConvAddQuant(Stage):
    """``quant(add(conv(x), r))``, the conv's output float: `kernels.conv_add_quant`.
    ``run(x, r)``: ``x`` the conv's input, ``r`` the add's other input."""
    name = "conv_add_quant"

    def __init__(self, conv: ConvPacked, add: Add, quant: Quant, conv_side: int, backend: str):
        self.conv, self.quant, self.backend = conv, quant, backend
        self.table = add.tables[1 - conv_side]
        self.packed_pad, self.in_bits = conv.pad, conv.in_bits
        self.cout, self.bits = quant.cout, quant.bits
        if conv.cout != quant.cout:
            raise QdzError(f"layer quant: expects {quant.cout} channels, the conv gives {conv.cout}")

    def prepare(self):
        c, q = self.conv, self.quant
        self.fused = kernels.conv_add_quant_fn(c.wq, c.nw, c.kh, c.kw, c.cin, c.stride, c.mul, c.add,
                                               self.table if self.table is not None else np.zeros(1), q.thr, q.sign,
                                               q.bits, self.out_pad, self.both, self.backend, self.table is not None)

    def run(self, x, r):
        c = self.conv
        if isinstance(r, tuple):
            r = r[0]
        x = c.packed(x)
        shape = (x.shape[0], (x.shape[1] - c.kh) // c.stride + 1, (x.shape[2] - c.kw) // c.stride + 1, self.cout)
        if r.shape != shape or (self.table is not None and r.dtype != np.uint8):
            raise QdzError(f"layer add: shapes {shape} and {r.shape} differ")
        return self.fused(x, r)
