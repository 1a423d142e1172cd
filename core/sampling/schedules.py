"""Noise schedules: ``(schedule, steps) -> sigmas``, n+1 descending values ending in 0 (float32, CPU).

All are built from the model's training schedule (``DiscreteSchedule``); timesteps are mapped to sigma with
its log-linear interpolation. ``get_sigmas`` adds img2img truncation, with ONE rule for every schedule:

    ``steps`` is the number of steps actually run. For ``denoise < 1`` build the schedule for
    ``int(steps / denoise)`` steps and keep its last ``steps + 1`` values (``denoise == 0``: just ``[0]``).

This is the rule of sampling.md §1. The AYS note in §3 counts steps the other way round (``steps`` is the
full schedule, ``round(steps * denoise)`` steps run); both give the same sigma list, e.g. AYS 20 steps at
denoise 0.5 there == ``get_sigmas("ays", s, 10, denoise=0.5)`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from core.errors import RequestError
from core.sampling.denoisers import DiscreteSchedule

ScheduleFn = Callable[[DiscreteSchedule, int], torch.Tensor]


class FlowSchedule:
    """A rectified-flow model's sigmas (flow times in (0, 1]) in the shape of a ``DiscreteSchedule``.

    The training table is 1000 times ``t = i / 1000`` (i = 1..1000) through the shift, ascending: with
    ``mu`` (Flux.1 dev's resolution-dependent shift) ``t' = e^mu / (e^mu + 1/t - 1)``, else the static
    ``t' = s t / (1 + (s - 1) t)``. The table schedules (karras, exponential, beta, sgm_uniform, ddim_uniform)
    then run on it as ComfyUI does for Flux; ``normal`` and ``simple`` are the reference schedule,
    ``t = linspace(1, 1/n, n)`` then 0, shifted, exactly as diffusers' ``FluxPipeline`` with
    ``FlowMatchEulerDiscreteScheduler`` computes it (and BFL's ``get_schedule``).
    """

    num_timesteps = 1000

    def __init__(self, mu: float | None = None, shift: float = 1.0) -> None:
        self.mu = mu
        self.shift = shift
        self.sigmas = self.warp(torch.arange(1, self.num_timesteps + 1, dtype=torch.float64) / self.num_timesteps)

    def warp(self, t: torch.Tensor) -> torch.Tensor:
        """Unshifted flow times -> the model's sigmas (float64)."""
        t = t.to(torch.float64)
        if self.mu is not None:
            e = math.exp(self.mu)
            return e / (e + (1.0 / t - 1.0))
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        return self.warp((tt + 1.0) / self.num_timesteps)

    def reference(self, steps: int) -> torch.Tensor:
        """diffusers' Flux sigmas: ``np.linspace(1, 1/n, n)`` in float32, shifted in float32, then 0."""
        t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).to(torch.float32)
        return _finish(self.warp(t.to(torch.float64)).to(torch.float32))


def _finish(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)]).to(torch.float32)


