"""Model upscalers (core/upscale.py): what a model upscaler costs in a hires fix, and what tiling saves in memory.

1. Time of a 2x hires fix with a 4x ESRGAN upscaler model against the latent upscaler, same request and size
   (SD1.5 layout: ``--checkpoint`` takes a real file, else a tiny random one, where the UNet is cheap and the
   upscaler's share is at its largest), both in this process, median of ``--reps``.
2. Peak memory of the upscaler's 4x pass over a ``--side`` x ``--side`` image, untiled (spandrel's own call) vs
   tiled (``--tile``, ``--overlap``): live tensor bytes (``core.accel.memory.LiveTensorBytes``, the activations
   the same on any device) and each run's peak RSS in a fresh subprocess (Linux VmHWM, reset just before the
   pass; tracemalloc does not see torch's allocations).

    .venv/bin/python bench/bench_upscale.py [--side 256] [--tile 96] [--overlap 32] [--filters 32] [--blocks 4]
        [--steps 4] [--size 128] [--reps 2] [--threads 0] [--checkpoint PATH]

The ESRGAN has random weights in the old-arch layout (``core.models.testing.write_random_esrgan``); a real
4x-UltraSharp is ``--filters 64 --blocks 23``. spandrel must be installed; where no torchvision imports, the
test stand-in (tests/stubs) is put on the path. Holds ``/tmp/darkroom-heavy.lock`` while running.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import heavy_lock, median_time  # noqa: E402


def _spandrel_path() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or built for another torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.path.insert(0, str(ROOT / "tests" / "stubs"))


def hires_times(args: argparse.Namespace, upscaler_path: Path, folder: Path) -> None:
    from core.models.testing import write_random_checkpoint
    from core.pipeline import generate, load_model
    from core.request import GenerationRequest, HiresFix
    from core.upscale import load_upscaler, upscale_image

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = write_random_checkpoint(folder / "tiny.safetensors", "sd15", "tiny")
    model = load_model(checkpoint, compute_hash=False, dtype=torch.float32)
    upscaler = load_upscaler(upscaler_path)
    base = GenerationRequest(model="m", prompt="a lighthouse at dusk", seed=1, steps=args.steps,
                             width=args.size, height=args.size)
    latent = base.replace(hires=HiresFix(2.0, "latent", args.steps, 0.5))
    by_model = base.replace(hires=HiresFix(2.0, "4x-bench", args.steps, 0.5))
    t_latent = median_time(lambda: generate(model, latent), args.reps)
    t_model = median_time(lambda: generate(model, by_model, upscaler=upscaler), args.reps)
    first = generate(model, base)[0][0]
    t_up = median_time(lambda: upscale_image(upscaler, first, 2 * args.size, 2 * args.size), args.reps)
    print(f"hires fix 2x, {args.size} -> {2 * args.size} px, {args.steps} + {args.steps} steps "
          f"({'tiny random SD1.5' if args.checkpoint is None else args.checkpoint.name}; ESRGAN {args.filters} "
          f"filters, {args.blocks} blocks):")
    print(f"  latent upscaler   {t_latent:7.2f} s")
    print(f"  ESRGAN 4x model   {t_model:7.2f} s   = {t_model / t_latent:.2f}x the latent one "
          f"(the model's upscale alone: {t_up:.2f} s)")


def _peak_rss_mb() -> float:
    """Peak RSS since the last ``_reset_peak`` (Linux VmHWM), else since the start (``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return _peak_rss_mb()


def _reset_peak() -> None:
    """Make VmHWM the current RSS, so the peak is the pass's own, not the imports' (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def one_pass(path: Path, side: int, tile: int | None, overlap: int) -> dict:
    """One 4x pass (tiled when ``tile``), its live-tensor peak and this process's peak RSS."""
    from core.accel.memory import LiveTensorBytes
    from core.upscale import load_upscaler, run_tiled

    upscaler = load_upscaler(path)
    image = torch.rand((1, 3, side, side), generator=torch.Generator().manual_seed(0))
    import gc

    gc.collect()
    _reset_peak()
    before = _rss_mb()
    t0 = time.perf_counter()
    with LiveTensorBytes() as live:
        if tile is None:
            out = upscaler.descriptor(image)
        else:
            out = run_tiled(upscaler, image, upscaler.scale, tile, overlap)
    return {"live_mb": live.peak / 2**20, "rss_mb": _peak_rss_mb(), "rss_before_mb": before,
            "seconds": time.perf_counter() - t0, "out": list(out.shape)}


def memory(args: argparse.Namespace, path: Path) -> None:
    runs = {}
    for label, tile in (("untiled", None), ("tiled", args.tile)):
        cmd = [sys.executable, __file__, "--_pass", str(path), "--side", str(args.side), "--overlap",
               str(args.overlap), "--threads", str(args.threads)] + (["--tile", str(tile)] if tile else ["--tile", "0"])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    un, ti = runs["untiled"], runs["tiled"]
    print(f"4x pass over {args.side}x{args.side} -> {un['out'][-1]}x{un['out'][-2]} (tiles of {args.tile}, "
          f"overlap {args.overlap}):")
    print(f"  live tensors: untiled {un['live_mb']:8.1f} MB, tiled {ti['live_mb']:8.1f} MB "
          f"= {ti['live_mb'] / un['live_mb']:.2f}x")
    grew = {k: max(r["rss_mb"] - r["rss_before_mb"], 0.0) for k, r in runs.items()}
    print(f"  peak RSS:     untiled {un['rss_mb']:8.1f} MB, tiled {ti['rss_mb']:8.1f} MB; growth during the pass: "
          f"untiled +{grew['untiled']:.0f} MB, tiled +{grew['tiled']:.0f} MB (the process held "
          f"{un['rss_before_mb']:.0f} MB before: torch, spandrel, the loaded model)")
    print(f"  time:         untiled {un['seconds']:8.2f} s,  tiled {ti['seconds']:8.2f} s "
          f"= {ti['seconds'] / un['seconds']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--skip-hires", action="store_true")
    parser.add_argument("--_pass", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _spandrel_path()
    if args._pass is not None:
        print(json.dumps(one_pass(args._pass, args.side, args.tile or None, args.overlap)))
        return
    from core.models.testing import write_random_esrgan

    with heavy_lock(), tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        folder = Path(tmp)
        path = write_random_esrgan(folder / "4x-bench.safetensors", "esrgan", 4, filters=args.filters,
                                   blocks=args.blocks)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
        if not args.skip_hires:
            hires_times(args, path, folder)
        memory(args, path)


if __name__ == "__main__":
    main()
