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
    """``path`` when given; otherwise a random fp16 file of ``family`` written by ``write`` to a temp
    folder that is removed afterwards (about 2 GB for SD1.5, 6.9 GB for SDXL)."""
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as folder:
        path = Path(folder) / f"{family}-full-fp16.safetensors"
        print(f"writing a random {family} checkpoint to {path} ...", flush=True)
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


TIME_EMBED_KEY = "model.diffusion_model.time_embed.0.weight"  # [4 * model_channels, model_channels], LDM layout


def smooth_time_checkpoint(source: Path, target: Path, period: float = 1000.0) -> Path:
    """Copy an LDM-layout checkpoint with its timestep MLP's input weights tapered so the network is smooth in t.

    A trained denoiser approximates E[x0 | x_t], a smooth function of the noise level; i.i.d. random weights read
    every frequency of the sinusoidal timestep embedding alike, down to a period of 2 pi timesteps, so their output
    is close to white noise in t (measured on random full-size SD1.5: 9 % change from t=500 to 501, 26 % to 505,
    no closer at 700). Each embedding column is scaled by exp(-(f * period / 2 pi)^2), f its frequency in radians
    per timestep, which damps periods shorter than ``period`` timesteps, and the matrix is rescaled to its old
    norm. Every other weight, and the layout, stay as they were.
    """
    import math

    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    weight = tensors[TIME_EMBED_KEY].float()
    half = weight.shape[1] // 2  # cosines, then sines (core.models.unet.timestep_embedding)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half).repeat(2)
    tapered = weight * torch.exp(-(freqs * period / (2 * math.pi)) ** 2)
    tensors[TIME_EMBED_KEY] = (tapered * (weight.norm() / tapered.norm())).to(tensors[TIME_EMBED_KEY].dtype)
    save_file(tensors, str(target), metadata={"format": "pt"})
    return target
