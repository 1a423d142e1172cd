"""Attention time per call at SD1.5's shapes: SDPA on this machine, and every available backend on CUDA.

    .venv/bin/python bench/bench_attention.py [--latent 32] [--repeat 10] [--quick]

SD1.5 runs 8 heads at every level, so head dims 40 / 80 / 160 (Sage cannot run 160); each UNet forward has 5
transformer blocks (self-attention over the latent's tokens, cross-attention over 77 text tokens) at each of
its three attention levels and one in the middle. Batch 2 is one CFG step. Printed per shape: median time per
call of plain SDPA, of the same call through an ``AttentionDispatcher`` (its choosing overhead), and on CUDA of
each backend forced, as a ratio to SDPA measured interleaved in the same run; then the totals per UNet forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.accel.attention import BACKENDS, AttentionDispatcher, attention  # noqa: E402


def sd15_shapes(latent: int) -> list[tuple[str, int, int, int, int]]:
    """(name, head_dim, q tokens, kv tokens, calls per UNet forward)."""
    shapes = []
    for level, dim in enumerate((40, 80, 160)):
        n = (latent // 2**level) ** 2
        shapes += [(f"L{level} self", dim, n, n, 5), (f"L{level} cross", dim, n, 77, 5)]
    mid = (latent // 8) ** 2
    shapes += [("mid self", 160, mid, mid, 1), ("mid cross", 160, mid, 77, 1)]
    return shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns: dict[str, object], repeat: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, run interleaved (one of each per round) after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
          dispatchers: dict[str, AttentionDispatcher]) -> dict[str, object]:
    """Plain ``attention`` (no dispatcher: SDPA) and the same call through each dispatcher."""

    def through(dispatcher: AttentionDispatcher):
        def call():  # what attention() does inside the runner's context, less one ContextVar.get
            return dispatcher(q, k, v, heads, layer="bench")
        return call

    return {"plain": lambda: attention(q, k, v, heads), **{m: through(d) for m, d in dispatchers.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px, 64 = 512 px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a brief CPU run: 3 rounds")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    heads = 8
    modes = ["sdpa"]
    if device.type == "cuda":
        auto = AttentionDispatcher()
        modes = [name for name in BACKENDS if name in auto.available(device)]
    dispatchers = {mode: AttentionDispatcher(mode) for mode in modes}
    auto = AttentionDispatcher()
    print(f"device {device}, {dtype}, batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"{torch.get_num_threads()} threads, median of {repeat}; backends here: {', '.join(modes)}")
    header = f"{'shape':<10} {'d':>4} {'q x kv':>11} {'sdpa ms':>9} {'+dispatch':>10}"
    header += "".join(f" {m + '/sdpa':>14}" for m in modes if m != "sdpa")
    print(header)
    totals = {name: 0.0 for name in ["plain", "auto", *modes]}
    with torch.inference_mode():
        for name, dim, n, m, count in sd15_shapes(args.latent):
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(args.batch, n, heads * dim, generator=g).to(device, dtype)
            k, v = (torch.randn(args.batch, m, heads * dim, generator=g).to(device, dtype) for _ in range(2))
            fns = calls(q, k, v, heads, {"auto": auto, **dispatchers})
            t = time_calls(fns, repeat, device)
            for key, value in t.items():
                totals[key] += value * count
            line = f"{name:<10} {dim:>4} {f'{n}x{m}':>11} {t['plain'] * 1e3:>9.3f} {(t['auto'] - t['plain']) * 1e6:>8.0f}us"
            line += "".join(f" {t[mode] / t['sdpa']:>13.3f}x" for mode in modes if mode != "sdpa")
            print(line, flush=True)
    print(f"per UNet forward: attention {totals['plain'] * 1e3:.1f} ms with plain SDPA; through the dispatcher "
          f"(auto: {auto.summary()}) {totals['auto'] / totals['plain']:.3f}x", end="")
    for mode in modes:
        if mode != "sdpa":
            print(f"; {mode} forced {totals[mode] / totals['sdpa']:.3f}x of sdpa", end="")
    print()
    # The dispatcher's own cost, on a call too small for the kernel to matter: what it adds to every layer.
    tiny = [torch.randn(1, 4, heads * 8).to(device, dtype) for _ in range(3)]
    fns = calls(*tiny, heads, {"auto": auto})
    t = time_calls(fns, 2000 if not args.quick else 300, device)
    print(f"choosing overhead: {(t['auto'] - t['plain']) * 1e6:.1f} us per call ({t['plain'] * 1e6:.1f} us for a "
          f"1x4-token SDPA call without a dispatcher)")
    for note in auto.notes + [n for d in dispatchers.values() for n in d.notes]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
