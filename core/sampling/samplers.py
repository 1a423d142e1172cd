"""Samplers over a sigma schedule and a denoiser ``denoise(x, sigma) -> x0`` (k-diffusion style, own code).

Every sampler is ``fn(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=..., s_noise=1.0,
is_cancelled=None) -> x`` where ``x`` is already at noise level ``sigmas[0]`` (txt2img: ``noise * sigmas[0]``;
img2img: ``latent + noise * sigmas[0]``) and ``sigmas`` descends to 0 (any iterable of floats or a tensor).
Scalar step coefficients are computed in Python float64; tensors stay in x's dtype and device.

- ``callback(StepInfo)`` runs after every step; ``StepInfo.step`` is 1-based (steps finished so far), like
  ``core.events.JobStep``.
- ``is_cancelled()`` is checked before every step; True stops the run with ``core.sampling.Cancelled``.
- ``eta`` scales the injected noise of ancestral/SDE samplers (0 makes them deterministic) and is ignored by
  deterministic ones; ``noise_sampler(sigma, sigma_next)`` supplies that noise (``core.sampling.noise``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from core.errors import RequestError
from core.sampling import Cancelled
from core.sampling.denoisers import _lcm_scalings
from core.sampling.noise import global_noise_sampler

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[float, float], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based: steps finished so far
    total: int
    x: torch.Tensor  # sample after this step
    denoised: torch.Tensor  # x0 estimate at this step (for previews)
    sigma: float
    sigma_next: float


class _Loop:
    """The bookkeeping every sampler shares: floats, cancellation, callback, default noise."""

    def __init__(self, sigmas, x, callback, noise_sampler, is_cancelled) -> None:
        self.s = _floats(sigmas)
        self.n = len(self.s) - 1
        self.callback = callback
        self.is_cancelled = is_cancelled
        self.noise = noise_sampler or global_noise_sampler(x)

    def __iter__(self):
        for i in range(self.n):
            if self.is_cancelled is not None and self.is_cancelled():
                raise Cancelled(f"cancelled before step {i + 1} of {self.n}")
            yield i, self.s[i], self.s[i + 1]

    def report(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(StepInfo(i + 1, self.n, x, denoised, self.s[i], self.s[i + 1]))


def _floats(sigmas: torch.Tensor | Iterable[float]) -> list[float]:
    if isinstance(sigmas, torch.Tensor):
        return [float(v) for v in sigmas.detach().cpu().double().tolist()]
    return [float(v) for v in sigmas]


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise of std sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_next^2 (eta = 1: DDPM's posterior variance, i.e. DDIM with eta 1)."""
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


# ---- first/second order ODE samplers ----------------------------------------------------------------------


def euler(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0, is_cancelled=None):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        x = x + (x - den) / s * (sn - s)
        loop.report(i, x, den)
    return x


def euler_ancestral(
    denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0, is_cancelled=None
):
    """Euler down to sigma_down, then add noise of std sigma_up (see ``ancestral_step``)."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        down, up = ancestral_step(s, sn, eta)
        x = x + (x - den) / s * (down - s)
        if up > 0.0:
            x = x + loop.noise(s, sn) * (s_noise * up)
        loop.report(i, x, den)
    return x


def heun(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0, is_cancelled=None):
    """Heun's method (Karras et al. 2022, Alg. 1); the last step (to sigma 0) is plain Euler."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        d = (x - den) / s
        dt = sn - s
        if sn == 0.0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, sn)) / sn
            x = x + (d + d2) / 2 * dt
        loop.report(i, x, den)
    return x


def _dpm2_step(denoiser, x, d, s, target):
    """Midpoint method with the midpoint at the geometric mean of s and target."""
    mid = math.exp(0.5 * (math.log(s) + math.log(target)))
    x2 = x + d * (mid - s)
    d2 = (x2 - denoiser(x2, mid)) / mid
    return x + d2 * (target - s)


def dpm_2(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0, is_cancelled=None):
    """DPM-Solver-2 as in k-diffusion: a midpoint step in log sigma; Euler for the last step."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        d = (x - den) / s
        x = x + d * (sn - s) if sn == 0.0 else _dpm2_step(denoiser, x, d, s, sn)
        loop.report(i, x, den)
    return x


def dpm_2_ancestral(
    denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0, is_cancelled=None
):
    """DPM2 down to sigma_down, then ancestral noise."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        down, up = ancestral_step(s, sn, eta)
        d = (x - den) / s
        if down == 0.0:
            x = x + d * (down - s)
        else:
            x = _dpm2_step(denoiser, x, d, s, down)
            if up > 0.0:
                x = x + loop.noise(s, sn) * (s_noise * up)
        loop.report(i, x, den)
    return x


