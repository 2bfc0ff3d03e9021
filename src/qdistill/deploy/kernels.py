"""Inference kernels: bit-plane popcount convolution, threshold activation, max-pool,
bit packing, and the float first layer. The numpy reference kernels live here, the numba
versions (used where numpy is too slow) in `numba_kernels`; both compute the same
integers (the tests check it). The dispatch functions pick one by ``backend``.

Layouts (N images, channels last so one position's channels are contiguous):

* levels ``L``: ``uint8 (N, H, W, C)``, the integer activation levels ``0..2**a-1``.
* packed activations ``X``: ``uint64 (N, H + 2p, W + 2p, a, ceil(C/64))``, bit ``c % 64``
  of word ``c // 64`` in plane ``i`` is bit ``i`` of ``L[..., c]``; the border of width
  ``p`` is zero, i.e. level 0, which is what zero padding of ``L / (2**a - 1)`` gives.
* packed weight rows ``Wq``: ``uint64 (k, KW * cw, O)``, ``cw = ceil(KH*C/64)``: the
  receptive field of output channel ``o`` as ``KW`` column strings of ``cw`` words each,
  bit ``ky*C + c`` of column ``kx`` in plane ``j`` being bit ``j`` of the weight code at
  ``[o, c, ky, kx]``. A conv reads the same column strings of activations (an im2col on
  bits, `_im2col_np`); neighbouring output positions share columns, so the numba kernels
  build each input column once per output row and read a position's field in place.

Accumulator of a conv with weights ``w = alpha * (2c - n)`` on levels ``q``::

    A = sum q * (2c - n) = 2 * sum_ij 2^(i+j) popcount(x_i & c_j) - n * sum_i 2^i popcount(x_i)

(sums over the words of the receptive field). Bits past the end of the field are zero in
both ``x`` and ``c``, and so is the zero border, so they add nothing to either sum.
"""
from __future__ import annotations

import numpy as np

from . import numba_kernels as nb
from .numba_kernels import HAVE_NUMBA

BACKENDS = ("numba", "numpy") if HAVE_NUMBA else ("numpy",)


def words(channels: int) -> int:
    return (channels + 63) // 64


# ---------------------------------------------------------------- numpy reference

if hasattr(np, "bitwise_count"):
    def popcount(a: np.ndarray) -> np.ndarray:
        return np.bitwise_count(a)
else:  # numpy < 2.0
    _BYTE_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def popcount(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.uint64)
        return _BYTE_COUNTS[a.view(np.uint8)].reshape(a.shape + (8,)).sum(-1, dtype=np.uint8)


