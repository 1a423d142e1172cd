"""Latent formats (scale/shift, channels) and the latent -> RGB preview rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import DarkroomError
from core.models.latent_formats import FORMATS, latent_format, latent_to_rgb, preview_image

CONFIGS = Path("/work/shared/data/model-configs")

# Independent transcription of previews-and-metadata.md §2 (SD1.5 has no bias; Flux channel 0 and bias only).
SD15 = [
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
]
SDXL_BIAS = (0.1084, -0.0175, -0.0011)
FLUX_BIAS = (-0.0329, -0.0718, -0.0851)


def _pixel(values, factors, bias=(0.0, 0.0, 0.0)):
    """The §1 rule for one pixel, in plain Python."""
    out = []
    for k in range(3):
        v = sum(x * f[k] for x, f in zip(values, factors)) + bias[k]
        v = min(1.0, max(-1.0, v))
        out.append(round((v + 1.0) * 127.5))
    return out


def test_hand_computed_pixels_sd15():
    # Channel one-hots pick out one factor row: (0.3512+1)*127.5 = 172.278 -> 172, and so on.
    assert _pixel([1, 0, 0, 0], SD15) == [172, 157, 169]
    pixels = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.5, -0.25, 0.75, -0.1],
        [-0.3, 0.6, 0.2, 0.4],
        [0.1, 0.2, 0.3, 0.4],
        [-1.0, 0.5, -0.5, 0.0],
    ]
    x0 = torch.tensor(pixels).T.reshape(4, 2, 3)  # [C, h=2, w=3], pixels in row-major order
    rgb = latent_to_rgb(x0, "sd15")
    assert rgb.dtype == torch.uint8 and rgb.shape == (2, 3, 3)
    expected = torch.tensor([_pixel(p, SD15) for p in pixels], dtype=torch.uint8).reshape(2, 3, 3)
    assert torch.equal(rgb, expected)
    assert rgb[0, 1].tolist() == [128, 128, 128]  # zero latent, no bias: round(127.5) = 128 (half to even)


def test_bias_is_added():
    zeros = torch.zeros(16, 1, 1)
    # (1 - 0.0329) * 127.5 = 123.30, (1 - 0.0718) * 127.5 = 118.35, (1 - 0.0851) * 127.5 = 116.65
    assert latent_to_rgb(zeros, "flux")[0, 0].tolist() == [123, 118, 117]
    assert latent_to_rgb(torch.zeros(4, 1, 1), "sdxl")[0, 0].tolist() == _pixel([0] * 4, SD15, SDXL_BIAS)
    assert _pixel([0] * 16, [(0, 0, 0)] * 16, FLUX_BIAS) == [123, 118, 117]


def test_clamps_to_valid_range():
    x0 = torch.zeros(4, 1, 2)
    x0[0, 0, 0] = 100.0  # every channel of row 0 is positive -> clamps to +1 -> 255
    x0[0, 0, 1] = -100.0
    rgb = latent_to_rgb(x0, "sd15")
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 0]


def test_batch_matches_single_images_and_dtypes():
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 4, 5, 7, generator=g)
    rgb = latent_to_rgb(batch, "sdxl")
    assert rgb.shape == (3, 5, 7, 3)
    for i in range(3):
        assert torch.equal(rgb[i], latent_to_rgb(batch[i], "sdxl"))
    # Half-precision latents are computed in fp32: differences of at most one level from fp16 input rounding.
    diff = (latent_to_rgb(batch.half(), "sdxl").int() - rgb.int()).abs().max()
    assert diff <= 1


def test_preview_image_size_mode_and_pixels():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 5, 9, generator=g)
    img = preview_image(x0, "sd15")
    assert img.mode == "RGB" and img.size == (9, 5)  # PIL size is (width, height)
    assert list(img.getpixel((8, 4))) == latent_to_rgb(x0, "sd15")[4, 8].tolist()
    # A batch previews its first image.
    batched = preview_image(torch.stack([x0, -x0]), "sd15")
    assert list(batched.getdata()) == list(img.getdata())
    # max_size shrinks (keeping aspect), never enlarges.
    big = preview_image(torch.randn(16, 64, 128, generator=g), "flux", max_size=32)
    assert big.size == (32, 16) and big.mode == "RGB"
    assert preview_image(x0, "sd15", max_size=512).size == (9, 5)


def test_bad_input_raises_darkroom_errors():
    with pytest.raises(DarkroomError, match="family"):
        latent_to_rgb(torch.zeros(4, 2, 2), "sd9")
    with pytest.raises(DarkroomError, match=r"\[16, h, w\]"):
        latent_to_rgb(torch.zeros(4, 2, 2), "flux")
    with pytest.raises(DarkroomError):
        latent_to_rgb(torch.zeros(4, 2), "sd15")
    with pytest.raises(DarkroomError, match="max_size"):
        preview_image(torch.zeros(4, 2, 2), "sd15", max_size=0)


@pytest.mark.parametrize(
    "family, config",
    [
        ("sd15", "runwayml/stable-diffusion-v1-5/vae/config.json"),
        ("sd2", "stabilityai/stable-diffusion-2-1/vae/config.json"),
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0/vae/config.json"),
        ("flux", "black-forest-labs/FLUX.1-dev/vae/config.json"),
    ],
)
def test_scale_shift_and_channels_match_real_vae_configs(family, config):
    cfg = json.loads((CONFIGS / config).read_text())
    fmt = latent_format(family)
    # SD1.x/SD2.x configs omit scaling_factor: the diffusers default 0.18215 applies.
    assert fmt.scale == cfg.get("scaling_factor", 0.18215)
    assert fmt.shift == (cfg.get("shift_factor") or 0.0)
    assert fmt.channels == cfg["latent_channels"] == len(fmt.rgb_factors)
    z = torch.randn(1, fmt.channels, 2, 2)
    assert torch.allclose(fmt.to_model_space(z), (z - fmt.shift) * fmt.scale)
    assert torch.allclose(fmt.from_model_space(fmt.to_model_space(z)), z, atol=1e-6)


def test_every_family_has_consistent_tables():
    for name, fmt in FORMATS.items():
        assert fmt.family == name
        assert all(len(row) == 3 for row in fmt.rgb_factors) and len(fmt.rgb_bias) == 3
    assert FORMATS["sd2"].rgb_factors == tuple(SD15)
