"""SD3 / SD3.5: an MMDiT flow transformer, CLIP-L + CLIP-G + T5-XXL. Recognised, not runnable yet."""

from __future__ import annotations

from core.models.families import _ldm
from core.models.family import Component, FlowSampling, Match, ModelFamily, Shapes

_MARKER = "joint_blocks.0.context_block.attn.qkv.weight"


def detect(shapes: Shapes) -> Match | None:
    p = _ldm.UNET_PREFIX
    if p + _MARKER in shapes or p + "x_embedder.proj.weight" in shapes:
        return Match("base", prediction="flow")
    return None


def detect_bare(shapes: Shapes) -> Match | None:
    if _MARKER in shapes:
        return Match("transformer_only", prediction="flow", prefixes={"unet": ""})
    return None


FAMILY = ModelFamily(
    name="sd3",
    label="SD3",
    order=60,
    components=(
        Component("unet", _ldm.UNET_PREFIX),
        Component("text_encoder", "text_encoders.clip_l.transformer."),
        Component("text_encoder_2", "text_encoders.clip_g.transformer."),
        Component("text_encoder_3", "text_encoders.t5xxl.transformer."),
        Component("vae", _ldm.VAE_PREFIX),
    ),
    detect=detect,
    detect_bare=detect_bare,
    detect_priority=60,
    sampling=FlowSampling(multiplier=1000.0),
    pixel_multiple=16,
    default_size=(1024, 1024),
    takes_presets=False,
)
