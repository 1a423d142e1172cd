"""Flux.1's conditioner: T5-XXL hidden states for the text stream, CLIP-L's pooled vector for ``vector_in``.

As diffusers' ``FluxPipeline.encode_prompt`` (and BFL's ``HFEmbedder``): the prompt goes through T5 padded (or
truncated) to 512 tokens for dev and 256 for schnell, with no attention mask, and its last hidden state is the
context; CLIP-L sees the same prompt in one 77-token window (truncated, padded with ``<|endoftext|>``) and its
pooled output (the final-normed state at EOS, *without* ``text_projection``) is ``y``. Both have positions 0
in the transformer's RoPE (``core.models.flux.txt_ids``).

Flux was trained on plain captions: A1111 emphasis (``(word:1.2)``, ``[word]``, ``BREAK``) is read, its
brackets and weights dropped and the words kept, as Forge does (``core.request.family_warnings`` says so once
per job). LoRA tags were already removed by the pipeline.

T5-XXL is the largest part of a Flux set (9.5 GB in bf16) and runs once per prompt (the pipeline's prompt
cache makes a repeat free), so on a GPU it is moved there only to encode and back to the CPU afterwards. It runs
in bf16 or fp32, never fp16 (``core.models.t5.compute_dtype``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from core.models import t5_tokenizer
from core.models.conditioning import Conditioning, EncoderSettings
from core.models.prompt import parse_prompt
from core.models.t5 import COMPUTE_DTYPES, compute_dtype
from core.models.tokenizer import EOS_ID, get_tokenizer


def plain_prompt(text: str) -> str:
    """``text`` without A1111 emphasis: brackets and ``:weight`` dropped, words kept, ``BREAK`` as a space."""
    return " ".join("".join(piece for piece, _ in segment) for segment in parse_prompt(text))


def t5_length(transformer: torch.nn.Module) -> int:
    """T5 sequence length of a transformer: 512 for dev (guidance-distilled), 256 for schnell (BFL cli.py)."""
    return t5_tokenizer.MAX_LENGTH["dev" if transformer.config.guidance_embed else "schnell"]


class FluxConditioner:
    """``encode(text, settings) -> Conditioning(context [1, 512|256, 4096], pooled [1, 768], y = pooled)``."""

    def __init__(self, components: Mapping[str, torch.nn.Module]) -> None:
        self.clip_l = components["text_encoder"]
        self.t5 = components["text_encoder_2"]
        transformer = components["unet"]
        self.max_length = t5_length(transformer)
        weight = next(transformer.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.tokenizer = get_tokenizer(pad_id=EOS_ID)  # FLUX.1 tokenizer/: pad_token <|endoftext|>
        t5_dtype = self.t5.shared.weight.dtype
        if t5_dtype not in COMPUTE_DTYPES:  # fp16 on a GPU: T5's activations overflow it
            self.t5.to(compute_dtype(t5_dtype))
        self.t5_runs = 0  # T5 forward passes, for tests and stats
        self._offload_t5()

    def _offload_t5(self) -> None:
        """Off the GPU between prompts (only the denoiser and the VAE stay on the device)."""
        if self.device.type != "cpu":
            self.t5.to("cpu")

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning:
        plain = plain_prompt(text)
        with torch.inference_mode():
            clip_device = self.clip_l.text_model.embeddings.token_embedding.weight.device
            ids = torch.tensor([self.tokenizer.encode_window(plain)], dtype=torch.long, device=clip_device)
            pooled = self.clip_l.encode(ids, project=False).pooled
            self.t5.to(self.device)
            try:
                tokens = t5_tokenizer.tokenize(plain, self.max_length)
                context = self.t5(tokens.input_ids.to(self.t5.shared.weight.device))
                self.t5_runs += 1
            finally:
                self._offload_t5()
        context = context.to(device=self.device, dtype=self.dtype)
        pooled = pooled.to(device=self.device, dtype=self.dtype)
        return Conditioning(context, pooled, {"y": pooled})
