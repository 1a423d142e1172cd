"""Z-Image (Turbo and Base, Tongyi-MAI): a single-stream rectified-flow DiT, Qwen3-4B as its text encoder and the
16-channel Flux.1 VAE.

Components: the DiT (``core.models.zimage``, ComfyUI's names, configuration read off the shapes), Qwen3-4B with
Hugging Face names (``core.models.qwen3``; its ``hidden_states[-2]`` of the prompt's real tokens,
``core.models.zimage_conditioner``) and Flux.1's LDM VAE (Z-Image uses its ``ae.safetensors``).

Files: ComfyUI's split set (``diffusion_models/z_image_turbo_bf16.safetensors``, no prefix, ``detect_bare``;
``text_encoders/qwen_3_4b.safetensors``; ``vae/ae.safetensors``; fp8 and GGUF copies of the first two, the GGUF
DiT with architecture ``lumina2`` as ComfyUI-GGUF writes it) and all-in-one checkpoints
(``model.diffusion_model.``, ``text_encoders.qwen3_4b.transformer.``, ``vae.``). The marker
is the caption embedder with the block modulation as the FIRST module of ``adaLN_modulation`` (diffusers' own
check): Lumina 2, the same NextDiT lineage, has ``cap_embedder`` too but ``adaLN_modulation.1`` after a SiLU.
Turbo and Base share one layout and are not told apart by keys: the presets ``z-image-turbo`` and ``z-image-base``
carry their settings.

Sampling (Z-Image-Turbo scheduler_config.json, ``ZImagePipeline``): flow matching with the static shift 3.0 (no
dynamic shift), the DiT's timestep is ``1 - sigma`` and its output the negative velocity (``LatentZImage``).
CFG: the pipeline's ``pred = pos + g (pos - neg)`` is our ``cfg = g + 1``, off when ``g = 0`` (cfg 1, Turbo: no
negative pass); the defaults ``cfg_truncation = 1.0`` and ``cfg_normalization = False`` change nothing, so
plain CFG is the pipeline's. A job that leaves them out gets Turbo's 8 steps and cfg 1.
"""

from __future__ import annotations

from core.models.families import _ldm
from core.models.families.flux import LATENT as FLUX_LATENT
from core.models.family import Component, FlowSampling, LatentFormat, Match, ModelFamily, Shapes

_CAPTION = "cap_embedder.1.weight"
_MODULATION = "layers.0.adaLN_modulation.0.weight"
TEXT_ENCODER_PREFIX = "text_encoders.qwen3_4b.transformer."

# The same latent space as Flux.1 (Z-Image uses Flux.1's ae.safetensors): scale, shift and preview fit.
LATENT = LatentFormat("zimage", 16, FLUX_LATENT.scale, FLUX_LATENT.shift, FLUX_LATENT.rgb_factors,
                      FLUX_LATENT.rgb_bias)


def _is_zimage(shapes: Shapes, prefix: str) -> bool:
    caption = shapes.get(prefix + _CAPTION)
    return caption is not None and len(caption) == 2 and prefix + _MODULATION in shapes


def detect(shapes: Shapes) -> Match | None:
    if _is_zimage(shapes, _ldm.UNET_PREFIX):
        return Match("base", prediction="flow")
    return None


def detect_bare(shapes: Shapes) -> Match | None:
    """ComfyUI's split diffusion-model file: the transformer alone, no prefix."""
    if _is_zimage(shapes, ""):
        return Match("base", prediction="flow", prefixes={"unet": ""}, notes=("transformer only",))
    return None


FAMILY = ModelFamily(
    name="zimage",
    label="Z-Image",
    order=70,
    components=(
        Component(
            "unet", _ldm.UNET_PREFIX, "core.models.zimage:ZImageConfig", "core.models.zimage:ZImageTransformer",
            presets={
                "full": {},  # Tongyi-MAI/Z-Image-Turbo transformer/config.json
                "tiny": {"dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "ffn_dim": 170,
                         "cap_feat_dim": 32, "axes_dims": (4, 6, 6)},
            },
            title="transformer",
        ),
        Component(
            "text_encoder", TEXT_ENCODER_PREFIX, "core.models.qwen3:Qwen3Config", "core.models.qwen3:Qwen3",
            presets={
                "full": {},  # Qwen3-4B
                "tiny": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
            },
            part="qwen3_4b",  # ComfyUI's qwen_3_4b.safetensors
        ),
        _ldm.vae(LATENT, prefix="vae.", quant_conv=False),
    ),
    detect=detect,
    detect_bare=detect_bare,
    detect_priority=55,
    latent=LATENT,
    sampling=FlowSampling(shift=3.0, adapter="core.models.zimage:LatentZImage"),
    conditioner="core.models.zimage_conditioner:ZImageConditioner",
    pixel_multiple=16,  # 8x VAE, then 2x2 patches
    default_size=(1024, 1024),
    presets=("z-image-turbo", "z-image-base"),
    request_defaults={"cfg": 1.0, "steps": 8},  # Turbo's (the Z-Image people run); z-image-base has its own
    prompt_weights=False,
    ignored_fields=("clip_skip",),  # the second-to-last Qwen3 layer is fixed (ZImagePipeline, ComfyUI)
    lora_keys="core.lora.zimage_keys:lora_keys",
)
