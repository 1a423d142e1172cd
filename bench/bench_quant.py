"""Memory held and forward time of packed weights: a Linear stack at Flux widths in bf16, fp8 (e4m3fn), GGUF
Q8_0 and Q4_K, on the CPU.

    .venv/bin/python bench/bench_quant.py [--threads 1] [--tokens 64] [--reps 3] [--dtype bf16]

The stack is one double-block's worth of shapes: 3072x3072 (attention projection), 3072->12288 and
12288->3072 (MLP). Bytes are exact (``module_bytes``: what the parameters and buffers hold). Times are medians
of ``--reps`` forwards of ``--tokens`` tokens, with the dequantisation alone (one full weight rebuilt per layer,
as every forward does) timed separately: at few tokens it dominates, at Flux's 4096+512 tokens the matmul does.
Packed weights are random valid blocks (values do not change the work done). Runs are interleaved so load
from other jobs hits every variant alike.

``--lora R`` adds, for each packed variant, the forward with a rank-R LoRA on every layer applied at forward
time (``core.lora.patch.ForwardDelta``: the float32 dequantised weight plus ``up @ down``, then the cast), as
a ratio to the same packed forward without it. (A LoRA on bf16 weights is merged: no overhead.)

    .venv/bin/python bench/bench_quant.py --lora 16 [--tokens 64]
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


def lora_patches(model: nn.Module, rank: int) -> dict[nn.Module, object]:
    """A rank-``rank`` plain LoRA (alpha = rank) for each packed layer, as the patcher would attach it."""
    from core.lora.files import LoraModule
    from core.lora.keymap import Target
    from core.lora.patch import ForwardDelta
    from core.models.quant.layers import _Packed

    g = torch.Generator().manual_seed(1)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, _Packed):
            o, i = layer.weight_shape
            module = LoraModule(name, "lora", {"up": torch.randn(o, rank, generator=g) * 0.01,
                                               "down": torch.randn(rank, i, generator=g) * 0.01}, float(rank))
            out[layer] = ForwardDelta([(None, module, 0.8, Target("unet", name))])
    return out


CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="also time a rank-RANK LoRA applied at forward time on the packed variants")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (steadier than wall time on a shared machine)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    variants = ["bf16", "fp8", "Q8_0", "Q4_K"]
    models = {v: build(v, dtype) for v in variants}
    x = torch.randn(1, args.tokens, SHAPES[0][1]).to(dtype)

    forward: dict[str, list[float]] = {v: [] for v in variants}
    dequant: dict[str, list[float]] = {v: [] for v in variants}
    patches = {v: lora_patches(models[v], args.lora) for v in variants[1:]} if args.lora else {}
    with_lora: dict[str, list[float]] = {v: [] for v in patches}

    def lora_forward(v: str) -> None:
        for layer, patch in patches[v].items():
            layer.weight_patch = patch
        models[v](x)
        for layer in patches[v]:
            layer.weight_patch = None

    with torch.no_grad():
        for v in variants:
            models[v](x)  # warm-up
            if v in patches:
                lora_forward(v)
        for _ in range(args.reps):
            for v in variants:
                forward[v].append(timed(lambda v=v: models[v](x)))
                if v != "bf16":
                    dequant[v].append(timed(lambda v=v: dequantize_all(models[v], dtype)))
                if v in patches:
                    with_lora[v].append(timed(lambda v=v: lora_forward(v)))

    base_bytes = module_bytes(models["bf16"])
    base_time = statistics.median(forward["bf16"])
    n_weights = sum(o * i for o, i in SHAPES)
    print(f"Linear stack {' -> '.join(f'{i}x{o}' for o, i in SHAPES)} ({n_weights / 1e6:.1f} M weights), "
          f"compute {args.dtype}, {args.tokens} tokens, {args.threads} thread(s), median of {args.reps}, "
          f"{args.clock} time")
    print(f"{'weights':8} {'bytes held':>12} {'vs bf16':>8} {'forward ms':>11} {'vs bf16':>8} {'dequant ms':>11}")
    for v in variants:
        held = module_bytes(models[v])
        t = statistics.median(forward[v])
        d = f"{statistics.median(dequant[v]) * 1e3:11.1f}" if dequant[v] else f"{'-':>11}"
        print(f"{v:8} {held:12d} {held / base_bytes:8.4f} {t * 1e3:11.1f} {t / base_time:8.2f} {d}")
    for v, times in with_lora.items():
        t, plain = statistics.median(times), statistics.median(forward[v])
        print(f"{v + '+LoRA':14} rank {args.lora:<3} forward {t * 1e3:9.1f} ms = {t / plain:.2f}x {v} without, "
              f"{t / base_time:.2f}x bf16 (merged)")


if __name__ == "__main__":
    main()
