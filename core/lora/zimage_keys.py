"""How Z-Image LoRAs name our transformer's layers (``core.models.zimage``, ComfyUI's module names), per trainer.

| naming | example module | lands on |
| --- | --- | --- |
| ComfyUI tree (kohya / PEFT on the fused layers) | ``lora_unet_layers_0_attention_qkv``, ``diffusion_model.layers.0.attention.out`` | the same name |
| ai-toolkit / musubi (diffusers module names, ``diffusion_model.``) | ``diffusion_model.layers.0.attention.to_k`` | rows ``[D, 2D)`` of ``attention.qkv`` |
| kohya on diffusers names | ``lora_unet_layers_0_attention_to_out_0`` | ``attention.out`` |
| diffusers / PEFT | ``transformer.layers.0.feed_forward.w1`` | the same name |

diffusers' ``ZImageTransformer2DModel`` names differ from ComfyUI's only where its single-file converter renames
(``convert_z_image_transformer_checkpoint_to_diffusers``; shared/reference lora.md §3.5, families-2026.md §2.5):
``attention.to_q/to_k/to_v`` are the row blocks of the fused ``attention.qkv`` (``Target.rows``),
``attention.to_out.0`` is ``attention.out``, ``all_x_embedder.2-1`` / ``all_final_layer.2-1.*`` are
``x_embedder`` / ``final_layer.*``. Everything else (``feed_forward.w1..w3``, ``adaLN_modulation.0``,
``cap_embedder.1``, ``t_embedder.mlp.*``) has one name. The Qwen3 text encoder takes no LoRAs (Z-Image LoRAs train
the DiT only).

Stdlib only (the batch runner checks LoRAs from headers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from core.lora.keymap import Target, table, transformer_spellings

_ATTENTION = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+\.attention)\.(qkv|out)$")
_TOP = {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
        "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"}


def diffusers_targets(role: str, names: Sequence[str]) -> dict[str, Target]:
    """diffusers ``ZImageTransformer2DModel`` module names -> our layers."""
    out: dict[str, Target] = {}
    for name in names:
        if name in _TOP:
            out[_TOP[name]] = Target(role, name)
        elif m := _ATTENTION.match(name):
            head, layer = m.groups()
            if layer == "out":
                out[f"{head}.to_out.0"] = Target(role, name)
            else:
                for i, split in enumerate(("to_q", "to_k", "to_v")):
                    out[f"{head}.{split}"] = Target(role, name, (i, i + 1))
    return out


LORA_SPELLINGS = {
    "unet": transformer_spellings(diffusers_targets),
}


def lora_keys(modules: Mapping[str, Sequence[str]]) -> dict[str, Target]:
    """LoRA module name in any Z-Image trainer's naming -> our layer (see the module docstring)."""
    return table(modules, LORA_SPELLINGS)
