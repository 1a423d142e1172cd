"""Equal quality in a quarter of the time, SDXL: bench_quarter.py's comparison on full-size random SDXL weights.

    .venv/bin/python bench/bench_quarter_sdxl.py [--size 256] [--seeds 1] [--threads 1] [--checkpoint F]
                                                 [--smooth-time] [--only LABELS]

The method is bench_quarter.py's (read its docstring): per seed a 50-step diffusers reference (DPM++ 2M Karras,
CFG 7), diffusers' default of 20 steps timed before and after Darkroom's rows, and Darkroom's candidates at its
default precision, each with its PSNR on the latents against the reference and its process CPU time. What
differs is memory: diffusers' fp32 SDXL pipeline (about 14 GB) and Darkroom's (7 GB in bf16, 14 in fp32) do not
fit in this machine side by side, so each side runs in a child process of its own, one after the other
(diffusers, Darkroom in bf16, Darkroom in fp32, diffusers again), and hands back its latents and times. Loading
is outside every timed region. The parent holds ``/tmp/darkroom-heavy.lock``.

Measured (``--size 256 --threads 2``, full-size random SDXL, seed 1, this AMX Xeon, where Darkroom's
``--precision auto`` is bf16): diffusers 20 steps 52.17 dB at 290.9 CPU s (mean of its runs before and after;
the 50-step reference took 675.7). Darkroom with diffusers' settings in fp32: 51.73 dB at 0.92x. In bf16 every
row is 3x cheaper per step (Karras 20 0.35x, Karras 16 0.30x, Karras 10 0.20x), but bf16 sits at 42-43 dB here
(Karras 20 42.43, Karras 24 42.76). Per forward bf16 moves the SDXL UNet's output 2.2 % (the rounding of its
weights alone 1.5 %), about what it does to SD1.5's (1.8 %), but over 20 steps at CFG 7 the random SDXL's
trajectory turns that into a 10 dB loss where SD1.5's loses 0.7, so **no candidate reaches diffusers' PSNR in bf16 and the fastest that does is fp32 at 0.92x**
(goal <= 0.25 not met). First-block 0.1 on Karras 24 skips a little (0.42x against 0.45x) at no PSNR cost;
DeepCache 2 on Karras 20 costs 1.2 dB against bf16 Karras 20.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_quarter import REF_LABEL, Rows, Setting, print_comparison, print_fastest  # noqa: E402
from bench.common import heavy_lock, scratch_checkpoint, smooth_time_checkpoint  # noqa: E402

KARRAS = {"schedule": "karras"}
# cheapest first; the fp32 row checks that both sides compute the same image
CANDIDATES = [
    Setting("AYS 10", {"schedule": "ays", "steps": 10}),
    Setting("DPM++ 2M Karras 10", {**KARRAS, "steps": 10}),
    Setting("Karras 20 + DeepCache 2", {**KARRAS, "steps": 20, "deepcache_interval": 2}),
    Setting("Karras 16", {**KARRAS, "steps": 16}),
    Setting("Karras 20 (diffusers' settings)", {**KARRAS, "steps": 20}),
    Setting("Karras 24", {**KARRAS, "steps": 24}),
    Setting("Karras 24 + first-block 0.1", {**KARRAS, "steps": 24, "fbcache_threshold": 0.1}),
    Setting("Karras 20 fp32 (diffusers' numbers)", {**KARRAS, "steps": 20}, precision="fp32"),
]


def diffusers_child(path: Path, size: int, seeds: list[int], steps: list[int], out: Path) -> None:
    """diffusers' SDXL pipeline with DPM++ 2M Karras; one run per (seed, step count), latents and times saved."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from bench.bench_quarter import CFG, NEGATIVE, PROMPT, Timer
    from core.sampling.noise import NoiseSampler
    from tests.reference import reference_sdxl_components

    scheduler = DPMSolverMultistepScheduler(  # as bench_quarter.py's SD1.5 pipeline
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, use_karras_sigmas=True,
    )
    pipe = StableDiffusionXLPipeline(**reference_sdxl_components(path, release=True), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for seed in seeds:
        initial = NoiseSampler([seed], (4, size // 8, size // 8)).initial()  # Darkroom's noise for this seed
        for count in steps:
            with Timer() as timer, torch.inference_mode():
                latents = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=count, guidance_scale=CFG,
                               latents=initial.clone(), height=size, width=size, output_type="latent").images
            results[(seed, count)] = (latents, timer.cpu, timer.wall)
            print(f"  diffusers {count} steps, seed {seed}: cpu {timer.cpu:.1f} s", flush=True)
    torch.save(results, out)


def darkroom_child(path: Path, size: int, seeds: list[int], precision: str, labels: list[str], out: Path) -> None:
    import torch

    from bench.bench_quarter import CFG, NEGATIVE, PROMPT, run_darkroom
    from core.accel.device import compute_dtype
    from core.pipeline import load_model
    from core.request import GenerationRequest

    dtype = torch.float32 if precision == "fp32" else compute_dtype("cpu")
    model = load_model(path, compute_hash=False, dtype=dtype)
    print(f"  Darkroom SDXL in {str(dtype).removeprefix('torch.')}", flush=True)
    base = GenerationRequest(model="bench", prompt=PROMPT, negative_prompt=NEGATIVE, sampler="dpmpp_2m",
                             schedule="karras", steps=20, cfg=CFG, seed=1, width=size, height=size)
    fields = {c.label: c.fields for c in CANDIDATES}
    results = {}
    for seed in seeds:
        for label in labels:
            request = base.replace(seed=seed, **fields[label])
            latents, timer = run_darkroom(model, request, model.noise_sampler([seed], size, size))
            results[(seed, label)] = (latents, timer.cpu, timer.wall)
            print(f"  {label:40s} seed {seed}: cpu {timer.cpu:.1f} s", flush=True)
    torch.save(results, out)


def run_child(args: list[str], threads: int) -> None:
    command = [sys.executable, __file__, "--threads", str(threads), *args]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to average over (default 1)")
    parser.add_argument("--ref-steps", type=int, default=50, help="steps of the reference image (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    parser.add_argument("--checkpoint", type=Path, help="an SDXL checkpoint (default: write random full-size)")
    parser.add_argument("--tiny", action="store_true", help="tiny random weights: checks the script in seconds")
    parser.add_argument("--smooth-time", action="store_true", help="as bench_quarter.py's --smooth-time")
    parser.add_argument("--only", help="comma-separated Darkroom labels to run (default: all)")
    parser.add_argument("--child", choices=("diffusers", "darkroom"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--labels", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = list(range(1, 1 + args.seeds))

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "diffusers":
            diffusers_child(args.checkpoint, args.size, seeds, [int(s) for s in args.steps.split(",")], args.out)
        else:
            darkroom_child(args.checkpoint, args.size, seeds, args.precision, args.labels.split("|"), args.out)
        return

    wanted = [c.label for c in CANDIDATES if not args.only or c.label in {x.strip() for x in args.only.split(",")}]

    def write(path: Path) -> None:
        from core.models.testing import write_random_checkpoint

        write_random_checkpoint(path, "sdxl", "tiny" if args.tiny else "full", seed=0)

    with heavy_lock(), scratch_checkpoint(args.checkpoint, write, "sdxl") as path, \
            tempfile.TemporaryDirectory(prefix="darkroom-bench-") as scratch:
        if args.smooth_time:
            path = smooth_time_checkpoint(path, Path(scratch) / "smooth-time.safetensors")
        common = ["--checkpoint", str(path), "--size", str(args.size), "--seeds", str(args.seeds)]
        files = {name: Path(scratch) / f"{name}.pt" for name in ("before", "auto", "fp32", "after")}
        print(f"SDXL {'tiny' if args.tiny else 'full-size'} random weights{' (smooth in t)' if args.smooth_time else ''}, "
              f"{args.size}x{args.size}, seeds {seeds}, {args.threads} thread(s) per child", flush=True)
        run_child([*common, "--child", "diffusers", "--steps", f"{args.ref_steps},20", "--out", str(files["before"])],
                  args.threads)
        for precision in ("auto", "fp32"):
            labels = [c.label for c in CANDIDATES if c.precision == precision and c.label in wanted]
            if labels:
                run_child([*common, "--child", "darkroom", "--precision", precision, "--labels", "|".join(labels),
                           "--out", str(files[precision])], args.threads)
        run_child([*common, "--child", "diffusers", "--steps", "20", "--out", str(files["after"])], args.threads)

        import torch

        from bench.bench_quarter import psnr

        results = {name: torch.load(file) for name, file in files.items() if file.exists()}
        rows: Rows = {}
        for seed in seeds:
            ref = results["before"][(seed, args.ref_steps)][0]
            for name in ("before", "after"):
                latents, cpu, wall = results[name][(seed, 20)]
                rows.setdefault(REF_LABEL, []).append((psnr(latents, ref), cpu, wall))
            for name in ("auto", "fp32"):
                for (s, label), (latents, cpu, wall) in results.get(name, {}).items():
                    if s == seed:
                        rows.setdefault(label, []).append((psnr(latents, ref), cpu, wall))

    passing = print_comparison(rows, len(seeds), set(wanted))
    print_fastest(rows, passing)

if __name__ == "__main__":
    main()
