"""End-to-end txt2img: our pipeline vs diffusers' StableDiffusionPipeline on the same full-size weights.

Prints, for 256x256, 4 Euler steps, CFG 7, CPU fp32 (interleaved runs, medians):
- total time of each and the ratio ours/diffusers (goal <= 1.0),
- our time to the first step (prompt encoding + first UNet call) with the model already loaded,
- the cost of the per-step x0 preview as a share of the step time (goal < 2 %).

    .venv/bin/python bench/bench_pipeline.py [--path sd15.safetensors] [--repeats 2] [--size 256] [--steps 4]

Without ``--path`` it writes a full-size random SD1.5 fp16 checkpoint (about 2 GB) to a temp folder. Holds
``/tmp/darkroom-heavy.lock`` while running.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import heavy_lock, scratch_checkpoint  # noqa: E402
from core.models.latent_formats import preview_image  # noqa: E402
from core.models.testing import write_random_checkpoint  # noqa: E402
from core.pipeline import PromptCache, generate, load_model  # noqa: E402
from core.request import GenerationRequest  # noqa: E402
from tests.reference import psnr, reference_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, help="an existing SD1.5 single-file checkpoint")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def write(path: Path) -> None:
        write_random_checkpoint(path, "sd15", "full", seed=0, dtype=torch.float16)

    with heavy_lock(), scratch_checkpoint(args.path, write) as path:
        measure(path, args)


def measure(path: Path, args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    model = load_model(path, compute_hash=False, dtype=torch.float32)
    print(f"our load: {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    pipe = reference_pipeline(path)
    print(f"diffusers load (via single-file converters): {time.perf_counter() - started:.1f} s", flush=True)

    request = GenerationRequest(
        model=path.stem, prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry",
        sampler="euler", schedule="normal", steps=args.steps, cfg=7.0, seed=1,
        width=args.size, height=args.size,
    )

    ours_times, theirs_times, first_steps, step_times, preview_times = [], [], [], [], []
    ours_cpu, theirs_cpu = [], []  # process CPU time: steadier than wall time on a shared machine
    last_ours = last_theirs = None
    marks: list[float] = []

    def on_step(step: int, total: int, x0: torch.Tensor) -> None:
        marks.append(time.perf_counter())
        t0 = time.perf_counter()
        preview_image(x0[0], model.family)
        preview_times.append(time.perf_counter() - t0)

    for repeat in range(args.repeats):
        marks.clear()
        # Fresh cache each run so both sides encode the prompt (diffusers has no cache).
        t0, c0 = time.perf_counter(), time.process_time()
        last_ours = generate(model, request, cache=PromptCache(), on_step=on_step)[0][0]
        ours_times.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        first_steps.append(marks[0] - t0)
        step_times.extend(b - a for a, b in zip(marks, marks[1:]))

        t0, c0 = time.perf_counter(), time.process_time()
        last_theirs = pipe(
            prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=args.steps,
            guidance_scale=request.cfg, generator=torch.Generator().manual_seed(request.seed),
            width=args.size, height=args.size,
        ).images[0]
        theirs_times.append(time.perf_counter() - t0)
        theirs_cpu.append(time.process_time() - c0)
        print(f"run {repeat + 1}: ours {ours_times[-1]:.2f} s, diffusers {theirs_times[-1]:.2f} s", flush=True)

    ours, theirs = statistics.median(ours_times), statistics.median(theirs_times)
    step = statistics.median(step_times) if step_times else float("nan")
    preview = statistics.median(preview_times)
    print()
    print(f"txt2img {args.size}x{args.size}, {args.steps} Euler steps, CFG 7, fp32 CPU (median of {args.repeats})")
    print(f"  ours       {ours:8.2f} s")
    print(f"  diffusers  {theirs:8.2f} s")
    pairs = [a / b for a, b in zip(ours_times, theirs_times)]
    print(f"  ratio ours/diffusers  {ours / theirs:.3f}  (goal <= 1.0); per interleaved pair: "
          + ", ".join(f"{r:.3f}" for r in pairs))
    cpu_ratio = statistics.median(ours_cpu) / statistics.median(theirs_cpu)
    print(f"  CPU time ours {statistics.median(ours_cpu):.1f} s, diffusers {statistics.median(theirs_cpu):.1f} s, "
          f"ratio {cpu_ratio:.3f}")
    print(f"  time to first step (model loaded)  {statistics.median(first_steps):.2f} s")
    print(f"  step time {step:.3f} s, preview {preview * 1e3:.3f} ms = {100 * preview / step:.3f} % of a step "
          "(goal < 2 %)")
    print(f"  PSNR ours vs diffusers: {psnr(last_ours, last_theirs):.1f} dB")


if __name__ == "__main__":
    main()
