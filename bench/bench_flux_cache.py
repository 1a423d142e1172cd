"""First-block cache against a TeaCache-style cache on Flux, at equal error: is TeaCache worth shipping?

    .venv/bin/python bench/bench_flux_cache.py [--steps 28] [--size tiny|small] [--threads 1]

A seeded random-weight Flux (``core.models.flux``; ``tiny`` preset or a ``small`` one with 4+8 blocks at
hidden 256, 8 heads of 32) samples a 32x32-latent image by Euler over the flow (28 steps, shift 3). Each cache runs with a
sweep of thresholds; printed per run: full transformer passes, network calls saved, and the relative error of
the final latents against the uncached run. A method beats the other when it reaches the same error with fewer
full passes.

- first-block cache: ``core.accel.feature_cache`` (the shipped one).
- TeaCache (Liu et al., arXiv 2411.19108; sampling.md section 8), written here only: the indicator is the
  timestep-modulated input of double block 0, ``rel = mean|m_t - m_prev| / mean|m_prev|`` against the previous
  call, accumulated through BFL-Flux's fitted polynomial; below ``threshold`` the previous call's residual
  (final - input hidden states) is reused, else the network runs and the sum resets. First call always runs.

Random weights do not have the real model's feature dynamics (and TeaCache's polynomial was fitted on FLUX.1-dev),
so this measures the mechanism, not the published speedups.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.accel.feature_cache import CacheSettings, FeatureCache  # noqa: E402
from core.models.flux import Flux, FluxConfig, _layer_norm, img_ids, txt_ids  # noqa: E402
from core.models.testing import random_state_dict  # noqa: E402

TEACACHE_FLUX = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)  # highest power first


class TeaCache(FeatureCache):
    """TeaCache on Flux's blocks (bench only)."""

    def __init__(self, threshold: float) -> None:
        super().__init__(CacheSettings())
        self.threshold = threshold
        self.prev = None
        self.acc = 0.0
        self.rest = None

    def flux(self, flux, img, txt, vec, pe):
        block = flux.double_blocks[0]
        shift, scale = block.img_mod(vec)[:2]
        modulated = (1 + scale) * _layer_norm(img) + shift
        run = self.prev is None or self.rest is None
        if not run:
            rel = float((modulated - self.prev).abs().mean() / self.prev.abs().mean())
            poly = 0.0
            for c in TEACACHE_FLUX:
                poly = poly * rel + c
            self.acc += poly
            run = self.acc >= self.threshold
        self.prev = modulated
        if not run:
            self.stats.hits += 1
            return img + self.rest[0], txt + self.rest[1]
        self.acc = 0.0
        self.stats.full += 1
        img_out, txt_out = flux.blocks(img, txt, vec, pe)
        self.rest = (img_out - img, txt_out - txt)
        return img_out, txt_out


def build(size: str) -> Flux:
    cfg = FluxConfig.preset("flux", "tiny", variant="schnell")
    if size == "small":
        cfg = dataclasses.replace(cfg, hidden_size=256, num_heads=8, depth=4, depth_single_blocks=8)
    with torch.device("meta"):
        meta = Flux(cfg)
    model = Flux(cfg)
    model.load_state_dict(random_state_dict(meta, seed=0), strict=True)
    return model.eval().requires_grad_(False)


def sample(model: Flux, steps: int, cache: FeatureCache | None) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    side = 16  # 16x16 packed tokens = a 32x32 latent
    x = torch.randn(1, side * side, cfg.in_channels, generator=g)
    cond = dict(img_ids=img_ids(2 * side, 2 * side), txt=torch.randn(1, 8, cfg.context_in_dim, generator=g),
                txt_ids=txt_ids(8), y=torch.randn(1, cfg.vec_in_dim, generator=g))
    s = torch.linspace(1.0, 0.0, steps + 1)
    t = 3.0 * s / (1 + 2.0 * s)  # shift 3
    with torch.inference_mode():
        for i in range(steps):
            if cache is not None:
                with cache.active():
                    v = model(x, timesteps=t[i : i + 1], **cond)
            else:
                v = model(x, timesteps=t[i : i + 1], **cond)
            x = x + (t[i + 1] - t[i]) * v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.size)
    plain = sample(model, args.steps, None)
    print(f"Flux {args.size} random weights, {args.steps} Euler steps; error = |x - x_uncached| / |x_uncached|")
    print(f"{'cache':24s} {'full passes':>11s} {'rel. error':>10s}")
    for label, make, thresholds in (
        ("first-block", lambda th: FeatureCache(CacheSettings(fbcache_threshold=th)), (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 1.0)),
        ("TeaCache", TeaCache, (0.1, 0.25, 0.4, 0.6, 0.8, 1.2)),
    ):
        for th in thresholds:
            cache = make(th)
            out = sample(model, args.steps, cache)
            err = float((out - plain).norm() / plain.norm())
            print(f"{label + f' {th}':24s} {cache.stats.full:11d} {err:10.4f}", flush=True)


if __name__ == "__main__":
    main()
