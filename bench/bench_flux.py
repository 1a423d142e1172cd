"""Our Flux transformer forward vs diffusers' FluxTransformer2DModel at FLUX.1's real widths, fp32 on CPU.

Hidden 3072, 24 heads x 128, MLP 12288, with a few blocks of each kind (default 2 double + 4 single; the real
model has 19 + 38), 1024 image tokens (a 512x512 image) + 512 text tokens (dev's T5 length), batch 1, dev
(guidance embedding). Both models get the same random weights: diffusers' through
``convert_flux_transformer_checkpoint_to_diffusers``, sharing every tensor the converter passes through unsplit.
Holds ``/tmp/darkroom-heavy.lock`` while measuring (run it plainly, not under ``flock``):

    .venv/bin/python bench/bench_flux.py [--double 2] [--single 4] [--threads 1] [--reps 3]
    .venv/bin/python bench/bench_flux.py --job     # peak RSS and time of one tiny Flux job, nothing else

Prints per-forward wall and CPU times, the ratios ours/diffusers (median and best; with ``--threads 1`` CPU time
is the steadier measure on a shared machine) and achieved GFLOP/s against a large fp32 matmul.
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

from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

from bench.common import heavy_lock  # noqa: E402
from core.models.flux import Flux, FluxConfig, img_ids, txt_ids  # noqa: E402
from core.models.testing import random_state_dict  # noqa: E402

IMAGE_TOKENS_SIDE = 32  # 32 x 32 = 1024 tokens = a 64 x 64 latent = 512 x 512 px
TEXT_TOKENS = 512


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n x n torch.mm on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_flops(cfg: FluxConfig, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): linear layers on every token plus attention."""
    h, m, n = cfg.hidden_size, cfg.mlp_hidden_dim, n_img + n_txt
    per_stream_token = 3 * h * h + h * h + 2 * h * m  # qkv, proj, MLP
    double = per_stream_token * n + 4 * n * n * h  # each token through its own stream's weights; QK^T and AV
    single = (3 * h * h + h * m + (h + m) * h) * n + 4 * n * n * h
    edges = cfg.in_channels * h * n_img + cfg.context_in_dim * h * n_txt + h * cfg.out_channels * n_img
    return 2 * (cfg.depth * double + cfg.depth_single_blocks * single + edges)


def build_models(cfg: FluxConfig) -> tuple[Flux, FluxTransformer2DModel]:
    with torch.device("meta"):
        ours = Flux(cfg)
    bfl = random_state_dict(ours, seed=0)
    ours.load_state_dict(bfl, assign=True)
    dconfig = {
        "in_channels": cfg.in_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
    }
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**dconfig)
    ref.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)), assign=True, strict=True)
    return ours.eval(), ref.eval()


def tiny_job() -> None:
    """One txt2img job on a tiny combined Flux.1 dev file through the pipeline (64x64, 4 steps, T5 at 512
    tokens): the process's peak RSS before loading and after the job (``ru_maxrss``, Linux KiB)."""
    import resource
    import tempfile

    from core.models.testing import write_random_flux_checkpoint
    from core.pipeline import generate, load_model
    from core.request import GenerationRequest

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    with tempfile.TemporaryDirectory() as folder:
        path = write_random_flux_checkpoint(Path(folder) / "flux-dev.safetensors", "dev")
        base = peak_mb()
        t0 = time.perf_counter()
        model = load_model(path, compute_hash=False, dtype=torch.float32)
        request = GenerationRequest(model=str(path), prompt="a lighthouse", steps=4, cfg=1.0, seed=1, width=64,
                                    height=64)
        generate(model, request)
        wall = time.perf_counter() - t0
    print(f"tiny Flux.1 dev job (64x64, 4 steps): {wall:.2f} s load+generate; peak RSS {peak_mb():.0f} MB "
          f"(+{peak_mb() - base:.0f} MB over the {base:.0f} MB after imports)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (default 2)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per model (default 3)")
    parser.add_argument("--job", action="store_true", help="only the peak RSS of one tiny Flux job")
    args = parser.parse_args()
    if args.job:
        tiny_job()
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(FluxConfig.preset("flux", "full", "dev"), depth=args.double, depth_single_blocks=args.single)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; Flux dev widths, "
        f"{cfg.depth} double + {cfg.depth_single_blocks} single blocks, "
        f"{IMAGE_TOKENS_SIDE**2} image + {TEXT_TOKENS} text tokens"
    )
    t0 = time.perf_counter()
    ours, ref = build_models(cfg)
    print(f"built both with the same random weights in {time.perf_counter() - t0:.1f} s")

    g = torch.Generator().manual_seed(0)
    n_img = IMAGE_TOKENS_SIDE**2
    img = torch.randn(1, n_img, cfg.in_channels, generator=g)
    iids = img_ids(2 * IMAGE_TOKENS_SIDE, 2 * IMAGE_TOKENS_SIDE)
    txt = torch.randn(1, TEXT_TOKENS, cfg.context_in_dim, generator=g)
    tids = txt_ids(TEXT_TOKENS)
    t = torch.tensor([0.7])
    y = torch.randn(1, cfg.vec_in_dim, generator=g)
    guidance = torch.tensor([3.5])

    def run_ours():
        return ours(img, iids, txt, tids, t, y, guidance)

    def run_ref():
        return ref(img, txt, y, t, iids[0], tids[0], guidance, return_dict=False)[0]

    with heavy_lock(), torch.inference_mode():
        peak = matmul_peak()
        a, b = run_ours(), run_ref()  # warm-up, and the two must agree
        err = ((a - b).norm() / b.norm()).item()
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        cpu: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(args.reps):  # interleaved, so drifting background load hits both alike
            for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        peak = max(peak, matmul_peak())

    flops = forward_flops(cfg, n_img, TEXT_TOKENS)
    print(f"fp32 matmul peak (2048^3 torch.mm): {peak:.1f} GFLOP/s; forward {flops / 1e12:.2f} TFLOPs")
    print(f"rel. difference of outputs {err:.1e}")
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for name in ("ours", "diffusers"):
        runs = ", ".join(f"{s:.2f}" for s in times[name])
        print(
            f"  {name:9s} median {med[name]:7.3f} s wall ({flops / med[name] / 1e9:6.1f} GFLOP/s, "
            f"{100 * flops / med[name] / 1e9 / peak:.0f} % of peak), {med_cpu[name]:7.3f} s CPU  runs: {runs}"
        )
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    print(
        f"  ratio ours/diffusers, median: {med['ours'] / med['diffusers']:.3f} wall, "
        f"{med_cpu['ours'] / med_cpu['diffusers']:.3f} CPU; best run: {best['ours'] / best['diffusers']:.3f} wall, "
        f"{best_cpu['ours'] / best_cpu['diffusers']:.3f} CPU"
    )


if __name__ == "__main__":
    main()
