"""Every sampler against its diffusers counterpart, driven by the same deterministic toy eps-model.

Both sides get the same model, the same sigmas (our schedule where it equals diffusers' spacing, else the
diffusers sigmas themselves) and, for stochastic samplers, the same noise: diffusers' ``randn_tensor`` and
our ``noise_sampler`` replay one list of tensors in call order. Trajectories must agree to rel. err 1e-5.

diffusers VP schedulers (DDIM, DPM-Solver, UniPC, LCM) keep x_vp = x / sqrt(sigma^2 + 1); we compare after
that rescaling, which is exact at sigma = 0.
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from core.errors import DarkroomError
from core.sampling import SAMPLERS, Cancelled
from core.sampling.denoisers import DiscreteSchedule, EpsDenoiser, VDenoiser
from core.sampling.noise import NoiseSampler, initial_noise
from core.sampling.samplers import SAMPLER_FUNCTIONS, StepInfo, sample
from core.sampling.schedules import ddim_uniform, exponential, get_sigmas, karras, lcm_sigmas, normal

SD = DiscreteSchedule()
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 4, 8, 8)
TOL = 1e-5


def toy_eps(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth, nonlinear in x and t, mixes channels: a stand-in UNet."""
    t = torch.as_tensor(t, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1))) / 1000.0
    mix = x_in.roll(1, dims=1)
    return 0.8 * torch.tanh(1.1 * x_in + 0.3 * mix) * (0.6 + t) + 0.25 * torch.sin(2.0 * t + 0.7 * x_in) + 0.1 * t**2


def start_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


class Replay:
    """A fixed list of noise tensors, handed out in call order (one instance per side)."""

    def __init__(self, count: int = 64) -> None:
        g = torch.Generator().manual_seed(99)
        self.items = [torch.randn(SHAPE, generator=g) for _ in range(count)]
        self.used = 0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        self.used += 1
        return self.items[self.used - 1].clone()


@pytest.fixture(scope="module")
def diffusers():
    import diffusers as d
    import diffusers.schedulers.scheduling_lms_discrete as lms_mod

    if not hasattr(lms_mod, "integrate"):
        # scipy is not installed: its only use is quad() of a polynomial, which Gauss-Legendre does exactly
        nodes, weights = np.polynomial.legendre.leggauss(12)

        def quad(f, a, b, epsrel=None):
            u = 0.5 * (b - a) * nodes + 0.5 * (a + b)
            return float(0.5 * (b - a) * sum(w * f(x) for w, x in zip(weights, u))), 0.0

        lms_mod.integrate = types.SimpleNamespace(quad=quad)
    return d


def run_diffusers(sched, monkeypatch, x_vp_or_ve: torch.Tensor, replay: Replay | None = None, **step_kw):
    if replay is not None:
        monkeypatch.setattr(sys.modules[type(sched).__module__], "randn_tensor", replay)
    x = x_vp_or_ve
    for t in sched.timesteps:
        eps = toy_eps(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(eps, t, x, **step_kw).prev_sample
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make(d, cls: str, steps: int, **config):
    if cls == "LMSDiscreteScheduler":  # the top-level name is a scipy-missing placeholder
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler as klass
    else:
        klass = getattr(d, cls)
    sched = klass(**SD15, **config)
    sched.set_timesteps(steps)
    return sched


def unround_timesteps(sched, sigmas) -> None:
    """diffusers rounds karras timesteps for the model call (keeping exact sigmas); we call the model at
    the exact fractional timestep of each sigma, so give diffusers the same ones."""
    sched.timesteps = SD.sigma_to_t(torch.as_tensor(sigmas[:-1]).double()).float()


DENOISER = EpsDenoiser(toy_eps, SD)

# (our sampler, diffusers class, config, steps, our schedule, stochastic)
VE_CASES = [
    ("euler", "EulerDiscreteScheduler", {}, 10, "normal", False),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 8, "karras", False),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, 10, "normal", True),
    ("heun", "HeunDiscreteScheduler", {}, 10, "normal", False),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, 8, "karras", False),
    ("dpm_2", "KDPM2DiscreteScheduler", {}, 10, "normal", False),
    ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", {}, 10, "normal", True),
    ("lms", "LMSDiscreteScheduler", {}, 10, "normal", False),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, 8, "karras", False),
]


@pytest.mark.parametrize("case", VE_CASES, ids=lambda c: f"{c[0]}-{c[4]}")
def test_ve_samplers_match_diffusers(case, diffusers, monkeypatch):
    name, cls, config, steps, schedule, stochastic = case
    sched = make(diffusers, cls, steps, timestep_spacing="linspace", **config)
    sigmas = get_sigmas(schedule, SD, steps)
    x = start_noise() * sigmas[0]
    theirs = run_diffusers(sched, monkeypatch, x.clone(), Replay() if stochastic else None)
    ours = sample(name, DENOISER, x.clone(), sigmas, noise_sampler=Replay())
    assert rel_err(ours, theirs) < TOL


