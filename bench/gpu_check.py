"""The GPU check: it/s and peak VRAM of Darkroom next to diffusers on one CUDA GPU (run by bench/gpu_check.sh).

SD1.5 at 512x512 and SDXL at 1024x1024, full-size random weights (``core.models.testing`` writes them in the
checkpoint layout from the families' full configs, which are the ones in ``../shared/data/model-configs/``),
batch 1 with CFG 7, Euler. For each: every attention backend this machine has (sage, xformers, sdpa) in fp16
and bf16, then with compile and with feature caching where this build has them (checked, never assumed), and
diffusers' pipeline on the same weights in fp16 and bf16. The compiled job runs again without its CUDA graph
(``core.accel.cuda_graphs``), and the two images are compared: a replay runs the eager call's kernels, so they
must be identical (the graphs have been tested only with a stand-in for ``torch.cuda`` until this runs). it/s is over the steps after the first two (the
first pays for compilation and kernel selection); peak VRAM is ``torch.cuda.max_memory_allocated`` over the
job, weights included, with the memory plan's estimate beside it.

A time budget (default 450 s of the 8 minutes) skips what no longer fits and says so. Without a CUDA device it
prints why and exits 0 without measuring; ``--smoke`` runs the same code on tiny models on the CPU (a check
of this script, not a measurement).

    bench/gpu_check.sh            # or: python bench/gpu_check.py [--budget 450] [--no-diffusers] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.accel import device as devices  # noqa: E402
from core.accel.attention import AttentionDispatcher  # noqa: E402
from core.models.testing import write_random_checkpoint  # noqa: E402
from core.pipeline import PipelineRunner  # noqa: E402
from core.request import GenerationRequest  # noqa: E402

GiB = 2**30
# family, width, height, steps (full) / (smoke)
CASES = (("sd15", 512, 512, 12), ("sdxl", 1024, 1024, 8))
SMOKE = (("sd15", 64, 64, 4), ("sdxl", 64, 64, 4))
WARMUP_STEPS = 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Options of the feature-cache/compile work (request fields deepcache_interval / fbcache_threshold, the runner's
# ``compile`` setting); used only when this build has them.
CACHE_FIELDS = {"sd15": {"deepcache_interval": 3}, "sdxl": {"deepcache_interval": 3}}
FBCACHE_FIELD = {"fbcache_threshold": 0.08}


class StepClock:
    """The worker's RunContext as far as the runner uses it: times each step (after a device sync)."""

    job_id = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.activity = ""

    def step(self, step: int, total: int, preview: Any = None, image_index: int = 0) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def set_activity(self, text: str) -> None:
        self.activity = text

    def is_cancelled(self) -> bool:
        return False

    def check_cancelled(self) -> None:
        pass

    def its(self) -> float:
        t = self.times[WARMUP_STEPS - 1 :] if len(self.times) > WARMUP_STEPS else self.times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")


def darkroom_runner(root: Path, device: torch.device, precision: str, **options: Any) -> PipelineRunner:
    """A runner whose networks run in ``precision`` (fp16/bf16) whatever the device's default (auto: bf16 on
    Ampere and later), as ``--precision`` sets it."""
    return PipelineRunner([root], previews=False, device=str(device), precision=precision, **options)


def native_bf16(device: torch.device) -> bool:
    """bf16 rows only where the GPU computes bf16 natively (sm80+): torch >= 2.4's is_bf16_supported() is also
    True where it is emulated (Turing), slowly, which would spend the time budget on nothing useful."""
    return device.type != "cuda" or devices._native_bf16(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return devices.memory_stats(device)[1]


def request_for(family: str, width: int, height: int, steps: int, **fields: Any) -> GenerationRequest:
    return GenerationRequest(model=family, prompt="a lighthouse on a cliff at dusk, oil painting",
                             negative_prompt="blurry", sampler="euler", schedule="normal", steps=steps, cfg=7.0,
                             seed=1, width=width, height=height, **fields)


def request_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(GenerationRequest)}


def runner_options() -> set[str]:
    return set(inspect.signature(PipelineRunner.__init__).parameters)


def run_darkroom(runner: PipelineRunner, request: GenerationRequest, device: torch.device) -> dict:
    clock = StepClock(device)
    peak_reset(device)
    started = time.perf_counter()
    images = runner.run(SimpleNamespace(id=1, request=request), clock)
    plan = runner.memory_plan
    graphs = getattr(runner, "job_graphs", None)
    return {"its": clock.its(), "peak": peak(device), "wall": time.perf_counter() - started,
            "attention": runner.attention.summary(), "estimate": getattr(plan, "need", 0),
            "plan": plan.describe() if plan is not None else "",
            "image": images[0].image if images else None,
            "graphs": f"{graphs.captures} capture(s), {graphs.replays} replays" if graphs is not None else None}


