"""SDXL base: CLIP ViT-L and OpenCLIP bigG text encoders, size conditioning, 1024 px, VAE scale 0.13025.

Configurations: stabilityai/stable-diffusion-xl-base-1.0 ``unet``/``text_encoder``/``text_encoder_2``/``vae``
config.json. The conditioner (``core.models.sdxl_conditioner``) concatenates both encoders' penultimate
states (768 + 1280 = 2048) and builds the UNet's ``y``: bigG's projected pooled vector and six Fourier
features (original size, crop top-left, target size). The tiny configurations keep the wiring: CLIP-L 32
wide, bigG 128 wide (two 64-wide heads), context 160, 8-dim Fourier features (y = 128 + 6 x 8 = 176).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core.lora import keymap
from core.models.families import _ldm
from core.models.family import Component, LatentFormat, Match, ModelFamily, Shapes

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIG_G_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP = ("core.models.open_clip:OpenCLIPTextConfig", "core.models.open_clip:OpenCLIPTextModel")
BIG_G_TINY = {"width": 128, "layers": 3, "intermediate": 160, "projection_dim": 128}
CLIP_L_TINY = {"width": 32, "layers": 2, "heads": 2, "intermediate": 37}


def big_g(prefix: str) -> Component:
    """OpenCLIP ViT-bigG/14 (1280 wide, 32 blocks, projection 1280) with OpenCLIP's own key names."""
    return Component("text_encoder_2", prefix, *OPEN_CLIP, presets={"full": {}, "tiny": BIG_G_TINY})


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
    if _ldm.UNET_PREFIX + "label_emb.0.0.weight" in shapes or BIG_G_PREFIX + "ln_final.weight" in shapes:
        return Match(variant)
    return None


# How LoRAs for SDXL name our modules. kohya trains SDXL on its LDM UNet, so its files use LDM block names
# (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q); other trainers and diffusers/PEFT files use the
# diffusers ones (unet.down_blocks.1.attentions.0...): both are accepted. CLIP-L is lora_te1_ / text_encoder.,
# bigG lora_te2_ / text_encoder_2. in Hugging Face names, whose q/k/v land on OpenCLIP's packed in_proj.
LORA_SPELLINGS = {
    "unet": keymap.Spellings(
        flat=("lora_unet_",),
        dotted=("unet.", "diffusion_model.", "model.diffusion_model.", ""),
        aliases=keymap.ldm_unet_aliases,
    ),
    "text_encoder": keymap.Spellings(flat=("lora_te1_",), dotted=("text_encoder.", CLIP_L_PREFIX)),
    "text_encoder_2": keymap.Spellings(
        flat=("lora_te2_",),
        dotted=("text_encoder_2.", BIG_G_PREFIX),
        targets=keymap.open_clip_hf_targets,
    ),
}


def lora_keys(modules: Mapping[str, Sequence[str]]) -> dict[str, keymap.Target]:
    """LoRA module name (kohya or PEFT spelling, LDM or diffusers block names, HF or OpenCLIP text encoder
    names) -> our module (see ``core.lora.keymap``)."""
    return keymap.table(modules, LORA_SPELLINGS)


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
             "transformer_depth_middle": 2, "context_dim": 160, **HEADS, "adm_in_channels": 176},
        ),
        # openai/clip-vit-large-patch14 as in SD1.x (HF names under text_model.; no text_projection in the file)
        _ldm.clip("text_encoder", CLIP_L_PREFIX, {}, CLIP_L_TINY),
        big_g(BIG_G_PREFIX),
        _ldm.vae(LATENT),
    ),
    detect=detect,
    detect_priority=30,
    latent=LATENT,
    default_size=(1024, 1024),
    conditioner="core.models.sdxl_conditioner:SDXLConditioner",
    ays_levels=AYS_LEVELS,
    presets=("sdxl-balanced", "sdxl-fast-ays", "sdxl-fast-fbcache", "sdxl-hires", "sdxl-lcm-lora",
             "sdxl-lightning-4step"),
    request_fields=("prediction", "refiner", "refiner_switch"),
    lora_keys="core.models.families.sdxl:lora_keys",
)
