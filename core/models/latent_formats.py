"""Per-family latent spaces and the cheap latent -> RGB preview.

A VAE's raw latent ``z`` is moved into the *model space* the denoiser works in by ``(z - shift) * scale``
(SD1.x/SD2.x: z * 0.18215, SDXL: z * 0.13025, Flux.1: (z - 0.1159) * 0.3611). Samplers hand previews the
denoised prediction x0 in that model space, and the preview is a per-pixel linear map of it:

    rgb[h, w] = sum_c x0[c, h, w] * F[c] + b,  clamp to [-1, 1],  (v + 1) * 127.5,  round,  uint8

at latent resolution (64x64 for a 512x512 SD1.5 image). ``F`` (channels x 3) and ``b`` are fitted tables
(numeric data from ComfyUI ``comfy/latent_formats.py``; see shared/reference/previews-and-metadata.md §2).
The map is one small matmul, so it can run every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import RequestError


@dataclass(frozen=True)
class LatentFormat:
    """How one model family's latents look: channel count, VAE scale/shift and the RGB preview fit."""

    family: str
    channels: int
    scale: float
    shift: float
    rgb_factors: tuple[tuple[float, float, float], ...]  # [channels][R, G, B]
    rgb_bias: tuple[float, float, float]

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the space the denoiser (and the preview) works in."""
        return (z - self.shift) * self.scale

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latent -> raw VAE latent, ready for the decoder."""
        return x / self.scale + self.shift


_SD15_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)

_FLUX_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)

# SD2.x shares SD1.x's VAE and latent space, so it shares the preview fit too.
FORMATS: dict[str, LatentFormat] = {
    "sd15": LatentFormat("sd15", 4, 0.18215, 0.0, _SD15_FACTORS, (0.0, 0.0, 0.0)),
    "sd2": LatentFormat("sd2", 4, 0.18215, 0.0, _SD15_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": LatentFormat("sdxl", 4, 0.13025, 0.0, _SDXL_FACTORS, (0.1084, -0.0175, -0.0011)),
    "flux": LatentFormat("flux", 16, 0.3611, 0.1159, _FLUX_FACTORS, (-0.0329, -0.0718, -0.0851)),
}


def latent_format(family: str) -> LatentFormat:
    """The latent format of ``family`` ("sd15", "sd2", "sdxl", "flux")."""
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
