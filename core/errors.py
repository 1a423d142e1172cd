"""User-facing errors.

Every error the core raises on bad input is a ``DarkroomError`` whose message is one clear sentence naming
the file, field or value and what would be valid. Front ends print ``str(err)`` and never a traceback.
"""

from __future__ import annotations


class DarkroomError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing message."""


class CheckpointError(DarkroomError):
    """A model file cannot be used (not a checkpoint, truncated, wrong keys, unsupported family)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class RequestError(DarkroomError):
    """A generation request has an invalid field."""

    def __init__(self, field: str, value: object, valid: str) -> None:
        self.field = field
        self.value = value
        self.valid = valid
        super().__init__(f"{field} = {value!r} is invalid: {valid}")


class PresetError(DarkroomError):
    """A preset file is malformed."""


class ModelNotFoundError(DarkroomError):
    """A model named in a request is not in any models folder."""
