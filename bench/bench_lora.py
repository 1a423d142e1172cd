"""LoRA switching and merged-step cost, measured side by side.

1. Switching: time to change the merged LoRA set between two jobs (A -> B -> A ..., the files already parsed,
   as the runner's file cache has them after first use) against a full checkpoint load (``load_model``, what
   switching would cost if the model were reloaded). Goal: <= 0.1x. Switching back to the previous set puts
   its kept merges back; "new set" times a set not merged before (A's weight changed each time), which
   computes every touched weight again.
2. Steps: one UNet call (CFG batch of 2) with a LoRA set merged against the plain model, alternating.
   Goal: 1.0x (merged weights are plain weights).

Both LoRA sets are kohya LoRAs over every attention and feed-forward layer of the UNet and the text encoder
(rank ``--rank``); set B adds a LoCon over the ResBlock convs. ``--size full`` writes a full-size random SD1.5
fp16 checkpoint (about 2.1 GB, removed afterwards; or pass ``--path``) and holds ``/tmp/darkroom-heavy.lock``.

    .venv/bin/python bench/bench_lora.py [--size tiny|full] [--rank 16] [--repeats 5] [--latent 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import heavy_lock, median_time, scratch_checkpoint  # noqa: E402
from core.lora.files import LoraFileCache  # noqa: E402
from core.lora.patch import activate  # noqa: E402
from core.lora.tags import LoraRef  # noqa: E402
from core.models.testing import write_random_checkpoint, write_random_lora  # noqa: E402
from core.pipeline import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--path", type=Path, help="an SD1.5 checkpoint to use (--size full only)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=64, help="latent side for the step timing (64 = 512 px)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (1 gives steadier numbers on a "
                        "shared machine; 0: torch's default)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="darkroom-bench-lora-") as folder:
        folder = Path(folder)
        if args.size == "full":
            lock = heavy_lock()
            ckpt_ctx = scratch_checkpoint(args.path, lambda p: write_random_checkpoint(p, "sd15", "full"))
        else:
            lock = nullcontext()
            ckpt_ctx = nullcontext(write_random_checkpoint(folder / "tiny.safetensors", "sd15", "tiny"))
        with lock, ckpt_ctx as checkpoint:
            files = {
                "a": write_random_lora(folder / "a.safetensors", size=args.size, fmt="kohya", rank=args.rank, seed=1),
                "b": write_random_lora(folder / "b.safetensors", size=args.size, fmt="kohya", rank=args.rank, seed=2),
                "b_conv": write_random_lora(folder / "b_conv.safetensors", size=args.size, fmt="locon",
                                            rank=args.rank, seed=3, text_encoder=False),
            }
            sets = {"A": [LoraRef("a", 0.8)], "B": [LoraRef("b", 0.6), LoraRef("b_conv", 0.5)]}
            load = median_time(lambda: load_model(checkpoint, compute_hash=False, dtype=torch.float32), max(1, args.repeats // 2), warm_up=False)
            model = load_model(checkpoint, compute_hash=False, dtype=torch.float32)
            cache = LoraFileCache()

            def find(name: str) -> Path:
                return files[name]

            t = time.perf_counter()
            activate(model.loras, sets["A"], find, cache)
            first = time.perf_counter() - t  # includes reading and hashing the file
            order = iter(["B", "A"] * args.repeats)
            switch = median_time(lambda: activate(model.loras, sets[next(order)], find, cache), 2 * args.repeats, warm_up=False)
            merged_weights = model.loras.merged_weights
            weights = iter([0.7 - 0.05 * i for i in range(2 * args.repeats)])
            fresh = median_time(lambda: activate(model.loras, [LoraRef("a", next(weights))], find, cache),
                                2 * args.repeats, warm_up=False)

            unet = model.checkpoint.unet
            cfg = unet.config
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, args.latent, args.latent, generator=g).to(model.dtype)
            ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(model.dtype)
            ts = torch.tensor([500.0, 500.0])

            def step() -> None:
                with torch.inference_mode():
                    unet(x, ts, ctx)

            step()  # warm-up
            plain, with_lora = [], []
            for _ in range(args.repeats):
                activate(model.loras, [], find, cache)
                plain.append(median_time(step, 1, warm_up=False))
                activate(model.loras, sets["B"], find, cache)
                with_lora.append(median_time(step, 1, warm_up=False))
            activate(model.loras, [], find, cache)

    print(f"SD1.5 {args.size}, {model.dtype}, LoRA rank {args.rank}, {merged_weights} weights merged in set A->B")
    print(f"  checkpoint load            {load * 1000:9.1f} ms")
    print(f"  first LoRA set (reads file) {first * 1000:8.1f} ms")
    print(f"  switch A <-> B             {switch * 1000:9.1f} ms   = {switch / load:.3f}x a load (goal <= 0.1x)")
    print(f"  switch to a new set        {fresh * 1000:9.1f} ms   = {fresh / load:.3f}x a load")
    p, w = statistics.median(plain), statistics.median(with_lora)
    print(f"  UNet step {args.latent}x{args.latent} x2    {p * 1000:9.1f} ms plain, {w * 1000:.1f} ms with LoRAs"
          f"   = {w / p:.3f}x (goal 1.0x)")


if __name__ == "__main__":
    main()
