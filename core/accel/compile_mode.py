"""The compile choice of a session (``--compile``, ``$DARKROOM_COMPILE``), without importing torch.

Compiling is a setting of the runner, like the attention kernel, not an image parameter: it changes speed,
not the picture (to float rounding), so it is not recorded in the request or the image. The compiler itself
is :mod:`core.accel.compile`.

- ``off``: eager PyTorch (the default: compiling costs seconds to minutes on the first job of each size).
- ``auto``: ``torch`` (the bare ``--compile``).
- ``torch``: ``torch.compile`` (inductor) of the denoiser's blocks, once per model and shape; on a CUDA GPU,
  the whole network call replayed from a CUDA graph where nothing decides per step (``core.accel.cuda_graphs``).
- ``stable-fast``: ``sfast`` (NVIDIA only), only when asked for by name; falls back to ``torch`` with one
  message when it cannot run, and a job whose memory plan offloads the denoiser fails with a message saying
  so (the traced network keeps its weights where they were traced).
"""

from __future__ import annotations

from collections.abc import Mapping

from core.accel.choice import resolve_choice
from core.errors import DarkroomError

MODES = ("off", "auto", "torch", "stable-fast")
ENV_VAR = "DARKROOM_COMPILE"


class CompileModeError(DarkroomError):
    """A compile choice that is not one of :data:`MODES`."""


def check_mode(value: str, source: str = "compile") -> str:
    """``value`` normalised ("Torch " -> "torch", "stable_fast" -> "stable-fast"), or an error naming
    ``source`` and the valid choices."""
    mode = value.strip().lower().replace("_", "-")
    mode = {"on": "auto", "yes": "auto", "true": "auto", "1": "auto", "no": "off", "false": "off", "0": "off",
            "inductor": "torch", "sfast": "stable-fast"}.get(mode, mode)
    if mode not in MODES:
        raise CompileModeError(f"{source} = {value!r} is not a compile mode; valid: {', '.join(MODES)}")
    return mode


def resolve_mode(value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The mode to run with: ``value`` (the command line) when given, else ``$DARKROOM_COMPILE``, else off."""
    return resolve_choice(value, "--compile", ENV_VAR, check_mode, "off", env)
