"""SDXL's conditioners: A1111 prompts through CLIP-L and OpenCLIP bigG, plus the size (and aesthetic) vector.

Base (Podell et al. 2023, SGM ``GeneralConditioner``): the prompt goes through both encoders in 75-token
chunks with A1111 weighting, each encoder on its own (the tokenizers split the same way; CLIP-L pads with
``<|endoftext|>``, bigG with ``!`` = id 0, as the real ``tokenizer_2`` config says). Each chunk takes both
encoders' penultimate hidden states without the final norm, concatenated to ``768 + 1280 = 2048``; emphasis
(z * w, mean restored) is applied per encoder, as A1111's per-embedder hijack does. The pooled vector is bigG's
last layer after ``ln_final`` at EOS, through ``text_projection``, from the *first* chunk (A1111 and Forge).

The UNet's ``y`` (``label_emb`` input) is that pooled vector followed by Fourier features (the LDM timestep
embedding, cosines first) of original size ``(h, w)``, crop top-left ``(0, 0)`` and target size ``(h, w)``:
``1280 + 6 x 256 = 2816``. It depends on the image size, not only on the text, so ``encode`` returns the text
part (what the prompt cache stores) and ``for_image`` adds ``y`` for one image size (the hires pass gets its
own, as in A1111).

An empty *negative* prompt is all zeros (cross-attention context and pooled vector; the size features stay),
as A1111 (``force_zero_negative_prompt``), Forge and diffusers (``force_zeros_for_empty_prompt``) do for SDXL
base.

Refiner: bigG alone (context 1280), ``y = pooled + Fourier(h, w, crop top, crop left, aesthetic score)``:
``1280 + 5 x 256 = 2560``, aesthetic score 6.0 for the prompt and 2.5 for the negative prompt (the SGM and
A1111 defaults).

Clip skip: SDXL was trained on the penultimate layers, and A1111 ignores its clip skip setting for SDXL by
default (``sdxl_clip_l_skip`` off); so does this conditioner.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from core.models.conditioning import Conditioning, EncoderSettings
from core.models.prompt import COMMA_BACKTRACK, PromptChunk, apply_emphasis, build_chunks
from core.models.tokenizer import EOS_ID, get_tokenizer
from core.models.unet import timestep_embedding

OPEN_CLIP_PAD_ID = 0  # "!" in the CLIP vocabulary: tokenizer_2's pad_token
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def fourier_features(values: list[float], dim: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``[batch, len(values) * dim]``: each value's ``dim``-wide sinusoidal embedding, concatenated."""
    emb = timestep_embedding(torch.tensor(values, dtype=torch.float32, device=like.device), dim)
    return emb.reshape(1, -1).to(like.dtype).expand(batch, -1)


def _feature_dim(unet: torch.nn.Module, pooled_dim: int, count: int) -> int:
    """Width of one Fourier feature, from the UNet's ``y`` width (256 in the released models)."""
    adm = unet.config.adm_in_channels
    if adm is None or adm <= pooled_dim or (adm - pooled_dim) % count:
        raise ValueError(
            f"the UNet's label_emb takes {adm} features, which is not {pooled_dim} (pooled text) + {count} "
            "Fourier features of equal width"
        )
    return (adm - pooled_dim) // count


def _ids(chunks: list[PromptChunk], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
    return ids, torch.tensor([c.weights for c in chunks], dtype=torch.float32)


class _SDXLBase:
    """What the base and the refiner conditioners share: chunking, bigG, the ``y`` vector."""

    features = 6  # Fourier features after the pooled vector
    embeddings = None  # core.models.embeddings.EmbeddingLibrary: textual inversions named in prompts

    def __init__(self, components: Mapping[str, torch.nn.Module], comma_backtrack: int = COMMA_BACKTRACK) -> None:
        self.big_g = components["text_encoder_2"]
        self.tokenizer_g = get_tokenizer(pad_id=OPEN_CLIP_PAD_ID)
        self.comma_backtrack = comma_backtrack
        self.feature_dim = _feature_dim(components["unet"], self.big_g.config.projection_dim, self.features)

    def _big_g(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted penultimate states ``[k, 77, 1280]``, pooled vector of the first chunk ``[1, 1280]``)."""
        from core.models.embeddings import prompt_table, token_fixes

        table = prompt_table(self.embeddings, text, self.tokenizer_g, "clip_g", self.big_g.config.width)
        chunks = build_chunks(self.tokenizer_g, text, self.comma_backtrack, table)
        ids, weights = _ids(chunks, self.big_g.token_embedding.weight.device)
        with token_fixes(self.big_g.token_embedding, chunks):
            out = self.big_g.encode(ids, layer_from_end=2, final_norm=False)
        return apply_emphasis(out.hidden, weights), out.pooled[:1]

    def _numbers(self, width: int, height: int, negative: bool) -> list[float]:
        return [height, width, 0, 0, height, width]

    def for_image(self, cond: Conditioning, text: str, width: int, height: int, *, negative: bool) -> Conditioning:
        """``cond`` (from ``encode(text)``, maybe padded) with the UNet's ``y`` for a ``width`` x ``height``
        image; an empty negative prompt becomes zeros first."""
        if cond.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled vector")
        context, pooled = cond.context, cond.pooled
        if negative and text == "":
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        features = fourier_features(self._numbers(width, height, negative), self.feature_dim, pooled.shape[0], pooled)
        return Conditioning(context, pooled, {**cond.extras, "y": torch.cat([pooled, features], dim=1)})


class SDXLConditioner(_SDXLBase):
    """SDXL base: CLIP-L + bigG (see the module docstring)."""

    def __init__(self, components: Mapping[str, torch.nn.Module], comma_backtrack: int = COMMA_BACKTRACK) -> None:
        super().__init__(components, comma_backtrack)
        self.clip_l = components["text_encoder"]
        self.tokenizer_l = get_tokenizer(pad_id=EOS_ID)

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning:
        from core.models.embeddings import prompt_table, token_fixes

        with torch.inference_mode():
            table = prompt_table(self.embeddings, text, self.tokenizer_l, "clip_l", self.clip_l.config.width)
            chunks = build_chunks(self.tokenizer_l, text, self.comma_backtrack, table)
            lookup = self.clip_l.text_model.embeddings.token_embedding
            ids, weights = _ids(chunks, lookup.weight.device)
            # A1111 clip skip 2 = the penultimate layer; SGM takes it without the final norm.
            with token_fixes(lookup, chunks):
                z_l = apply_emphasis(self.clip_l(ids, clip_skip=2, final_norm=False), weights)
            z_g, pooled = self._big_g(text)
            if z_l.shape[0] != z_g.shape[0]:  # the tokenizers differ only in padding: never
                raise RuntimeError(f"CLIP-L made {z_l.shape[0]} chunks of this prompt but bigG {z_g.shape[0]}")
            context = torch.cat([z_l, z_g.to(z_l.dtype)], dim=-1)
        return Conditioning(context.reshape(1, -1, context.shape[-1]), pooled)


class SDXLRefinerConditioner(_SDXLBase):
    """SDXL refiner: bigG only, aesthetic score in place of the target size."""

    features = 5

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning:
        with torch.inference_mode():
            z_g, pooled = self._big_g(text)
        return Conditioning(z_g.reshape(1, -1, z_g.shape[-1]), pooled)

    def _numbers(self, width: int, height: int, negative: bool) -> list[float]:
        return [height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
