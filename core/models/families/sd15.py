"""SD1.x (Stable Diffusion 1.4/1.5 and their fine-tunes): CLIP ViT-L/14 text encoder, eps prediction, 512 px.

Configurations: runwayml/stable-diffusion-v1-5 ``unet``/``text_encoder``/``vae`` config.json; the tiny ones
keep the wiring at a few MB (two UNet levels keep down/upsampling and skips, widths stay multiples of the 32
norm groups; the tiny CLIP keeps the real vocabulary so the real tokenizer drives it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core.lora import keymap
from core.models.families import _ldm
from core.models.family import LatentFormat, Match, ModelFamily, Shapes

TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Latent preview fit (numeric data from ComfyUI comfy/latent_formats.py; shared/reference
# previews-and-metadata.md §2). SD2.x shares the VAE, the latent space and so this fit.
RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SCALE = 0.18215  # diffusers' default scaling_factor; the SD1.x/2.x VAE configs do not set it

# Align Your Steps (Sabour et al. 2024; shared/reference sampling.md §3), SD1.x levels.
AYS_LEVELS = (
    14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
    0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582,
)  # fmt: skip


def detect(shapes: Shapes) -> Match | None:
    variant = _ldm.ldm_variant(shapes)
    if variant is None:
        return None
    context = _ldm.context_dim(shapes)
    if context == 768:
        return Match(variant)
    if _ldm.has_prefix(shapes, TEXT_ENCODER_PREFIX):
        # Scaled-down test models and odd fine-tunes: the text encoder layout still says SD1.x.
        note = f"cross-attention context dim {context}; SD1.x by its CLIP text encoder keys"
        return Match(variant, notes=(note,), sure=False)
    return None


# How LoRAs for SD1.x name our modules. kohya trains SD1.x on the diffusers UNet, so its files use diffusers
# block names (lora_unet_down_blocks_0_attentions_0_proj_in); some tools write the LDM ones
# (lora_unet_input_blocks_1_1_proj_in): both are accepted. The text encoder is HF CLIP under lora_te_.
LORA_SPELLINGS = {
    "unet": keymap.Spellings(
        flat=("lora_unet_",),
        dotted=("unet.", "diffusion_model.", "model.diffusion_model.", ""),
        aliases=keymap.ldm_unet_aliases,
    ),
    "text_encoder": keymap.Spellings(
        flat=("lora_te_",),
        dotted=("text_encoder.", "cond_stage_model.transformer.", ""),
    ),
}


def lora_keys(modules: Mapping[str, Sequence[str]]) -> dict[str, keymap.Target]:
    """LoRA module name (kohya or PEFT spelling, LDM or diffusers block names) -> our module (see
    ``core.lora.keymap``)."""
    return keymap.table(modules, LORA_SPELLINGS)


LATENT = LatentFormat("sd15", 4, SCALE, 0.0, RGB_FACTORS, (0.0, 0.0, 0.0))

FAMILY = ModelFamily(
    name="sd15",
    label="SD1.x",
    order=10,
    components=(
        _ldm.unet(
            {},
            {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "transformer_depth": (1, 1),
             "context_dim": 32},
        ),
        # openai/clip-vit-large-patch14; its projection_dim is unused by CLIPTextModel and SD1.x files carry
        # no text_projection.
        _ldm.clip("text_encoder", TEXT_ENCODER_PREFIX, {}, {"width": 32, "layers": 2, "heads": 2,
                                                            "intermediate": 37}),
        _ldm.vae(LATENT),
    ),
    detect=detect,
    detect_priority=10,
    latent=LATENT,
    conditioner="core.models.prompt:CLIPConditioner",
    default_size=(512, 512),
    # 512-based, as A1111 users pick them (portrait 512x768 is SD1.5's usual), and 768x768 for fine-tunes
    sizes=((512, 512), (512, 768), (768, 512), (576, 448), (448, 576), (768, 768)),
    ays_levels=AYS_LEVELS,
    presets=("sd15-balanced", "sd15-fast-ays", "sd15-fast-deepcache", "sd15-hires", "sd15-lcm-4step", "sd15-lcm-lora"),
    request_fields=("prediction",),
    lora_keys="core.models.families.sd15:lora_keys",
)
