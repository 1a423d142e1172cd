"""The precision a user can force (``--precision``, ``$DARKROOM_PRECISION``), without importing torch.

Like the attention kernel and the compile choice, precision is a setting of the runner, not an image
parameter: it is not recorded in the request or the image. The policy itself is
:func:`core.accel.device.compute_dtype`.

- ``auto``: bf16 on GPUs that compute it natively (Ampere and later), fp16 on older CUDA GPUs and on Apple
  GPUs; on the CPU, bf16 where it has AMX tiles (Intel Xeon 4th generation and later: oneDNN's bf16 kernels
  run the UNet 1.9-2.2x faster than fp32, bench/bench_quarter.py), fp32 elsewhere.
- ``fp32``: full precision everywhere (the reference's numbers; the slowest, twice the memory).
- ``bf16`` / ``fp16``: that half precision whatever the device (fp16 on a CPU is slow: 0.6x fp32, measured).
"""

from __future__ import annotations

from collections.abc import Mapping

from core.accel.choice import resolve_choice
from core.errors import DarkroomError

MODES = ("auto", "fp32", "bf16", "fp16")
ENV_VAR = "DARKROOM_PRECISION"
_ALIASES = {"float32": "fp32", "full": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


class PrecisionModeError(DarkroomError):
    """A precision that is not one of :data:`MODES`."""


def check_mode(value: str, source: str = "precision") -> str:
    """``value`` normalised ("BF16" -> "bf16", "float32" -> "fp32"), or an error naming ``source`` and the
    valid choices."""
    mode = value.strip().lower()
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise PrecisionModeError(f"{source} = {value!r} is not a precision; valid: {', '.join(MODES)}")
    return mode


def resolve_mode(value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The precision to run with: ``value`` (the command line) when given, else ``$DARKROOM_PRECISION``,
    else auto."""
    return resolve_choice(value, "--precision", ENV_VAR, check_mode, "auto", env)
