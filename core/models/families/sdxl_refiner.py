"""SDXL refiner: OpenCLIP bigG only, aesthetic-score conditioning (2560), SDXL's latent space.

Configurations: stabilityai/stable-diffusion-xl-refiner-1.0 ``unet``/``text_encoder_2``/``vae`` config.json.
Used as the second model of an SDXL job (request fields ``refiner``, ``refiner_switch``); it can also run a
job alone, as in A1111. The tiny configuration: bigG 128 wide, context 128, y = 128 + 5 x 8 = 168.
"""

from __future__ import annotations

from core.models.families import _ldm, sdxl
from core.models.family import LatentFormat, Match, ModelFamily, Shapes

BIG_G_PREFIX = "conditioner.embedders.0.model."


def detect(shapes: Shapes) -> Match | None:
    variant = _ldm.ldm_variant(shapes)
    if variant is None:
        return None
    label = shapes.get(_ldm.UNET_PREFIX + "label_emb.0.0.weight")
    if label is not None and label[1:2] == (2560,) or BIG_G_PREFIX + "ln_final.weight" in shapes:
        return Match(variant)
    return None


LATENT = LatentFormat("sdxl_refiner", 4, sdxl.SCALE, 0.0, sdxl.RGB_FACTORS, sdxl.RGB_BIAS)

FAMILY = ModelFamily(
    name="sdxl_refiner",
    label="SDXL refiner",
    order=40,
    components=(
        _ldm.unet(
            {"model_channels": 384, "transformer_depth": (0, 4, 4, 0), "transformer_depth_middle": 4,
             "context_dim": 1280, **sdxl.HEADS,
             "adm_in_channels": 2560},  # pooled bigG 1280 + 5 x 256 (size, crop, aesthetic score)
            {"model_channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "transformer_depth": (0, 1, 0),
             "transformer_depth_middle": 1, "context_dim": 128, **sdxl.HEADS, "adm_in_channels": 168},
        ),
        sdxl.big_g(BIG_G_PREFIX),
        _ldm.vae(LATENT),
    ),
    detect=detect,
    detect_priority=40,  # before SDXL: a refiner has SDXL's label_emb too
    latent=LATENT,
    conditioner="core.models.sdxl_conditioner:SDXLRefinerConditioner",
    default_size=(1024, 1024),
    takes_presets=False,  # a refiner is a second model of an SDXL job, not a preset target
    request_fields=("prediction",),
)
