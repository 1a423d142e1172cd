"""What kind of model file this is, from its key names and shapes alone.

Rules follow ``/work/shared/reference/checkpoints.md`` §2-§3 (restated there from ComfyUI and A1111, written
here from the description). Detection needs no tensor data, except the optional SD2.x v-prediction guess,
which reads one small bias vector through ``read``. Stdlib only: torch is imported by the loader, not here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class FamilySpec:
    """A model family Darkroom can recognise: its display name and where each component lives."""

    name: str
    label: str
    components: dict[str, str]  # component name -> key prefix in a single-file checkpoint
    latent_channels: int


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "sd15",
            "SD1.x",
            {
                "unet": UNET_PREFIX,
                "text_encoder": "cond_stage_model.transformer.",
                "vae": "first_stage_model.",
            },
            4,
        ),
        FamilySpec(
            "sd2",
            "SD2.x",
            {"unet": UNET_PREFIX, "text_encoder": "cond_stage_model.model.", "vae": "first_stage_model."},
            4,
        ),
        FamilySpec(
            "sdxl",
            "SDXL",
            {
                "unet": UNET_PREFIX,
                "text_encoder": "conditioner.embedders.0.transformer.",
                "text_encoder_2": "conditioner.embedders.1.model.",
                "vae": "first_stage_model.",
            },
            4,
        ),
        FamilySpec(
            "sdxl_refiner",
            "SDXL refiner",
            {
                "unet": UNET_PREFIX,
                "text_encoder_2": "conditioner.embedders.0.model.",
                "vae": "first_stage_model.",
            },
            4,
        ),
        FamilySpec(
            "flux",
            "Flux.1",
            {
                "unet": UNET_PREFIX,
                "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.t5xxl.transformer.",
                "vae": "vae.",
            },
            16,
        ),
        FamilySpec(
            "sd3",
            "SD3",
            {
                "unet": UNET_PREFIX,
                "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer.",
                "vae": "first_stage_model.",
            },
            16,
        ),
    )
}

# Files that are recognised but are not checkpoints of a model family.
OTHER_KINDS = {
    "vae": "a VAE",
    "lora": "a LoRA",
    "diffusers": "a diffusers-format component",
    "text_encoder": "a text encoder",
    "unet_only": "a UNet without text encoder and VAE",
    "unknown": "an unknown model",
}

VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


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
    if "double_blocks.0.img_attn.norm.key_norm.scale" in shapes:
        # BFL release: the Flux transformer alone, no prefix (text encoders and VAE are separate files).
        variant = "dev" if "guidance_in.in_layer.weight" in shapes else "schnell"
        return info("flux", variant, {"unet": ""}, prediction="flow", notes=("transformer only",))
    if "joint_blocks.0.context_block.attn.qkv.weight" in shapes:
        return info("sd3", "transformer_only", {"unet": ""}, prediction="flow")
    if "input_blocks.0.0.weight" in shapes:
        return info("unet_only", "base", {"unet": ""}, prediction=None)
    diffusers = _diffusers_kind(shapes)
    if diffusers:
        return info("diffusers", diffusers, {}, prediction=None)
    vae_prefix = _vae_prefix(shapes)
    if vae_prefix is not None:
        latent = shapes.get(vae_prefix + "decoder.conv_in.weight", (0, 0))[1]
        variant = {4: "sd", 16: "flux"}.get(latent, f"{latent}ch")
        return info("vae", variant, {"vae": vae_prefix}, prediction=None)
    if any(k.startswith(("text_model.encoder.layers.", "encoder.block.0.layer.0.")) for k in keys) or any(
        k.startswith(("transformer.resblocks.", "model.transformer.resblocks.")) for k in keys
    ):
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


def _first(shapes: Shapes, pattern: str) -> tuple[str, tuple[int, ...]] | None:
    rx = re.compile(pattern)
    for k, s in shapes.items():
        if rx.search(k):
            return k, s
    return None


def _detect_denoiser(info: Callable[..., CheckpointInfo], shapes: Shapes, read: Any) -> CheckpointInfo:
    p = UNET_PREFIX
    notes: list[str] = []
    if p + "joint_blocks.0.context_block.attn.qkv.weight" in shapes or p + "x_embedder.proj.weight" in shapes:
        return info("sd3", "base", FAMILIES["sd3"].components, prediction="flow")
    if p + "double_blocks.0.img_attn.norm.key_norm.scale" in shapes:
        img_in = shapes.get(p + "img_in.weight", (0, 64))[1]
        if img_in != 64:
            variant = "fill" if img_in == 384 else f"in{img_in}"
        else:
            variant = "dev" if p + "guidance_in.in_layer.weight" in shapes else "schnell"
        return info("flux", variant, FAMILIES["flux"].components, prediction="flow")
    if p + "input_blocks.0.0.weight" not in shapes:
        return info("unknown", "base", {"unet": p}, prediction=None)

    in_channels = shapes[p + "input_blocks.0.0.weight"][1]
    variant = {4: "base", 9: "inpaint", 8: "pix2pix"}.get(in_channels, f"in{in_channels}")
    label = shapes.get(p + "label_emb.0.0.weight")
    if label is not None and label[1] == 2560 or "conditioner.embedders.0.model.ln_final.weight" in shapes:
        family = "sdxl_refiner"
    elif label is not None or "conditioner.embedders.1.model.ln_final.weight" in shapes:
        family = "sdxl"
    else:
        hit = _first(
            {k: s for k, s in shapes.items() if k.startswith(p)},
            r"transformer_blocks\.0\.attn2\.to_k\.weight$",
        )
        context_dim = hit[1][1] if hit else None
        if context_dim == 1024 or (
            shapes.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (0, 0))[1]
            == 1024
        ):
            family = "sd2"
        elif context_dim == 768:
            family = "sd15"
        elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
            # Scaled-down test models and odd fine-tunes: the text encoder layout still says SD1.x.
            family = "sd15"
            notes.append(f"cross-attention context dim {context_dim}; SD1.x by its CLIP text encoder keys")
        elif any(k.startswith("cond_stage_model.model.") for k in shapes):
            family = "sd2"
            notes.append(
                f"cross-attention context dim {context_dim}; SD2.x by its OpenCLIP text encoder keys"
            )
        else:
            return info(
                "unknown",
                variant,
                {"unet": p},
                prediction=None,
                notes=(f"UNet with cross-attention context dim {context_dim}",),
            )

    prediction = "eps"
    if "v_pred" in shapes:
        prediction = "v"
        notes.append("v_pred marker key present")
    elif "edm_mean" in shapes and "edm_std" in shapes:
        prediction = "edm"
        notes.append("edm_mean/edm_std keys present (Playground 2.5 style)")
    elif family == "sd2":
        key = p + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
        if read is not None and key in shapes and (shapes[key] or (0,))[0] > 1:
            # SD2.x 768-v and 512-base share every shape; the v models' last norm bias is visibly wider.
            std = float(read(key).float().std())
            prediction = "v" if std > 0.09 else "eps"
            notes.append(f"v-prediction guessed from std {std:.3f} of {key} (v if > 0.09)")
        else:
            prediction = "v"
            notes.append("SD2.x prediction type not checked; assumed v (the 768 models)")
    return info(family, variant, FAMILIES[family].components, prediction=prediction, notes=tuple(notes))


def inspect_header(path: str | Path) -> CheckpointInfo:
    """Classify a ``.safetensors`` file from its header alone, without importing torch (for the UI thread).

    The SD2.x v-prediction guess needs tensor data, so here it stays the documented default; the loader's
    ``inspect_checkpoint`` refines it. Raises CheckpointError for files that are not valid safetensors.
    """
    from core.models.safetensors_header import read_header

    header = read_header(path)
    return detect(header.path, header.shapes, header.dtypes)
