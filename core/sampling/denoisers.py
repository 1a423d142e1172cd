"""Denoiser wrappers: turn a network's raw output into an x0 estimate ``denoise(x, sigma) -> x0``.

Samplers work in the variance-exploding (k-diffusion) parametrisation: ``x = x0 + sigma * noise``. A
discrete-time SD model was trained on the variance-preserving ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``,
and ``x_t = x / sqrt(sigma^2 + 1)`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``, so the wrappers scale the
input, map sigma to the model's (fractional) timestep and map the prediction back to x0.

The wrapped network is called as ``model(x_in, t, **cond)`` with ``t`` a float tensor of shape ``[B]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from core.errors import RequestError

Model = Callable[..., torch.Tensor]


class DiscreteSchedule:
    """The training noise schedule of a discrete-timestep model (SD1.x/2.x/XL: scaled-linear betas).

    ``sigmas[t]`` (ascending in t) is kept in float64 on the CPU; ``sigma_to_t`` / ``t_to_sigma`` interpolate
    linearly in log-sigma between neighbouring integer timesteps, the same map the k-diffusion wrappers use,
    so integer timesteps round-trip exactly.
    """

    def __init__(
        self,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
    ) -> None:
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        else:
            raise RequestError("beta_schedule", beta_schedule, "one of scaled_linear, linear")
        self.num_timesteps = num_timesteps
        self.betas = betas  # [T] float64
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # [T] float64
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # [T] ascending
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of each sigma (float64, same shape); clamps to [0, T-1] outside the table."""
        s = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        log_s = s.log()
        # index of the last table entry <= log_s, so [low, low+1] brackets it
        low = (torch.searchsorted(self.log_sigmas, log_s.reshape(-1), right=True) - 1).clamp(
            0, self.num_timesteps - 2
        )
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_s.reshape(-1) - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (low.to(torch.float64) + w).reshape(s.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at (fractional) timesteps ``t``, log-linear between integer steps (float64)."""
        tt = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, self.num_timesteps - 1)
        low = tt.floor().long().clamp(max=self.num_timesteps - 2)
        w = tt - low
        log_s = (1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_s.exp()

    def alpha_cumprod_at(self, sigma: float) -> float:
        """abar for a VE sigma: abar = 1 / (sigma^2 + 1) (exact for any sigma, not only table entries)."""
        return 1.0 / (sigma * sigma + 1.0)


def _sigma_column(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a float64 CPU vector of length B (scalar sigmas are broadcast over the batch)."""
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1)
    if s.numel() == 1:
        s = s.expand(x.shape[0])
    return s


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] float64 -> [B, 1, 1, ...] in x's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class EpsDenoiser:
    """Epsilon-prediction model: ``x0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma))``."""

    def __init__(self, model: Model, schedule: DiscreteSchedule | None = None) -> None:
        self.model = model
        self.schedule = schedule or DiscreteSchedule()

    def _model_out(self, x: torch.Tensor, s: torch.Tensor, c_in: torch.Tensor, cond: dict) -> torch.Tensor:
        t = self.schedule.sigma_to_t(s).to(device=x.device, dtype=torch.float32)
        return self.model(x * _bcast(c_in, x), t, **cond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = _sigma_column(sigma, x)
        eps = self._model_out(x, s, 1.0 / (s * s + 1.0).sqrt(), cond)
        return x - eps * _bcast(s, x)


class VDenoiser(EpsDenoiser):
    """v-prediction model (SD2.x 768-v), sigma_data = 1.

    With ``v = alpha eps - sigma_vp x0``, x0 = c_skip x + c_out v where c_skip = 1 / (sigma^2 + 1),
    c_out = -sigma / sqrt(sigma^2 + 1) and the input is scaled by c_in = 1 / sqrt(sigma^2 + 1).
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = _sigma_column(sigma, x)
        norm = (s * s + 1.0).sqrt()
        v = self._model_out(x, s, 1.0 / norm, cond)
        return x * _bcast(1.0 / (s * s + 1.0), x) + v * _bcast(-s / norm, x)


class FlowDenoiser:
    """Rectified-flow model (Flux): ``x_t = (1 - t) x0 + t noise``, the model predicts ``v = noise - x0``.

    Here sigma is the flow time t in [0, 1], so ``x0 = x - t * v`` and Euler over the sigmas is the flow's
    Euler step ``x + (t_next - t) v``. The network is called as ``model(x, t * time_scale, **cond)``
    (Flux takes t in [0, 1]: time_scale 1), plus ``guidance=[g] * B`` when a distilled guidance is given
    (Flux.1 dev's ``guidance_in``). The flow ODE ``dx/dt = (x - x0) / t`` has the variance-exploding form, so
    the deterministic samplers (euler, heun, dpmpp_2m, ...) solve it as they are; ancestral/SDE noise assumes
    ``x0 + sigma noise`` and is refused for flow models (``FlowSampling.samplers``).
    """

    def __init__(self, model: Model, time_scale: float = 1.0, guidance: float | None = None) -> None:
        self.model = model
        self.time_scale = time_scale
        self.guidance = guidance
        self.schedule = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = _sigma_column(sigma, x)
        t = (s * self.time_scale).to(device=x.device, dtype=torch.float32)
        if self.guidance is not None:
            cond = {**cond, "guidance": torch.full((x.shape[0],), float(self.guidance), device=x.device)}
        v = self.model(x, t, **cond)
        return x - v * _bcast(s, x)


def _kwargs(cond: Any) -> dict[str, Any]:
    """Network keywords of a ``core.models.conditioning.Conditioning`` or of a plain dict."""
    return cond.model_kwargs() if hasattr(cond, "model_kwargs") else cond


def _batched(cond: Any, uncond: Any) -> dict[str, Any]:
    """``[cond; uncond]`` as network keywords: ``Conditioning.cat`` when both are Conditionings."""
    if hasattr(cond, "model_kwargs") and hasattr(uncond, "model_kwargs"):
        return type(cond).cat([cond, uncond]).model_kwargs()
    return _cat_cond(_kwargs(cond), _kwargs(uncond))


def _cat_cond(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in cond.items():
        other = uncond.get(key, value)
        out[key] = torch.cat([value, other]) if isinstance(value, torch.Tensor) else value
    return out


def rescale_guidance(guided: torch.Tensor, cond_pred: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891) eq. 15-16: match the per-image std of the guided prediction to
    the conditional one, then blend with weight phi (0 = plain CFG)."""
    dims = list(range(1, guided.ndim))
    std_cond = cond_pred.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1.0 - phi) * guided


class CFGDenoiser:
    """Classifier-free guidance around a denoiser: ``D = D_u + cfg (D_c - D_u)``.

    Cond and uncond go through ONE call on a batch of 2B (``[cond; uncond]``, each conditioning tensor
    concatenated along dim 0; the caller makes token lengths equal). They are ``Conditioning``s or dicts of
    network keywords. ``cfg == 1`` runs only the conditional
    half. Guidance on x0 equals guidance on eps because x0 = x - sigma eps is affine with the same x.

    ``cond`` may instead be a ``core.models.prompt_schedule.ConditioningSchedule`` (``uncond`` then unused):
    A1111 prompt editing/alternation picks the conditioning per call (``step`` counts calls from 0), and
    ``AND`` parts guide together: ``D = D_u + cfg * sum_i w_i (D_i - D_u)`` in one call on ``(n + 1) B``.

    ``guidance_rescale`` (phi) is applied to the noise prediction ``eps = (x - D) / sigma`` — exactly
    diffusers' ``rescale_noise_cfg`` for epsilon models (for v models diffusers rescales v instead).
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        cond: Any,
        uncond: Any | None,
        cfg: float,
        guidance_rescale: float = 0.0,
    ) -> None:
        self.inner = denoiser
        self.cfg = float(cfg)
        self.guidance_rescale = float(guidance_rescale)
        self.schedule = getattr(denoiser, "schedule", None)
        self.calls = 0  # network forward calls, for tests and stats
        self.step = 0  # index of the next call in a prompt schedule (A1111 counts calls, not sampler steps)
        # A core.models.prompt_schedule.ConditioningSchedule: the conditioning changes between calls.
        self.scheduled = cond if hasattr(cond, "at") else None
        self._batches: dict[Any, tuple[tuple[float, ...], dict[str, Any], dict[str, Any] | None]] = {}
        if self.scheduled is not None:
            return
        self.cond = _kwargs(cond)
        self.uncond = None if uncond is None else _kwargs(uncond)
        # concatenated once: the conditioning is the same at every step
        self._both = None if uncond is None or self.cfg == 1.0 else _batched(cond, uncond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        call, self.step = self.step, self.step + 1
        if self.scheduled is None:
            return self._guide(x, sigma, (1.0,), self.cond, self._both)
        key, parts, uncond = self.scheduled.at(call)
        if key not in self._batches:  # a new selection (at a schedule switch): batch it once
            batch = x.shape[0]
            conds = [cond.expand(batch) for cond, _ in parts]
            weights = tuple(weight for _, weight in parts)
            plain = weights == (1.0,) and self.cfg == 1.0
            both = None if plain else type(conds[0]).cat([*conds, uncond.expand(batch)]).model_kwargs()
            self._batches[key] = (weights, conds[0].model_kwargs(), both)
        return self._guide(x, sigma, *self._batches[key])

    def _guide(
        self, x: torch.Tensor, sigma: torch.Tensor | float, weights: tuple[float, ...], single: dict, both: dict | None
    ) -> torch.Tensor:
        """``D_u + cfg * sum_i w_i (D_i - D_u)`` over one network call on ``[cond_1; ...; cond_n; uncond]``
        (A1111's composable diffusion; one part of weight 1 is plain CFG). ``both`` None: ``single`` only."""
        if both is None:
            return self.inner(x, sigma, **single)
        s = _sigma_column(sigma, x)
        k = len(weights) + 1
        *d_conds, d_uncond = self.inner(torch.cat([x] * k), torch.cat([s] * k), **both).chunk(k)
        if weights == (1.0,):
            d_cond = d_conds[0]
        else:
            d_cond = d_uncond + sum(w * (d - d_uncond) for w, d in zip(weights, d_conds))
        guided = d_uncond + self.cfg * (d_cond - d_uncond)
        if self.guidance_rescale > 0.0:
            sc = _bcast(s, x)
            if bool((s > 0).all()):
                eps_guided = (x - guided) / sc
                eps_cond = (x - d_cond) / sc
                guided = x - sc * rescale_guidance(eps_guided, eps_cond, self.guidance_rescale)
        return guided


def _lcm_scalings(t: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[float, float]:
    """LCM boundary condition (sampling.md §4): c_skip, c_out at timestep t."""
    s = t * timestep_scaling
    return sigma_data**2 / (s * s + sigma_data**2), s / math.sqrt(s * s + sigma_data**2)
