"""How long importing torch on a background thread freezes the other threads: plain ``import torch`` vs
``core.accel.torch_import.import_torch`` (libraries preloaded outside the GIL, collection paused).

Each run is a fresh interpreter whose main thread (standing in for the UI's event loop) sleeps 5 ms at a time
and records how late it wakes while a second thread imports torch. Runs alternate between the two ways so
load on the machine hits both alike.

    .venv/bin/python bench/bench_torch_import.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, threading, time
gentle = sys.argv[1] == "gentle"

def load():
    global import_seconds
    start = time.monotonic()
    if gentle:
        from core.accel.torch_import import import_torch
        import_torch()
    else:
        import torch  # noqa: F401
    import_seconds = time.monotonic() - start

thread = threading.Thread(target=load)
worst = 0.0
thread.start()
while thread.is_alive():
    before = time.monotonic()
    time.sleep(0.005)
    worst = max(worst, time.monotonic() - before - 0.005)
print(json.dumps({"stall": worst, "import": import_seconds}))
"""


def measure(way: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, way], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"plain": [], "gentle": []}
    measure("plain")  # warm the page cache for both
    for _ in range(args.runs):
        for way in results:
            results[way].append(measure(way))
    print(f"torch import on a background thread, {args.runs} runs each, medians (max in brackets):")
    medians = {}
    for way, runs in results.items():
        stalls = [r["stall"] * 1000 for r in runs]
        imports = [r["import"] * 1000 for r in runs]
        medians[way] = statistics.median(stalls)
        print(f"  {way:6}  longest stall of the main thread {medians[way]:6.1f} ms ({max(stalls):.1f})"
              f"   import took {statistics.median(imports):6.0f} ms")
    print(f"  stall ratio gentle/plain: {medians['gentle'] / medians['plain']:.2f}")


if __name__ == "__main__":
    main()