def test_v_prediction_matches_diffusers(diffusers, monkeypatch):
    sched = make(diffusers, "EulerDiscreteScheduler", 10, timestep_spacing="linspace", prediction_type="v_prediction")
    sigmas = normal(SD, 10)
    x = start_noise() * sigmas[0]
    theirs = run_diffusers(sched, monkeypatch, x.clone())
    ours = sample("euler", VDenoiser(toy_eps, SD), x.clone(), sigmas)
    assert rel_err(ours, theirs) < TOL


def _vp_run(sched, monkeypatch, sigmas, name, replay=False, **kw):
    """Start both sides from the same VP noise; compare at the final sigma in VP scale."""
    x_vp = start_noise()
    s0, s_end = float(sigmas[0]), float(sigmas[-1])
    theirs = run_diffusers(sched, monkeypatch, x_vp.clone(), Replay() if replay else None, **kw.pop("step_kw", {}))
    ours = sample(name, DENOISER, x_vp * math.sqrt(s0 * s0 + 1), sigmas, noise_sampler=Replay(), **kw)
    return ours / math.sqrt(s_end * s_end + 1), theirs


@pytest.mark.parametrize("karras_sigmas", [False, True])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_and_2m_sde_match_diffusers(sde, karras_sigmas, diffusers, monkeypatch):
    """DPMSolverMultistepScheduler, order 2, midpoint. With final_sigmas_type="zero" diffusers takes a
    first-order last step, as k-diffusion does (for any step count)."""
    algo = "sde-dpmsolver++" if sde else "dpmsolver++"
    sched = make(diffusers, "DPMSolverMultistepScheduler", 8, algorithm_type=algo, use_karras_sigmas=karras_sigmas)
    if karras_sigmas:
        assert torch.allclose(sched.sigmas.double(), karras(SD, 8).double(), rtol=1e-5, atol=1e-5)
        unround_timesteps(sched, sched.sigmas)
    ours, theirs = _vp_run(sched, monkeypatch, sched.sigmas, "dpmpp_2m_sde" if sde else "dpmpp_2m", replay=sde)
    assert rel_err(ours, theirs) < TOL


def test_dpmpp_3m_sde_eta0_matches_diffusers_order3(diffusers, monkeypatch):
    """3M with eta = 0 is DPM-Solver++(3M). 16 steps: under 15 diffusers also drops to order 2 on the
    next-to-last step, k-diffusion does not. Its warm-up step 2 uses the "heun" second-order form.

    With eta > 0 diffusers' third-order sde-dpmsolver++ update has coefficient (...)/(2h)^2 - 1/2 on D2,
    which is O(1) as h -> 0 instead of O(h); we follow k-diffusion there (-phi_3 with h_eta = 2h) and
    check it by convergence and reproducibility in test_sampling_convergence.py instead.
    """
    sched = make(diffusers, "DPMSolverMultistepScheduler", 16, solver_order=3, solver_type="heun")
    ours, theirs = _vp_run(sched, monkeypatch, sched.sigmas, "dpmpp_3m_sde", eta=0.0)
    assert rel_err(ours, theirs) < TOL


def test_dpmpp_2s_matches_diffusers_singlestep(diffusers, monkeypatch):
    """DPMSolverSinglestepScheduler(order 2) on 2m+1 log-uniform sigmas takes m second-order steps whose
    intermediate point is the log-midpoint, then one first-order step to 0: that is dpmpp_2s_ancestral
    (eta = 0) and dpmpp_sde (eta = 0) on every other sigma."""
    sched = make(diffusers, "DPMSolverSinglestepScheduler", 9, use_exponential_sigmas=True)
    assert torch.allclose(sched.sigmas.double(), exponential(SD, 9).double(), rtol=1e-5, atol=1e-5)
    unround_timesteps(sched, sched.sigmas)
    ours_sigmas = torch.cat([sched.sigmas[:-1:2], sched.sigmas[-1:]])
    for name in ("dpmpp_2s_ancestral", "dpmpp_sde"):
        ours, theirs = _vp_run(sched, monkeypatch, ours_sigmas, name, eta=0.0)
        assert rel_err(ours, theirs) < TOL
        sched.set_timesteps(9)
        unround_timesteps(sched, sched.sigmas)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(eta, diffusers, monkeypatch):
    """DDIMScheduler (SD1.5 config: leading spacing, steps_offset 1, set_alpha_to_one False) == ddim on
    ddim_uniform's sigmas, except that diffusers' last step goes to abar_0 (sigma_min), not to 0."""
    sched = make(diffusers, "DDIMScheduler", 10, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    sigmas = torch.cat([ddim_uniform(SD, 10)[:-1], torch.tensor([SD.sigma_min])])
    ours, theirs = _vp_run(sched, monkeypatch, sigmas, "ddim", replay=eta > 0, eta=eta, step_kw={"eta": eta})
    assert rel_err(ours, theirs) < TOL


def test_ddim_eta0_is_euler():
    sigmas = karras(SD, 7)
    x = start_noise() * sigmas[0]
    assert rel_err(sample("ddim", DENOISER, x, sigmas), sample("euler", DENOISER, x, sigmas)) < 1e-6


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True}], ids=["linspace", "karras"])
@pytest.mark.parametrize("steps", [5, 10])
def test_uni_pc_matches_diffusers(config, steps, diffusers, monkeypatch):
    """UniPCMultistepScheduler defaults: order 2, bh2, predict_x0, corrector after every step but the
    first, lower_order_final, final sigma 0."""
    sched = make(diffusers, "UniPCMultistepScheduler", steps, **config)
    if config:
        unround_timesteps(sched, sched.sigmas)
    ours, theirs = _vp_run(sched, monkeypatch, sched.sigmas, "uni_pc")
    assert rel_err(ours, theirs) < TOL


