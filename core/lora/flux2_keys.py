"""How FLUX.2 LoRAs name our transformer's layers (``core.models.flux2``, BFL module names), for every trainer.

| naming | example module | lands on |
| --- | --- | --- |
| BFL / ComfyUI (PEFT factors) | ``diffusion_model.double_blocks.0.img_attn.qkv`` | the same name |
| kohya / musubi-tuner | ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1`` | BFL names, flattened |
| diffusers / ai-toolkit / SimpleTuner | ``transformer.transformer_blocks.0.attn.to_k`` | rows ``[D, 2D)`` of ``img_attn.qkv`` |
| OneTrainer, LyCORIS | ``lora_transformer_transformer_blocks_0_attn_to_k`` | diffusers names, flattened |

The diffusers names follow diffusers' single-file converter ``convert_flux2_transformer_checkpoint_to_diffusers``
(shared/reference families-2026.md §1.6): a split ``to_q``/``to_k``/``to_v`` (``add_q_proj``/... for the text
stream) patches row blocks of the fused ``qkv`` (``Target.rows``); a single block's ``to_qkv_mlp_proj`` and
``to_out`` are ``linear1`` and ``linear2`` whole (FLUX.2's diffusers model keeps them fused, unlike Flux.1's); the
shared modulations keep their names with ``linear`` for BFL's ``lin``; ``norm_out.linear`` holds ``[scale,
shift]`` where BFL's ``final_layer.adaLN_modulation.1`` holds ``[shift, scale]`` (``Target.swap_halves``).
Qwen3 text-encoder LoRAs (rare for klein) use transformers' names under ``text_encoder.`` or kohya's ``lora_te1_``.

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
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_DOUBLE_SPLIT = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_WHOLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}


def diffusers_targets(role: str, names: Sequence[str]) -> dict[str, Target]:
    """diffusers ``Flux2Transformer2DModel`` module names -> our layers."""
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
        elif (m := _SINGLE.match(name)) and m.group(2) in _SINGLE_WHOLE:
            n, rest = m.groups()
            out[f"single_transformer_blocks.{n}.{_SINGLE_WHOLE[rest]}"] = Target(role, name)
    return out


LORA_SPELLINGS = {
    "unet": transformer_spellings(diffusers_targets),
    # Qwen3 in transformers' names (Qwen3ForCausalLM: model.layers.N.self_attn.q_proj)
    "text_encoder": Spellings(flat=("lora_te1_", "lora_te_"), dotted=("text_encoder.",)),
}


def lora_keys(modules: Mapping[str, Sequence[str]]) -> dict[str, Target]:
    """LoRA module name in any FLUX.2 trainer's naming -> our layer (see the module docstring)."""
    return table(modules, LORA_SPELLINGS)
