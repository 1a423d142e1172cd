"""FLUX.2 ([klein] 4B / 9B; dev's shapes too): a rectified-flow transformer with shared modulation, a Qwen3 text
encoder (klein; dev uses Mistral), the 32-channel FLUX.2 VAE patchified to 128 channels.

Recognised, not runnable yet: the networks exist (``core/models/flux2.py``, ``core/models/flux2_vae.py``), the
wiring into the pipeline does not. Told apart by keys, never by name: FLUX.2 files carry Flux.1's QK-norm marker
too, so this family is asked first and claims a file by its shared modulation (``single_stream_modulation``,
``double_stream_modulation_img``), which Flux.1 (per-block ``img_mod``) never has. Z-Image (``cap_embedder``),
SD3 (``joint_blocks``) and Lumina 2 share none of these keys.
"""

from __future__ import annotations

from core.models.families import _ldm
from core.models.family import Component, FlowSampling, Match, ModelFamily, Shapes

_MARKERS = ("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight")
# hidden width (img_in rows) -> release; klein 4B: 24 x 128, 9B: 32 x 128, dev: 48 x 128
_VARIANTS = {3072: "klein-4b", 4096: "klein-9b", 6144: "dev"}


def _variant(shapes: Shapes, prefix: str) -> str:
    if prefix + "guidance_in.in_layer.weight" in shapes:
        return "dev"  # guidance-distilled; klein has no guidance embedder
    hidden = (*shapes.get(prefix + "img_in.weight", ()), 0)[0]
    return _VARIANTS.get(hidden, f"d{hidden}")


def detect(shapes: Shapes) -> Match | None:
    p = _ldm.UNET_PREFIX
    if not any(p + m in shapes for m in _MARKERS):
        return None
    return Match(_variant(shapes, p), prediction="flow")


def detect_bare(shapes: Shapes) -> Match | None:
    """BFL's release and the Comfy-Org split file: the transformer alone, no prefix."""
    if not any(m in shapes for m in _MARKERS):
        return None
    return Match(_variant(shapes, ""), prediction="flow", prefixes={"unet": ""}, notes=("transformer only",))


FAMILY = ModelFamily(
    name="flux2",
    label="FLUX.2",
    order=55,
    components=(
        Component("unet", _ldm.UNET_PREFIX),
        Component("vae", "vae."),
    ),
    detect=detect,
    detect_bare=detect_bare,
    detect_priority=55,  # before Flux.1 (50), whose marker key FLUX.2 files also have
    sampling=FlowSampling(),
    pixel_multiple=16,  # 8x VAE, then 2x2 patches
    default_size=(1024, 1024),
    takes_presets=False,
)
