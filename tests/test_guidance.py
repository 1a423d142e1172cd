"""Classifier-free guidance: one batched forward, cfg == 1 shortcut, guidance_rescale as diffusers."""

from __future__ import annotations

import pytest
import torch

from core.sampling.denoisers import CFGDenoiser, DiscreteSchedule, EpsDenoiser
from core.sampling.samplers import sample
from core.sampling.schedules import karras

SD = DiscreteSchedule()
B = 2


class SpyModel:
    """eps depends on x, t and the conditioning, and records every call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x_in, t, context, y=None, flag=None):
        self.calls.append({"batch": x_in.shape[0], "t": t.clone(), "context": context.clone(), "flag": flag})
        c = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x_in * (1.0 + c)) * (0.5 + t.reshape(-1, 1, 1, 1) / 1000.0) + 0.3 * c


def conds():
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(B, 77, 16, generator=g)
    uncond = torch.randn(B, 77, 16, generator=g)
    x = torch.randn(B, 4, 8, 8, generator=g) * 3.0
    return cond, uncond, x


def eps(model, x, sigma, context):
    return model(x / (sigma**2 + 1) ** 0.5, SD.sigma_to_t(torch.full((x.shape[0],), sigma)).float(), context)


def test_one_batched_forward_with_cond_then_uncond():
    cond, uncond, x = conds()
    spy = SpyModel()
    cfg = CFGDenoiser(EpsDenoiser(spy, SD), {"context": cond, "flag": "keep"}, {"context": uncond}, cfg=7.5)
    out = cfg(x, 2.5)
    assert len(spy.calls) == 1
    call = spy.calls[0]
    assert call["batch"] == 2 * B and call["flag"] == "keep"
    assert torch.equal(call["context"], torch.cat([cond, uncond]))
    assert torch.equal(call["t"][:B], call["t"][B:])
    probe = SpyModel()
    e_c, e_u = eps(probe, x, 2.5, cond), eps(probe, x, 2.5, uncond)
    expect = x - 2.5 * (e_u + 7.5 * (e_c - e_u))  # CFG on eps == CFG on x0
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_cfg_one_skips_the_unconditional_pass():
    cond, uncond, x = conds()
    spy = SpyModel()
    out = CFGDenoiser(EpsDenoiser(spy, SD), {"context": cond}, {"context": uncond}, cfg=1.0)(x, 1.7)
    assert len(spy.calls) == 1 and spy.calls[0]["batch"] == B
    assert torch.equal(spy.calls[0]["context"], cond)
    torch.testing.assert_close(out, x - 1.7 * eps(SpyModel(), x, 1.7, cond))


@pytest.fixture(scope="module")
def rescale_noise_cfg():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    return rescale_noise_cfg


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers_on_eps(phi, rescale_noise_cfg):
    cond, uncond, x = conds()
    out = CFGDenoiser(EpsDenoiser(SpyModel(), SD), {"context": cond}, {"context": uncond}, 6.0, phi)(x, 3.0)
    probe = SpyModel()
    e_c, e_u = eps(probe, x, 3.0, cond), eps(probe, x, 3.0, uncond)
    guided = rescale_noise_cfg(e_u + 6.0 * (e_c - e_u), e_c, guidance_rescale=phi)
    torch.testing.assert_close(out, x - 3.0 * guided, rtol=1e-5, atol=1e-5)
    if phi > 0:  # it must change the result, or the test proves nothing
        plain = CFGDenoiser(EpsDenoiser(SpyModel(), SD), {"context": cond}, {"context": uncond}, 6.0)(x, 3.0)
        assert (plain - out).abs().max() > 1e-3


def test_guided_euler_run_matches_a_diffusers_style_loop(rescale_noise_cfg):
    """The whole txt2img loop as diffusers pipelines write it (EulerDiscrete on the same karras sigmas)."""
    from diffusers import EulerDiscreteScheduler

    cond, uncond, x = conds()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   use_karras_sigmas=True, timestep_spacing="linspace")  # fmt: skip
    sched.set_timesteps(6)
    sigmas = karras(SD, 6)
    model = SpyModel()
    lat = x.clone()
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([lat, lat]), t)
        e_c, e_u = model(inp, t.expand(2 * B), torch.cat([cond, uncond])).chunk(2)
        e = rescale_noise_cfg(e_u + 5.0 * (e_c - e_u), e_c, guidance_rescale=0.5)
        lat = sched.step(e, t, lat).prev_sample
    guided = CFGDenoiser(EpsDenoiser(SpyModel(), SD), {"context": cond}, {"context": uncond}, 5.0, 0.5)
    ours = sample("euler", guided, x.clone(), sigmas)
    assert float((ours - lat).norm() / lat.norm()) < 1e-5
    assert guided.calls == 6
