"""A1111 prompt editing, alternation and AND: the per-step schedules, the per-call selection in the CFG
denoiser, and runs through the pipeline where the switch is visible in what the UNet receives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.errors import RequestError
from core.models.prompt_schedule import (
    ConditioningSchedule,
    active_index,
    prompt_schedule,
    schedule_steps,
    split_and,
)
from core.models.testing import write_random_checkpoint
from core.pipeline import PromptCache, generate, load_model, prompt_parts
from core.request import GenerationRequest, HiresFix
from core.sampling.denoisers import CFGDenoiser
from core.sampling.samplers import sample
from tests.reference import torch_threads

# (prompt, steps, hires_steps) -> A1111's schedule [(end_at_step, text)] (its documented examples, and cases
# checked against its grammar).
SCHEDULES = [
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[fe|]male", 4, None, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 5, None, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female")]),
    ("[a|(b:1.1)] x", 3, None, [(1, "a x"), (2, "(b:1.1) x"), (3, "a x")]),
    ("[cat:dog:0.5], [hat::2]", 8, None, [(2, "cat, hat"), (4, "cat, "), (8, "dog, ")]),
    ("[a:b:30]", 10, None, [(10, "a")]),  # cut to the steps
    ("[a:b:0]", 10, None, [(10, "b")]),
    ("[a:b:3] | c", 10, None, [(10, "[a:b:3] | c")]),  # '|' outside brackets: the grammar fails, all text
    ("[a:b:c:3]", 10, None, [(10, "[a:b:c:3]")]),
    ("\\[a:b:2\\]", 10, None, [(10, "\\[a:b:2\\]")]),  # escaped brackets are text for the weighting parser
    ("[a:b:3", 10, None, [(10, "[a:b:3")]),
    # hires pass: its own steps; step numbers count on from the first pass, fractions run from 1.0 to 2.0
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    ("[a:b:25]", 20, 10, [(5, "a"), (10, "b")]),
    ("[a:b:5]", 20, 10, [(10, "b")]),
    ("[a|b]", 20, 3, [(1, "a"), (2, "b"), (3, "a")]),
]


@pytest.mark.parametrize(("prompt", "steps", "hires", "expected"), SCHEDULES)
def test_schedules_are_a1111s(prompt, steps, hires, expected):
    assert prompt_schedule(prompt, steps, hires) == expected


def texts_per_call(prompt: str, steps: int) -> list[str]:
    schedule = prompt_schedule(prompt, steps)
    ends = [end for end, _ in schedule]
    return [schedule[active_index(ends, call)][1] for call in range(steps)]


def test_each_call_takes_the_first_entry_it_has_not_passed():
    # A1111 counts calls from 0 against 1-based end steps: the switch comes one call late, and alternation
    # repeats its first option once.
    assert texts_per_call("[cat:dog:2]", 4) == ["cat", "cat", "cat", "dog"]
    assert texts_per_call("[a|b]", 5) == ["a", "a", "b", "a", "b"]
    assert texts_per_call("[to:1]", 3) == ["", "", "to"]
    assert active_index([2, 4], 9) == 0  # past the end: the first entry, as A1111


def test_second_order_samplers_schedule_over_their_model_calls():
    assert schedule_steps("heun", 10) == 20 and schedule_steps("dpmpp_sde", 3) == 6
    assert schedule_steps("euler", 10) == 10 and schedule_steps("dpmpp_2m", 7) == 7


def test_and_splits_composable_parts_with_weights():
    assert split_and("a cat AND a dog:0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and("a red cat :  1.5 AND AND x") == [("a red cat", 1.5), ("", 1.0), (" x", 1.0)]
    assert split_and("(word:1.2), ANDROID") == [("(word:1.2), ANDROID", 1.0)]  # whole words only


# ---- the denoiser's selection ----------------------------------------------------------------------------


class Recorder:
    """A fake inner denoiser: D(x) = x + context mean per image; records each call's contexts."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def __call__(self, x, sigma, *, context):
        self.seen.append([float(v) for v in context[:, 0, 0]])
        return x + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def _cond(value: float, tokens: int = 2):
    from core.models.conditioning import Conditioning

    return Conditioning(torch.full((1, tokens, 3), value))


