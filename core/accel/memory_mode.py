"""The memory placement a user can force (``--lowvram``, ``$DARKROOM_MEMORY``), without importing torch.

The CLI and the TUI read and check the choice before the worker (and torch) starts; the policy itself lives
in :mod:`core.accel.memory`.

- ``auto``: everything stays on the GPU unless the job's estimate says it does not fit; then model offload,
  then sequential (per-block) offload, and a tiled VAE, whichever is the least that fits.
- ``gpu``: never offload (a job that does not fit runs out of memory, then retries once with offload).
- ``lowvram``: model offload at least (each network on the GPU only while it runs); sequential when the
  estimate says model offload does not fit.
- ``sequential``: per-block offload of the denoiser always (the least VRAM, the slowest).
"""

from __future__ import annotations

from collections.abc import Mapping

from core.accel.choice import resolve_choice
from core.errors import DarkroomError

MODES = ("auto", "gpu", "lowvram", "sequential")
ENV_VAR = "DARKROOM_MEMORY"


class MemoryModeError(DarkroomError):
    """A memory choice that is not one of :data:`MODES`."""


def check_mode(value: str, source: str = "memory") -> str:
    mode = value.strip().lower()
    if mode not in MODES:
        raise MemoryModeError(f"{source} = {value!r} is not a memory mode; valid: {', '.join(MODES)}")
    return mode


def resolve_mode(lowvram: bool = False, env: Mapping[str, str] | None = None) -> str:
    """``lowvram`` (the ``--lowvram`` flag) wins; else ``$DARKROOM_MEMORY``; else auto."""
    return "lowvram" if lowvram else resolve_choice(None, "--lowvram", ENV_VAR, check_mode, "auto", env)
