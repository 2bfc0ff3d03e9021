"""Derived error bounds for the float comparisons of the export, deploy and ONNX tests.

Float32 results differ between CPUs in the last bits (oneDNN, MKL, OpenBLAS and MLAS sum
in different orders and fuse multiply-adds differently), so no comparison uses a
tolerance tuned on one machine. Each one runs a float64 reference of the *same*
computation -- PyTorch's own modules in float64, on the same float32 inputs and the same
float32 (quantized) weights -- and bounds ``|implementation - reference|`` by rounding
error analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1):

    if every term ``t_i`` of an exact sum ``sum t_i`` passes through at most ``k``
    roundings (each a factor ``1 + delta``, ``|delta| <= u``) on its way to the result,
    the computed value is within ``gamma_k * sum |t_i|``, ``gamma_k = k u / (1 - k u)``,
    ``u = 2**-24`` for float32 -- in any summation order, with or without FMA.

`Ref` evaluates a module list in float64 and, alongside, for each *error model* (which
implementation is bounded: ``"f32"`` any float32 implementation -- PyTorch, ONNX
Runtime; ``"engine"`` the packed integer engine), the bound. Between nonlinear steps
(ReLU, clip, max-pool, a materialised resize) the computation is affine, and there

    |impl - ref| <= |L|(e_in) + gamma_k(u32) * L_abs(|x| + e_in) + 2 gamma_(k64+4)(u64) * (L_abs + 1)

with ``e_in`` the bound on the segment's input, ``|L|`` the linear part with absolute
coefficients, ``L_abs`` the same map with absolute values of everything (inputs,
weights, biases, BN means and shifts: the "sum |t_i|"), ``k`` the float32 roundings on a
term's path, counted per op below, and the last term the float64 roundings of the
reference and of the engine's float64 parts (``k64`` their count, ``+ 4`` and ``+ 1``
for the engine's threshold ``((t - 0.5)/m - Q)/P``, ``|(t - 0.5)/m| <= 1``). ReLU and
clip are monotone (``f(x')`` lies in ``[f(x - e), f(x + e)]``), a max-pool is
1-Lipschitz per window (``|max a' - max a| <= max |a' - a|``).

Float32 roundings counted per op, "f32" model: conv / linear ``n`` = fan-in (+1 for a
bias): one product and up to ``n - 1`` additions; eval BatchNorm 7 (the scale
``g / sqrt(var + eps)`` 4, then ``(x - mean) * scale + beta`` 3, or, folded into the
conv's weights and bias as ONNX Runtime does, ``mean * scale`` 1 and 2 additions);
``(|a| + 1) x + b`` 3; homework ``0.1 *`` 2 (0.1 as a float32, the product); the
quantizer's ``x * m`` 1; average pool ``k*k``. "engine" model: the
popcount accumulator is an exact integer, so a conv on levels only differs from the
reference by how its float32 operands represent ``q / m`` and ``alpha (2c - n)``
(activation 1, weight <= 2 roundings: 3); the first conv is float32 (``n``); BN, affine
and thresholds are float64 (0); linear is float32 BLAS (``n``); average pooling is a
float64 mean (levels: 1 for ``q / m``) cast to float32 (1). A resize's bound is derived in
`bounds_resize`.

LSQ's ops (``student.scheme = "lsq"``) fit the same counts: its quantizer computes
``x / s`` (1 rounding, like ``x * m``) then ``round(clamp(., 0, m)) * s``; a level's value
``q * s`` is one float32 product (1, like ``q / m``), a weight ``c * s`` one (<= 2); the
engine folds ``s`` into float64 scales and cuts, so its threshold is
``((t - 0.5) s - Q) / P`` with ``|(t - 0.5) s| <= m |s|``: the ``+ 1`` above becomes
``+ max(1, m |s|)`` in the segment that ends at an LSQ quantizer, and its level boundaries
are ``u / s = t - 0.5`` (`Ref.near` measures the gap in levels: ``|bound / s|``); its
average pool multiplies the float64 mean by ``s`` (one more float64 rounding: average
pooling counts ``k*k + 1`` of them for every scheme).

A bound is only as good as the assumption that an implementation does what it says in
float32 (no bf16 / TF32 down-conversion: PyTorch's default
``float32_matmul_precision("highest")``). Every bound here is ~1e-7..1e-5 relative to
the data, while a real bug -- a wrong or missing weight, bias, scale or level -- moves
outputs by orders of magnitude more; each test says which mutation it was checked with.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qdistill.nn.layers import AbsAffine, Clip01, QuantAct, QuantConv2d, QuantLinear, Resize
from qdistill.nn.quantizers import FULL

U32 = 2.0 ** -24  # unit roundoff, float32
U64 = 2.0 ** -53  # unit roundoff, float64


def gamma(k, u: float = U32):
    """``gamma_k = k u / (1 - k u)`` (Higham 3.4); ``k`` a number or an array."""
    k = np.asarray(k, dtype=np.float64)
    assert (k * u < 1).all()
    return k * u / (1 - k * u)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def within(got, ref, bound, what: str = "") -> float:
    """Assert ``|got - ref| <= bound`` elementwise (all float64) and return the largest
    ratio ``|got - ref| / bound`` (to report how tight the bound is)."""
    got, ref, bound = (np.asarray(a, dtype=np.float64) for a in (got, ref, bound))
    diff = np.abs(got - ref)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    bad = ~(diff <= bound)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} values outside the derived bound; "
                           f"worst |diff| {diff[bad].max():.3g} vs bound {bound[bad][diff[bad].argmax()]:.3g}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, diff / bound, 0.0)
    RATIOS[what] = max(RATIOS.get(what, 0.0), float(ratio.max(initial=0.0)))
    return float(ratio.max(initial=0.0))


RATIOS: dict[str, float] = {}  # largest |diff| / bound seen per comparison (for reports)


# ---------------------------------------------------------------- the float64 reference

_doubles: dict | None = None  # id(module) -> `double_module(module)` while a `Chunked` runs its pieces


def double_module(m: nn.Module) -> nn.Module:
    """A float64 copy of ``m`` computing the same function on the same float32 values:
    a quantized conv / linear becomes a plain one holding its float32 quantized weight.
    (Made once per module for all the pieces of a `Chunked`; a `Ref` only reads it.)"""
    if _doubles is not None:
        if id(m) not in _doubles:
            _doubles[id(m)] = _double_module(m)
        return _doubles[id(m)]
    return _double_module(m)


def _double_module(m: nn.Module) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        w = m.quantized_weight() if isinstance(m, QuantConv2d) else m.weight
        out = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
    elif isinstance(m, nn.Linear):
        w = m.quantized_weight() if isinstance(m, QuantLinear) else m.weight
        out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        return copy.deepcopy(m).double().eval()
    with torch.no_grad():
        out.weight.copy_(w.detach().float())
        if m.bias is not None:
            out.bias.copy_(m.bias.detach().float())
    return out.double().eval()


# float32 roundings per op, any float32 implementation (see the module docstring)
_F32 = {"bn": 7, "affine": 3, "tenth": 2, "quant": 1}


class _Seg:
    """One error model's state: ``p`` the propagated input bound, ``a`` the absolute-value
    evaluation, ``k32`` / ``k64`` the float32 / float64 roundings of the open segment."""

    def __init__(self, p, a):
        self.p, self.a, self.k32, self.k64 = p, a, 0, 0


class Ref:
    """A float64 reference run of modules with, per error model in ``kinds``, a bound on
    ``|implementation - reference|`` (see the module docstring). ``x``: the float32 input
    both see (its float64 copy is the reference's); ``e_in``: a bound on how far the
    implementation's input is from it; ``levels_in``: the input is levels ``q / m``, which
    the engine holds exactly (an integer accumulator) and PyTorch as float32.

    After a quantizer (``QuantAct`` with < 32 bits): `levels` and `near` at the quantizer
    (``spread=False``) or after the max-pools that follow it. Otherwise `value` gives
    ``(reference, bound)``."""

    def __init__(self, x, *, kinds=("f32",), e_in=None, levels_in: bool = False):
        self.x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().double()
        self.levels_in = levels_in
        a = self.x.abs() if e_in is None else self.x.abs() + e_in
        self.segs = {k: _Seg(e_in, a) for k in kinds}
        self.u = None             # the quantizer's input, once one has run
        self.post_pools: list[int] = []
        self._first = True
        self._cut = 1.0           # the largest threshold cut |(t - 0.5) d| of the open segment
        self.lsq_step = None      # the quantizer's LSQ step, if it has one

    def run(self, modules) -> "Ref":
        with torch.no_grad():
            for m in modules:
                self._apply(m)
                self._first = False
        return self

    # -- bookkeeping
    def _cost(self, kind: str, op: str, n: int = 0) -> int:
        if kind == "f32":
            return n if op in ("conv", "linear", "avg") else _F32[op]
        if op == "conv":
            return 3 if (self.levels_in and self._first) else n
        if op == "linear":
            return n
        if op == "avg":
            return (1 if (self.levels_in and self._first) else 0) + 1
        return 0  # BN, affine, 0.1, thresholds: float64 in the engine

    def _add(self, op: str, n: int = 0, k64: int | None = None):
        for kind, s in self.segs.items():
            s.k32 += self._cost(kind, op, n)
            s.k64 += n if k64 is None else k64

    def _close(self, goes_on: bool = True):
        """``p + g32 |a| + 2 g64 (|a| + cut)``, written ``(g32 + 2 g64) |a| + 2 g64 cut + p`` to
        make one full-size temporary instead of five (the suite's hottest loop); ``cut`` is 1
        but before an LSQ quantizer (see the module docstring). ``goes_on``: a next segment
        starts here and needs ``|a| = |x| + p`` (at a quantizer none does: only ``p`` is read)."""
        x_abs = self.x.abs() if goes_on else None
        for s in self.segs.values():
            g64 = 2 * float(gamma(s.k64 + 4, U64))
            e = s.a * (float(gamma(s.k32)) + g64)
            e.add_(g64 * self._cut)
            if s.p is not None:
                e.add_(s.p)
            s.p, s.a, s.k32, s.k64 = e, x_abs + e if goes_on else None, 0, 0

    def _monotone(self, f):
        """A nondecreasing ``f`` (ReLU, clip): an implementation's ``f(x')`` with ``|x' - x| <= e``
        lies in ``[f(x - e), f(x + e)]`` (so a clipped value far past the bound is exact)."""
        self._close()
        y = f(self.x)
        for s in self.segs.values():
            s.p = torch.maximum(f(self.x + s.p) - y, y - f(self.x - s.p))
            s.a = y.abs() + s.p
        self.x = y

    def _abs_is_x(self) -> bool:
        """Every error model's ``a`` is one tensor equal to ``|x| = x`` and none carries an
        input bound yet (a segment's start from non-negative values)."""
        segs = list(self.segs.values())
        return (all(s.p is None and s.a is segs[0].a for s in segs)
                and torch.equal(segs[0].a, self.x))

    def _linear(self, f, absf, n: int, op: str):
        """``x -> f(x)``, bounds through ``absf`` (``f`` with absolute coefficients)."""
        self.x = f(self.x)
        cache = {}
        for s in self.segs.values():
            if id(s.a) not in cache:
                cache[id(s.a)] = absf(s.a, True)
            s.a = cache[id(s.a)]
            if s.p is not None:
                s.p = absf(s.p, False)
        self._add(op, n)

    def _per_channel(self, scale, shift_abs, op: str, k64: int, view):
        scale = view(scale)
        scale_abs, shift_abs = scale.abs(), view(shift_abs)
        self.x = self.x * scale  # shift applied by the caller
        cache = {}
        for s in self.segs.values():
            if id(s.a) not in cache:  # segments share |a| after a linear op
                cache[id(s.a)] = torch.addcmul(shift_abs, s.a, scale_abs)
            s.a = cache[id(s.a)]
            if s.p is not None:
                s.p = s.p * scale_abs
        self._add(op, k64=k64)

    def _apply(self, m: nn.Module):
        if self.u is not None and not isinstance(m, (nn.MaxPool2d, nn.Dropout)):
            raise ValueError(f"{type(m).__name__} after a quantizer: start a new Ref from its output")
        if isinstance(m, nn.Dropout):
            return
        if isinstance(m, Resize):
            assert self._first, "resize must be the first op of a Ref"
            from bounds_resize import resize_reference  # it imports this module
            self.x, bound = resize_reference(self.x, m.size)
            for s in self.segs.values():
                s.p, s.a = bound, self.x.abs() + bound
        elif isinstance(m, nn.Conv2d):
            d = double_module(m)
            w, b = d.weight.detach(), d.bias
            conv = lambda t, wt, bias: F.conv2d(t, wt, bias, d.stride, d.padding, d.dilation, d.groups)
            babs = None if b is None else b.detach().abs()
            n = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] + (b is not None)
            if d.groups == 1 and self._abs_is_x():
                # |x| = x (levels, images): the value and its magnitude in one convolution with
                # the weights stacked [W; |W|] (one im2col of x; the same sums)
                both = conv(self.x, torch.cat([w, w.abs()]), None if b is None else torch.cat([b.detach(), babs]))
                self.x, a = both[:, :m.out_channels], both[:, m.out_channels:]
                for s in self.segs.values():
                    s.a = a
                self._add("conv", n)
            else:
                self._linear(lambda t: conv(t, w, None if b is None else b.detach()),
                             lambda t, mag: conv(t, w.abs(), babs if mag else None), n, "conv")
        elif isinstance(m, nn.Linear):
            d = double_module(m)
            w, b = d.weight.detach(), None if d.bias is None else d.bias.detach()
            n = m.in_features + (b is not None)
            self._linear(lambda t: F.linear(t, w, b),
                         lambda t, mag: F.linear(t, w.abs(), None if (b is None or not mag) else b.abs()),
                         n, "linear")
        elif isinstance(m, nn.BatchNorm2d):
            d = double_module(m)
            mean, var = d.running_mean, d.running_var
            g = d.weight.detach() if d.weight is not None else torch.ones_like(mean)
            beta = d.bias.detach() if d.bias is not None else torch.zeros_like(mean)
            scale = g / torch.sqrt(var + d.eps)
            v = lambda t: t.view(1, -1, 1, 1)
            cache = {}
            for s in self.segs.values():  # |x - mean| <= |x| + |mean|
                if id(s.a) not in cache:
                    cache[id(s.a)] = s.a + v(mean.abs())
                s.a = cache[id(s.a)]
            self.x = self.x - v(mean)
            self._per_channel(scale, beta.abs(), "bn", 7, v)
            self.x = self.x + v(beta)
        elif isinstance(m, AbsAffine):
            c = m.a.detach().double().abs() + 1
            b = m.b.detach().double()
            v = lambda t: t.view(1, -1, 1, 1)
            self._per_channel(c, b.abs(), "affine", 3, v)
            self.x = self.x + v(b)
        elif isinstance(m, QuantAct):
            if m.scheme == "homework":
                self._per_channel(torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                                  "tenth", 2, lambda t: t)
            if m.bits < FULL:
                self._quantize(m)
                return
            self._monotone((lambda t: torch.clamp(t, 0, 1)) if m.scheme == "homework" else torch.relu)
        elif isinstance(m, Clip01):
            self._monotone(lambda t: torch.clamp(t, 0, 1))
        elif isinstance(m, nn.ReLU):
            self._monotone(torch.relu)
        elif isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            if self.u is not None:
                self.post_pools.append(k)
                return
            self._close()
            self.x = F.max_pool2d(self.x, k)
            for s in self.segs.values():
                s.p = F.max_pool2d(s.p, k)
                s.a = self.x.abs() + s.p
        elif isinstance(m, nn.AvgPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            self._linear(lambda t: F.avg_pool2d(t, k), lambda t, mag: F.avg_pool2d(t, k), k * k, "avg")
            for s in self.segs.values():  # the engine's float64 ``* s`` after an LSQ quantizer
                s.k64 += 1
        elif isinstance(m, nn.Flatten):
            self.x = self.x.flatten(1)
            for s in self.segs.values():
                s.a = s.a.flatten(1)
                s.p = None if s.p is None else s.p.flatten(1)
        else:
            raise TypeError(f"no error model for {type(m).__name__}")

    def _quantize(self, m: QuantAct):
        """Close the segment at a quantizer; keep its input ``u`` and how ``u`` maps to levels
        (DoReFa, homework: ``u * m``; LSQ: ``u / s``)."""
        self.m, s = 2**m.bits - 1, (float(m.step) if m.scheme == "lsq" else None)
        self._add("quant", k64=1)
        if s is not None:
            self._cut = max(1.0, self.m * abs(s))
        self._close(goes_on=False)
        # After a quantizer only `levels` and `near` are read (from ``u``; `_apply` takes
        # nothing but max-pools, which `_spread` applies): no value ``x`` past it.
        self._cut, self.u, self.lsq_step, self.x = 1.0, self.x, s, None

    def _level_units(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the quantizer's input, or a bound on it) in levels."""
        return t * self.m if self.lsq_step is None else t / self.lsq_step

    def cast32(self, kind: str) -> "Ref":
        """The implementation rounds its float64 result to float32 (``u32 * |value|``)."""
        self._close()
        s = self.segs[kind]
        s.p = s.p + U32 * (self.x.abs() + s.p)
        s.a = self.x.abs() + s.p
        return self

    # -- results
    def value(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reference, bound on |kind's output - reference|)``."""
        assert self.u is None
        self._close()
        return self.x, self.segs[kind].p

    def bound_at_quantizer(self, kinds) -> torch.Tensor:
        bounds = [self.segs[k].p for k in kinds]
        return bounds[0] if len(bounds) == 1 else torch.stack(bounds).amax(0)

    def _spread(self, t: torch.Tensor, pool) -> torch.Tensor:
        for k in self.post_pools:
            t = pool(t, k)
        return t

    def levels(self, spread: bool = True) -> np.ndarray:
        """The reference levels ``round(clamp(u, 0, 1) * m)``, channels last."""
        q = (torch.round(torch.clamp(self.u, 0, 1) * self.m) if self.lsq_step is None
             else torch.round(torch.clamp(self.u / self.lsq_step, 0, self.m)))
        return nhwc(self._spread(q, F.max_pool2d) if spread else q).astype(np.uint8)

    def near(self, kinds, spread: bool = True) -> np.ndarray:
        """Where an implementation of any of ``kinds`` may round to another level than the
        reference: the quantizer input ``u`` within the bound of a threshold
        ``(t - 0.5) / m``; after a max-pool, wherever any input of the window is."""
        if getattr(self, "_gap", None) is None:  # |s - nearest threshold|, s = u m + 0.5: once per Ref
            s = self._level_units(self.u) + 0.5        # threshold t at s = t
            self._gap = s.sub_(torch.round(s).clamp_(1, self.m)).abs_()
        near = self._gap <= self._level_units(self.bound_at_quantizer(kinds)).abs()
        if spread:
            near = self._spread(near.float(), F.max_pool2d) > 0  # 0/1: exact in any float
        return nhwc(near)


CHUNK = 32  # images per piece of a `Chunked` reference


class Chunked:
    """A `Ref` run on ``x`` in pieces of ``chunk`` images, with the same values: every op of
    a Ref acts on each image alone (convolutions, BatchNorm in eval, pools, the resize, the
    bound's elementwise arithmetic), so a piece's results are those rows of the whole
    one's, bit for bit. On pieces the float64 temporaries stay in the CPU's cache: over
    768 vgg7 images, 2.3x faster than one Ref here. ``e_in``: None or one bound per value."""

    def __init__(self, x, *, kinds=("f32",), e_in=None, levels_in: bool = False, chunk: int = CHUNK):
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        self.parts = [Ref(x[i:i + chunk], kinds=kinds, e_in=None if e_in is None else e_in[i:i + chunk],
                          levels_in=levels_in) for i in range(0, len(x), chunk)]

    def run(self, modules) -> "Chunked":
        global _doubles
        modules, _doubles = list(modules), {}
        try:
            for part in self.parts:
                part.run(modules)
        finally:
            _doubles = None
        return self

    def cast32(self, kind: str) -> "Chunked":
        for part in self.parts:
            part.cast32(kind)
        return self

    def value(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        values, bounds = zip(*(part.value(kind) for part in self.parts))
        return torch.cat(values), torch.cat(bounds)

    def levels(self, spread: bool = True) -> np.ndarray:
        return np.concatenate([part.levels(spread) for part in self.parts])

    def near(self, kinds, spread: bool = True) -> np.ndarray:
        return np.concatenate([part.near(kinds, spread) for part in self.parts])


def block_ref(model, first: int, last: int, images, inputs, kinds, resize: int | None = None,
              rows=slice(None)) -> Chunked:
    """A reference (`Ref`, run in pieces: `Chunked`) of the conv block ``model[first:last + 1]``
    from PyTorch's float32 input to it (levels, or the images for a first conv); the block
    right after a resize (module ``resize``) starts from the images through the float64
    resize instead, so an implementation's own resize is bounded, not PyTorch's. ``rows``
    (a slice or indices): the images it runs on, each one's values as in a run on all."""
    if resize is not None and resize + 1 == first:
        return Chunked(images[rows], kinds=kinds).run(model[resize:last + 1])
    return Chunked(inputs[first][rows], kinds=kinds, levels_in=first != 0).run(model[first:last + 1])


def first_differences(diff: np.ndarray, flagged: np.ndarray, near_of, what: str) -> np.ndarray:
    """End to end, at one quantizer: ``diff`` (images first) marks where an implementation's
    levels differ from PyTorch's. An image whose levels first differ here (not ``flagged``
    yet) must differ only where ``near_of(rows)`` (the float64 reference of the block, run
    on just those images) finds a pre-activation near a threshold. Returns ``flagged`` with
    this quantizer's differing images added."""
    wrong = diff.reshape(len(diff), -1).any(axis=1)
    rows = np.flatnonzero(wrong & ~flagged)
    if len(rows):
        for i, near in zip(rows, near_of(torch.from_numpy(rows))):
            assert not (diff[i] & ~near).any(), f"{what}, image {i}: a level differs away from any threshold"
    return flagged | wrong
