"""FLUX.2 [klein] (4B and 9B; dev's shapes are recognised): a rectified-flow transformer with shared modulation,
a Qwen3 text encoder, the 32-channel FLUX.2 VAE patchified to a 128-channel latent space.

Told apart by keys, never by name: FLUX.2 files carry Flux.1's QK-norm marker too, so this family is asked first
and claims a file by its shared modulation (``single_stream_modulation``, ``double_stream_modulation_img``), which
Flux.1 (per-block ``img_mod``) never has. Z-Image (``cap_embedder``), SD3 (``joint_blocks``) and Lumina 2 share
none of these keys. The variant is the transformer's width (klein 4B 3072, 9B 4096, dev 6144).

Components (BFL / Comfy-Org split files: ``flux-2-klein-4b.safetensors`` in ``diffusion_models``,
``qwen_3_4b.safetensors`` in ``text_encoders``, ``flux2-vae.safetensors`` in ``vae``; an all-in-one file keeps
them under ``model.diffusion_model.``, ``text_encoders.qwen3_4b.transformer.`` (9B: ``qwen3_8b``) and ``vae.``):
the BFL transformer (``core.models.flux2``), Qwen3 with HF names (``core.models.qwen3``; the 9B takes the 8B,
``Component.variant_parts``), the FLUX.2 VAE (``core.models.flux2_vae``) whose normalised, patchified latent is
the model space (scale 1, shift 0, 16 pixels per cell). The conditioner is ``core.models.flux2_conditioner``.

Sampling as ``Flux2KleinPipeline``: flow matching, one token per latent cell (``patch`` 1), the empirical shift
of the token count and step count (``EmpiricalShift``), the velocity from the transformer with sigma as its
timestep. Distilled klein runs 4 steps without CFG (preset ``flux2-klein``); base klein, which the keys cannot
tell from it, 50 steps at CFG 4 against the empty prompt (``flux2-klein-base``). dev (Mistral text encoder) is
recognised; its Mistral text encoder is not supported (the conditioner says so by the widths).
"""

from __future__ import annotations

from core.models.families import _ldm
from core.models.family import (
    Component,
    EmpiricalShift,
    FlowSampling,
    LatentFormat,
    Match,
    ModelFamily,
    Shapes,
)

_MARKERS = ("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight")
# hidden width (img_in rows) -> release; klein 4B: 24 x 128, 9B: 32 x 128, dev: 48 x 128
_VARIANTS = {3072: "klein-4b", 4096: "klein-9b", 6144: "dev"}
TEXT_ENCODER_PREFIX = "text_encoders.qwen3_4b.transformer."
TEXT_ENCODER_PREFIX_8B = "text_encoders.qwen3_8b.transformer."

# ComfyUI's latent_formats.Flux2 preview fit (facts only): one RGB row per channel of the 32-channel VAE latent,
# applied after unpatchifying. Our previews stay at one pixel per 128-channel cell, so channel 4c + 2i + j (pixel
# (i, j) of channel c's 2x2 patch) gets a quarter of row c: the cell's colour is the mean of its four pixels'.
_RGB_32 = (
    (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644), (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160), (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666), (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080), (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127), (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142), (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025), (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609), (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
)
RGB_FACTORS = tuple(tuple(v / 4 for v in row) for row in _RGB_32 for _ in range(4))
RGB_BIAS = (-0.0329, -0.0718, -0.0851)

LATENT = LatentFormat("flux2", 128, 1.0, 0.0, RGB_FACTORS, RGB_BIAS, downscale=16, vae_channels=32)


def _variant(shapes: Shapes, prefix: str) -> str:
    if prefix + "guidance_in.in_layer.weight" in shapes:
        return "dev"  # guidance-distilled; klein has no guidance embedder
    hidden = (*shapes.get(prefix + "img_in.weight", ()), 0)[0]
    return _VARIANTS.get(hidden, f"d{hidden}")


def detect(shapes: Shapes) -> Match | None:
    p = _ldm.UNET_PREFIX
    if not any(p + m in shapes for m in _MARKERS):
        return None
    variant = _variant(shapes, p)
    # an all-in-one 9B file names its encoder after Qwen3-8B
    eight = any(k.startswith(TEXT_ENCODER_PREFIX_8B) for k in shapes)
    prefixes = {**FAMILY_PREFIXES, "text_encoder": TEXT_ENCODER_PREFIX_8B} if eight else None
    return Match(variant, prediction="flow", prefixes=prefixes)


def detect_bare(shapes: Shapes) -> Match | None:
    """BFL's release and the Comfy-Org split file: the transformer alone, no prefix."""
    if not any(m in shapes for m in _MARKERS):
        return None
    return Match(_variant(shapes, ""), prediction="flow", prefixes={"unet": ""}, notes=("transformer only",))


# The tiny transformer reads 3 x a 32-wide Qwen3 (96) and keeps the real 128 latent channels; the tiny Qwen3 has
# 28 layers so that hidden states 9, 18 and 27 exist, as in the 36-layer real one.
TRANSFORMER_TINY = {"context_in_dim": 96, "hidden_size": 64, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
                    "axes_dim": (4, 4, 4, 4)}  # fmt: skip
QWEN3_TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 28, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
VAE_TINY = {"ch": 32, "ch_mult": (1, 1, 2, 2), "decoder_ch": 32, "num_res_blocks": 1}

FAMILY = ModelFamily(
    name="flux2",
    label="FLUX.2",
    order=55,
    components=(
        Component("unet", _ldm.UNET_PREFIX, "core.models.flux2:Flux2Config", "core.models.flux2:Flux2",
                  presets={"full": {}, "tiny": TRANSFORMER_TINY}, title="transformer"),  # full: klein 4B
        Component("text_encoder", TEXT_ENCODER_PREFIX, "core.models.qwen3:Qwen3Config", "core.models.qwen3:Qwen3",
                  presets={"full": {}, "tiny": QWEN3_TINY}, part="qwen3_4b",
                  variant_parts={"klein-9b": "qwen3_8b"}),  # Qwen3-4B; klein 9B: Qwen3-8B
        Component("vae", "vae.", "core.models.flux2_vae:Flux2VAEConfig", "core.models.flux2_vae:Flux2AutoencoderKL",
                  presets={"full": {}, "tiny": VAE_TINY}, folders=("vae",), part="flux2_vae"),
    ),
    detect=detect,
    detect_bare=detect_bare,
    detect_priority=55,  # before Flux.1 (50), whose marker key FLUX.2 files also have
    latent=LATENT,
    sampling=FlowSampling(dynamic_shift=EmpiricalShift(), patch=1, adapter="core.models.flux2:LatentFlux2"),
    conditioner="core.models.flux2_conditioner:Flux2KleinConditioner",
    pixel_multiple=16,  # 8x VAE, then 2x2 patches
    default_size=(1024, 1024),
    presets=("flux2-klein", "flux2-klein-base"),
    request_defaults={"cfg": 1.0, "steps": 4},  # distilled klein (the common download): 4 steps, no CFG
    prompt_weights=False,
    ignored_fields=("clip_skip",),  # Qwen3 hidden states of fixed layers: no clip skip
    lora_keys="core.lora.flux2_keys:lora_keys",
)
FAMILY_PREFIXES = FAMILY.prefixes
