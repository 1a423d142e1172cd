"""What kind of model file this is, from its key names and shapes alone.

Rules follow the shared reference ``checkpoints.md`` §2-§3 (restated there from ComfyUI and A1111, written
here from the description). Each family's own markers live in its module (``core/models/families/``); this
module runs them and recognises the files that are not checkpoints (LoRAs, lone VAEs, diffusers components).
Detection needs no tensor data, except the optional SD2.x v-prediction guess, which reads one small bias
vector through ``read``. Stdlib only: torch is imported by the loader, not here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.models.families import FAMILIES, by_detect_priority
from core.models.families._ldm import UNET_PREFIX, context_dim, ldm_variant
from core.models.family import Match, ModelFamily

Shapes = Mapping[str, tuple[int, ...]]

# Files that are recognised but are not checkpoints of a model family.
OTHER_KINDS = {
    "vae": "a VAE",
    "lora": "a LoRA",
    "diffusers": "a diffusers-format component",
    "text_encoder": "a text encoder",
    "unet_only": "a UNet without text encoder and VAE",
    "unknown": "an unknown model",
}

VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")  # bn.*: FLUX.2's latent statistics


@dataclass(frozen=True)
class CheckpointInfo:
    """The result of inspecting a model file (no tensors loaded)."""

    path: Path
    family: str  # a FAMILIES key, or one of OTHER_KINDS
    variant: str  # base | inpaint | pix2pix | dev | schnell | fill | transformer_only | ...
    dtype: str | None  # dominant dtype of the denoiser weights, torch attribute name ("float16")
    prediction: str | None  # eps | v | flow | edm, or None when not a denoiser
    prefixes: dict[str, str] = field(default_factory=dict)  # component -> key prefix in this file
    component_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)  # component -> full key names
    notes: tuple[str, ...] = ()  # how uncertain guesses were made, for logs and the model browser
    format: str = "safetensors"  # safetensors | pickle

    @property
    def label(self) -> str:
        spec = FAMILIES.get(self.family)
        if spec is None:
            return OTHER_KINDS.get(self.family, self.family)
        return spec.label if self.variant == "base" else f"{spec.label} {self.variant}"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype) if self.dtype else None


def dominant_dtype(keys: list[str] | tuple[str, ...], dtypes: Mapping[str, str]) -> str | None:
    """The floating dtype that most of these keys use (mixed files exist: fp32 norms in an fp16 UNet)."""
    counts: dict[str, int] = {}
    for k in keys:
        d = dtypes.get(k)
        if d and ("float" in d):
            counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


_LORA_KEY = re.compile(
    r"^lora_|"  # kohya names: lora_unet_..., lora_te_..., lora_te1_...
    r"\.(lora_up|lora_down|lora_A|lora_B|lora_mid)\.weight$|"  # kohya / PEFT
    r"\.(hada_w1_a|hada_w2_a|lokr_w1|lokr_w2|oft_blocks)$"  # LyCORIS
)


def _is_lora_key(key: str) -> bool:
    return bool(_LORA_KEY.search(key))


def detect(
    path: str | Path,
    shapes: Shapes,
    dtypes: Mapping[str, str],
    *,
    read: Callable[[str], Any] | None = None,
    fmt: str = "safetensors",
) -> CheckpointInfo:
    """Classify a model file from its keys and shapes. ``read(key)`` (optional) returns a tensor."""
    path = Path(path)
    keys = list(shapes)

    def info(family: str, variant: str, prefixes: dict[str, str], **kw: Any) -> CheckpointInfo:
        component_keys = {
            c: tuple(k for k in keys if k.startswith(p) and _owner(k, prefixes) == c)
            for c, p in prefixes.items()
        }
        component_keys = {c: ks for c, ks in component_keys.items() if ks}
        denoiser = component_keys.get("unet", ())
        return CheckpointInfo(
            path=path,
            family=family,
            variant=variant,
            dtype=dominant_dtype(denoiser or tuple(keys), dtypes),
            prefixes={c: p for c, p in prefixes.items() if c in component_keys},
            component_keys=component_keys,
            format=fmt,
            **kw,
        )

    n_unet = sum(k.startswith(UNET_PREFIX) for k in keys)
    if n_unet > 5:
        return _detect_denoiser(info, shapes, read)

    # No denoiser under the usual prefix: a partial file, a LoRA, a diffusers component, or junk.
    if any(_is_lora_key(k) for k in keys):
        return info("lora", "base", {}, prediction=None)
    for family in by_detect_priority():
        bare = family.detect_bare(shapes) if family.detect_bare else None
        if bare is not None:
            return _family_info(info, family, bare, shapes, read)
    if "input_blocks.0.0.weight" in shapes:
        return info("unet_only", "base", {"unet": ""}, prediction=None)
    diffusers = _diffusers_kind(shapes)
    if diffusers:
        return info("diffusers", diffusers, {}, prediction=None)
    vae_prefix = _vae_prefix(shapes)
    if vae_prefix is not None:
        latent = shapes.get(vae_prefix + "decoder.conv_in.weight", (0, 0))[1]
        variant = {4: "sd", 16: "flux", 32: "flux2"}.get(latent, f"{latent}ch")
        return info("vae", variant, {"vae": vae_prefix}, prediction=None)
    # CLIP, T5, and Qwen3 (``model.layers.*``: ComfyUI's qwen_3_4b) text encoders
    if any(k.startswith(("text_model.encoder.layers.", "encoder.block.0.layer.0.", "model.layers.0.self_attn."))
           for k in keys) or any(
        k.startswith(("transformer.resblocks.", "model.transformer.resblocks.")) for k in keys
    ) or "model.embed_tokens.weight" in shapes:  # a decoder LM used as a text encoder (Qwen3: Z-Image, FLUX.2)
        return info("text_encoder", "base", {}, prediction=None)
    return info("unknown", "base", {}, prediction=None)


def _owner(key: str, prefixes: dict[str, str]) -> str | None:
    """The component whose prefix is the longest match (an empty prefix matches everything)."""
    best, best_len = None, -1
    for c, p in prefixes.items():
        if key.startswith(p) and len(p) > best_len:
            best, best_len = c, len(p)
    return best


def _vae_prefix(shapes: Shapes) -> str | None:
    """Prefix of LDM-named VAE weights in a standalone VAE file ('' or 'first_stage_model.' or 'vae.')."""
    for prefix in ("", "first_stage_model.", "vae."):
        if prefix + "decoder.conv_in.weight" in shapes and prefix + "encoder.conv_in.weight" in shapes:
            if any(k.startswith(prefix + "decoder.up_blocks.") for k in shapes):
                return None  # diffusers naming
            return prefix
    return None


def _diffusers_kind(shapes: Shapes) -> str | None:
    """Which diffusers component a file with diffusers key names holds, or None."""

    def has_suffix(suffix: str) -> bool:
        return any(k == suffix or k.endswith("." + suffix) for k in shapes)

    if has_suffix("time_embedding.linear_1.weight") and has_suffix("conv_in.weight"):
        return "unet"
    if has_suffix("x_embedder.weight") and any(
        ("single_transformer_blocks." in k or "transformer_blocks." in k) for k in shapes
    ):
        return "transformer"
    if any("decoder.up_blocks." in k for k in shapes) and has_suffix("decoder.conv_in.weight"):
        return "vae"
    return None


def _detect_denoiser(info: Callable[..., CheckpointInfo], shapes: Shapes, read: Any) -> CheckpointInfo:
    """A file with a denoiser under ``model.diffusion_model.``: the most certain family match wins, ties going
    to the higher ``detect_priority``."""
    best: tuple[ModelFamily, Match] | None = None
    for family in by_detect_priority():
        match = family.detect(shapes)
        if match is not None and (best is None or match.sure and not best[1].sure):
            best = (family, match)
    if best is not None:
        return _family_info(info, best[0], best[1], shapes, read)
    p = UNET_PREFIX
    if p + "input_blocks.0.0.weight" not in shapes:
        return info("unknown", "base", {"unet": p}, prediction=None)
    variant = ldm_variant(shapes) or "base"
    notes = (f"UNet with cross-attention context dim {context_dim(shapes)}",)
    return info("unknown", variant, {"unet": p}, prediction=None, notes=notes)


def _family_info(
    info: Callable[..., CheckpointInfo], family: ModelFamily, match: Match, shapes: Shapes, read: Any
) -> CheckpointInfo:
    notes = list(match.notes)
    prediction = match.prediction
    if prediction is None:
        if "v_pred" in shapes:
            prediction = "v"
            notes.append("v_pred marker key present")
        elif "edm_mean" in shapes and "edm_std" in shapes:
            prediction = "edm"
            notes.append("edm_mean/edm_std keys present (Playground 2.5 style)")
        elif family.guess_prediction is not None:
            prediction, guessed = family.guess_prediction(shapes, read)
            notes.extend(guessed)
        else:
            prediction = family.sampling.prediction
    prefixes = dict(match.prefixes) if match.prefixes is not None else family.prefixes
    return info(family.name, match.variant, prefixes, prediction=prediction, notes=tuple(notes))


def inspect_header(path: str | Path) -> CheckpointInfo:
    """Classify a ``.safetensors`` file from its header alone, without importing torch (for the UI thread).

    The SD2.x v-prediction guess reads its one small bias vector with the stdlib (``read_floats``: a few
    hundred bytes), so the UI knows a 512-base from a 768-v model; the loader's ``inspect_checkpoint`` reads
    the same bias through torch. Raises CheckpointError for files that are not valid safetensors.
    """
    from core.models.safetensors_header import read_floats, read_header

    header = read_header(path)
    return detect(header.path, header.shapes, header.dtypes, read=lambda key: read_floats(header, key))
