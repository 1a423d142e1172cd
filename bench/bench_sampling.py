"""Sampler overhead per step (network excluded) and 10-step accuracy on a Gaussian data distribution.

    .venv/bin/python bench/bench_sampling.py [--device cpu|cuda] [--steps 50] [--repeats 5]

1. Overhead: a 2 x 4 x 64 x 64 latent, a denoiser that returns a precomputed x0 (so only the sampler's own
   tensor arithmetic, noise draws and bookkeeping are timed), per step, best of ``repeats``. A second
   column wraps an identity eps "model" in EpsDenoiser + CFGDenoiser (cfg 7) to show the wrapper cost.
2. Accuracy: x0 ~ N(mu, 0.5^2 I) has the exact denoiser D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)
   and a closed-form probability-flow ODE solution; RMS error of the final sample at 10 steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.sampling import SAMPLERS  # noqa: E402
from core.sampling.denoisers import CFGDenoiser, DiscreteSchedule, EpsDenoiser  # noqa: E402
from core.sampling.noise import NoiseSampler  # noqa: E402
from core.sampling.samplers import sample  # noqa: E402
from core.sampling.schedules import get_sigmas, lcm_sigmas  # noqa: E402

SD = DiscreteSchedule()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def overhead(device: str, steps: int, repeats: int) -> None:
    shape = (2, 4, 64, 64)
    x0 = torch.randn(shape, device=device)
    calls = {"n": 0}

    def fixed(x, sigma):
        calls["n"] += 1
        return x0

    zero_model = lambda x_in, t, **cond: x_in  # noqa: E731  (identity: no arithmetic)
    cond = {"context": torch.zeros(2, 77, 768, device=device)}
    wrapped = CFGDenoiser(EpsDenoiser(zero_model, SD), cond, cond, cfg=7.0)
    print(f"Sampler overhead per step, latent {tuple(shape)} on {device}, {steps} steps, best of {repeats}")
    print(f"{'sampler':20s} {'ms/step':>9s} {'calls/step':>11s} {'ms/step (Eps+CFG)':>18s}")
    for name in SAMPLERS:
        sigmas = lcm_sigmas(SD, 8) if name == "lcm" else get_sigmas("karras", SD, steps)
        n = len(sigmas) - 1
        best = {}
        for label, den in (("fixed", fixed), ("cfg", wrapped)):
            times = []
            for _ in range(repeats):
                ns = NoiseSampler([1, 2], shape[1:], device=device)
                x = ns.initial() * sigmas[0]
                calls["n"] = 0
                _sync(device)
                t0 = time.perf_counter()
                sample(name, den, x, sigmas, noise_sampler=ns)
                _sync(device)
                times.append(time.perf_counter() - t0)
                if label == "fixed":
                    per_step_calls = calls["n"] / n
            best[label] = min(times) / n * 1000
        print(f"{name:20s} {best['fixed']:9.3f} {per_step_calls:11.1f} {best['cfg']:18.3f}")


def gaussian_accuracy(steps: int = 10) -> None:
    s = 0.5
    mu = torch.linspace(-1.0, 1.0, 4 * 64 * 64, dtype=torch.float64).reshape(1, 4, 64, 64)

    def denoise(x, sigma):
        return (s * s * x + sigma * sigma * mu) / (s * s + sigma * sigma)

    noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = [("ays", "dpmpp_2m"), ("karras", "dpmpp_2m"), ("normal", "euler"), ("karras", "euler"),
            ("normal", "dpmpp_2m"), ("exponential", "dpmpp_2m"), ("karras", "heun"), ("karras", "uni_pc"),
            ("ays", "uni_pc"), ("karras", "lms")]  # fmt: skip
    print(f"\nGaussian data x0 ~ N(mu, {s}^2 I): RMS error of the final sample vs the exact ODE solution, {steps} steps")
    print(f"{'schedule':12s} {'sampler':10s} {'model calls':>11s} {'RMS error':>10s}")
    for schedule, name in rows:
        sigmas = get_sigmas(schedule, SD, steps).double()
        x = noise * float(sigmas[0])
        exact = mu + (x - mu) * s / math.sqrt(s * s + float(sigmas[0]) ** 2)
        calls = {"n": 0}

        def counted(x, sigma, calls=calls):
            calls["n"] += 1
            return denoise(x, sigma)

        out = sample(name, counted, x, sigmas)
        rms = float((out - exact).pow(2).mean().sqrt())
        print(f"{schedule:12s} {name:10s} {calls['n']:11d} {rms:10.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    # 1 by default: on a busy shared CPU, OpenMP threads for >32k-element ops stall for milliseconds
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s)")
    overhead(args.device, args.steps, args.repeats)
    gaussian_accuracy()


if __name__ == "__main__":
    main()