def test_cfg_denoiser_picks_each_calls_conditioning_and_composes_and_parts():
    # part 1: 1.0 for calls 0-1 then 2.0; part 2 (weight 0.5): 10.0; negative: -1.0 then -3.0 after call 0
    schedule = ConditioningSchedule(
        [((1, 4), [("p", _cond(1.0)), ("q", _cond(2.0))], 1.0), ((4,), [("r", _cond(10.0))], 0.5)],
        ((0, 4), [("n", _cond(-1.0)), ("m", _cond(-3.0))]),
        lambda conds, uncond: ([c for _, c in conds], uncond[1]),
    )
    inner = Recorder()
    denoiser = CFGDenoiser(inner, schedule, None, cfg=2.0)
    x = torch.zeros(2, 1, 1, 1)  # a batch of two images
    outs = [float(denoiser(x, 1.0)[0]) for _ in range(4)]
    assert inner.seen == [
        [1.0, 1.0, 10.0, 10.0, -1.0, -1.0],
        [1.0, 1.0, 10.0, 10.0, -3.0, -3.0],
        [2.0, 2.0, 10.0, 10.0, -3.0, -3.0],
        [2.0, 2.0, 10.0, 10.0, -3.0, -3.0],
    ]
    # D = D_u + cfg * sum w_i (D_i - D_u), by hand
    assert outs == [-1 + 2 * ((1 + 1) + 0.5 * (10 + 1)), -3 + 2 * ((1 + 3) + 0.5 * (10 + 3)),
                    -3 + 2 * ((2 + 3) + 0.5 * (10 + 3)), -3 + 2 * ((2 + 3) + 0.5 * (10 + 3))]
    assert len(schedule._done) == 3  # each distinct selection finished once


# ---- through the pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    write_random_checkpoint(path, "sd15", "tiny", seed=0)
    return load_model(path, compute_hash=False)


def request(**changes) -> GenerationRequest:
    base = GenerationRequest(model="tiny", prompt="a cat", negative_prompt="blurry", sampler="euler",
                             schedule="normal", steps=4, cfg=7.0, seed=3, width=64, height=64)
    return base.replace(**changes)


