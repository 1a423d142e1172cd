"""SD2.x (512-base eps and 768-v v-prediction): OpenCLIP ViT-H text encoder, SD1.x's VAE and latent space.

Configurations: stabilityai/stable-diffusion-2-1 ``unet``/``text_encoder``/``vae`` config.json. The text
encoder is OpenCLIP ViT-H/14 under ``cond_stage_model.model.`` with OpenCLIP names; real files carry all 24
blocks (and ``text_projection``, ``logit_scale``), SD2.x conditions on the penultimate block's output after
``ln_final`` (``core.models.open_clip_prompt``; diffusers' config drops the last block: 23 layers).

Prediction type: 768-v and 512-base have identical shapes. Detection guesses from tensor data (the width of
the last output block's first transformer norm bias, ComfyUI's rule) when it may read tensors (the loader
always does); a request's ``prediction = "eps" | "v"`` overrides the guess. Without tensor data the guess is
v, the 768 models being the common ones.

Sizes: 768 x 768 for v models, 512 x 512 for eps (the 512-base), each model's training size
(``default_size_for``). AYS: NVIDIA published no SD2.x levels; SD2.x shares SD1.x's noise schedule, so SD1.x's
levels are used, as ComfyUI's "SD1" choice does for SD2 models.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from core.models.families import _ldm, sd15
from core.models.family import Component, DiscreteSampling, LatentFormat, Match, ModelFamily, Reader, Shapes

TEXT_ENCODER_PREFIX = "cond_stage_model.model."
_OPENCLIP_QKV = TEXT_ENCODER_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
_V_BIAS = _ldm.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # in every real SD2.x file
_OUTPUT_NORM = re.compile(re.escape(_ldm.UNET_PREFIX) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")
V_STD_THRESHOLD = 0.09  # ComfyUI's rule: v-prediction if the bias' standard deviation is above this
OPEN_CLIP = ("core.models.open_clip:OpenCLIPTextConfig", "core.models.open_clip:OpenCLIPTextModel")


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


def prediction_marker(shapes: Shapes) -> str | None:
    """The bias the v/eps guess reads: ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` in real files
    (the last output block's attention), the last such block in scaled-down ones."""
    if _V_BIAS in shapes:
        return _V_BIAS
    found = [(int(m.group(1)), k) for k in shapes if (m := _OUTPUT_NORM.fullmatch(k))]
    return max(found)[1] if found else None


def guess_prediction(shapes: Shapes, read: Reader) -> tuple[str, tuple[str, ...]]:
    """SD2.x 768-v and 512-base share every shape; the v models' last norm bias is visibly wider.

    ``read(key)`` may return a tensor (the loader) or a sequence of floats (the header-only inspection)."""
    key = prediction_marker(shapes)
    if read is not None and key is not None and (shapes[key] or (0,))[0] > 1:
        values: Any = read(key)
        if hasattr(values, "float"):  # a tensor
            values = values.float().flatten().tolist()
        std = statistics.stdev(float(v) for v in values)  # torch.std's unbiased estimate, as ComfyUI takes it
        short = key.removeprefix(_ldm.UNET_PREFIX)
        note = f"v-prediction guessed from std {std:.3f} of {short} (v if > {V_STD_THRESHOLD})"
        return ("v" if std > V_STD_THRESHOLD else "eps"), (note,)
    return "v", ("SD2.x prediction type not checked; assumed v (the 768 models)",)


def mark_prediction(tensors: dict[str, Any], prediction: str) -> None:
    """Make random weights look like a ``prediction`` model to ``guess_prediction`` (for
    ``core.models.testing``): the marker bias rescaled to std 0.2 (v) or 0.02 (eps)."""
    if prediction not in ("v", "eps"):
        raise ValueError(f"prediction {prediction!r} is invalid for SD2.x; valid: eps, v")
    key = prediction_marker({k: tuple(t.shape) for k, t in tensors.items()})
    if key is None:
        raise ValueError("no SD2.x prediction marker bias in these weights")
    t = tensors[key].float()
    target = 0.2 if prediction == "v" else 0.02
    tensors[key] = ((t - t.mean()) / t.std() * target).to(tensors[key].dtype)


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
             "context_dim": 64, **_HEADS},
        ),
        # laion/CLIP-ViT-H-14 as SD2.x files store it: 24 blocks, 16 heads of 64, GELU (the tiny one keeps the
        # real vocabulary so the real tokenizer drives it).
        Component(
            "text_encoder",
            TEXT_ENCODER_PREFIX,
            *OPEN_CLIP,
            presets={
                "full": {"width": 1024, "layers": 24, "intermediate": 4096, "projection_dim": 1024},
                "tiny": {"width": 64, "layers": 3, "intermediate": 96, "projection_dim": 64},
            },
        ),
        _ldm.vae(LATENT),
    ),
    detect=detect,
    detect_priority=20,
    guess_prediction=guess_prediction,
    latent=LATENT,
    sampling=DiscreteSampling(prediction="v"),  # the fallback when no tensor data is read (see above)
    conditioner="core.models.open_clip_prompt:OpenCLIPConditioner",
    default_size=(768, 768),
    prediction_sizes={"eps": (512, 512)},
    ays_levels=sd15.AYS_LEVELS,  # no published SD2.x levels; same noise schedule as SD1.x
    presets=("sd2-balanced", "sd2-base-balanced"),
    request_fields=("prediction",),
)
