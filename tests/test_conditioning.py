"""Conditioning as a type: the operations CFG needs, the denoiser taking it, the prompt cache storing it."""

from __future__ import annotations

import pytest
import torch

from core.models.conditioning import Conditioning, EncoderSettings, pad_to_same_length
from core.models.prompt import pad_to_same_length as pad_tensors
from core.sampling.denoisers import CFGDenoiser


def _cond(batch: int = 1, tokens: int = 77, seed: int = 0, extras: bool = False) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    y = {"y": torch.randn(batch, 6, generator=g)} if extras else {}
    return Conditioning(torch.randn(batch, tokens, 8, generator=g), torch.randn(batch, 5, generator=g), y)


def test_pad_matches_the_tensor_padding_and_keeps_pooled():
    cond, uncond, empty = _cond(tokens=154, seed=1), _cond(seed=2), _cond(seed=3)
    a, b = pad_to_same_length(cond, uncond, empty)
    ta, tb = pad_tensors(cond.context, uncond.context, empty.context)
    assert torch.equal(a.context, ta) and torch.equal(b.context, tb) and b.tokens == 154
    assert a is cond and b.pooled is uncond.pooled  # the pooled vector is the prompt's, not padded
    with pytest.raises(ValueError, match="multiples"):
        _cond(tokens=70).pad_to(154, empty)


def test_cat_expand_and_model_kwargs():
    cond, uncond = _cond(seed=1, extras=True), _cond(seed=2, extras=True)
    both = Conditioning.cat([cond.expand(2), uncond.expand(2)])
    assert both.batch == 4 and both.pooled.shape == (4, 5)
    assert torch.equal(both.context[1], cond.context[0]) and torch.equal(both.extras["y"][2], uncond.extras["y"][0])
    assert set(both.model_kwargs()) == {"context", "y"}  # pooled reaches the network only through an extra
    with pytest.raises(ValueError, match="pad them first"):
        Conditioning.cat([cond, _cond(tokens=154)])
    with pytest.raises(ValueError, match="different kinds"):
        Conditioning.cat([cond, _cond()])
    with pytest.raises(ValueError):
        both.expand(3)


def test_cfg_denoiser_batches_conditionings_in_one_call():
    calls = []

    def inner(x, sigma, context, y):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + y.mean(dim=1).view(-1, 1, 1, 1)

    cond, uncond = _cond(seed=1, extras=True).expand(2), _cond(seed=2, extras=True).expand(2)
    x = torch.randn(2, 4, 3, 3)
    typed = CFGDenoiser(inner, cond, uncond, cfg=5.0)(x, 1.0)
    as_dicts = CFGDenoiser(inner, cond.model_kwargs(), uncond.model_kwargs(), cfg=5.0)(x, 1.0)
    assert calls == [4, 4] and torch.equal(typed, as_dicts)


def test_prompt_cache_keys_on_model_settings_and_text():
    from core.pipeline import PromptCache

    encoded = []

    class Conditioner:
        def encode(self, text, settings):
            encoded.append((text, settings))
            return _cond(seed=len(encoded))

    class Model:
        key = ("model.safetensors", None)
        conditioner = Conditioner()

    cache = PromptCache()
    first = cache.encode(Model(), "a cat", EncoderSettings(clip_skip=1))
    assert isinstance(first, Conditioning)
    assert cache.encode(Model(), "a cat", 1) is first  # a bare clip skip is the same settings
    cache.encode(Model(), "a cat", EncoderSettings(clip_skip=2))
    other = Model()
    other.key = ("other.safetensors", None)
    cache.encode(other, "a cat", 1)
    assert (cache.hits, cache.misses) == (1, 3)
    assert encoded == [("a cat", EncoderSettings(1)), ("a cat", EncoderSettings(2)), ("a cat", EncoderSettings(1))]
