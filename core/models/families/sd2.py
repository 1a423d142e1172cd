"""SD2.x (512-base eps and 768-v v-prediction): OpenCLIP ViT-H text encoder, SD1.x's VAE and latent space.

Recognised, not runnable yet: the UNet and VAE configurations exist, the OpenCLIP text encoder does not.
"""

from __future__ import annotations

from core.models.families import _ldm, sd15
from core.models.family import Component, LatentFormat, Match, ModelFamily, Reader, Shapes

TEXT_ENCODER_PREFIX = "cond_stage_model.model."
_OPENCLIP_QKV = TEXT_ENCODER_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
_V_BIAS = _ldm.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def detect(shapes: Shapes) -> Match | None:
    variant = _ldm.ldm_variant(shapes)
    if variant is None:
        return None
    context = _ldm.context_dim(shapes)
    if context == 1024 or shapes.get(_OPENCLIP_QKV, (0, 0))[1:2] == (1024,):
        return Match(variant)
    if _ldm.has_prefix(shapes, TEXT_ENCODER_PREFIX) and not _ldm.has_prefix(shapes, sd15.TEXT_ENCODER_PREFIX):
        note = f"cross-attention context dim {context}; SD2.x by its OpenCLIP text encoder keys"
        return Match(variant, notes=(note,), sure=False)
    return None


def guess_prediction(shapes: Shapes, read: Reader) -> tuple[str, tuple[str, ...]]:
    """SD2.x 768-v and 512-base share every shape; the v models' last norm bias is visibly wider."""
    if read is not None and _V_BIAS in shapes and (shapes[_V_BIAS] or (0,))[0] > 1:
        std = float(read(_V_BIAS).float().std())
        return ("v" if std > 0.09 else "eps"), (f"v-prediction guessed from std {std:.3f} of {_V_BIAS} (v if > 0.09)",)
    return "v", ("SD2.x prediction type not checked; assumed v (the 768 models)",)


LATENT = LatentFormat("sd2", 4, sd15.SCALE, 0.0, sd15.RGB_FACTORS, (0.0, 0.0, 0.0))
_HEADS = {"num_heads": None, "head_dim": 64, "use_linear_in_transformer": True}

FAMILY = ModelFamily(
    name="sd2",
    label="SD2.x",
    order=20,
    components=(
        _ldm.unet(
            {"context_dim": 1024, **_HEADS},
            {"model_channels": 64, "channel_mult": (1, 2), "num_res_blocks": 1, "transformer_depth": (1, 1),
             "context_dim": 32, **_HEADS},
        ),
        Component("text_encoder", TEXT_ENCODER_PREFIX),
        _ldm.vae(LATENT),
    ),
    detect=detect,
    detect_priority=20,
    guess_prediction=guess_prediction,
    latent=LATENT,
    default_size=(768, 768),
    ays_levels=sd15.AYS_LEVELS,  # SD2.x shares SD1.x's noise schedule
    takes_presets=False,  # no SD2.x presets until SD2.x runs
)
