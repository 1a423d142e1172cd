"""LoRA module names -> our modules: the tables each family's ``lora_keys`` function builds.

A LoRA names the layer it patches in the naming of the tool that trained it: kohya flattens the module path
with ``_`` under a prefix (``lora_unet_down_blocks_0_attentions_0_proj_in``, ``lora_te_text_model_...``), PEFT
and diffusers keep dots under a component prefix (``unet.down_blocks.0...``). Un-flattening by string surgery
is fragile (module names contain underscores), so, as ComfyUI and A1111 do, we go the other way: enumerate our
own modules, write each one's name (and its aliases, e.g. the diffusers name of an LDM block) in every
spelling a LoRA may use, and look the LoRA's names up in that table. (shared/reference lora.md §3.1)

The family API (``ModelFamily.lora_keys = "module:function"``)::

    def lora_keys(modules: Mapping[str, Sequence[str]]) -> dict[str, Target]

``modules`` maps each role (``unet``, ``text_encoder``, ...) to our module names that carry a ``.weight``
(``input_blocks.1.1.proj_in``); the result maps every accepted LoRA module name to a ``Target``. Families
build it with ``table()`` and ``Spellings``; a fused layer (Flux ``qkv``) patched by split LoRAs (``to_q``)
uses ``Target.rows``. Stdlib only, like the family modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class Target(NamedTuple):
    """Where a LoRA module lands: our network ``role``, the module's qualified name in it, and for a split LoRA
    on a fused layer the row range it patches.

    ``rows`` counts in blocks of the weight's input width ``D`` (the names alone fix it, no shapes needed):
    ``(1, 2)`` is rows ``[D, 2D)`` (``to_k`` of a fused ``[3D, D]`` qkv), ``(3, None)`` from ``3D`` to the end
    (Flux's ``proj_mlp`` inside ``linear1``). ``parameter`` is the weight's attribute (OpenCLIP's packed
    ``attn.in_proj_weight``); ``swap_halves``: the LoRA's output rows are the layer's two halves in the other
    order (diffusers' Flux ``norm_out.linear`` is ``[scale, shift]``, BFL's ``[shift, scale]``)."""

    role: str
    module: str
    rows: tuple[int, int | None] | None = None
    parameter: str = "weight"
    swap_halves: bool = False

    @property
    def weight(self) -> str:
        """The parameter's qualified name in the role's network."""
        return f"{self.module}.{self.parameter}"


@dataclass(frozen=True)
class Spellings:
    """How LoRAs spell one role's module names: kohya prefixes (flattened names) and dotted prefixes (PEFT,
    diffusers, ComfyUI). ``aliases(names) -> {our name: [other names of the same module]}`` adds names from
    another naming of the network (diffusers block names for an LDM UNet)."""

    flat: tuple[str, ...] = ()
    dotted: tuple[str, ...] = ()
    aliases: Callable[[Sequence[str]], Mapping[str, Sequence[str]]] | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # LoRA name -> our name, for odd spellings
    # (role, our names) -> {another naming's module name: Target}, for layers that are not one module of ours
    # (split q/k/v onto a fused weight); each name is spelled with the prefixes above
    targets: Callable[[str, Sequence[str]], Mapping[str, Target]] | None = None


def transformer_spellings(targets: Callable[[str, Sequence[str]], Mapping[str, Target]]) -> Spellings:
    """How every trainer prefixes a diffusion transformer's modules (Flux.1, FLUX.2, Z-Image): kohya / musubi
    ``lora_unet_``, OneTrainer ``lora_transformer_``, LyCORIS ``lycoris_``; ComfyUI / BFL ``diffusion_model.``,
    diffusers / PEFT ``transformer.``, bare names. ``targets``: the family's diffusers names."""
    return Spellings(
        flat=("lora_unet_", "lora_transformer_", "lycoris_"),
        dotted=("diffusion_model.", "model.diffusion_model.", "transformer.", ""),
        targets=targets,
    )


def table(modules: Mapping[str, Sequence[str]], spellings: Mapping[str, Spellings]) -> dict[str, Target]:
    """Every spelling of every module of every role in ``spellings`` -> its ``Target``."""
    out: dict[str, Target] = {}
    for role, spell in spellings.items():
        names = list(modules.get(role, ()))
        aliases = spell.aliases(names) if spell.aliases else {}
        for name in names:
            target = Target(role, name)
            for alias in (name, *aliases.get(name, ())):
                flat = alias.replace(".", "_")
                for prefix in spell.flat:
                    out.setdefault(prefix + flat, target)
                for prefix in spell.dotted:
                    out.setdefault(prefix + alias, target)
        for other, target in (spell.targets(role, names) if spell.targets else {}).items():
            flat = other.replace(".", "_")
            for prefix in spell.flat:
                out.setdefault(prefix + flat, target)
            for prefix in spell.dotted:
                out.setdefault(prefix + other, target)
        known = set(names)
        for lora_name, ours in spell.extra.items():
            if ours in known:
                out.setdefault(lora_name, Target(role, ours))
    return out


