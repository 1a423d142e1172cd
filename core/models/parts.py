"""The separate files a model is made of (text encoders, VAEs), recognised by their keys, never their names.

Flux users keep a diffusion model, two text encoders and a VAE as separate files (ComfyUI's
``models/diffusion_models``, ``models/text_encoders``, ``models/vae``); Z-Image and FLUX.2 ship the same way with
a Qwen3 text encoder. A family's ``Component.part`` names the kind of file that component can come from
(``"t5xxl"``); this module is the table of those kinds: what each is called, which registry folder it lives in,
the files users usually have of it, and the detector that finds its keys (and their prefix) in a file. Adding
a kind is adding an entry here (data); a family then names it in its components.

The denoiser is not a part kind: a diffusion-model file is recognised by its family's ``detect_bare``.
Stdlib only (the registry classifies files on the UI thread).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Shapes = Mapping[str, tuple[int, ...]]

_T5_MARKERS = ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
_CLIP_MARKER = "text_model.encoder.layers.0.self_attn.q_proj.weight"
_CLIP_EMBED = "text_model.embeddings.token_embedding.weight"
_VAE_MARKERS = ("encoder.conv_in.weight", "decoder.conv_in.weight")
_QWEN3_MARKERS = ("model.layers.0.self_attn.q_norm.weight", "model.embed_tokens.weight")  # Qwen2.5 has no q_norm


@dataclass(frozen=True)
class PartKind:
    """One kind of separate model file."""

    name: str  # the id families name in Component.part ("t5xxl")
    label: str  # what users read ("T5-XXL text encoder")
    folder: str  # the registry kind whose folders hold it ("text_encoder", "vae")
    files: tuple[str, ...]  # the usual downloads, for the message when none is found
    detect: Callable[[Shapes], str | None]  # the prefix of this part's keys in a file, or None


def _first_prefix(shapes: Shapes, prefixes: tuple[str, ...], markers: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if all(prefix + m in shapes for m in markers):
            return prefix
    return None


def _t5(shapes: Shapes) -> str | None:
    # T5 v1.1 (gated feed-forward): ComfyUI's t5xxl_fp16 / t5xxl_fp8_e4m3fn (no prefix), or inside a combined file
    return _first_prefix(shapes, ("", "text_encoders.t5xxl.transformer."), _T5_MARKERS)


def _clip(width_test: Callable[[int], bool]) -> Callable[[Shapes], str | None]:
    def detect(shapes: Shapes) -> str | None:
        prefix = _first_prefix(shapes, ("", "text_encoders.clip_l.transformer."), (_CLIP_MARKER,))
        if prefix is None:
            return None
        width = (*shapes.get(prefix + _CLIP_EMBED, ()), 0, 0)[1]
        return prefix if width_test(width) else None

    return detect


def _vae(channels: int) -> Callable[[Shapes], str | None]:
    """LDM-named KL autoencoders with ``channels`` latent channels (diffusers names are another layout)."""

    def detect(shapes: Shapes) -> str | None:
        prefix = _first_prefix(shapes, ("", "vae.", "first_stage_model."), _VAE_MARKERS)
        if prefix is None or any(k.startswith(prefix + "decoder.up_blocks.") for k in shapes):
            return None
        latent = (*shapes.get(prefix + "decoder.conv_in.weight", ()), 0, 0)[1]
        return prefix if latent == channels else None

    return detect


def _qwen3(hidden_test: Callable[[int], bool]) -> Callable[[Shapes], str | None]:
    """HF ``Qwen3ForCausalLM`` names (``model.layers.N...``; ComfyUI's ``qwen_3_4b.safetensors``), alone or inside
    an all-in-one checkpoint; the width tells 4B (2560) from 8B (4096)."""

    def detect(shapes: Shapes) -> str | None:
        prefix = _first_prefix(
            shapes, ("", "text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_8b.transformer."), _QWEN3_MARKERS
        )
        if prefix is None:
            return None
        width = (*shapes.get(prefix + "model.embed_tokens.weight", ()), 0, 0)[1]
        return prefix if hidden_test(width) else None

    return detect


def _flux2_vae(shapes: Shapes) -> str | None:
    """The FLUX.2 autoencoder (``flux2-vae.safetensors``): LDM names plus the batch-norm statistics of its
    patchified 128-channel latent space, which no other VAE has."""
    prefix = _first_prefix(shapes, ("", "vae."), (*_VAE_MARKERS, "bn.running_mean"))
    return prefix


PARTS: dict[str, PartKind] = {
    p.name: p
    for p in (
        PartKind("t5xxl", "T5-XXL text encoder", "text_encoder",
                 ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"), _t5),
        # CLIP ViT-L/14 text tower with Hugging Face names (ComfyUI's clip_l.safetensors); 1280 wide is bigG
        PartKind("clip_l", "CLIP-L text encoder", "text_encoder", ("clip_l.safetensors",),
                 _clip(lambda width: width != 1280)),
        # Qwen3-8B is FLUX.2 klein 9B's; every smaller width is read as the 4B's place (tiny test models too)
        PartKind("qwen3_4b", "Qwen3-4B text encoder", "text_encoder", ("qwen_3_4b.safetensors",),
                 _qwen3(lambda width: width != 4096)),
        PartKind("qwen3_8b", "Qwen3-8B text encoder", "text_encoder",
                 ("qwen_3_8b.safetensors", "qwen_3_8b_fp8mixed.safetensors"), _qwen3(lambda width: width == 4096)),
        # before the 16- and 4-channel kinds: a FLUX.2 VAE is an LDM VAE too (32 channels), told apart by bn.*
        PartKind("flux2_vae", "FLUX.2 VAE", "vae", ("flux2-vae.safetensors",), _flux2_vae),
        PartKind("flux_vae", "16-channel Flux.1 VAE", "vae", ("ae.safetensors",), _vae(16)),
        PartKind("sd_vae", "4-channel SD VAE", "vae", ("vae-ft-mse-840000-ema-pruned.safetensors",), _vae(4)),
    )
}


# GGUF ``general.architecture`` values accepted for a family's diffusion model (by family name) or a part kind.
GGUF_ARCHITECTURES: dict[str, frozenset[str]] = {
    "flux": frozenset({"flux"}),
    "flux2": frozenset({"flux"}),  # city96's converter writes FLUX.2 as "flux" too (told apart by keys)
    "zimage": frozenset({"lumina2"}),  # ComfyUI-GGUF files Z-Image under Lumina 2, its NextDiT lineage
    "t5xxl": frozenset({"t5", "t5encoder"}),
    "qwen3_4b": frozenset({"qwen3"}),
    "qwen3_8b": frozenset({"qwen3"}),
}


@dataclass(frozen=True)
class PartMatch:
    kind: str  # a PARTS key
    prefix: str


def detect_part(shapes: Shapes) -> PartMatch | None:
    """Which kind of part file this is (the first kind whose detector finds its keys), or None."""
    for part in PARTS.values():
        prefix = part.detect(shapes)
        if prefix is not None:
            return PartMatch(part.name, prefix)
    return None


def with_article(noun: str) -> str:
    """``"a T5-XXL text encoder"``, ``"an SDXL checkpoint"``, ``"an 8-bit ..."`` (messages name parts so)."""
    return ("an " if noun[:1].upper() in "AEIOU" or noun.startswith(("SD", "SDXL", "8")) else "a ") + noun


# ------------------------------------------------------------------------------------------ quantisation

_LABELS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8",
           "float8_e5m2": "fp8_e5m2", "float64": "fp64"}


def quant_label(shapes: Shapes, dtypes: Mapping[str, str], prefix: str = "") -> str | None:
    """What most of the weights under ``prefix`` are stored as, by element count of the matrices (norms and
    biases stay in higher precision in quantised files): ``"bf16"``, ``"fp16"``, ``"fp8"``, ``"Q8_0"``,
    ``"Q4_K"``, ...; None when there are none."""
    counts: dict[str, int] = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix) or len(shape) < 2:
            continue
        dtype = dtypes.get(key, "")
        if not dtype or dtype.startswith(("int", "uint", "bool")):
            continue
        label = _LABELS.get(dtype, dtype)
        counts[label] = counts.get(label, 0) + math.prod(shape)
    return max(counts, key=counts.__getitem__) if counts else None
