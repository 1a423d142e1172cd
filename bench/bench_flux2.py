"""Our FLUX.2 transformer and VAE vs diffusers' Flux2Transformer2DModel / AutoencoderKLFlux2, fp32 on CPU.

Transformer at klein 4B's real widths (hidden 3072, 24 heads x 128, SwiGLU MLP 9216, text features 7680) with a
few blocks of each kind (default 1 double + 2 single; klein 4B has 5 + 20), 256 image tokens (a 256x256 image)
+ 256 text tokens (the pipeline pads to 512; fewer keep the run short), batch 1. VAE at its real widths
(128/256/512/512, 32 latent channels): encode and decode of a 128x128 image. Both sides get the same random
weights (diffusers' through its FLUX.2 single-file converter / LDM VAE converter). Holds
``/tmp/darkroom-heavy.lock`` while measuring:

    .venv/bin/python bench/bench_flux2.py [--double 1] [--single 2] [--tokens 256] [--threads 1] [--reps 3]
                                          [--skip-vae | --skip-transformer]
    .venv/bin/python bench/bench_flux2.py --first-step [--qwen-width 512] [--threads 1] [--reps 3]

Prints per-forward wall and CPU medians and the ratios ours/diffusers (with ``--threads 1`` CPU time is the
steadier measure on a shared machine).

``--first-step``: the time from a job's start to its first sampling step on a klein split set loaded through the
pipeline (a 28-layer Qwen3 of ``--qwen-width``, the tiny transformer reading 3 x that, a 64x64 image): a new
prompt (Qwen3 encodes 512 tokens) against a repeated one (the prompt cache answers), and the text encoder kept
where it is (resident) against moved to the device and back around the encode (offloaded; on a CPU-only machine
the move is a no-op, so the two differ only on a GPU, by the transfer of the encoder's bytes, printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)

from bench.common import heavy_lock  # noqa: E402
from core.models.flux2 import Flux2, Flux2Config, img_ids, txt_ids  # noqa: E402
from core.models.flux2_vae import Flux2AutoencoderKL, Flux2VAEConfig  # noqa: E402
from core.models.testing import random_flux2_vae_state_dict, random_state_dict  # noqa: E402


def build_transformers(cfg: Flux2Config) -> tuple[Flux2, Flux2Transformer2DModel]:
    with torch.device("meta"):
        ours = Flux2(cfg)
    bfl = random_state_dict(ours, seed=0)
    ours.load_state_dict(bfl, assign=True)
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(
            num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_in_dim, guidance_embeds=False,
        )
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl)), assign=True, strict=True)
    return ours.eval(), ref.eval()


def build_vaes() -> tuple[Flux2AutoencoderKL, AutoencoderKLFlux2]:
    weights = random_flux2_vae_state_dict("full", seed=0)
    ours = Flux2AutoencoderKL(Flux2VAEConfig.preset("full"))
    ours.load_state_dict(weights)
    ref = AutoencoderKLFlux2()
    ldm = {
        k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
        for k, v in weights.items()
    }
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    converted.update({k: v for k, v in weights.items() if k.startswith("bn.")})
    ref.load_state_dict(converted, strict=True)
    return ours.eval(), ref.eval()


def measure(pairs: dict[str, tuple[Callable, Callable]], reps: int) -> None:
    for label, (ours_fn, ref_fn) in pairs.items():
        a, b = ours_fn(), ref_fn()  # warm-up, and the two must agree
        err = ((a - b).norm() / b.norm()).item()
        wall: dict[str, list[float]] = {"ours": [], "diffusers": []}
        cpu: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(reps):  # interleaved, so drifting background load hits both alike
            for name, fn in (("ours", ours_fn), ("diffusers", ref_fn)):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            f"{label:12s} ours {med['ours']:7.3f} s wall {med_cpu['ours']:7.3f} s CPU | diffusers "
            f"{med['diffusers']:7.3f} s wall {med_cpu['diffusers']:7.3f} s CPU | ratio "
            f"{med['ours'] / med['diffusers']:.3f} wall, {med_cpu['ours'] / med_cpu['diffusers']:.3f} CPU "
            f"| rel. diff {err:.1e}",
            flush=True,
        )


def first_step(width: int, reps: int) -> None:
    """Prompt to first step through ``core.pipeline.generate`` (see the module docstring)."""
    import tempfile

    from core.models.flux2 import Flux2
    from core.models.qwen3 import Qwen3, Qwen3Config
    from core.models.testing import _save, write_random_flux2_vae
    from core.pipeline import PromptCache, generate, load_model
    from core.request import GenerationRequest

    root = Path(tempfile.mkdtemp(prefix="bench-flux2-"))
    qcfg = Qwen3Config(hidden_size=width, intermediate_size=3 * width, num_hidden_layers=28,
                       num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 256), head_dim=64)
    with torch.device("meta"):
        qwen = Qwen3(qcfg)
        dit = Flux2(dataclasses.replace(Flux2Config.preset("tiny"), context_in_dim=3 * width))
    model_path = _save(random_state_dict(dit, seed=1, dtype=torch.bfloat16), root / "flux-2-klein.safetensors")
    parts = {"text_encoder": _save(random_state_dict(qwen, seed=2, dtype=torch.bfloat16), root / "qwen3.safetensors"),
             "vae": write_random_flux2_vae(root / "flux2-vae.safetensors")}
    model = load_model(model_path, parts=parts, compute_hash=False, dtype=torch.float32)
    encoder_bytes = sum(p.numel() * p.element_size() for p in model.conditioner.qwen.parameters())
    cache = PromptCache()
    times: dict[str, list[float]] = {"new prompt": [], "repeated prompt": []}

    def to_first_step(prompt: str) -> float:
        start = time.perf_counter()
        seen: list[float] = []

        def on_step(step: int, total: int, x0: torch.Tensor) -> None:
            if not seen:
                seen.append(time.perf_counter() - start)

        generate(model, GenerationRequest(model="x", prompt=prompt, steps=1, cfg=1.0, seed=1, width=64, height=64),
                 cache=cache, on_step=on_step)
        return seen[0]

    to_first_step("warm-up")
    for i in range(reps):
        times["new prompt"].append(to_first_step(f"a red fox number {i}"))
        times["repeated prompt"].append(to_first_step(f"a red fox number {i}"))
    med = {k: statistics.median(v) for k, v in times.items()}
    dtype = str(model.conditioner.qwen.model.embed_tokens.weight.dtype).removeprefix("torch.")
    print(f"Qwen3 28 x {width} wide ({encoder_bytes / 1e6:.0f} MB as loaded, {dtype}), 512 tokens; prompt to first "
          f"step, medians of {reps}:")
    print(f"  new prompt {med['new prompt']:.3f} s, repeated prompt (cache hit) {med['repeated prompt']:.3f} s, "
          f"ratio {med['repeated prompt'] / med['new prompt']:.3f}")
    print(f"  offloaded vs resident: the same here (device {model.device}: nothing moves); on a GPU offloading adds "
          f"two transfers of the encoder per new prompt (Qwen3-4B bf16: 8.0 GB, Qwen3-8B: 16.4 GB) and frees that "
          "much device memory for the transformer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-step", action="store_true", help="prompt to first step through the pipeline")
    parser.add_argument("--qwen-width", type=int, default=512, help="--first-step: Qwen3 width (default 512)")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (default 1)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (default 2)")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens, a square number (default 256)")
    parser.add_argument("--text", type=int, default=256, help="text tokens (default 256; the pipeline uses 512)")
    parser.add_argument("--image", type=int, default=128, help="VAE image side in pixels (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per model (default 3)")
    parser.add_argument("--skip-vae", action="store_true", help="transformer only")
    parser.add_argument("--skip-transformer", action="store_true", help="VAE only")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first_step:
        with heavy_lock():
            first_step(args.qwen_width, args.reps)
        return
    side = int(args.tokens**0.5)
    cfg = dataclasses.replace(
        Flux2Config.preset("full", "klein-4b"), depth=args.double, depth_single_blocks=args.single
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; klein 4B widths, "
        f"{cfg.depth} double + {cfg.depth_single_blocks} single blocks, {side * side} image + {args.text} text "
        f"tokens; VAE {args.image}x{args.image}"
    )
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    pairs = {}
    if not args.skip_transformer:
        ours, ref = build_transformers(cfg)
        img = torch.randn(1, side * side, 128, generator=g)
        txt = torch.randn(1, args.text, cfg.context_in_dim, generator=g)
        iids, tids, t = img_ids(side, side), txt_ids(args.text), torch.tensor([0.7])
        pairs["transformer"] = (
            lambda: ours(img, iids, txt, tids, t),
            lambda: ref(img, txt, t, iids, tids, None, return_dict=False)[0],
        )
    if not args.skip_vae:
        ours_vae, ref_vae = build_vaes()
        image = torch.rand(1, 3, args.image, args.image, generator=g) * 2 - 1
        z = torch.randn(1, 32, args.image // 8, args.image // 8, generator=g)
        pairs["vae encode"] = (
            lambda: ours_vae.encoder(image),
            lambda: ref_vae.quant_conv(ref_vae.encoder(image)),
        )
        pairs["vae decode"] = (
            lambda: ours_vae.decoder(z),
            lambda: ref_vae.decode(z, return_dict=False)[0],
        )
    print(f"built both sides with the same random weights in {time.perf_counter() - t0:.1f} s", flush=True)
    with heavy_lock(), torch.inference_mode():
        measure(pairs, args.reps)


if __name__ == "__main__":
    main()