# ---------------------------------------------------------------------------------------------- LDM UNet

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")


def _res_blocks(names: Iterable[str]) -> int:
    """Res blocks per level (diffusers ``layers_per_block``) from the LDM names: the first downsampler sits
    at ``input_blocks.{n+1}``."""
    names = list(names)
    ops = sorted(int(m.group(1)) for n in names if (m := re.match(r"^input_blocks\.(\d+)\.0\.op$", n)))
    if ops:
        return ops[0] - 1
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"^input_blocks\.(\d+)\.", n))}
    return max(blocks, default=1)


def _resnet_part(rest: str) -> str:
    for ldm, diffusers in _RESNET.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm) :]
    return rest


def ldm_unet_to_diffusers(name: str, res_blocks: int) -> str | None:
    """The diffusers ``UNet2DConditionModel`` name of an LDM/SGM UNet module (lora.md §3.1 table), or None."""
    if name in _TOP:
        return _TOP[name]
    group = res_blocks + 1
    m = _BLOCK.match(name)
    if m:
        side, n, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if side == "input_blocks":
            level, index = (n - 1) // group, (n - 1) % group
            if index == res_blocks:  # the level's downsampler
                return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
            kind = "resnets" if inner == 0 else "attentions"
            part = _resnet_part(rest) if inner == 0 else rest
            return f"down_blocks.{level}.{kind}.{index}.{part}"
        level, index = n // group, n % group
        if inner == 0:
            return f"up_blocks.{level}.resnets.{index}.{_resnet_part(rest)}"
        if rest == "conv":  # Upsample (index 1 without attention at that level, else 2)
            return f"up_blocks.{level}.upsamplers.0.conv"
        return f"up_blocks.{level}.attentions.{index}.{rest}"
    m = _MIDDLE.match(name)
    if m:
        inner, rest = int(m.group(1)), m.group(2)
        if inner == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{inner // 2}.{_resnet_part(rest)}"
    return None


def ldm_unet_aliases(names: Sequence[str]) -> dict[str, list[str]]:
    """Our LDM UNet module names -> their diffusers names (kohya's SD1.x files use the latter)."""
    res_blocks = _res_blocks(names)
    out: dict[str, list[str]] = {}
    for name in names:
        alias = ldm_unet_to_diffusers(name, res_blocks)
        if alias:
            out[name] = [alias]
    return out


# ------------------------------------------------------------------------------------ OpenCLIP text tower

_OPEN_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_OPEN_CLIP_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_hf_targets(role: str, names: Sequence[str]) -> dict[str, Target]:
    """An OpenCLIP text tower (SDXL's bigG) under the Hugging Face ``CLIPTextModel`` names its LoRAs use
    (kohya ``lora_te2_``, diffusers ``text_encoder_2.``): ``self_attn.{q,k,v}_proj`` are the row blocks of
    the packed ``attn.in_proj_weight``, ``out_proj``/``fc1``/``fc2`` are ``attn.out_proj``/``mlp.c_fc``/
    ``mlp.c_proj``."""
    out: dict[str, Target] = {}
    for name in names:
        m = _OPEN_CLIP_BLOCK.match(name)
        if not m:
            continue
        layer, part = m.groups()
        hf = f"text_model.encoder.layers.{layer}."
        out[hf + _OPEN_CLIP_HF[part]] = Target(role, name)
        if part == "attn.out_proj":
            for i, p in enumerate("qkv"):
                out[f"{hf}self_attn.{p}_proj"] = Target(role, f"transformer.resblocks.{layer}.attn", (i, i + 1),
                                                        "in_proj_weight")
    return out


def weight_modules(keys: Iterable[str], prefix: str = "") -> list[str]:
    """Module names (``prefix`` removed) of the ``.weight`` keys among ``keys``: what a LoRA can patch."""
    out = []
    for key in keys:
        if key.startswith(prefix) and key.endswith(".weight"):
            out.append(key[len(prefix) : -len(".weight")])
    return out
