"""Z-Image: time from a new prompt to the end of the first denoising step, with Qwen3-4B offloaded (on the CPU
between prompts, brought to the device to encode and sent back: what ``ZImageConditioner`` does on a GPU) against
resident (kept on the device), and with the prompt already in the prompt cache (no encoding at all).

Real widths with a few layers: Qwen3-4B (hidden 2560, MLP 9728, the real 151936-row vocabulary so the real
tokenizer drives it) in bf16 with ``--te-layers`` of its 36 layers, the Z-Image-Turbo DiT (D 3840) with
``--dit-layers`` main layers and one refiner of each kind, one image of ``--image`` pixels (256: 256 tokens), no CFG (Turbo). Each
repetition encodes a prompt never seen before. On the CPU nothing moves (offloading is a no-op there by design),
so the two times agree; on a CUDA device the offloaded run pays the round trip of the encoder's weights. Also
printed: the bytes an offloaded prompt moves, scaled to the real 36 layers. Holds ``/tmp/darkroom-heavy.lock``:

    .venv/bin/python bench/bench_zimage_first_step.py [--device cuda] [--te-layers 2] [--dit-layers 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import heavy_lock  # noqa: E402
from core.models.conditioning import EncoderSettings  # noqa: E402
from core.models.qwen3 import Qwen3, Qwen3Config  # noqa: E402
from core.models.testing import random_state_dict  # noqa: E402
from core.models.zimage import LatentZImage, ZImageConfig, ZImageTransformer  # noqa: E402
from core.models.zimage_conditioner import ZImageConditioner  # noqa: E402
from core.sampling.denoisers import FlowDenoiser  # noqa: E402


def build(module_cls, cfg, dtype: torch.dtype) -> torch.nn.Module:  # noqa: ANN001
    with torch.device("meta"):
        module = module_cls(cfg)
    module.load_state_dict(random_state_dict(module, seed=0, dtype=dtype), assign=True)
    return module.eval().requires_grad_(False)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--te-layers", type=int, default=2, help="Qwen3 decoder layers (the real model: 36)")
    parser.add_argument("--dit-layers", type=int, default=1, help="Z-Image main layers (the real model: 30)")
    parser.add_argument("--image", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dit_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    qcfg = dataclasses.replace(Qwen3Config.preset("4b"), num_hidden_layers=args.te_layers)
    zcfg = dataclasses.replace(ZImageConfig.preset("full"), n_layers=args.dit_layers, n_refiner_layers=1)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; building Qwen3-4B widths x "
          f"{args.te_layers} layers (bf16) and the Z-Image DiT x {args.dit_layers} + 1 + 1 layers ...", flush=True)
    qwen = build(Qwen3, qcfg, torch.bfloat16)
    dit = build(ZImageTransformer, zcfg, dit_dtype).to(device)
    denoiser = FlowDenoiser(LatentZImage(dit))
    latent = args.image // 8
    x = torch.randn(1, 16, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dit_dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def first_step(conditioner: ZImageConditioner | None, prompt: str, cached) -> tuple[float, float]:  # noqa: ANN001
        """(wall, CPU) seconds from the prompt to the end of the first DiT call."""
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        cond = cached if conditioner is None else conditioner.encode(prompt, EncoderSettings())
        with torch.inference_mode():
            denoiser(x, torch.ones(1, device=device), **cond.model_kwargs())
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    components = {"text_encoder": qwen, "unet": dit}
    offloaded = ZImageConditioner(components)  # Qwen3 lives on the CPU; encode() brings it over and back
    resident = ZImageConditioner(components)
    resident._offload = lambda: None  # type: ignore[method-assign]  # kept on the device between prompts
    times: dict[str, list[tuple[float, float]]] = {"offloaded": [], "resident": [], "cached": []}
    with heavy_lock():
        qwen.to("cpu")
        first_step(offloaded, "warm-up prompt", None)  # kernels, allocator, tokenizer
        cached = offloaded.encode("a lighthouse at dusk, oil painting", EncoderSettings())
        for rep in range(args.reps):
            qwen.to("cpu")
            times["offloaded"].append(first_step(offloaded, f"a lighthouse at dusk number {rep}, oil painting", None))
            qwen.to(device)
            times["resident"].append(first_step(resident, f"a harbour at dawn number {rep}, watercolour", None))
            times["cached"].append(first_step(None, "", cached))
    def median(name: str, which: int) -> float:
        return statistics.median(run[which] for run in times[name])

    for name, runs in times.items():
        print(f"  {name:10s} prompt -> first step  median {median(name, 0):7.3f} s wall, {median(name, 1):7.3f} s CPU"
              "   wall runs: " + ", ".join(f"{w:.3f}" for w, _ in runs))
    print(f"  ratio offloaded / resident: {median('offloaded', 0) / median('resident', 0):.3f} wall, "
          f"{median('offloaded', 1) / median('resident', 1):.3f} CPU")
    layer = module_bytes(qwen.model.layers[0])
    full = module_bytes(qwen) + (36 - args.te_layers) * layer
    print(f"  an offloaded new prompt moves the encoder's weights in and out: 2 x {full / 2**30:.1f} GiB at the real "
          f"36 layers (here 2 x {module_bytes(qwen) / 2**30:.2f} GiB); a cached prompt moves nothing")


if __name__ == "__main__":
    main()
