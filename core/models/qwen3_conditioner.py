"""The part of a Qwen3-conditioned family's conditioner that Z-Image and FLUX.2 [klein] share.

Both wrap the prompt in a Qwen3 chat template (``core.models.qwen3_tokenizer.TEMPLATES``), tokenize it to 512
tokens and run Qwen3; they differ only in which hidden states they keep (Z-Image: ``hidden_states[-2]`` of the
real tokens; klein: layers 9, 18 and 27 side by side at every position). A family's conditioner subclasses
:class:`Qwen3Conditioner`, names its ``template`` and implements :meth:`features` and :meth:`conditioning`.

Qwen3-4B is 8 GB in bf16 (the 8B 16 GB) and runs once per prompt (the pipeline's prompt cache makes a repeat
free), so on a GPU it comes to the device only to encode and goes back to the CPU afterwards, as Flux.1's T5
does. It runs in bf16 or fp32, never fp16 (``core.models.qwen3.compute_dtype``). A1111 emphasis is dropped
(words kept) as for Flux: these models were trained on plain captions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from core.models import qwen3_tokenizer
from core.models.conditioning import Conditioning, EncoderSettings
from core.models.flux_conditioner import plain_prompt
from core.models.qwen3 import COMPUTE_DTYPES, compute_dtype

log = logging.getLogger(__name__)


class Qwen3Conditioner:
    """``encode(text, settings) -> Conditioning`` for a denoiser that reads Qwen3 hidden states."""

    template = ""  # a qwen3_tokenizer.TEMPLATES key
    max_length = qwen3_tokenizer.MAX_LENGTH

    def __init__(self, components: Mapping[str, torch.nn.Module]) -> None:
        self.qwen = components["text_encoder"]
        weight = next(components["unet"].parameters())
        self.device, self.dtype = weight.device, weight.dtype
        qwen_dtype = self.qwen.model.embed_tokens.weight.dtype
        if qwen_dtype not in COMPUTE_DTYPES:  # fp16 on a GPU, or packed weights: compute in bf16/fp32
            self.qwen.to(compute_dtype(qwen_dtype))
        self.runs = 0  # Qwen3 forward passes, for tests and stats
        self.truncated = 0  # tokens cut off the last prompt encoded (the template counts towards the 512)
        self._offload()

    def _offload(self) -> None:
        if self.device.type != "cpu":
            self.qwen.to("cpu")

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The family's text features ``[1, tokens, D]`` from Qwen3 (on its device)."""
        raise NotImplementedError

    def conditioning(self, context: torch.Tensor) -> Conditioning:
        """The denoiser's conditioning from ``features`` (on the denoiser's device and dtype)."""
        return Conditioning(context)

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning:
        tokens = qwen3_tokenizer.tokenize(plain_prompt(text), self.template, self.max_length)
        self.truncated = tokens.truncated[0]
        if self.truncated:  # said once per prompt: the prompt cache keeps the encoding
            log.warning("the prompt is %d Qwen3 tokens longer than the %d this model reads; its end is cut off",
                        self.truncated, self.max_length)
        with torch.inference_mode():
            self.qwen.to(self.device)
            try:
                qwen_device = self.qwen.model.embed_tokens.weight.device
                context = self.features(tokens.input_ids.to(qwen_device), tokens.attention_mask.to(qwen_device))
                self.runs += 1
            finally:
                self._offload()
        return self.conditioning(context.to(device=self.device, dtype=self.dtype))