def _lms_coefficient(s: Sequence[float], i: int, j: int, order: int) -> float:
    """Integral over [s_i, s_{i+1}] of the Lagrange basis polynomial of node s_{i-j} on s_i..s_{i-order+1}.

    The integrand is a polynomial, so it is integrated exactly; the variable is shifted to u = tau - s_i to
    keep the powers small.
    """
    a = s[i]
    poly = [1.0]  # coefficients of u^0, u^1, ...
    for k in range(order):
        if k == j:
            continue
        root = s[i - k] - a
        denom = s[i - j] - s[i - k]
        nxt = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):
            nxt[p + 1] += c / denom
            nxt[p] -= c * root / denom
        poly = nxt
    width = s[i + 1] - a
    return sum(c * width ** (p + 1) / (p + 1) for p, c in enumerate(poly))


def lms(
    denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    eta=0.0,
    s_noise=1.0,
    is_cancelled=None,
    order: int = 4,
):
    """Linear multistep (Adams-Bashforth on non-uniform sigmas) of up to ``order`` past derivatives."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    ds: list[torch.Tensor] = []
    for i, s, _sn in loop:
        den = denoiser(x, s)
        ds.append((x - den) / s)
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        for j in range(cur):
            x = x + ds[-1 - j] * _lms_coefficient(loop.s, i, j, cur)
        loop.report(i, x, den)
    return x


# Adams-Bashforth weights for equal steps, newest derivative first (orders 1-4)
_AB_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0, is_cancelled=None):
    """Improved PNDM (Zhang & Chen 2023, DEIS paper): Adams-Bashforth in sigma on dx/dsigma = (x - D) / sigma
    with the fixed equal-step weights up to 4th order, the order rising by one per step as history fills (no
    Runge-Kutta warm-up, one model call per step). ``ipndm_v`` is the variable-step version (= ``lms``)."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    ds: list[torch.Tensor] = []  # newest first
    for i, s, sn in loop:
        den = denoiser(x, s)
        ds = [(x - den) / s, *ds[:3]]
        step = ds[0] * _AB_WEIGHTS[len(ds) - 1][0]
        for w, d in zip(_AB_WEIGHTS[len(ds) - 1][1:], ds[1:]):
            step = step + d * w
        x = x + step * (sn - s)
        loop.report(i, x, den)
    return x


# ---- DPM-Solver++ family (Lu et al. 2022), in lambda = -log sigma ----------------------------------------


def dpmpp_2m(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0, is_cancelled=None):
    """DPM-Solver++(2M): second-order multistep; first order on the first and the last step."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    old = None
    h_last = 0.0
    for i, s, sn in loop:
        den = denoiser(x, s)
        if sn == 0.0:
            x = den
        else:
            h = math.log(s / sn)
            if old is None:
                den_d = den
            else:
                k = 1.0 / (2.0 * (h_last / h))
                den_d = den * (1.0 + k) - old * k
            x = x * (sn / s) - den_d * math.expm1(-h)
            h_last = h
        old = den
        loop.report(i, x, den)
    return x


def dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    is_cancelled=None,
    solver_type: str = "midpoint",
):
    """DPM-Solver++(2M) SDE (eta = 1: the SDE; eta = 0: the ODE solver)."""
    if solver_type not in ("midpoint", "heun"):
        raise RequestError("solver_type", solver_type, "one of midpoint, heun")
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    old = None
    h_last = 0.0
    for i, s, sn in loop:
        den = denoiser(x, s)
        if sn == 0.0:
            x = den
        else:
            h = math.log(s / sn)
            eh = eta * h
            keep = -math.expm1(-h - eh)  # 1 - e^{-(1+eta)h}
            x = x * (sn / s * math.exp(-eh)) + den * keep
            if old is not None:
                r = h_last / h
                if solver_type == "midpoint":
                    x = x + (den - old) * (0.5 * keep / r)
                else:
                    x = x + (den - old) * ((keep / (-h - eh) + 1.0) / r)
            if eta > 0.0:
                x = x + loop.noise(s, sn) * (sn * math.sqrt(-math.expm1(-2.0 * eh)) * s_noise)
            h_last = h
        old = den
        loop.report(i, x, den)
    return x


def dpmpp_3m_sde(
    denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0, is_cancelled=None
):
    """DPM-Solver++(3M) SDE: third-order multistep (second order on step 2, first on steps 1 and last)."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    den_1 = den_2 = None
    h_1 = h_2 = 0.0
    for i, s, sn in loop:
        den = denoiser(x, s)
        if sn == 0.0:
            x = den
        else:
            h = math.log(s / sn)
            h_eta = h * (eta + 1.0)
            x = x * math.exp(-h_eta) - den * math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1.0
            if den_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * phi_2 - d2 * phi_3
            elif den_1 is not None:
                x = x + (den - den_1) * (phi_2 / (h_1 / h))
            if eta > 0.0:
                x = x + loop.noise(s, sn) * (sn * math.sqrt(-math.expm1(-2.0 * h * eta)) * s_noise)
            h_2, h_1 = h_1, h
        den_2, den_1 = den_1, den
        loop.report(i, x, den)
    return x


