"""Which device runs the networks, in which dtype, and how much memory it is using.

Called from the worker thread only (the UI thread never imports torch).
"""

from __future__ import annotations

import os
import resource
import sys

import torch

from core.errors import DarkroomError

_mps_peak = 0


class DeviceError(DarkroomError):
    """A requested device is unknown or not available on this machine."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` ("cuda", "cuda:1", "mps", "cpu"; None or "auto" = best): CUDA, then MPS, then CPU."""
    if preferred and preferred != "auto":
        try:
            device = torch.device(preferred)
        except (RuntimeError, ValueError) as exc:
            raise DeviceError(
                f"device {preferred!r} is unknown; valid: auto, cuda, cuda:N, mps, cpu"
            ) from exc
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"device {preferred!r} was asked for but CUDA is not available")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise DeviceError(
                    f"device {preferred!r} does not exist; this machine has {torch.cuda.device_count()} "
                    "CUDA device(s)"
                )
            if device.index is None:
                # "cuda" as the index it means: tensors report cuda:N, and the memory plan's placement compares
                # their devices with this one (cuda != cuda:0 counted nothing as resident)
                device = torch.device("cuda", torch.cuda.current_device())
        elif device.type == "mps":
            if not _mps_available():
                raise DeviceError(f"device {preferred!r} was asked for but MPS is not available")
            device = torch.device("mps", 0)  # as tensors on it report theirs (mps:0), like cuda:N above
        elif device.type not in ("cuda", "mps", "cpu"):
            raise DeviceError(f"device {preferred!r} is not supported; valid: auto, cuda, cuda:N, mps, cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if _mps_available():
        return torch.device("mps", 0)
    return torch.device("cpu")


def _process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()  # no /proc (macOS): the peak is the best cheap figure


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 0


def memory_stats(device: torch.device | str) -> tuple[int, int, int]:
    """``(used, peak, total)`` in bytes: tensor memory on CUDA/MPS, process RSS on CPU."""
    global _mps_peak
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        used = torch.cuda.memory_allocated(index)
        peak = torch.cuda.max_memory_allocated(index)
        total = torch.cuda.get_device_properties(index).total_memory
        return int(used), int(peak), int(total)
    if device.type == "mps":
        used = int(torch.mps.current_allocated_memory())
        _mps_peak = max(_mps_peak, used)  # torch keeps no MPS peak counter
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        total = int(recommended()) if recommended else _system_memory()
        return used, _mps_peak, total
    used = _process_rss()
    return used, max(used, _peak_rss()), _system_memory()


def _native_bf16(device: torch.device | None = None) -> bool:
    """Whether the CUDA GPU ``device`` (None or no index: the current one) computes in bf16 natively (Ampere,
    sm80, and later); older GPUs only emulate it, slower than fp16. torch's probe reads the current device, so
    another one (``--device cuda:1`` beside a GPU of another generation) is made current for it."""
    if device is not None and device.index is not None:
        with torch.cuda.device(device.index):
            return _native_bf16()
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def cpu_native_bf16() -> bool:
    """Whether this CPU has AMX tiles, where oneDNN's bf16 convolutions and matmuls beat fp32 by 2x and more
    (an SD1.5 UNet forward 1.9-2.2x, bench/bench_quarter.py). CPUs with only AVX-512 BF16 are left on fp32:
    not measured."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe
        return False


_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(
    device: torch.device | str, checkpoint_dtype: torch.dtype | None = None, precision: str = "auto"
) -> torch.dtype:
    """The dtype to run the networks in (the precision half of ``core.accel.memory``'s policy).

    ``precision`` (``core.accel.precision_mode``): fp32, bf16 or fp16 as asked, whatever the device. ``auto``:
    on CUDA, bf16 where the GPU has native bf16 (fp32's range: no fp16 overflow in the UNet or the VAE, and the
    speed of fp16), else fp16 (universal on CUDA, half the memory of fp32); on MPS fp16; on the CPU bf16 where it
    has AMX (:func:`cpu_native_bf16`), else fp32, because half-precision matmul is slow there without it.
    ``checkpoint_dtype`` is kept for callers that pass it; the choice does not depend on it.
    """
    if precision != "auto":
        return _PRECISION_DTYPES[precision]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (for the status bar)."""
    return str(dtype).removeprefix("torch.")
