"""Pieces the latent-diffusion (LDM/SGM single-file) families share: key facts and component builders.

Not a family itself (the registry skips modules whose name starts with ``_``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.models.family import Component, LatentFormat, Shapes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

UNET = ("core.models.unet:UNetConfig", "core.models.unet:UNetModel")
CLIP = ("core.models.clip:CLIPTextConfig", "core.models.clip:CLIPTextModel")
VAE = ("core.models.vae:VAEConfig", "core.models.vae:AutoencoderKL")


def ldm_variant(shapes: Shapes) -> str | None:
    """base / inpaint / pix2pix from the UNet's input channels; None when there is no LDM UNet."""
    weight = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if weight is None or len(weight) < 2:
        return None
    return {4: "base", 9: "inpaint", 8: "pix2pix"}.get(weight[1], f"in{weight[1]}")


def context_dim(shapes: Shapes) -> int | None:
    """Width of the text conditioning the UNet's cross-attention takes (768 SD1.x, 1024 SD2.x, 2048 SDXL)."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("transformer_blocks.0.attn2.to_k.weight") and len(shape) > 1:
            return shape[1]
    return None


def has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def unet(full: Mapping[str, Any], tiny: Mapping[str, Any]) -> Component:
    return Component("unet", UNET_PREFIX, *UNET, presets={"full": full, "tiny": tiny})


def clip(role: str, prefix: str, full: Mapping[str, Any], tiny: Mapping[str, Any]) -> Component:
    """A text encoder stored with Hugging Face CLIP names (``text_model.*``) under ``prefix``."""
    return Component(role, prefix, *CLIP, presets={"full": full, "tiny": tiny})


def vae(latent: LatentFormat, *, prefix: str = VAE_PREFIX, quant_conv: bool = True) -> Component:
    """The LDM KL autoencoder of ``latent``'s space. "tiny" keeps four levels (still 8x down, so latent sizes
    match the real models') and the mid-block attention, at 32/32/64/64 channels and one res block per level."""
    full = {
        "z_channels": latent.channels,
        "use_quant_conv": quant_conv,
        "scaling_factor": latent.scale,
        "shift_factor": latent.shift,
    }
    tiny = {**full, "ch": 32, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1}
    part = {4: "sd_vae", 16: "flux_vae"}.get(latent.channels, "")
    return Component("vae", prefix, *VAE, presets={"full": full, "tiny": tiny}, folders=("vae",), part=part)
