"""FLUX.2 [klein]'s conditioner: Qwen3's hidden states of layers 9, 18 and 27 side by side at all 512 positions.

As diffusers' ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` (and ComfyUI's klein tokenizer): the prompt in the
chat template with the empty think block (``qwen3_tokenizer.TEMPLATES["klein"]``), padded to 512 tokens, run
through Qwen3 with the attention mask; every position, padding included, goes to the transformer without a
mask. klein 4B reads Qwen3-4B (3 x 2560 = 7680 features), 9B Qwen3-8B (3 x 4096). Base klein's CFG encodes the
negative prompt the same way (the pipeline's is the empty prompt, Darkroom's default ``negative_prompt``).
What both Qwen3 families share (offload, dtype, truncation) is ``core.models.qwen3_conditioner``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from core.errors import CheckpointError
from core.models.qwen3 import KLEIN_LAYERS, klein_prompt_embeds
from core.models.qwen3_conditioner import Qwen3Conditioner


class Flux2KleinConditioner(Qwen3Conditioner):
    """``encode(text, settings) -> Conditioning(context [1, 512, 3 * H_qwen])``."""

    template = "klein"

    def __init__(self, components: Mapping[str, torch.nn.Module]) -> None:
        reads = components["unet"].config.context_in_dim
        width = components["text_encoder"].config.hidden_size
        if reads != len(KLEIN_LAYERS) * width:
            raise CheckpointError(
                "the FLUX.2 text encoder",
                f"it is a Qwen3 {width} wide, whose {len(KLEIN_LAYERS)} layers give {len(KLEIN_LAYERS) * width} "
                f"features, but this transformer reads {reads} (klein 4B takes Qwen3-4B, 2560 wide; klein 9B "
                "Qwen3-8B, 4096 wide; FLUX.2 dev's Mistral text encoder is not supported)",
            )
        layers = components["text_encoder"].config.num_hidden_layers
        if layers < max(KLEIN_LAYERS):
            raise CheckpointError(
                "the FLUX.2 text encoder",
                f"it is a Qwen3 of {layers} layers, but klein reads the states after layers "
                f"{', '.join(map(str, KLEIN_LAYERS))} (Qwen3-4B and -8B have 36); use the qwen_3_4b / qwen_3_8b file",
            )
        super().__init__(components)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return klein_prompt_embeds(self.qwen, input_ids, attention_mask)
