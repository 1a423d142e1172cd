"""Feature caches that skip most of the denoiser on some steps: DeepCache and first-block cache.

Both rest on one observation: between neighbouring sampling steps the deep features of a diffusion network
change little, so a step can reuse them and compute only a cheap part (facts: ``shared/reference/sampling.md``
sections 6-7).

- **DeepCache** (Ma, Fang, Wang, CVPR 2024, arXiv 2312.00858), UNets: every ``interval`` network calls one full
  pass stores the feature that enters the up path's shallow end; the ``interval - 1`` calls in between run only
  the shallow branch (input blocks ``0..branch+1``, output blocks ``n-2-branch..n-1``, whose skips those input
  blocks give) on top of the stored feature. The branch id is the paper's: ``branch = 3 * level + layer``
  counts the down path's layers (two ResBlocks and the downsampler per level), so branch 0 is the first
  ResBlock (+ attention) and its output mirror, the cheapest branch (SD1.5: 14.6 % of a full pass).
- **First-block cache** (ParaAttention / Comfy-WaveSpeed): run the first block, ``r1 = out0 - in0``; while
  ``mean|r1 - r1_full| / mean|r1_full|`` (against the last fully computed call) stays under ``threshold``,
  output ``out0 + R`` with the rest-of-network residual ``R = final - out0`` of that full call. UNet: the first
  block is ``input_blocks[1]`` (after the stem conv), ``out`` always runs; Flux: ``double_blocks[0]``, with its
  own residual for the text stream.

A ``FeatureCache`` is made for one sampling pass (``for_pass``) and made current through a context variable;
the UNet's and Flux's ``forward`` ask :func:`current` and hand their blocks to it. State is kept per network and
input shape, so the refiner (another network) and a hires pass (another size) never see each other's features,
and a CFG batch ``[cond; uncond]`` is cached as one batch. Nothing here is global: leaving the pass drops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

_CURRENT: ContextVar[FeatureCache | None] = ContextVar("darkroom_feature_cache", default=None)


@dataclass(frozen=True)
class CacheSettings:
    """What to cache. ``deepcache_interval`` 1 and ``fbcache_threshold`` 0 are off."""

    deepcache_interval: int = 1
    deepcache_branch: int = 0
    fbcache_threshold: float = 0.0

    @classmethod
    def from_request(cls, request: Any) -> CacheSettings:
        return cls(
            deepcache_interval=getattr(request, "deepcache_interval", 1),
            deepcache_branch=getattr(request, "deepcache_branch", 0),
            fbcache_threshold=getattr(request, "fbcache_threshold", 0.0),
        )

    @property
    def enabled(self) -> bool:
        return self.deepcache_interval > 1 or self.fbcache_threshold > 0


@dataclass
class _State:
    """One network at one input shape during one pass."""

    calls: int = 0
    deep: torch.Tensor | None = None  # DeepCache: the feature entering the shallow end of the up path
    r1: torch.Tensor | None = None  # first-block cache: first block's residual at the last full call
    rest: tuple[torch.Tensor, ...] = ()  # ... and the rest of the network's residual(s) then


@dataclass
class CacheStats:
    """What a pass did, per network call: ``full`` passes, DeepCache ``shallow`` calls, first-block ``hits``."""

    full: int = 0
    shallow: int = 0
    hits: int = 0
    diffs: list[float] = field(default_factory=list)  # first-block cache: the relative change at each test

    @property
    def calls(self) -> int:
        return self.full + self.shallow + self.hits


class FeatureCache:
    """The caches of one sampling pass. Use ``with cache.active():`` around the sampler."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.stats = CacheStats()
        self._states: dict[tuple[int, tuple[int, ...]], _State] = {}

    @contextmanager
    def active(self) -> Iterator[FeatureCache]:
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def reset(self) -> None:
        """Forget every cached feature (a new image starts from scratch)."""
        self._states.clear()

    def _state(self, network: Any, x: torch.Tensor) -> _State:
        return self._states.setdefault((id(network), tuple(x.shape)), _State())

    def _first_block_hit(self, state: _State, r1: torch.Tensor) -> bool:
        """The first-block cache's test: has the first block's residual moved less than the threshold?"""
        threshold = self.settings.fbcache_threshold
        if threshold <= 0 or state.r1 is None or state.r1.shape != r1.shape:
            return False
        diff = float((r1 - state.r1).abs().mean() / state.r1.abs().mean().clamp_min(1e-12))
        self.stats.diffs.append(diff)
        return diff < threshold

    # ---- UNet (core.models.unet.UNetModel) ------------------------------------------------------------------

    def unet(self, unet: Any, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's blocks (everything before ``out``) on ``x``, with the configured cache."""
        s = self.settings
        if s.deepcache_interval > 1:
            return self._deepcache(unet, x, emb, context)
        if s.fbcache_threshold > 0:
            return self._unet_first_block(unet, x, emb, context)
        return unet.blocks(x, emb, context)

    def _deepcache(self, unet: Any, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        branch = self.settings.deepcache_branch
        n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
        if not 0 <= branch <= n_in - 2:
            from core.errors import RequestError

            raise RequestError("deepcache_branch", branch, f"a number from 0 to {n_in - 2} for this UNet")
        state = self._state(unet, x)
        full = state.calls % self.settings.deepcache_interval == 0 or state.deep is None
        state.calls += 1
        enter = n_out - 2 - branch  # the first output block of the shallow branch
        h, skips = x, []
        for block in unet.input_blocks[: n_in if full else branch + 2]:
            h = block(h, emb, context)
            skips.append(h)
        if full:
            self.stats.full += 1
            h = unet.middle_block(h, emb, context)
            for index in range(n_out):
                if index == enter:
                    state.deep = h
                h = unet.up_block(index, h, skips, emb, context)
            return h
        self.stats.shallow += 1
        h = state.deep
        for index in range(enter, n_out):
            h = unet.up_block(index, h, skips, emb, context)
        return h

    def _unet_first_block(self, unet: Any, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        state = self._state(unet, x)
        state.calls += 1
        stem = unet.input_blocks[0](x, emb, context)
        first = unet.input_blocks[1](stem, emb, context)
        r1 = first - stem if first.shape == stem.shape else first
        if self._first_block_hit(state, r1):
            self.stats.hits += 1
            return first + state.rest[0]
        self.stats.full += 1
        h = unet.blocks(x, emb, context, start=2, skips=[stem, first])
        state.r1, state.rest = r1, (h - first,)
        return h

    # ---- Flux (core.models.flux.Flux) -----------------------------------------------------------------------

    def flux(
        self, flux: Any, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux's double- and single-stream blocks on (img, txt), with the first-block cache if set."""
        if self.settings.fbcache_threshold <= 0:
            return flux.blocks(img, txt, vec, pe)
        state = self._state(flux, img)
        state.calls += 1
        img1, txt1 = flux.double_blocks[0](img, txt, vec, pe)
        if self._first_block_hit(state, img1 - img) and state.rest[1].shape == txt1.shape:
            self.stats.hits += 1
            return img1 + state.rest[0], txt1 + state.rest[1]
        self.stats.full += 1
        img_out, txt_out = flux.blocks(img1, txt1, vec, pe, start=1)
        state.r1, state.rest = img1 - img, (img_out - img1, txt_out - txt1)
        return img_out, txt_out


def current() -> FeatureCache | None:
    """The cache of the sampling pass running in this context, if any (networks call this in ``forward``)."""
    return _CURRENT.get()


@contextmanager
def for_pass(request: Any) -> Iterator[FeatureCache | None]:
    """A fresh cache for one sampling pass of ``request`` (its ``deepcache_*`` / ``fbcache_*`` fields), current
    inside the block; ``None`` (and nothing current) when the request asks for no cache."""
    settings = CacheSettings.from_request(request)
    if not settings.enabled:
        token = _CURRENT.set(None)
        try:
            yield None
        finally:
            _CURRENT.reset(token)
        return
    cache = FeatureCache(settings)
    with cache.active():
        yield cache
