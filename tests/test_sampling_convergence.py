"""Samplers on a Gaussian data distribution, where everything is known in closed form.

Data x0 ~ N(mu, s^2 I). The exact denoiser is D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2) and the
probability-flow ODE dx/dsigma = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2) has the solution
x(b) = mu + (x(a) - mu) sqrt(s^2 + b^2) / sqrt(s^2 + a^2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.sampling.noise import NoiseSampler
from core.sampling.samplers import STOCHASTIC, sample

S = 0.5
MU = torch.linspace(-1.0, 1.0, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
SIGMA_MAX, SIGMA_MIN = 14.6, 0.03


def gaussian_denoiser(mu: torch.Tensor, s: float = S):
    return lambda x, sigma: (s * s * x + sigma * sigma * mu) / (s * s + sigma * sigma)


def exact(x_start: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return MU + (x_start - MU) * math.sqrt(S * S + b * b) / math.sqrt(S * S + a * a)


def final_error(name: str, steps: int) -> float:
    """Max error at sigma_min of an ODE solve on log-uniform sigmas (no step to 0, where solvers switch
    to first order by design)."""
    sigmas = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), steps + 1, dtype=torch.float64))
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    out = sample(name, gaussian_denoiser(MU), x, sigmas, eta=0.0)
    return float((out - exact(x, SIGMA_MAX, SIGMA_MIN)).abs().max())


def slope(name: str, steps=(16, 32, 64)) -> float:
    errs = [final_error(name, n) for n in steps]
    return float(np.polyfit(np.log(steps), np.log(errs), 1)[0])


# (sampler, expected order): eta = 0 makes the ancestral/SDE variants their ODE solvers
ORDERS = [
    ("euler", 1),
    ("ddim", 1),
    ("euler_ancestral", 1),
    ("heun", 2),
    ("dpm_2", 2),
    ("dpm_2_ancestral", 2),
    ("dpmpp_2m", 2),
    ("dpmpp_2m_sde", 2),
    ("dpmpp_2s_ancestral", 2),
    ("dpmpp_sde", 2),
]


@pytest.mark.parametrize("name,order", ORDERS)
def test_error_shrinks_at_the_sampler_order(name, order):
    assert slope(name) == pytest.approx(-order, abs=0.25)


def test_higher_order_multistep_samplers():
    """lms (order 4) and uni_pc (UniP-2 + UniC: order 3) beat second order; 3M's first-order warm-up
    step caps its global order at 2 on this grid, but it is still more accurate than 2M."""
    assert slope("lms") < -3.0
    assert slope("uni_pc") < -2.6
    assert slope("dpmpp_3m_sde") < -1.8
    assert final_error("dpmpp_3m_sde", 64) < 0.5 * final_error("dpmpp_2m", 64)


def test_ipndm_order_on_uneven_steps_and_ipndm_v_is_lms():
    """iPNDM's fixed weights assume equal steps in sigma; on log-uniform sigmas (steps shrinking by a constant
    ratio) that leaves a second-order method, still more accurate than 2M. iPNDM-v is LMS (variable steps)."""
    assert slope("ipndm") < -1.8
    assert final_error("ipndm", 32) < 0.8 * final_error("dpmpp_2m", 32)
    assert final_error("ipndm_v", 32) == final_error("lms", 32)


def test_ipndm_weights_are_exact_for_a_cubic_derivative():
    """On equal sigma steps, 4th-order Adams-Bashforth integrates a cubic-in-sigma derivative exactly once
    its history is full: a denoiser with (x - D) / sigma = p(sigma) makes x(sigma) = x0 + P(sigma)."""
    p = [0.3, -0.2, 0.05, 0.01]  # p(sigma) = sum p_k sigma^k

    def den(x, sigma):
        return x - sigma * sum(c * sigma**k for k, c in enumerate(p))

    def big_p(sigma):
        return sum(c * sigma ** (k + 1) / (k + 1) for k, c in enumerate(p))

    sigmas = torch.linspace(8.0, 1.0, 8, dtype=torch.float64)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    steps = []
    out = sample("ipndm", den, x, sigmas, callback=lambda info: steps.append(info.x))
    # steps 4.. (full history) add exactly P(s_next) - P(s) to the error left by the warm-up steps
    err3 = float(steps[3][0, 0, 0, 0]) - (big_p(float(sigmas[4])) - big_p(8.0))
    err_end = float(out[0, 0, 0, 0]) - (big_p(1.0) - big_p(8.0))
    assert err_end == pytest.approx(err3, abs=1e-9)
    assert abs(err3) > 1e-3  # the warm-up (orders 1-3) is not exact: the check above is not vacuous


def test_full_solve_to_zero_approaches_the_exact_sample():
    """With the final step to sigma 0 (karras schedule), the error still falls with the step count."""
    from core.sampling.denoisers import DiscreteSchedule
    from core.sampling.schedules import karras

    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * DiscreteSchedule().sigma_max
    target = exact(x, DiscreteSchedule().sigma_max, 0.0)
    errs = {}
    for name in ("euler", "heun", "dpmpp_2m"):
        for n in (10, 40):
            out = sample(name, gaussian_denoiser(MU), x, karras(DiscreteSchedule(), n).double())
            errs[name, n] = float((out - target).abs().max())
        assert errs[name, 40] < 0.5 * errs[name, 10]
    assert errs["dpmpp_2m", 40] < errs["euler", 40]


@pytest.mark.parametrize("det,stoch", [("euler", "euler_ancestral"), ("dpm_2", "dpm_2_ancestral"),
                                       ("dpmpp_2m", "dpmpp_2m_sde"), ("euler", "ddim")])  # fmt: skip
def test_eta_zero_equals_the_deterministic_sampler(det, stoch):
    sigmas = torch.tensor([SIGMA_MAX, 3.0, 1.0, 0.2, 0.0], dtype=torch.float64)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * SIGMA_MAX
    a = sample(det, gaussian_denoiser(MU), x, sigmas)
    b = sample(stoch, gaussian_denoiser(MU), x, sigmas, eta=0.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _stochastic_run(name: str, seeds, steps: int = 12, size: int = 8, **kw) -> torch.Tensor:
    mu = torch.linspace(-1.0, 1.0, size * size).reshape(1, 1, size, size)
    sigmas = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), steps))
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    ns = NoiseSampler(seeds, (1, size, size))
    return sample(name, gaussian_denoiser(mu), ns.initial() * sigmas[0], sigmas, noise_sampler=ns, **kw)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_reproduce_with_the_same_seed(name):
    a = _stochastic_run(name, [11, 12])
    b = _stochastic_run(name, [11, 12])
    assert torch.equal(a, b)
    c = _stochastic_run(name, [11, 13])
    assert torch.equal(a[0], c[0])  # image 0 keeps its seed: independent of its batch neighbours
    assert not torch.allclose(a[1], c[1])
    # ddim/ancestral noise really enters: same start noise, no step noise -> different result
    if name != "lcm":
        assert not torch.allclose(a, _stochastic_run(name, [11, 12], eta=0.0))


@pytest.mark.parametrize("name", [n for n in STOCHASTIC if n != "lcm"] + ["ddim"])
def test_stochastic_samplers_sample_the_data_distribution(name):
    """At 100 steps the samples' standardised residual (x - mu) / s is ~N(0, 1): wrong noise scaling would
    show up as a wrong std. (lcm is excluded: it assumes a consistency model, not an exact denoiser.)"""
    out = _stochastic_run(name, [1, 2, 3, 4], steps=100, size=64, eta=1.0)
    mu = torch.linspace(-1.0, 1.0, 64 * 64).reshape(1, 1, 64, 64)
    r = (out - mu) / S
    assert abs(float(r.mean())) < 0.03
    assert float(r.std()) == pytest.approx(1.0, abs=0.05)
