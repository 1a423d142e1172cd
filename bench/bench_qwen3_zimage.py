"""Forward time of our Qwen3 text encoder vs transformers' Qwen3Model and of our Z-Image transformer vs
diffusers' ZImageTransformer2DModel, at the real widths with a few layers, fp32 on CPU.

* Qwen3-4B widths (hidden 2560, 32 query / 8 key-value heads x 128, MLP 9728), default 2 of its 36 layers, one
  prompt of 512 tokens as klein encodes it (20 real tokens, the rest padding under the attention mask), all
  hidden states returned. The vocabulary is cut to 4096 rows (the lookup costs nothing; 151936 rows would be
  1.5 GB per copy). Also timed: Z-Image's encoding (``zimage_prompt_embeds``, which skips the padding columns)
  against transformers on the padded 512, the way ZImagePipeline runs it.
* Z-Image-Turbo widths (D 3840, 30 heads x 128, FFN 10240), default 1 noise + 1 context refiner and 2 main
  layers (the real model: 2 + 2 + 30), a 256 x 256 image (256 tokens) and a 40-token caption.

Both sides of each pair share the same weight tensors (diffusers' single-file converter splits our fused qkv
into views). Holds ``/tmp/darkroom-heavy.lock`` while measuring:

    .venv/bin/python bench/bench_qwen3_zimage.py [--only qwen3|zimage] [--layers 2] [--reps 3] [--threads 1]

Prints median wall and CPU seconds per forward and the ratios ours / reference (goal <= 1.0).
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

import transformers  # noqa: E402
from diffusers import ZImageTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402

from bench.common import heavy_lock  # noqa: E402
from core.models.qwen3 import Qwen3, Qwen3Config, zimage_prompt_embeds  # noqa: E402
from core.models.testing import random_state_dict  # noqa: E402
from core.models.zimage import ZImageConfig, ZImageTransformer  # noqa: E402

TEXT_TOKENS, REAL_TOKENS = 512, 20


def measure(fns: dict[str, Callable[[], object]], reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each function, interleaved so drifting background load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def report(title: str, wall: dict[str, list[float]], cpu: dict[str, list[float]], pairs: list[tuple[str, str]]) -> None:
    print(title)
    for name in wall:
        runs = ", ".join(f"{s:.2f}" for s in wall[name])
        print(f"  {name:24s} median {statistics.median(wall[name]):7.3f} s wall, "
              f"{statistics.median(cpu[name]):7.3f} s CPU   runs: {runs}")
    for ours, ref in pairs:
        w = statistics.median(wall[ours]) / statistics.median(wall[ref])
        c = statistics.median(cpu[ours]) / statistics.median(cpu[ref])
        print(f"  ratio {ours} / {ref}: {w:.3f} wall, {c:.3f} CPU")


def bench_qwen3(layers: int, reps: int) -> None:
    cfg = dataclasses.replace(Qwen3Config.preset("4b"), num_hidden_layers=layers, vocab_size=4096)
    with torch.device("meta"):
        meta = Qwen3(cfg)
    weights = random_state_dict(meta, seed=0)
    ours = meta
    ours.load_state_dict(weights, assign=True)
    rc = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=40960, attn_implementation="sdpa",
    )
    with torch.device("meta"):
        ref = transformers.Qwen3Model(rc)
    ref.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, assign=True, strict=True)
    ref.rotary_emb = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(rc)  # its buffer was on meta
    ours.eval()
    ref.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, TEXT_TOKENS), generator=g)
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.int64)
    mask[:, :REAL_TOKENS] = 1
    everything = range(layers + 1)
    fns = {
        "ours": lambda: ours(ids, mask, layers=everything),
        "transformers": lambda: ref(input_ids=ids, attention_mask=mask, output_hidden_states=True),
        "ours zimage_prompt_embeds": lambda: zimage_prompt_embeds(ours, ids, mask),
    }
    with heavy_lock(), torch.inference_mode():
        a = ours(ids, mask, layers=everything)
        b = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        err = max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))
        wall, cpu = measure(fns, reps)
    report(f"Qwen3-4B widths, {layers} layers, 1 x {TEXT_TOKENS} tokens ({REAL_TOKENS} real), max rel. diff {err:.1e}",
           wall, cpu, [("ours", "transformers"), ("ours zimage_prompt_embeds", "transformers")])


def bench_zimage(layers: int, reps: int, image: int, caption: int) -> None:
    cfg = dataclasses.replace(ZImageConfig.preset("full"), n_layers=layers, n_refiner_layers=1)
    with torch.device("meta"):
        ours = ZImageTransformer(cfg)
    weights = random_state_dict(ours, seed=0)
    ours.load_state_dict(weights, assign=True)
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(n_layers=layers, n_refiner_layers=1, axes_lens=[1536, 512, 512])
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(weights))
    ref.load_state_dict(converted, assign=True, strict=True)
    ours.eval()
    ref.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, image // 8, image // 8, generator=g)
    t = torch.tensor([0.4])
    caps = [torch.randn(caption, cfg.cap_feat_dim, generator=g)]
    fns = {
        "ours": lambda: ours(x, t, caps),
        "diffusers": lambda: ref([x[0].unsqueeze(1)], t, caps, return_dict=False),
    }
    with heavy_lock(), torch.inference_mode():
        a, b = ours(x, t, caps), ref([x[0].unsqueeze(1)], t, caps, return_dict=False)[0][0].squeeze(1)
        err = ((a[0] - b).norm() / b.norm()).item()
        wall, cpu = measure(fns, reps)
    tokens = (image // 16) ** 2
    report(f"Z-Image-Turbo widths, 1 + 1 refiners + {layers} layers, {tokens} image + {caption} caption tokens, "
           f"rel. diff {err:.1e}", wall, cpu, [("ours", "diffusers")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("qwen3", "zimage"), help="one network only")
    parser.add_argument("--layers", type=int, default=2, help="Qwen3 decoder layers / Z-Image main layers (2)")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per model (default 3)")
    parser.add_argument("--image", type=int, default=256, help="Z-Image image side in pixels (default 256)")
    parser.add_argument("--caption", type=int, default=40, help="Z-Image caption tokens (default 40)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    if args.only in (None, "qwen3"):
        bench_qwen3(args.layers, args.reps)
    if args.only in (None, "zimage"):
        bench_zimage(args.layers, args.reps, args.image, args.caption)


if __name__ == "__main__":
    main()
