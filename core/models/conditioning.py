"""Conditioning as a type: what a family's text encoders give the denoiser for one prompt.

Every family conditions on a cross-attention ``context`` (``[B, N, D]`` token states); most also have a
``pooled`` vector (``[B, P]``: CLIP's EOS state, used by SDXL inside its ``y`` vector and by Flux as ``vec``);
and some have extras the network takes by keyword (SDXL's ``y`` = pooled + size embedding, Flux's ids and
guidance later). ``model_kwargs()`` is what the denoiser passes to the network, so the sampler code never
needs to know which family it runs.

CFG runs cond and uncond in one network call: ``Conditioning.cat`` stacks them along the batch, which needs
equal token lengths: ``pad_to_same_length`` appends chunks of the empty prompt's context to the shorter one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from core.request import GenerationRequest


@dataclass(frozen=True)
class EncoderSettings:
    """The request fields that change a prompt's encoding (a prompt cache key part). Families with more
    (weighting modes, a second encoder's options) add fields here."""

    clip_skip: int = 1

    @classmethod
    def from_request(cls, request: GenerationRequest) -> EncoderSettings:
        return cls(clip_skip=request.clip_skip)


@dataclass(frozen=True)
class Conditioning:
    """One prompt's (or a batch of prompts') conditioning. All tensors share the batch dimension 0."""

    context: torch.Tensor  # [B, N, D]
    pooled: torch.Tensor | None = None  # [B, P]
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # network keyword -> [B, ...]

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    @property
    def tokens(self) -> int:
        return self.context.shape[1]

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the network: ``context`` and the family's extras (the pooled vector reaches
        the network only through an extra, e.g. SDXL's ``y``)."""
        return {"context": self.context, **self.extras}

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(
            fn(self.context),
            None if self.pooled is None else fn(self.pooled),
            {k: fn(v) for k, v in self.extras.items()},
        )

    def expand(self, batch: int) -> Conditioning:
        """One prompt's conditioning repeated for ``batch`` images (views, no copies)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot expand a batch of {self.batch} conditionings to {batch}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Stack along the batch (``[cond; uncond]`` for one CFG call). Token lengths must be equal."""
        if not items:
            raise ValueError("nothing to concatenate")
        lengths = {c.tokens for c in items}
        if len(lengths) > 1:
            raise ValueError(f"conditionings have different token lengths {sorted(lengths)}; pad them first")
        if len({c.pooled is None for c in items}) > 1 or len({tuple(sorted(c.extras)) for c in items}) > 1:
            raise ValueError("conditionings of different kinds (pooled vector or extras) cannot be batched")
        first = items[0]
        return Conditioning(
            torch.cat([c.context for c in items]),
            None if first.pooled is None else torch.cat([c.pooled for c in items]),  # type: ignore[misc]
            {k: torch.cat([c.extras[k] for c in items]) for k in first.extras},
        )

    def pad_to(self, tokens: int, empty: Conditioning) -> Conditioning:
        """Append copies of ``empty``'s context (the empty prompt: one chunk) up to ``tokens`` tokens."""
        chunk = empty.tokens
        missing = tokens - self.tokens
        if missing < 0 or missing % chunk or self.tokens % chunk:
            raise ValueError(f"conditioning lengths {self.tokens}, {tokens} are not multiples of {chunk}")
        if missing == 0:
            return self
        filler = empty.context.to(self.context.dtype).repeat(self.batch, missing // chunk, 1)
        return Conditioning(torch.cat([self.context, filler], dim=1), self.pooled, self.extras)


def pad_to_same_length(
    cond: Conditioning, uncond: Conditioning, empty: Conditioning
) -> tuple[Conditioning, Conditioning]:
    """Pad the shorter of ``cond``/``uncond`` with empty-prompt chunks so CFG can batch them (A1111's "pad
    prompt/negative prompt to be same length"; without it A1111 runs them in separate calls)."""
    tokens = max(cond.tokens, uncond.tokens)
    return cond.pad_to(tokens, empty), uncond.pad_to(tokens, empty)


class Conditioner(Protocol):
    """A family's prompt encoder, built from its loaded networks (``components`` by role)."""

    def __init__(self, components: Mapping[str, torch.nn.Module]) -> None: ...

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning: ...
