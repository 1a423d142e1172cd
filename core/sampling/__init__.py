"""Samplers and noise schedules over sigmas and a denoiser callable (k-diffusion style)."""

from __future__ import annotations

# id -> A1111 display label (../shared/reference/sampling.md §1)
SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
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