def _pack_np(levels: np.ndarray, bits: int, pad: int) -> np.ndarray:
    n, h, w, c = levels.shape
    wd = words(c)
    planes = (levels[:, :, :, None, :] >> np.arange(bits, dtype=np.uint8)[:, None]) & 1
    planes = np.pad(planes, ((0, 0), (pad, pad), (pad, pad), (0, 0), (0, wd * 64 - c)))
    packed = np.packbits(planes, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def _im2col_np(x: np.ndarray, kh: int, kw: int, cin: int, stride: int = 1) -> np.ndarray:
    """The receptive field of every output position (every ``stride``-th) as packed bits
    ``(N, Ho, Wo, a, KW * cw)``, in the bit order of `weight_rows`."""
    lv = unpack(x, cin, 0)
    n = lv.shape[0]
    win = np.lib.stride_tricks.sliding_window_view(lv, (kh, kw), axis=(1, 2))  # N Ho Wo C KH KW
    win = win[:, ::stride, ::stride]
    ho, wo = win.shape[1:3]
    cols = win.transpose(0, 1, 2, 5, 4, 3).reshape(n, ho, wo * kw, kh * cin)  # one column per row
    packed = _pack_np(np.ascontiguousarray(cols), x.shape[3], 0)  # N Ho Wo*KW a cw
    a, cw = x.shape[3], words(kh * cin)
    packed = packed.reshape(n, ho, wo, kw, a, cw).transpose(0, 1, 2, 4, 3, 5)
    return np.ascontiguousarray(packed).reshape(n, ho, wo, a, kw * cw)


def _acc_np(x: np.ndarray, wq: np.ndarray, nw: int, kh: int, kw: int, cin: int, stride: int = 1) -> np.ndarray:
    cols = _im2col_np(x, kh, kw, cin, stride)
    k, _, o = wq.shape
    out = np.empty(cols.shape[:3] + (o,), np.int32)
    for s in range(0, len(cols), 8):  # chunks bound the (n, y, x, words, O) temporaries
        xs = cols[s:s + 8]
        dot = np.zeros(xs.shape[:3] + (o,), np.int64)
        ones = np.zeros(xs.shape[:3], np.int64)
        for i in range(xs.shape[3]):
            xi = xs[:, :, :, i, :, None]
            ones += popcount(xi).sum((-2, -1), dtype=np.int64) << i
            for j in range(k):
                dot += popcount(xi & wq[j]).sum(-2, dtype=np.int64) << (i + j)
        out[s:s + 8] = 2 * dot - nw * ones[..., None]
    return out


def _threshold_np(v: np.ndarray, thr: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """``level = #{t : sign * v >= thr[t]}`` per channel (the last axis of ``v``);
    ``thr`` is ``(T, channels)``."""
    signed = v.astype(np.float64) * sign
    return (signed[..., None, :] >= thr).sum(-2).astype(np.uint8)


def maxpool(levels: np.ndarray, k: int) -> np.ndarray:
    """``k x k`` max-pool, stride ``k``, of channels-last maps (floor mode, as torch)."""
    if k == 1:
        return levels
    n, h, w, c = levels.shape
    h2, w2 = h // k, w // k
    return levels[:, :h2 * k, :w2 * k].reshape(n, h2, k, w2, k, c).max(axis=(2, 4))


def unpack(x: np.ndarray, channels: int, pad: int) -> np.ndarray:
    """Inverse of `pack`: levels ``uint8 (N, H, W, channels)`` without the border."""
    n, hp, wp, bits, wd = x.shape
    raw = np.ascontiguousarray(x[:, pad:hp - pad, pad:wp - pad]).astype("<u8").view(np.uint8)
    planes = np.unpackbits(raw.reshape(n, hp - 2 * pad, wp - 2 * pad, bits, wd * 8), axis=-1,
                           count=channels, bitorder="little")
    return (planes << np.arange(bits, dtype=np.uint8)[:, None]).sum(-2, dtype=np.uint8)


def _emit_np(levels: np.ndarray, bits: int, out_pad: int | None, both: bool = False):
    if out_pad is None:
        return levels
    packed = _pack_np(levels, bits, out_pad)
    return (levels, packed) if both else packed


def _conv_packed_np(x, wq, nw, kh, kw, cin, thr, sign, pool, out_bits, out_pad, stride, both):
    levels = maxpool(_threshold_np(_acc_np(x, wq, nw, kh, kw, cin, stride), thr, sign), pool)
    return _emit_np(levels, out_bits, out_pad, both)


def _conv_float_np(x: np.ndarray, wt: np.ndarray, bias: np.ndarray, stride: int = 1) -> np.ndarray:
    """Float conv of a padded ``(N, C, H, W)`` input, channels-last output. Summed in the
    numba kernel's order (bias, then over ``c, ky, kx``, float32 multiply then add), so both
    backends round alike and give the same levels."""
    c, kh, kw, o = wt.shape
    n, _, hp, wp = x.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    acc = np.empty((n, o, ho, wo), np.float32)
    acc[:] = bias[None, :, None, None]
    ys, xs = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    for ci in range(c):
        for ky in range(kh):
            for kx in range(kw):
                acc += wt[ci, ky, kx][None, :, None, None] * x[:, ci:ci + 1, ky:ky + ys:stride, kx:kx + xs:stride]
    return acc.transpose(0, 2, 3, 1)


def _conv_float_levels_np(x, wt, bias, thr, sign, pool, out_bits, out_pad, stride, both):
    levels = maxpool(_threshold_np(_conv_float_np(x, wt, bias, stride), thr, sign), pool)
    return _emit_np(levels, out_bits, out_pad, both)


def _residual_np(x, wq, nw, kh, kw, cin, stride, mul, add, res, table, thr, sign):
    v = _acc_np(x, wq, nw, kh, kw, cin, stride) * mul + add
    v = v + (table[res] if res.dtype == np.uint8 else res)
    return _threshold_np(v, thr, sign)


# ---------------------------------------------------------------- dispatch

def pack(levels: np.ndarray, bits: int, pad: int) -> np.ndarray:
    """Packed activations ``X`` (see the module docstring) of ``levels`` with a zero
    border of width ``pad``."""
    return _pack_np(np.ascontiguousarray(levels, dtype=np.uint8), bits, pad)


def weight_rows(planes: np.ndarray, in_channels: int) -> np.ndarray:
    """Weight bit-planes from the file layout ``uint8 (k, O, KH, KW, ceil(C/8))`` (see
    `qdz.pack_codes`) to the kernel layout ``Wq`` ``uint64 (k, KW * cw, O)``."""
    k, o, kh, kw, _ = planes.shape
    bits = np.unpackbits(planes, axis=-1, count=in_channels, bitorder="little")  # k O KH KW C
    columns = bits.transpose(0, 1, 3, 2, 4).reshape(k, o, kw, kh * in_channels)
    cw = words(kh * in_channels)
    columns = np.pad(columns, ((0, 0), (0, 0), (0, 0), (0, cw * 64 - kh * in_channels)))
    rows = np.packbits(columns, axis=-1, bitorder="little").view("<u8").astype(np.uint64)  # k O KW cw
    return np.ascontiguousarray(rows.reshape(k, o, kw * cw).transpose(0, 2, 1))


def accumulate(x: np.ndarray, wq: np.ndarray, nw: int, kh: int, kw: int, cin: int,
               backend: str, stride: int = 1) -> np.ndarray:
    """The integer accumulator ``A`` ``int32 (N, Ho, Wo, O)`` of a valid ``kh x kw`` conv with
    ``stride`` of packed (already bordered) activations ``x`` with ``cin`` channels and packed
    weight rows ``wq`` (code offset ``nw``): ``Ho = (H + 2p - kh) // stride + 1``."""
    if backend == "numba":
        o = wq.shape[2]
        return conv_affine(x, wq, nw, kh, kw, cin, np.ones(o), np.zeros(o), backend, stride).astype(np.int32)
    return _acc_np(x, wq, nw, kh, kw, cin, stride)


def conv_affine(x, wq, nw, kh, kw, cin, mul, add, backend, stride=1) -> np.ndarray:
    """``A * mul + add`` per channel in float64, ``A`` as in `accumulate` (a conv with float output)."""
    if backend == "numba":
        return nb.accumulate(_contiguous(x), wq, nw, kh, kw, cin, stride, mul, add)
    return _acc_np(x, wq, nw, kh, kw, cin, stride) * mul + add


def _contiguous(a: np.ndarray, dtype=None) -> np.ndarray:
    """``a`` in C order (a copy where it is a view with a cut border): numba compiles a
    kernel once per argument layout, some 10 CPU-s each, so every call passes one layout."""
    return np.ascontiguousarray(a, dtype)


def _chosen(out_l, out_p, out_pad, both):
    """A kernel's result: levels, packed levels, or both (``(levels, packed)``)."""
    if out_pad is None:
        return out_l
    return (out_l, out_p) if both else out_p


def _picking(call, out_pad, both):
    """``call`` (a numba kernel's ``(levels, packed)``) cut down to what `_chosen` returns."""
    return lambda *xs: _chosen(*call(*xs), out_pad, both)


def conv_packed(x, wq, nw, kh, kw, cin, thr, sign, pool, out_bits, out_pad, backend, stride=1, both=False):
    """Levels of a packed conv, ``level = #{t : sign * A >= thr[t]}`` per channel (``thr``
    is ``(T, O)``), max-pooled ``pool x pool`` (1: none); returned as levels
    ``(N, Ho, Wo, O)`` when ``out_pad`` is None, else packed with a border ``out_pad``
    for the next conv (``both``: the pair ``(levels, packed)``)."""
    return conv_packed_fn(wq, nw, kh, kw, cin, thr, sign, pool, out_bits, out_pad, backend, stride, both)(x)


def conv_packed_fn(wq, nw, kh, kw, cin, thr, sign, pool, out_bits, out_pad, backend, stride=1, both=False):
    """`conv_packed` with everything but its input fixed: ``f(x)``. The engine makes one per
    layer when it loads, so that a call spends no Python on its arguments (1-3 us a layer,
    about 5% of resnet20's batch-1 time on the AMD EPYC of docs/performance.md)."""
    if backend != "numba":
        return lambda x: _conv_packed_np(x, wq, nw, kh, kw, cin, thr, sign, pool, out_bits, out_pad, stride, both)
    packed, kernel = out_pad is not None, nb.conv_packed
    args = (wq, nw, kh, kw, cin, thr, sign, pool, out_bits, not packed or both, packed, out_pad or 0, stride)
    return _picking(lambda x: kernel(_contiguous(x), *args), out_pad, both)


_NO_FLOATS, _NO_LEVELS = np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), np.uint8)  # the residual not given


