"""What the benchmarks share: the machine-wide lock for heavy runs, a scratch full-size checkpoint and a median
timer."""

from __future__ import annotations

import fcntl
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HEAVY_LOCK = "/tmp/darkroom-heavy.lock"


@contextmanager
def heavy_lock() -> Iterator[None]:
    """Serialize heavy runs (full-size models) so two benchmarks never measure each other."""
    with open(HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def scratch_checkpoint(path: Path | None, write: Callable[[Path], None], family: str = "sd15") -> Iterator[Path]:
    """``path`` when given; otherwise a full-size random fp16 file of ``family`` written by ``write`` to a temp
    folder that is removed afterwards (about 2 GB for SD1.5, 6.9 GB for SDXL)."""
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as folder:
        path = Path(folder) / f"{family}-full-fp16.safetensors"
        print(f"writing a full-size random {family} checkpoint to {path} ...", flush=True)
        write(path)
        yield path


def median_time(fn: Callable[[], object], reps: int, warm_up: bool = True) -> float:
    """Median wall seconds of ``reps`` calls of ``fn``, after one untimed call (first-call allocations, oneDNN
    kernels) unless ``warm_up`` is False."""
    if warm_up:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
