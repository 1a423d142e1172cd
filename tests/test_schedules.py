"""Schedules: golden values from sampling.md §2-3 and the equivalent diffusers spacings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import DarkroomError
from core.sampling import SCHEDULES
from core.sampling.denoisers import DiscreteSchedule
from core.sampling.schedules import (
    ays_levels,
    beta,
    beta_cdf,
    beta_ppf,
    ddim_uniform,
    exponential,
    get_sigmas,
    karras,
    lcm_sigmas,
    normal,
    sgm_uniform,
    simple,
)

SD = DiscreteSchedule()
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _diffusers(cls_name: str, steps: int, **config):
    import diffusers

    sched = getattr(diffusers, cls_name)(**SD15, **config)
    sched.set_timesteps(steps)
    return sched


def _close(a, b, tol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=1e-6)


def test_training_sigmas_golden():
    assert SD.sigma_min == pytest.approx(0.0291672, abs=1e-7)
    assert SD.sigma_max == pytest.approx(14.614642, abs=1e-6)
    golden = torch.tensor([4.2606, 1.6129, 0.7194], dtype=torch.float64)  # 4 decimals
    assert torch.allclose(SD.t_to_sigma(torch.tensor([759.0, 499.0, 259.0])), golden, atol=5e-5, rtol=0)


def test_sigma_to_t_matches_diffusers_log_interpolation():
    sched = _diffusers("EulerDiscreteScheduler", 10)
    log_sigmas = np.log(SD.sigmas.numpy())
    sig = np.array([14.6, 9.0, 3.3, 1.0, 0.5, 0.1, 0.03])
    theirs = np.array([sched._sigma_to_t(s, log_sigmas) for s in sig]).reshape(-1)
    _close(SD.sigma_to_t(torch.from_numpy(sig)), theirs, tol=1e-9)
    t = torch.tensor([0.0, 12.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    _close(SD.sigma_to_t(SD.t_to_sigma(t)), t, tol=1e-9)


def test_karras_golden_and_diffusers():
    golden = torch.tensor([14.6146, 3.1686, 0.4469, 0.0292, 0.0], dtype=torch.float64)
    assert torch.allclose(karras(SD, 4).double(), golden, atol=5e-5, rtol=0)
    for n in (7, 20):
        theirs = _diffusers("EulerDiscreteScheduler", n, timestep_spacing="linspace", use_karras_sigmas=True)
        _close(karras(SD, n), theirs.sigmas)


def test_exponential_matches_diffusers():
    for n in (5, 20):
        theirs = _diffusers("EulerDiscreteScheduler", n, timestep_spacing="linspace", use_exponential_sigmas=True)
        _close(exponential(SD, n), theirs.sigmas)
    log_steps = exponential(SD, 6)[:-1].double().log().diff()
    _close(log_steps, log_steps[:1].expand(5), tol=1e-5)


@pytest.mark.parametrize("n", [4, 10, 28])  # 999 / (n - 1) is whole: linspace hits integer timesteps
def test_normal_equals_diffusers_linspace(n):
    theirs = _diffusers("EulerDiscreteScheduler", n, timestep_spacing="linspace")
    _close(normal(SD, n), theirs.sigmas)


def test_normal_is_log_linear_between_timesteps():
    """Off the integer grid we interpolate log sigma (k-diffusion); diffusers interpolates sigma itself."""
    sig = normal(SD, 7)[:-1]
    _close(SD.sigma_to_t(sig.double()), torch.linspace(999, 0, 7, dtype=torch.float64), tol=1e-5)


@pytest.mark.parametrize("n", [4, 10, 20, 25])  # n divides 1000
def test_simple_equals_diffusers_trailing(n):
    theirs = _diffusers("EulerDiscreteScheduler", n, timestep_spacing="trailing")
    _close(simple(SD, n), theirs.sigmas)


@pytest.mark.parametrize("n", [4, 9, 30])
def test_ddim_uniform_equals_diffusers_leading(n):
    theirs = _diffusers("EulerDiscreteScheduler", n, timestep_spacing="leading", steps_offset=1)
    _close(ddim_uniform(SD, n), theirs.sigmas)


@pytest.mark.parametrize("n", [4, 13])
def test_sgm_uniform(n):
    t = SD.sigma_to_t(sgm_uniform(SD, n)[:-1].double())
    _close(t, torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1], tol=1e-5)
    trailing = _diffusers("EulerDiscreteScheduler", n, timestep_spacing="trailing").timesteps
    assert (t - trailing.double()).abs().max() <= 1.0  # diffusers rounds the same grid to integers


def test_beta_distribution_functions():
    p = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.99], dtype=torch.float64)
    # Beta(1/2, 1/2) is the arcsine law: F(x) = 2/pi asin(sqrt x)
    _close(beta_ppf(p, 0.5, 0.5), torch.sin(p * math.pi / 2) ** 2, tol=1e-9)
    _close(beta_ppf(p, 1.0, 1.0), p, tol=1e-9)
    # Beta(2, 3): F(x) = 6x^2 - 8x^3 + 3x^4
    x = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    _close(beta_cdf(x, 2.0, 3.0), 6 * x**2 - 8 * x**3 + 3 * x**4, tol=1e-10)
    _close(beta_ppf(torch.tensor([0.5], dtype=torch.float64), 0.6, 0.6), [0.5], tol=1e-9)


def test_beta_schedule_timesteps():
    n = 9  # avoids q = 1/2, where t = 499.5 is a rounding tie
    t = SD.sigma_to_t(beta(SD, n, 0.5, 0.5)[:-1].double())
    q = 1 - torch.arange(n, dtype=torch.float64) / n
    _close(t, torch.round(torch.sin(q * math.pi / 2) ** 2 * 999), tol=1e-6)
    sig = beta(SD, 20)
    assert sig[0] == pytest.approx(SD.sigma_max, rel=1e-6) and sig[-1] == 0
    assert bool((sig[:-1].diff() < 0).all())
    gaps = SD.sigma_to_t(sig[:-1].double()).diff().abs()
    assert gaps[0] < gaps[9] > gaps[-1]  # denser at both ends than in the middle


AYS_GOLDEN = {
    ("sd15", 4): [14.6146, 3.2266, 1.3944, 0.5094, 0],
    ("sd15", 8): [14.6146, 5.6906, 3.2266, 2.0605, 1.3944, 0.8745, 0.5094, 0.1929, 0],
    ("sd15", 10): [14.6146, 6.4746, 3.8637, 2.6946, 1.8842, 1.3944, 0.9643, 0.6524, 0.3977, 0.1515, 0],
    ("sd15", 20): [14.6146, 9.7275, 6.4746, 5.0016, 3.8637, 3.2266, 2.6946, 2.2533, 1.8842, 1.6209, 1.3944,
                   1.1595, 0.9643, 0.7931, 0.6524, 0.5094, 0.3977, 0.2455, 0.1515, 0.0665, 0],
    ("sdxl", 4): [14.6146, 2.8669, 0.8621, 0.2977, 0],
    ("sdxl", 8): [14.6146, 5.5525, 2.8669, 1.5140, 0.8621, 0.5049, 0.2977, 0.1340, 0],
    ("sdxl", 10): [14.6146, 6.3184, 3.7682, 2.1811, 1.3405, 0.8621, 0.5551, 0.3799, 0.2332, 0.1114, 0],
    ("sdxl", 20): [14.6146, 9.6095, 6.3184, 4.8795, 3.7682, 2.8669, 2.1811, 1.7099, 1.3405, 1.0750, 0.8621,
                   0.6917, 0.5551, 0.4592, 0.3799, 0.2977, 0.2332, 0.1612, 0.1114, 0.0570, 0],
}  # fmt: skip


@pytest.mark.parametrize("key", list(AYS_GOLDEN))
def test_ays_golden(key):
    family, n = key
    ours = get_sigmas("ays", SD, n, family=family)
    assert torch.allclose(ours.double(), torch.tensor(AYS_GOLDEN[key], dtype=torch.float64), atol=5e-5, rtol=0)


def test_ays_denoise_golden_and_family_error():
    golden = [1.3944, 1.1595, 0.9643, 0.7931, 0.6524, 0.5094, 0.3977, 0.2455, 0.1515, 0.0665, 0]
    # sampling.md's "20 steps at denoise 0.5" runs 10 steps: here steps counts the steps run
    ours = get_sigmas("ays", SD, 10, denoise=0.5)
    assert torch.allclose(ours.double(), torch.tensor(golden, dtype=torch.float64), atol=5e-5, rtol=0)
    with pytest.raises(DarkroomError):
        ays_levels("flux", 10)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_shape_and_denoise_rule(name):
    full = get_sigmas(name, SD, 12)
    assert full.shape == (13,) and full[-1] == 0 and bool((full[:-1].diff() < 0).all())
    for steps, denoise in ((12, 0.5), (7, 0.3), (5, 0.999)):
        ours = get_sigmas(name, SD, steps, denoise=denoise)
        expect = get_sigmas(name, SD, int(steps / denoise))[-(steps + 1) :]
        assert ours.shape == (steps + 1,)
        assert torch.equal(ours, expect)
        if int(steps / denoise) > steps:
            assert ours[0] < full[0]  # starts below sigma_max: partial noising
    assert torch.equal(get_sigmas(name, SD, 12, denoise=0.0), torch.zeros(1))


def test_get_sigmas_bad_input():
    with pytest.raises(DarkroomError, match="schedule"):
        get_sigmas("linear_quadratic", SD, 10)
    with pytest.raises(DarkroomError, match="steps"):
        get_sigmas("karras", SD, 0)
    with pytest.raises(DarkroomError, match="denoise"):
        get_sigmas("karras", SD, 10, denoise=1.5)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_timesteps_match_diffusers(n):
    theirs = _diffusers("LCMScheduler", n)
    ours = lcm_sigmas(SD, n)
    _close(SD.sigma_to_t(ours[:-1].double()), theirs.timesteps.double(), tol=1e-6)
    if n == 4:
        assert theirs.timesteps.tolist() == [999, 759, 499, 259]
