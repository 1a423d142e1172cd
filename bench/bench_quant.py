"""Memory held and forward time of packed weights: a Linear stack at Flux widths in bf16, fp8 (e4m3fn), GGUF
Q8_0 and Q4_K, on the CPU.

    .venv/bin/python bench/bench_quant.py [--threads 1] [--tokens 64] [--reps 3] [--dtype bf16]

The stack is one double-block's worth of shapes: 3072x3072 (attention projection), 3072->12288 and
12288->3072 (MLP). Bytes are exact (``module_bytes``: what the parameters and buffers hold). Times are medians
of ``--reps`` forwards of ``--tokens`` tokens, with the dequantisation alone (one full weight rebuilt per layer,
as every forward does) timed separately: at few tokens it dominates, at Flux's 4096+512 tokens the matmul does.
Packed weights are random valid blocks (values do not change the work done). Runs are interleaved so load
from other jobs hits every variant alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.models.quant import QuantizedTensor, assign_weights, module_bytes  # noqa: E402
from core.models.quant.layers import packed_state  # noqa: E402
from core.models.testing import random_ggml_blocks  # noqa: E402

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288)]  # (out, in) of each Linear, applied in order
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def stack() -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(i, o) for o, i in SHAPES])


def build(variant: str, dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    weights = {f"{n}.weight": torch.randn(s, generator=g) / s[1] ** 0.5 for n, s in enumerate(SHAPES)}
    biases = {f"{n}.bias": torch.randn(s[0], generator=g) * 0.01 for n, s in enumerate(SHAPES)}
    model = stack().to("meta")
    if variant == "bf16":
        tensors = {k: v.to(dtype) for k, v in weights.items()}
    elif variant == "fp8":
        tensors = {k: v.to(torch.float8_e4m3fn) for k, v in weights.items()}
    else:
        tensors = {
            k: QuantizedTensor(random_ggml_blocks(variant, v.shape, seed=i, scale=1e-3), variant, v.shape)
            for i, (k, v) in enumerate(weights.items())
        }
    assign_weights(model, {**tensors, **biases}, dtype=dtype)
    return model.eval()


def dequantize_all(model: nn.Module, dtype: torch.dtype) -> None:
    for packed in packed_state(model).values():
        packed.dequantize(dtype)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    variants = ["bf16", "fp8", "Q8_0", "Q4_K"]
    models = {v: build(v, dtype) for v in variants}
    x = torch.randn(1, args.tokens, SHAPES[0][1]).to(dtype)

    forward: dict[str, list[float]] = {v: [] for v in variants}
    dequant: dict[str, list[float]] = {v: [] for v in variants}
    with torch.no_grad():
        for v in variants:
            models[v](x)  # warm-up
        for _ in range(args.reps):
            for v in variants:
                forward[v].append(timed(lambda v=v: models[v](x)))
                if v != "bf16":
                    dequant[v].append(timed(lambda v=v: dequantize_all(models[v], dtype)))

    base_bytes = module_bytes(models["bf16"])
    base_time = statistics.median(forward["bf16"])
    n_weights = sum(o * i for o, i in SHAPES)
    print(f"Linear stack {' -> '.join(f'{i}x{o}' for o, i in SHAPES)} ({n_weights / 1e6:.1f} M weights), "
          f"compute {args.dtype}, {args.tokens} tokens, {args.threads} thread(s), median of {args.reps}")
    print(f"{'weights':8} {'bytes held':>12} {'vs bf16':>8} {'forward ms':>11} {'vs bf16':>8} {'dequant ms':>11}")
    for v in variants:
        held = module_bytes(models[v])
        t = statistics.median(forward[v])
        d = f"{statistics.median(dequant[v]) * 1e3:11.1f}" if dequant[v] else f"{'-':>11}"
        print(f"{v:8} {held:12d} {held / base_bytes:8.4f} {t * 1e3:11.1f} {t / base_time:8.2f} {d}")


if __name__ == "__main__":
    main()