@pytest.mark.parametrize("order", [2, 3])
def test_uni_pc_bh1_and_order3_match_diffusers(order, diffusers, monkeypatch):
    """bh2 at order 3 to sigma 0; bh1 ends at sigma_min, because diffusers' bh1 step to sigma 0 is NaN
    (B(h) = -h is infinite there), while ours returns the x0 prediction."""
    sched = make(diffusers, "UniPCMultistepScheduler", 10, solver_order=3)
    ours, theirs = _vp_run(sched, monkeypatch, sched.sigmas, "uni_pc", order=3)
    assert rel_err(ours, theirs) < TOL
    sched = make(diffusers, "UniPCMultistepScheduler", 10, solver_order=order, solver_type="bh1",
                 final_sigmas_type="sigma_min")  # fmt: skip
    assert float(sched.sigmas[-1]) == pytest.approx(SD.sigma_min, rel=1e-4)  # diffusers: float32 abar
    ours, theirs = _vp_run(sched, monkeypatch, sched.sigmas, "uni_pc", order=order, variant="bh1")
    assert rel_err(ours, theirs) < TOL


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_diffusers(steps, diffusers, monkeypatch):
    sched = make(diffusers, "LCMScheduler", steps)
    sigmas = lcm_sigmas(SD, steps)
    ours, theirs = _vp_run(sched, monkeypatch, sigmas, "lcm", replay=True)
    assert rel_err(ours, theirs) < TOL


# ---- seeds, callback, cancellation, dispatch ----------------------------------------------------------------


def test_noise_is_per_image_seeded_and_batch_independent():
    batch = initial_noise([7, 8, 9], (4, 8, 8))
    assert torch.equal(batch[1], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(8)))
    assert torch.equal(batch[2], initial_noise([9], (4, 8, 8))[0])
    ns = NoiseSampler([7, 8], (4, 8, 8))
    first, step = ns.initial(), ns(1.0, 0.5)
    assert torch.equal(first, batch[:2]) and not torch.equal(step, first)
    again = NoiseSampler([7, 8], (4, 8, 8))
    again.initial()
    assert torch.equal(again(1.0, 0.5), step)
    half = NoiseSampler([7], (4, 8, 8), dtype=torch.float16).initial()
    assert half.dtype == torch.float16 and torch.equal(half[0], batch[0].half())


def test_callback_reports_every_step():
    sigmas = karras(SD, 5)
    seen: list[StepInfo] = []
    out = sample("heun", DENOISER, start_noise() * sigmas[0], sigmas, callback=seen.append)
    assert [s.step for s in seen] == [1, 2, 3, 4, 5] and {s.total for s in seen} == {5}
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert torch.equal(seen[-1].x, out)
    assert rel_err(seen[-1].denoised, DENOISER(seen[-2].x, seen[-1].sigma)) < 1e-6


@pytest.mark.parametrize("name", SAMPLERS)
def test_cancel_stops_between_steps(name):
    sigmas = karras(SD, 6)
    calls = []

    def counting(x, s):
        calls.append(s)
        return DENOISER(x, s)

    done = []
    with pytest.raises(Cancelled):
        sample(name, counting, start_noise() * sigmas[0], sigmas, callback=done.append,
               noise_sampler=NoiseSampler([1, 2], SHAPE[1:]), is_cancelled=lambda: len(done) >= 2)  # fmt: skip
    assert len(done) == 2
    assert 2 <= len(calls) <= 4  # no model call after the check fired


def test_every_sampler_id_is_implemented_and_bad_name_fails():
    assert set(SAMPLERS) == set(SAMPLER_FUNCTIONS)
    with pytest.raises(DarkroomError, match="sampler"):
        sample("k_euler_z", DENOISER, start_noise(), karras(SD, 3))


def test_flow_denoiser_euler_matches_diffusers_flow_match(diffusers, monkeypatch):
    """Rectified flow: x0 = x - t v, so Euler over the flow times is FlowMatchEuler's x + (t' - t) v."""
    from core.sampling.denoisers import FlowDenoiser

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(6)
    x = start_noise()
    theirs = x.clone()
    for t in sched.timesteps:
        theirs = sched.step(toy_eps(theirs, t.expand(SHAPE[0])), t, theirs).prev_sample
    ours = sample("euler", FlowDenoiser(toy_eps, time_scale=1000.0), x.clone(), sched.sigmas)
    assert rel_err(ours, theirs) < TOL
