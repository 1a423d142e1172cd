"""Per-family latent spaces and the cheap latent -> RGB preview.

A VAE's raw latent ``z`` is moved into the *model space* the denoiser works in by ``(z - shift) * scale``
(SD1.x/SD2.x: z * 0.18215, SDXL: z * 0.13025, Flux.1: (z - 0.1159) * 0.3611). Samplers hand previews the
denoised prediction x0 in that model space, and the preview is a per-pixel linear map of it:

    rgb[h, w] = sum_c x0[c, h, w] * F[c] + b,  clamp to [-1, 1],  (v + 1) * 127.5,  round,  uint8

at latent resolution (64x64 for a 512x512 SD1.5 image). ``F`` (channels x 3) and ``b`` are fitted tables
(numeric data from ComfyUI ``comfy/latent_formats.py``; see shared/reference/previews-and-metadata.md §2).
The map is one small matmul, so it can run every step. Each family's format (``LatentFormat``) is part of
its module in ``core/models/families/``.
"""

from __future__ import annotations

import torch

from core.errors import RequestError
from core.models.families import FAMILIES
from core.models.family import LatentFormat

# Derived view, one entry per family that has a latent space; the data lives in each family's module.
FORMATS: dict[str, LatentFormat] = {name: f.latent for name, f in FAMILIES.items() if f.latent is not None}


def latent_format(family: str) -> LatentFormat:
    """The latent format of ``family`` ("sd15", "sd2", "sdxl", "flux", ...)."""
    try:
        return FORMATS[family]
    except (KeyError, TypeError):
        raise RequestError("model family", family, "one of " + ", ".join(FORMATS)) from None


# Factor/bias tensors per (family, device, dtype): building them costs more than the preview itself.
_tables: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _table(fmt: LatentFormat, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (fmt.family, device, dtype)
    if key not in _tables:
        factors = torch.tensor(fmt.rgb_factors, dtype=dtype, device=device)  # [C, 3]
        bias = torch.tensor(fmt.rgb_bias, dtype=dtype, device=device)  # [3]
        _tables[key] = (factors, bias)
    return _tables[key]


def latent_to_rgb(x0: torch.Tensor, family: str) -> torch.Tensor:
    """Model-space latent ``[C, h, w]`` or ``[B, C, h, w]`` -> uint8 RGB ``[h, w, 3]`` or ``[B, h, w, 3]``.

    Runs on the latent's device in fp32 (half-precision latents would round the sum before clamping) and
    returns a CPU tensor. Rounding is round-half-to-even (``torch.round``).
    """
    fmt = latent_format(family)
    if x0.dim() not in (3, 4) or x0.shape[-3] != fmt.channels:
        raise RequestError(
            "preview latent shape",
            tuple(x0.shape),
            f"[{fmt.channels}, h, w] or [batch, {fmt.channels}, h, w] for {family} "
            "(unpack Flux 2x2 tokens first)",
        )
    factors, bias = _table(fmt, x0.device, torch.float32)
    # Move channels last so the map is one [h*w, C] x [C, 3] matmul.
    rgb = x0.to(torch.float32).movedim(-3, -1) @ factors  # [..., h, w, 3]
    rgb = rgb.add_(bias).clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_()
    return rgb.to(torch.uint8).cpu()


def preview_image(x0: torch.Tensor, family: str, max_size: int | None = None):
    """PIL RGB image of a model-space latent (the first image of a batch), at latent resolution.

    ``max_size`` shrinks (never enlarges) it so that the longer side is at most ``max_size`` pixels.
    """
    from PIL import Image

    from core.tensor_bytes import rgb_image

    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise RequestError("preview max_size", max_size, "a positive number of pixels or nothing")
    rgb = latent_to_rgb(x0, family)
    if rgb.dim() == 4:
        rgb = rgb[0]
    image = rgb_image(rgb)
    if max_size is not None and max(image.size) > max_size:
        w, h = image.size
        ratio = max_size / max(w, h)
        image = image.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), Image.Resampling.BILINEAR)
    return image
