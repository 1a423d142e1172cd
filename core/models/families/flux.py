"""Flux.1 (dev, schnell, fill): a rectified-flow transformer, CLIP-L + T5-XXL, a 16-channel VAE.

Recognised, not runnable yet; its VAE configuration and latent format exist.
"""

from __future__ import annotations

from core.models.families import _ldm
from core.models.family import Component, FlowSampling, LatentFormat, Match, ModelFamily, Shapes

_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"

RGB_FACTORS = (
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


def detect(shapes: Shapes) -> Match | None:
    p = _ldm.UNET_PREFIX
    if p + _MARKER not in shapes:
        return None
    img_in = (*shapes.get(p + "img_in.weight", (0, 64)), 0, 64)[1]
    if img_in != 64:
        variant = "fill" if img_in == 384 else f"in{img_in}"
    else:
        variant = "dev" if p + "guidance_in.in_layer.weight" in shapes else "schnell"
    return Match(variant, prediction="flow")


def detect_bare(shapes: Shapes) -> Match | None:
    """BFL's release: the transformer alone, no prefix (text encoders and VAE are separate files)."""
    if _MARKER not in shapes:
        return None
    variant = "dev" if "guidance_in.in_layer.weight" in shapes else "schnell"
    return Match(variant, prediction="flow", prefixes={"unet": ""}, notes=("transformer only",))


LATENT = LatentFormat("flux", 16, 0.3611, 0.1159, RGB_FACTORS, (-0.0329, -0.0718, -0.0851))

FAMILY = ModelFamily(
    name="flux",
    label="Flux.1",
    order=50,
    components=(
        Component("unet", _ldm.UNET_PREFIX),
        Component("text_encoder", "text_encoders.clip_l.transformer."),
        Component("text_encoder_2", "text_encoders.t5xxl.transformer."),
        _ldm.vae(LATENT, prefix="vae.", quant_conv=False),
    ),
    detect=detect,
    detect_bare=detect_bare,
    detect_priority=50,
    latent=LATENT,
    sampling=FlowSampling(),
    pixel_multiple=16,  # 8x VAE, then 2x2 patches
    default_size=(1024, 1024),
    lora_keys="core.lora.flux_keys:lora_keys",
)
