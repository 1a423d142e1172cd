"""Feature caches (core/accel/feature_cache.py): DeepCache and first-block cache on the tiny UNet and Flux,
checked against hand-worked behaviour; the request fields, warnings and the infotext round trip."""

from __future__ import annotations

import pytest
import torch

from core.accel import feature_cache
from core.accel.cache_options import cache_warnings
from core.accel.feature_cache import CacheSettings, FeatureCache
from core.errors import RequestError
from core.metadata import format_infotext, infotext_to_request
from core.models.families import get_family
from core.models.flux import Flux, FluxConfig, img_ids, txt_ids
from core.models.testing import random_state_dict
from core.models.unet import UNetConfig, UNetModel
from core.request import GenerationRequest
from tests.reference import rel_err, torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def unet() -> UNetModel:
    torch.manual_seed(0)
    cfg = UNetConfig.preset("sd15", "tiny")
    with torch.device("meta"):
        meta = UNetModel(cfg)
    model = UNetModel(cfg)
    model.load_state_dict(random_state_dict(meta, seed=1), strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet_inputs(unet: UNetModel):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)  # a CFG batch: [cond; uncond]
    context = torch.randn(2, 7, unet.config.context_dim, generator=g)
    return x, context


def _run(unet, x, t, context, cache: FeatureCache | None):
    if cache is None:
        return unet(x, torch.full((x.shape[0],), float(t)), context)
    with cache.active():
        return unet(x, torch.full((x.shape[0],), float(t)), context)


class _BlockCalls:
    """Counts calls of the middle block and of each input block (forward hooks)."""

    def __init__(self, unet: UNetModel) -> None:
        self.middle = 0
        self.inputs = [0] * len(unet.input_blocks)
        self.handles = [unet.middle_block.register_forward_hook(lambda *_: self._mid())]
        for i, block in enumerate(unet.input_blocks):
            self.handles.append(block.register_forward_hook(lambda *_, i=i: self._inp(i)))

    def _mid(self) -> None:
        self.middle += 1

    def _inp(self, i: int) -> None:
        self.inputs[i] += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_deepcache_interval_n_runs_one_full_pass_and_n_minus_1_shallow(unet, unet_inputs, interval):
    x, context = unet_inputs
    cache = FeatureCache(CacheSettings(deepcache_interval=interval, deepcache_branch=0))
    calls = _BlockCalls(unet)
    try:
        for step in range(2 * interval):
            _run(unet, x + 0.01 * step, 900 - 50 * step, context, cache)
    finally:
        calls.close()
    assert (cache.stats.full, cache.stats.shallow) == (2, 2 * (interval - 1))
    assert calls.middle == 2  # the deep part runs on full passes only
    # branch 0: the stem and the first ResBlock run every call, the deeper input blocks on full passes
    assert calls.inputs[:2] == [2 * interval, 2 * interval]
    assert calls.inputs[2:] == [2] * (len(unet.input_blocks) - 2)


@pytest.mark.parametrize("branch", [0, 2])
def test_deepcache_shallow_call_on_the_same_input_equals_the_full_pass(unet, unet_inputs, branch):
    """Reusing the deep feature of an identical call changes nothing, bit for bit: the shallow branch is the
    same computation on the same tensors."""
    x, context = unet_inputs
    plain = _run(unet, x, 500, context, None)
    cache = FeatureCache(CacheSettings(deepcache_interval=3, deepcache_branch=branch))
    first = _run(unet, x, 500, context, cache)
    second = _run(unet, x, 500, context, cache)
    assert cache.stats.shallow == 1
    assert torch.equal(first, plain) and torch.equal(second, plain)
    # a different input on a shallow call gives a different (approximate) result
    moved = _run(unet, x + 0.5, 500, context, cache)
    assert not torch.equal(moved, _run(unet, x + 0.5, 500, context, None))


def test_deepcache_branch_beyond_the_unet_is_refused(unet, unet_inputs):
    x, context = unet_inputs
    cache = FeatureCache(CacheSettings(deepcache_interval=2, deepcache_branch=len(unet.input_blocks) - 1))
    with pytest.raises(RequestError, match="deepcache_branch"):
        _run(unet, x, 500, context, cache)


