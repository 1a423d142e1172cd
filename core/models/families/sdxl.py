"""SDXL base: CLIP ViT-L and OpenCLIP bigG text encoders, size conditioning, 1024 px, VAE scale 0.13025.

Recognised, not runnable yet: the UNet and VAE configurations exist; the bigG encoder and the conditioner
are to come (issue 10 item 4).
"""

from __future__ import annotations

from core.models.families import _ldm
from core.models.family import Component, LatentFormat, Match, ModelFamily, Shapes

RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
RGB_BIAS = (0.1084, -0.0175, -0.0011)
SCALE = 0.13025

AYS_LEVELS = (
    14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
    0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582,
)  # fmt: skip


def detect(shapes: Shapes) -> Match | None:
    variant = _ldm.ldm_variant(shapes)
    if variant is None:
        return None
    if _ldm.UNET_PREFIX + "label_emb.0.0.weight" in shapes or "conditioner.embedders.1.model.ln_final.weight" in shapes:
        return Match(variant)
    return None


LATENT = LatentFormat("sdxl", 4, SCALE, 0.0, RGB_FACTORS, RGB_BIAS)
HEADS = {"num_heads": None, "head_dim": 64, "use_linear_in_transformer": True}

FAMILY = ModelFamily(
    name="sdxl",
    label="SDXL",
    order=30,
    components=(
        _ldm.unet(
            {"channel_mult": (1, 2, 4), "transformer_depth": (0, 2, 10), "transformer_depth_middle": 10,
             "context_dim": 2048, **HEADS,
             "adm_in_channels": 2816},  # pooled bigG 1280 + 6 x 256 Fourier size/crop features
            {"model_channels": 64, "channel_mult": (1, 2), "num_res_blocks": 1, "transformer_depth": (0, 2),
             "transformer_depth_middle": 2, "context_dim": 32, **HEADS, "adm_in_channels": 48},
        ),
        Component("text_encoder", "conditioner.embedders.0.transformer."),
        Component("text_encoder_2", "conditioner.embedders.1.model."),
        _ldm.vae(LATENT),
    ),
    detect=detect,
    detect_priority=30,
    latent=LATENT,
    default_size=(1024, 1024),
    ays_levels=AYS_LEVELS,
)