def unet_contexts(model, req: GenerationRequest, cache: PromptCache) -> list[torch.Tensor]:
    """Every UNet call's context batch during the job."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["context"].detach().clone())

    handle = model.checkpoint.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(model, req, cache=cache)
    finally:
        handle.remove()
    return seen


def test_prompt_editing_switches_what_the_unet_sees(model):
    cache = PromptCache()
    seen = unet_contexts(model, request(prompt="a [cat:dog:2]", negative_prompt="[blurry|ugly]"), cache)
    encoded = cache.misses
    enc = {text: cache.encode(model, text, 1).context[0] for text in ("a cat", "a dog", "blurry", "ugly")}
    assert cache.misses == encoded == 4  # each distinct text encoded once
    assert len(seen) == 4
    cond_texts = ["a cat", "a cat", "a cat", "a dog"]  # calls 0..2 up to step 2, then the switch
    uncond_texts = ["blurry", "blurry", "ugly", "blurry"]
    for context, cond, uncond in zip(seen, cond_texts, uncond_texts):
        assert torch.equal(context[0], enc[cond]) and torch.equal(context[1], enc[uncond])


def test_hires_pass_schedules_over_its_own_steps(model):
    cache = PromptCache()
    req = request(prompt="[a cat:a dog:1.5]", steps=2, hires=HiresFix(scale=1.5, steps=4, denoise=0.5))
    seen = unet_contexts(model, req, cache)
    cat, dog = (cache.encode(model, t, 1).context[0] for t in ("a cat", "a dog"))
    # first pass: 1.5 > 1 is past its end (all "a cat"); hires: (1.5 - 1) * 4 = step 2, so calls 0-2 then dog
    assert [torch.equal(c[0], cat) for c in seen] == [True, True, True, True, True, False]
    assert torch.equal(seen[-1][0], dog)


def test_and_parts_guide_as_composable_diffusion(model):
    """The pipeline's AND image equals a hand-run sampler guiding D_u + cfg * sum w_i (D_i - D_u) with
    separate network calls."""
    req = request(prompt="a cat AND a dog:0.5", cfg=5.0)
    (image, _), = generate(model, req, cache=PromptCache())
    cache = PromptCache()
    cat, dog, neg = (cache.encode(model, t, 1).model_kwargs() for t in ("a cat", " a dog", "blurry"))
    inner = model.denoiser()

    def by_hand(x, sigma):
        d_u = inner(x, sigma, **neg)
        return d_u + 5.0 * ((inner(x, sigma, **cat) - d_u) + 0.5 * (inner(x, sigma, **dog) - d_u))

    from core.pipeline import decode, latents_to_images
    from core.sampling.schedules import get_sigmas

    noise = model.noise_sampler([req.seed], 64, 64)
    sigmas = get_sigmas("normal", model.schedule, 4, 1.0, model.family)
    with torch.inference_mode():
        latents = sample("euler", by_hand, noise.initial() * sigmas[0], sigmas, noise_sampler=noise)
        expected = latents_to_images(decode(model, latents))[0]
    ours = torch.tensor(list(image.getdata()), dtype=torch.int16)
    theirs = torch.tensor(list(expected.getdata()), dtype=torch.int16)
    assert (ours - theirs).abs().max() <= 1  # batched vs separate calls: float rounding only


def test_and_needs_a_family_with_cfg(model, monkeypatch):
    from core.models.family import FlowSampling

    req = request(prompt="a cat AND a dog")
    assert prompt_parts(model, req) == [("a cat", 1.0), (" a dog", 1.0)]
    flow = dataclasses.replace(model.spec, sampling=FlowSampling())
    monkeypatch.setattr(type(model), "spec", property(lambda self: flow))
    with pytest.raises(RequestError, match="no classifier-free guidance to compose AND parts"):
        prompt_parts(model, req)
    assert prompt_parts(model, request(prompt="a cat:1.5")) == [("a cat:1.5", 1.0)]  # no weights either


def _text_schedule(prompt: str, steps: int) -> ConditioningSchedule:
    """A schedule whose conditioning for text t is a context full of ``ord(t[0])`` (the negative: -1)."""
    entries = prompt_schedule(prompt, steps)
    items = [(t, _cond(float(ord(t[0])))) for _, t in entries]
    return ConditioningSchedule([([e for e, _ in entries], items, 1.0)], ((steps,), [("", _cond(-1.0))]),
                                lambda conds, uncond: ([c for _, c in conds], uncond[1]))


def test_second_order_samplers_count_model_calls_and_a_refiner_carries_the_count_on():
    from core.pipeline import RefinerSwitch
    from core.sampling.denoisers import DiscreteSchedule

    inner = Recorder()
    heun_steps = 3
    denoiser = CFGDenoiser(inner, _text_schedule("[a|b]", schedule_steps("heun", heun_steps)), None, cfg=2.0)
    sample("heun", denoiser, torch.zeros(1, 1, 1, 1), [3.0, 2.0, 1.0, 0.0])
    assert len(inner.seen) == 5  # two calls per step, one for the last (Euler) step
    assert [chr(int(seen[0])) for seen in inner.seen] == ["a", "a", "b", "a", "b"]

    schedule = DiscreteSchedule()
    base_inner, refiner_inner = Recorder(), Recorder()
    base = CFGDenoiser(base_inner, _text_schedule("[a|b|c|d]", 4), None, cfg=2.0)
    refiner = CFGDenoiser(refiner_inner, _text_schedule("[a|b|c|d]", 4), None, cfg=2.0)
    switch = RefinerSwitch(base, refiner, schedule, 0.5)
    x = torch.zeros(1, 1, 1, 1)
    for t in (900, 700, 300, 100):  # the refiner takes t <= 499
        switch(x, float(schedule.t_to_sigma(t)))
    # calls 0-1 on the base (a, a), calls 2-3 on the refiner continue the schedule (b, c), not restart it
    assert [chr(int(s[0])) for s in base_inner.seen] == ["a", "a"]
    assert [chr(int(s[0])) for s in refiner_inner.seen] == ["b", "c"]