def test_first_block_cache_threshold_zero_equals_no_cache_bit_for_bit(unet, unet_inputs):
    x, context = unet_inputs
    request = GenerationRequest(model="m", fbcache_threshold=0.0)
    with feature_cache.for_pass(request) as cache:
        assert cache is None and feature_cache.current() is None
        out = _run(unet, x, 700, context, None)
    assert torch.equal(out, _run(unet, x, 700, context, None))
    # a threshold no call reaches computes every call in full, also bit for bit
    cache = FeatureCache(CacheSettings(fbcache_threshold=1e-9))
    for step in range(3):
        xs = x + 0.1 * step
        assert torch.equal(_run(unet, xs, 700 - step, context, cache), _run(unet, xs, 700 - step, context, None))
    assert (cache.stats.full, cache.stats.hits) == (3, 0)


def test_first_block_cache_small_threshold_stays_close_to_uncached(unet, unet_inputs):
    x, context = unet_inputs
    cache = FeatureCache(CacheSettings(fbcache_threshold=0.05))
    _run(unet, x, 600, context, cache)
    nudged = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    cached = _run(unet, nudged, 600, context, cache)
    assert cache.stats.hits == 1 and 0 < cache.stats.diffs[0] < 0.05
    plain = _run(unet, nudged, 600, context, None)
    assert not torch.equal(cached, plain)
    assert rel_err(cached, plain) < 0.02
    # a large change is computed in full again, and becomes the new reference
    _run(unet, x + 1.0, 600, context, cache)
    assert cache.stats.full == 2


def test_cache_state_is_per_input_shape_and_per_network(unet, unet_inputs):
    x, context = unet_inputs
    cache = FeatureCache(CacheSettings(deepcache_interval=3))
    _run(unet, x, 500, context, cache)
    _run(unet, x[:1], 500, context[:1], cache)  # another shape (e.g. a hires pass) starts with a full pass
    assert (cache.stats.full, cache.stats.shallow) == (2, 0)
    cache.reset()
    _run(unet, x, 500, context, cache)
    assert cache.stats.full == 3


@pytest.fixture(scope="module")
def flux():
    cfg = FluxConfig.preset("flux", "tiny", variant="schnell")
    with torch.device("meta"):
        meta = Flux(cfg)
    model = Flux(cfg)
    model.load_state_dict(random_state_dict(meta, seed=4), strict=True)
    model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    inputs = dict(
        img=torch.randn(2, 16, cfg.in_channels, generator=g),
        img_ids=img_ids(8, 8),
        txt=torch.randn(2, 5, cfg.context_in_dim, generator=g),
        txt_ids=txt_ids(5),
        timesteps=torch.tensor([0.7, 0.7]),
        y=torch.randn(2, cfg.vec_in_dim, generator=g),
    )
    return model, inputs


def test_flux_first_block_cache(flux):
    model, inputs = flux
    plain = model(**inputs)
    cache = FeatureCache(CacheSettings(fbcache_threshold=0.05))
    with cache.active():
        full = model(**inputs)
        nudged = {**inputs, "img": inputs["img"] + 1e-3 * torch.randn(inputs["img"].shape)}
        hit = model(**nudged)
    assert torch.equal(full, plain)
    assert (cache.stats.full, cache.stats.hits) == (1, 1)
    reference = model(**nudged)
    assert not torch.equal(hit, reference)
    assert rel_err(hit, reference) < 0.02
    # DeepCache has no Flux hook: the network runs uncached
    with FeatureCache(CacheSettings(deepcache_interval=3)).active():
        assert torch.equal(model(**inputs), plain)


# ---- request fields, warnings, metadata ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"deepcache_interval": 0}, "deepcache_interval = 0 is invalid: an integer from 1 to 20"),
        ({"deepcache_interval": 2.5}, "deepcache_interval = 2.5 is invalid"),
        ({"deepcache_branch": 11}, "deepcache_branch = 11 is invalid: an integer from 0 to 10"),
        ({"fbcache_threshold": -0.1}, "fbcache_threshold = -0.1 is invalid: a number from 0.0 to 1.0"),
        ({"fbcache_threshold": "0.1"}, "fbcache_threshold = '0.1' is invalid"),
        ({"deepcache_interval": 3, "fbcache_threshold": 0.1}, "choose one"),
    ],
)
def test_cache_fields_are_validated(fields, message):
    with pytest.raises(RequestError) as err:
        GenerationRequest.from_dict({"model": "m", **fields})
    assert message in str(err.value)


