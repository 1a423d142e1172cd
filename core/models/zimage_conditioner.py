"""Z-Image's conditioner: Qwen3-4B's second-to-last hidden states of the prompt's real tokens.

As ``ZImagePipeline._encode_prompt`` (and ComfyUI's ``z_image`` text encoder): the prompt inside Qwen3's chat
template (``enable_thinking=True``: no think block), 512 tokens at most, ``hidden_states[-2]`` at the positions the
attention mask keeps, so each prompt has its own length (the DiT pads it to a multiple of 32 with its learned
``cap_pad_token``; padding is never seen as text). See :mod:`core.models.qwen3_conditioner` for what this shares
with FLUX.2 [klein] (template, bf16/fp32, Qwen3 off the GPU between prompts).

CFG runs the prompt and the negative prompt in one DiT call, and a ``Conditioning`` batches only equal lengths:
the features are stored zero-padded to the tokenizer's 512 with their real length in ``cap_lens``, and the
sampler-side adapter (``core.models.zimage.LatentZImage``) cuts each row back to its length, so the DiT sees
exactly what the reference pipeline gives it (a ragged batch of unpadded features).
"""

from __future__ import annotations

import torch

from core.models.conditioning import Conditioning
from core.models.qwen3 import zimage_prompt_embeds
from core.models.qwen3_conditioner import Qwen3Conditioner


class ZImageConditioner(Qwen3Conditioner):
    """``encode(text, settings) -> Conditioning(context [1, 512, 2560] zero-padded, extras {"cap_lens": [1]})``."""

    template = "zimage"

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (real,) = zimage_prompt_embeds(self.qwen, input_ids, attention_mask)  # [tokens, H], padding removed
        return real[None]

    def conditioning(self, context: torch.Tensor) -> Conditioning:
        tokens = context.shape[1]
        padded = context.new_zeros(1, self.max_length, context.shape[2])
        padded[:, :tokens] = context
        lengths = torch.tensor([tokens], dtype=torch.int64, device=context.device)
        return Conditioning(padded, None, {"cap_lens": lengths})
