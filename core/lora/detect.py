"""Which model family a LoRA file was made for, from its key names and shapes (stdlib only).

A LoRA patches layers of one family's networks; applied to another it either matches nothing or fails on a
shape. The markers (shared/reference lora.md §3, families-2026.md): Flux transformers' ``double_blocks`` /
``single_blocks`` (BFL names) or ``single_transformer_blocks`` (diffusers names); SDXL's two text encoders
(``lora_te1_``/``lora_te2_``, ``text_encoder_2.``); Z-Image's numbered ``layers`` / ``noise_refiner`` /
``context_refiner`` blocks with ``attention`` / ``feed_forward`` / ``adaLN_modulation`` (kohya or dotted); otherwise the width of the text context the UNet's
cross-attention reads, the input width of an ``attn2`` key/value projection: 768 SD1.x, 1024 SD2.x, 2048 SDXL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from core.lora import LoraError

CONTEXT_FAMILIES = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_ZIMAGE = re.compile(r"(?:^|[._])(?:layers|noise_refiner|context_refiner)[._]\d+[._](?:attention|feed_forward|adaLN_modulation)")
_ATTN2_KV = re.compile(r"attn2[._]to_[kv](?:[._]|$)")
# the factor whose second dimension is the layer's input width, per format
_INPUT_FACTORS = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".down.weight", ".hada_w1_b")


def lora_family(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """(family name or None when the file does not say, the evidence in words)."""
    keys = list(shapes)
    for key in keys:
        if "double_blocks" in key or "single_blocks" in key or "single_transformer_blocks" in key:
            return _flux_generation(shapes, key)
    for key in keys:
        if _ZIMAGE.search(key):
            return "zimage", f"Z-Image transformer key {key!r}"
    for key in keys:
        if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")):
            return "sdxl", f"two text encoders ({key!r})"
    for key in keys:
        if _ATTN2_KV.search(key) and key.endswith(_INPUT_FACTORS):
            shape = shapes[key]
            if len(shape) >= 2 and shape[1] in CONTEXT_FAMILIES:
                return CONTEXT_FAMILIES[shape[1]], f"cross-attention context width {shape[1]} ({key!r})"
    return None, "no family markers"


# Names only one generation has (flattened kohya spellings contain the same substrings): FLUX.2's shared
# modulations and diffusers' fused single-block / SwiGLU names; Flux.1's per-block modulation, CLIP vector, GELU MLP.
_FLUX2_NAMES = ("stream_modulation", "to_qkv_mlp_proj", "linear_in", "linear_out")
_FLUX1_NAMES = ("img_mod", "txt_mod", "modulation", "vector_in", "proj_mlp", "net.0.proj", "net_0_proj",
                "text_embedder", "norm1")
_SINGLE_LINEAR2 = re.compile(r"single_blocks[._](\d+)[._]linear2")
_SINGLE_LINEAR1 = re.compile(r"single_blocks[._](\d+)[._]linear1")


def _flux_generation(shapes: Mapping[str, tuple[int, ...]], marker: str) -> tuple[str, str]:
    """Flux.1 or FLUX.2, for a LoRA with BFL or diffusers transformer names (``marker``: the first such key).

    By names where one generation has them, else by widths: a single block's ``linear2`` reads attention + MLP,
    ``D + 4D`` in Flux.1 (GELU MLP) and ``D + 3D`` in FLUX.2 (SwiGLU, ratio 3), ``D`` being ``linear1``'s input;
    a transformer wider than Flux.1's 3072 (klein 9B 4096) is FLUX.2. Flux.1 when nothing tells."""
    for key in shapes:
        if any(m in key for m in _FLUX2_NAMES):
            return "flux2", f"FLUX.2 transformer key {key!r}"
    for key in shapes:
        if any(m in key for m in _FLUX1_NAMES):
            return "flux", f"Flux.1 transformer key {key!r}"
    inputs = {key: shape[1] for key, shape in shapes.items() if key.endswith(_INPUT_FACTORS) and len(shape) >= 2}
    hidden = next((w for k, w in inputs.items() if _SINGLE_LINEAR1.search(k)), None)
    mlp_in = next((w for k, w in inputs.items() if _SINGLE_LINEAR2.search(k)), None)
    if hidden and mlp_in:
        if mlp_in == 4 * hidden:
            return "flux2", f"FLUX.2 single block widths ({hidden} -> linear2 from {mlp_in})"
        return "flux", f"Flux.1 single block widths ({hidden} -> linear2 from {mlp_in})"
    widths = {w for k, w in inputs.items() if "img_attn" in k or "linear1" in k}
    if widths and min(widths) > 3072:
        return "flux2", f"FLUX.2 transformer width {min(widths)} ({marker!r})"
    return "flux", f"Flux transformer key {marker!r}"


def family_mismatch(evidence_family: str | None, evidence: str, family: str, name: str, path: object,
                    model: str) -> LoraError | None:
    """The one error for a LoRA made for another family than the model's, or None."""
    from core.models.parts import with_article
    from core.presets import family_label

    if evidence_family is None or evidence_family == family:
        return None
    theirs, ours = family_label(evidence_family), family_label(family)
    return LoraError(
        f"{path}: LoRA {name!r} is {with_article(theirs)} LoRA ({evidence}), but the model {model!r} is {ours}; "
        f"use a LoRA made for {ours}"
    )