def conv_add_quant(x, wq, nw, kh, kw, cin, stride, mul, add, res, table, thr, sign, out_bits, out_pad,
                   both, backend):
    """A residual block's tail in one pass: ``v = (A * mul + add) + r`` per channel in
    float64 (``A`` the packed conv's accumulator; ``r = res`` float64 ``(N, Ho, Wo, O)``, or
    ``r = table[res]`` for levels ``res`` uint8, ``table[q]`` the value of level ``q``), then
    ``level = #{t : sign * v >= thr[t]}`` (float64 ``thr`` ``(T, O)``); output as in
    `conv_packed`. The unfused stages (conv with float output, add, quant) compute the same
    float64 operations in the same order, so both give the same levels."""
    return conv_add_quant_fn(wq, nw, kh, kw, cin, stride, mul, add, table, thr, sign, out_bits, out_pad, both,
                             backend, res.dtype == np.uint8)(x, res)


def conv_add_quant_fn(wq, nw, kh, kw, cin, stride, mul, add, table, thr, sign, out_bits, out_pad, both, backend,
                      levels_res):
    """`conv_add_quant` with everything but its inputs fixed: ``f(x, res)``, ``res`` levels
    if ``levels_res``, else floats (see `conv_packed_fn`)."""
    if backend != "numba":
        def call(x, res):
            levels = _residual_np(x, wq, nw, kh, kw, cin, stride, mul, add, res, table, thr, sign)
            return _emit_np(levels, out_bits, out_pad, both)
        return call
    packed, kernel = out_pad is not None, nb.conv_add_quant
    args = (wq, nw, kh, kw, cin, stride, mul, add, table, levels_res, thr, np.asarray(sign, np.float64), out_bits,
            not packed or both, packed, out_pad or 0)
    if levels_res:
        return _picking(lambda x, res: kernel(_contiguous(x), _NO_FLOATS, _contiguous(res), *args), out_pad, both)
    return _picking(lambda x, res: kernel(_contiguous(x), _contiguous(res, np.float64), _NO_LEVELS, *args),
                    out_pad, both)


