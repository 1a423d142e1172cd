"""How Flux.1 LoRAs name our transformer's layers (``core.models.flux``, BFL module names), for every trainer.

| naming | example module | lands on |
| --- | --- | --- |
| BFL / ComfyUI (PEFT factors) | ``diffusion_model.double_blocks.0.img_attn.qkv`` | the same name |
| kohya | ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1`` | BFL names, flattened |
| diffusers / ai-toolkit / SimpleTuner | ``transformer.transformer_blocks.0.attn.to_k`` | rows ``[D, 2D)`` of ``img_attn.qkv`` |
| OneTrainer, LyCORIS | ``lora_transformer_transformer_blocks_0_attn_to_k``, ``lycoris_...`` | diffusers names, flattened |
| XLabs | ``double_blocks.0.processor.qkv_lora1`` (img) / ``qkv_lora2`` (txt), ``proj_lora1/2``; single blocks ``processor.qkv_lora`` / ``proj_lora`` | ``img_attn.qkv`` ... ``linear1`` rows ``[0, 3D)`` / ``linear2`` |

The diffusers names follow diffusers' single-file converter (``convert_flux_transformer_checkpoint_to_diffusers``,
shared/reference lora.md §3.3): a split ``to_q``/``to_k``/``to_v`` patches row blocks of the fused weight
(``Target.rows``), a single block's ``proj_mlp`` the rows after them, and ``norm_out.linear`` holds
``[scale, shift]`` where BFL's ``final_layer.adaLN_modulation.1`` holds ``[shift, scale]``
(``Target.swap_halves``). XLabs single-block keys (``processor.qkv_lora.down.weight``) reach us through the
old-diffusers ``_lora.down`` rule of ``core.lora.names`` as ``single_blocks.N.qkv`` / ``.proj``.

Stdlib only (the batch runner checks LoRAs from headers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from core.lora.keymap import Spellings, Target, table, transformer_spellings

_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.(.+)$")

# BFL name inside a double block -> diffusers name inside transformer_blocks.N (whole layers)
_DOUBLE_WHOLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_SPLIT = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_XLABS_DOUBLE = {"img_attn.qkv": "processor.qkv_lora1", "txt_attn.qkv": "processor.qkv_lora2",
                 "img_attn.proj": "processor.proj_lora1", "txt_attn.proj": "processor.proj_lora2"}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def diffusers_targets(role: str, names: Sequence[str]) -> dict[str, Target]:
    """diffusers ``FluxTransformer2DModel`` module names (and XLabs' processor names) -> our layers."""
    out: dict[str, Target] = {}
    for name in names:
        if name in _TOP:
            out[_TOP[name]] = Target(role, name)
        elif name == "final_layer.adaLN_modulation.1":
            out["norm_out.linear"] = Target(role, name, swap_halves=True)
        elif m := _DOUBLE.match(name):
            n, rest = m.groups()
            head = f"transformer_blocks.{n}."
            if rest in _DOUBLE_WHOLE:
                out[head + _DOUBLE_WHOLE[rest]] = Target(role, name)
            for i, split in enumerate(_DOUBLE_SPLIT.get(rest, ())):
                out[head + split] = Target(role, name, (i, i + 1))
            if rest in _XLABS_DOUBLE:
                out[f"double_blocks.{n}.{_XLABS_DOUBLE[rest]}"] = Target(role, name)
        elif m := _SINGLE.match(name):
            n, rest = m.groups()
            head = f"single_transformer_blocks.{n}."
            if rest == "linear1":
                for i, split in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                    out[head + split] = Target(role, name, (i, i + 1))
                out[head + "proj_mlp"] = Target(role, name, (3, None))
                out[f"single_blocks.{n}.qkv"] = Target(role, name, (0, 3))  # XLabs processor.qkv_lora
            elif rest == "linear2":
                out[head + "proj_out"] = Target(role, name)
                out[f"single_blocks.{n}.proj"] = Target(role, name)  # XLabs processor.proj_lora
            elif rest == "modulation.lin":
                out[head + "norm.linear"] = Target(role, name)
    return out


LORA_SPELLINGS = {
    "unet": transformer_spellings(diffusers_targets),
    # CLIP-L in Hugging Face names (kohya lora_te1_, diffusers text_encoder.)
    "text_encoder": Spellings(flat=("lora_te1_", "lora_te_"), dotted=("text_encoder.",)),
}


def lora_keys(modules: Mapping[str, Sequence[str]]) -> dict[str, Target]:
    """LoRA module name in any Flux.1 trainer's naming -> our layer (see the module docstring)."""
    return table(modules, LORA_SPELLINGS)