def dpmpp_2s_ancestral(
    denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0, is_cancelled=None
):
    """DPM-Solver++(2S) singlestep (midpoint in lambda) down to sigma_down, then ancestral noise."""
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        down, up = ancestral_step(s, sn, eta)
        if down == 0.0:
            x = x + (x - den) / s * (down - s)
        else:
            h = math.log(s / down)
            s_mid = math.sqrt(s * down)  # lambda midpoint
            x2 = x * (s_mid / s) - den * math.expm1(-0.5 * h)
            den2 = denoiser(x2, s_mid)
            x = x * (down / s) - den2 * math.expm1(-h)
        if up > 0.0:
            x = x + loop.noise(s, sn) * (s_noise * up)
        loop.report(i, x, den)
    return x


def dpmpp_sde(
    denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    is_cancelled=None,
    r: float = 0.5,
):
    """DPM-Solver++ SDE (stochastic 2S): two model calls per step, noise injected at both stages.

    With eta = 0 and r = 1/2 it is the deterministic DPM-Solver++(2S).
    """
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    fac = 1.0 / (2.0 * r)
    for i, s, sn in loop:
        den = denoiser(x, s)
        if sn == 0.0:
            x = x + (x - den) / s * (sn - s)
        else:
            lam, lam_next = -math.log(s), -math.log(sn)
            s_mid = math.exp(-(lam + r * (lam_next - lam)))
            # stage 1: to the intermediate level, ancestral split
            down, up = ancestral_step(s, s_mid, eta)
            x2 = x * (down / s) - den * math.expm1(-math.log(s / down))
            if up > 0.0:
                x2 = x2 + loop.noise(s, s_mid) * (s_noise * up)
            den2 = denoiser(x2, s_mid)
            # stage 2: the full step with the blended x0
            down, up = ancestral_step(s, sn, eta)
            den_d = den * (1.0 - fac) + den2 * fac
            x = x * (down / s) - den_d * math.expm1(-math.log(s / down))
            if up > 0.0:
                x = x + loop.noise(s, sn) * (s_noise * up)
        loop.report(i, x, den)
    return x


# ---- DDIM, LCM, UniPC ---------------------------------------------------------------------------------------


def ddim(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0, is_cancelled=None):
    """DDIM (Song et al. 2021) in sigma space: x_next = x0 + sqrt(sigma_next^2 - up^2) eps + up z.

    With x = x_t / sqrt(abar_t) DDIM's variance sigma_t(eta)^2 / abar_prev is exactly ``ancestral_step``'s
    sigma_up^2, so eta = 0 is the Euler step and eta = 1 the ancestral step; written in DDIM's form here.
    """
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    for i, s, sn in loop:
        den = denoiser(x, s)
        down, up = ancestral_step(s, sn, eta)
        eps = (x - den) / s
        x = den + eps * down
        if up > 0.0:
            x = x + loop.noise(s, sn) * (s_noise * up)
        loop.report(i, x, den)
    return x


