"""Bringing images of any size and channel count to the uint8 (N, 3, 32, 32) layout."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
_CHUNK = 4096  # images resized at a time, to bound the float32 working memory


def resize_to_uint8(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Bilinear resize of float images ``(N, C, H, W)`` holding values in [0, 255] to
    ``(N, C, size, size)`` uint8: ``round(clamp(bilinear(x), 0, 255))``.

    ``align_corners=False`` (pixel centres map to pixel centres). Shrinking uses the
    antialiased kernel, so a downscaled image averages its pixels instead of sampling them
    (aliasing); growing uses the plain bilinear kernel.
    """
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x.round().clamp_(0, 255).to(torch.uint8)
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    antialias = h > size or w > size
    for i in range(0, n, _CHUNK):
        chunk = F.interpolate(x[i:i + _CHUNK].float(), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=antialias)
        out[i:i + _CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def to_rgb32(x: np.ndarray) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` with C in {1, 3} -> contiguous uint8
    ``(N, 3, 32, 32)``: resized (bilinear) when not 32x32, grey repeated to 3 channels."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    if tuple(t.shape[2:]) != (SIZE, SIZE):
        t = resize_to_uint8(t, SIZE)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()
