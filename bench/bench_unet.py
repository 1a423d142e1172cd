"""Our SD1.5 UNet forward vs diffusers' UNet2DConditionModel, same random full-size weights, fp32 on CPU.

Run serialized with other heavy jobs:

    flock /tmp/darkroom-heavy.lock .venv/bin/python bench/bench_unet.py [--quick]

Prints per-forward median times (batch 2, as one CFG step), the ratio ours/diffusers, and achieved GFLOP/s
against a large fp32 matmul measured in the same process. On a shared machine wall times swing with other
load; runs are interleaved, and the best-run and CPU-time ratios (``--threads 1`` makes CPU time exact per
forward) are the steadier comparison. FLOPs are the analytic counts of
/work/shared/reference/performance.md section 1 (batch 1: 0.180 TFLOPs at 32x32 latents, 0.803 at 64x64).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from core.models.testing import random_state_dict  # noqa: E402
from core.models.unet import UNetConfig, UNetModel  # noqa: E402

SD15_CONFIG = Path("/work/shared/data/model-configs/runwayml/stable-diffusion-v1-5/unet/config.json")
TFLOPS_BATCH1 = {32: 0.180, 64: 0.803}
BATCH = 2


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n x n torch.mm on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def build_models() -> tuple[UNetModel, UNet2DConditionModel]:
    import json

    cfg = UNetConfig.preset("sd15", "full")
    with torch.device("meta"):
        ours = UNetModel(cfg)
    ldm = random_state_dict(ours, seed=0)
    ours.load_state_dict(ldm, assign=True)
    dconfig = json.loads(SD15_CONFIG.read_text())
    dconfig = {k: v for k, v in dconfig.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**dconfig)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, dconfig)
    ref.load_state_dict(converted, assign=True, strict=True)
    return ours.eval(), ref.eval()


def bench_size(ours, ref, side: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, side, side, generator=g)
    t = torch.full((BATCH,), 500.0)
    ctx = torch.randn(BATCH, 77, 768, generator=g)

    def run_ours():
        return ours(x, t, ctx)

    def run_ref():
        return ref(x, t, ctx, return_dict=False)[0]

    with torch.inference_mode():
        a, b = run_ours(), run_ref()  # warm-up (also checks the two agree)
        err = ((a - b).norm() / b.norm()).item()
        times = {"ours": [], "diffusers": []}
        cpu = {"ours": [], "diffusers": []}
        for _ in range(reps):
            for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    flops = TFLOPS_BATCH1[side] * 1e12 * BATCH
    print(f"latent {side}x{side}, batch {BATCH}, {reps} reps (rel. difference of outputs {err:.1e})")
    for name in ("ours", "diffusers"):
        runs = ", ".join(f"{s:.2f}" for s in times[name])
        print(
            f"  {name:9s} median {med[name]:7.3f} s wall ({flops / med[name] / 1e9:6.1f} GFLOP/s), "
            f"{med_cpu[name]:7.3f} s CPU  runs: {runs}"
        )
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    print(
        f"  ratio ours/diffusers, median: {med['ours'] / med['diffusers']:.3f} wall, "
        f"{med_cpu['ours'] / med_cpu['diffusers']:.3f} CPU; best run: {best['ours'] / best['diffusers']:.3f} wall, "
        f"{best_cpu['ours'] / best_cpu['diffusers']:.3f} CPU"
    )
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x32 latents only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=0, help="timed runs per model (default 5 at 32, 3 at 64)")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 torch.mm): {peak:.1f} GFLOP/s")
    t0 = time.perf_counter()
    ours, ref = build_models()
    print(f"built both SD1.5 UNets with the same random weights in {time.perf_counter() - t0:.1f} s")
    sizes = [32] if args.quick else [32, 64]
    for side in sizes:
        reps = args.reps or (5 if side == 32 else 3)
        med = bench_size(ours, ref, side, reps)
        peak = max(peak, matmul_peak())  # re-measured: other load on a shared machine depresses single readings
        flops = TFLOPS_BATCH1[side] * 1e12 * BATCH
        print(f"  ours at {100 * flops / med['ours'] / 1e9 / peak:.0f} % of matmul peak ({peak:.1f} GFLOP/s best so far)")


if __name__ == "__main__":
    main()