def test_cache_fields_round_trip_through_the_infotext_and_the_dict():
    for fields in ({"deepcache_interval": 3, "deepcache_branch": 2}, {"fbcache_threshold": 0.12}):
        request = GenerationRequest(model="m", prompt="a cat", seed=5, **fields)
        text = format_infotext(request, 5)
        back = infotext_to_request(text)
        for key, value in fields.items():
            assert getattr(back, key) == value
        assert GenerationRequest.from_dict(request.to_dict()) == request
    assert "DeepCache" not in format_infotext(GenerationRequest(model="m", seed=1), 1)
    assert GenerationRequest.from_dict({"model": "m", "fbcache_threshold": 1}).fbcache_threshold == 1.0


def test_cache_warnings_where_a_cache_does_not_apply():
    sd15 = get_family("sd15")
    assert cache_warnings(GenerationRequest(model="m", deepcache_interval=3, steps=20), sd15) == []
    few = cache_warnings(GenerationRequest(model="m", deepcache_interval=3, steps=4), sd15)
    assert len(few) == 1 and "DeepCache with 4 steps" in few[0]
    lcm = cache_warnings(GenerationRequest(model="m", fbcache_threshold=0.1, sampler="lcm", steps=20), sd15)
    assert len(lcm) == 1 and "first-block cache" in lcm[0]
    sd3 = get_family("sd3")  # detection-only: its network has no hook
    hookless = cache_warnings(GenerationRequest(model="m", deepcache_interval=3, steps=20), sd3)
    assert len(hookless) == 1 and "does not apply to" in hookless[0]
    assert cache_warnings(GenerationRequest(model="m", steps=4), sd15) == []


def test_built_in_cache_presets_turn_their_cache_on():
    from core.presets import apply_preset

    deep = GenerationRequest.from_dict(apply_preset("sd15-fast-deepcache", {"model": "m"}))
    assert (deep.deepcache_interval, deep.deepcache_branch, deep.fbcache_threshold) == (3, 0, 0.0)
    first = GenerationRequest.from_dict(apply_preset("sdxl-fast-fbcache", {"model": "m"}))
    assert first.fbcache_threshold == 0.2 and first.deepcache_interval == 1
    assert cache_warnings(deep, get_family("sd15")) == [] and cache_warnings(first, get_family("sdxl")) == []


def test_batch_warns_when_a_cache_cannot_help(tmp_path, monkeypatch):
    from tests.batch_harness import RecordingRunner, batch_runner

    run = batch_runner(tmp_path, monkeypatch, RecordingRunner)
    code, _, err = run("-", stdin='{"model": "fake", "steps": 4, "deepcache_interval": 3, "seed": 1}\n')
    assert code == 0
    assert "warning:" in err and "DeepCache with 4 steps" in err
    assert RecordingRunner.seen[0].deepcache_interval == 3
    code, _, err = run("-", stdin='{"model": "fake", "steps": 20, "deepcache_interval": 3, "seed": 1}\n')
    assert code == 0 and "DeepCache" not in err


def test_generate_runs_the_requests_cache_on_the_cfg_batch_and_fresh_per_image(tmp_path, monkeypatch):
    from core.models.testing import write_random_checkpoint
    from core.pipeline import generate, load_model

    path = tmp_path / "tiny.safetensors"
    write_random_checkpoint(path, "sd15", "tiny", seed=0)
    model = load_model(path, compute_hash=False)
    made: list[FeatureCache] = []
    real = FeatureCache.__init__

    def spy(self, settings):
        real(self, settings)
        made.append(self)

    monkeypatch.setattr(FeatureCache, "__init__", spy)
    base = GenerationRequest(model="tiny", prompt="a cat", steps=6, seed=3, width=64, height=64, batch_count=2)
    (plain, _), (plain2, _) = generate(model, base)
    assert made == []
    (cached, _), (cached2, _) = generate(model, base.replace(deepcache_interval=3))
    # one cache per image (pass), each 2 full calls and 4 shallow ones on the batch-2 [cond; uncond] call
    assert [(c.stats.full, c.stats.shallow) for c in made] == [(2, 4), (2, 4)]
    assert cached.tobytes() != plain.tobytes() and cached2.tobytes() != plain2.tobytes()
