"""Light augmentation for digit images, batch-wise on tensors (no per-sample Python).

No horizontal flip: a mirrored digit is another glyph (or none).
"""
from __future__ import annotations

import torch

PAD = 2            # crop offsets 0..2*PAD, i.e. shifts of -2..+2 pixels
BRIGHTNESS = 0.2   # brightness factor b ~ U[0.8, 1.2]
CONTRAST = 0.2     # contrast factor c ~ U[0.8, 1.2]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without the host waiting for it: a CPU tensor goes to CUDA through
    pinned memory (a copy from pageable memory blocks until it is done)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment_light(x: torch.Tensor, generator: torch.Generator | None = None, *, pad: int = PAD,
                  brightness: float = BRIGHTNESS, contrast: float = CONTRAST) -> torch.Tensor:
    """Random crop with ``pad``-pixel padding, then brightness and contrast jitter, per image.

    For a float batch ``x`` ``(B, C, H, W)`` in [0, 1], each image ``i`` gets:

    * crop: ``s_i = replicate_pad(x_i, pad)[:, dy:dy+H, dx:dx+W]`` with ``dy, dx``
      uniform in ``0..2*pad``, i.e. ``s_i[c, h, w] = x_i[c, clamp(h+dy-pad), clamp(w+dx-pad)]``.
      Edge replication rather than zeros: SVHN digits sit on textured backgrounds, where a
      black border would be a cue of its own.
    * brightness ``b_i ~ U[1 - brightness, 1 + brightness]`` scales the image; contrast
      ``c_i ~ U[1 - contrast, 1 + contrast]`` scales its distance to its mean:
      ``out_i = clamp((b_i s_i - b_i m_i) c_i + b_i m_i, 0, 1)`` with ``m_i = mean(s_i)``
      over channels and pixels, computed as ``clamp(b_i c_i s_i + b_i (1 - c_i) m_i, 0, 1)``.

    Random numbers are drawn on the generator's device (CPU when ``None``, from the global
    generator) in the order dy, dx, then b, c, so a seeded CPU generator gives the same
    augmentation whichever device ``x`` is on. Returns a new tensor.
    """
    b_, c_, h, w = x.shape
    gdev = generator.device if generator is not None else torch.device("cpu")
    shifts = to_device(torch.randint(0, 2 * pad + 1, (2, b_), generator=generator, device=gdev), x.device)
    u = to_device(torch.rand((2, b_), generator=generator, device=gdev, dtype=torch.float32), x.device)
    if pad:
        # replicate padding is a clamp of the source coordinates: one gather, no padded copy
        rows = (torch.arange(h, device=x.device).view(1, h, 1) + (shifts[0] - pad).view(-1, 1, 1)).clamp_(0, h - 1)
        cols = (torch.arange(w, device=x.device).view(1, 1, w) + (shifts[1] - pad).view(-1, 1, 1)).clamp_(0, w - 1)
        src = (rows * w + cols).view(b_, 1, h * w).expand(b_, c_, h * w)
        x = x.reshape(b_, c_, h * w).gather(2, src).view(b_, c_, h, w)
    bright = 1.0 + brightness * (2.0 * u[0] - 1.0)
    con = 1.0 + contrast * (2.0 * u[1] - 1.0)
    m = x.mean(dim=(1, 2, 3))
    scale = (bright * con).to(x.dtype).view(-1, 1, 1, 1)
    shift = (bright * (1.0 - con) * m).to(x.dtype).view(-1, 1, 1, 1)
    return torch.addcmul(shift, x, scale).clamp_(0.0, 1.0)