def pixel_difference(a: Any, b: Any) -> str:
    """How two images differ, for the CUDA graph row: a replay runs the kernels the eager call ran, so its
    image should be the eager one to the bit."""
    from PIL import ImageChops

    if a is None or b is None:
        return "no image to compare"
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB"))
    largest = max(high for _, high in diff.getextrema())
    return "identical pixels" if largest == 0 else f"DIFFERS: up to {largest}/255 per channel (a bug: report it)"


def run_diffusers(pipe: Any, family: str, request: GenerationRequest, device: torch.device,
                  dtype: torch.dtype) -> dict:
    pipe.to(device, dtype)
    times: list[float] = []

    def on_step(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())
        return kwargs

    peak_reset(device)
    started = time.perf_counter()
    pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
         guidance_scale=request.cfg, width=request.width, height=request.height,
         generator=torch.Generator(device).manual_seed(request.seed), callback_on_step_end=on_step)
    clock = StepClock(device)
    clock.times = times
    return {"its": clock.its(), "peak": peak(device), "wall": time.perf_counter() - started,
            "attention": "sdpa (diffusers default)", "estimate": 0, "plan": ""}


class Printed(list):
    """The report's lines, each printed as it is added: what was measured before the 8-minute limit stays."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def measured(device: torch.device, run: Any, *args: Any, **kwargs: Any) -> Any:
    """``run(*args, **kwargs)``, or why it failed: a kernel, compiler or memory this machine lacks costs that
    row, not the rest of the check."""
    try:
        return run(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of one configuration is reported in its row
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        text = str(exc).strip().splitlines()
        return f"failed ({type(exc).__name__}: {text[0][:160] if text else ''})"


def row(who: str, attention: str, precision: str, extra: str, result: dict | str) -> str:
    head = f"  {who:9} {attention:9} {precision:5} {extra:22}"
    if isinstance(result, str):
        return f"{head} {result}"
    estimate = f"  est. {result['estimate'] / GiB:.1f} GB" if result["estimate"] else ""
    plan = f"  [{result['plan']}]" if result["plan"] else ""
    return (f"{head} {result['its']:7.2f} it/s  peak {result['peak'] / GiB:5.2f} GB{estimate}  "
            f"({result['attention']}){plan}")


def check_family(family: str, width: int, height: int, steps: int, size: str, device: torch.device,
                 args: argparse.Namespace, deadline: float) -> list[str]:
    lines = Printed()
    lines.append(f"{family} {width}x{height}, batch 1, CFG 7, Euler, {steps} steps "
                 f"(it/s over steps {WARMUP_STEPS}..{steps}; peak = max allocated, weights included)")
    fields, options = request_fields(), runner_options()

    def left() -> float:
        return deadline - time.monotonic()

    with tempfile.TemporaryDirectory(prefix="darkroom-gpu-check-") as folder:
        root = Path(folder)
        started = time.monotonic()
        write_random_checkpoint(root / "checkpoints" / f"{family}.safetensors", family, size, dtype=torch.float16)
        lines.append(f"  (random {size} checkpoint written in {time.monotonic() - started:.0f} s)")
        request = request_for(family, width, height, steps)
        precisions = [p for p in DTYPES if p != "bf16" or native_bf16(device)]
        best: dict[str, float] = {}
        for precision in precisions:
            if left() < 30:
                lines.append(f"  darkroom  {precision}: skipped (time budget)")
                continue
            runner = darkroom_runner(root, device, precision)
            loaded = measured(device, runner.ensure_model, request)
            if isinstance(loaded, str):
                lines.append(row("darkroom", "-", precision, "load", loaded))
                continue
            backends = [b for b in ("sage", "xformers", "sdpa") if b in runner.attention.available(device)]
            for backend in backends:
                if left() < 20:
                    lines.append(row("darkroom", backend, precision, "eager", "skipped (time budget)"))
                    continue
                runner.attention = AttentionDispatcher(backend)
                measured(device, run_darkroom, runner, request, device) if args.warm else None
                result = measured(device, run_darkroom, runner, request, device)
                if isinstance(result, dict):
                    best[precision] = max(best.get(precision, 0.0), result["its"])
                lines.append(row("darkroom", backend, precision, "eager", result))
            runner.attention = AttentionDispatcher("auto")
            caches = {k: v for k, v in {**CACHE_FIELDS.get(family, {}), **FBCACHE_FIELD}.items() if k in fields}
            for name, value in caches.items():
                if left() < 20:
                    lines.append(row("darkroom", "auto", precision, f"{name}={value}", "skipped (time budget)"))
                    continue
                lines.append(row("darkroom", "auto", precision, f"{name}={value}",
                                 measured(device, run_darkroom, runner, request.replace(**{name: value}), device)))
            if not caches:
                lines.append(row("darkroom", "auto", precision, "feature cache", "not in this build"))
            if "compile" in options:
                if left() < (60 if family == "sd15" else 150):
                    lines.append(row("darkroom", "auto", precision, "compile", "skipped (time budget)"))
                else:
                    compiled = darkroom_runner(root, device, precision, compile="auto")
                    compiled.model = runner.model  # the same loaded weights
                    first = measured(device, run_darkroom, compiled, request, device)  # compiles
                    if isinstance(first, str):
                        lines.append(row("darkroom", "auto", precision, "compile", first))
                    else:
                        result = measured(device, run_darkroom, compiled, request, device)
                        lines.append(row("darkroom", "auto", precision, f"compile (1st job {first['wall']:.0f} s)",
                                         result))
                        if hasattr(compiled.compiler, "graphs") and left() > 20:  # the same, no CUDA graph replay
                            compiled.compiler.graphs = False
                            plain = measured(device, run_darkroom, compiled, request, device)
                            compiled.compiler.graphs = True
                            lines.append(row("darkroom", "auto", precision, "compile, no CUDA graph", plain))
                            if isinstance(plain, dict) and isinstance(result, dict):  # the replay against eager, here
                                lines.append(f"    CUDA graph: {result['graphs'] or 'not used'}; against no graph: "
                                             f"{pixel_difference(result['image'], plain['image'])}")
                        for name, value in list(caches.items())[:1]:
                            if left() > 20:
                                cached = request.replace(**{name: value})
                                lines.append(row("darkroom", "auto", precision, f"compile + {name}={value}",
                                                 measured(device, run_darkroom, compiled, cached, device)))
                    del compiled
            else:
                lines.append(row("darkroom", "auto", precision, "compile", "not in this build"))
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.no_diffusers:
            return lines
        try:
            from tests.reference import reference_pipeline, reference_sdxl_pipeline
        except ImportError as exc:
            lines.append(f"  diffusers: not installed ({exc})")
            return lines
        if left() < 45:
            lines.append("  diffusers: skipped (time budget)")
            return lines
        path = root / "checkpoints" / f"{family}.safetensors"
        build = reference_sdxl_pipeline if family == "sdxl" else reference_pipeline
        pipe = measured(device, build, path, dtype=torch.float16)
        if isinstance(pipe, str):
            lines.append(row("diffusers", "sdpa", "", "load", pipe))
            return lines
        for precision in precisions:
            if left() < 15:
                lines.append(row("diffusers", "sdpa", precision, "", "skipped (time budget)"))
                continue
            result = measured(device, run_diffusers, pipe, family, request, device, DTYPES[precision])
            lines.append(row("diffusers", "sdpa", precision, "", result))
            if precision in best and isinstance(result, dict) and result["its"] > 0:
                lines.append(f"  -> darkroom's best eager / diffusers, {precision}: {best[precision] / result['its']:.2f}x")
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=450.0, help="seconds before what is left is skipped")
    parser.add_argument("--no-diffusers", action="store_true", help="only Darkroom")
    parser.add_argument("--only", choices=("sd15", "sdxl"), help="one model")
    parser.add_argument("--warm", action="store_true", help="run each configuration twice, measure the second")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks this script only")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):  # its warnings about fp16 on the CPU and VAE upcasting are noise here
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    started = time.monotonic()
    deadline = started + args.budget
    if args.smoke:
        device, cases, size = torch.device("cpu"), SMOKE, "tiny"
    else:
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device here (torch {torch.__version__}, "
                  f"built for CUDA {torch.version.cuda or 'none'}); nothing measured. Run it on a machine with an "
                  "NVIDIA GPU (--smoke checks the script on the CPU).", flush=True)
            return 0
        device, cases, size = torch.device("cuda"), CASES, "full"
        props = torch.cuda.get_device_properties(device)
        print(f"gpu_check: {props.name}, {props.total_memory / GiB:.0f} GB, capability {props.major}.{props.minor}, "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    for family, width, height, steps in cases:
        if args.only and family != args.only:
            continue
        if deadline - time.monotonic() < 60:
            print(f"{family}: skipped (time budget)", flush=True)
            continue
        check_family(family, width, height, steps, size, device, args, deadline)  # prints as it goes
    print(f"gpu_check: done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