def float32_bounds(thr: np.ndarray) -> np.ndarray:
    """The smallest float32 ``>= thr`` (float64): for a float32 ``v``, ``v >= thr`` exactly
    when ``v >= float32_bounds(thr)``, so the comparison can run in float32."""
    b = thr.astype(np.float32)
    below = b.astype(np.float64) < thr
    return np.where(below, np.nextafter(b, np.float32(np.inf)), b).astype(np.float32)


def conv_float(x, wt, bias, pad, thr, sign, pool, out_bits, out_pad, backend, thr32=None, stride=1, both=False):
    """Levels of a float conv (input ``(N, C, H, W)``, weights ``(C, KH, KW, O)``, zero
    padding ``pad``, ``stride``): ``v = conv(x) + bias`` in float32,
    ``level = #{t : sign * v >= thr[t]}`` (``thr`` float64 ``(T, O)``;
    ``thr32 = float32_bounds(thr)`` if precomputed), max-pooled; output as in `conv_packed`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend == "numba":  # pads as it reads
        packed = out_pad is not None
        thr32 = float32_bounds(thr) if thr32 is None else thr32
        out_l, out_p = nb.conv_float(x, wt, bias, pad, thr32, sign.astype(np.float32), pool, out_bits,
                                      not packed or both, packed, out_pad or 0, stride)
        return _chosen(out_l, out_p, out_pad, both)
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return _conv_float_levels_np(x, wt, bias, thr, sign, pool, out_bits, out_pad, stride, both)


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, C, H, W)`` to ``size x size``, with the semantics of
    torch's ``F.interpolate(mode="bilinear", align_corners=False)``: output pixel ``d``
    samples source coordinate ``s = max(0, (d + 0.5) * H / size - 0.5)``, between rows
    ``floor(s)`` and ``min(floor(s) + 1, H - 1)`` with weights ``1 - l`` and ``l``,
    ``l = s - floor(s)``; computed in float32 in torch's order
    ``h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)``. It agrees with torch to
    float32 rounding (~1e-7, up to ~1e-6), not bit for bit: torch's kernel lets the
    compiler fuse multiply-adds depending on the CPU's instruction set."""
    def axis(n_in):
        scale = np.float32(n_in / size)
        s = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        s = np.maximum(s, np.float32(0))
        i0 = np.floor(s).astype(np.int64)
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        l1 = (s - i0.astype(np.float32)).astype(np.float32)
        return i0, i1, (np.float32(1) - l1).astype(np.float32), l1

    x = np.asarray(x, dtype=np.float32)
    y0, y1, hy0, hy1 = axis(x.shape[2])
    x0, x1, wx0, wx1 = axis(x.shape[3])
    rows0, rows1 = x[:, :, y0], x[:, :, y1]
    top = wx0 * rows0[..., x0] + wx1 * rows0[..., x1]
    bottom = wx0 * rows1[..., x0] + wx1 * rows1[..., x1]
    return (hy0[:, None] * top + hy1[:, None] * bottom).astype(np.float32)