def normal(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 down to 0 inclusive (k-diffusion ``get_sigmas``; diffusers
    ``timestep_spacing="linspace"`` up to its linear-in-sigma interpolation between integer timesteps)."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64)
    return _finish(schedule.t_to_sigma(t))


def sgm_uniform(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """``steps + 1`` evenly spaced timesteps from T-1 to 0, the last (t = 0) dropped (SGM's discretisation;
    close to diffusers "trailing", which also rounds timesteps to integers)."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return _finish(schedule.t_to_sigma(t))


def simple(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Every (T/steps)-th entry of the training table counted down from T-1: t_i = T-1 - floor(i T/steps)
    (integer timesteps; equals diffusers "trailing" when steps divides T)."""
    n = schedule.num_timesteps
    idx = [n - 1 - int(i * n / steps) for i in range(steps)]
    return _finish(schedule.sigmas[idx])


def ddim_uniform(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """t_i = 1 + i * (T // steps), descending: DDIM's uniform ("leading", steps_offset=1) timesteps."""
    c = max(schedule.num_timesteps // steps, 1)
    idx = [min(1 + i * c, schedule.num_timesteps - 1) for i in reversed(range(steps))]
    return _finish(schedule.sigmas[idx])


def karras(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: evenly spaced in sigma^(1/rho) between sigma_max and sigma_min."""
    lo, hi = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return _finish((hi + ramp * (lo - hi)) ** rho)


def exponential(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in log sigma between sigma_max and sigma_min."""
    ramp = torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps, dtype=torch.float64)
    return _finish(ramp.exp())


# ---- beta (Lee et al. 2024, "Beta Sampling is All You Need") ------------------------------------------------


def _beta_series(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """I_x(a, b) = x^a / (a B(a, b)) * sum_n (1-b)_n / n! * a / (a + n) * x^n, for x <= 1/2 (geometric)."""
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    term = torch.ones_like(x)  # (1-b)_n / n! * x^n
    total = torch.ones_like(x)  # n = 0 term: a / a
    for n in range(1, 80):  # 0.5^80 < 1e-24
        term = term * (n - b) / n * x
        total = total + term * (a / (a + n))
    return torch.exp(a * x.clamp_min(1e-300).log() - lbeta) / a * total


def beta_cdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Regularised incomplete beta I_x(a, b) (float64), via I_x(a, b) = 1 - I_{1-x}(b, a) above 1/2."""
    x = x.to(torch.float64).clamp(0.0, 1.0)
    low = _beta_series(x.clamp(max=0.5), a, b)
    high = 1.0 - _beta_series((1.0 - x).clamp(max=0.5), b, a)
    out = torch.where(x <= 0.5, low, high)
    return torch.where(x <= 0, torch.zeros_like(out), torch.where(x >= 1, torch.ones_like(out), out))


def beta_ppf(p: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Inverse of ``beta_cdf`` by bisection (monotone, 60 halvings -> ~1e-18 in x)."""
    p = p.to(torch.float64)
    lo, hi = torch.zeros_like(p), torch.ones_like(p)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = beta_cdf(mid, a, b) < p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def beta(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at the Beta(0.6, 0.6) quantiles of 1 - i/steps (i = 0..steps-1), rounded to integers, so
    more steps land at both ends of the trajectory than in the middle."""
    q = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
    t = torch.round(beta_ppf(q, alpha, beta_) * (schedule.num_timesteps - 1)).long()
    return _finish(schedule.sigmas[t])


# ---- Align Your Steps (Sabour et al. 2024; sampling.md §3) -----------------------------------------------

def ays_levels(family: str, steps: int) -> torch.Tensor:
    """The 11 published levels of ``family`` (its module's ``ays_levels``) re-sampled to ``steps + 1`` points,
    linear in log sigma over [0, 1], last = 0."""
    from core.models.families import FAMILIES
    from core.request import schedule_problem

    problem = schedule_problem("ays", family)
    if problem is not None:
        raise problem
    published = FAMILIES[family].ays_levels
    levels = torch.tensor(published, dtype=torch.float64)
    if steps + 1 != len(levels):
        # ascending positions on [0, 1] so interpolation runs left to right, then flip back
        log_levels = levels.flip(0).log()
        xp = torch.linspace(0, 1, len(levels), dtype=torch.float64)
        x = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
        w = (x - xp[idx - 1]) / (xp[idx] - xp[idx - 1])
        levels = (log_levels[idx - 1] + w * (log_levels[idx] - log_levels[idx - 1])).exp().flip(0)
    levels[-1] = 0.0
    return levels.to(torch.float32)


SCHEDULE_FUNCTIONS: dict[str, ScheduleFn] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
}


def _full(name: str, schedule: DiscreteSchedule, steps: int, family: str) -> torch.Tensor:
    if isinstance(schedule, FlowSchedule) and name in ("normal", "simple"):
        return schedule.reference(steps)
    if name == "ays":
        return ays_levels(family, steps)
    return SCHEDULE_FUNCTIONS[name](schedule, steps)


def get_sigmas(
    name: str,
    schedule: DiscreteSchedule,
    steps: int,
    denoise: float = 1.0,
    family: str = "sd15",
) -> torch.Tensor:
    """Sigmas for ``steps`` sampling steps (``steps + 1`` values ending in 0) with img2img truncation."""
    if name != "ays" and name not in SCHEDULE_FUNCTIONS:
        raise RequestError("schedule", name, "one of " + ", ".join([*SCHEDULE_FUNCTIONS, "ays"]))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RequestError("steps", steps, "a whole number of at least 1")
    if not 0.0 <= denoise <= 1.0:
        raise RequestError("denoise", denoise, "a number from 0 to 1")
    if denoise <= 0.0:
        return torch.zeros(1)
    if denoise >= 1.0:
        return _full(name, schedule, steps, family)
    total = schedule_length(steps, denoise)
    return _full(name, schedule, total, family)[-(steps + 1) :].clone()


def schedule_length(steps: int, denoise: float = 1.0) -> int:
    """How many steps the full schedule has whose last ``steps`` an img2img pass at ``denoise`` runs."""
    return steps if denoise >= 1.0 else max(int(steps / denoise), steps)


def lcm_sigmas(schedule: DiscreteSchedule, steps: int, original_steps: int = 50) -> torch.Tensor:
    """LCM's timesteps (sampling.md §4: the 50-step skipping grid, subsampled), as sigmas + 0.

    Not a user schedule: the ``lcm`` sampler is meant to run on these (n=4 -> t = 999, 759, 499, 259).
    """
    k = schedule.num_timesteps // original_steps
    grid = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    picks = torch.floor(torch.linspace(0, original_steps, steps + 1, dtype=torch.float64)[:-1]).long()
    return _finish(schedule.sigmas[[grid[int(i)] for i in picks]])


# ---- FLUX.2 [klein] (flow matching; diffusers Flux2KleinPipeline, BFL flux2 sampling.get_schedule) -----------


def flux2_empirical_mu(image_seq_len: int, steps: int) -> float:
    """The time shift mu FLUX.2 uses for ``image_seq_len`` latent tokens ((H/16) * (W/16)) and ``steps`` steps.

    BFL's fit: mu is linear in the step count between two lines fitted in the token count (at 10 and at 200
    steps); above 4300 tokens (about 1050x1050 px) only the 200-step line is used.
    """
    a1, b1 = 8.73809524e-05, 1.89833333  # mu at 10 steps = a1 * tokens + b1
    a2, b2 = 0.00016927, 0.45666666  # mu at 200 steps
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    intercept = m_200 - 200.0 * slope
    return float(slope * steps + intercept)


def flux2_sigmas(steps: int, image_seq_len: int) -> torch.Tensor:
    """FLUX.2's ``steps + 1`` flow sigmas ending in 0: t_i = 1 - i/steps, exponentially time-shifted by
    :func:`flux2_empirical_mu`, sigma = e^mu / (e^mu + 1/t - 1) (diffusers' FlowMatchEulerDiscreteScheduler with
    use_dynamic_shifting and time_shift_type "exponential", which Flux2KleinPipeline sets up)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RequestError("steps", steps, "a whole number of at least 1")
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise RequestError("image size", image_seq_len, "a positive number of 16x16-pixel latent tokens")
    shift = math.exp(flux2_empirical_mu(image_seq_len, steps))
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return _finish(shift / (shift + (1.0 / t - 1.0)))
