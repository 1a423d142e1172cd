"""Our SDXL UNet forward vs diffusers' UNet2DConditionModel, same random full-size weights, fp32 on CPU.

Two fp32 SDXL UNets are about 21 GB, more than this machine can hold side by side, so each measurement runs in
its own child process holding one network (ours or diffusers', built from the same seeded random LDM state
dict, diffusers' through its single-file converter), and the children alternate: ours, diffusers, ours, ...
Each child runs one warm-up forward, then ``--reps`` timed ones (batch 2 = one CFG step, 64x64 latents,
77 x 2048 context, the 2816-wide y from pooled text + six 256-d Fourier size features), and writes its output
so the parent can check that both compute the same thing. The parent never imports torch until the children
are done, holds ``/tmp/darkroom-heavy.lock`` (run it plainly, not under ``flock``) and refuses to start a child
when less memory is available than one needs.

    .venv/bin/python bench/bench_sdxl_unet.py --threads 1 --reps 2 [--rounds 1] [--side 64]

Prints per-forward wall and CPU times per child, the medians, and the ratio ours/diffusers (CPU time is the
steadier one on a shared machine; with ``--threads 1`` it is exact per forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import heavy_lock  # noqa: E402

SDXL_CONFIG = Path("/work/shared/data/model-configs/stabilityai/stable-diffusion-xl-base-1.0/unet/config.json")
BATCH = 2
NEEDED_GB = 13.0  # one fp32 SDXL UNet (10.3 GB) + the converter's transient copies + activations


def available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def child(which: str, side: int, reps: int, threads: int, out: Path, size: str = "full") -> None:
    import torch

    from core.models.testing import random_state_dict
    from core.models.unet import UNetConfig, UNetModel, timestep_embedding

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = UNetConfig.preset("sdxl", size)
    fourier = 256 if size == "full" else 8  # the tiny preset's y: 128 pooled + 6 x 8
    pooled_dim = cfg.adm_in_channels - 6 * fourier
    with torch.device("meta"):
        ours = UNetModel(cfg)
    ldm = random_state_dict(ours, seed=0)
    if which == "ours":
        ours.load_state_dict(ldm, assign=True, strict=True)
        model = ours.eval()
    else:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        del ours
        if size == "full":
            dconfig = {k: v for k, v in json.loads(SDXL_CONFIG.read_text()).items() if not k.startswith("_")}
        else:  # a quick check of this script
            from tests.reference import diffusers_unet_config

            dconfig = diffusers_unet_config(cfg, sdxl_time_embed_dim=fourier)
        with torch.device("meta"):
            model = UNet2DConditionModel(**dconfig)
        converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, dconfig)
        ldm.clear()
        model.load_state_dict(converted, assign=True, strict=True)
        del converted
        model = model.eval()
    build = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, side, side, generator=g)
    t = torch.full((BATCH,), 500.0)
    ctx = torch.randn(BATCH, 77, cfg.context_dim, generator=g)
    pooled = torch.randn(BATCH, pooled_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * BATCH)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), fourier).reshape(BATCH, -1)], dim=1)

    def forward():
        if which == "ours":
            return model(x, t, ctx, y)
        return model(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]

    walls, cpus = [], []
    with torch.inference_mode():
        result = forward()  # warm-up
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            forward()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    torch.save(result, out)
    print(json.dumps({"build": build, "wall": walls, "cpu": cpus, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=2, help="timed forwards per child")
    parser.add_argument("--rounds", type=int, default=1, help="ours+diffusers child pairs")
    parser.add_argument("--side", type=int, default=64, help="latent side (64 = a 512x512 image)")
    parser.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: check the script")
    parser.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.side, args.reps, args.threads, args.out, args.size)
        return

    results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="darkroom-bench-") as folder:
        outputs = {}
        for round_index in range(args.rounds):
            for which in ("ours", "diffusers"):
                free = available_gb()
                if free < NEEDED_GB and args.size == "full":
                    sys.exit(f"only {free:.1f} GB of memory available, one child needs {NEEDED_GB:.0f} GB: not run")
                out = Path(folder) / f"{which}-{round_index}.pt"
                command = [sys.executable, __file__, "--child", which, "--out", str(out), "--side", str(args.side),
                           "--reps", str(args.reps), "--threads", str(args.threads), "--size", args.size]
                done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results[which].append(r)
                outputs[which] = out
                runs = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in zip(r["wall"], r["cpu"]))
                print(f"round {round_index + 1} {which:9s} built in {r['build']:.1f} s, {r['threads']} threads; "
                      f"forward wall/CPU s: {runs}", flush=True)
        import torch

        a, b = torch.load(outputs["ours"]), torch.load(outputs["diffusers"])
        err = float((a - b).norm() / b.norm())
        print(f"outputs: norm {float(b.norm()):.4g}, max |ours - diffusers| {float((a - b).abs().max()):.3g}")

    med = {k: statistics.median(w for r in v for w in r["wall"]) for k, v in results.items()}
    med_cpu = {k: statistics.median(c for r in v for c in r["cpu"]) for k, v in results.items()}
    best_cpu = {k: min(c for r in v for c in r["cpu"]) for k, v in results.items()}
    print(f"SDXL UNet, latent {args.side}x{args.side}, batch {BATCH}, fp32 CPU; rel. difference of outputs {err:.1e}")
    for name in ("ours", "diffusers"):
        print(f"  {name:9s} median {med[name]:8.2f} s wall, {med_cpu[name]:8.2f} s CPU")
    print(f"  ratio ours/diffusers, median: {med['ours'] / med['diffusers']:.3f} wall, "
          f"{med_cpu['ours'] / med_cpu['diffusers']:.3f} CPU; best CPU: {best_cpu['ours'] / best_cpu['diffusers']:.3f}")


if __name__ == "__main__":
    main()