def lcm(denoiser, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0, is_cancelled=None):
    """Latent Consistency Model sampling (sampling.md §4): jump to x0, re-noise to sigma_next.

    If the denoiser exposes its training ``schedule`` (our wrappers do), LCM's boundary condition
    x0' = c_out x0 + c_skip x_t is applied at the step's timestep (c_skip ~ 1e-8 at t >= 259).
    Run it on ``schedules.lcm_sigmas``.
    """
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    schedule = getattr(denoiser, "schedule", None)
    for i, s, sn in loop:
        den = denoiser(x, s)
        if schedule is not None:
            c_skip, c_out = _lcm_scalings(float(schedule.sigma_to_t(s)))
            den = den * c_out + x * (c_skip / math.sqrt(s * s + 1.0))  # x_t = x / sqrt(sigma^2 + 1)
        x = den
        if sn > 0.0:
            x = x + loop.noise(s, sn) * (s_noise * sn)
        loop.report(i, x, den)
    return x


def _unipc_coefficients(rks: list[float], hh: float, order: int, variant: str):
    """R (order x order Vandermonde in rks) and b of the UniPC order conditions (Zhao et al. 2023, eq. 8)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


def _unipc_update(x, s0, s_t, hist, order, variant, model_t=None):
    """One UniP predictor step (model_t None) or UniC corrector step, data prediction, from s0 to s_t.

    ``hist`` holds (sigma, x0) pairs, newest last; hist[-1] is at s0.
    """
    h = math.log(s0 / s_t)
    hh = -h
    m0 = hist[-1][1]
    rks, d1s = [], []
    for k in range(1, order):
        s_k, m_k = hist[-1 - k]
        rk = math.log(s0 / s_k) / h  # (lambda_k - lambda_0) / h, negative
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    R, b, h_phi_1, b_h = _unipc_coefficients(rks, hh, order, variant)
    x_t = x * (s_t / s0) - m0 * h_phi_1
    if model_t is None:
        if d1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_t = x_t - sum(d * (b_h * r) for r, d in zip(rhos, d1s))
        return x_t
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    res = (model_t - m0) * rhos[-1]
    for r, d in zip(rhos[:-1], d1s):
        res = res + d * r
    return x_t - res * b_h


def uni_pc(
    denoiser,
    x,
    sigmas,
    *,
    callback=None,
    noise_sampler=None,
    eta=0.0,
    s_noise=1.0,
    is_cancelled=None,
    order: int = 2,
    variant: str = "bh2",
):
    """UniPC multistep (Zhao et al. 2023) with data prediction, as diffusers' UniPCMultistepScheduler defaults
    (solver_order 2, bh2, lower_order_final, corrector on every step but the first).

    The corrector re-uses the model output taken at the uncorrected point (no extra call); the step to
    sigma 0 returns the last x0 prediction.
    """
    if variant not in ("bh1", "bh2"):
        raise RequestError("variant", variant, "one of bh1, bh2")
    loop = _Loop(sigmas, x, callback, noise_sampler, is_cancelled)
    hist: list[tuple[float, torch.Tensor]] = []
    last_x = None
    last_order = 1
    for i, s, sn in loop:
        den = denoiser(x, s)
        if last_x is not None:
            x = _unipc_update(last_x, hist[-1][0], s, hist, last_order, variant, model_t=den)
        hist = [*hist[-(order - 1) :], (s, den)] if order > 1 else [(s, den)]
        this_order = min(order, loop.n - i, len(hist))
        last_x, last_order = x, this_order
        x = den if sn == 0.0 else _unipc_update(x, s, sn, hist, this_order, variant)
        loop.report(i, x, den)
    return x


SAMPLER_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "ipndm": ipndm,
    "ipndm_v": lms,  # iPNDM-v's variable-step Adams-Bashforth weights are LMS's exact Lagrange integrals
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "ddim": ddim,
    "uni_pc": uni_pc,
    "lcm": lcm,
}

STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "lcm")  # fmt: skip


def sample(name: str, denoiser: Denoiser, x: torch.Tensor, sigmas, **kwargs) -> torch.Tensor:
    """Run sampler ``name`` (an id of ``core.sampling.SAMPLERS``) without autograd."""
    fn = SAMPLER_FUNCTIONS.get(name)
    if fn is None:
        raise RequestError("sampler", name, "one of " + ", ".join(SAMPLER_FUNCTIONS))
    with torch.no_grad():
        return fn(denoiser, x, sigmas, **kwargs)
