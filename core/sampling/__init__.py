"""Samplers and noise schedules over sigmas and a denoiser callable (k-diffusion style).

This package root imports no torch (the request validator uses the ids below). The modules:
``denoisers`` (DiscreteSchedule, Eps/V/Flow denoisers, CFGDenoiser), ``schedules`` (get_sigmas),
``samplers`` (sample, one function per id), ``noise`` (NoiseSampler: per-image seeded CPU noise).

Typical use::

    sigmas = get_sigmas(req.schedule, schedule, req.steps, denoise=req.denoise, family="sd15")
    ns = NoiseSampler(seeds, (4, h // 8, w // 8), device, dtype)
    x = ns.initial() * sigmas[0]            # img2img: latent + ns.initial() * sigmas[0]
    den = CFGDenoiser(EpsDenoiser(unet, schedule), cond, uncond, req.cfg)
    x0 = sample(req.sampler, den, x, sigmas, noise_sampler=ns, callback=..., is_cancelled=...)
    # lcm: use sigmas = lcm_sigmas(schedule, steps)
"""

from __future__ import annotations

# id -> A1111 display label (../shared/reference/sampling.md §1)
SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "ipndm": "IPNDM",
    "ipndm_v": "IPNDM_V",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
}

# id -> A1111 "Schedule type" label
SCHEDULE_LABELS: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "ays": "Align Your Steps",
}

SAMPLERS = tuple(SAMPLER_LABELS)
SCHEDULES = tuple(SCHEDULE_LABELS)


class Cancelled(Exception):
    """Raised by a sampler when its ``is_cancelled()`` check returns True between steps.

    Defined here (no torch import) so front ends can catch it without loading torch.
    """
