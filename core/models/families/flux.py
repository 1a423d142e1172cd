"""Flux.1 (dev, schnell, fill): a rectified-flow transformer, CLIP-L + T5-XXL, a 16-channel VAE.

Components (ComfyUI's combined single-file layout; a split set names the same keys relative to each file's
prefix): the BFL transformer (``core.models.flux``, configuration read off the shapes, dev = ``guidance_in``
present), CLIP-L with HF names (``vector_in`` takes its pooled output, unprojected), T5-XXL v1.1
(``core.models.t5``) and the LDM VAE without quant_conv. The conditioner (``core.models.flux_conditioner``)
pads T5 to 512 tokens for dev and 256 for schnell, as BFL's ``cli.py``.

Sampling: flow matching; dev shifts its sigmas by the resolution (diffusers' ``use_dynamic_shifting`` with
FLUX.1-dev's scheduler_config.json: base_shift 0.5, max_shift 1.15, 256..4096 tokens), schnell does not (its
config: shift 1.0, no dynamic shift). Distilled guidance 3.5 by default (dev only; BFL and Forge), real CFG
off (``cfg`` 1) unless a job asks for it.
"""

from __future__ import annotations

from core.models.families import _ldm
from core.models.family import Component, DynamicShift, FlowSampling, LatentFormat, Match, ModelFamily, Shapes

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

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5XXL_PREFIX = "text_encoders.t5xxl.transformer."
# The tiny transformer's text widths match the tiny CLIP-L (32) and T5 (32); heads 32 wide like the real 128
# in proportion (RoPE axes 4/14/14 of 32, as 16/56/56 of 128).
TRANSFORMER_TINY = {"vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "num_heads": 2, "depth": 2,
                    "depth_single_blocks": 2, "axes_dim": (4, 14, 14)}  # fmt: skip
CLIP_L_TINY = {"width": 32, "layers": 2, "heads": 2, "intermediate": 37}
T5_TINY = {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4}

FAMILY = ModelFamily(
    name="flux",
    label="Flux.1",
    order=50,
    components=(
        Component("unet", _ldm.UNET_PREFIX, "core.models.flux:FluxConfig", "core.models.flux:Flux",
                  presets={"full": {}, "tiny": TRANSFORMER_TINY}, title="transformer"),
        Component("text_encoder", CLIP_L_PREFIX, *_ldm.CLIP, presets={"full": {}, "tiny": CLIP_L_TINY},
                  part="clip_l"),  # openai/clip-vit-large-patch14
        Component("text_encoder_2", T5XXL_PREFIX, "core.models.t5:T5Config", "core.models.t5:T5EncoderModel",
                  presets={"full": {}, "tiny": T5_TINY}, part="t5xxl"),  # google/t5-v1_1-xxl
        _ldm.vae(LATENT, prefix="vae.", quant_conv=False),
    ),
    detect=detect,
    detect_bare=detect_bare,
    detect_priority=50,
    latent=LATENT,
    sampling=FlowSampling(
        dynamic_shift=DynamicShift(), static_variants=("schnell",), adapter="core.models.flux:LatentFlux",
        guidance=3.5,
    ),
    conditioner="core.models.flux_conditioner:FluxConditioner",
    pixel_multiple=16,  # 8x VAE, then 2x2 patches
    default_size=(1024, 1024),
    presets=("flux-dev", "flux-schnell"),
    request_fields=("guidance",),
    request_defaults={"cfg": 1.0},
    prompt_weights=False,
    ignored_fields=("clip_skip",),  # T5 and CLIP-L's pooled output: no clip skip (as Forge)  # distilled guidance does the guiding: no negative pass (Forge's CFG 1)
    lora_keys="core.lora.flux_keys:lora_keys",
)
