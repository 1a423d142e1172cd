"""Header-only model files of several families, for listings and pre-load checks (stdlib only, no torch).

Detection needs only key names and shapes, so these files hold the families' marker keys with zero-size
tensors: a valid safetensors header with no data. They list and inspect like the real files, and fail to load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

U = "model.diffusion_model."
_UNET = {
    U + "input_blocks.0.0.weight": (0, 4, 3, 3),
    U + "input_blocks.0.0.bias": (0,),
    U + "time_embed.0.weight": (0, 320),
    U + "time_embed.0.bias": (0,),
    U + "out.2.weight": (0, 320, 3, 3),
    U + "out.2.bias": (0,),
}
_VAE = {"first_stage_model.decoder.conv_in.weight": (0, 4, 3, 3)}
KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "sd15": {**_UNET, U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (0, 768),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": (0,), **_VAE},
    "sd2": {**_UNET, U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (0, 1024),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (0, 1024), **_VAE},
    "sdxl": {**_UNET, U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (0, 2048),
             U + "label_emb.0.0.weight": (0, 2816), "conditioner.embedders.1.model.ln_final.weight": (0,), **_VAE},
    "flux": {U + "double_blocks.0.img_attn.norm.key_norm.scale": (0,), U + "img_in.weight": (0, 64),
             U + "guidance_in.in_layer.weight": (0, 256), U + "txt_in.weight": (0, 4096),
             U + "time_in.in_layer.weight": (0, 256), U + "vector_in.in_layer.weight": (0, 768),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (0,),
             "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": (0,),
             "vae.decoder.conv_in.weight": (0, 16, 3, 3)},
    "flux2": {U + "single_stream_modulation.lin.weight": (0, 3072), U + "img_in.weight": (3072, 0),
              U + "double_blocks.0.img_attn.norm.key_norm.scale": (0,), U + "txt_in.weight": (0, 7680),
              U + "time_in.in_layer.weight": (0, 256), U + "final_layer.linear.weight": (128, 0),
              "text_encoders.qwen3_4b.transformer.model.embed_tokens.weight": (0, 2560),
              "vae.decoder.conv_in.weight": (0, 32, 3, 3), "vae.bn.running_mean": (0,)},
    # ComfyUI's split diffusion model z_image_turbo_bf16.safetensors (no prefix)
    "zimage": {"cap_embedder.1.weight": (0, 2560), "layers.0.adaLN_modulation.0.weight": (0, 256),
               "x_embedder.weight": (0, 64)},
    "vae": {"decoder.conv_in.weight": (0, 4, 3, 3), "encoder.conv_in.weight": (0, 3, 3, 3)},  # a VAE file alone
    "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (0, 320)},  # no family markers
    "lora_sd15": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (0, 768)},
    "lora_sdxl": {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (0, 1280)},
    "lora_flux": {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": (0, 3072)},
}


def write_header_only(path: Path, family: str, dtype: str = "F16") -> Path:
    """A ``.safetensors`` file whose header has ``family``'s marker keys (zero-size tensors, no data)."""
    header = {key: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, 0]} for key, shape in KEYS[family].items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path
