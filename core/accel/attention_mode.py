"""The attention choice a user can force (``--attention``, ``$DARKROOM_ATTENTION``), without importing torch.

The CLI and the TUI read and check the choice on their own thread before the worker (and torch) starts; the
dispatcher itself lives in :mod:`core.accel.attention`.
"""

from __future__ import annotations

from collections.abc import Mapping

from core.accel.choice import resolve_choice
from core.errors import DarkroomError

BACKENDS = ("sage", "xformers", "sdpa")  # best first
MODES = ("auto", *BACKENDS)
ENV_VAR = "DARKROOM_ATTENTION"


class AttentionModeError(DarkroomError):
    """An attention choice that is not one of :data:`MODES`."""


def check_mode(value: str, source: str = "attention") -> str:
    """``value`` normalised ("SDPA " -> "sdpa"), or an error naming ``source`` and the valid choices."""
    mode = value.strip().lower()
    if mode not in MODES:
        raise AttentionModeError(f"{source} = {value!r} is not an attention backend; valid: {', '.join(MODES)}")
    return mode


def resolve_mode(value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The mode to run with: ``value`` (the command line) when given, else ``$DARKROOM_ATTENTION``, else auto."""
    return resolve_choice(value, "--attention", ENV_VAR, check_mode, "auto", env)
