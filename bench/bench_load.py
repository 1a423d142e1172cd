"""Checkpoint load time and memory against simply reading the file.

Writes a full-size random fp16 checkpoint of ``--family`` (SD1.5 about 2.13 GB, SDXL 6.94 GB) unless
``--path`` names one, then alternates
(a) reading every byte in 16 MB chunks and (b) ``load_checkpoint`` (lazy: weights are mapped, not read) and
(c) ``load_checkpoint`` plus touching every page of every weight (the real cost of having the weights in RAM).
The page cache cannot be dropped without root, so every run reads from a warm cache: the ratios compare our
overhead with the cheapest possible read, not disk speed. Peak RSS comes from fresh child processes that only
import torch and load. Holds ``/tmp/darkroom-heavy.lock`` while running (run it plainly, not under ``flock``).

    .venv/bin/python bench/bench_load.py [--family sdxl] [--path model.safetensors] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import heavy_lock, scratch_checkpoint  # noqa: E402

CHUNK = 16 * 1024 * 1024

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from core.models.checkpoint import load_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
loaded = load_checkpoint(sys.argv[2])
if sys.argv[3] == "touch":
    for m in loaded.components.values():
        for p in m.parameters():
            p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"base": base, "peak": peak, "hwm": hwm, "seconds": seconds}))
"""


WRITE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from core.models.testing import write_random_checkpoint
write_random_checkpoint(sys.argv[2], sys.argv[3], "full", seed=0, dtype=torch.float16)
"""


def raw_read(path: Path) -> float:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


def touch_all(loaded) -> None:
    """Fault in every page of every weight (one element per 4 KB page is enough)."""
    for module in loaded.components.values():
        for p in module.parameters():
            p.view(-1)[:: max(1, 4096 // p.element_size())].sum()


def child(path: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(path), mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--path", type=Path, help="an existing checkpoint (default: write a random fp16 one of --family)"
    )
    parser.add_argument("--family", default="sd15", help="family of the random checkpoint (sd15, sdxl)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    def write(path: Path) -> None:
        write_in_child(path, args.family)

    with heavy_lock(), scratch_checkpoint(args.path, write, args.family) as path:
        measure(path, args.repeats)


def write_in_child(path: Path, family: str = "sd15") -> None:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRITE, str(ROOT), str(path), family], check=True)
    print(f"wrote {path} in {time.perf_counter() - t:.1f} s")


def measure(path: Path, repeats: int) -> None:
    # Linux carries ru_maxrss across fork+exec, so this process stays small (no torch, no tensors) until the
    # child processes have measured: the file is written by a child too.
    size = path.stat().st_size
    raw_read(path)  # warm the page cache so every measurement below starts from the same state

    print(f"peak RSS of a fresh process that only loads, file size {size / 1e9:.3f} GB:")
    for mode in ("lazy", "touch"):
        r = child(path, mode)
        print(
            f"  {mode:6} ru_maxrss {r['peak'] / 1e9:.3f} GB = {r['peak'] / size:.2f}x file (VmHWM {r['hwm'] / 1e9:.3f} GB); "
            f"after importing torch {r['base'] / 1e9:.3f} GB, so the load added {(r['peak'] - r['base']) / size:.2f}x "
            f"file; {r['seconds']:.2f} s in a cold process"
        )

    import torch

    from core.models.checkpoint import load_checkpoint

    print(f"\nfile: {path}  torch {torch.__version__}, {os.cpu_count()} CPUs, warm page cache")

    reads, lazies, touched = [], [], []
    for _ in range(repeats):
        reads.append(raw_read(path))
        t = time.perf_counter()
        loaded = load_checkpoint(path)
        lazies.append(time.perf_counter() - t)
        touch_all(loaded)
        touched.append(time.perf_counter() - t)
        del loaded

    read, lazy, full = min(reads), min(lazies), min(touched)
    print(f"{'':34}{'best s':>8}{'GB/s':>8}{'vs read':>9}{'median':>9}   all runs (s)")
    for name, runs, best in (
        ("raw read, 16 MB chunks", reads, read),
        ("load_checkpoint (mapped, lazy)", lazies, lazy),
        ("load_checkpoint + page in weights", touched, full),
    ):
        runs_text = " ".join(f"{r:.3f}" for r in runs)
        ratio = statistics.median(runs) / statistics.median(reads)
        print(f"{name:34}{best:8.3f}{size / best / 1e9:8.2f}{best / read:8.2f}x{ratio:8.2f}x   {runs_text}")


if __name__ == "__main__":
    main()
