"""SD2.x's conditioner: the A1111 prompt through the OpenCLIP ViT-H text encoder, as ``Conditioning``.

Everything about the prompt is SD1.x's (``core.models.prompt``): A1111 weighting, ``BREAK``, 75-token chunks
with comma backtracking, "Original" emphasis per chunk. What differs is the tokenizer's padding and the layer:

- Padding: the SD2.x tokenizer pads with ``!`` (id 0) after EOS (stabilityai/stable-diffusion-2-1
  ``tokenizer/special_tokens_map.json``; A1111's OpenCLIP wrapper pads with 0 too), not with EOS as CLIP-L.
- Layer: SD2.x was trained on the penultimate block's output after ``ln_final`` (OpenCLIP ``layer =
  "penultimate"``; diffusers builds the encoder one block short; ComfyUI and A1111 agree).
- Clip skip counts from the end with SD2.x's own skip as the floor (Forge's "minimal clip skip" 2): 1 and 2
  both give the penultimate layer, so an A1111 infotext with ``Clip skip: 2`` (a common global setting, which
  A1111 ignores for SD2.x) reproduces; 3 and more take that layer from the end, still after ``ln_final``.
  A1111 ignores clip skip on SD2.x entirely, so only 3+ differs from it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from core.errors import RequestError
from core.models.conditioning import Conditioning, EncoderSettings
from core.models.open_clip import OpenCLIPTextModel
from core.models.prompt import COMMA_BACKTRACK, PromptChunk, apply_emphasis, build_chunks
from core.models.tokenizer import get_tokenizer

PAD_ID = 0  # "!"
MIN_LAYER_FROM_END = 2  # SD2.x's penultimate layer


def layer_from_end(clip_skip: int, layers: int) -> int:
    """The encoder layer (from the end) a request's ``clip_skip`` selects on SD2.x (see the module docstring)."""
    layer = max(MIN_LAYER_FROM_END, clip_skip)
    if layer > layers:
        raise RequestError("clip_skip", clip_skip, f"at most {layers} for this model's {layers}-layer text encoder")
    return layer


@torch.no_grad()
def encode_chunks(model: OpenCLIPTextModel, chunks: list[PromptChunk], clip_skip: int = 1) -> torch.Tensor:
    """Encode weighted chunks in one batch and concatenate them: ``[1, 77 * len(chunks), width]``."""
    from core.models.embeddings import token_fixes

    param = model.token_embedding.weight
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=param.device)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)
    with token_fixes(model.token_embedding, chunks):
        hidden = model(ids, layer_from_end=layer_from_end(clip_skip, model.config.layers), final_norm=True)
    z = apply_emphasis(hidden, weights)
    return z.reshape(1, -1, z.shape[-1])


class OpenCLIPConditioner:
    """SD2.x: one OpenCLIP text encoder, no pooled vector (the SD2.x UNet takes none)."""

    def __init__(self, components: Mapping[str, torch.nn.Module], comma_backtrack: int = COMMA_BACKTRACK) -> None:
        self.text_encoder = components["text_encoder"]
        self.tokenizer = get_tokenizer(PAD_ID)
        self.comma_backtrack = comma_backtrack

    embeddings = None  # core.models.embeddings.EmbeddingLibrary: textual inversions named in prompts

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning:
        from core.models.embeddings import prompt_table

        table = prompt_table(self.embeddings, text, self.tokenizer, "", self.text_encoder.config.width)
        chunks = build_chunks(self.tokenizer, text, self.comma_backtrack, table)
        with torch.inference_mode():
            return Conditioning(encode_chunks(self.text_encoder, chunks, settings.clip_skip))
