"""The numba kernels: the popcount convolution and the float first layer compiled to
machine code, fused with thresholding, max-pooling and packing of the next layer's input.
They compute the same integers as the numpy reference in `kernels` (the tests check it);
layouts and the accumulator formula are in its docstring.

Numba is optional: without it this module defines only ``HAVE_NUMBA = False`` and the
engine runs the numpy kernels.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

try:
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # numba is optional: the numpy kernels compute the same values
    numba = None

HAVE_NUMBA = numba is not None

NOTICE_AFTER = 2.0  # seconds: a first call with cached kernels takes a fraction of this
NOTICE = "qdistill: compiling the engine's numba kernels, once per install (about half a minute on 2 cores)"
_noticed = []  # non-empty once a process's first engine call has ended


@contextlib.contextmanager
def compiling_notice(numba_backend: bool = True):
    """Around a process's first engine call: numba compiles the kernels there unless its
    cache (beside this file, or numba's user-wide one) holds them, about 25 s on 2 cores
    instead of a fraction of a second. If the call is still running after `NOTICE_AFTER`
    seconds, one line on a terminal's stderr says why it is silent."""
    if _noticed or not (HAVE_NUMBA and numba_backend) or not sys.stderr.isatty():
        yield
        return
    timer = threading.Timer(NOTICE_AFTER, lambda: print(NOTICE, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _noticed.append(True)

if HAVE_NUMBA:
    @intrinsic
    def _popc(typingctx, v):
        """LLVM's ``ctpop``: one instruction (vectorised when the CPU has it)."""
        sig = types.int64(types.uint64)

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])
        return sig, codegen

    @njit(inline="always")
    def _columns(x, b, y0, kh, cin, col):
        """``col[i, x]`` = the column string of plane ``i`` at input column ``x`` over input
        rows ``y0 .. y0 + kh - 1``: bit ``ky * cin + c`` is channel ``c`` of row ``y0 + ky``.
        Each input word's place in the string is worked out once per row, not per column."""
        a, wd, cw = x.shape[3], x.shape[4], col.shape[2]
        col[:, :, :] = 0
        for ky in range(kh):
            for s in range(wd):
                off = ky * cin + 64 * s
                d = off >> 6
                sh = np.uint64(off & 63)
                back = np.uint64(64 - (off & 63))
                carry = (off & 63) != 0 and d + 1 < cw  # the word straddles two string words
                for i in range(a):
                    for xx in range(x.shape[2]):
                        v = x[b, y0 + ky, xx, i, s]
                        col[i, xx, d] |= v << sh
                        if carry:
                            col[i, xx, d + 1] |= v >> back

    @njit(inline="always")
    def _row_columns(x, b, y0, kh, kw, cin, wq):
        """`_columns` of input rows ``y0 .. y0 + kh - 1`` in a new array, as ``wq``'s columns."""
        col = np.empty((x.shape[3], x.shape[2], wq.shape[1] // kw), np.uint64)
        _columns(x, b, y0, kh, cin, col)
        return col

    @njit(inline="always")
    def _dot(col, x0, kw, wq, acc):
        """Fill ``acc[o]`` with ``sum_ij 2^(i+j) popcount(x_i & c_j)`` over the field whose
        columns are ``col[:, x0 : x0 + kw]`` and return ``sum_i 2^i popcount(x_i)``."""
        k, _, o = wq.shape
        cw = col.shape[2]
        acc[:] = 0
        ones = 0
        for i in range(col.shape[0]):
            for kx in range(kw):
                for s in range(cw):
                    xv = col[i, x0 + kx, s]
                    if xv == 0:
                        continue
                    w = kx * cw + s
                    ones += _popc(xv) << i
                    if k == 2:  # W2, the common case: one pass over acc for both planes
                        r0, r1 = wq[0, w], wq[1, w]
                        for oc in range(o):
                            acc[oc] += (_popc(xv & r0[oc]) + (_popc(xv & r1[oc]) << 1)) << i
                    else:
                        for j in range(k):
                            sh = i + j
                            row = wq[j, w]
                            for oc in range(o):
                                acc[oc] += _popc(xv & row[oc]) << sh
        return ones

    @njit(inline="always")
    def _levels_max(v, sign, thr, count, lv):
        """``lv = max(lv, #{t : sign * v >= thr[t]})`` per channel (max: the pool window).
        Channels are the inner loop everywhere, so it vectorises; one threshold (1-bit
        activations, the common case) takes one pass."""
        o = v.shape[0]
        if thr.shape[0] == 1:
            for oc in range(o):
                s = v.dtype.type(v[oc] * sign[oc])  # in v's type, as the general path stores it
                lv[oc] = max(lv[oc], np.uint8(s >= thr[0, oc]))
            return
        for oc in range(o):
            v[oc] = v[oc] * sign[oc]
            count[oc] = 0
        for t in range(thr.shape[0]):
            for oc in range(o):
                count[oc] += np.uint8(v[oc] >= thr[t, oc])  # a uint8 count, as lv: no widening
        for oc in range(o):
            lv[oc] = max(lv[oc], count[oc])

    _BYTE_LSB = np.uint64(0x0101010101010101)
    _GATHER = np.uint64(0x0102040810204080)  # sum_k 2^(56 - 7k): byte k's low bit to bit 56 + k

    @njit(inline="always")
    def _emit(lv, lv8, want_l, want_p, out_l, out_p, b, yq, xq, bits, pad):
        """Write one position's levels: as they are, packed into the next layer's planes, or
        both. ``lv`` has room for a multiple of 8 channels, zero past the last; ``lv8`` is
        ``lv`` seen as words (``lv.view(np.uint64)``). Plane ``i`` packs 8 channels at a time:
        bit ``i`` of each of a word's 8 bytes, masked, is gathered into one byte by a
        multiplication (the product's terms share no bit, so nothing carries)."""
        if want_p:
            for i in range(bits):
                for w in range(out_p.shape[4]):
                    word = np.uint64(0)
                    for k in range(min(8, lv8.shape[0] - 8 * w)):
                        g = (lv8[8 * w + k] >> np.uint64(i)) & _BYTE_LSB
                        word |= ((g * _GATHER) >> np.uint64(56)) << np.uint64(8 * k)
                    out_p[b, yq + pad, xq + pad, i, w] = word
        if want_l:
            for oc in range(out_l.shape[3]):
                out_l[b, yq, xq, oc] = lv[oc]

    @njit(inline="always")
    def _room(o):
        """Levels' room for ``o`` channels: a multiple of 8 (see `_emit`)."""
        return (o + 7) // 8 * 8

    @njit(cache=True)  # not inlined: in a parallel kernel each np.zeros would be a parallel region of its own
    def _outputs(n, hq, wq, o, bits, want_l, want_p, pad):
        if want_l:
            out_l = np.zeros((n, hq, wq, o), np.uint8)
        else:
            out_l = np.zeros((1, 1, 1, 1), np.uint8)
        if want_p:
            out_p = np.zeros((n, hq + 2 * pad, wq + 2 * pad, bits, (o + 63) // 64), np.uint64)
        else:
            out_p = np.zeros((1, 1, 1, 1, 1), np.uint64)
        return out_l, out_p

    @njit(parallel=True, cache=True)
    def accumulate(x, wq, nw, kh, kw, cin, stride, mul, add):
        """``A * mul + add`` per channel in float64 (``A`` the int32 accumulator; ``mul = 1``,
        ``add = 0`` give ``A`` itself, exactly)."""
        n = x.shape[0]
        o = wq.shape[2]
        ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
        out = np.empty((n, ho, wo, o), np.float64)
        for r in prange(n * ho):
            b = r // ho
            y = r - b * ho
            acc = np.empty(o, np.int64)
            col = _row_columns(x, b, y * stride, kh, kw, cin, wq)
            for xx in range(wo):
                ones = _dot(col, xx * stride, kw, wq, acc)
                for oc in range(o):
                    out[b, y, xx, oc] = np.int32(2 * acc[oc] - nw * ones) * mul[oc] + add[oc]
        return out

    @njit(parallel=True, cache=True)
    def conv_packed(x, wq, nw, kh, kw, cin, thr, sign, pool, bits, want_l, want_p, pad, stride):
        n = x.shape[0]
        o = wq.shape[2]
        hq = ((x.shape[1] - kh) // stride + 1) // pool
        wq_ = ((x.shape[2] - kw) // stride + 1) // pool
        out_l, out_p = _outputs(n, hq, wq_, o, bits, want_l, want_p, pad)
        for r in prange(n * hq):
            b = r // hq
            yq = r - b * hq
            acc = np.empty(o, np.int64)
            v = np.empty(o, np.int32)  # A, as the thresholds' type (int32: the format's accumulator)
            count = np.empty(o, np.uint8)
            lv = np.zeros(_room(o), np.uint8)
            lv8 = lv.view(np.uint64)
            cols = np.empty((pool, x.shape[3], x.shape[2], wq.shape[1] // kw), np.uint64)
            for dy in range(pool):
                _columns(x, b, (yq * pool + dy) * stride, kh, cin, cols[dy])
            for xq in range(wq_):
                for oc in range(o):
                    lv[oc] = 0
                for dy in range(pool):
                    for dx in range(pool):
                        ones = _dot(cols[dy], (xq * pool + dx) * stride, kw, wq, acc)
                        if thr.shape[0] == 1:
                            for oc in range(o):
                                a = np.int32(np.int32(2 * acc[oc] - nw * ones) * sign[oc])
                                lv[oc] = max(lv[oc], np.uint8(a >= thr[0, oc]))
                        else:
                            for oc in range(o):
                                v[oc] = np.int32(2 * acc[oc] - nw * ones)
                            _levels_max(v, sign, thr, count, lv)
                _emit(lv, lv8, want_l, want_p, out_l, out_p, b, yq, xq, bits, pad)
        return out_l, out_p

    @njit(parallel=True, cache=True)
    def conv_add_quant(x, res_f, res_l, wq, nw, kh, kw, cin, stride, mul, add, table, levels_res, thr, sign,
                       bits, want_l, want_p, pad):
        """`kernels.conv_add_quant`: ``v = (A * mul + add) + r`` in float64, then thresholds."""
        n = x.shape[0]
        o = wq.shape[2]
        ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
        out_l, out_p = _outputs(n, ho, wo, o, bits, want_l, want_p, pad)
        for r in prange(n * ho):
            b = r // ho
            y = r - b * ho
            acc = np.empty(o, np.int64)
            v = np.empty(o, np.float64)
            count = np.empty(o, np.uint8)
            lv = np.zeros(_room(o), np.uint8)
            lv8 = lv.view(np.uint64)
            col = _row_columns(x, b, y * stride, kh, kw, cin, wq)
            for xx in range(wo):
                ones = _dot(col, xx * stride, kw, wq, acc)
                if levels_res:  # one pass over the channels: v, then its level
                    for oc in range(o):
                        v[oc] = ((2 * acc[oc] - nw * ones) * mul[oc] + add[oc]) + table[res_l[b, y, xx, oc]]
                else:
                    for oc in range(o):
                        v[oc] = ((2 * acc[oc] - nw * ones) * mul[oc] + add[oc]) + res_f[b, y, xx, oc]
                for oc in range(o):
                    lv[oc] = 0
                _levels_max(v, sign, thr, count, lv)
                _emit(lv, lv8, want_l, want_p, out_l, out_p, b, y, xx, bits, pad)
        return out_l, out_p

    @njit(inline="always")
    def _conv_row(x, wt, b, y, stride, pad, acc, src):
        """One output row of the float conv of ``x`` zero-padded by ``pad``:
        ``acc[oc, xx] += w * x`` over ``c, ky, kx`` in that order (bias already in ``acc``);
        x is the vector loop. A row of taps' inputs is first copied to the buffer ``src``
        ``(kw, wo)`` (zeros where a tap reads the padding): LLVM vectorises the loop only over
        arrays it knows apart. Three taps a row (the common 3 x 3 kernel) go in one pass, in
        order. A tap whose row is all padding adds only zeros and is skipped: ``v + 0`` is
        ``v`` (or a zero of the other sign, which compares the same)."""
        c, kh, kw, o = wt.shape
        h, w = x.shape[2], x.shape[3]
        wo = acc.shape[1]
        for ci in range(c):
            for ky in range(kh):
                yy = y + ky - pad
                if yy < 0 or yy >= h:
                    continue
                for kx in range(kw):
                    for xx in range(wo):
                        xi = xx * stride + kx - pad
                        src[kx, xx] = x[b, ci, yy, xi] if 0 <= xi < w else np.float32(0)
                if kw == 3:
                    s0, s1, s2 = src[0], src[1], src[2]
                    for oc in range(o):
                        w0, w1, w2 = wt[ci, ky, 0, oc], wt[ci, ky, 1, oc], wt[ci, ky, 2, oc]
                        for xx in range(wo):
                            acc[oc, xx] = ((acc[oc, xx] + w0 * s0[xx]) + w1 * s1[xx]) + w2 * s2[xx]
                    continue
                for kx in range(kw):
                    for oc in range(o):
                        wv = wt[ci, ky, kx, oc]
                        for xx in range(wo):
                            acc[oc, xx] += wv * src[kx, xx]

    @njit(parallel=True, cache=True)
    def conv_float(x, wt, bias, pad_in, thr, sign, pool, bits, want_l, want_p, pad, stride):
        """``x`` unpadded, read as if zero-padded by ``pad_in``; ``thr``: float32 ``(T, O)``
        bounds for ``sign * v`` (see `kernels.float32_bounds`)."""
        n, c = x.shape[0], x.shape[1]
        hp, wpix = x.shape[2] + 2 * pad_in, x.shape[3] + 2 * pad_in
        _, kh, kw, o = wt.shape
        wo = (wpix - kw) // stride + 1
        hq, wq = ((hp - kh) // stride + 1) // pool, wo // pool
        out_l, out_p = _outputs(n, hq, wq, o, bits, want_l, want_p, pad)
        for r in prange(n * hq):
            b = r // hq
            yq = r - b * hq
            acc = np.empty((o, wo), np.float32)  # one output row; x is the vector loop
            src = np.empty((kw, wo), np.float32)
            count = np.empty(wo, np.uint8)
            lv = np.zeros((wq, _room(o)), np.uint8)
            lv8 = lv.view(np.uint64)
            for dy in range(pool):
                for oc in range(o):
                    acc[oc, :] = bias[oc]
                _conv_row(x, wt, b, (yq * pool + dy) * stride, stride, pad_in, acc, src)
                for oc in range(o):
                    s = sign[oc]
                    row = acc[oc]
                    count[:] = 0
                    for t in range(thr.shape[0]):
                        bound = thr[t, oc]
                        for xx in range(wo):
                            count[xx] += s * row[xx] >= bound
                    for xq in range(wq):
                        m = lv[xq, oc]
                        for dx in range(pool):
                            m = max(m, count[xq * pool + dx])
                        lv[xq, oc] = m
            for xq in range(wq):
                _emit(lv[xq], lv8[xq], want_l, want_p, out_l, out_p, b, yq, xq, bits, pad)
        return out_l, out_p
