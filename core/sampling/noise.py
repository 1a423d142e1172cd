"""Seeded noise: the same seed gives the same image on any device.

Every image of a batch has its own CPU ``torch.Generator`` seeded with its own seed (image i of a job uses
seed + i, see ``GenerationRequest.image_seeds``), so an image does not depend on the batch it was made in.
Noise is drawn on the CPU in float32 and only then moved to the device and dtype, because CUDA and CPU
generators give different numbers for the same seed.

One ``NoiseSampler`` per job: ``initial()`` draws the starting latent noise and every later call draws the
ancestral/SDE noise of one step from the SAME per-image stream, so a stochastic sampler is reproducible
from the seed alone and its step noise is independent of the starting noise.

k-diffusion drives dpmpp_sde / dpmpp_2m_sde with a Brownian tree (noise that is consistent when the step
count changes). Here every call is a fresh seeded Gaussian: reproducible for a fixed schedule, but changing
the step count changes the noise path, not just its resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NoiseSampler:
    """Per-image seeded Gaussian noise; ``noise_sampler(sigma, sigma_next) -> noise`` like k-diffusion's."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """``shape`` is one image's latent shape, e.g. (4, 64, 64); draws are ``[len(seeds), *shape]``."""
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def draw(self) -> torch.Tensor:
        per_image = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(per_image).to(device=self.device, dtype=self.dtype)

    def initial(self) -> torch.Tensor:
        """Unit-variance starting noise (the sampler scales it by sigmas[0]); call once, first."""
        return self.draw()

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        return self.draw()


def initial_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Starting noise only (``NoiseSampler(...).initial()``); use one NoiseSampler when steps add noise too."""
    return NoiseSampler(seeds, shape, device, dtype).initial()


def global_noise_sampler(x: torch.Tensor):
    """Fallback when no seeded sampler is given: torch's global RNG, like k-diffusion's default."""

    def sample(sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        return torch.randn_like(x)

    return sample
