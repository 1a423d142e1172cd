"""Preview cost against an SD1.5 step: the latent->RGB projection vs a TAESD decode, and what the 2 % throttle makes of it.

Prints, for 512x512 (64x64 latents) on this CPU, fp32: the median time of one CFG step of the full-size SD1.5
UNet (batch 2, random weights), of a projection preview (64x64 image) and of a TAESD preview (512x512 image),
each as a share of the step, then how often the ``Previewer`` shows a TAESD preview within its 2 % budget over
a simulated job of those step times (its real accounting, with the measured costs fed to its clock).

    .venv/bin/python bench/bench_previews.py [--side 64] [--reps 2] [--threads 0] [--taesd PATH] [--step S]

``--taesd`` takes a real ``taesd_decoder.pth``/``.safetensors``; without it the decoder has random weights (the
cost is the same: no data-dependent work). Holds ``/tmp/darkroom-heavy.lock`` while running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import heavy_lock, median_time  # noqa: E402
from core.models.latent_formats import preview_image  # noqa: E402
from core.models.previews import Previewer, load_preview_decoder  # noqa: E402
from core.models.taesd import DecoderConfig, TAESDDecoder, decode_preview  # noqa: E402
from core.models.testing import random_state_dict  # noqa: E402
from core.models.unet import UNetConfig, UNetModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="latent side (64 = 512x512 image)")
    parser.add_argument("--reps", type=int, default=2, help="timed UNet steps (previews: 5x as many)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the simulated job")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--taesd", type=Path, help="a real taesd_decoder file (default: random weights)")
    parser.add_argument("--step", type=float, help="take this UNet step time (s) instead of measuring it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with heavy_lock():
        measure(args)


def measure(args: argparse.Namespace) -> None:
    side = args.side
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
          f"{side}x{side} latents ({8 * side}x{8 * side} image)", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 768, generator=g)
    x0 = torch.randn(1, 4, side, side, generator=g)

    if args.taesd:
        decoder = load_preview_decoder(args.taesd, "sd15")
    else:
        decoder = TAESDDecoder(DecoderConfig(4)).eval().to(memory_format=torch.channels_last)

    with torch.inference_mode():
        if args.step:
            step = args.step
        else:
            with torch.device("meta"):
                unet = UNetModel(UNetConfig.preset("sd15", "full"))
            unet.load_state_dict(random_state_dict(unet, seed=0), assign=True)
            step = median_time(lambda: unet.eval()(x, t, ctx), args.reps)
            del unet
        projection = median_time(lambda: preview_image(x0[0], "sd15"), 5 * args.reps)
        taesd = median_time(lambda: decode_preview(decoder, x0, "sd15"), 5 * args.reps)
        image = decode_preview(decoder, x0, "sd15")

    print(f"  one CFG step (UNet, batch 2)   {step:8.3f} s{' (given)' if args.step else ''}")
    print(f"  projection preview {image.size[0] // 8}x{image.size[1] // 8}   {projection * 1e3:8.3f} ms = "
          f"{100 * projection / step:.3f} % of a step")
    print(f"  TAESD preview {image.size[0]}x{image.size[1]}      {taesd * 1e3:8.1f} ms = {100 * taesd / step:.2f} % of a step")

    # The throttle on a simulated job: the measured step and preview times drive its clock.
    now = [0.0]

    class Timed(TAESDDecoder):
        def forward(self, z):
            now[0] += taesd * z.shape[-1] * z.shape[-2] / (side * side)  # TAESD cost grows with area
            return z.new_zeros(z.shape[0], 3, 8 * z.shape[-2], 8 * z.shape[-1])  # only the accounting matters

    timed = Timed(DecoderConfig(4)).eval()
    previewer = Previewer("sd15", timed, clock=lambda: now[0], min_interval=0.25)
    shown = []
    for i in range(args.steps):
        now[0] += step
        image = previewer.maybe_preview(x0)
        if image is not None:
            shown.append((i + 1, "taesd" if image.size[0] > side else "projection"))
    share = previewer.spent / previewer.elapsed
    print(f"  Previewer over {args.steps} steps: {previewer.made} previews "
          f"({', '.join(f'{k}@{s}' for s, k in shown)}), preview time {100 * share:.2f} % of the job (budget 2 %)")


if __name__ == "__main__":
    main()
