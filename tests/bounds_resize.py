"""The derived error bound of a bilinear resize (see `bounds` for the method), which
`bounds.Ref` uses for a resize; split from `bounds` to keep each file readable."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bounds import U32, U64, gamma


def _resize_axis(n_in: int, size: int):
    """Exact (float64) source coordinates of torch's ``align_corners=False`` resize and
    the float32 error bound of a computed coordinate ``max(0, (d + 0.5) * scale - 0.5)``:
    ``scale = fl(n_in / size)``, a product and a difference, <= 3 roundings on values
    ``<= (d + 0.5) * scale + 0.5``."""
    d = np.arange(size, dtype=np.float64)
    raw = (d + 0.5) * (n_in / size) - 0.5
    err = gamma(3, U32 + U64) * ((d + 0.5) * (n_in / size) + 0.5)
    # Within err of the exact coordinate the interpolant must stay one linear piece: no
    # integer (a cell edge) and not the clamp at 0 inside [raw - err, raw + err].
    assert (np.abs(raw - np.round(raw)) > err).all(), "a source coordinate sits on a cell edge: extend the bound"
    s = np.maximum(raw, 0.0)
    err = np.where(raw < 0, 0.0, err)  # clamped: exactly 0 in every implementation
    i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = s - i0
    err = np.where(i0 == i1, 0.0, err)  # past the last pixel the value is constant
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(lam), torch.from_numpy(err)


def resize_reference(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference, bound)``: torch's bilinear resize in float64 and a bound on any float32
    implementation of it. Per output, with ``x00..x11`` the four source pixels,
    ``e_y, e_x`` the coordinate errors (`_resize_axis`) and the exact weights:

        |y' - y| <= gamma_10 * max|x_ij|                      (rounding: 1 - l on each axis,
                                                               <= 2 weight products, 4 products
                                                               and 3 additions in any order)
                  + e_y |dy| + e_x |dx| + e_y e_x |x11 - x10 - x01 + x00|

    ``dy, dx`` the interpolant's slopes (the bilinear piece is exact in ``l``). The
    float64 reference's own error is covered by computing gamma with ``u32 + u64``."""
    x = x.double()
    n, c, h, w = x.shape
    y0, y1, ly, ey = _resize_axis(h, size)
    x0, x1, lx, ex = _resize_axis(w, size)
    ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    r0, r1 = x[:, :, y0], x[:, :, y1]
    x00, x01, x10, x11 = r0[..., x0], r0[..., x1], r1[..., x0], r1[..., x1]
    ly, ey = ly[:, None], ey[:, None]
    top, bottom = x00 + (x01 - x00) * lx, x10 + (x11 - x10) * lx
    dy = bottom - top
    dx = (x01 - x00) * (1 - ly) + (x11 - x10) * ly
    big = torch.stack([x00.abs(), x01.abs(), x10.abs(), x11.abs()]).amax(0)
    bound = (float(gamma(10, U32 + U64)) * big + ey * dy.abs() + ex * dx.abs()
             + ey * ex * (x11 - x10 - x01 + x00).abs())
    return ref, bound
